"""The kinds of pipeline stage (prepare, tiny-model, sft, grpo, pairs, prefer, infer, eval, report): what the
runner knows of each is one entry of STAGE_KINDS (its typed config, the checks build_config cannot make, whether
its outputs are on disk, how to run it), with the runner's own kinds' configs, the eval and report helpers, and
the stage records (`stage.json`) the kinds read of one another.

The pipeline file's loader is audio_rft/pipeline.py; the runner (caching, resume, the CLI) audio_rft/runner.py.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from audio_rft import UserError
from audio_rft.config import build_config, config_to_dict, option
from audio_rft.fileio import atomic_write_json, atomic_write_text, sha256_json
from audio_rft.machine import machine_info

if TYPE_CHECKING:
    from audio_rft.pipeline import Pipeline, Stage

STAGE_FILE = "stage.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
TOP_LEVEL_COPIES = ("report.md", "report.json", "report.csv")  # + every *.png of the report folder


# ---------------------------------------------------------------- configs of the runner's own stage kinds


@dataclass
class TinyModelConfig:
    preset: str = option("tiny", "tiny (the CPU demo model), tiny30 (the same with a 30 s window, as vLLM needs) or bench "
                                 "(Qwen2-Audio-7B's shapes, few narrow layers)")
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
    html: bool = option(True, "write report.html: every test item's clip beside each variant's answer, with filters")
    embed_audio: bool = option(False, "embed the clips in report.html (a page that works alone; large) instead of "
                                      "linking them relative to the page")


# ---------------------------------------------------------------- the resolved pipeline



# ---------------------------------------------------------------- checks of one stage's config


@dataclass
class Variant:
    """One variant of an eval stage: its name and its InferConfig."""

    name: str
    config: Any  # InferConfig


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
        official = _benchmark_rule(scored.get("benchmark_version"))
        if official:  # MMAR / MMSU / AIR-Bench data: their own rule beside MMAU's, in PRED.<rule>.scored.json
            own = score_file(out, out.with_name(f"{out.stem}.{official}.scored.json"), rule=official)["summary"]
            unit = "%" if own["unit"] == "percent" else ""
            _print(f"      by {official}'s official rule: {own['accuracy']}{unit} over {own['n']} counted, "
                   f"{own['skipped']} skipped as its script skips them")
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


def _benchmark_rule(version: dict | None) -> str | None:
    """The official rule of the benchmark a dataset was prepared from, when it has one besides MMAU's."""
    benchmark = (version or {}).get("benchmark")
    return {"mmar": "mmar", "mmsu": "mmsu", "airbench-foundation": "airbench"}.get(benchmark)


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
    if c.html:
        from audio_rft.eval.html import write_html

        # one page per folder rather than a copy: the clips are linked relative to where the page is
        for folder in (stage.folder, pipe.out):
            write_html(folder, report, runs, embed_audio=c.embed_audio, source_dir=stage.folder)
    else:  # an earlier run's page would show other numbers
        for folder in (stage.folder, pipe.out):
            (folder / "report.html").unlink(missing_ok=True)
    _print(f"  wrote {pipe.out / 'report.md'} (+ report.json, report.csv, "
           + ", ".join(p.name for p in sorted(stage.folder.glob('*.png'))) + (", report.html" if c.html else "") + ")")


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
