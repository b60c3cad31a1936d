"""SFT, the baseline the paper beats: same data, same prompts, LoRA or full, loss on the target tokens only.

Targets by prompt mode: direct -> the answer text; answer -> <answer>X</answer>;
think -> <think>R</think><answer>X</answer> (R is the sample's `reasoning`). Each target ends with
<|im_end|> so the model learns to stop.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from audio_rft import UserError
from audio_rft.config import option
from audio_rft.train.common import (
    MetricsLog, NonFiniteGuard, TrainConfig, batch_indices, finish_training, grad_norm_and_clip,
    held_out_accuracy, log_and_checkpoint, make_accelerator, make_optimizer, oom_advice,
    parse_train_args, resume_training, seed_everything, setup_model, sync_gradients,
)


@dataclass
class SFTConfig(TrainConfig):
    prompt_mode: str = option("answer", "prompt mode: direct, answer, think, or mixed (all three, spread by sample id)")
    lr: float = option(3e-4, "peak learning rate (LoRA; use ~1e-5 for full fine-tuning of the 7B)")
    max_target_tokens: int = option(96, "target length limit in tokens (longer targets are refused)")


def sample_modes(samples, mode: str) -> list[str]:
    """One prompt mode per sample; `mixed` spreads direct/answer/think by id, so a warm-up teaches all three."""
    from audio_rft.prompts import PROMPT_MODES

    if mode != "mixed":
        return [mode] * len(samples)
    return [PROMPT_MODES[int(hashlib.sha1(s.id.encode()).hexdigest(), 16) % len(PROMPT_MODES)] for s in samples]


def target_batch(processor, samples, modes: str | list[str], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target ids and mask, each target closed by <|im_end|>; one mode or one per sample."""
    from audio_rft.prompts import target_text

    modes = [modes] * len(samples) if isinstance(modes, str) else modes
    tokenizer = processor.tokenizer
    rows = [tokenizer(target_text(s, m) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            for s, m in zip(samples, modes)]
    longest = max(map(len, rows))
    if longest > limit:
        raise UserError(f"a target has {longest} tokens, over max_target_tokens={limit}")
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def sft_loss(core, processor, folder: str, samples, config: SFTConfig) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the target tokens given audio + prompt."""
    from audio_rft.rollout import completion_logprobs, encode_prompts, load_waveforms

    modes = sample_modes(samples, config.prompt_mode)
    batch = encode_prompts(processor, samples, load_waveforms(folder, samples), modes).to(core.device)
    ids, mask = (t.to(core.device) for t in target_batch(processor, samples, modes, config.max_target_tokens))
    logprobs = completion_logprobs(core, batch, ids, 1, shared_prefix=not config.gradient_checkpointing)
    tokens = int(mask.sum())
    return -(logprobs * mask).sum() / tokens, tokens


def train_sft(config: SFTConfig, fresh: bool = False) -> Path:
    """Fine-tune on `config.data`; resumes from the latest complete checkpoint in `config.out`."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.model import core_model
    from audio_rft.prompts import check_mode

    if config.prompt_mode != "mixed":
        check_mode(config.prompt_mode)
    if not (config.model and config.data and config.out):
        raise UserError("sft needs model, data and out (e.g. `audio-rft sft model=M data=D out=O`)")
    out = Path(config.out)
    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    samples = [s for s in load_dataset(config.data) if s.answer is not None]
    if config.prompt_mode in ("think", "mixed") and not all(s.reasoning for s in samples):
        missing = next(s.id for s in samples if not s.reasoning)
        raise UserError(f"{config.data}: sample {missing!r} has no 'reasoning', which think-mode SFT targets need")
    seed_everything(config.seed)
    processor, model = setup_model(config, device=str(accelerator.device))
    core = core_model(model)
    core.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(model, config, config.max_steps)
    state = dict(model=model, processor=processor, optimizer=optimizer, scheduler=scheduler)
    checkpoint, start = resume_training(config, out, fresh, accelerator, model, optimizer, scheduler)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, start, config) if main else None
    guard, metrics, began = NonFiniteGuard(config.max_bad_steps), {}, time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=start, desc="sft", unit="step", disable=not main)
    for step in range(start, config.max_steps):
        step_began, loss_sum, token_count = time.perf_counter(), 0.0, 0
        try:
            for micro in range(config.grad_accum):
                idx = batch_indices(len(samples), config.seed, step, micro, config.batch_size, config.grad_accum,
                                    accelerator.process_index, accelerator.num_processes)
                loss, tokens = sft_loss(core, processor, config.data, [samples[i] for i in idx], config)
                (loss / config.grad_accum).backward()
                loss_sum, token_count = loss_sum + float(loss.detach()) / config.grad_accum, token_count + tokens
        except torch.cuda.OutOfMemoryError:
            raise UserError(oom_advice("SFT")) from None
        sync_gradients(accelerator, params)
        norm = grad_norm_and_clip(params, config.max_grad_norm)
        if guard.check(torch.tensor(loss_sum), norm, checkpoint):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        seconds = time.perf_counter() - step_began
        metrics = {"step": step + 1, "loss": loss_sum, "grad_norm": float(norm), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_second": token_count / seconds, "step_seconds": seconds,
                   **({} if guard.in_a_row == 0 else {"skipped": "non-finite loss or gradient"})}
        if config.eval_every and config.eval_data and (step + 1) % config.eval_every == 0 and main:
            metrics.update(held_out_accuracy(model, processor, config))
        if main:
            checkpoint = log_and_checkpoint(out, config, metrics, log, checkpoint, **state)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", **({"acc": f"{metrics['eval/accuracy']:.2f}"} if "eval/accuracy" in metrics else {}))
    bar.close()
    if main:
        return finish_training(out, config, metrics, log, checkpoint, time.perf_counter() - began, **state)
    return out / "final"


def run_argv(argv: list[str]) -> int:
    """`audio-rft sft --config FILE [key=value ...]`."""
    config, flags = parse_train_args(SFTConfig, argv, "sft")
    print(train_sft(config, fresh=flags.fresh))
    return 0
