"""`audio-rft prepare SOURCE ...` builds a prepared dataset; `audio-rft validate DIR` re-checks one.

`prepare(config)` is the one entry function (the pipeline calls it too); each source's builder lives in
its own module and is imported only when used (`prepare hf` alone imports `datasets`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf

from audio_rft import UserError
from audio_rft.config import option
from audio_rft.data.audio import MAX_SECONDS, SAMPLE_RATE
from audio_rft.data.dataset import AUDIO_DIR, DATA_FILE, MANIFEST_FILE, REJECTED_FILE, content_hash
from audio_rft.data.schema import Sample, SampleError

logger = logging.getLogger(__name__)

SOURCES = ("synth", "avqa", "mmau", "mmar", "mmsu", "airbench", "jsonl", "csv", "hf")


@dataclass
class PrepareConfig:
    source: str = option("synth", f"where the data comes from: {', '.join(SOURCES)}")
    out: str = option("", "output dataset folder (required; replaced atomically when complete)")
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
    dev: int = option(0, "hold out N items, drawn by dev_seed, as a dev split for choosing checkpoints: synth takes "
                         "them from train into DIR/dev; any other source writes DIR/train and DIR/dev")
    dev_seed: int = option(0, "seed of the dev hold-out")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Build the dataset `config` describes; return its summary ({"train": ..., "test": ...} for synth)."""
    c = config
    if c.source not in SOURCES:
        raise UserError(f"unknown source {c.source!r}; choose one of {', '.join(SOURCES)}")
    if not c.out:
        raise UserError("prepare: `out` is required (the dataset folder to write: --out DIR or out=DIR)")
    if c.dev < 0:
        raise UserError(f"dev={c.dev}: give a number of items, 0 or more")
    if c.source == "synth":
        from audio_rft.data.synth import build_synth

        summaries = build_synth(Path(c.out), c.train, c.test, c.seed)
        if c.dev:
            from audio_rft.data.dataset import split_off_dev

            out = Path(c.out)
            summaries.update(split_off_dev(out / "train", c.dev, c.dev_seed, out / "train", out / "dev"))
        return summaries
    if c.dev:
        return _with_dev(c)
    if not c.input:
        raise UserError(f"prepare {c.source}: an input file is required")
    if c.source not in ("hf", "mmsu") and not Path(c.input).is_file():
        raise UserError(f"{c.input}: " + ("a folder, expected a file" if Path(c.input).is_dir() else "no such file"))
    if c.index_base not in (0, 1):
        raise UserError(f"index_base={c.index_base}: use 0 or 1")
    if c.source == "avqa":
        from audio_rft.data.avqa import build_avqa

        return build_avqa(c.input, c.out, c.audio_dir, c.audio_pattern, c.split)
    if c.source == "mmau":
        from audio_rft.data.mmau import build_mmau

        return build_mmau(c.input, c.out, c.audio_dir)
    if c.source in ("mmar", "mmsu", "airbench"):
        from audio_rft.data import benchmarks

        return getattr(benchmarks, f"build_{c.source}")(c.input, c.out, c.audio_dir)
    from audio_rft.data.generic import build_hf, build_table

    common = dict(fields=c.fields, audio_dir=c.audio_dir, answer_index=c.answer_index, index_base=c.index_base,
                  task=c.task, source=c.name)
    if c.source == "hf":
        return build_hf(c.input, c.out, split=c.split, hf_split=c.hf_split, **common)
    return build_table(c.input, c.out, fmt=c.source, split=c.split or "train", delimiter=c.delimiter, **common)


def _with_dev(c: PrepareConfig) -> dict[str, Any]:
    """Build the whole dataset aside, then write DIR/train and DIR/dev from it in one atomic step."""
    import shutil
    import tempfile

    from audio_rft.data.dataset import split_off_dev
    from audio_rft.fileio import atomic_dir

    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    whole = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.whole-", suffix=".tmp"))
    try:
        prepare(dataclasses.replace(c, out=str(whole / "all"), dev=0))
        with atomic_dir(out) as tmp:
            parts = split_off_dev(whole / "all", c.dev, c.dev_seed, tmp / "train", tmp / "dev")
    finally:
        shutil.rmtree(whole, ignore_errors=True)
    return {part: {**summary, "out": str(out / part)} for part, summary in parts.items()}


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


_OUTPUT = ("Writes DIR/data.jsonl, DIR/audio/*.wav (16 kHz mono, cut to 30 s), DIR/manifest.json and "
           "DIR/rejected.jsonl (every unusable input item, with where it was and why). Exit status: 0 when at "
           "least one item was accepted, 1 with --strict when any was rejected, 2 for a usage error, an "
           "unreadable input file, or nothing accepted.")
_TABLE = ("input", "out", "audio_dir", "fields", "answer_index", "index_base", "task", "split", "name")
# source -> (summary, what its INPUT is (None: it takes none), description, the keys it reads)
SOURCE_HELP: dict[str, tuple[str, str | None, str, tuple[str, ...]]] = {
    "synth": ("the built-in synthetic bench (nothing to download)", None,
              "Generates audio questions answerable only by listening, as DIR/train and DIR/test.",
              ("out", "train", "test", "seed", "dev", "dev_seed")),
    "avqa": ("AVQA (the paper's training set)", "AVQA train_qa.json or R1-AQA JSONL",
             "INPUT is AVQA's own train_qa.json (a JSON list; audio found under audio_dir by audio_pattern) or "
             "R1-AQA's JSONL (the same objects plus `audio_path`, used as given unless audio_dir is set). \"video\" "
             "in questions becomes \"audio\"; task is sound; category/sub_category come from "
             "question_type/question_relation; split is train, or val/test when the file name says so.",
             ("input", "out", "audio_dir", "audio_pattern", "split")),
    "mmau": ("MMAU benchmark JSON (e.g. mmau-test-mini.json)", "MMAU JSON list",
             "Audio is found under audio_dir by each item's audio_id (./test-mini-audios/<id>.wav). Items whose "
             "answer is withheld (the test split) are kept with answer null, for inference, and counted as "
             "`unanswered` in the manifest. A choice listed twice is dropped (noted in the manifest).",
             ("input", "out", "audio_dir")),
    "mmar": ("MMAR's metadata (MMAR-meta.jsonl, or the first release's MMAR-meta.json)", "MMAR metadata file",
             "Audio is found under audio_dir (the extracted mmar-audio.tar.gz; default: the input's folder) by each "
             "item's audio_path (./audio/<name>.wav). The file's sha256 names its release in the manifest; the first "
             "release's 6 items whose answer is no option are rejected. Score with `audio-rft score --rule mmar`.",
             ("input", "out", "audio_dir")),
    "mmsu": ("MMSU (the Hugging Face dataset ddwang2000/MMSU saved to disk, its parquet, or its rows as JSON/JSONL)",
             "dataset folder, parquet file or JSON/JSONL file",
             "Rows with id, question, choice_a..choice_d, answer_gt (the right option's text), category, "
             "sub-category and audio (embedded bytes, or a path under audio_dir; or audio_path). Parquet and saved "
             "datasets need the `datasets` package. Score with `audio-rft score --rule mmsu`.",
             ("input", "out", "audio_dir")),
    "airbench": ("AIR-Bench's foundation track (Foundation/Foundation_meta.json)", "Foundation_meta.json",
                 "Audio is found under audio_dir at <task_name>_<dataset_name>/<path> (Audio_Grounding clips as "
                 ".flac, as its inference script reads them); the id is uniq_id. Score with "
                 "`audio-rft score --rule airbench`.",
                 ("input", "out", "audio_dir")),
    "jsonl": ("your own JSONL file", "JSONL file",
              "INPUT holds one JSON object per line (a JSON list also works). Map its column names with --field; "
              "the answer is a choice's text, or its position with answer_index. Items without an id get "
              "<name>-<position>.", _TABLE),
    "csv": ("your own CSV file", "CSV file",
            "INPUT is a CSV file with a header line; choices as a JSON list or 'a|b|c'. Map its column names with "
            "--field; the answer is a choice's text, or its position with answer_index. Items without an id get "
            "<name>-<position>.", _TABLE + ("delimiter",)),
    "hf": ("a Hugging Face dataset saved on disk, or parquet file(s)", "dataset folder or parquet file(s)",
           "INPUT is a folder written by save_to_disk, a parquet file, or a folder of parquet files. The audio "
           "column holds bytes, a path, or {\"bytes\": ..., \"path\": ...}; it is decoded here with soundfile, "
           "never by datasets. Needs the `datasets` package (pip install 'audio-rft[hf]').", _TABLE + ("hf_split",)),
}
_RECIPE = "a YAML recipe (data_prep/*.yaml) naming the source and its options"
_FIELD_HELP = ("read sample FIELD from input COLUMN (repeatable; one entry of `fields`); fields: id, audio, question, "
               "choices, answer, task, category, sub_category, difficulty, split, reasoning; unmapped fields are "
               "read from the column of the same name (MMAU's `sub-category` also works)")


def _overview() -> str:
    lines = ["usage: audio-rft prepare SOURCE [INPUT] [--config FILE] [--strict] [key=value | --key VALUE ...]",
             "       audio-rft prepare recipe FILE [key=value ...]", "",
             "Build a prepared dataset from one SOURCE.", "", "sources:"]
    lines += [f"    {name:<8} {summary}" for name, (summary, *_) in SOURCE_HELP.items()]
    lines += [f"    {'recipe':<8} {_RECIPE}", "", _OUTPUT, "",
              "`audio-rft prepare SOURCE --help` lists each source's keys, with their defaults."]
    return "\n".join(lines)


def _parse(source: str, argv: list[str]) -> tuple[PrepareConfig, Any]:
    """`prepare SOURCE [INPUT] [key=value | --key VALUE ...]`, or `prepare recipe FILE [key=value ...]`."""
    from audio_rft.config import parse_command
    from audio_rft.data.generic import parse_fields

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--strict", action="store_true", help="exit with status 1 when any item was rejected")
        if "fields" in keys:
            parser.add_argument("--field", action="append", default=[], metavar="FIELD=COLUMN", help=_FIELD_HELP)

    if source == "recipe":
        keys = tuple(f.name for f in dataclasses.fields(PrepareConfig))
        if argv and not argv[0].startswith("-"):
            argv = ["--config", *argv]  # `recipe FILE` is `--config FILE`
        config, args = parse_command(PrepareConfig, argv, "audio-rft prepare recipe", setup=flags,
                                     usage="audio-rft prepare recipe FILE [key=value ...] [--strict]",
                                     description=f"Prepare from {_RECIPE}, e.g. `audio-rft prepare recipe "
                                                 f"data_prep/mmau-test-mini.yaml out=runs/mmau`.\n\n{_OUTPUT}")
        if not args.config:
            raise UserError("prepare recipe: which FILE?")
    else:
        summary, needs_input, description, keys = SOURCE_HELP[source]
        keys = tuple(dict.fromkeys((*keys, "dev", "dev_seed")))  # every source can hold out a dev split
        config, args = parse_command(
            PrepareConfig, argv, f"audio-rft prepare {source}", keys=keys, setup=flags,
            positional="input" if needs_input else None,
            usage=f"audio-rft prepare {source}{' INPUT' if needs_input else ''} [--config FILE] [--strict] "
                  f"[key=value | --key VALUE ...]",
            description=f"{summary}: {description}" + (f"\n\nINPUT: {needs_input}." if needs_input else "")
                        + f"\n\n{_OUTPUT}\n\nout=DIR (or --out DIR), required: the dataset folder, written to a temporary "
                          f"folder and renamed into place when complete; an existing one is replaced.")
        given = [o.partition("=")[0].replace("-", "_") for o in args.overrides]
        stray = [k for k in given if k not in keys]
        if stray:
            raise UserError(f"prepare {source}: {stray[0]!r} is not one of its keys ({', '.join(keys)})")
        config.source = source
    config.fields = parse_fields([f"{k}={v}" for k, v in config.fields.items()] + getattr(args, "field", []))
    return config, args


def run_argv(argv: list[str]) -> int:
    """`audio-rft prepare ...`: the sources' shared dialect (config.parse_command) over PrepareConfig."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0 if argv else 2
    if argv[0] not in (*SOURCE_HELP, "recipe"):
        raise UserError(f"unknown source {argv[0]!r}; choose one of {', '.join(SOURCE_HELP)}, or recipe")
    config, args = _parse(argv[0], argv[1:])
    summary = prepare(config)
    parts = summary.items() if config.source == "synth" or config.dev else [(None, summary)]
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


def add_parser(subparsers: Any, command: str) -> None:
    """`audio-rft validate DIR` (prepare parses its own arguments: run_argv)."""
    p = subparsers.add_parser("validate", formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        "Re-check a prepared dataset folder: data.jsonl parses and follows the schema, ids are unique, every "
        "audio file exists inside the folder and is 16 kHz mono of at most 30 s, and manifest.json's counts "
        "and content hash match.\n\nExit status: 0 when clean, 1 when problems were found (each printed), 2 "
        "when DIR is not a dataset folder."))
    p.add_argument("folder", metavar="DIR", help="prepared dataset folder")
    p.set_defaults(func=_run_validate)
