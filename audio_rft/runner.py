"""`audio-rft run PIPELINE.yaml`: run a pipeline's stages in order, dataset in, checkpoint and report out,
with caching and resume.

Each stage gets a `stage.json` in its folder: its kind, the hash of its resolved config, the hashes of the
stages it reads from (`${stage}` references), its status (running | complete | failed) and timings. A stage is
skipped when it completed with the same config and the same inputs; it reruns from scratch when either changed
(and then so do all stages that read from it, since their input hash changes with it); after a crash or a kill
the same command resumes it (training from its last checkpoint, inference from its saved predictions).

The hashes are taken with the run folder written as `${out}`, so a run folder that is moved stays up to date.
Files outside the run folder (an AVQA json, audio folders, a paper table) are tracked by path, not content:
after changing one, rerun its stage with `--force STAGE`.

The pipeline file is read by audio_rft/pipeline.py; each kind of stage is one entry of STAGE_KINDS in
audio_rft/stages.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audio_rft import UserError
from audio_rft.fileio import atomic_write_json, sha256_json
from audio_rft.pipeline import Pipeline, Stage, find_pipeline, load_pipeline
from audio_rft.stages import STAGE_FILE, STAGE_KINDS, _now, _print, input_hash, outputs_present, read_record


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
                       + ("up to date" if action == "skip" else f"would run ({reason})")
                       + (f"; launch: {shlex.join(stage.launch)}" if stage.launch else ""))
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
        if (pipe.out / "report.html").is_file():
            _print(f"listen: {pipe.out / 'report.html'} (open it in a browser)")


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

Outputs: DIR/report.md, report.json, report.csv, the PNG charts and report.html (from the report stage), DIR/run.json
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
