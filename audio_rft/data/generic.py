"""What every builder shares (reading input files, locating audio, the accept-or-reject loop), and the
generic builders: JSONL, CSV and Hugging Face datasets with a field-name mapping.

A builder turns each input item into a `Sample` plus its audio (a path or bytes) or raises
`SampleError` / `AudioError` with a one-line reason; `build` does the rest, so every item ends either in
data.jsonl or in rejected.jsonl. Problems with a whole input file are `UserError`s (exit status 2).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from tqdm import tqdm

from audio_rft import UserError
from audio_rft.data.audio import AudioError, load_audio
from audio_rft.data.dataset import DatasetWriter
from audio_rft.data.schema import TASKS, Sample, SampleError
from audio_rft.fileio import sha256_file

# Sample fields an input column can be mapped to (`--field question=q`).
FIELDS = ("id", "audio", "question", "choices", "answer", "task", "category", "sub_category", "difficulty",
          "split", "reasoning")


class Item(NamedTuple):
    sample: Sample
    audio: Path | bytes
    note: str | None = None  # a repair made to this item, recorded in the manifest if it is accepted


# ---------------------------------------------------------------- reading input files


def read_text(path: Path) -> str:
    """The whole input file as text; a BOM is dropped. Anything unreadable is one UserError naming the file."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json_items(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for a JSON list file ("index N") or a JSONL file ("line N").

    A malformed JSONL line becomes a SampleError in place of its record (that item is rejected); a
    broken JSON list, or JSON that is not a list, is a UserError for the whole file.
    """
    text = read_text(path)
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None
        return [(f"index {i}", record) for i, record in enumerate(data)]
    if stripped and "\n" in stripped:  # several lines: JSONL, unless the whole file is one JSON value
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            raise UserError(f"{path}: expected a JSON list of items or one JSON object per line, "
                            f"got one {type(data).__name__} spread over several lines")
    items: list[tuple[str, Any]] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            items.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            items.append((f"line {number}", SampleError(f"malformed JSON ({e.msg} at column {e.colno})")))
    if stripped and not stripped.startswith("{") and all(isinstance(r, SampleError) for _, r in items):
        raise UserError(f"{path}: not JSON (expected a JSON list of items or one JSON object per line)")
    return items


def read_csv_items(path: Path, delimiter: str = ",") -> list[tuple[str, Any]]:
    """(where, row dict) per CSV record; `where` is the line the record starts on."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    items: list[tuple[str, Any]] = []
    try:
        if reader.fieldnames is None:
            raise UserError(f"{path}: empty CSV file (expected a header line naming the columns)")
        start = reader.line_num + 1  # the line after the header
        for row in reader:
            items.append((f"line {start}", row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    return items


# ---------------------------------------------------------------- helpers for builders


def audio_root(audio_dir: str | Path | None, default: Path) -> Path:
    root = Path(audio_dir) if audio_dir is not None else default
    if not root.is_dir():
        raise UserError(f"--audio-dir {root}: not a folder")
    return root


def locate_audio(value: Any, root: Path, allow_absolute: bool = False) -> Path:
    """The audio file an item names: relative to `root`, and (symlinks resolved) never outside it.

    `allow_absolute` trusts absolute paths as given (R1-AQA's JSONL, when no --audio-dir was asked for).
    """
    if not isinstance(value, str) or not value.strip():
        raise SampleError("field 'audio': missing or empty")
    given = Path(value)
    try:
        resolved = (given if given.is_absolute() else root / given).resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise AudioError(f"symlink loop: {value}") from None
    except ValueError:  # e.g. an embedded NUL byte
        raise AudioError(f"invalid audio path: {value!r}") from None
    except OSError as e:
        reason = "symlink loop" if e.errno == errno.ELOOP else f"cannot resolve audio path ({e.strerror})"
        raise AudioError(f"{reason}: {value}") from None
    if not (allow_absolute and given.is_absolute()) and not resolved.is_relative_to(root.resolve()):
        raise AudioError(f"audio path escapes the audio root {root}: {value}")
    return resolved


def choice_at(choices: Any, index: Any, base: int = 0) -> str:
    """choices[index - base], for answers given as a position."""
    if isinstance(index, str) and index.strip().lstrip("-").isdigit():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool):
        raise SampleError(f"field 'answer': expected a choice index, got {index!r}")
    if not isinstance(choices, list):
        raise SampleError(f"field 'choices': not a list ({type(choices).__name__})")
    if not 0 <= index - base < len(choices):
        raise SampleError(f"field 'answer': index {index} out of range for {len(choices)} choices")
    return choices[index - base]


def optional_text(value: Any) -> str | None:
    """Optional string fields: empty means absent; numbers (e.g. ids in a category column) become text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value if isinstance(value, str) else str(value)


def as_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise SampleError("field 'id': missing or empty")
    return str(value)


def input_params(path: Path) -> dict[str, Any]:
    """Where the data came from, for the manifest (the hash tells two versions of one file apart)."""
    return {"input": str(path.resolve()), "input_sha256": sha256_file(path) if path.is_file() else None}


# ---------------------------------------------------------------- the accept-or-reject loop


def build(out: str | Path, builder: str, params: dict[str, Any], items: Iterable[tuple[str, Any]],
          convert: Callable[[int, Any], Item], id_key: str = "id", total: int | None = None,
          what: str = "input") -> dict[str, Any]:
    """Convert, check and write every item; return the summary. Raises UserError when nothing is accepted
    (and then nothing is written: a previous dataset at `out` stays as it was)."""
    with DatasetWriter(out, builder, params) as writer:
        seen = 0
        for position, (where, record) in enumerate(tqdm(items, total=total, desc=f"prepare {builder}", unit="item",
                                                        disable=None)):
            seen += 1
            sample_id = record.get(id_key) if isinstance(record, dict) else None
            try:
                if isinstance(record, SampleError):  # a line that was not even JSON
                    raise record
                if not isinstance(record, dict):
                    raise SampleError(f"expected a JSON object, got {type(record).__name__}")
                item = convert(position, record)  # builds the Sample and locates its audio
                sample_id = item.sample.id
                item.sample.validate()
                if writer.has_id(item.sample.id):  # checked before decoding: cheap
                    raise SampleError(f"duplicate id (first one kept): {item.sample.id!r}")
                waveform, info = load_audio(item.audio)
            except (SampleError, AudioError) as e:
                writer.reject(where, str(e), sample_id)
                continue
            except OSError as e:  # the file vanished or became unreadable after it was located
                writer.reject(where, f"cannot read audio ({e.strerror or e}): {e.filename or ''}", sample_id)
                continue
            writer.add(item.sample, waveform, info)  # outside the try: a failing write is an error, not a reject
            if item.note:
                writer.note(item.note, item.sample.id)
        summary = writer.summary()
        if not writer.samples:
            if not seen:
                raise UserError(f"{what}: no items")
            top = ", ".join(f"{kind}: {n}" for kind, n in Counter(summary["rejected_by_reason"]).most_common(3))
            first = writer.rejected[0]
            raise UserError(f"{what}: nothing accepted, all {seen} items rejected ({top}); "
                            f"first: {first['where']}: {first['reason']}")
    return {**summary, "cut": len(writer.cut), "out": str(out)}


# ---------------------------------------------------------------- generic JSONL / CSV / Hugging Face


def parse_fields(pairs: Iterable[str]) -> dict[str, str]:
    """`question=q` pairs -> {sample field: input column}; unknown sample fields are a UserError."""
    fields = {}
    for pair in pairs:
        key, sep, column = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not column.strip():
            raise UserError(f"--field {pair!r}: expected FIELD=COLUMN, e.g. question=q")
        if key not in FIELDS:
            raise UserError(f"--field {pair!r}: unknown field {key!r} (one of {', '.join(FIELDS)})")
        fields[key] = column.strip()
    return fields


def _csv_choices(value: Any) -> Any:
    """CSV cells are text: choices are a JSON list (`["a", "b"]`) or `a|b|c`."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise SampleError("field 'choices': starts with '[' but is not a JSON list") from None
    return [c.strip() for c in value.split("|")] if value.strip() else None


def _answer_text(answer: Any, choices: Any) -> str:
    """An answer given as text; surrounding blanks are forgiven, anything else must match a choice."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise SampleError(f"field 'answer': expected text, got {type(answer).__name__}")
    answer = str(answer)
    if isinstance(choices, list) and answer not in choices:
        answer = next((c for c in choices if isinstance(c, str) and c.strip() == answer.strip()), answer)
    return answer


def table_converter(fields: dict[str, str], root: Path, *, source: str, task: str, split: str,
                    answer_index: bool, index_base: int, csv_cells: bool) -> Callable[[int, dict], Item]:
    """A converter for rows keyed by column name (JSONL objects, CSV rows, Hugging Face rows)."""

    def get(record: dict, key: str) -> Any:
        value = record.get(fields.get(key, key))
        if key == "sub_category" and value is None and key not in fields:
            value = record.get("sub-category")  # MMAU's spelling
        return value

    def convert(position: int, record: dict) -> Item:
        raw_id = get(record, "id")
        sample_id = as_id(raw_id) if raw_id is not None else f"{source}-{position}"
        question = get(record, "question")
        if not isinstance(question, str) or not question.strip():
            raise SampleError("field 'question': missing or empty")
        choices = get(record, "choices")
        choices = _csv_choices(choices) if csv_cells else choices
        if hasattr(choices, "tolist"):  # numpy arrays from parquet
            choices = choices.tolist()
        if choices is None:
            raise SampleError("field 'choices': missing")
        answer = get(record, "answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise SampleError("field 'answer': missing")  # training data needs answers; only MMAU keeps unanswered items
        answer = choice_at(choices, answer, index_base) if answer_index else _answer_text(answer, choices)
        audio = get(record, "audio")
        if isinstance(audio, dict):  # Hugging Face's {"bytes": ..., "path": ...}
            audio = audio.get("bytes") or audio.get("path")
        audio = bytes(audio) if isinstance(audio, (bytes, bytearray)) else locate_audio(audio, root)
        sample = Sample(id=sample_id, audio=str(audio) if isinstance(audio, Path) else "<bytes>", question=question,
                        choices=choices, answer=answer, task=optional_text(get(record, "task")) or task,
                        category=optional_text(get(record, "category")),
                        sub_category=optional_text(get(record, "sub_category")),
                        difficulty=optional_text(get(record, "difficulty")),
                        source=source, split=optional_text(get(record, "split")) or split,
                        reasoning=optional_text(get(record, "reasoning")))
        return Item(sample, audio)

    return convert


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    return task


def build_table(input: str | Path, out: str | Path, fmt: str = "jsonl", fields: dict[str, str] | None = None,
                audio_dir: str | Path | None = None, answer_index: bool = False, index_base: int = 0,
                task: str = "other", split: str = "train", source: str | None = None,
                delimiter: str = ",") -> dict[str, Any]:
    """`prepare jsonl|csv`: one item per JSONL line or CSV row; relative audio paths under `audio_dir`
    (default: the input file's folder)."""
    input, fields = Path(input), dict(fields or {})
    source = source or input.stem
    items = read_csv_items(input, delimiter) if fmt == "csv" else read_json_items(input)
    root = audio_root(audio_dir, input.parent)
    params = {**input_params(input), "format": fmt, "fields": fields, "audio_dir": str(root.resolve()),
              "answer_index": answer_index, "index_base": index_base, "task": _check_task(task), "split": split,
              "source": source}
    convert = table_converter(fields, root, source=source, task=task, split=split, answer_index=answer_index,
                              index_base=index_base, csv_cells=fmt == "csv")
    return build(out, fmt, params, items, convert, id_key=fields.get("id", "id"), what=str(input))


def _open_hf(path: Path, hf_split: str | None, cache_dir: str) -> Any:
    """A saved dataset (`save_to_disk`) or parquet file(s), as one `datasets.Dataset`."""
    try:
        import datasets
    except ImportError:
        raise UserError("`prepare hf` needs the `datasets` package: pip install 'audio-rft[hf]'") from None
    datasets.disable_progress_bars()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet")) if path.is_dir() else []
            if not files:
                raise UserError(f"{path}: neither a dataset saved with save_to_disk nor parquet file(s)")
            ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], cache_dir=cache_dir)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read this input"
        raise UserError(f"{path}: cannot read as a Hugging Face dataset ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if hf_split is None and len(ds) != 1:
            raise UserError(f"{path}: holds splits {', '.join(ds)}; pick one with --hf-split")
        if hf_split is not None and hf_split not in ds:
            raise UserError(f"{path}: no split {hf_split!r} (has {', '.join(ds)})")
        ds = ds[hf_split or next(iter(ds))]
    # Never let datasets decode audio (that needs torchcodec): take the stored bytes / path instead.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Audio):
            ds = ds.cast_column(name, datasets.Audio(decode=False))
    return ds


def build_hf(input: str | Path, out: str | Path, fields: dict[str, str] | None = None,
             audio_dir: str | Path | None = None, answer_index: bool = False, index_base: int = 0,
             task: str = "other", split: str | None = None, source: str | None = None,
             hf_split: str | None = None) -> dict[str, Any]:
    """`prepare hf`: a Hugging Face dataset saved on disk, or parquet file(s); the audio column holds bytes,
    a path (relative to `audio_dir`, default the dataset's folder) or {"bytes": ..., "path": ...}."""
    input, fields = Path(input), dict(fields or {})
    if not input.exists():
        raise UserError(f"{input}: no such file or folder")
    source, split = source or input.stem, split or hf_split or "train"
    root = audio_root(audio_dir, input if input.is_dir() else input.parent)
    with tempfile.TemporaryDirectory(prefix="audio-rft-hf-") as cache_dir:  # parquet -> arrow cache, then gone
        ds = _open_hf(input, hf_split, cache_dir)
        items = ((f"row {i}", row) for i, row in enumerate(ds))
        params = {**input_params(input), "format": "hf", "hf_split": hf_split, "fields": fields,
                  "audio_dir": str(root.resolve()), "answer_index": answer_index, "index_base": index_base,
                  "task": _check_task(task), "split": split, "source": source}
        convert = table_converter(fields, root, source=source, task=task, split=split,
                                  answer_index=answer_index, index_base=index_base, csv_cells=False)
        return build(out, "hf", params, items, convert, id_key=fields.get("id", "id"), total=len(ds),
                     what=str(input))
