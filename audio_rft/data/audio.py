"""Audio in and out: any file soundfile (or librosa) reads -> 16 kHz mono float32 in [-1, 1]."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Qwen2-Audio's window: longer audio is cut, and the cut is recorded


class AudioError(ValueError):
    """An unusable audio file; the message is the one-line reject reason."""


@dataclass
class AudioInfo:
    original_sample_rate: int
    original_channels: int
    original_seconds: float
    cut: bool


def _decode(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
        return data, sr
    except Exception as sf_error:  # noqa: BLE001 - fall back to librosa for what libsndfile can't read
        if isinstance(source, bytes):
            raise AudioError(f"unreadable audio ({str(sf_error).splitlines()[0][:120]})") from None
        if not Path(source).exists():  # it vanished between listing and reading
            raise AudioError(f"audio file vanished while reading: {source}") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import librosa

                mono, sr = librosa.load(str(source), sr=None, mono=False)
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"unreadable audio ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None
        data = np.atleast_2d(mono).T.astype(np.float32)
        return data, int(sr)


def load_audio(source: str | Path | bytes, max_seconds: float | None = MAX_SECONDS) -> tuple[np.ndarray, AudioInfo]:
    """Decode, mix to mono, resample to 16 kHz, cut to `max_seconds`; raise AudioError with a reason."""
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio file not found: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"empty audio file (0 bytes): {path}")
    data, sr = _decode(source)
    if data.shape[0] == 0:
        raise AudioError("audio has zero frames")
    if not np.isfinite(data).all():
        raise AudioError("audio contains NaN or inf samples")
    channels = data.shape[1]
    mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    original_seconds = len(mono) / sr
    if sr != SAMPLE_RATE:
        # soxr directly: the same samples as librosa.resample(res_type="soxr_hq", fix=True), without the
        # seconds librosa's import costs every process
        import soxr

        size = math.ceil(len(mono) * SAMPLE_RATE / sr)
        mono = soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ")
        mono = np.pad(mono, (0, max(0, size - len(mono))))[:size]
    cut = False
    if max_seconds is not None and len(mono) > int(max_seconds * SAMPLE_RATE):
        mono, cut = mono[: int(max_seconds * SAMPLE_RATE)], True
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32)
    return mono, AudioInfo(sr, channels, original_seconds, cut)


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav; deterministic bytes for the same samples."""
    sf.write(str(path), np.clip(waveform, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def read_wav(path: str | Path) -> np.ndarray:
    """Read a prepared (already 16 kHz mono) wav quickly; falls back to full decoding otherwise."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr == SAMPLE_RATE and data.shape[1] == 1:
        return data[:, 0]
    return load_audio(path)[0]
