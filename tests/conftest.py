"""Shared data fixtures: audio generated with numpy + soundfile into tmp_path (no audio files in the repo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MMAU_CLIP_ID = "3fe64f3d-282c-4bc8-a753-68f8f6c35652"


def tone(seconds: float = 0.5, sr: int = 16_000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_audio(path: Path, seconds: float = 0.5, sr: int = 16_000, channels: int = 1, subtype: str | None = None,
                format: str | None = None, data: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, sr, channels) if data is None else data, sr, subtype=subtype, format=format)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def item(id: str, audio: str, question: str = "What is heard?", choices=("dog", "cat", "bird"), answer="dog", **extra):
    return {"id": id, "audio": audio, "question": question, "choices": list(choices) if isinstance(choices, tuple) else choices,
            "answer": answer, "task": "sound", **extra}


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared is absent (a user's clone has none)")
    return SHARED_DATA


@pytest.fixture
def good_wav(tmp_path: Path) -> Path:
    return write_audio(tmp_path / "clips" / "good.wav")


# name -> (how to make it in `root`, expected reason fragment, or None when it must be accepted as 16 kHz mono)
def _corpus_files(root: Path) -> dict[str, str | None]:
    expect: dict[str, str | None] = {}

    def ok(name, **kw):
        write_audio(root / name, **kw)
        expect[name] = None

    ok("pcm8.wav", subtype="PCM_U8")
    ok("pcm24.wav", subtype="PCM_24")
    ok("pcm32.wav", subtype="PCM_32")
    ok("float32.wav", subtype="FLOAT")
    ok("stereo48k.wav", sr=48_000, channels=2)
    ok("clip.flac", format="FLAC")
    ok("clip.ogg", format="OGG", subtype="VORBIS")
    ok("long40s.wav", seconds=40.0, sr=8_000)
    (root / "zero.wav").write_bytes(b"")
    expect["zero.wav"] = "empty audio file"
    write_audio(root / "header_only.wav", data=np.zeros((0, 1), dtype=np.float32))
    expect["header_only.wav"] = "zero frames"
    (root / "text.wav").write_text("this is not audio\n" * 20)
    expect["text.wav"] = "unreadable audio"
    bad = tone(0.2)
    bad[10] = np.nan
    write_audio(root / "nan.wav", subtype="FLOAT", data=bad)
    expect["nan.wav"] = "NaN or inf"
    bad = tone(0.2)
    bad[10] = np.inf
    write_audio(root / "inf.wav", subtype="FLOAT", data=bad)
    expect["inf.wav"] = "NaN or inf"
    # a cut-off download: the header announces 1 s, the file holds the first third (libsndfile reads what is left)
    whole = write_audio(root / "truncated.wav", seconds=1.0).read_bytes()
    (root / "truncated.wav").write_bytes(whole[:len(whole) // 3])
    expect["truncated.wav"] = "truncated audio: the WAV header announces 16000 frames, the file holds"
    write_audio(root / "short.wav", seconds=0.05)
    expect["short.wav"] = "implausibly short audio: 0.050 s"
    ok("just_long_enough.wav", seconds=0.1)
    os.symlink("loop_b.wav", root / "loop_a.wav")
    os.symlink("loop_a.wav", root / "loop_b.wav")
    expect["loop_a.wav"] = "symlink loop"
    expect["missing.wav"] = "audio file not found"
    expect["../outside.wav"] = "escapes the audio root"
    write_audio(root.parent / "outside.wav")
    os.symlink(root.parent / "outside.wav", root / "link_out.wav")
    expect["link_out.wav"] = "escapes the audio root"
    return expect


@pytest.fixture
def audio_corpus(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """A folder of good-but-odd and broken audio files, and what prepare must make of each."""
    root = tmp_path / "corpus"
    root.mkdir()
    return root, _corpus_files(root)
