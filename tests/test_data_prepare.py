"""The `prepare` and `validate` commands: exit statuses, summary, determinism, atomic output, validation."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from audio_rft.cli import main
from audio_rft.data import dataset as dataset_module
from audio_rft.data.prepare import SOURCES, validate_dataset
from conftest import item, write_audio, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


@pytest.fixture
def small_input(tmp_path: Path) -> Path:
    write_audio(tmp_path / "clips" / "a.wav", sr=22_050)
    write_audio(tmp_path / "clips" / "b.wav", seconds=1.0, channels=2)
    return write_jsonl(tmp_path / "in.jsonl", [item("a", "clips/a.wav"), item("b", "clips/b.wav", task="music"),
                                              item("c", "clips/missing.wav")])


def test_prepare_prints_summary_and_strict_exits_1(small_input, tmp_path, capsys):
    assert cli("prepare", "jsonl", str(small_input), "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "accepted 2, rejected 1" in out and "rejected: audio file not found: 1" in out
    assert "task music: 1 items" in out and "task sound: 1 items" in out and "h in total" in out
    assert cli("prepare", "jsonl", str(small_input), "--out", str(tmp_path / "out"), "--strict") == 1
    assert "--strict: 1 items rejected" in capsys.readouterr().err
    assert cli("validate", str(tmp_path / "out")) == 0


def test_prepare_twice_is_byte_identical_and_leaves_inputs_alone(small_input, tmp_path):
    inputs = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [small_input, *(tmp_path / "clips").iterdir()]}
    for out in ("one", "two"):
        assert cli("prepare", "jsonl", str(small_input), "--out", str(tmp_path / out)) == 0
    for name in ("data.jsonl", "manifest.json", "rejected.jsonl", "audio/a.wav", "audio/b.wav"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["params"]["input_sha256"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in inputs} == inputs


def test_failure_mid_write_leaves_no_output_and_keeps_the_old_one(small_input, tmp_path, monkeypatch):
    calls = []

    def failing_write(path, waveform, sample_rate=16_000):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(dataset_module, "write_wav", failing_write)
    from audio_rft.data.generic import build_table

    with pytest.raises(OSError):
        build_table(small_input, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    build_table(small_input, tmp_path / "kept")
    before = (tmp_path / "kept" / "manifest.json").read_bytes()
    calls.clear()
    monkeypatch.setattr(dataset_module, "write_wav", failing_write)
    with pytest.raises(OSError):
        build_table(small_input, tmp_path / "kept")
    assert (tmp_path / "kept" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "in.jsonl", "kept"]  # no temporary folders left


def test_validate_finds_problems(small_input, tmp_path, capsys):
    from audio_rft.data.generic import build_table

    out = tmp_path / "out"
    build_table(small_input, out)
    assert validate_dataset(out) == []
    write_audio(out / "audio" / "b.wav", sr=44_100, channels=2)  # not 16 kHz mono any more
    lines = (out / "data.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["audio"] = "../clips/a.wav"
    (out / "data.jsonl").write_text("\n".join([json.dumps(first), lines[1], '{"id": "x"}']) + "\n")
    problems = validate_dataset(out)
    text = "\n".join(problems)
    assert "data.jsonl:1: audio '../clips/a.wav' lies outside the dataset folder" in text
    assert "data.jsonl:2: audio 'audio/b.wav' is 44100 Hz, 2 channels" in text
    assert "data.jsonl:3: missing field 'audio'" in text
    assert "manifest.json: accepted is 2, the folder holds 3" in text
    assert cli("validate", str(out)) == 1
    assert cli("validate", str(tmp_path / "clips")) == 2
    assert "not a prepared dataset folder" in capsys.readouterr().err


def test_validate_detects_edits_through_the_content_hash(small_input, tmp_path):
    from audio_rft.data.generic import build_table

    build_table(small_input, tmp_path / "out")
    write_audio(tmp_path / "out" / "audio" / "a.wav", seconds=0.25)
    assert [p.split(": ", 1)[1] for p in validate_dataset(tmp_path / "out")] == [
        "content_sha256 does not match data.jsonl and audio/ (edited after prepare?)"]


def test_prepare_synth_calls_the_synth_builder(tmp_path, monkeypatch, capsys):
    calls = []

    def build_synth(out, n_train, n_test, seed):
        calls.append((out, n_train, n_test, seed))
        part = {"accepted": 3, "rejected": 0, "rejected_by_reason": {}, "per_task": {}, "audio_hours": 0.001}
        return {"train": part, "test": part}

    monkeypatch.setitem(sys.modules, "audio_rft.data.synth", types.SimpleNamespace(build_synth=build_synth))
    assert cli("prepare", "synth", "--out", str(tmp_path / "s"), "--train", "3", "--test", "3", "--seed", "7") == 0
    assert calls == [(tmp_path / "s", 3, 3, 7)]
    out = capsys.readouterr().out
    assert "train: accepted 3" in out and "test: accepted 3" in out


def test_every_subcommand_has_help(capsys):
    assert cli("prepare", "--help") == 0
    text = capsys.readouterr().out
    assert all(f"    {s} " in text for s in SOURCES)
    assert cli("validate", "--help") == 0
    assert "Exit status" in capsys.readouterr().out
    for source in SOURCES:
        assert cli("prepare", source, "--help") == 0
        text = capsys.readouterr().out
        assert f"usage: audio-rft prepare {source}" in text and "--out DIR" in text
    assert cli("prepare", "csv", "--help") == 0
    text = capsys.readouterr().out
    for option in ("--field", "answer_index=", "audio_dir=", "delimiter=", "--strict"):  # --key VALUE: any key
        assert option in text
    assert "delimiter=" not in (cli("prepare", "jsonl", "--help"), capsys.readouterr().out)[1]  # its own keys only


def test_usage_errors_exit_2(small_input, tmp_path, capsys):
    assert cli("prepare", "jsonl", str(small_input)) == 2  # --out missing
    assert cli("prepare", "jsonl", str(small_input), "--out", str(tmp_path / "o"), "--field", "nope=x") == 2
    assert cli("prepare", "jsonl", str(small_input), "--out", str(tmp_path / "o"), "--task", "noise") == 2
    assert cli("prepare", "jsonl", str(small_input), "--out", str(tmp_path / "o"), "--audio-dir", str(tmp_path / "no")) == 2
    assert "--audio-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_only_prepare_hf_imports_datasets():
    code = ("import sys; from audio_rft.data import prepare, generic, avqa, mmau; "
            "assert 'datasets' not in sys.modules and 'librosa' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_recipes_load_and_mmau_recipe_runs(shared_data, tmp_path, capsys):
    from audio_rft.config import load_config
    from audio_rft.data.prepare import PrepareConfig

    for recipe in sorted((REPO / "data_prep").glob("*.yaml")):
        assert load_config(PrepareConfig, recipe).source in SOURCES, recipe
    clip = "3fe64f3d-282c-4bc8-a753-68f8f6c35652"
    write_audio(tmp_path / f"{clip}.wav", seconds=1.0)  # a stand-in clip, found by basename in audio_dir
    assert cli("prepare", "recipe", str(REPO / "data_prep" / "mmau-test-mini.yaml"),
               f"input={shared_data / 'mmau-test-mini.json'}", f"audio_dir={tmp_path}", f"out={tmp_path / 'mm'}") == 0
    assert "accepted 1, rejected 999" in capsys.readouterr().out
    assert cli("prepare", "recipe", "--help") == 0
    assert "audio_pattern=" in capsys.readouterr().out


def test_prepare_holds_out_a_dev_split_by_seed(tmp_path, capsys):
    from audio_rft.data.dataset import load_dataset

    for i in range(10):
        write_audio(tmp_path / "clips" / f"{i}.wav", seconds=0.2)
    src = write_jsonl(tmp_path / "items.jsonl", [item(f"q{i}", f"clips/{i}.wav") for i in range(10)] + ["{broken"])
    assert cli("prepare", "jsonl", str(src), "--out", str(tmp_path / "d"), "dev=3", "dev_seed=5") == 0
    train, dev = load_dataset(tmp_path / "d" / "train"), load_dataset(tmp_path / "d" / "dev")
    assert len(dev) == 3 and len(train) == 7 and not {s.id for s in dev} & {s.id for s in train}
    assert {s.split for s in dev} == {"dev"} and {s.split for s in train} == {"train"}
    for part in ("train", "dev"):
        assert validate_dataset(tmp_path / "d" / part) == []
    manifest = json.loads((tmp_path / "d" / "dev" / "manifest.json").read_text())
    assert manifest["params"]["dev_split"] == {"part": "dev", "dev": 3, "seed": 5, "of": 10}
    assert set(manifest["clips"]) == {s.id for s in dev}  # the source clip's provenance travels with it
    assert json.loads((tmp_path / "d" / "train" / "manifest.json").read_text())["rejected"] == 1
    # the same seed holds out the same items; another seed others
    assert cli("prepare", "jsonl", str(src), "--out", str(tmp_path / "e"), "dev=3", "dev_seed=5") == 0
    assert [s.id for s in load_dataset(tmp_path / "e" / "dev")] == [s.id for s in dev]
    assert cli("prepare", "jsonl", str(src), "--out", str(tmp_path / "f"), "dev=3", "dev_seed=6") == 0
    assert [s.id for s in load_dataset(tmp_path / "f" / "dev")] != [s.id for s in dev]
    capsys.readouterr()
    assert cli("prepare", "jsonl", str(src), "--out", str(tmp_path / "g"), "dev=10") == 2
    assert "dev=10: hold out between 1 and 9 of the 10 items" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))


def test_prepare_synth_takes_the_dev_split_from_train(tmp_path):
    from audio_rft.data.dataset import load_dataset

    assert cli("prepare", "synth", "--out", str(tmp_path / "s"), "train=12", "test=4", "dev=4") == 0
    train, dev, test = (load_dataset(tmp_path / "s" / p) for p in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (8, 4, 4)
    assert not {s.id for s in dev} & {s.id for s in train} and {s.split for s in dev} == {"dev"}
