"""What a training stage's `launch:` line starts, and the same line for another GPU count.

A pipeline's sft/grpo stage runs in the `audio-rft run` process (one process), or as its `launch:` command:
`accelerate launch --config_file CONFIG [--num_processes N] ...` or `torchrun --nproc_per_node N ...`. With the
stage's `strategy: auto` (the default) the engine follows the launcher (audio_rft.train.engine.resolve_strategy):
an accelerate config of `distributed_type: FSDP` gives fsdp, `DEEPSPEED` deepspeed at its `zero_stage`, anything
else ddp for several processes and none for one. `audio-rft plan` reads the line the same way
(`launched`), and `fitted_pipeline` writes the pipeline for N GPUs (scripts/reproduce_r1_aqa.sh): each launch
line with N processes (none for one GPU: the stage runs in-process), and the stages that do not fit left out,
with whatever reads from them.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from audio_rft import UserError

ACCELERATE_TYPES = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}


@dataclass
class Launch:
    """What one stage runs as."""

    processes: int
    strategy: str  # none, ddp, fsdp, zero2 or zero3: what the engine will pick (plan's spelling)
    command: list[str] | None  # the launch line (None: in the `audio-rft run` process)
    config_file: Path | None = None  # an accelerate config the line names, found

    @property
    def text(self) -> str:
        return shlex.join(self.command) if self.command else "in-process (no launch line)"


def _flag(command: list[str], *names: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in a command line."""
    for i, word in enumerate(command):
        for name in names:
            if word == name and i + 1 < len(command):
                return command[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def _launcher(command: list[str]) -> str:
    words = [os.path.basename(w) for w in command[:3]]
    if "torchrun" in words or ("torch.distributed.run" in command[:4]):
        return "torchrun"
    if words[:2] == ["accelerate", "launch"] or "accelerate" in words:
        return "accelerate"
    return "other"


def find_config_file(name: str, pipeline: Path | None) -> Path | None:
    """An accelerate config named on a launch line: as given (relative to the working folder), else relative to
    the pipeline file's folder or the folder above it (where `pipelines/accelerate/...` is written from)."""
    path = Path(name)
    candidates = [path] if path.is_absolute() else [path] + (
        [pipeline.parent / path, pipeline.parent.parent / path] if pipeline else [])
    return next((c.resolve() for c in candidates if c.is_file()), None)


def launched(command: list[str] | None, config, pipeline: Path | None = None, where: str = "") -> Launch:
    """Processes and strategy of a stage with this launch line (None: in-process) and training config."""
    from audio_rft.config import read_yaml
    from audio_rft.plan import resolve_strategy

    zero = getattr(config, "zero_stage", 3)
    if not command:
        return Launch(1, resolve_strategy(config.strategy, 1, zero), None)
    kind, processes, launcher_strategy, found = _launcher(command), None, None, None
    if kind == "accelerate":
        name = _flag(command, "--config_file", "--config-file")
        settings = {}
        if name:
            found = find_config_file(name, pipeline)
            if found is None:
                raise UserError(f"{where or 'launch'}: accelerate config {name!r} not found (looked relative to the "
                                f"working folder and to {pipeline.parent if pipeline else 'the pipeline'})")
            settings = read_yaml(found)
        launcher_strategy = ACCELERATE_TYPES.get(str(settings.get("distributed_type", "")).upper())
        if "--use_fsdp" in command:
            launcher_strategy = "fsdp"
        if "--use_deepspeed" in command:
            launcher_strategy = "deepspeed"
        zero_value = _flag(command, "--zero_stage") or (settings.get("deepspeed_config") or {}).get("zero_stage")
        if launcher_strategy == "deepspeed" and config.strategy == "auto" and zero_value is not None:
            zero = int(zero_value)
        processes = _flag(command, "--num_processes", "--num-processes") or settings.get("num_processes", 1)
    elif kind == "torchrun":
        processes = _flag(command, "--nproc_per_node", "--nproc-per-node") or 1
    else:
        processes = 1
    try:
        processes = int(processes)
    except ValueError:
        raise UserError(f"{where or 'launch'}: process count {processes!r} is not a number") from None
    strategy = config.strategy if config.strategy != "auto" else (launcher_strategy or "auto")
    return Launch(processes, resolve_strategy(strategy, processes, zero), list(command), found)


def for_gpus(launch: Launch, gpus: int, config, pipeline: Path | None = None) -> Launch:
    """The same stage on `gpus` processes: one GPU runs it in-process (no launcher, strategy none), several keep
    the launcher and its config with the process count replaced."""
    if gpus == 1 or not launch.command:  # without a launch line a stage runs in the `audio-rft run` process
        return launched(None, config, pipeline)
    command, kind = list(launch.command), _launcher(launch.command)
    names = {"accelerate": ("--num_processes", "--num-processes"),
             "torchrun": ("--nproc_per_node", "--nproc-per-node")}.get(kind)
    if names is None:
        raise UserError(f"launch {shlex.join(command)!r}: cannot set its process count (accelerate launch or "
                        "torchrun only)")
    kept, i = [], 0
    while i < len(command):  # drop the old count, then append the new one
        word = command[i]
        if word in names:
            i += 2
            continue
        if any(word.startswith(n + "=") for n in names):
            i += 1
            continue
        if word in ("--config_file", "--config-file") and launch.config_file is not None and i + 1 < len(command):
            kept += [word, str(launch.config_file)]  # absolute: the fitted pipeline may be written elsewhere
            i += 2
            continue
        kept.append(word)
        i += 1
    position = 2 if kind == "accelerate" else 1
    kept[position:position] = [names[0], str(gpus)]
    return launched(kept, config, pipeline)


def fitted_pipeline(path: str | Path, results: list[dict], gpus: int) -> tuple[dict, list[str]]:
    """The pipeline file's content for `gpus` GPUs, from plan's `results` for it (each with name, fits, launch): a
    stage that fits gets its launch line for that count, one that does not is left out with every stage and eval
    variant that reads from it. Returns the content and one line per training stage saying what it gets."""
    import copy

    from audio_rft.config import read_yaml

    data = copy.deepcopy(read_yaml(path))
    by_name = {r["name"]: r for r in results}
    dropped: dict[str, str] = {}
    lines = []
    for result in results:
        if not result["fits"]:
            dropped[result["name"]] = (f"needs {result['per_gpu_gib']:.1f} GiB per GPU ({result['fits_by']}) under "
                                       f"{result['strategy']} on {gpus} GPU{'s' if gpus > 1 else ''}, over "
                                       f"{result['gpu_gb']:g} GB less {10}% headroom")
    stages = []
    for entry in data.get("stages", []):
        name = entry.get("name")
        reads = [d for d in dropped if "${" + d + "}" in repr(entry.get("config"))]
        if name in dropped:
            lines.append(f"{name}: skipped: {dropped[name]}")
            continue
        if entry.get("kind") == "eval" and reads:
            variants = entry.get("config", {}).get("variants", [])
            kept = [v for v in variants if not any("${" + d + "}" in repr(v) for d in dropped)]
            for v in variants:
                if v not in kept:
                    lines.append(f"{name}: variant {v.get('name')} left out (reads a skipped stage)")
            entry["config"]["variants"] = kept
        elif reads:
            dropped[name] = f"reads {', '.join(reads)}, skipped"
            lines.append(f"{name}: skipped: {dropped[name]}")
            continue
        if name in by_name:
            launch = by_name[name]["launch"]
            if launch["command"]:
                entry["launch"] = shlex.join(launch["command"])
            else:
                entry.pop("launch", None)
            lines.append(f"{name}: {launch['text']} ({launch['strategy']}, {launch['processes']} process"
                         f"{'es' if launch['processes'] > 1 else ''}; {by_name[name]['per_gpu_gib']:.1f} GiB per GPU "
                         f"by the {by_name[name]['fits_by']})")
        stages.append(entry)
    data["stages"] = stages
    return data, lines
