"""AVQA builder: AVQA's own train_qa.json (audio by pattern) and R1-AQA's JSONL (audio_path)."""

from __future__ import annotations

import json

import pytest

from audio_rft import UserError
from audio_rft.data.avqa import build_avqa
from conftest import write_audio, write_jsonl


def avqa_item(id: int, video_name: str, **extra) -> dict:
    return {"id": id, "video_name": video_name, "video_id": id + 100, "question_text": "What happened in the video?",
            "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"], "answer": 1,
            "question_relation": "View", "question_type": "Happening", **extra}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_qa_json_with_audio_dir_and_pattern(tmp_path):
    write_audio(tmp_path / "audio" / "-HG3Omg_89c_000030.wav")
    write_audio(tmp_path / "audio" / "clip2.wav")
    items = [avqa_item(183, "-HG3Omg_89c_000030"), avqa_item(184, "clip2", question_text="Video shows what?"),
             avqa_item(185, "absent"), avqa_item(186, "clip2", answer=4), avqa_item(187, "clip2", multi_choice="a|b")]
    src = tmp_path / "train_qa.json"
    src.write_text(json.dumps(items))
    summary = build_avqa(src, tmp_path / "out", audio_dir=tmp_path / "audio")
    assert (summary["accepted"], summary["rejected"]) == (2, 3)
    first, second = read(tmp_path / "out" / "data.jsonl")
    assert first["id"] == "183" and first["question"] == "What happened in the audio?"
    assert first["answer"] == "Yacht consignment" and first["task"] == "sound"
    assert (first["category"], first["sub_category"], first["source"], first["split"]) == ("Happening", "View", "avqa", "train")
    assert second["question"] == "Audio shows what?"
    reasons = [r["reason"] for r in read(tmp_path / "out" / "rejected.jsonl")]
    assert "audio file not found" in reasons[0] and "absent.wav" in reasons[0]
    assert reasons[1] == "field 'answer': index 4 out of range for 4 choices"
    assert reasons[2].startswith("field 'choices': not a list")


def test_audio_pattern_uses_item_fields(tmp_path):
    write_audio(tmp_path / "a" / "341.flac", format="FLAC")
    src = tmp_path / "val_qa.json"
    src.write_text(json.dumps([avqa_item(1, "x", video_id=341), avqa_item(2, "y")]))
    build_avqa(src, tmp_path / "out", audio_dir=tmp_path / "a", audio_pattern="{video_id}.flac")
    (sample,) = read(tmp_path / "out" / "data.jsonl")
    assert sample["split"] == "val"
    (reject,) = read(tmp_path / "out" / "rejected.jsonl")
    assert "102.flac" in reject["reason"]
    with pytest.raises(UserError, match="nothing accepted.*no field 'nope'"):
        build_avqa(src, tmp_path / "out2", audio_dir=tmp_path / "a", audio_pattern="{nope}.wav")


def test_r1_aqa_jsonl_with_absolute_audio_path(tmp_path):
    wav = write_audio(tmp_path / "elsewhere" / "-HG3Omg_89c_30.wav")
    rows = [{**avqa_item(183, "-HG3Omg_89c_000030"), "dataset_name": "AVQA", "audio_path": str(wav)},
            {**avqa_item(184, "v"), "dataset_name": "AVQA", "audio_path": str(tmp_path / "gone.wav")}]
    (tmp_path / "data").mkdir()
    src = write_jsonl(tmp_path / "data" / "avqa-train.jsonl", rows)
    summary = build_avqa(src, tmp_path / "out")
    assert (summary["accepted"], summary["rejected"]) == (1, 1)
    assert read(tmp_path / "out" / "rejected.jsonl")[0]["where"] == "line 2"
    # with --audio-dir given, absolute paths must lie inside it too
    with pytest.raises(UserError, match="escapes the audio root"):
        build_avqa(src, tmp_path / "out2", audio_dir=tmp_path / "data")
