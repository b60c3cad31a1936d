"""One record per question, MMAU-compatible field names (docs/design.md, "The data's path")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

TASKS = ("sound", "music", "speech", "other")
MIN_CHOICES, MAX_CHOICES = 2, 8


class SampleError(ValueError):
    """A record that breaks the schema; the message is the one-line reject reason."""


@dataclass
class Sample:
    id: str
    audio: str
    question: str
    choices: list[str]
    answer: str | None  # None only for benchmark items whose answers are withheld (MMAU test)
    task: str
    category: str | None = None
    sub_category: str | None = None
    difficulty: str | None = None
    source: str = ""
    split: str = ""
    reasoning: str | None = None
    # A benchmark's own fields that its official scorer reads (MMAR's modality, MMSU's choice_a..choice_d and
    # answer_gt, ...): infer writes them back into the predictions, so the official script reads those unchanged.
    benchmark_fields: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if record["benchmark_fields"] is None:  # datasets without any keep their data.jsonl as it was
            del record["benchmark_fields"]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Sample":
        """Build and validate from a dict; MMAU's `sub-category` key is accepted for `sub_category`."""
        if not isinstance(record, dict):
            raise SampleError(f"expected a JSON object, got {type(record).__name__}")
        record = dict(record)
        if "sub-category" in record and "sub_category" not in record:
            record["sub_category"] = record.pop("sub-category")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("id", "audio", "question", "choices", "task") if n not in record]
        if missing:
            raise SampleError(f"missing field {missing[0]!r}")
        sample = cls(**{k: v for k, v in record.items() if k in names})
        sample.validate()
        return sample

    def validate(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise SampleError("field 'id': empty or not a string")
        if not isinstance(self.audio, str) or not self.audio.strip():
            raise SampleError("field 'audio': empty or not a string")
        if not isinstance(self.question, str) or not self.question.strip():
            raise SampleError("field 'question': missing or empty")
        if not isinstance(self.choices, list):
            raise SampleError(f"field 'choices': not a list ({type(self.choices).__name__})")
        if not all(isinstance(c, str) and c.strip() for c in self.choices):
            raise SampleError("field 'choices': every choice must be a non-empty string")
        if not MIN_CHOICES <= len(self.choices) <= MAX_CHOICES:
            raise SampleError(f"field 'choices': {len(self.choices)} choices (need {MIN_CHOICES}-{MAX_CHOICES})")
        if len({c.strip().lower() for c in self.choices}) != len(self.choices):
            raise SampleError("field 'choices': duplicated choice")
        if self.answer is not None and self.answer not in self.choices:
            raise SampleError(f"field 'answer': {self.answer!r} is not among the choices")
        if self.task not in TASKS:
            raise SampleError(f"field 'task': {self.task!r} is not one of {', '.join(TASKS)}")
        if self.benchmark_fields is not None and not isinstance(self.benchmark_fields, dict):
            raise SampleError("field 'benchmark_fields': expected an object or null")
        for name in ("category", "sub_category", "difficulty", "reasoning"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SampleError(f"field {name!r}: expected a string or null")
