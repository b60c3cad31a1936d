"""The synthetic bench: deterministic, balanced, held-out phrasings, and answerable only by listening."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
from scipy.optimize import minimize

from audio_rft.data.dataset import load_dataset
from audio_rft.data.synth import LEVELS, SUBS, build_synth

N_TRAIN, N_TEST = 9 * 80, 9 * 30  # 80 train and 30 test items per sub-category


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    summary = build_synth(out, N_TRAIN, N_TEST, seed=0)
    assert summary["train"]["accepted"] == N_TRAIN and summary["test"]["accepted"] == N_TEST
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    build_synth(tmp_path / "a", 27, 18, seed=7)
    build_synth(tmp_path / "b", 27, 18, seed=7)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sum(name.endswith(".wav") for name in a) == 45
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []
    build_synth(tmp_path / "c", 27, 18, seed=8)
    c = _files(tmp_path / "c")
    assert c["train/data.jsonl"] != a["train/data.jsonl"] or c["train/audio/synth-train-00000.wav"] != a["train/audio/synth-train-00000.wav"]


def test_item_depends_only_on_seed_split_index(tmp_path):
    """A smaller build is a prefix of a larger one: items don't depend on n or iteration order."""
    build_synth(tmp_path / "small", 10, 4, seed=3)
    build_synth(tmp_path / "big", 25, 9, seed=3)
    for split, n in (("train", 10), ("test", 4)):
        small, big = (tmp_path / "small" / split, tmp_path / "big" / split)
        assert (small / "data.jsonl").read_text().splitlines() == (big / "data.jsonl").read_text().splitlines()[:n]
        for wav in (small / "audio").iterdir():
            assert wav.read_bytes() == (big / "audio" / wav.name).read_bytes()
    manifest = json.loads((tmp_path / "small" / "train" / "manifest.json").read_text())
    assert manifest["builder"] == "synth" and manifest["params"]["seed"] == 3 and manifest["params"]["n"] == 10


def test_coverage_balance_and_choices(bench):
    for split in ("train", "test"):
        samples = load_dataset(bench / split)
        assert {s.task for s in samples} == {"sound", "music", "speech"}
        assert {s.sub_category for s in samples} == set(SUBS)
        by_sub = defaultdict(list)
        for s in samples:
            by_sub[s.sub_category].append(s)
            assert s.answer in s.choices and 2 <= len(s.choices) <= 5
            assert sorted(s.choices) == sorted(SUBS[s.sub_category][3])
            assert s.difficulty in LEVELS and s.split == split and s.source == "synth"
            assert s.reasoning and len(s.reasoning.split()) <= 12
        for sub, items in by_sub.items():
            answers = Counter(s.answer for s in items)
            assert set(answers) == set(SUBS[sub][3]), sub
            assert max(answers.values()) - min(answers.values()) <= 1, (sub, answers)
            levels = Counter(s.difficulty for s in items)
            assert set(levels) == set(LEVELS) and max(levels.values()) - min(levels.values()) <= len(answers), (sub, levels)
        # the answer's position among the choices is uniform too
        for k in {len(s.choices) for s in samples}:
            positions = Counter(s.choices.index(s.answer) for s in samples if len(s.choices) == k)
            shares = [positions[p] / sum(positions.values()) for p in range(k)]
            assert max(abs(share - 1 / k) for share in shares) < 0.12, (split, k, shares)


def test_held_out_phrasings(bench):
    train = {s.question for s in load_dataset(bench / "train")}
    test = {s.question for s in load_dataset(bench / "test")}
    assert train.isdisjoint(test)
    assert train == {q for sub in SUBS.values() for q in sub[4]}
    assert test == {q for sub in SUBS.values() for q in sub[5]}


def test_clips_fit_the_tiny_window(bench):
    for split in ("train", "test"):
        for wav in (bench / split / "audio").iterdir():
            info = sf.info(str(wav))
            assert info.samplerate == 16_000 and info.channels == 1 and info.subtype == "PCM_16"
            assert 2.0 <= info.duration <= 4.0, (wav.name, info.duration)


def _chance(samples) -> float:
    return float(np.mean([1 / len(s.choices) for s in samples]))


def _text_only_accuracy(train, test) -> float:
    """Best guess from text alone: majority answer per (question, choices), else per choice set, else
    the most common answer position for that number of choices; all learned on `train`."""
    tables = [defaultdict(Counter) for _ in range(2)]
    position = defaultdict(Counter)
    for s in train:
        tables[0][(s.question, tuple(s.choices))][s.answer] += 1
        tables[1][frozenset(s.choices)][s.answer] += 1
        position[len(s.choices)][s.choices.index(s.answer)] += 1
    hits = 0
    for s in test:
        for table, key in zip(tables, ((s.question, tuple(s.choices)), frozenset(s.choices))):
            if key in table:
                guess = table[key].most_common(1)[0][0]
                break
        else:
            guess = s.choices[position[len(s.choices)].most_common(1)[0][0]]
        hits += guess == s.answer
    return hits / len(test)


def test_text_alone_gives_chance(bench):
    train, test = load_dataset(bench / "train"), load_dataset(bench / "test")
    held_out = _text_only_accuracy(train, test)  # unseen phrasings
    half = len(train) // 2
    seen = _text_only_accuracy(train[:half], train[half:])  # same phrasings, new items
    print(f"\ntext-only accuracy: test {held_out:.3f} (chance {_chance(test):.3f}); "
          f"train halves {seen:.3f} (chance {_chance(train[half:]):.3f})")
    assert held_out <= _chance(test) + 0.08
    assert seen <= _chance(train[half:]) + 0.08


# ---- separability: a linear classifier on pooled Whisper-style 64-bin log-mel features

MEL = librosa.filters.mel(sr=16_000, n_fft=400, n_mels=64)


def _features(path: Path) -> np.ndarray:
    """Time-pooled features of the log-mel the tiny model sees (4 s window, Whisper's normalisation)."""
    y, _ = sf.read(str(path), dtype="float32")
    mel = MEL @ np.abs(librosa.stft(np.pad(y, (0, 64_000 - len(y))), n_fft=400, hop_length=160)) ** 2
    mel = np.log10(np.maximum(mel, 1e-10))
    mel = (np.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0
    a = mel[:, : len(y) // 160]  # the clip's own frames
    quarters = [q.mean(1).reshape(16, 4).mean(1) for q in np.array_split(a, 4, axis=1)]  # coarse spectrogram
    peak = a.max(0)  # loudest band per frame
    envelope = [e.mean() for e in np.array_split(peak, 8)]
    weight = np.maximum(a - np.median(a, 0), 0.0) ** 2
    centroid = np.arange(64) @ weight / (weight.sum(0) + 1e-9)  # where in frequency the sound sits
    level = (peak - peak.min()) / (peak.max() - peak.min() + 1e-9)
    onsets = int(np.sum((level[1:] > 0.5) & (level[:-1] <= 0.5)))
    on = level > 0.5  # frames where something sounds
    time = np.linspace(-1, 1, len(peak))
    slopes = [np.polyfit(time, peak, 1)[0], np.polyfit(time[on], centroid[on], 1)[0]]  # louder? higher?
    return np.concatenate([a.mean(1), a[:, on].std(1), *quarters, envelope, slopes, np.eye(10)[min(onsets, 9)]])


def _logistic_classifier(x: np.ndarray, y: np.ndarray, k: int, l2: float = 0.01):
    """Multinomial logistic regression on standardised features (L-BFGS)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z, n, d = (x - mu) / sd, len(x), x.shape[1]

    def loss(w):
        w = w.reshape(d + 1, k)
        logits = z @ w[:-1] + w[-1]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = p - np.eye(k)[y]
        value = -np.log(p[np.arange(n), y] + 1e-12).mean() + 0.5 * l2 * (w[:-1] ** 2).sum()
        return value, np.vstack([z.T @ g / n + l2 * w[:-1], g.mean(0)]).ravel()

    w = minimize(loss, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B").x.reshape(d + 1, k)
    return lambda v: np.argmax((v - mu) / sd @ w[:-1] + w[-1], axis=1)


def test_every_sub_category_is_separable_by_listening(bench):
    """Trained on train items, scored on held-out test items: each sub-category at least 40 % of the way
    from chance to perfect, so a change that makes a task unlearnable from a 64-bin log-mel fails here."""
    data = {split: load_dataset(bench / split) for split in ("train", "test")}
    feats = {split: np.stack([_features(bench / split / s.audio) for s in data[split]]) for split in data}
    report, failed = [], []
    for sub, (_, _, _, answers, _, _) in SUBS.items():
        idx = {split: [i for i, s in enumerate(data[split]) if s.sub_category == sub] for split in data}
        y = {split: np.array([answers.index(data[split][i].answer) for i in idx[split]]) for split in data}
        predict = _logistic_classifier(feats["train"][idx["train"]], y["train"], len(answers))
        accuracy = float(np.mean(predict(feats["test"][idx["test"]]) == y["test"]))
        chance = 1 / len(answers)
        report.append(f"{sub:<17} {accuracy:.2f} (chance {chance:.2f})")
        if accuracy < chance + 0.4 * (1 - chance):
            failed.append(sub)
    print("\nheld-out accuracy of logistic regression on pooled log-mel:\n  " + "\n  ".join(report))
    assert not failed, failed


@pytest.mark.slow
def test_build_time_2000_items(tmp_path):
    start, cpu = time.perf_counter(), time.process_time()
    build_synth(tmp_path, 1600, 400, seed=0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\nbuilt 2,000 synthetic items in {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert wall < 120
