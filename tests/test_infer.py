"""Inference: MMAU prediction format that the scorer reads, crash-resume equality, and the audio ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audio_rft.answers import extract_answer, extract_answer_r1_aqa
from audio_rft.data.dataset import load_dataset
from audio_rft.eval import infer
from audio_rft.eval.infer import InferConfig, run_inference
from audio_rft.eval.score import load_predictions, score_file
from helpers import one_thread, synth_data, tiny_model  # noqa: F401 (fixtures)


def infer_config(tiny_model, synth_data, out, **overrides) -> InferConfig:
    values = dict(model=str(tiny_model), data=str(synth_data / "test"), out=str(out), batch_size=8, max_new_tokens=6,
                  device="cpu", dtype="fp32")
    values.update(overrides)
    return InferConfig(**values)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, synth_data, tmp_path_factory):
    return run_inference(infer_config(tiny_model, synth_data, tmp_path_factory.mktemp("infer") / "pred.json"))


def test_predictions_are_in_mmau_format_and_input_order(uninterrupted, synth_data):
    records = json.loads(uninterrupted.read_text())
    samples = load_dataset(synth_data / "test")
    assert [r["id"] for r in records] == [s.id for s in samples]  # input order, although batches are length-sorted
    for record, s in zip(records, samples):
        assert {"id", "question", "choices", "answer", "task", "difficulty", "sub-category", "model_output",
                "model_prediction"} <= set(record)
        assert record["model_prediction"] == extract_answer(record["model_output"])
        assert record["choices"] == s.choices and record["answer"] == s.answer
        assert record["sub-category"] == s.sub_category and record["prompt_mode"] == "answer"
        assert 1 <= record["completion_tokens"] <= 6
    assert not uninterrupted.with_name(uninterrupted.name + ".partial.jsonl").exists()
    meta = json.loads(uninterrupted.with_name("pred.meta.json").read_text())
    assert meta["n"] == len(samples) and meta["ablate_audio"] is False


def test_scorer_reads_the_predictions(uninterrupted):
    items = load_predictions(uninterrupted)
    result = score_file(uninterrupted)
    assert result["summary"]["n"] == len(items) == 24
    assert [s["id"] for s in result["samples"]] == [item["id"] for item in items]
    assert set(result["summary"]["task"]) <= {"sound", "music", "speech", "other"}


def test_extract_r1_aqa_is_applied_and_recorded(uninterrupted, tiny_model, synth_data, tmp_path):
    out = run_inference(infer_config(tiny_model, synth_data, tmp_path / "pred.json", extract="r1-aqa"))
    records, reference = json.loads(out.read_text()), json.loads(uninterrupted.read_text())
    assert [r["model_output"] for r in records] == [r["model_output"] for r in reference]  # the same generation
    assert all(r["model_prediction"] == extract_answer_r1_aqa(r["model_output"]) for r in records)
    meta = json.loads((tmp_path / "pred.meta.json").read_text())
    assert meta["extract"] == "r1-aqa" and meta["config"]["extract"] == "r1-aqa"
    assert json.loads(uninterrupted.with_name("pred.meta.json").read_text())["extract"] == "audio-rft"


def test_resume_after_a_crash_gives_the_uninterrupted_file(uninterrupted, tiny_model, synth_data, tmp_path, monkeypatch):
    real = infer.generate_answers
    calls = {"n": 0}

    def crash_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "generate_answers", crash_after_first_batch)
    config = infer_config(tiny_model, synth_data, tmp_path / "pred.json")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_inference(config)
    partial = tmp_path / "pred.json.partial.jsonl"
    assert not (tmp_path / "pred.json").exists()
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert "meta" in lines[0] and len(lines) == 1 + 8  # the meta line, then the one finished batch

    calls["n"] = -100  # no more crashes; count the batches the rerun computes
    run_inference(config)
    assert calls["n"] == -100 + 2  # 3 batches of 8, one already done
    assert json.loads((tmp_path / "pred.json").read_text()) == json.loads(uninterrupted.read_text())
    assert not partial.exists()


def test_partial_from_another_config_is_not_reused(uninterrupted, tiny_model, synth_data, tmp_path):
    partial = tmp_path / "pred.json.partial.jsonl"
    partial.write_text(json.dumps({"meta": {"model": "something else"}}) + "\n"
                       + json.dumps({"index": 0, "output": "stale", "tokens": 1}) + "\n")
    run_inference(infer_config(tiny_model, synth_data, tmp_path / "pred.json"))
    assert json.loads((tmp_path / "pred.json").read_text()) == json.loads(uninterrupted.read_text())


def test_ablate_audio_from_the_command_line(tiny_model, synth_data, tmp_path, monkeypatch, capsys):
    """`audio-rft infer --ablate-audio`: every clip replaced by silence of the same length."""
    import audio_rft.rollout as rollout
    from audio_rft.cli import main

    seen = []
    real = rollout.load_waveforms

    def spy(folder, samples, ablate_audio=False):
        waves = real(folder, samples, ablate_audio)
        seen.append((ablate_audio, [len(w) for w in waves], [float(np.abs(w).max()) for w in waves]))
        return waves

    monkeypatch.setattr(rollout, "load_waveforms", spy)
    out = tmp_path / "ablated.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["infer", "--model", str(tiny_model), "--data", str(synth_data / "test"), "--out", str(out),
              "--ablate-audio", "--limit", "10", "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(seen) == 3 and all(flag and max(peaks) == 0.0 for flag, _, peaks in seen)
    real_lengths = sorted(len(w) for w in real(synth_data / "test", load_dataset(synth_data / "test", limit=10)))
    assert sorted(n for _, lengths, _ in seen for n in lengths) == real_lengths
    records = json.loads(out.read_text())
    assert len(records) == 10 and all("model_output" in r for r in records)
    assert json.loads((tmp_path / "ablated.meta.json").read_text())["ablate_audio"] is True
    score_file(out)


def test_shuffle_choices_answers_each_item_under_seeded_orders(uninterrupted, tiny_model, synth_data, tmp_path, monkeypatch):
    shown = []
    real = infer.generate_answers

    def spy(core, processor, folder, samples, *args, **kwargs):
        shown.extend((s.id, tuple(s.choices)) for s in samples)
        return real(core, processor, folder, samples, *args, **kwargs)

    monkeypatch.setattr(infer, "generate_answers", spy)
    out = run_inference(infer_config(tiny_model, synth_data, tmp_path / "pred.json", shuffle_choices=2))
    original = json.loads(out.read_text())
    assert [r["model_output"] for r in original] == [r["model_output"] for r in json.loads(uninterrupted.read_text())]
    for order in (1, 2):
        path = infer.permutation_path(out, order)
        assert path.name == f"pred.perm{order}.json"
        records = json.loads(path.read_text())
        assert [r["id"] for r in records] == [r["id"] for r in original]
        for r, o in zip(records, original):
            assert r["choices"] == [o["choices"][i] for i in r["choice_permutation"]] != o["choices"]
            assert r["answer"] == o["answer"]
            assert (r["id"], tuple(r["choices"])) in shown  # the prompt showed the choices in that order
        assert json.loads(path.with_name(f"pred.perm{order}.meta.json").read_text())["choice_order"] == {"order": order, "seed": 0}
    first = [r["choice_permutation"] for r in json.loads(infer.permutation_path(out, 1).read_text())]
    assert first != [r["choice_permutation"] for r in json.loads(infer.permutation_path(out, 2).read_text())]
    assert first == [infer.choice_permutation(r["id"], 1, 0, len(r["choices"])) for r in original]  # seeded
    assert infer.choice_permutation("x", 1, 0, 2) == [1, 0]  # two choices: the order asked for swaps them


def test_letter_choices_show_lettered_options_and_keep_the_choices(tiny_model, synth_data, tmp_path, monkeypatch):
    shown = []
    real = infer.generate_answers

    def spy(core, processor, folder, samples, *args, **kwargs):
        shown.extend(s.choices for s in samples)
        return real(core, processor, folder, samples, *args, **kwargs)

    monkeypatch.setattr(infer, "generate_answers", spy)
    out = run_inference(infer_config(tiny_model, synth_data, tmp_path / "pred.json", letter_choices=True, limit=4))
    records = json.loads(out.read_text())
    originals = {s.id: s.choices for s in load_dataset(synth_data / "test", limit=4)}
    assert len(shown) == 4 and all(r["choices"] == originals[r["id"]] for r in records)
    for choices in shown:
        assert [c[:3] for c in choices] == [f"{letter}. " for letter in "ABCDEFGH"[:len(choices)]]
        assert [c[3:] for c in choices] in list(originals.values())
