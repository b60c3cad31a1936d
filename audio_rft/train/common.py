"""What SFT and GRPO share: the config keys, model setup, data order, checkpoints, metrics, guards.

A checkpoint is what Hugging Face tools load (a PEFT adapter or full weights, plus the processor and a
model card) with the training state beside it. It is written to a temporary folder and renamed into
place after a `COMPLETE` marker listing every file's checksum, so a crash mid-save never leaves a
checkpoint that looks whole, and resuming from it restores optimizer, scheduler, RNG and step exactly.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audio_rft import UserError
from audio_rft.config import config_help, config_to_dict, load_config, option
from audio_rft.fileio import atomic_dir, atomic_write_json, sha256_file

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
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: list[str] = option([], "LoRA target modules (default: the language model's attention and MLP projections)")
    train_projector: bool = option(False, "also train the audio projector")
    train_audio_encoder: bool = option(False, "also train the audio encoder and projector (full fine-tuning only; "
                                              "for building a base from scratch, as the demo's warm-up does)")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    device: str = option("auto", "auto, cpu, cuda")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (GPU memory saver)")
    save_every: int = option(100, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(3, "keep the newest N checkpoints (0: all)")
    eval_every: int = option(0, "held-out evaluation every N steps (0: off)")
    eval_limit: int | None = option(200, "held-out items per evaluation")
    eval_batch_size: int = option(32, "held-out evaluation batch size")
    log_every: int = option(1, "console/metrics logging interval")
    max_bad_steps: int = option(5, "stop after this many consecutive non-finite steps")
    report_to: list[str] = option(["tensorboard"], "tensorboard and/or wandb (ignored when not installed)")
    threads: int = option(0, "torch CPU threads (0: leave as is)")


def parse_train_args(cls: type, argv: list[str], prog: str):
    """`--config FILE [key=value ...]` (bare key=value works without a file); `--help` lists every key."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"audio-rft {prog}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_help(cls))
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (the default when one exists)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in out/ and start over")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides), args


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


def setup_model(config: TrainConfig, device: str | None = None):
    """Load the base (and adapter), then make exactly the intended parameters trainable."""
    from audio_rft.model import add_lora, count_parameters, load_model, set_full_finetune

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.lora and config.train_audio_encoder:
        raise UserError("train_audio_encoder=true needs lora=false (LoRA adapts only the language model)")
    loaded = load_model(config.model, config.adapter, config.dtype, device or config.device, adapter_trainable=config.lora)
    model = loaded.model
    if config.lora and not hasattr(model, "peft_config"):
        model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout,
                         config.lora_targets or None, config.train_projector)
    elif not config.lora:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # full fine-tuning from a LoRA warm-up: bake it in
        set_full_finetune(model, config.train_projector, config.train_audio_encoder)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    total, trainable = count_parameters(model)
    print(f"model: {total:,} parameters, {trainable:,} trainable ({'LoRA' if config.lora else 'full'})", file=sys.stderr)
    return loaded.processor, model


def make_optimizer(model, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: str | Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(out).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete(path: Path) -> bool:
    """A checkpoint counts only if its marker exists and every listed file matches its checksum."""
    marker = path / COMPLETE
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() and sha256_file(path / name) == digest for name, digest in listed.items())


def latest_checkpoint(out: str | Path) -> Path | None:
    for _, path in reversed(checkpoint_dirs(out)):
        if is_complete(path):
            return path
    return None


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2])}


def save_checkpoint(path: Path, model, processor, optimizer, scheduler, step: int, config: TrainConfig,
                    metrics: dict[str, Any], generator: torch.Generator | None = None, final: bool = False) -> Path:
    """Write weights + processor + model card (+ training state unless final) atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_model_card(tmp, config, step, metrics)
        if not final:
            state = tmp / STATE_DIR
            state.mkdir()
            torch.save(optimizer.state_dict(), state / "optimizer.pt")
            torch.save(scheduler.state_dict(), state / "scheduler.pt")
            tensors = {"torch": torch.get_rng_state()}
            if generator is not None:
                tensors["sampler"] = generator.get_state()
            torch.save(tensors, state / "rng.pt")
            (state / "state.json").write_text(json.dumps({"step": step, "rng": _rng_state()}))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1))
    return path


def load_training_state(path: Path, optimizer, scheduler, generator: torch.Generator | None) -> int:
    """Restore optimizer, scheduler and RNG; return the step the checkpoint was taken after."""
    state = path / STATE_DIR
    optimizer.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(state / "scheduler.pt", weights_only=True))
    tensors = torch.load(state / "rng.pt", weights_only=True)
    torch.set_rng_state(tensors["torch"])
    if generator is not None and "sampler" in tensors:
        generator.set_state(tensors["sampler"])
    meta = json.loads((state / "state.json").read_text())
    python_state = meta["rng"]["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np.random.set_state(("MT19937", np.array(meta["rng"]["numpy"], dtype=np.uint32), meta["rng"]["numpy_pos"]))
    return int(meta["step"])


def restore_weights(model, path: Path, lora: bool) -> None:
    """Load a checkpoint's trainable weights into the in-memory model (strictly: nothing silently skipped)."""
    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{path}: adapter does not match the model ({result.unexpected_keys[:3]} ...)")
    else:
        from transformers import Qwen2AudioForConditionalGeneration

        # save_pretrained may rename keys on disk; loading through from_pretrained maps them back.
        saved = Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict(), strict=True)


def prune_checkpoints(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = [p for _, p in checkpoint_dirs(out) if is_complete(p)]
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
    """metrics.jsonl (one line per step), plus TensorBoard / W&B when installed and asked for."""

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
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writers.append(("tb", SummaryWriter(str(out / "tensorboard"))))
            except ImportError:
                pass
        if "wandb" in config.report_to:
            try:
                import wandb

                self.writers.append(("wandb", wandb.init(project="audio-rft", config=config_to_dict(config), dir=str(out))))
            except ImportError:
                print("report_to=wandb but wandb is not installed; skipping", file=sys.stderr)

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
    """Skip steps with a non-finite loss or gradient; stop after `limit` in a row, naming the likely causes."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | float, last_good: Path | None) -> bool:
        finite = bool(torch.isfinite(loss)) and math.isfinite(float(grad_norm))
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise UserError(
                f"{self.in_a_row} non-finite steps in a row (loss {float(loss)}, grad norm {float(grad_norm)}); "
                f"likely causes: learning rate too high, fp16 overflow (use bf16 or fp32), corrupt audio; "
                f"last good checkpoint: {last_good or '(none)'}")
        return finite


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def sync_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average gradients across processes by hand: our forward calls submodules, which DDP's wrapper would not see."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def held_out_accuracy(model, processor, config: TrainConfig) -> dict[str, float]:
    """Greedy accuracy (exact and MMAU rule) and format rate on eval_data."""
    from audio_rft.answers import extract_answer, follows_format, is_correct
    from audio_rft.data.dataset import load_dataset
    from audio_rft.eval.infer import predict
    from audio_rft.model import core_model

    mode = "answer" if config.prompt_mode == "mixed" else config.prompt_mode
    samples = [s for s in load_dataset(config.eval_data, limit=config.eval_limit) if s.answer is not None]
    outputs = predict(core_model(model), processor, config.eval_data, samples, mode,
                      config.eval_batch_size, max_new_tokens=64 if mode == "think" else 16)
    exact = [is_correct(extract_answer(t), s.answer, s.choices, "exact") for (t, _), s in zip(outputs, samples)]
    mmau = [is_correct(extract_answer(t), s.answer, s.choices, "mmau") for (t, _), s in zip(outputs, samples)]
    fmt = [follows_format(t, mode) for t, _ in outputs]
    return {"eval/accuracy": float(np.mean(exact)), "eval/accuracy_mmau": float(np.mean(mmau)),
            "eval/format": float(np.mean(fmt)), "eval/n": len(samples)}


def resume_point(out: Path, fresh: bool) -> Path | None:
    if fresh and out.exists():
        for _, path in checkpoint_dirs(out):
            shutil.rmtree(path)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "final", ignore_errors=True)
    return latest_checkpoint(out)


def run_summary(out: Path, config: TrainConfig, step: int, metrics: dict[str, Any], seconds: float) -> None:
    atomic_write_json(out / "run.json", {"config": config_to_dict(config), "steps": step, "seconds": round(seconds, 1),
                                         "last_metrics": metrics, "final": "final"})


def resume_training(config: TrainConfig, out: Path, fresh: bool, accelerator, model, optimizer,
                    scheduler) -> tuple[Path | None, int]:
    """Restore weights, optimizer, scheduler and RNG from the newest complete checkpoint (none after
    --fresh); returns it and the step to continue from."""
    checkpoint = resume_point(out, fresh and accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if checkpoint is None:
        return None, 0
    restore_weights(model, checkpoint, config.lora)
    start = load_training_state(checkpoint, optimizer, scheduler, None)
    print(f"resuming from {checkpoint} (step {start})", file=sys.stderr)
    return checkpoint, start


def log_and_checkpoint(out: Path, config: TrainConfig, metrics: dict[str, Any], log: "MetricsLog",
                       checkpoint: Path | None, **state) -> Path | None:
    """Log one step; on schedule, write checkpoint-N (model, processor, optimizer, scheduler in `state`).
    Returns the newest complete checkpoint."""
    log.write(metrics)
    step = metrics["step"]
    if config.save_every and step % config.save_every == 0 and step < config.max_steps:
        checkpoint = checkpoint_or_stop(out / f"checkpoint-{step}", checkpoint, step=step, config=config,
                                        metrics=metrics, **state)
        prune_checkpoints(out, config.keep_checkpoints)
    return checkpoint


def finish_training(out: Path, config: TrainConfig, metrics: dict[str, Any], log: "MetricsLog",
                    checkpoint: Path | None, seconds: float, **state) -> Path:
    """Write final/ (weights, processor, model card; no training state) and run.json."""
    final = checkpoint_or_stop(out / "final", checkpoint, step=config.max_steps, config=config, metrics=metrics,
                               final=True, **state)
    run_summary(out, config, config.max_steps, metrics, seconds)
    log.close()
    return final


def make_accelerator(config: TrainConfig):
    """Process layout from `accelerate launch` (one process when run plainly)."""
    from accelerate import Accelerator

    return Accelerator(cpu=config.device == "cpu" or not torch.cuda.is_available())


def oom_advice(kind: str) -> str:
    return (f"GPU out of memory during {kind}; lower batch_size"
            + (" or num_generations / max_completion_length" if kind == "GRPO" else "")
            + ", set gradient_checkpointing=true, use dtype=bf16 and LoRA, or run `audio-rft plan` to size it")
