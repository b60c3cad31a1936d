"""Generic builders: JSONL / CSV with a field mapping, Hugging Face datasets (saved to disk, parquet)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import soundfile as sf

from audio_rft import UserError
from audio_rft.data.generic import build_hf, build_table, parse_fields
from conftest import item, tone, write_audio, write_jsonl


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wav_bytes(seconds: float = 0.3, sr: int = 22_050, channels: int = 2) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, sr, channels), sr, format="WAV")
    return buf.getvalue()


BAD_ITEMS = {  # id -> (record changes, expected reason prefix)
    "no-question": ({"question": None}, "field 'question': missing or empty"),
    "blank-question": ({"question": "   "}, "field 'question': missing or empty"),
    "choices-string": ({"choices": "dog|cat"}, "field 'choices': not a list"),
    "one-choice": ({"choices": ["dog"]}, "field 'choices': 1 choices"),
    "dup-choices": ({"choices": ["dog", "cat", "Dog"]}, "field 'choices': duplicated choice"),
    "answer-absent": ({"answer": "cow"}, "field 'answer': 'cow' is not among the choices"),
    "missing-audio": ({"audio": "clips/nope.wav"}, "audio file not found"),
    "escaping": ({"audio": "../../etc/passwd"}, "audio path escapes the audio root"),
    "absolute-outside": ({"audio": "/etc/hostname"}, "audio path escapes the audio root"),
    "no-audio-field": ({"audio": None}, "field 'audio': missing or empty"),
    "nul-in-path": ({"audio": "clips/a\x00.wav"}, "invalid audio path"),
    "bad-task": ({"task": "noise"}, "field 'task'"),
}


def test_mixed_file_keeps_exactly_the_good_items(tmp_path, good_wav):
    records, good = [], []
    for n, (bad_id, (change, _)) in enumerate(BAD_ITEMS.items()):
        records.append(item(f"good{n}", "clips/good.wav"))
        good.append(f"good{n}")
        records.append({**item(bad_id, "clips/good.wav"), **change})
    records.append(item("good0", "clips/good.wav", question="a second item with the first one's id"))
    summary = build_table(write_jsonl(tmp_path / "mixed.jsonl", records), tmp_path / "out")
    assert [s["id"] for s in read(tmp_path / "out" / "data.jsonl")] == good
    rejected = read(tmp_path / "out" / "rejected.jsonl")
    assert [r["id"] for r in rejected] == [*BAD_ITEMS, "good0"]
    for r in rejected[:-1]:
        assert r["reason"].startswith(BAD_ITEMS[r["id"]][1]), r
    assert rejected[-1]["reason"] == "duplicate id (first one kept): 'good0'"
    assert rejected[-1]["where"] == f"line {len(records)}"
    assert summary["rejected_by_reason"]["duplicate id"] == 1


def test_answer_index_and_field_mapping_jsonl(tmp_path, good_wav):
    rows = [{"qid": 7, "q": "Which animal?", "options": ["dog", "cat"], "label": 1, "path": "clips/good.wav"},
            {"qid": 8, "q": "Which animal?", "options": ["dog", "cat"], "label": 2, "path": "clips/good.wav"},
            {"qid": 9, "q": "Which animal?", "options": ["dog", "cat"], "label": "x", "path": "clips/good.wav"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    fields = parse_fields(["id=qid", "question=q", "choices=options", "answer=label", "audio=path"])
    summary = build_table(src, tmp_path / "out", fields=fields, answer_index=True, task="music", split="dev")
    assert summary["accepted"] == 1
    (sample,) = read(tmp_path / "out" / "data.jsonl")
    assert (sample["id"], sample["answer"], sample["task"], sample["split"], sample["source"]) == ("7", "cat", "music", "dev", "in")
    assert [r["reason"] for r in read(tmp_path / "out" / "rejected.jsonl")] == [
        "field 'answer': index 2 out of range for 2 choices", "field 'answer': expected a choice index, got 'x'"]
    build_table(src, tmp_path / "out1", fields=fields, answer_index=True, index_base=1)
    assert [s["answer"] for s in read(tmp_path / "out1" / "data.jsonl")] == ["dog", "cat"]
    with pytest.raises(UserError, match="unknown field 'qestion'"):
        parse_fields(["qestion=q"])


def test_csv_with_mapping_choice_formats_and_default_audio_root(tmp_path):
    write_audio(tmp_path / "wavs" / "a.wav", sr=44_100, channels=2)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["question", "options", "label", "file", "sub-category"])
    writer.writerow(["Pitch?", '["high", "low"]', "low", "wavs/a.wav", "Pitch"])
    writer.writerow(["Multi\nline?", "up | down | flat", " down ", "wavs/a.wav", ""])
    writer.writerow(["Broken?", '["high", ', "high", "wavs/a.wav", ""])
    writer.writerow(["One?", "only", "only", "wavs/a.wav", ""])
    (tmp_path / "data.csv").write_text(buf.getvalue())
    fields = {"choices": "options", "answer": "label", "audio": "file"}
    summary = build_table(tmp_path / "data.csv", tmp_path / "out", fmt="csv", fields=fields, task="sound")
    assert summary["accepted"] == 2
    first, second = read(tmp_path / "out" / "data.jsonl")
    assert first["choices"] == ["high", "low"] and first["sub_category"] == "Pitch" and first["id"] == "data-0"
    assert second["choices"] == ["up", "down", "flat"] and second["answer"] == "down" and second["sub_category"] is None
    rejected = read(tmp_path / "out" / "rejected.jsonl")
    assert [r["where"] for r in rejected] == ["line 5", "line 6"]  # the quoted newline makes row 2 span two lines
    assert rejected[0]["reason"].startswith("field 'choices': starts with '['")
    assert rejected[1]["reason"].startswith("field 'choices': 1 choices")


def test_hf_saved_to_disk_with_bytes_paths_and_dicts(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_audio(tmp_path / "ds_audio" / "p.wav")
    ds = datasets.Dataset.from_dict({
        "question": ["Bytes?", "Dict?", "Path?", "Garbage?"],
        "choices": [["a", "b"], ["a", "b"], ["a", "b"], ["a", "b"]],
        "answer": [0, 1, 0, 1],
        "sound": [wav_bytes(), wav_bytes(), None, b"not audio at all"],
        "file": [None, None, "p.wav", None],
    })
    # one column as Hugging Face's audio dict, another as raw bytes / a path
    ds = ds.map(lambda r: {"clip": {"bytes": r["sound"], "path": r["file"]}}, remove_columns=["sound", "file"])
    ds.save_to_disk(str(tmp_path / "saved"))
    summary = build_hf(tmp_path / "saved", tmp_path / "out", fields={"audio": "clip"}, answer_index=True,
                       task="speech", audio_dir=tmp_path / "ds_audio")
    assert (summary["accepted"], summary["rejected"]) == (3, 1)
    samples = read(tmp_path / "out" / "data.jsonl")
    assert [s["answer"] for s in samples] == ["a", "b", "a"] and samples[0]["task"] == "speech"
    for s in samples:
        info = sf.info(str(tmp_path / "out" / s["audio"]))
        assert (info.samplerate, info.channels) == (16_000, 1)
    (reject,) = read(tmp_path / "out" / "rejected.jsonl")
    assert reject["where"] == "row 3" and reject["reason"].startswith("unreadable audio")


def test_hf_parquet_with_audio_feature_is_never_decoded_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "id": ["x1", "x2"], "question": ["Q1?", "Q2?"], "choices": [["yes", "no"], ["yes", "no"]],
        "answer": ["yes", "no"], "audio": [{"bytes": wav_bytes(), "path": "x1.wav"}, {"bytes": wav_bytes(0.5), "path": None}],
    })
    ds = ds.cast_column("audio", datasets.Audio())  # decoding this would need torchcodec
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    summary = build_hf(tmp_path / "pq", tmp_path / "out")
    assert summary["accepted"] == 2
    assert [s["id"] for s in read(tmp_path / "out" / "data.jsonl")] == ["x1", "x2"]
    summary = build_hf(tmp_path / "pq" / "train-00000.parquet", tmp_path / "out2", split="test")
    assert summary["accepted"] == 2 and read(tmp_path / "out2" / "data.jsonl")[0]["split"] == "test"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a dataset saved with save_to_disk nor parquet"):
        build_hf(tmp_path / "empty", tmp_path / "out3")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="cannot read as a Hugging Face dataset"):
        build_hf(tmp_path / "bad.parquet", tmp_path / "out3")


def test_hf_dataset_dict_needs_a_split_when_several(tmp_path):
    datasets = pytest.importorskip("datasets")
    part = datasets.Dataset.from_dict({"question": ["Q?"], "choices": [["a", "b"]], "answer": ["a"], "audio": [wav_bytes()]})
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="--hf-split"):
        build_hf(tmp_path / "dd", tmp_path / "out")
    summary = build_hf(tmp_path / "dd", tmp_path / "out", hf_split="test")
    assert summary["accepted"] == 1 and read(tmp_path / "out" / "data.jsonl")[0]["split"] == "test"
