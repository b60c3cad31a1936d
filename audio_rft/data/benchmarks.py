"""Builders for the benchmarks papers report beside MMAU: MMAR, MMSU and AIR-Bench (foundation track), from
their official metadata (fields as docs/benchmarks.md lists them).

Each keeps, in `benchmark_fields`, what its official scorer reads that a Sample has no field for, so the
predictions `infer` writes can be scored by `audio-rft score --rule NAME` or by the official script itself.

- MMAR: `MMAR-meta.jsonl` (current) or `MMAR-meta.json` (first release), audio at `audio_path` under the
  extracted audio archive (audio_dir). Choice texts, the answer a text; `modality` kept (mix-* become task other).
- MMSU: the Hugging Face dataset `ddwang2000/MMSU` saved to disk or as parquet, or its rows as JSON/JSONL;
  options in choice_a..choice_d, the answer's text in answer_gt; audio embedded (bytes) or a path.
- AIR-Bench foundation: `Foundation/Foundation_meta.json`; audio at `<task_name>_<dataset_name>/<path>` under
  audio_dir (Audio_Grounding: `.flac`, as its inference script reads it).
An item whose answer is none of its options is rejected with that reason (MMSU's script counts such an item
wrong whatever the model says; AIR-Bench's stops the run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audio_rft.data.generic import (Item, as_id, audio_root, build, input_params, locate_audio, optional_text,
                                    read_json_items)
from audio_rft.data.schema import Sample, SampleError

# MMAR's metadata releases by sha256: the current JSONL fixed 6 answers of the first release
MMAR_RELEASES = {
    "1c9a343e7bebf1037482b935c54eacd43cc63df7b2c668724b5560caf1f84fad":
        "MMAR-meta.jsonl at ddlBoJack/MMAR@3bce090 (2026-02-26, current)",
    "7240ecca11b252c782ef44d4d19f711dd9b8424656a2bc3f92c548e318d25cee":
        "MMAR-meta.json at ddlBoJack/MMAR@a50cb43 (first release, also on Hugging Face; 6 answers since corrected)",
}
LETTER_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


def _release(benchmark: str, sha256: str | None, known: dict[str, str]) -> dict[str, Any]:
    return {"benchmark": benchmark, "sha256": sha256, "known": sha256 in known, "release": known.get(sha256)}


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise SampleError(f"field {field!r}: missing or empty")
    return value


def mmar_task(modality: Any) -> str:
    return modality if modality in ("sound", "music", "speech") else "other"


def mmar_sample(record: dict, root: Path) -> Item:
    """One MMAR record -> Item (its audio located, not read)."""
    modality = _text(record, "modality")
    path = locate_audio(record.get("audio_path"), root)
    choices = record.get("choices")
    # 4 current items list an empty option; it has no word token, so MMAR's rule is the same without it
    kept = [c for c in choices if c != ""] if isinstance(choices, list) else choices
    sample = Sample(id=as_id(record.get("id")), audio=str(path), question=_text(record, "question"),
                    choices=kept, answer=_text(record, "answer"), task=mmar_task(modality),
                    category=optional_text(record.get("category")),
                    sub_category=optional_text(record.get("sub-category")), source="mmar", split="test",
                    benchmark_fields={"modality": modality, "language": record.get("language")})
    return Item(sample, path, "empty choices dropped" if kept != choices else None)


def _lettered(record: dict) -> tuple[list[str], dict[str, Any]]:
    """Options from choice_a..choice_d (a missing or empty one is no option) and the raw fields the scorer reads."""
    raw = {key: record.get(key) for key in LETTER_KEYS}
    choices = [v for v in raw.values() if isinstance(v, str) and v.strip()]
    answer = record.get("answer_gt")
    if not isinstance(answer, str) or not answer.strip():
        raise SampleError("field 'answer_gt': missing or empty")
    if answer not in choices:
        raise SampleError(f"field 'answer_gt': {answer!r} equals none of choice_a..choice_d")
    return choices, {**{k: v for k, v in raw.items() if k in record}, "answer_gt": answer}


def _embedded_audio(record: dict, root: Path) -> Path | bytes:
    audio = record.get("audio")
    if isinstance(audio, dict):  # Hugging Face's {"bytes": ..., "path": ...}
        audio = audio.get("bytes") or audio.get("path")
    if audio is None:
        audio = record.get("audio_path")
    return bytes(audio) if isinstance(audio, (bytes, bytearray)) else locate_audio(audio, root)


def mmsu_sample(record: dict, root: Path) -> Item:
    choices, fields = _lettered(record)
    audio = _embedded_audio(record, root)
    for key in ("task_name", "sub-sub-category", "linguistics_sub_discipline"):
        if key in record:
            fields[key] = record[key]
    sample = Sample(id=as_id(record.get("id")), audio=str(audio) if isinstance(audio, Path) else "<bytes>",
                    question=_text(record, "question"), choices=choices, answer=fields["answer_gt"], task="speech",
                    category=optional_text(record.get("category")),
                    sub_category=optional_text(record.get("sub-category")), source="mmsu", split="test",
                    benchmark_fields=fields)
    return Item(sample, audio)


def airbench_task(task_name: str) -> str:
    if task_name.lower().startswith("music"):
        return "music"
    if task_name.startswith(("Speech", "Speaker", "Spoken", "Synthesized")):
        return "speech"
    return "sound"


def airbench_audio_path(record: dict) -> str:
    """`<task_name>_<dataset_name>/<path>`; Audio_Grounding's clips are read as flac (the last 3 characters swapped)."""
    path = f"{_text(record, 'task_name')}_{_text(record, 'dataset_name')}/{_text(record, 'path')}"
    return path[:-3] + "flac" if record["task_name"] == "Audio_Grounding" else path


def airbench_sample(record: dict, root: Path) -> Item:
    choices, fields = _lettered(record)
    path = locate_audio(airbench_audio_path(record), root)
    task_name = record["task_name"]
    fields.update(task_name=task_name, dataset_name=record["dataset_name"], uniq_id=record.get("uniq_id"),
                  path=record["path"])
    sample = Sample(id=as_id(record.get("uniq_id")), audio=str(path), question=_text(record, "question"),
                    choices=choices, answer=fields["answer_gt"], task=airbench_task(task_name), category=task_name,
                    sub_category=f"{task_name}_{record['dataset_name']}", source="airbench", split="test",
                    benchmark_fields=fields)
    return Item(sample, path)


def build_mmar(input: str | Path, out: str | Path, audio_dir: str | Path | None = None) -> dict[str, Any]:
    input = Path(input)
    root = audio_root(audio_dir, input.parent)
    params = {**input_params(input), "audio_dir": str(root.resolve())}
    params["benchmark_version"] = _release("mmar", params["input_sha256"], MMAR_RELEASES)
    return build(out, "mmar", params, read_json_items(input), lambda _, r: mmar_sample(r, root), what=str(input))


def build_mmsu(input: str | Path, out: str | Path, audio_dir: str | Path | None = None) -> dict[str, Any]:
    input = Path(input)
    root = audio_root(audio_dir, input if input.is_dir() else input.parent)
    params = {**input_params(input), "audio_dir": str(root.resolve())}
    params["benchmark_version"] = _release("mmsu", params["input_sha256"], {})
    if input.is_dir() or input.suffix == ".parquet":
        import tempfile

        from audio_rft.data.generic import _open_hf

        with tempfile.TemporaryDirectory(prefix="audio-rft-mmsu-") as cache_dir:
            ds = _open_hf(input, None, cache_dir)
            items = ((f"row {i}", row) for i, row in enumerate(ds))
            return build(out, "mmsu", params, items, lambda _, r: mmsu_sample(r, root), total=len(ds), what=str(input))
    return build(out, "mmsu", params, read_json_items(input), lambda _, r: mmsu_sample(r, root), what=str(input))


def build_airbench(input: str | Path, out: str | Path, audio_dir: str | Path | None = None) -> dict[str, Any]:
    input = Path(input)
    root = audio_root(audio_dir, input.parent)
    params = {**input_params(input), "audio_dir": str(root.resolve())}
    params["benchmark_version"] = _release("airbench-foundation", params["input_sha256"], {})
    return build(out, "airbench", params, read_json_items(input), lambda _, r: airbench_sample(r, root),
                 id_key="uniq_id", what=str(input))
