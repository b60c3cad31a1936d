"""`audio-rft run PIPELINE.yaml`: chain the stages (prepare, tiny-model, sft, grpo, pairs, prefer, infer, eval,
report) from one YAML file, dataset in, checkpoint and report out, with caching and resume. What the runner
knows of each kind of stage is one entry of STAGE_KINDS.

A pipeline is a list of named stages run in the order listed. Each stage gets a folder DIR/<stage>/ and a
`stage.json` there: its kind, the hash of its resolved config, the hashes of the stages it reads from
(`${stage}` references), its status (running | complete | failed) and timings. A stage is skipped when it
completed with the same config and the same inputs; it reruns from scratch when either changed (and then so
do all stages that read from it, since their input hash changes with it); after a crash or a kill the same
command resumes it (training from its last checkpoint, inference from its saved predictions).

The hashes are taken with the run folder written as `${out}`, so a run folder that is moved stays up to date.
Files outside the run folder (an AVQA json, audio folders, a paper table) are tracked by path, not content:
after changing one, rerun its stage with `--force STAGE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import typing
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from audio_rft.machine import machine_info
from audio_rft import UserError
from audio_rft.config import build_config, config_to_dict, option, read_yaml
from audio_rft.fileio import atomic_write_json, atomic_write_text, sha256_json

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = "pipelines/demo.yaml"
STAGE_FILE = "stage.json"
PIPELINE_KEYS = ("name", "description", "out", "stages")
STAGE_KEYS = ("name", "kind", "config", "launch")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
REF_RE = re.compile(r"\$\{([^}]*)\}")
TOP_LEVEL_COPIES = ("report.md", "report.json", "report.csv")  # + every *.png of the report folder


# ---------------------------------------------------------------- configs of the runner's own stage kinds


@dataclass
class TinyModelConfig:
    preset: str = option("tiny", "tiny (the CPU demo model) or bench (Qwen2-Audio-7B's shapes, few narrow layers)")
    corpus: list[str] = option([], "prepared dataset folders whose prompts also train the tokenizer")
    seed: int = option(0, "initialisation seed")


@functools.cache
def eval_config() -> type:
    """The eval stage's config class: `variants`, and every `audio-rft infer` key but `out` as every variant's
    default. Those keys and defaults are InferConfig's, declared once there (built on first use, since
    importing infer imports torch)."""
    from audio_rft.eval.infer import InferConfig

    hints = typing.get_type_hints(InferConfig)
    shared = [(f.name, hints[f.name], dataclasses.field(
        default=f.default, default_factory=f.default_factory,
        metadata={"help": f.metadata["help"] + " (every variant's default)"}))
        for f in dataclasses.fields(InferConfig) if f.name != "out"]
    variants = option([], "one mapping per variant: name, and any `audio-rft infer` key but out (model, adapter, "
                          "prompt, ablate_audio, ...), over the defaults below")
    return dataclasses.make_dataclass("EvalConfig", [("variants", list[dict], variants), *shared],
                                      namespace={"__module__": __name__})


@dataclass
class ReportConfig:
    eval: str = option("", "the eval stage's folder, e.g. ${eval}")
    variants: list[str] = option([], "which variants, in this order (default: all of the eval stage's)")
    paper_table: str | None = option(None, "CSV of the paper's numbers, shown beside ours and labelled as theirs")
    seed: int = option(0, "bootstrap seed")
    resamples: int = option(2000, "bootstrap resamples")


# ---------------------------------------------------------------- the resolved pipeline


@dataclass
class Variant:
    name: str
    config: Any  # InferConfig


@dataclass
class Stage:
    name: str
    kind: str
    folder: Path
    config: Any  # the typed config, references resolved, `out` set by the runner
    deps: list[str]  # stages referenced, in order of first mention
    launch: list[str] | None = None
    variants: list[Variant] = dataclasses.field(default_factory=list)  # eval only

    def resolved(self) -> dict:
        data = config_to_dict(self.config)
        if self.kind == "eval":
            data["variants"] = [{"name": v.name, **config_to_dict(v.config)} for v in self.variants]
        return data


@dataclass
class Pipeline:
    path: Path
    name: str
    out: Path
    stages: list[Stage]
    overrides: list[str]

    def portable(self, obj: Any) -> Any:
        """`obj` with the run folder written as ${out} (what the hashes and the report see)."""
        root = str(self.out)
        if isinstance(obj, str):
            return "${out}" + obj[len(root):] if obj == root or obj.startswith(root + os.sep) else obj
        if isinstance(obj, dict):
            return {k: self.portable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.portable(v) for v in obj]
        return obj

    def relative(self, path: str | None) -> str | None:
        """A path inside the run folder, relative to it; None for anything else (a hub id, an outside path)."""
        if not path or not Path(path).is_absolute():
            return None
        try:
            return Path(path).resolve().relative_to(self.out).as_posix()
        except ValueError:
            return None

    def to_json(self) -> dict:
        return {"name": self.name, "out": str(self.out), "overrides": self.overrides,
                "stages": [{"name": s.name, "kind": s.kind, **({"launch": s.launch} if s.launch else {}),
                            "depends_on": s.deps, "config": s.resolved()} for s in self.stages]}


def find_pipeline(path: str | None) -> Path:
    """The pipeline file: as given (else relative to the repository root); the default from the repository
    root, then the current folder."""
    if path is None:
        candidates = [REPO_ROOT / DEFAULT_PIPELINE, Path.cwd() / DEFAULT_PIPELINE]
    else:
        candidates = [Path(path)] + ([REPO_ROOT / path] if not Path(path).is_absolute() else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{path or DEFAULT_PIPELINE}: no such pipeline file")


def _substitute(value: Any, refs: dict[str, Path], where: str, found: list[str]) -> Any:
    """Replace ${stage} with that stage's folder, recursively; note each reference in `found`."""
    if isinstance(value, str):
        def one(match: re.Match) -> str:
            name = match.group(1).strip()
            if name not in refs:
                raise UserError(f"{where}: unknown reference ${{{name}}}")
            if name not in found:
                found.append(name)
            return str(refs[name])
        return REF_RE.sub(one, value)
    if isinstance(value, dict):
        return {k: _substitute(v, refs, where, found) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, refs, where, found) for v in value]
    return value


def _split_overrides(items: list[str], path: Path) -> tuple[str | None, dict[str, dict[str, str]]]:
    out, per_stage = None, {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{path}: override {item!r} is not key=value (STAGE.KEY=VALUE, or out=DIR)")
        if key == "out":
            out = value
            continue
        stage, dot, field = key.partition(".")
        if not dot or not stage or not field:
            raise UserError(f"{path}: override {item!r}: address a stage's key as STAGE.KEY=VALUE "
                            f"(e.g. grpo.max_steps=5), or the run folder as out=DIR")
        per_stage.setdefault(stage, {})[field] = value
    return out, per_stage


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = (), out: str | Path | None = None) -> Pipeline:
    """Read, override and resolve a pipeline file: every stage's typed config built, every ${ref} resolved.

    Any mistake is a one-line UserError naming the file and the stage."""
    path = Path(path)
    data = read_yaml(path)
    unknown = [k for k in data if k not in PIPELINE_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown top-level key {unknown[0]!r} (known: {', '.join(PIPELINE_KEYS)})")
    name = str(data.get("name") or path.stem)
    override_out, per_stage = _split_overrides(list(overrides), path)
    out_dir = out or override_out or data.get("out") or f"runs/{name}"
    root = Path(str(out_dir)).expanduser().resolve()
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise UserError(f"{path}: `stages` must be a non-empty list of {{name, kind, config}} mappings")
    # First pass: names, kinds, the shape of each entry.
    entries = []
    for i, entry in enumerate(raw_stages, 1):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: stage {i}: expected a mapping with name, kind and config")
        stage_name = entry.get("name")
        if not isinstance(stage_name, str) or not NAME_RE.fullmatch(stage_name):
            raise UserError(f"{path}: stage {i}: `name` must be letters, digits, '-' or '_' (got {stage_name!r})")
        where = f"{path}: stage {stage_name!r}"
        if any(e[0] == stage_name for e in entries):
            raise UserError(f"{where}: the name is used twice")
        bad = [k for k in entry if k not in STAGE_KEYS]
        if bad:
            raise UserError(f"{where}: unknown key {bad[0]!r} (a stage has {', '.join(STAGE_KEYS)}; "
                            f"its settings go under `config`)")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise UserError(f"{where}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            raise UserError(f"{where}: `config` must be a mapping")
        launch = entry.get("launch")
        launch_override = per_stage.get(stage_name, {}).pop("launch", None)
        if launch_override is not None:  # STAGE.launch=CMD on the command line ("" or none: run in-process)
            launch = None if launch_override.strip().lower() in ("", "none", "null") else launch_override
        if launch is not None:
            if kind not in TRAINING:
                raise UserError(f"{where}: `launch` is for training stages only ({', '.join(TRAINING)})")
            launch = shlex.split(launch) if isinstance(launch, str) else launch
            if not isinstance(launch, list) or not launch or not all(isinstance(x, str) for x in launch):
                raise UserError(f"{where}: `launch` must be a command line, e.g. "
                                f"\"accelerate launch --config_file pipelines/accelerate/ddp.yaml\"")
        entries.append((stage_name, kind, dict(config), launch))
    names = [e[0] for e in entries]
    for stage_name in per_stage:
        if stage_name not in names:
            raise UserError(f"{path}: override {stage_name}.…: there is no stage {stage_name!r} "
                            f"(stages: {', '.join(names)})")
    # Second pass: overrides, references (earlier stages only), typed configs.
    stages: list[Stage] = []
    for stage_name, kind, config, launch in entries:
        where = f"{path}: stage {stage_name!r}"
        folder = root / stage_name
        for key in config:
            if str(key).replace("-", "_") == "out":
                raise UserError(f"{where}: `out` is set by the runner (the stage's folder, {folder})")
        for key in per_stage.get(stage_name, {}):
            if key.replace("-", "_") == "out":
                raise UserError(f"{where}: override {stage_name}.out: `out` is set by the runner; "
                                f"use out=DIR for the run folder")
        earlier = {s.name: s.folder for s in stages}
        refs = {n: root / n for n in names}
        deps: list[str] = []
        values = _substitute(config, refs, where, deps)
        override_values = _substitute(per_stage.get(stage_name, {}), refs, f"{where}: override", deps)
        for dep in deps:
            if dep == stage_name:
                raise UserError(f"{where}: refers to itself (${{{dep}}})")
            if dep not in earlier:
                raise UserError(f"{where}: refers to ${{{dep}}}, which runs later; stages run in the order listed, "
                                f"so a stage may only use the stages above it")
        stage = _build_stage(kind, stage_name, folder, values, override_values, where, deps, launch)
        stages.append(stage)
    return Pipeline(path=path, name=name, out=root, stages=stages, overrides=list(overrides))


def _typed(cls: type, values: dict, overrides: dict, where: str) -> Any:
    try:
        return build_config(cls, values, overrides, source=where)
    except UserError as e:
        message = str(e)
        raise UserError(message if message.startswith(where) else f"{where}: {message}") from None


def _check_mode(mode: str, allowed: tuple[str, ...], where: str) -> None:
    if mode not in allowed:
        raise UserError(f"{where}: unknown prompt mode {mode!r} (one of {', '.join(allowed)})")


def _check_extract(extract: str, where: str) -> None:
    from audio_rft.answers import EXTRACTORS

    if extract not in EXTRACTORS:
        raise UserError(f"{where}: unknown extract {extract!r} (one of {', '.join(EXTRACTORS)})")


def _build_stage(kind: str, name: str, folder: Path, values: dict, overrides: dict, where: str, deps: list[str],
                 launch: list[str] | None) -> Stage:
    spec = STAGE_KINDS[kind]
    config = _typed(spec.config(), values, overrides, where)
    variants = spec.validate(config, folder, where) or []
    return Stage(name=name, kind=kind, folder=folder, config=config, deps=deps, launch=launch, variants=variants)


def _needs(config: Any, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not getattr(config, k)]
    if missing:
        raise UserError(f"{where}: {' and '.join(f'`{k}`' for k in missing)} {'is' if len(missing) == 1 else 'are'} required")


def _check_training(config: Any, folder: Path, where: str) -> None:
    from audio_rft.prompts import PROMPT_MODES

    config.out = str(folder)
    _check_mode(config.prompt_mode, PROMPT_MODES + (("mixed",) if hasattr(config, "max_target_tokens") else ()), where)
    _needs(config, ("model", "data") if not hasattr(config, "pairs") else ("model", "pairs"), where)


def _check_prepare(config: Any, folder: Path, where: str) -> None:
    config.out = str(folder)
    if config.fields:
        from audio_rft.data.generic import parse_fields
        try:
            config.fields = parse_fields(f"{k}={v}" for k, v in config.fields.items())
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def _check_tiny_model(config: Any, folder: Path, where: str) -> None:
    from audio_rft.model import PRESETS

    if config.preset not in PRESETS:
        raise UserError(f"{where}: unknown preset {config.preset!r} (one of {', '.join(PRESETS)})")


def _check_infer(config: Any, folder: Path, where: str) -> None:
    from audio_rft.prompts import PROMPT_MODES

    config.out = str(folder / "predictions.json")
    _check_mode(config.prompt, PROMPT_MODES, where)
    _check_extract(config.extract, where)
    _needs(config, ("model", "data"), where)


def _check_pairs(config: Any, folder: Path, where: str) -> None:
    from audio_rft.prompts import PROMPT_MODES

    config.out = str(folder)
    _check_mode(config.prompt_mode, PROMPT_MODES, where)
    _needs(config, ("data", "model") if config.source == "samples" else ("data",), where)


def _check_report(config: Any, folder: Path, where: str) -> None:
    if not config.eval:
        raise UserError(f"{where}: `eval` (the eval stage's folder, e.g. \"${{eval}}\") is required")


def _build_variants(config: Any, folder: Path, where: str) -> list[Variant]:
    from audio_rft.eval.infer import InferConfig
    from audio_rft.prompts import PROMPT_MODES

    if not config.variants:
        raise UserError(f"{where}: `variants` is empty; list at least one {{name, model, prompt}}")
    shared = {k: v for k, v in config_to_dict(config).items() if k != "variants"}
    variants: list[Variant] = []
    for i, entry in enumerate(config.variants, 1):
        if not isinstance(entry, dict):
            raise UserError(f"{where}: variant {i}: expected a mapping with name, model, prompt, ...")
        entry = dict(entry)
        name = entry.pop("name", None)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise UserError(f"{where}: variant {i}: `name` must be letters, digits, '-' or '_' (got {name!r})")
        if any(v.name == name for v in variants):
            raise UserError(f"{where}: two variants are named {name!r}")
        if "out" in entry:
            raise UserError(f"{where}: variant {name!r}: `out` is set by the runner ({folder / (name + '.json')})")
        vwhere = f"{where} variant {name!r}"
        infer = _typed(InferConfig, {**shared, **entry}, {}, vwhere)
        infer.out = str(folder / f"{name}.json")
        _check_mode(infer.prompt, PROMPT_MODES, vwhere)
        _check_extract(infer.extract, vwhere)
        if not infer.model or not infer.data:
            raise UserError(f"{vwhere}: `model` and `data` are required")
        variants.append(Variant(name, infer))
    return variants


# ---------------------------------------------------------------- stage records


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def input_hash(record: dict) -> str:
    """What a dependent stage records of one of its inputs: that stage's config and inputs, and which of its
    runs produced the files (so a stage rerun by --force also reruns what reads from it)."""
    return sha256_json({"kind": record.get("kind"), "config_hash": record.get("config_hash"),
                        "inputs": record.get("inputs"), "run_id": record.get("run_id")})


def outputs_present(stage: Stage) -> bool:
    return STAGE_KINDS[stage.kind].outputs(stage)


def _prepared(stage: Stage) -> bool:
    if stage.config.source == "synth":
        return all((stage.folder / split / "data.jsonl").is_file() for split in ("train", "test"))
    return (stage.folder / "data.jsonl").is_file()


def _trained(stage: Stage) -> bool:
    return (stage.folder / "final" / "COMPLETE.json").is_file()


def _evaluated(stage: Stage) -> bool:
    return (stage.folder / "variants.json").is_file() and all(Path(v.config.out).is_file() for v in stage.variants)


# ---------------------------------------------------------------- running one stage


def _print(text: str = "") -> None:
    """The runner's own output (stage progress, the summary table) goes to stdout, not to the log: it is what
    `audio-rft run` reports, read by scripts and tests; flushed, so it keeps its place among the lines of
    launched training processes. What happens inside a stage is logged (audio_rft.log)."""
    print(text, flush=True)


def _run_prepare(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
    from audio_rft.data.prepare import format_summary, prepare

    summary = prepare(stage.config)
    parts = summary.items() if stage.config.source == "synth" else [(None, summary)]
    for name, part in parts:
        _print("  " + ((f"{name}: " if name else "") + format_summary(part)).replace("\n", "\n  "))


def _run_tiny_model(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
    from audio_rft.model import build_tiny_preset

    c = stage.config
    build_tiny_preset(c.preset, stage.folder, c.corpus, c.seed)


def _trainer(train: Callable[[], Callable]) -> Callable[[Pipeline, Stage, bool, dict], None]:
    """A training stage's runner: in this process, or as `LAUNCH -m audio_rft KIND` when it has a launch line."""
    def run(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
        if stage.launch:
            _launch(pipe, stage, fresh)
        else:
            train()(stage.config, fresh=fresh)
    return run


def _run_pairs(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
    from audio_rft.train.pairs import build_pairs

    build_pairs(stage.config)


def _launch(pipe: Pipeline, stage: Stage, fresh: bool) -> None:
    """Run a training stage as `LAUNCH -m audio_rft KIND --config DIR/<stage>/config.yaml` (e.g. accelerate launch)."""
    import yaml

    config_file = stage.folder / "config.yaml"
    atomic_write_text(config_file, yaml.safe_dump(config_to_dict(stage.config), sort_keys=False))
    command = [*stage.launch, "-m", "audio_rft", stage.kind, "--config", str(config_file)] + (["--fresh"] if fresh else [])
    _print("  $ " + shlex.join(command))
    try:
        code = subprocess.call(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    except OSError as e:
        raise UserError(f"cannot start {stage.launch[0]!r} ({e.strerror})") from None
    if code != 0:
        raise UserError(f"`{shlex.join(command)}` exited with status {code}")


def _die_with_parent() -> None:
    """In the launched child: get SIGTERM when the runner dies (even by SIGKILL), so a killed run leaves no
    training behind that would write into the stage folder while the rerun resumes it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_infer(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
    from audio_rft.eval.infer import run_inference

    run_inference(stage.config)


def _variant_signature(pipe: Pipeline, variant: Variant, records: dict[str, dict]) -> str:
    """A variant's own config and the stages its paths point into: eval redoes only the variants whose
    checkpoint (or data) changed, so adding a variant or retraining one model does not redo the others.
    `extract` is left out: the outputs do not depend on it, so changing it only re-reads them (`reextract`)."""
    config = {k: v for k, v in config_to_dict(variant.config).items() if k != "extract"}
    strings = [v for v in config.values() if isinstance(v, str)]
    deps = sorted(name for name in records
                  if any(v == str(pipe.out / name) or v.startswith(str(pipe.out / name) + os.sep) for v in strings))
    return sha256_json({"config": pipe.portable(config), "inputs": {d: input_hash(records[d]) for d in deps}})


def _run_eval(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
    from audio_rft.eval.infer import reextract, run_inference
    from audio_rft.eval.score import score_file

    stage.folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, variant in enumerate(stage.variants, 1):
        out = Path(variant.config.out)
        files = [out, out.with_name(out.name + ".partial.jsonl"), out.with_name(out.stem + ".meta.json"),
                 out.with_name(out.stem + ".scored.json")]
        key_file = out.with_name(out.stem + ".key")
        key = _variant_signature(pipe, variant, records)
        same = key_file.is_file() and key_file.read_text().strip() == key
        label = f"  [{i}/{len(stage.variants)}] {variant.name}"
        if same and out.is_file():
            if reextract(out, variant.config.extract):
                _print(f"{label}: up to date; model_prediction re-read with extract {variant.config.extract}")
            else:
                _print(f"{label}: up to date")
        else:
            if not same:  # another config or another checkpoint: its old predictions (and partial) are stale
                for path in files:
                    path.unlink(missing_ok=True)
                atomic_write_text(key_file, key + "\n")
            _print(f"{label}: infer ({variant.config.prompt} prompt"
                   + (", audio silenced" if variant.config.ablate_audio else "") + ")")
            run_inference(variant.config)
        scored = score_file(out, files[3])
        summary = scored["summary"]
        tasks = ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in summary["task"].items())
        total = "n/a" if summary["total_accuracy"] is None else f"{summary['total_accuracy']:.2f}%"
        _print(f"      accuracy {total} over {summary['n']} items ({tasks})")
        raw = scored["raw_output"]
        if raw is not None and (raw["flips"]["extracted_only"] or raw["flips"]["raw_only"]):
            _print(f"      on the raw output, as MMAU's evaluation.py reads it: {raw['summary']['total_accuracy']:.2f}% "
                   f"({raw['flips']['extracted_only']} items flip to wrong, {raw['flips']['raw_only']} to right)")
        listing.append({"name": variant.name, "predictions": out.name, "scored": files[3].name,
                        "prompt": variant.config.prompt, "extract": variant.config.extract,
                        "model": variant.config.model, "adapter": variant.config.adapter,
                        "ablate_audio": variant.config.ablate_audio, "accuracy": summary["total_accuracy"], "n": summary["n"]})
    atomic_write_json(stage.folder / "variants.json", listing)


def _run_report(pipe: Pipeline, stage: Stage, fresh: bool, records: dict[str, dict]) -> None:
    from audio_rft.eval.report import build_report, write_report

    c = stage.config
    eval_dir = Path(c.eval)
    try:
        listing = json.loads((eval_dir / "variants.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{eval_dir}: no variants.json (is `eval` an eval stage's folder?)") from None
    by_name = {v["name"]: v for v in listing}
    chosen = c.variants or list(by_name)
    missing = [n for n in chosen if n not in by_name]
    if missing:
        raise UserError(f"report: the eval stage has no variant {missing[0]!r} (it has: {', '.join(by_name)})")
    runs = [(n, eval_dir / by_name[n]["predictions"]) for n in chosen]
    stage.folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report = build_report(runs, stage.folder, c.paper_table, seed=c.seed, resamples=c.resamples,
                          training=_training_stages(pipe, [by_name[n] for n in chosen]), write=False)
    for entry in report["training_curves"]:
        entry["folder"] = pipe.relative(entry["folder"]) or entry["folder"]
    for v in report["variants"]:
        entry = by_name[v["name"]]
        checkpoint = pipe.relative(entry["adapter"] or entry["model"])
        v.pop("checkpoint", None)
        if checkpoint is not None:  # a hub id or an outside folder: the untrained base, no checkpoint of ours
            v["checkpoint"] = checkpoint
        v["model"] = pipe.relative(entry["model"]) or entry["model"]
        if entry["adapter"]:
            v["adapter"] = pipe.relative(entry["adapter"]) or entry["adapter"]
        v["path"] = pipe.relative(v["path"]) or v["path"]
        v["meta"] = pipe.portable(v.get("meta", {}))
    seconds = {}
    for s in pipe.stages:
        record = read_record(s.folder) if s is not stage else None
        if record and record.get("status") == "complete":
            seconds[s.name] = record.get("seconds")
    seconds[stage.name] = round(time.perf_counter() - began, 1)
    report["machine"] = machine_info()
    report["stage_seconds"] = seconds
    report["pipeline"] = {"path": str(pipe.path), "out": str(pipe.out), "content": pipe.portable(pipe.to_json())}
    write_report(stage.folder, report, appendix=_run_section(pipe, report))
    for path in [stage.folder / n for n in TOP_LEVEL_COPIES] + sorted(stage.folder.glob("*.png")):
        shutil.copyfile(path, pipe.out / f".{path.name}.tmp")
        os.replace(pipe.out / f".{path.name}.tmp", pipe.out / path.name)
    _print(f"  wrote {pipe.out / 'report.md'} (+ report.json, report.csv, "
           + ", ".join(p.name for p in sorted(stage.folder.glob('*.png'))) + ")")


def _training_stages(pipe: Pipeline, listing: list[dict]) -> dict[str, Path]:
    """Variant name -> the folder of the sft/grpo stage of this run its checkpoint comes from (`<stage>/final`,
    `<stage>/checkpoint-N`); variants of an outside model (a hub id, an untrained preset) have none."""
    training = {s.name: s.folder for s in pipe.stages if s.kind in TRAINING}
    found = {}
    for entry in listing:
        checkpoint = pipe.relative(entry.get("adapter") or entry.get("model"))
        stage = checkpoint.split("/", 1)[0] if checkpoint else None
        if stage in training:
            found[entry["name"]] = training[stage]
    return found


def _run_section(pipe: Pipeline, report: dict) -> str:
    m = report["machine"]
    lines = ["", "## Pipeline run", "", f"Pipeline `{pipe.path}` ({pipe.name}); checkpoints are relative to the run folder.",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads)"
             + (f", GPUs: {', '.join(m['gpus'])}" if m.get("gpus") else "") + f", {m['platform']}.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {'—' if s is None else f'{s:.1f}'} |" for name, s in report["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StageKind:
    """What the runner knows of one kind of stage; a new kind is one entry of STAGE_KINDS."""

    config: Callable[[], type]  # its typed config class (imported only when a pipeline uses the kind)
    validate: Callable[[Any, Path, str], list[Variant] | None]  # set `out`, check what build_config cannot
    outputs: Callable[[Stage], bool]  # whether its outputs are on disk
    run: Callable[[Pipeline, Stage, bool, dict], None]
    launchable: bool = False  # may run as its own command under `launch:` (torchrun, accelerate launch)


def _class(module: str, name: str) -> Callable[[], type]:
    import importlib

    return lambda: getattr(importlib.import_module(module), name)


STAGE_KINDS: dict[str, StageKind] = {
    "prepare": StageKind(_class("audio_rft.data.prepare", "PrepareConfig"), _check_prepare, _prepared, _run_prepare),
    "tiny-model": StageKind(lambda: TinyModelConfig, _check_tiny_model,
                            lambda stage: (stage.folder / "config.json").is_file(), _run_tiny_model),
    "sft": StageKind(_class("audio_rft.train.sft", "SFTConfig"), _check_training, _trained,
                     _trainer(_class("audio_rft.train.sft", "train_sft")), launchable=True),
    "grpo": StageKind(_class("audio_rft.train.grpo", "GRPOConfig"), _check_training, _trained,
                      _trainer(_class("audio_rft.train.grpo", "train_grpo")), launchable=True),
    "pairs": StageKind(_class("audio_rft.train.pairs", "PairsConfig"), _check_pairs,
                       lambda stage: (stage.folder / "manifest.json").is_file(), _run_pairs),
    "prefer": StageKind(_class("audio_rft.train.prefer", "PreferConfig"), _check_training, _trained,
                        _trainer(_class("audio_rft.train.prefer", "train_prefer")), launchable=True),
    "infer": StageKind(_class("audio_rft.eval.infer", "InferConfig"), _check_infer,
                       lambda stage: Path(stage.config.out).is_file(), _run_infer),
    "eval": StageKind(eval_config, lambda config, folder, where: _build_variants(config, folder, where),
                      _evaluated, _run_eval),
    "report": StageKind(lambda: ReportConfig, _check_report, lambda stage: (stage.folder / "report.json").is_file(),
                        _run_report),
}
KINDS = tuple(STAGE_KINDS)
TRAINING = tuple(kind for kind, spec in STAGE_KINDS.items() if spec.launchable)


# ---------------------------------------------------------------- the runner


@dataclass
class Outcome:
    name: str
    kind: str
    status: str  # up to date | ran | resumed | failed | not run
    seconds: float | None = None


def stage_action(stage: Stage, signature: dict, forced: bool) -> tuple[str, str]:
    """What the runner does with a stage now: (action, reason), action being skip, resume or fresh."""
    record = read_record(stage.folder)
    if forced:
        return "fresh", "forced"
    if record is None:
        return "fresh", "new"
    same_config = record.get("kind") == stage.kind and record.get("config_hash") == signature["config_hash"]
    same_inputs = record.get("inputs") == signature["inputs"]
    if same_config and same_inputs:
        if record.get("status") == "complete":
            return ("skip", "up to date") if outputs_present(stage) else ("fresh", "output missing")
        return "resume", f"resuming the {record.get('status', 'interrupted')} run"
    if not same_config:
        return "fresh", "config changed"
    changed = [n for n in signature["inputs"] if (record.get("inputs") or {}).get(n) != signature["inputs"][n]]
    return "fresh", f"input {', '.join(changed) or '?'} changed"


def _lock(out: Path):
    """One runner per run folder at a time; the lock goes with the process, even when it is killed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"{out} is in use by another `audio-rft run`; wait for it to finish") from None
    return handle


def _check_owned(stage: Stage) -> None:
    """Refuse to write into a stage folder that holds files the runner did not make."""
    folder = stage.folder
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; move it away or choose another run folder (--out)")
    if folder.is_dir() and not (folder / STAGE_FILE).is_file() and any(folder.iterdir()):
        raise UserError(f"{folder} already holds files that `audio-rft run` did not write (no {STAGE_FILE}); "
                        f"move them away or choose another run folder (--out)")


def _clear(stage: Stage) -> None:
    """Empty a stage's folder (all but stage.json) before a fresh run."""
    if not stage.folder.is_dir():
        return
    for path in stage.folder.iterdir():
        if path.name == STAGE_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _signature(pipe: Pipeline, stage: Stage, records: dict[str, dict]) -> dict:
    config_hash = sha256_json({"config": pipe.portable(stage.resolved()), "launch": stage.launch})
    return {"config_hash": config_hash, "inputs": {d: input_hash(records[d]) for d in stage.deps}}


def run_pipeline(pipe: Pipeline, force: list[str] | tuple[str, ...] = (), dry_run: bool = False) -> list[Outcome]:
    """Run (or, with dry_run, forecast) every stage in order; returns what happened to each."""
    unknown = [f for f in force if f not in {s.name for s in pipe.stages}]
    if unknown:
        raise UserError(f"{pipe.path}: --force {unknown[0]}: no such stage "
                        f"(stages: {', '.join(s.name for s in pipe.stages)})")
    lock = None
    if not dry_run:
        pipe.out.mkdir(parents=True, exist_ok=True)
        lock = _lock(pipe.out)
    _print(f"pipeline {pipe.name} ({pipe.path}) -> {pipe.out}")
    outcomes: list[Outcome] = []
    records: dict[str, dict] = {}
    will_run: set[str] = set()  # dry run: the stages that would run
    # --force applies once per command: when the same command is rerun after an interruption, a stage it
    # already forced (and that has run since) is not forced again, so the rerun resumes where it stopped.
    command_key = sha256_json({"pipeline": str(pipe.path.resolve()), "overrides": pipe.overrides,
                               "force": sorted(force)})
    invocation = uuid.uuid4().hex
    lineage = [invocation]
    try:
        previous_run = json.loads((pipe.out / "run.json").read_text(encoding="utf-8"))
        if previous_run.get("command_key") == command_key and not previous_run.get("complete"):
            lineage = list(previous_run.get("lineage") or []) + lineage
    except (OSError, ValueError, AttributeError):
        pass
    manifest = {"pipeline": str(pipe.path), "command": sys.argv, "command_key": command_key, "force": list(force),
                "lineage": lineage, "started": _now(), "complete": False, "resolved": pipe.to_json()}
    if not dry_run:
        atomic_write_json(pipe.out / "run.json", manifest)
    total = len(pipe.stages)
    try:
        for i, stage in enumerate(pipe.stages, 1):
            signature = _signature(pipe, stage, records)
            forced = stage.name in force and (read_record(stage.folder) or {}).get("invocation") not in lineage[:-1]
            action, reason = stage_action(stage, signature, forced)
            if dry_run:
                if action == "skip" and any(d in will_run for d in stage.deps):
                    action, reason = "fresh", "an input will rerun"
                _print(f"[{i}/{total}] {stage.name} ({stage.kind}): "
                       + ("up to date" if action == "skip" else f"would run ({reason})"))
                if action != "skip":
                    will_run.add(stage.name)
                outcomes.append(Outcome(stage.name, stage.kind, "up to date" if action == "skip" else "would run"))
                records[stage.name] = read_record(stage.folder) or {}
                continue
            if action == "skip":
                _print(f"[{i}/{total}] {stage.name}: up to date")
                records[stage.name] = read_record(stage.folder)
                outcomes.append(Outcome(stage.name, stage.kind, "up to date"))
                continue
            _print(f"[{i}/{total}] {stage.name} ({stage.kind}): {reason}")
            previous = read_record(stage.folder) if action == "resume" else None
            _check_owned(stage)
            if action == "fresh" and (stage.kind != "eval" or stage.name in force):
                _clear(stage)  # eval instead redoes only the variants whose own config or checkpoint changed
            record = {
                "name": stage.name, "kind": stage.kind, "status": "running", **signature,
                "run_id": uuid.uuid4().hex, "invocation": invocation, "started": (previous or {}).get("started") or _now(), "finished": None,
                # wall time of the attempts that finished (a killed attempt's time is unknown)
                "seconds": (previous or {}).get("seconds") or 0.0,
                "attempts": (previous or {}).get("attempts", 0) + 1,
                "pipeline": str(pipe.path), "launch": stage.launch, "config": stage.resolved(),
            }
            stage.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stage.folder / STAGE_FILE, record)
            began = time.perf_counter()
            outcome = Outcome(stage.name, stage.kind, "failed")
            outcomes.append(outcome)

            def finish(status: str, error: str | None = None) -> None:
                elapsed = time.perf_counter() - began
                record.update(status=status, finished=_now(), seconds=round(record["seconds"] + elapsed, 1),
                              **({"error": error} if error else {}))
                stage.folder.mkdir(parents=True, exist_ok=True)  # a builder may have replaced the folder
                atomic_write_json(stage.folder / STAGE_FILE, record)
                outcome.seconds = elapsed

            try:
                STAGE_KINDS[stage.kind].run(pipe, stage, action == "fresh", records)
            except UserError as e:
                finish("failed", str(e))
                raise UserError(f"stage {stage.name!r} ({stage.kind}) failed: {e}; "
                                f"fix it and rerun the same command to resume") from None
            except BaseException as e:  # a bug, or Ctrl-C: record it, then let it through
                finish("failed", "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
                raise
            finally:
                _free_memory()
            finish("complete")
            outcome.status = "resumed" if action == "resume" else "ran"
            records[stage.name] = record
    finally:
        done = {o.name for o in outcomes}
        outcomes += [Outcome(s.name, s.kind, "not run") for s in pipe.stages if s.name not in done]
        _print_summary(pipe, outcomes)
        if not dry_run:
            manifest.update(finished=_now(), stages=[dataclasses.asdict(o) for o in outcomes],
                            complete=all(o.status in ("up to date", "ran", "resumed") for o in outcomes))
            atomic_write_json(pipe.out / "run.json", manifest)
        if lock is not None:
            lock.close()
    return outcomes


def _free_memory() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _print_summary(pipe: Pipeline, outcomes: list[Outcome]) -> None:
    width = max(len("stage"), *(len(o.name) for o in outcomes))
    kind_width = max(len("kind"), *(len(o.kind) for o in outcomes))
    _print()
    _print(f"{'stage':<{width}}  {'kind':<{kind_width}}  {'status':<10}  {'seconds':>8}")
    for o in outcomes:
        seconds = "" if o.seconds is None else f"{o.seconds:.1f}"
        _print(f"{o.name:<{width}}  {o.kind:<{kind_width}}  {o.status:<10}  {seconds:>8}")
    if (pipe.out / "report.md").is_file() and any(o.kind == "report" and o.status in ("ran", "resumed", "up to date")
                                                  for o in outcomes):
        _print(f"report: {pipe.out / 'report.md'}")


# ---------------------------------------------------------------- command line


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The pipeline file and the KEY=VALUE overrides, in any order."""
    pipeline, overrides = None, []
    for item in items:
        if re.fullmatch(r"[A-Za-z0-9_.-]+=.*", item, re.S):
            overrides.append(item)
        elif pipeline is None:
            pipeline = item
        else:
            raise UserError(f"{item!r}: only one pipeline file at a time (overrides are STAGE.KEY=VALUE)")
    return pipeline, overrides


def _run(args: argparse.Namespace) -> int:
    path, overrides = _split_args(args.args)
    pipe = load_pipeline(find_pipeline(path), overrides, args.out)
    run_pipeline(pipe, args.force, dry_run=args.dry_run)  # a failed stage raises: exit 2 (130 for Ctrl-C)
    return 0


_DESCRIPTION = """\
Run a pipeline: its stages in the order listed, each in DIR/<stage>/ with a stage.json (kind, config hash,
input hashes, status, timings). A stage that completed with the same config and inputs is skipped; one whose
config or inputs changed reruns from scratch, and so does everything that reads from it. After a crash or a
kill, the same command resumes: training from its last checkpoint, inference from its saved predictions.

Pipeline file (default pipelines/demo.yaml):

  name: demo
  out: runs/demo                # the run folder DIR (--out or out=DIR override it)
  stages:
    - name: data
      kind: prepare             # prepare | tiny-model | sft | grpo | infer | eval | report
      config: {source: synth, train: 2000, test: 400}
    - name: base-model
      kind: tiny-model
      config: {preset: tiny, corpus: ["${data}/train"]}
    - name: warmup
      kind: sft
      config: {model: "${base-model}", data: "${data}/train", max_steps: 150}

${stage} is that stage's folder (DIR/<stage>) and makes it an input of this one; only stages listed
above may be referenced. Each kind's config keys are those of its command (`audio-rft sft --help`, ...);
`out` is always the stage's folder. See pipelines/README.md.

Outputs: DIR/report.md, report.json, report.csv and the PNG charts (from the report stage), DIR/run.json
(the resolved pipeline and what this run did). Exit status: 0 done, 2 for a mistake in the pipeline or a
failed stage (rerun to resume), 130 interrupted."""


class _IntermixedParser(argparse.ArgumentParser):
    """Options may sit between the positionals: `run PIPELINE.yaml --out DIR grpo.max_steps=5`."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_parser(subparsers: Any, command: str) -> None:
    p = subparsers.add_parser(command, help="run a pipeline YAML", description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="audio-rft run [PIPELINE.yaml] [STAGE.KEY=VALUE ...] [--out DIR] "
                                    "[--force STAGE]... [--dry-run]")
    p.add_argument("args", nargs="*", metavar="PIPELINE.yaml | STAGE.KEY=VALUE",
                   help="the pipeline file (default pipelines/demo.yaml), then overrides such as grpo.max_steps=5 "
                        "or out=DIR")
    p.add_argument("--out", metavar="DIR", help="run folder (default: the pipeline's `out`)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE from scratch even if up to date (and every stage that reads from it); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the pipeline and say what would run, without running anything")
    p.set_defaults(func=_run)
    p.__class__ = _IntermixedParser
