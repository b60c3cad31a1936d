"""A prepared dataset is a folder: data.jsonl, audio/, manifest.json, rejected.jsonl.

`DatasetWriter` builds one in a temporary folder and renames it into place only when complete, so a
crash never leaves a folder that looks prepared. `load_dataset` reads one back, naming file, line and
field for anything wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from audio_rft import UserError
from audio_rft.data.audio import SAMPLE_RATE, AudioInfo, write_wav
from audio_rft.data.schema import Sample, SampleError
from audio_rft.fileio import atomic_dir

DATA_FILE, MANIFEST_FILE, REJECTED_FILE, AUDIO_DIR = "data.jsonl", "manifest.json", "rejected.jsonl", "audio"


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before the first ':' or '('."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def audio_filename(sample_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id).strip("._")[:80] or "item"
    if safe != sample_id:  # keep distinct ids distinct after sanitising
        safe += "-" + hashlib.sha1(sample_id.encode()).hexdigest()[:8]
    return safe + ".wav"


class DatasetWriter:
    """Collect accepted samples (with their 16 kHz audio) and rejects; publish atomically on exit."""

    def __init__(self, out: str | Path, builder: str, params: dict[str, Any]):
        self.out, self.builder, self.params = Path(out), builder, params
        self.samples: list[Sample] = []
        self.rejected: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = {}
        self.cut: list[dict[str, Any]] = []
        self.clips: dict[str, dict[str, Any]] = {}  # id -> where its audio came from (manifest `clips`)
        self.notes: dict[str, list[str]] = {}  # what a builder repaired in accepted items: kind -> ids
        self._ids: set[str] = set()

    def __enter__(self) -> "DatasetWriter":
        self._ctx = atomic_dir(self.out)
        self.tmp = self._ctx.__enter__()
        (self.tmp / AUDIO_DIR).mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._finish()
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def has_id(self, sample_id: str) -> bool:
        return sample_id in self._ids

    def add(self, sample: Sample, waveform: np.ndarray, info: AudioInfo | None = None) -> Sample:
        """Write the clip as audio/<id>.wav and keep the sample (its `audio` rewritten to that path)."""
        sample.validate()
        if sample.id in self._ids:
            raise SampleError(f"duplicate id (first one kept): {sample.id!r}")
        rel = f"{AUDIO_DIR}/{audio_filename(sample.id)}"
        write_wav(self.tmp / rel, waveform)
        # Enough to tell whether two users evaluated the same audio: the source file's hash and format (None for
        # generated audio), and the hash of the 16 kHz clip written here.
        self.clips[sample.id] = {
            "sha256": hashlib.sha256((self.tmp / rel).read_bytes()).hexdigest(),
            "source_sha256": info.source_sha256 if info else None,
            "source_sample_rate": info.original_sample_rate if info else SAMPLE_RATE,
            "source_channels": info.original_channels if info else 1,
            "source_seconds": round(info.original_seconds if info else len(waveform) / SAMPLE_RATE, 3),
        }
        sample.audio = rel
        self._ids.add(sample.id)
        self.samples.append(sample)
        self.seconds[sample.id] = len(waveform) / SAMPLE_RATE
        if info is not None and info.cut:
            self.cut.append({"id": sample.id, "original_seconds": round(info.original_seconds, 3)})
        return sample

    def note(self, kind: str, sample_id: str) -> None:
        """Record a repair made to an accepted item (listed in the manifest under `notes`)."""
        self.notes.setdefault(kind, []).append(sample_id)

    def reject(self, where: str | int, reason: str, sample_id: Any = None, **extra: Any) -> None:
        """Record an input item that could not be used: `where` is its line number or index."""
        record = {"where": where, "id": sample_id if isinstance(sample_id, (str, int)) else None, "reason": reason}
        record.update(extra)
        self.rejected.append(record)

    def summary(self) -> dict[str, Any]:
        per_task: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "seconds": 0.0})
        for s in self.samples:
            per_task[s.task]["count"] += 1
            per_task[s.task]["seconds"] = round(per_task[s.task]["seconds"] + self.seconds[s.id], 3)
        total = sum(self.seconds.values())
        return {
            "accepted": len(self.samples),
            "rejected": len(self.rejected),
            "rejected_by_reason": dict(sorted(Counter(_reason_kind(r["reason"]) for r in self.rejected).items())),
            "per_task": dict(sorted(per_task.items())),
            "unanswered": sum(s.answer is None for s in self.samples),
            "audio_seconds": round(total, 3),
            "audio_hours": round(total / 3600, 4),
        }

    def _finish(self) -> None:
        data_lines = "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in self.samples)
        (self.tmp / DATA_FILE).write_text(data_lines, encoding="utf-8")
        (self.tmp / REJECTED_FILE).write_text(
            "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in self.rejected), encoding="utf-8")
        seconds = list(self.seconds.values())
        manifest = {
            "format": "audio-rft dataset v1",
            "builder": self.builder,
            "params": self.params,
            **self.summary(),
            "durations": {
                "min": round(min(seconds), 3) if seconds else 0.0,
                "mean": round(float(np.mean(seconds)), 3) if seconds else 0.0,
                "max": round(max(seconds), 3) if seconds else 0.0,
            },
            "cut_to_30s": self.cut,
            "clips": self.clips,
            "notes": dict(sorted(self.notes.items())),
            "content_sha256": content_hash(self.tmp, self.samples),
        }
        (self.tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def content_hash(folder: str | Path, samples: list[Sample]) -> str:
    """sha256 over data.jsonl's bytes then every sample's audio bytes, in order (manifest `content_sha256`)."""
    content = hashlib.sha256((Path(folder) / DATA_FILE).read_bytes())
    for s in samples:
        content.update((Path(folder) / s.audio).read_bytes())
    return content.hexdigest()


def resolve_audio(folder: str | Path, sample: Sample) -> Path:
    """The sample's audio path; relative paths must stay inside the dataset folder."""
    folder = Path(folder).resolve()
    path = Path(sample.audio)
    if path.is_absolute():
        return path
    full = (folder / path).resolve()
    if not full.is_relative_to(folder):
        raise UserError(f"{folder / DATA_FILE}: sample {sample.id!r} field 'audio': path escapes the dataset folder")
    return full


def benchmark_version(folder: str | Path) -> dict | None:
    """What a prepared dataset was built from, for predictions to carry: the builder, the content hash and, for a
    benchmark's metadata file, which release of it (manifest params `benchmark_version`: commit, date, known);
    None for an unreadable manifest."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    params = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
    version = params.get("benchmark_version") if isinstance(params.get("benchmark_version"), dict) else {}
    described = {"builder": manifest.get("builder"), "content_sha256": manifest.get("content_sha256"), **version}
    if manifest.get("builder") == "synth":
        described.update(generator=params.get("version"), seed=params.get("seed"))
    return described


def load_dataset(folder: str | Path, limit: int | None = None) -> list[Sample]:
    """Read a prepared dataset's samples; any bad line is a UserError naming file, line and field."""
    path = Path(folder) / DATA_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a prepared dataset (no {DATA_FILE}); run `audio-rft prepare` first")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = Sample.from_json(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: malformed JSON ({e.msg})") from None
            except (SampleError, TypeError) as e:
                raise UserError(f"{path}:{number}: {e}") from None
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise UserError(f"{path}: no samples")
    return samples


def split_off_dev(source: str | Path, n: int, seed: int, train_out: str | Path, dev_out: str | Path) -> dict[str, Any]:
    """Hold out `n` items of a prepared dataset, drawn by `seed`, as a dev split for choosing checkpoints: write
    them to `dev_out` and the rest to `train_out` (each a prepared dataset; `train_out` may be `source` itself,
    replaced when complete). Clips are copied sample for sample; each manifest records the split."""
    from audio_rft.data.audio import read_wav

    source = Path(source)
    samples = load_dataset(source)
    if not 0 < n < len(samples):
        raise UserError(f"dev={n}: hold out between 1 and {len(samples) - 1} of the {len(samples)} items accepted")
    manifest = json.loads((source / MANIFEST_FILE).read_text(encoding="utf-8"))
    rejected_path = source / REJECTED_FILE
    rejected = [json.loads(line) for line in rejected_path.read_text(encoding="utf-8").split("\n") if line.strip()] \
        if rejected_path.is_file() else []
    dev = set(np.random.default_rng(seed).choice(len(samples), n, replace=False).tolist())
    cut = {c["id"]: c for c in manifest.get("cut_to_30s", [])}
    clips = manifest.get("clips", {})
    summaries = {}
    for part, out, chosen in (("dev", dev_out, sorted(dev)), ("train", train_out, [i for i in range(len(samples)) if i not in dev])):
        params = {**manifest.get("params", {}), "dev_split": {"part": part, "dev": n, "seed": seed, "of": len(samples)}}
        with DatasetWriter(out, manifest.get("builder", "split"), params) as writer:
            for i in chosen:
                sample = Sample.from_json(samples[i].to_json())
                if part == "dev":
                    sample.split = "dev"  # held out: no longer what it is trained on
                writer.add(sample, read_wav(source / samples[i].audio))
                if sample.id in clips:  # where the audio came from, not the copy's own provenance
                    writer.clips[sample.id] = clips[sample.id]
                if sample.id in cut:
                    writer.cut.append(cut[sample.id])
            if part == "train":
                writer.rejected = rejected
            summaries[part] = writer.summary()
    return summaries
