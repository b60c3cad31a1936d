"""AVQA (the paper's training set): AVQA's own `train_qa.json` (audio found under --audio-dir by a file-name
pattern) or R1-AQA's JSONL (the same objects, one per line, plus `audio_path`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from audio_rft.data.generic import (Item, as_id, audio_root, build, choice_at, input_params, locate_audio,
                                    optional_text, read_json_items)
from audio_rft.data.schema import Sample, SampleError

DEFAULT_PATTERN = "{video_name}.wav"


def audio_question(text: str) -> str:
    """AVQA asks about a video; the model only hears it. R1-AQA rewrites "video" as "audio" (we also do "Video")."""
    return text.replace("video", "audio").replace("Video", "Audio")


def build_avqa(input: str | Path, out: str | Path, audio_dir: str | Path | None = None,
               audio_pattern: str = DEFAULT_PATTERN, split: str | None = None) -> dict[str, Any]:
    input = Path(input)
    items = read_json_items(input)
    root = audio_root(audio_dir, input.parent)
    # train_qa.json / val_qa.json name their split; R1-AQA's JSONL is the training set
    split = split or (m.group(1) if (m := re.match(r"(train|val|test)", input.name)) else "train")

    def convert(position: int, r: dict) -> Item:
        question = r.get("question_text")
        if not isinstance(question, str) or not question.strip():
            raise SampleError("field 'question_text': missing or empty")
        choices = r.get("multi_choice")
        answer = choice_at(choices, r.get("answer"))
        if "audio_path" in r:  # R1-AQA's form: usually absolute, trusted as given unless --audio-dir confines it
            path = locate_audio(r["audio_path"], root, allow_absolute=audio_dir is None)
        else:
            try:
                name = audio_pattern.format(**r)
            except (KeyError, IndexError, ValueError) as e:
                raise SampleError(f"--audio-pattern {audio_pattern!r}: item has no field {e}") from None
            path = locate_audio(name, root)
        sample = Sample(id=as_id(r.get("id")), audio=str(path), question=audio_question(question), choices=choices,
                        answer=answer, task="sound",  # AVQA asks about sound sources and events
                        category=optional_text(r.get("question_type")),
                        sub_category=optional_text(r.get("question_relation")), source="avqa", split=split)
        return Item(sample, path)

    params = {**input_params(input), "audio_dir": str(root.resolve()), "audio_pattern": audio_pattern, "split": split}
    return build(out, "avqa", params, items, convert, what=str(input))
