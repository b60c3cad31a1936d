"""Audio in and out: any file soundfile (or librosa) reads -> 16 kHz mono float32 in [-1, 1]."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Qwen2-Audio's window: longer audio is cut, and the cut is recorded
MIN_SECONDS = 0.1  # shorter than this is no question's clip: a failed download or an empty export


class AudioError(ValueError):
    """An unusable audio file; the message is the one-line reject reason."""


@dataclass
class AudioInfo:
    original_sample_rate: int
    original_channels: int
    original_seconds: float
    cut: bool
    source_sha256: str | None = None  # of the file (or bytes) as given, so two users can tell their downloads apart


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


def _wav_announced_frames(head: bytes, size: int) -> tuple[int, int] | None:
    """(frames the RIFF header announces, frames the file holds) for a PCM/float WAV; None when it is not one
    or announces no size (a streamed WAV writes 0 or 0xFFFFFFFF). libsndfile itself quietly reads what survives."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset, block_align = 12, None
    while offset + 8 <= len(head):
        chunk, length = head[offset:offset + 4], struct.unpack("<I", head[offset + 4:offset + 8])[0]
        if chunk == b"fmt " and offset + 22 <= len(head):
            block_align = struct.unpack("<H", head[offset + 20:offset + 22])[0]
        elif chunk == b"data":
            if not block_align or length in (0, 0xFFFFFFFF):
                return None
            present = max(0, size - offset - 8)
            return length // block_align, min(length, present) // block_align
        offset += 8 + length + (length & 1)
    return None


def _truncation(source: str | Path | bytes, decoded_frames: int) -> str | None:
    """The reject reason when the file holds less audio than its header announces (a cut-off download)."""
    if isinstance(source, bytes):
        head, size = source[:65536], len(source)
    else:
        with open(source, "rb") as f:
            head = f.read(65536)
        size = Path(source).stat().st_size
    frames = _wav_announced_frames(head, size)
    if frames is not None:
        announced, present = frames
        if present < announced:
            return f"truncated audio: the WAV header announces {announced} frames, the file holds {present}"
        return None
    if head[:4] == b"fLaC":  # STREAMINFO's total is exact, so fewer decoded frames means a cut file
        try:
            announced = sf.info(io.BytesIO(source) if isinstance(source, bytes) else str(source)).frames
        except Exception:  # noqa: BLE001 - an unreadable header was already reported by the decoder
            return None
        if 0 < decoded_frames < announced:
            return f"truncated audio: the FLAC header announces {announced} frames, the file holds {decoded_frames}"
    return None


def _sha256(source: str | Path | bytes) -> str:
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_audio(source: str | Path | bytes, max_seconds: float | None = MAX_SECONDS,
               min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, AudioInfo]:
    """Decode, mix to mono, resample to 16 kHz, cut to `max_seconds`; raise AudioError with a reason, also for
    a file that holds less audio than its header announces or lasts under `min_seconds`."""
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio file not found: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"empty audio file (0 bytes): {path}")
    data, sr = _decode(source)
    if data.shape[0] == 0:
        raise AudioError("audio has zero frames")
    truncated = _truncation(source, data.shape[0])
    if truncated:
        raise AudioError(truncated)
    if data.shape[0] / sr < min_seconds:
        raise AudioError(f"implausibly short audio: {data.shape[0] / sr:.3f} s (under {min_seconds} s)")
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
    return mono, AudioInfo(sr, channels, original_seconds, cut, _sha256(source))


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav; deterministic bytes for the same samples."""
    sf.write(str(path), np.clip(waveform, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def read_wav(path: str | Path) -> np.ndarray:
    """Read a prepared (already 16 kHz mono) wav quickly; falls back to full decoding otherwise."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr == SAMPLE_RATE and data.shape[1] == 1:
        return data[:, 0]
    return load_audio(path)[0]
