"""Preference optimisation on the audio questions: `audio-rft prefer method=dpo|kto|orpo|bnf`.

The data is what `audio-rft pairs` wrote: pairs.jsonl for DPO and ORPO, singles.jsonl for KTO and BNF.
Each prompt (audio + question) is prefilled once and its completions scored in one pass
(rollout.completion_logprobs):

- dpo, orpo: [chosen, rejected] per prompt (num_generations=2);
- kto: [the single's completion, the previous single's completion], the second being KTO's
  mismatched pair for the reference point z0 (TRL's KTOTrainer pairs them the same way); the policy
  scores the mismatched completions in a second pass without gradients, as TRL does, since z0 is detached;
- bnf: the single's completion, with the V-wide term Σ_v p log p at each of its tokens.

The reference policy is the starting policy (Engine.run_reference): the base with the LoRA adapter
disabled, a frozen copy of the starting adapter (`adapter=`), or a frozen copy under full fine-tuning;
ORPO needs none. The losses live in preference_losses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from audio_rft import UserError
from audio_rft.config import option
from audio_rft.train.common import TrainConfig, oom_advice, parse_train_args, print_result, start_run
from audio_rft.train.preference_losses import (METHODS, bnf_loss, dpo_loss, kto_loss, kto_reference_point,
                                               mean_token_nll, orpo_loss, sequence_logps)

STOP = "<|im_end|>"
NLL_TOKENS = ("completion", "all")
SINGLES = ("kto", "bnf")  # methods trained on singles.jsonl (labelled answers), not pairs


@dataclass
class PreferConfig(TrainConfig):
    method: str = option("dpo", "dpo, kto, orpo or bnf")
    pairs: str = option("", "folder written by `audio-rft pairs` (data defaults to the dataset it was built from)")
    lr: float = option(5e-5, "peak learning rate (LoRA; TRL's DPO default 1e-6 is for full fine-tuning)")
    batch_size: int = option(4, "pairs (kto, bnf: singles; kto at least 2) per device per micro-batch")
    beta: float = option(0.1, "β of DPO and KTO (TRL's default)")
    desirable_weight: float = option(1.0, "KTO λ_D")
    undesirable_weight: float = option(1.0, "KTO λ_U")
    orpo_lambda: float = option(0.1, "ORPO λ, the odds-ratio term's weight (TRL's ORPOConfig beta)")
    nll_tokens: str = option("completion", "ORPO's NLL span: completion (the answer tokens, what SFT trains) or all "
                                           "(the prompt's text tokens too, as TRL and the ORPO authors' code)")
    max_completion_tokens: int = option(128, "completion length limit in tokens (longer ones are refused)")
    max_prompt_tokens: int = option(2048, "refuse longer prompts (audio tokens are never cut)")


def completion_batch(processor, texts: list[str], stopped: list[bool], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids and mask; a completion that stopped gets its stop token back."""
    from audio_rft.train.sft import right_padded

    # An empty completion that did not stop has no token to score: it is scored as stopping at once.
    texts = [text + (STOP if stop or not text else "") for text, stop in zip(texts, stopped)]
    return right_padded(processor.tokenizer, texts, limit, "a completion", "max_completion_tokens")


def prefer_inputs(processor, folder: str, by_id: dict, items: list[dict], method: str, config: PreferConfig, device):
    """The prompt batch and the completions: two per prompt, interleaved [a0, b0, a1, b1, ...] (bnf: one)."""
    from audio_rft.rollout import encode_prompts, load_waveforms

    samples = [by_id[item["id"]] for item in items]
    batch = encode_prompts(processor, samples, load_waveforms(folder, samples), [i["prompt_mode"] for i in items],
                           config.max_prompt_tokens)
    if method in SINGLES:
        first = [(i["completion"], i["stopped"]) for i in items]
        second = first[-1:] + first[:-1] if method == "kto" else []  # the previous item's: a mismatched pair
    else:
        first = [(i["chosen"], i["chosen_stopped"]) for i in items]
        second = [(i["rejected"], i["rejected_stopped"]) for i in items]
    both = [x for pair in zip(first, second) for x in pair] if second else first
    ids, mask = completion_batch(processor, [t for t, _ in both], [s for _, s in both], config.max_completion_tokens)
    return batch.to(device), ids.to(device), mask.to(device)


def policy_logps(engine, config: PreferConfig, batch, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The policy's token log-probs in prefer_inputs' layout, and what else the method's loss needs."""
    from audio_rft.rollout import completion_logprobs

    if config.method == "bnf":
        logps, neg_entropy = engine.run(completion_logprobs, batch, ids, 1, with_neg_entropy=True)
        return logps, {"neg_entropy": neg_entropy}
    if config.method == "kto":  # the mismatched completions only feed the detached z0: scored without a graph
        with torch.no_grad():
            mismatched = engine.run(completion_logprobs, batch, ids[1::2], 1)
        own = engine.run(completion_logprobs, batch, ids[0::2], 1)
        return torch.stack([own, mismatched], 1).flatten(0, 1), {}
    if config.method == "orpo" and config.nll_tokens == "all":
        logps, prompt = engine.run(_with_prompt_logprobs, batch, ids)  # one engine pass: DDP syncs once
        return logps, {"prompt": prompt}
    return engine.run(completion_logprobs, batch, ids, 2), {}


def _with_prompt_logprobs(core, batch, ids):
    from audio_rft.rollout import completion_logprobs, prompt_logprobs

    return completion_logprobs(core, batch, ids, 2), prompt_logprobs(core, batch)


def method_loss(config: PreferConfig, layout, items: list[dict], logps: torch.Tensor, ref_logps: torch.Tensor | None,
                mask: torch.Tensor, neg_entropy: torch.Tensor | None = None,
                prompt: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's loss and what the step logs: implicit rewards of the chosen (kto, bnf: desirable) and
    rejected (undesirable) completions, and per example whether its reward is on the right side.
    `logps`, `ref_logps`: token log-probs (N, L); `prompt`: ORPO's prompt token log-probs and mask (nll_tokens=all)."""
    total, mean = sequence_logps(logps, mask)
    if config.method == "bnf":
        desirable = torch.tensor([bool(i["label"]) for i in items], device=logps.device)
        losses, target = bnf_loss(logps, ref_logps, neg_entropy, mask, desirable)
        rewards = (total - sequence_logps(ref_logps, mask)[0]).detach()  # log π/π_ref of the response
        return losses.mean(), {"chosen": rewards[desirable], "rejected": rewards[~desirable],
                               "correct": (rewards > 0) == desirable, "bnf/target": target}
    a, b = total[0::2], total[1::2]
    if config.method == "orpo":
        if prompt is None:
            nll = mean_token_nll(logps[0::2], mask[0::2])
        else:  # the chosen sequence whole: the prompt's text tokens, then the completion's
            nll = mean_token_nll(torch.cat([prompt[0], logps[0::2]], 1), torch.cat([prompt[1], mask[0::2].bool()], 1))
        loss, log_odds, chosen, rejected = orpo_loss(mean[0::2], mean[1::2], nll, config.orpo_lambda)
        return loss, {"chosen": chosen, "rejected": rejected, "correct": chosen > rejected,
                      "orpo/nll": nll.detach()[None], "orpo/log_odds": log_odds.detach(),
                      "logps/chosen": a.detach(), "logps/rejected": b.detach()}
    ref_total = sequence_logps(ref_logps, mask)[0]
    ref_a, ref_b = ref_total[0::2], ref_total[1::2]
    if config.method == "dpo":
        losses, chosen, rejected = dpo_loss(a, b, ref_a, ref_b, config.beta)
        return losses.mean(), {"chosen": chosen, "rejected": rejected, "correct": chosen > rejected,
                               "logps/chosen": a.detach(), "logps/rejected": b.detach()}
    # KTO: z0 over the whole batch of every process, as TRL gathers it (detached: no collective in backward)
    z0 = kto_reference_point(layout.gather(b - ref_b)).to(a.device)
    desirable = torch.tensor([bool(i["label"]) for i in items], device=a.device)
    losses, rewards = kto_loss(a, ref_a, desirable, z0, config.beta, config.desirable_weight, config.undesirable_weight)
    return losses.mean(), {"chosen": rewards[desirable], "rejected": rewards[~desirable],
                           "correct": (rewards > 0) == desirable, "kto/z0": z0[None]}


def summarize(layout, parts: list[dict[str, torch.Tensor]]) -> dict[str, float | None]:
    """Means over every micro-batch of every process; rewards/margin = mean chosen − mean rejected."""
    out = {}
    for key in parts[0]:
        values = layout.gather(torch.cat([p[key].float().flatten().cpu() for p in parts]))
        out[key] = float(values.mean()) if len(values) else None
    chosen, rejected = out.pop("chosen"), out.pop("rejected")
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margin": None if chosen is None or rejected is None else chosen - rejected,
            "rewards/accuracy": out.pop("correct"), **out}


def load_items(config: PreferConfig) -> tuple[list[dict], str]:
    """The pairs (kto, bnf: singles) and the dataset folder they were built from."""
    from audio_rft.train.pairs import read_jsonl

    folder = Path(config.pairs)
    if not (folder / "manifest.json").is_file():
        raise UserError(f"{folder}: no manifest.json (run `audio-rft pairs` first)")
    manifest = json.loads((folder / "manifest.json").read_text())
    singles = config.method in SINGLES
    items = read_jsonl(folder / ("singles.jsonl" if singles else "pairs.jsonl"))
    if not items:
        raise UserError(f"{folder}: no {'singles' if singles else 'pairs'} "
                        f"(unpaired: {manifest.get('unpaired')}); sample more questions or more generations")
    return items, config.data or manifest["data"]


def train_prefer(config: PreferConfig, fresh: bool = False) -> Path:
    """Preference-optimise on `config.pairs`; resumes from the latest complete checkpoint in `config.out`."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.rollout import completion_logprobs, with_audio_encoded

    if config.method not in METHODS:
        raise UserError(f"method {config.method!r}: choose {', '.join(METHODS)}")
    if config.nll_tokens not in NLL_TOKENS:
        raise UserError(f"nll_tokens {config.nll_tokens!r}: choose {' or '.join(NLL_TOKENS)}")
    if not (config.model and config.pairs and config.out):
        raise UserError("prefer needs model, pairs and out (e.g. `audio-rft prefer method=dpo model=M pairs=P out=O`)")
    if config.method == "kto" and config.batch_size < 2:
        raise UserError("kto needs batch_size of at least 2 (z0 pairs each completion with another prompt)")
    items, config.data = load_items(config)
    by_id = {s.id: s for s in load_dataset(config.data)}
    missing = next((i["id"] for i in items if i["id"] not in by_id), None)
    if missing is not None:
        raise UserError(f"{config.pairs}: sample {missing!r} is not in {config.data}")
    reference = config.method != "orpo"
    repeats = 1 if config.method == "bnf" else 2  # completions per prompt in prefer_inputs' layout
    run = start_run(config, fresh, config.max_steps, f"prefer {config.method}", reference=reference)
    engine, layout = run.engine, run.layout
    for step in range(run.start, config.max_steps):
        step_began, loss_sum, parts = time.perf_counter(), 0.0, []
        try:
            for micro in range(config.grad_accum):
                engine.sync_gradients(micro == config.grad_accum - 1)
                batch_items = [items[i] for i in run.indices(len(items), step, micro)]
                batch, ids, mask = prefer_inputs(run.processor, config.data, by_id, batch_items, config.method, config,
                                                 layout.device)
                engine.train(False)  # a frozen audio tower runs once, without dropout, for both passes
                batch = engine.run(with_audio_encoded, batch)
                engine.train(True)  # the reference and the policy pass under one dropout rule
                ref_logps = None
                if reference:
                    with torch.no_grad():
                        ref_logps = engine.run_reference(completion_logprobs, batch, ids, repeats)
                logps, needs = policy_logps(engine, config, batch, ids)
                loss, stats = method_loss(config, layout, batch_items, logps, ref_logps, mask, **needs)
                engine.backward(loss / config.grad_accum)
                loss_sum += float(loss.detach()) / config.grad_accum
                parts.append(stats)
            norm, _ = run.optimizer_step(loss_sum)
        except torch.cuda.OutOfMemoryError:
            raise UserError(oom_advice("preference optimisation")) from None
        metrics = {"step": step + 1, "loss": layout.mean(loss_sum), **summarize(layout, parts),
                   "grad_norm": norm, "lr": engine.lr(), "step_seconds": time.perf_counter() - step_began}
        run.bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        run.end_step(metrics)
    return run.finish()


def run_argv(argv: list[str]) -> int:
    """`audio-rft prefer --config FILE [key=value ...]`."""
    config, flags = parse_train_args(PreferConfig, argv, "prefer")
    print_result(train_prefer(config, fresh=flags.fresh))
    return 0
