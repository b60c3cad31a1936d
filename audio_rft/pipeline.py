"""A pipeline file: the stages (prepare, tiny-model, sft, grpo, pairs, prefer, infer, eval, report) of one
YAML file, read, overridden (`STAGE.KEY=VALUE`, `out=DIR`) and resolved (`${stage}` references, typed configs)
into a Pipeline, which `audio-rft run` runs.

A pipeline is a list of named stages run in the order listed. Each stage gets a folder DIR/<stage>/; `${stage}`
is that folder, and makes the stage an input of the one that mentions it (only stages listed above may be
referenced). What each kind of stage is (its config, its checks, how it runs) is one entry of STAGE_KINDS in
audio_rft/stages.py; caching, resume and the command line are audio_rft/runner.py. The names tests and
scripts import from here (STAGE_KINDS, Variant, eval_config, ...) are re-exported below.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audio_rft import UserError
from audio_rft.config import config_to_dict, read_yaml
from audio_rft.stages import (  # noqa: F401  (re-exported: callers import them from here)
    KINDS, NAME_RE, STAGE_FILE, STAGE_KINDS, TRAINING, ReportConfig, StageKind, TinyModelConfig, Variant,
    _typed, eval_config, input_hash, outputs_present, read_record,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = "pipelines/demo.yaml"
PIPELINE_KEYS = ("name", "description", "out", "stages")
STAGE_KEYS = ("name", "kind", "config", "launch")
REF_RE = re.compile(r"\$\{([^}]*)\}")


# ---------------------------------------------------------------- the resolved pipeline


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



def _build_stage(kind: str, name: str, folder: Path, values: dict, overrides: dict, where: str, deps: list[str],
                 launch: list[str] | None) -> Stage:
    spec = STAGE_KINDS[kind]
    config = _typed(spec.config(), values, overrides, where)
    variants = spec.validate(config, folder, where) or []
    return Stage(name=name, kind=kind, folder=folder, config=config, deps=deps, launch=launch, variants=variants)
