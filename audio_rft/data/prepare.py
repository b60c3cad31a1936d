"""`audio-rft prepare SOURCE ...` builds a prepared dataset; `audio-rft validate DIR` re-checks one.

`prepare(config)` is the one entry function (the pipeline calls it too); each source's builder lives in
its own module and is imported only when used (`prepare hf` alone imports `datasets`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf

from audio_rft import UserError
from audio_rft.config import config_help, config_to_dict, load_config, option
from audio_rft.data.audio import MAX_SECONDS, SAMPLE_RATE
from audio_rft.data.dataset import AUDIO_DIR, DATA_FILE, MANIFEST_FILE, REJECTED_FILE, content_hash
from audio_rft.data.schema import Sample, SampleError

logger = logging.getLogger(__name__)

SOURCES = ("synth", "avqa", "mmau", "jsonl", "csv", "hf")


@dataclass
class PrepareConfig:
    source: str = option("synth", f"where the data comes from: {', '.join(SOURCES)}")
    out: str = option("runs/data", "output folder (replaced atomically when complete)")
    input: str | None = option(None, "input file (avqa, mmau, jsonl, csv) or dataset folder / parquet (hf)")
    audio_dir: str | None = option(None, "root of relative audio paths (default: the input's folder); audio may not escape it")
    audio_pattern: str = option("{video_name}.wav", "avqa: audio file name built from an item's fields")
    fields: dict = option({}, "jsonl/csv/hf: sample field -> input column, e.g. {question: q, choices: options}")
    answer_index: bool = option(False, "jsonl/csv/hf: the answer column holds a choice index, not the text")
    index_base: int = option(0, "jsonl/csv/hf: index of the first choice when answer_index is set (0 or 1)")
    task: str = option("other", "jsonl/csv/hf: task for items without one (sound, music, speech, other)")
    split: str | None = option(None, "split label for items without one (default: train; avqa: from the file name)")
    name: str | None = option(None, "jsonl/csv/hf: the samples' `source` label (default: the input's file name)")
    delimiter: str = option(",", "csv: field delimiter")
    hf_split: str | None = option(None, "hf: which split of a saved DatasetDict to read")
    train: int = option(2000, "synth: number of training items")
    test: int = option(500, "synth: number of test items")
    seed: int = option(0, "synth: random seed")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Build the dataset `config` describes; return its summary ({"train": ..., "test": ...} for synth)."""
    c = config
    if c.source not in SOURCES:
        raise UserError(f"unknown source {c.source!r}; choose one of {', '.join(SOURCES)}")
    if c.source == "synth":
        from audio_rft.data.synth import build_synth

        return build_synth(Path(c.out), c.train, c.test, c.seed)
    if not c.input:
        raise UserError(f"prepare {c.source}: an input file is required")
    if c.source != "hf" and not Path(c.input).is_file():
        raise UserError(f"{c.input}: " + ("a folder, expected a file" if Path(c.input).is_dir() else "no such file"))
    if c.index_base not in (0, 1):
        raise UserError(f"--index-base {c.index_base}: use 0 or 1")
    if c.source == "avqa":
        from audio_rft.data.avqa import build_avqa

        return build_avqa(c.input, c.out, c.audio_dir, c.audio_pattern, c.split)
    if c.source == "mmau":
        from audio_rft.data.mmau import build_mmau

        return build_mmau(c.input, c.out, c.audio_dir)
    from audio_rft.data.generic import build_hf, build_table

    common = dict(fields=c.fields, audio_dir=c.audio_dir, answer_index=c.answer_index, index_base=c.index_base,
                  task=c.task, source=c.name)
    if c.source == "hf":
        return build_hf(c.input, c.out, split=c.split, hf_split=c.hf_split, **common)
    return build_table(c.input, c.out, fmt=c.source, split=c.split or "train", delimiter=c.delimiter, **common)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"accepted {summary['accepted']}, rejected {summary['rejected']}"
             + (f", unanswered {summary['unanswered']}" if summary.get("unanswered") else "")
             + (f" -> {summary['out']}" if summary.get("out") else "")]
    for kind, n in summary.get("rejected_by_reason", {}).items():
        lines.append(f"  rejected: {kind}: {n}")
    for task, stats in summary.get("per_task", {}).items():
        lines.append(f"  task {task}: {stats['count']} items, {stats['seconds'] / 3600:.3f} h")
    cut = f", {summary['cut']} cut to {MAX_SECONDS:.0f} s" if summary.get("cut") else ""
    lines.append(f"  audio: {summary.get('audio_hours', 0.0):.3f} h in total{cut}")
    return "\n".join(lines)


# ---------------------------------------------------------------- validate


def _lines(path: Path) -> list[str]:
    """JSONL lines; not splitlines(), which also breaks at U+2028 inside JSON strings."""
    text = path.read_text(encoding="utf-8")
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n") if text else []


def validate_dataset(folder: str | Path) -> list[str]:
    """Every problem found in a prepared dataset folder (empty when clean); UserError when it is not one."""
    folder = Path(folder)
    data, manifest_path, rejected_path = folder / DATA_FILE, folder / MANIFEST_FILE, folder / REJECTED_FILE
    if not data.is_file() or not manifest_path.is_file():
        raise UserError(f"{folder}: not a prepared dataset folder (needs {DATA_FILE} and {MANIFEST_FILE})")
    problems: list[str] = []
    root = folder.resolve()
    samples: list[Sample] = []
    ids: set[str] = set()
    try:
        lines = _lines(data)
    except UnicodeDecodeError:
        return [f"{data}: not UTF-8 text"]
    for number, line in enumerate(lines, 1):
        where = f"{data}:{number}"
        try:
            sample = Sample.from_json(json.loads(line))
        except json.JSONDecodeError as e:
            problems.append(f"{where}: malformed JSON ({e.msg})")
            continue
        except (SampleError, TypeError) as e:
            problems.append(f"{where}: {e}")
            continue
        if sample.id in ids:
            problems.append(f"{where}: duplicate id {sample.id!r}")
        ids.add(sample.id)
        samples.append(sample)
        try:
            path = (folder / sample.audio).resolve()  # an absolute `audio` stays absolute here
        except (RuntimeError, OSError):
            problems.append(f"{where}: audio {sample.audio!r}: symlink loop")
            continue
        if not path.is_relative_to(root):
            problems.append(f"{where}: audio {sample.audio!r} lies outside the dataset folder")
        elif not path.is_file():
            problems.append(f"{where}: audio {sample.audio!r} not found")
        else:
            try:
                info = sf.info(str(path))
            except Exception as e:  # noqa: BLE001 - soundfile raises several kinds for a bad file
                problems.append(f"{where}: audio {sample.audio!r} unreadable ({str(e).splitlines()[0][:100]})")
                continue
            if info.samplerate != SAMPLE_RATE or info.channels != 1:
                problems.append(f"{where}: audio {sample.audio!r} is {info.samplerate} Hz, {info.channels} channels "
                                f"(expected {SAMPLE_RATE} Hz mono)")
            if info.frames == 0 or info.frames > MAX_SECONDS * info.samplerate:
                problems.append(f"{where}: audio {sample.audio!r} has {info.frames} frames "
                                f"(expected 1 to {MAX_SECONDS:.0f} s)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return problems + [f"{manifest_path}: unreadable ({e})"]
    rejected = _lines(rejected_path) if rejected_path.is_file() else None
    per_task = Counter(s.task for s in samples)
    expected = {
        "accepted": len(lines),
        "rejected": len(rejected) if rejected is not None else manifest.get("rejected"),
        "unanswered": sum(s.answer is None for s in samples),
        "per_task": {t: n for t, n in sorted(per_task.items())},
    }
    per_task_found = manifest.get("per_task")
    found = {**manifest, "per_task": {t: v.get("count") if isinstance(v, dict) else v for t, v in per_task_found.items()}
             if isinstance(per_task_found, dict) else per_task_found}
    for key, value in expected.items():
        if found.get(key) != value:
            problems.append(f"{manifest_path}: {key} is {found.get(key)!r}, the folder holds {value!r}")
    if rejected is None:
        problems.append(f"{rejected_path}: missing")
    if not problems and manifest.get("content_sha256") != content_hash(folder, samples):
        problems.append(f"{manifest_path}: content_sha256 does not match data.jsonl and {AUDIO_DIR}/ (edited after prepare?)")
    return problems


# ---------------------------------------------------------------- command line


def _config_from_args(args: argparse.Namespace) -> PrepareConfig:
    from audio_rft.data.generic import parse_fields

    if args.source == "recipe":
        config = load_config(PrepareConfig, args.recipe, args.overrides)
        if config.fields:
            config.fields = parse_fields(f"{k}={v}" for k, v in config.fields.items())
        return config
    config = PrepareConfig(source=args.source, out=args.out)
    for key in config_to_dict(config):
        if key not in ("source", "out", "fields") and getattr(args, key, None) is not None:
            setattr(config, key, getattr(args, key))
    config.fields = parse_fields(getattr(args, "field", None) or [])
    return config


def _run_prepare(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    summary = prepare(config)
    parts = summary.items() if config.source == "synth" else [(None, summary)]
    rejected = 0
    for name, part in parts:
        print((f"{name}: " if name else "") + format_summary(part))
        rejected += part.get("rejected", 0)
    if args.strict and rejected:
        logger.error("--strict: %d items rejected (see rejected.jsonl)", rejected)
        return 1
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    problems = validate_dataset(args.folder)
    for problem in problems:
        print(problem)
    if problems:
        logger.error("%s: %d problems", args.folder, len(problems))
        return 1
    print(f"{args.folder}: ok")
    return 0


_HELP = argparse.RawDescriptionHelpFormatter


def _source(sources: Any, name: str, summary: str, description: str, needs_input: str | None) -> argparse.ArgumentParser:
    p = sources.add_parser(name, help=summary, description=summary + "\n\n" + description, formatter_class=_HELP)
    if needs_input:
        p.add_argument("input", metavar="INPUT", help=needs_input)
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset folder (written to a temporary "
                   "folder, renamed into place when complete; an existing one is replaced)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any item was rejected")
    p.set_defaults(func=_run_prepare, source=name)
    return p


def _audio_dir(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--audio-dir", metavar="DIR", help=f"root of relative audio paths (default: {default}); "
                   "audio resolving outside it (symlinks included) is rejected")


def _mapping(p: argparse.ArgumentParser) -> None:
    p.add_argument("--field", action="append", metavar="FIELD=COLUMN",
                   help="read sample FIELD from input COLUMN (repeatable); fields: id, audio, question, choices, "
                        "answer, task, category, sub_category, difficulty, split, reasoning; unmapped fields are read "
                        "from the column of the same name (MMAU's `sub-category` also works)")
    p.add_argument("--answer-index", action="store_true", default=None,
                   help="the answer column holds the position of the right choice, not its text")
    p.add_argument("--index-base", type=int, choices=(0, 1), help="position of the first choice (default 0)")
    p.add_argument("--task", help="task of items without one: sound, music, speech or other (default other)")
    p.add_argument("--split", help="split label of items without one (default train)")
    p.add_argument("--name", help="the samples' `source` label (default: the input's file name)")


_OUTPUT = ("Writes DIR/data.jsonl, DIR/audio/*.wav (16 kHz mono, cut to 30 s), DIR/manifest.json and "
           "DIR/rejected.jsonl (every unusable input item, with where it was and why). Exit status: 0 when at "
           "least one item was accepted, 1 with --strict when any was rejected, 2 for a usage error, an "
           "unreadable input file, or nothing accepted.")


def add_parser(subparsers: Any, command: str) -> None:
    if command == "validate":
        p = subparsers.add_parser("validate", formatter_class=_HELP, description=(
            "Re-check a prepared dataset folder: data.jsonl parses and follows the schema, ids are unique, every "
            "audio file exists inside the folder and is 16 kHz mono of at most 30 s, and manifest.json's counts "
            "and content hash match.\n\nExit status: 0 when clean, 1 when problems were found (each printed), 2 "
            "when DIR is not a dataset folder."))
        p.add_argument("folder", metavar="DIR", help="prepared dataset folder")
        p.set_defaults(func=_run_validate)
        return
    p = subparsers.add_parser("prepare", formatter_class=_HELP, description=(
        "Build a prepared dataset from one SOURCE.\n\n" + _OUTPUT + "\n\n`audio-rft prepare SOURCE --help` "
        "explains each source's options."))
    sources = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    s = _source(sources, "synth", "the built-in synthetic bench (nothing to download)",
                "Generates audio questions answerable only by listening, as DIR/train and DIR/test.", None)
    s.add_argument("--train", type=int, default=2000, help="training items (default 2000)")
    s.add_argument("--test", type=int, default=500, help="test items (default 500)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    s = _source(sources, "avqa", "AVQA (the paper's training set)",
                "INPUT is AVQA's own train_qa.json (a JSON list; audio found under --audio-dir by --audio-pattern) "
                "or R1-AQA's JSONL (the same objects plus `audio_path`, used as given). \"video\" in questions "
                "becomes \"audio\"; task is sound; category/sub_category come from question_type/question_relation."
                "\n\n" + _OUTPUT, "AVQA train_qa.json or R1-AQA JSONL")
    _audio_dir(s, "the input's folder; R1-AQA's absolute audio_path is trusted unless this is given")
    s.add_argument("--audio-pattern", metavar="PATTERN", help="audio file name from an item's fields, relative to "
                   "--audio-dir (default '{video_name}.wav'); used when an item has no audio_path")
    s.add_argument("--split", help="split label (default: train, or val/test when the file name says so)")

    s = _source(sources, "mmau", "MMAU benchmark JSON (e.g. mmau-test-mini.json)",
                "Audio is found under --audio-dir by each item's audio_id (./test-mini-audios/<id>.wav). Items "
                "whose answer is withheld (the test split) are kept with answer null, for inference, and counted "
                "as `unanswered` in the manifest. A choice listed twice is dropped (noted in the manifest).\n\n"
                + _OUTPUT, "MMAU JSON list")
    _audio_dir(s, "the input's folder")

    for fmt, what in (("jsonl", "one JSON object per line (a JSON list also works)"),
                      ("csv", "a CSV file with a header line; choices as a JSON list or 'a|b|c'")):
        s = _source(sources, fmt, f"your own {fmt.upper()} file",
                    f"INPUT holds {what}. Map its column names with --field; the answer is a choice's text, or "
                    f"its position with --answer-index. Items without an id get <name>-<position>.\n\n" + _OUTPUT,
                    f"{fmt.upper()} file")
        _audio_dir(s, "the input file's folder")
        _mapping(s)
        if fmt == "csv":
            s.add_argument("--delimiter", help="field delimiter (default ',')")

    s = _source(sources, "hf", "a Hugging Face dataset saved on disk, or parquet file(s)",
                "INPUT is a folder written by save_to_disk, a parquet file, or a folder of parquet files. The audio "
                "column holds bytes, a path, or {\"bytes\": ..., \"path\": ...}; it is decoded here with "
                "soundfile, never by datasets. Needs the `datasets` package (pip install 'audio-rft[hf]').\n\n"
                + _OUTPUT, "dataset folder or parquet file(s)")
    _audio_dir(s, "the dataset's folder")
    _mapping(s)
    s.add_argument("--hf-split", help="which split of a saved DatasetDict to read (needed when it has several)")

    s = sources.add_parser("recipe", help="a YAML recipe (data_prep/*.yaml) naming the source and its options",
                           formatter_class=_HELP, epilog=config_help(PrepareConfig),
                           description="Prepare from a YAML file of the keys below, e.g. "
                                       "`audio-rft prepare recipe data_prep/mmau-test-mini.yaml out=runs/mmau`; "
                                       "key=value arguments override the file.\n\n" + _OUTPUT)
    s.add_argument("recipe", metavar="FILE", help="YAML recipe")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a key of the recipe")
    s.add_argument("--strict", action="store_true", help="exit with status 1 when any item was rejected")
    s.set_defaults(func=_run_prepare, source="recipe")
