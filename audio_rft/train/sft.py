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

from audio_rft import UserError
from audio_rft.config import option
from audio_rft.train.common import TrainConfig, oom_advice, parse_train_args, print_result, start_run


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
    texts = [target_text(s, m) + "<|im_end|>" for s, m in zip(samples, modes)]
    return right_padded(processor.tokenizer, texts, limit, "a target", "max_target_tokens")


def right_padded(tokenizer, texts: list[str], limit: int, what: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of `texts`, right-padded, and their mask; a text over `limit` tokens is refused, not cut."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    longest = max(map(len, rows))
    if longest > limit:
        raise UserError(f"{what} has {longest} tokens, over {key}={limit}")
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def sft_inputs(processor, folder: str, samples, config: SFTConfig, device) -> tuple:
    """The prompt batch and the target ids and mask of a micro-batch (tokenizing and featurizing: no model)."""
    from audio_rft.rollout import encode_prompts, load_waveforms

    modes = sample_modes(samples, config.prompt_mode)
    batch = encode_prompts(processor, samples, load_waveforms(folder, samples), modes).to(device)
    ids, mask = (t.to(device) for t in target_batch(processor, samples, modes, config.max_target_tokens))
    return batch, ids, mask


def sft_nll(core, batch, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the target tokens given audio + prompt, and how many tokens."""
    from audio_rft.rollout import completion_logprobs

    from audio_rft.compat import is_fake

    logprobs = completion_logprobs(core, batch, ids, 1)
    if is_fake(mask):  # a traced step (audio_rft.trace): no values to count; every target token is real there
        return -(logprobs * mask).sum() / mask.numel(), mask.numel()
    tokens = int(mask.sum())
    return -(logprobs * mask).sum() / tokens, tokens


def sft_loss(core, processor, folder: str, samples, config: SFTConfig) -> tuple[torch.Tensor, int]:
    """sft_nll of a micro-batch of samples."""
    return sft_nll(core, *sft_inputs(processor, folder, samples, config, core.device))


def train_sft(config: SFTConfig, fresh: bool = False) -> Path:
    """Fine-tune on `config.data`; resumes from the latest complete checkpoint in `config.out`."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.prompts import check_mode

    if config.prompt_mode != "mixed":
        check_mode(config.prompt_mode)
    if not (config.model and config.data and config.out):
        raise UserError("sft needs model, data and out (e.g. `audio-rft sft model=M data=D out=O`)")
    samples = [s for s in load_dataset(config.data) if s.answer is not None]
    if config.prompt_mode in ("think", "mixed") and not all(s.reasoning for s in samples):
        missing = next(s.id for s in samples if not s.reasoning)
        raise UserError(f"{config.data}: sample {missing!r} has no 'reasoning', which think-mode SFT targets need")
    run = start_run(config, fresh, config.max_steps, "sft")
    engine = run.engine
    for step in range(run.start, config.max_steps):
        step_began, loss_sum, token_count = time.perf_counter(), 0.0, 0
        engine.train(True)  # again each step: held-out evaluation leaves it in eval mode
        try:
            micro_inputs = [sft_inputs(run.processor, config.data, [samples[i] for i in run.indices(len(samples), step, micro)],
                                       config, run.layout.device) for micro in range(config.grad_accum)]
            # The loss is the mean over every target token of the step, on all ranks and micro-batches
            # together, so the gradient does not depend on how the batch is split (the engine averages ranks).
            step_tokens = sum(run.layout.gather_objects(sum(int(mask.sum()) for _, _, mask in micro_inputs)))
            for micro, inputs in enumerate(micro_inputs):
                engine.sync_gradients(micro == config.grad_accum - 1)
                loss, tokens = engine.run(sft_nll, *inputs)
                share = tokens * run.layout.world / step_tokens
                engine.backward(loss * share)
                loss_sum, token_count = loss_sum + float(loss.detach()) * share, token_count + tokens
            norm, _ = run.optimizer_step(loss_sum)
        except torch.cuda.OutOfMemoryError:
            raise UserError(oom_advice("SFT")) from None
        seconds = time.perf_counter() - step_began
        run.bar.set_postfix(loss=f"{loss_sum:.3f}")
        run.end_step({"step": step + 1, "loss": run.layout.mean(loss_sum), "grad_norm": norm, "lr": engine.lr(),
                      "tokens_per_second": run.layout.mean(token_count / seconds) * run.layout.world,
                      "step_seconds": seconds})
    return run.finish()


def run_argv(argv: list[str]) -> int:
    """`audio-rft sft --config FILE [key=value ...]`."""
    config, flags = parse_train_args(SFTConfig, argv, "sft")
    print_result(train_sft(config, fresh=flags.fresh))
    return 0
