"""MMAU (the paper's benchmark): its JSON list, audio under --audio-dir by each item's `audio_id`
(`./test-mini-audios/<id>.wav`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audio_rft.data.generic import Item, as_id, audio_root, build, input_params, locate_audio, optional_text, read_json_items
from audio_rft.data.mmau_versions import version_of
from audio_rft.data.schema import Sample, SampleError


def _dedupe(choices: Any) -> Any:
    """MMAU test-mini has 27 items listing one choice twice; dropping the copy keeps the item (the benchmark is
    scored on all 1,000) and changes nothing in scoring, while the schema requires distinct choices."""
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        return choices
    seen: set[str] = set()
    return [c for c in choices if not (c.strip().lower() in seen or seen.add(c.strip().lower()))]


def build_mmau(input: str | Path, out: str | Path, audio_dir: str | Path | None = None) -> dict[str, Any]:
    input = Path(input)
    items = read_json_items(input)
    root = audio_root(audio_dir, input.parent)

    def convert(position: int, r: dict) -> Item:
        choices = _dedupe(r.get("choices"))
        answer = r.get("answer")
        # Test-split answers are withheld: keep the item for inference, with answer None (manifest `unanswered`).
        answer = None if answer is None or (isinstance(answer, str) and not answer.strip()) else answer
        if answer is not None and not isinstance(answer, str):
            raise SampleError(f"field 'answer': expected text, got {type(answer).__name__}")
        path = locate_audio(r.get("audio_id"), root)
        if not path.exists() and (root / Path(r["audio_id"]).name).exists():
            path = locate_audio(Path(r["audio_id"]).name, root)  # --audio-dir may be the audio folder itself (as in R1-AQA)
        sample = Sample(id=as_id(r.get("id")), audio=str(path), question=r.get("question"), choices=choices,
                        answer=answer, task=r.get("task"), category=optional_text(r.get("category")),
                        sub_category=optional_text(r.get("sub-category", r.get("sub_category"))),
                        difficulty=optional_text(r.get("difficulty")), source="mmau",
                        split=optional_text(r.get("split")) or "test")
        note = "duplicate choices dropped" if choices != r.get("choices") else None
        return Item(sample, path, note)

    params = {**input_params(input), "audio_dir": str(root.resolve())}
    # which release of the benchmark file this is: infer, score and the report carry it on
    params["benchmark_version"] = {"benchmark": "mmau-test-mini", **version_of(params["input_sha256"])}
    return build(out, "mmau", params, items, convert, what=str(input))
