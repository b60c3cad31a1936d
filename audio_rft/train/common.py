"""What SFT and GRPO share: the config keys, model setup, data order, checkpoints, metrics, guards.

A checkpoint is what Hugging Face tools load (a PEFT adapter or full weights, plus the processor and a
model card) with the training state beside it. It is written to a temporary folder and renamed into
place after a `COMPLETE` marker vouching for every file's checksum (through per-rank manifests: each rank
hashes its share), so a crash mid-save never leaves a checkpoint that looks whole, and resuming from it
restores optimizer, scheduler, RNG and step exactly.

It stays one module (over 500 lines) because it is the one skeleton every trainer follows (config, setup,
checkpoints, metrics, guards, Run): a trainer's author reads it top to bottom as the contract sft.py,
grpo.py and prefer.py rely on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from audio_rft import UserError
from audio_rft.config import config_to_dict, option, parse_command
from audio_rft.fileio import atomic_dir, atomic_write_json, sha256_file
from audio_rft.train.engine import (REFERENCE_ADAPTER, Engine, Layout, build_engine, describe, disable_dropout,
                                    master_dtype, process_layout, resolve_strategy, seed_dropout, upcast_trained)

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
STATE_DIR = "training_state"


@dataclass
class TrainConfig:
    model: str = option("", "base model: hub id (Qwen/Qwen2-Audio-7B-Instruct) or local folder")
    adapter: str | None = option(None, "start from this PEFT adapter (e.g. a warm-up checkpoint); LoRA keeps training it")
    data: str = option("", "prepared training dataset folder")
    eval_data: str | None = option(None, "prepared held-out dataset for evaluation every eval_every steps")
    out: str = option("", "output folder: checkpoints, metrics.jsonl, final/")
    prompt_mode: str = option("answer", "prompt mode: direct, answer or think")
    seed: int = option(0, "seed for data order, sampling and initialisation")
    max_steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "prompts per device per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate")
    lr_schedule: str = option("constant_with_warmup", "constant_with_warmup, linear, cosine")
    warmup_steps: int = option(0, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    lora: bool = option(True, "LoRA (true) or full fine-tuning of the language model (false)")
    lora_rank: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout (applies only with dropout=true)")
    dropout: bool = option(False, "keep dropout (LoRA's, the model's) on while training; off (default, as TRL's "
                                  "preference trainers), every pass that forms a ratio or a KL runs the same network")
    lora_targets: list[str] = option([], "LoRA target modules (default: the language model's attention and MLP projections)")
    train_projector: bool = option(False, "also train the audio projector")
    train_audio_encoder: bool = option(False, "also train the audio encoder and projector (full fine-tuning only; "
                                              "for building a base from scratch, as the demo's warm-up does)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    device: str = option("auto", "auto, cpu, cuda")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in backward (GPU memory saver; "
                                                 "each prompt is still prefilled once for all its completions)")
    strategy: str = option("auto", "auto (the accelerate launch config's FSDP or DEEPSPEED type, else ddp when "
                                   "several processes run, else none), none, ddp, fsdp (PyTorch FSDP2: weights, "
                                   "gradients and optimizer state sharded), deepspeed (ZeRO, `audio-rft[deepspeed]`)")
    zero_stage: int = option(3, "DeepSpeed ZeRO stage for strategy=deepspeed: 2 (optimizer state and gradients "
                                "sharded) or 3 (weights too)")
    save_every: int = option(100, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(3, "keep the newest N checkpoints (0: all)")
    eval_every: int = option(0, "held-out evaluation every N steps (0: off)")
    eval_limit: int | None = option(200, "held-out items per evaluation")
    eval_batch_size: int = option(32, "held-out evaluation batch size")
    log_every: int = option(1, "console/metrics logging interval")
    max_bad_steps: int = option(5, "stop after this many consecutive non-finite steps")
    report_to: list[str] = option([], "also log to tensorboard and/or wandb (pip install 'audio-rft[tensorboard]' / wandb)")
    threads: int = option(0, "torch CPU threads (0: leave as is)")


def parse_train_args(cls: type, argv: list[str], prog: str):
    """`--config FILE [key=value ...]`, as every command (config.parse_command). A run resumes from its newest
    complete checkpoint by itself; `--fresh` starts over."""
    def fresh(parser) -> None:
        parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in out/ and start over")

    return parse_command(cls, argv, f"audio-rft {prog}", setup=fresh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a pure function of (seed, epoch), so resuming needs no loader state."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def batch_indices(n: int, seed: int, step: int, micro: int, batch_size: int, grad_accum: int,
                  rank: int = 0, world: int = 1) -> list[int]:
    """Indices of micro-batch `micro` of optimizer step `step` for process `rank`."""
    per_step = batch_size * grad_accum * world
    start = step * per_step + micro * batch_size * world + rank * batch_size
    out = []
    for k in range(start, start + batch_size):
        epoch, offset = divmod(k, n)
        out.append(epoch_order(n, seed, epoch)[offset])
    return out


def setup_model(config: TrainConfig, layout: Layout, strategy: str, reference: bool = False):
    """Load the base (and adapter), then make exactly the intended parameters trainable.

    Returns the processor, the model and the compute dtype; the weights are loaded in engine.master_dtype
    (fp32 where 16-bit training needs fp32 master weights), and every trained one is fp32 in a 16-bit run.
    With `reference` (the method anchors to the starting policy) a LoRA run from an adapter loads that adapter
    a second time, frozen, as the reference (Engine.run_reference)."""
    from audio_rft.model import (add_lora, count_parameters, enable_gradient_checkpointing, load_model, pick_dtype,
                                 set_full_finetune)

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.lora and config.train_audio_encoder:
        raise UserError("train_audio_encoder=true needs lora=false (LoRA adapts only the language model)")
    compute = pick_dtype(config.dtype, layout.device)
    weights = master_dtype(compute, config.lora, strategy)
    # Sharded loading: under fsdp rank 0 alone reads the weights; the others build on the meta device and
    # receive their shard (engine.load_shards).
    loaded = load_model(config.model, config.adapter, str(weights).removeprefix("torch."), str(layout.device),
                        adapter_trainable=config.lora, empty_weights=strategy == "fsdp" and not layout.main)
    model = loaded.model
    if config.lora and not hasattr(model, "peft_config"):
        model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout,
                         config.lora_targets or None, config.train_projector)
    elif not config.lora:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # full fine-tuning from a LoRA warm-up: bake it in
        set_full_finetune(model, config.train_projector, config.train_audio_encoder)
    if reference and config.lora and config.adapter:
        model.load_adapter(config.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    if compute != torch.float32:
        upcast_trained(model)
    if not config.dropout:
        disable_dropout(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    total, trainable = count_parameters(model)
    logger.info("model: %s parameters, %s trainable (%s)", f"{total:,}", f"{trainable:,}", "LoRA" if config.lora else "full")
    return loaded.processor, model, compute


def optimizer_factory(config: TrainConfig, total_steps: int):
    """AdamW over the given parameters and the learning-rate schedule over it."""
    from transformers import get_scheduler

    def make(params):
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=total_steps)
        return optimizer, scheduler

    return make


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: str | Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(out).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


MANIFESTS = "manifests"


def share_of(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` hashes: every rank gets about 1/world of the bytes (largest file to the
    rank with the fewest bytes so far), the same split on every rank given the same sizes."""
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = load.index(min(load))
        load[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def listed_files(path: Path) -> dict[str, tuple[str, int]] | None:
    """Every file the COMPLETE marker vouches for, {name: (sha256, size)}, read through the per-rank manifests
    it lists (each checked against the marker's checksum); None when the marker or a manifest is missing or
    does not match."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
        if "files" in marker:  # written before per-rank manifests: the marker lists every file itself
            return {k: (v, (path / k).stat().st_size if (path / k).is_file() else -1) for k, v in marker["files"].items()}
        manifests = marker["manifests"]
        listed = {}
        for name, digest in manifests.items():
            if sha256_file(path / name) != digest:
                return None
            listed.update({k: (v[0], int(v[1])) for k, v in json.loads((path / name).read_text()).items()})
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return listed


def is_complete(path: Path, rank: int = 0, world: int = 1) -> bool:
    """A checkpoint counts only if its marker exists and every listed file matches its checksum; with `world`
    ranks each checks its share (share_of) of the bytes, so that together they check every file."""
    listed = listed_files(path)
    if listed is None:
        return False
    for name in share_of({k: size for k, (_, size) in listed.items()}, rank, world):
        digest, size = listed[name]
        file = path / name
        if not file.is_file() or file.stat().st_size != size or sha256_file(file) != digest:
            return False
    return True


def latest_checkpoint(out: str | Path) -> Path | None:
    for _, path in reversed(checkpoint_dirs(out)):
        if is_complete(path):
            return path
    return None


def verified_checkpoint(candidates: list[str], layout: Layout) -> Path | None:
    """The newest candidate every rank finds whole in its share (collective: all ranks call it alike)."""
    for candidate in candidates:
        if not layout.any(not is_complete(Path(candidate), layout.rank, layout.world)):
            return Path(candidate)
    return None


@contextmanager
def _checkpoint_dir(path: Path, layout: Layout, step: int) -> Iterator[Path]:
    """A temporary folder every rank writes into; once all have written, each rank hashes its share of the
    files (about 1/N of the bytes, in parallel: share_of) into manifests/rank-R.json, and rank 0 lists the
    manifests' checksums in the COMPLETE marker and renames the folder into place (fileio.atomic_dir).
    No rank reads more than its share: at 7B full fine-tuning the sharded fp32 state is ~100 GB."""
    if not layout.main:
        tmp = Path(layout.broadcast(None))
        yield tmp
        layout.barrier()
        _write_manifest(tmp, layout, layout.broadcast(None))
        layout.barrier()
        return
    with atomic_dir(path) as tmp:
        layout.broadcast(str(tmp))
        yield tmp
        layout.barrier()
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_manifest(tmp, layout, layout.broadcast(sizes))
        layout.barrier()
        manifests = {f"{MANIFESTS}/rank-{r}.json": sha256_file(tmp / MANIFESTS / f"rank-{r}.json") for r in range(layout.world)}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "manifests": manifests}, indent=1))


def _write_manifest(folder: Path, layout: Layout, sizes: dict[str, int]) -> None:
    mine = {name: [sha256_file(folder / name), sizes[name]] for name in share_of(sizes, layout.rank, layout.world)}
    (folder / MANIFESTS).mkdir(exist_ok=True)
    (folder / MANIFESTS / f"rank-{layout.rank}.json").write_text(json.dumps(mine, indent=1))


def save_checkpoint(path: Path, engine: Engine, processor, step: int, config: TrainConfig,
                    metrics: dict[str, Any], final: bool = False) -> Path:
    """Weights + processor + model card that Hugging Face tools load (+ the training state unless final),
    written atomically. Every rank calls it: under sharding the weights are gathered and each rank
    writes its shard of the training state."""
    weights = engine.full_weights(config.lora)
    with _checkpoint_dir(path, engine.layout, step) as tmp:
        if engine.layout.main:
            saved = {} if weights is None else {"state_dict": weights}
            if hasattr(engine.model, "peft_config"):  # the trained adapter, not the frozen reference beside it
                saved["selected_adapters"] = [engine.model.active_adapter]
            engine.model.save_pretrained(tmp, **saved)
            _plain_architecture(tmp)
            processor.save_pretrained(tmp)
            write_model_card(tmp, config, step, metrics)
        if not final:
            engine.save_state(tmp / STATE_DIR)
            if engine.layout.main:
                (tmp / STATE_DIR / "state.json").write_text(json.dumps({"step": step, "strategy": engine.strategy,
                                                                       "processes": engine.layout.world}))
    return path


def _plain_architecture(folder: Path) -> None:
    """FSDP2 renames the model's class (FSDPQwen2Audio...); the saved config names the real one."""
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if any(name.startswith("FSDP") for name in data.get("architectures") or []):
            data["architectures"] = [name.removeprefix("FSDP") for name in data["architectures"]]
            config.write_text(json.dumps(data, indent=2) + "\n")


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints that carry a COMPLETE marker. Each was verified when it was written
    (its marker lists the checksums of the files just written); re-hashing every kept checkpoint at every
    save would read tens of GB per save at 7B full fine-tuning. Resume verifies its candidate in full."""
    if keep <= 0:
        return
    complete = [p for _, p in checkpoint_dirs(out) if (p / COMPLETE).is_file()]
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def write_model_card(folder: Path, config: TrainConfig, step: int, metrics: dict[str, Any]) -> None:
    kind = type(config).__name__.replace("Config", "")
    card = [
        "---", "library_name: peft" if config.lora else "library_name: transformers",
        f"base_model: {config.model}", "tags: [audio-rft, qwen2-audio, audio-question-answering, " + kind.lower() + "]", "---",
        f"# {kind} checkpoint (step {step})", "",
        f"Trained by audio-rft from `{config.model}` on `{config.data}` with the `{config.prompt_mode}` prompt "
        f"({'LoRA' if config.lora else 'full fine-tuning'}).", "",
        "## Last metrics", "", "```json", json.dumps(metrics, indent=1, default=str), "```", "",
        "## Config", "", "```json", json.dumps(config_to_dict(config), indent=1), "```", "",
        "Load: `audio-rft infer --model BASE --adapter THIS_FOLDER ...` or "
        "`PeftModel.from_pretrained(Qwen2AudioForConditionalGeneration.from_pretrained(BASE), THIS_FOLDER)`.",
    ]
    (folder / "README.md").write_text("\n".join(card) + "\n")


class CheckpointError(UserError):
    pass


def checkpoint_or_stop(path: Path, last_good: Path | None, **kwargs) -> Path:
    """Save; on failure (disk full, ...) keep the previous checkpoint and stop with a clear message."""
    try:
        return save_checkpoint(path, **kwargs)
    except OSError as e:
        raise CheckpointError(f"writing {path} failed ({e.strerror or e}); the previous checkpoint "
                              f"{last_good or '(none)'} is intact; free space and rerun the same command to resume") from None


# ---------------------------------------------------------------- logging and guards


class MetricsLog:
    """metrics.jsonl (one line per step), plus TensorBoard / W&B when asked for (check_report_to made sure
    they are installed)."""

    def __init__(self, out: Path, resume_step: int, config: TrainConfig):
        self.path = out / "metrics.jsonl"
        for path in (self.path, out / "completions.jsonl"):  # drop lines past the checkpoint we resume from:
            if path.exists():                                 # they will be redone (and logged again)
                # split at "\n" only: splitlines() would also cut a completion at U+2028 or U+0085
                keep = [line for line in path.read_text(encoding="utf-8").split("\n")
                        if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
                atomic_write_text_lines(path, keep)
        self.writers = []
        if "tensorboard" in config.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(("tb", SummaryWriter(str(out / "tensorboard"))))
        if "wandb" in config.report_to:
            import wandb

            self.writers.append(("wandb", wandb.init(project="audio-rft", config=config_to_dict(config), dir=str(out))))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, writer in self.writers:
            if kind == "tb":
                for key, value in numbers.items():
                    writer.add_scalar(key, value, record["step"])
                writer.flush()
            else:
                writer.log(numbers, step=record["step"])

    def close(self) -> None:
        for kind, writer in self.writers:
            writer.close() if kind == "tb" else writer.finish()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def atomic_write_text_lines(path: Path, lines: list[str]) -> None:
    from audio_rft.fileio import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in lines))


class NonFiniteGuard:
    """Skip steps with a non-finite loss or gradient; stop after `limit` in a row, naming the likely causes.

    Every rank sees the same (rank-averaged) loss and global norm, so all ranks skip or step together."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def check(self, loss: float, grad_norm: float, last_good: Path | None) -> bool:
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise UserError(
                f"{self.in_a_row} non-finite steps in a row (loss {loss}, grad norm {grad_norm}); "
                f"likely causes: learning rate too high, fp16 overflow (use bf16 or fp32), corrupt audio; "
                f"last good checkpoint: {last_good or '(none)'}")
        return finite


def held_out_accuracy(engine: Engine, processor, config: TrainConfig) -> dict[str, float]:
    """Greedy accuracy (exact and MMAU rule) and format rate on eval_data: every rank taking part under sharding
    (each pass gathers), the main rank alone on the unwrapped model otherwise, with no collective (a DDP
    forward on one rank could wait for the others, e.g. to rebuild its buckets after the first backward)."""
    engine.train(False)
    if engine.sharded:
        with engine.gathered():
            return engine.run(greedy_accuracy, processor, config)
    with engine.autocast():
        return greedy_accuracy(engine.core, processor, config)


def greedy_accuracy(core, processor, config: TrainConfig) -> dict[str, float]:
    """held_out_accuracy's measurement on a plain (unwrapped) model."""
    from audio_rft.answers import completion_correct, follows_format
    from audio_rft.data.dataset import load_dataset
    from audio_rft.eval.infer import predict

    mode = "answer" if config.prompt_mode == "mixed" else config.prompt_mode
    samples = [s for s in load_dataset(config.eval_data, limit=config.eval_limit) if s.answer is not None]
    outputs = predict(core, processor, config.eval_data, samples, mode, config.eval_batch_size,
                      max_new_tokens=64 if mode == "think" else 16)
    exact = [completion_correct(t, s.answer, s.choices, "exact") for (t, _), s in zip(outputs, samples)]
    mmau = [completion_correct(t, s.answer, s.choices, "mmau") for (t, _), s in zip(outputs, samples)]
    fmt = [follows_format(t, mode) for t, _ in outputs]
    return {"eval/accuracy": float(np.mean(exact)), "eval/accuracy_mmau": float(np.mean(mmau)),
            "eval/format": float(np.mean(fmt)), "eval/n": len(samples)}


def resume_candidates(out: Path, fresh: bool) -> list[str]:
    """The checkpoints to resume from, newest first (verified_checkpoint takes the first whole one); none after
    `--fresh`, which clears them."""
    if fresh and out.exists():
        for _, path in checkpoint_dirs(out):
            shutil.rmtree(path)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "final", ignore_errors=True)
    return [str(path) for _, path in reversed(checkpoint_dirs(out))]


def run_summary(out: Path, config: TrainConfig, step: int, metrics: dict[str, Any], seconds: float,
                engine: Engine) -> None:
    atomic_write_json(out / "run.json", {"config": config_to_dict(config), "steps": step, "seconds": round(seconds, 1),
                                         "engine": json.loads(describe(engine)), "last_metrics": metrics,
                                         "final": "final"})


# ---------------------------------------------------------------- the skeleton SFT and GRPO share


@dataclass
class Run:
    """One training run: the engine, where it writes, and what it has logged and saved so far.

    A trainer is `start_run`, then per step its own method-specific passes (through `run.engine`) and
    `run.end_step(metrics)`, then `run.finish()`; setup, strategy, resume, logging from every rank,
    held-out evaluation and checkpoints live here, once for every method."""

    config: TrainConfig
    out: Path
    engine: Engine
    processor: Any
    start: int
    checkpoint: Path | None
    log: MetricsLog | None
    guard: NonFiniteGuard
    bar: Any
    began: float = field(default_factory=time.perf_counter)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return self.engine.layout

    def indices(self, n: int, step: int, micro: int) -> list[int]:
        """This rank's sample indices for micro-batch `micro` of `step`."""
        c = self.config
        return batch_indices(n, c.seed, step, micro, c.batch_size, c.grad_accum, self.layout.rank, self.layout.world)

    def optimizer_step(self, loss: float, any_gradients: bool = True, any_backward: bool = True) -> tuple[float, bool]:
        """Clip, check, step: the rank-averaged loss and the global norm decide for every rank at once.
        `any_gradients`: some rank has signal this step; `any_backward`: this rank made a backward. Returns the
        gradient norm and whether the step was applied; a skipped one changes no weight and no optimizer state
        (Engine.optimizer_step)."""
        loss = self.layout.mean(loss)
        if self.engine.strategy == "deepspeed":  # ZeRO measures the norm (and skips non-finite) inside its step
            norm = self.engine.optimizer_step(math.isfinite(loss) and any_gradients, any_backward)
            norm = 0.0 if norm is None else norm
            return norm, self.guard.check(loss, norm, self.checkpoint) and any_gradients
        norm = self.engine.clip_gradients(self.config.max_grad_norm) if any_gradients else 0.0
        applied = self.guard.check(loss, norm, self.checkpoint) and any_gradients
        self.engine.optimizer_step(applied, any_backward)
        return norm, applied

    def end_step(self, metrics: dict[str, Any]) -> None:
        """Held-out evaluation when due, then log the step and write checkpoint-N on schedule."""
        c, step = self.config, metrics["step"]
        if self.guard.in_a_row:
            metrics["skipped"] = "non-finite loss or gradient"
        if c.eval_every and c.eval_data and step % c.eval_every == 0 and (self.layout.main or self.engine.sharded):
            metrics.update(held_out_accuracy(self.engine, self.processor, c))  # sharded: every rank takes part
        self.metrics = metrics
        if self.layout.main:
            self.log.write(metrics)
        if c.save_every and step % c.save_every == 0 and step < c.max_steps:
            self.checkpoint = checkpoint_or_stop(self.out / f"checkpoint-{step}", self.checkpoint, step=step,
                                                 **self._save_args())
            if self.layout.main:
                prune_checkpoints(self.out, c.keep_checkpoints)
        self.bar.update(1)

    def finish(self) -> Path:
        """Write final/ (weights, processor, model card; no training state) and run.json."""
        self.bar.close()
        final = checkpoint_or_stop(self.out / "final", self.checkpoint, step=self.config.max_steps, final=True,
                                   **self._save_args())
        if self.layout.main:
            run_summary(self.out, self.config, self.config.max_steps, self.metrics, time.perf_counter() - self.began,
                        self.engine)
            self.log.close()
            draw_curves(self.out)
        self.layout.barrier()
        return final

    def _save_args(self) -> dict[str, Any]:
        return dict(engine=self.engine, processor=self.processor, config=self.config, metrics=self.metrics)


def draw_curves(out: Path) -> None:
    """curves.png beside metrics.jsonl; a plotting problem never fails a finished run."""
    from audio_rft.eval.curves import plot_training_curves

    try:
        plot_training_curves(out)
    except Exception as e:  # noqa: BLE001 - matplotlib and font failures alike
        logger.warning("curves.png not drawn: %s", e)


REPORTERS = {"tensorboard": ("tensorboard", "pip install 'audio-rft[tensorboard]'"), "wandb": ("wandb", "pip install wandb")}


def print_result(final: Path) -> None:
    """A training command's output, its final/ folder: once, from rank 0, however many processes ran."""
    if os.environ.get("RANK", "0") == "0":
        print(final)


def check_report_to(report_to: list[str]) -> None:
    """Asked-for loggers must be installed: a run that silently logs nowhere is found out too late."""
    import importlib.util

    for name in report_to:
        if name not in REPORTERS:
            raise UserError(f"report_to: unknown logger {name!r}; choose from {', '.join(REPORTERS)} (or [] for none)")
        module, install = REPORTERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"report_to={name} needs {module}, which is not installed: {install} (or report_to=[])")


def start_run(config: TrainConfig, fresh: bool, schedule_steps: int, desc: str, reference: bool = False) -> Run:
    """Processes, model, strategy, optimizer, resume from the newest complete checkpoint, logs. `reference`: the
    method compares with the starting policy (Engine.run_reference)."""
    check_report_to(config.report_to)
    layout = process_layout(config)
    strategy = resolve_strategy(config.strategy, layout.world)
    seed_everything(config.seed)
    processor, model, compute = setup_model(config, layout, strategy, reference)
    engine = build_engine(config, layout, model, compute, optimizer_factory(config, schedule_steps), reference)
    seed_dropout(config.seed, layout.rank)
    out = Path(config.out)
    checkpoint = verified_checkpoint(layout.broadcast(resume_candidates(out, fresh) if layout.main else None), layout)
    start = 0
    if checkpoint is not None:
        engine.load_state(Path(checkpoint) / STATE_DIR)
        start = int(json.loads((Path(checkpoint) / STATE_DIR / "state.json").read_text())["step"])
        logger.info("resuming from %s (step %d)", checkpoint, start)
    if layout.main:
        out.mkdir(parents=True, exist_ok=True)
    if layout.world > 1 or strategy != "none":
        logger.info("engine: %s", describe(engine))
    layout.barrier()
    log = MetricsLog(out, start, config) if layout.main else None
    bar = tqdm(total=config.max_steps, initial=start, desc=desc, unit="step", disable=not layout.main)
    return Run(config, out, engine, processor, start, None if checkpoint is None else Path(checkpoint), log,
               NonFiniteGuard(config.max_bad_steps), bar)


def oom_advice(kind: str) -> str:
    return (f"GPU out of memory during {kind}; lower batch_size"
            + (" or num_generations / max_completion_length" if kind == "GRPO" else "")
            + ", set gradient_checkpointing=true, use dtype=bf16 and LoRA, or run `audio-rft plan` to size it")
