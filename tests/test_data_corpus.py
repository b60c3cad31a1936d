"""The bad-input corpus: odd-but-good audio is accepted as 16 kHz mono; broken audio and broken input files
are rejected with a one-line reason (per item) or a one-line error and exit status 2 (whole file)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from audio_rft import UserError
from audio_rft.data import audio as audio_module
from audio_rft.data.generic import build_table
from audio_rft.data.prepare import validate_dataset
from conftest import item, write_audio, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_each_file_accepted_or_rejected_with_its_reason(audio_corpus, tmp_path):
    root, expect = audio_corpus
    names = list(expect)
    src = write_jsonl(tmp_path / "items.jsonl", [item(f"i{n}", name) for n, name in enumerate(names)])
    summary = build_table(src, tmp_path / "out", audio_dir=root)
    out = tmp_path / "out"
    data = {s["id"]: s for s in read_jsonl(out / "data.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    assert summary["accepted"] + summary["rejected"] == len(names)
    for n, name in enumerate(names):
        if expect[name] is None:
            assert f"i{n}" in data, (name, rejected.get(f"i{n}"))
            info = sf.info(str(out / data[f"i{n}"]["audio"]))
            assert (info.samplerate, info.channels) == (16_000, 1), name
        else:
            reject = rejected[f"i{n}"]
            assert expect[name] in reject["reason"], (name, reject)
            assert "\n" not in reject["reason"] and reject["where"] == f"line {n + 1}"
    long_id = f"i{names.index('long40s.wav')}"
    assert sf.info(str(out / data[long_id]["audio"])).duration == pytest.approx(30.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cut_to_30s"] == [{"id": long_id, "original_seconds": 40.0}]
    # every accepted clip: where its audio came from, so two users can tell whether they scored the same audio
    assert set(manifest["clips"]) == set(data)
    stereo = manifest["clips"][f"i{names.index('stereo48k.wav')}"]
    assert (stereo["source_sample_rate"], stereo["source_channels"], stereo["source_seconds"]) == (48_000, 2, 0.5)
    assert stereo["source_sha256"] == hashlib.sha256((root / "stereo48k.wav").read_bytes()).hexdigest()
    assert stereo["sha256"] == hashlib.sha256((out / data[f"i{names.index('stereo48k.wav')}"]["audio"]).read_bytes()).hexdigest()


def test_a_wav_streamed_without_a_size_is_not_called_truncated(tmp_path):
    whole = write_audio(tmp_path / "a.wav", seconds=0.5).read_bytes()
    data_at = whole.index(b"data")
    streamed = whole[:data_at + 4] + b"\xff\xff\xff\xff" + whole[data_at + 8:]
    wave, info = audio_module.load_audio(streamed)
    assert len(wave) == 8000 and info.source_sha256 == hashlib.sha256(streamed).hexdigest()
    with pytest.raises(audio_module.AudioError, match="truncated audio"):
        audio_module.load_audio(whole[:-1000])


def test_file_vanishing_between_listing_and_reading_is_rejected(tmp_path, monkeypatch):
    clips = tmp_path / "clips"
    write_audio(clips / "a.wav"), write_audio(clips / "b.wav")
    real = audio_module._decode

    def vanish_then_decode(source):
        if str(source).endswith("b.wav"):
            Path(source).unlink()
        return real(source)

    monkeypatch.setattr(audio_module, "_decode", vanish_then_decode)
    src = write_jsonl(tmp_path / "items.jsonl", [item("a", "clips/a.wav"), item("b", "clips/b.wav")])
    summary = build_table(src, tmp_path / "out")
    assert summary["accepted"] == 1
    (reject,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert reject["id"] == "b" and "vanished" in reject["reason"]


def test_oserror_while_reading_is_rejected_not_raised(tmp_path, monkeypatch):
    write_audio(tmp_path / "a.wav")

    def denied(source):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(audio_module, "_decode", denied)
    src = write_jsonl(tmp_path / "items.jsonl", [item("a", "a.wav")])
    with pytest.raises(UserError, match="nothing accepted.*cannot read audio"):
        build_table(src, tmp_path / "out")


def test_bom_prefixed_json_is_accepted(tmp_path, good_wav):
    src = tmp_path / "items.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(item("a", "clips/good.wav")).encode() + b"\n")
    assert build_table(src, tmp_path / "out")["accepted"] == 1
    src = tmp_path / "items.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps([item("a", "clips/good.wav")], indent=1).encode())
    assert build_table(src, tmp_path / "out2")["accepted"] == 1


@pytest.mark.parametrize("content, message", [
    (b'\xff\xfe{"id": "a"}\n', "not UTF-8 text"),
    (b'[{"id": "a", "question": "q",\n "choices": ["x", ', "line 2 column 19: malformed JSON"),
    (b'{\n  "items": []\n}\n', "expected a JSON list"),
    (b"id,question\n1,q\n", "not JSON"),
])
def test_whole_file_problems_are_one_user_error(tmp_path, content, message):
    src = tmp_path / "items.jsonl"
    src.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        build_table(src, tmp_path / "out")
    assert str(src) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_truncated_json_lines_are_rejected_by_line(tmp_path, good_wav):
    good = json.dumps(item("a", "clips/good.wav"))
    separator = json.dumps(item("c", "clips/good.wav", question="line\u2028separator"), ensure_ascii=False)
    src = write_jsonl(tmp_path / "items.jsonl", [good, good.replace('"a"', '"b"')[:40], "", "[1, 2]", separator])
    assert build_table(src, tmp_path / "out")["accepted"] == 2  # a raw U+2028 inside a string is not a line break
    assert validate_dataset(tmp_path / "out") == []
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [(r["where"], r["reason"].split(" (")[0]) for r in rejected] == [
        ("line 2", "malformed JSON"), ("line 4", "expected a JSON object, got list")]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audio_rft", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00not utf-8", b'[{"id": "a",\n'])
def test_cli_unreadable_input_exits_2_with_one_line(tmp_path, content):
    src = tmp_path / "items.json"
    src.write_bytes(content)
    result = _cli("prepare", "jsonl", str(src), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert str(src) in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_nothing_accepted_exits_2_and_missing_input_too(tmp_path):
    src = write_jsonl(tmp_path / "items.jsonl", [item("a", "nope.wav")])
    result = _cli("prepare", "jsonl", str(src), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "nothing accepted" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = _cli("prepare", "mmau", str(tmp_path / "absent.json"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr
