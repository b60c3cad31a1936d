"""GRPO for Qwen2-Audio, readable top to bottom: sample G answers per audio question, reward them,
normalise rewards within each group, and take a clipped policy-gradient step (docs/design.md, "One GRPO step").

TRL's GRPOTrainer takes no audio; this loop does, and encodes each clip and prompt once for all G
completions (audio_rft.rollout). Defaults are R1-AQA's, with a LoRA learning rate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from audio_rft import UserError
from audio_rft.compat import is_fake
from audio_rft.config import option
from audio_rft.train.common import TrainConfig, oom_advice, parse_train_args, print_result, start_run

LOSS_TYPES = ("sequence", "token", "constant", "dapo", "cispo")
GLOBAL_TOKEN_LOSSES = ("dapo", "cispo")  # normalised by the active tokens of the whole accumulated batch
IMPORTANCE_SAMPLING = ("token", "sequence")


@dataclass
class GRPOConfig(TrainConfig):
    batch_size: int = option(1, "prompts per device per micro-batch (R1-AQA: 1)")
    grad_accum: int = option(2, "micro-batches per optimizer step (R1-AQA: 2)")
    max_steps: int = option(1000, "rollout steps (R1-AQA: 1,000)")
    save_every: int = option(100, "checkpoint every N steps (R1-AQA: 100)")
    lr: float = option(1e-5, "peak learning rate (R1-AQA full fine-tuning: 1e-6; LoRA needs more)")
    num_generations: int = option(8, "G: completions sampled per prompt")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling mass")
    max_completion_length: int = option(32, "completion length limit in tokens (think needs more)")
    max_prompt_tokens: int = option(2048, "refuse longer prompts (audio tokens are never cut)")
    rewards: list[str] = option(["accuracy", "format"], "reward functions: accuracy, format, or pkg.module:function")
    reward_weights: list[float] = option([], "one weight per reward (default: all 1.0)")
    accuracy_rule: str = option("exact", "accuracy reward rule: exact (R1-AQA) or mmau (the benchmark's)")
    scale_rewards: bool = option(True, "divide advantages by the group's reward std (false: Dr. GRPO)")
    beta: float = option(0.04, "KL coefficient against the reference policy (0 skips the reference pass)")
    epsilon_low: float = option(0.2, "lower clip range: ratio >= 1 - epsilon_low")
    epsilon_high: float = option(0.2, "upper clip range: ratio <= 1 + epsilon_high")
    num_iterations: int = option(1, "mu: optimizer updates per rollout batch")
    loss_type: str = option("sequence", "loss aggregation: sequence (mean per completion), token (mean over the "
                                        "micro-batch's tokens: TRL's bnpo), constant (Dr. GRPO), dapo (token sum over "
                                        "the whole accumulated batch of every process / its active tokens), cispo "
                                        "(CISPO's objective, aggregated as dapo; epsilon_high is its ratio cap)")
    importance_sampling: str = option("token", "token (GRPO: one ratio per token) or sequence (GSPO: one ratio per "
                                               "completion, exp of its mean token log-ratio)")
    kl_bias_correction: bool = option(False, "multiply the k3 KL by the importance ratio (TRL's use_bias_correction_kl)")
    skip_equal_groups: bool = option(False, "drop groups whose rewards are all equal (they carry no signal)")
    log_completions_every: int = option(10, "append sampled completions to completions.jsonl every N steps")
    rollout_engine: str = option("native", "native (our decode loop) or vllm (one process or ddp, 30 s audio window; "
                                           "pip install 'audio-rft[vllm]', README \"Rollouts on vLLM\")")
    vllm_gpu_memory_utilization: float = option(0.3, "share of the GPU the colocated vLLM engine takes (weights, KV cache)")


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4); without `scale`, just r_i - mean."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float = 0.04, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "sequence", max_completion_length: int | None = None,
              importance_sampling: str = "token", kl_bias_correction: bool = False,
              num_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective, per token t of completion i (mask m excludes everything after the first EOS):

        ρ_it  = exp(log π(o_it) − log π_old(o_it))                  (π_old = π.detach() when μ = 1)
        ℓ_it  = −min(ρ_it·A_i, clip(ρ_it, 1−ε_low, 1+ε_high)·A_i) + β·KL_it
        KL_it = exp(ref_it − log π_it) − (ref_it − log π_it) − 1   (k3 estimator; ref = reference policy)

        sequence: L = 1/N Σ_i (Σ_t m_it ℓ_it) / (Σ_t m_it)            (GRPO paper, R1-AQA)
        token:    L = Σ_it m_it ℓ_it / Σ_it m_it                      (per micro-batch: TRL's "bnpo")
        constant: L = Σ_it m_it ℓ_it / (N · max_completion_length)    (Dr. GRPO)
        dapo:     L = Σ_it m_it ℓ_it / num_tokens                     (DAPO, Yu et al. 2025, arXiv 2503.14476:
                                                                       the token mean of the whole batch)

    `num_tokens` (dapo, cispo) is the number of active tokens of the whole accumulated batch of every process
    divided by the number of processes (TRL's num_items_in_batch / num_processes): summing the micro-batch
    losses, and averaging over processes as DDP does, gives the token mean of the global batch, whatever its
    split. The trainer counts it before the policy passes and does not divide these losses by grad_accum.

    Options, each as TRL 1.16's GRPOTrainer computes it:
    - importance_sampling="sequence" (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071):
      one ratio per completion, s_i = exp(Σ_t m_it (log π_it − log π_old,it) / Σ_t m_it), used for every
      token of i in ℓ_it (and so clipped once per sequence); the gradient flows through the mean.
    - loss_type="cispo" (CISPO, MiniMax-M1 report, arXiv 2506.13585): ℓ_it = −sg(min(ρ_it, ε_high))·A_i·log π_it
      + β·KL_it, aggregated as dapo. ε_high is the cap itself here, not 1 + ε_high (as TRL's epsilon_high
      for cispo): set it above 1.
    - kl_bias_correction (TRL's use_bias_correction_kl, from DeepSeek-V3.2): KL_it ← KL_it·ρ_it, with the
      unclipped, undetached ratio (per sequence under GSPO).

    Shapes: logprobs/old/ref/mask (N, L) for N completions of L tokens; advantages (N,). Returns the
    loss and logged statistics.
    """
    valid = mask.bool()
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    # Masked positions are zeroed before exp(): an overflow there would otherwise turn into NaN (inf * 0)
    # in the loss and its gradient.
    log_ratio = (logprobs - old).masked_fill(~valid, 0.0)
    if importance_sampling == "sequence":
        log_ratio = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logprobs)
    elif importance_sampling != "token":
        raise ValueError(f"unknown importance_sampling {importance_sampling!r}; choose {', '.join(IMPORTANCE_SAMPLING)}")
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    if loss_type == "cispo":
        per_token = -ratio.clamp(max=epsilon_high).detach() * adv * logprobs.masked_fill(~valid, 0.0)
    else:
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    kl = torch.zeros_like(logprobs)
    if beta and ref_logprobs is not None:
        delta = (ref_logprobs - logprobs).masked_fill(~valid, 0.0)
        kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    lengths = mask.sum(1).clamp(min=1)
    if loss_type == "sequence":
        loss = ((per_token * mask).sum(1) / lengths).mean()
    elif loss_type == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "constant":
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    elif loss_type in GLOBAL_TOKEN_LOSSES:
        if not num_tokens:
            raise ValueError(f"loss_type {loss_type!r} needs num_tokens (the accumulated batch's active tokens)")
        loss = (per_token * mask).sum() / num_tokens
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose {', '.join(LOSS_TYPES)}")
    with torch.no_grad():
        if loss_type == "cispo":
            clipped = ratio > epsilon_high
        else:
            clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        tokens = mask.sum().clamp(min=1)
        stats = {"kl": (kl * mask).sum() / tokens, "clip_ratio": (clipped * mask).sum() / tokens}
    if is_fake(loss):  # a traced step (audio_rft.trace): no values to read
        return loss, stats
    return loss, {key: float(value) for key, value in stats.items()}


def prompt_generators(seed: int, step: int, indices: list[int]) -> list[torch.Generator]:
    """One sampling generator per prompt, a pure function of (seed, step, sample index): resumable and
    independent of how prompts are spread over batches and processes."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + i) for i in indices]


def score_completions(texts: list[str], samples: list, reward_fns: dict) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(fn(texts, samples), dtype=torch.float32) for name, fn in reward_fns.items()}


def build_reward_fns(config: GRPOConfig) -> tuple[dict, dict[str, float]]:
    from audio_rft.rewards import get_reward

    if config.reward_weights and len(config.reward_weights) != len(config.rewards):
        raise UserError(f"reward_weights has {len(config.reward_weights)} values for {len(config.rewards)} rewards")
    options = {"accuracy": {"rule": config.accuracy_rule}, "format": {"mode": config.prompt_mode}}
    try:
        fns = {name: get_reward(name, **options.get(name, {})) for name in config.rewards}
    except ValueError as e:
        raise UserError(str(e)) from None
    weights = dict(zip(config.rewards, config.reward_weights or [1.0] * len(config.rewards)))
    return fns, weights


def train_grpo(config: GRPOConfig, fresh: bool = False) -> Path:
    """Run GRPO on `config.data`; resumes from the latest complete checkpoint in `config.out`."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.prompts import check_mode
    from audio_rft.rollout import (completion_logprobs, decode, encode_prompts, load_waveforms, sample,
                                   with_audio_encoded)
    from audio_rft.vllm_rollout import check_rollout_engine, logprob_gap, request_seeds, start_engine

    check_mode(config.prompt_mode)
    if not (config.model and config.data and config.out):
        raise UserError("grpo needs model, data and out (e.g. `audio-rft grpo model=M data=D out=O`)")
    if config.loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type {config.loss_type!r}: choose {', '.join(LOSS_TYPES)}")
    if config.importance_sampling not in IMPORTANCE_SAMPLING:
        raise UserError(f"importance_sampling {config.importance_sampling!r}: choose {' or '.join(IMPORTANCE_SAMPLING)}")
    if config.num_generations < 2:
        raise UserError("num_generations must be at least 2 (advantages compare answers within a group)")
    reward_fns, weights = build_reward_fns(config)
    check_rollout_engine(config.rollout_engine)
    samples = [s for s in load_dataset(config.data) if s.answer is not None]
    # Reference policy, the starting one (Engine.run_reference), only where the KL term needs it.
    run = start_run(config, fresh, config.max_steps * config.num_iterations, f"grpo {config.prompt_mode}",
                    reference=bool(config.beta))
    engine, layout, processor = run.engine, run.layout, run.processor
    core, G = engine.core, config.num_generations
    temperature = config.temperature if config.temperature > 0 else 1.0  # score the policy that sampled
    vllm = None
    if config.rollout_engine == "vllm":
        check_rollout_engine("vllm", engine.strategy)
        vllm = start_engine(config, core, processor, layout.device, engine.compute_dtype)  # synced at each step

    for step in range(run.start, config.max_steps):
        step_began = time.perf_counter()
        timing = {"rollout": 0.0, "reference": 0.0, "policy": 0.0, "optimizer": 0.0}
        rollouts, reward_parts, totals, lengths, logged, logprob_gaps = [], [], [], [], [], []
        if vllm is not None:  # the weights of the last optimizer step (or of the resumed checkpoint)
            timing["weight_sync"] = vllm.load_weights(core)
        try:
            # 1. Rollout: G completions per prompt, rewards, group-normalised advantages.
            for micro in range(config.grad_accum):
                idx = run.indices(len(samples), step, micro)
                batch_samples = [samples[i] for i in idx]
                clock = time.perf_counter()
                waveforms = load_waveforms(config.data, batch_samples)
                batch = encode_prompts(processor, batch_samples, waveforms, config.prompt_mode,
                                       config.max_prompt_tokens).to(layout.device)
                engine.train(False)  # no dropout while sampling
                batch = engine.run(with_audio_encoded, batch)  # a frozen encoder runs once for all passes below
                if vllm is None:
                    with engine.gathered():
                        ids, mask = engine.run(sample, processor, batch, G, config.max_completion_length,
                                               config.temperature, config.top_p,
                                               prompt_generators(config.seed, step, idx), engine.all_done)
                else:
                    ids, mask, vllm_logprobs = vllm.sample(processor, batch_samples, waveforms, config.prompt_mode, G,
                                                           config.max_completion_length, config.temperature,
                                                           config.top_p, request_seeds(config.seed, step, idx))
                    ids, mask = ids.to(layout.device), mask.to(layout.device)
                    if config.log_completions_every and step % config.log_completions_every == 0:
                        with torch.no_grad():  # one more pass of ours, on logging steps only
                            ours = engine.run(completion_logprobs, batch, ids, G, temperature=temperature)
                        logprob_gaps.append(logprob_gap(ours, vllm_logprobs, mask))
                texts = decode(processor, ids, mask)
                group_samples = [s for s in batch_samples for _ in range(G)]
                parts = score_completions(texts, group_samples, reward_fns)
                reward = sum(weights[name] * value for name, value in parts.items())
                advantages = group_advantages(reward, G, config.scale_rewards).to(layout.device)
                timing["rollout"] += time.perf_counter() - clock
                reward_parts.append(parts)
                totals.append(reward)
                lengths.append(mask.sum(1).float())
                keep, weight = torch.arange(len(idx)), 1.0
                if config.skip_equal_groups:  # a group of equal rewards has zero advantage: skip its passes
                    keep = torch.nonzero(reward.view(-1, G).std(1) > 0).flatten()
                if len(keep) == 0:
                    if layout.world == 1:
                        continue
                    # With several processes every rank makes the same passes (DDP syncs in its last backward,
                    # FSDP gathers in every pass), so a rank with nothing to learn runs one group at weight 0.
                    keep, weight = torch.arange(1), 0.0
                rows = (keep[:, None] * G + torch.arange(G)).flatten().to(layout.device)
                batch = batch.select(keep)
                ids, mask, advantages = ids[rows], mask[rows], advantages[rows]
                clock = time.perf_counter()
                ref_logprobs = old_logprobs = None
                engine.train(True)  # π_old and the reference under the policy pass's dropout rule
                with torch.no_grad():
                    if config.beta:
                        ref_logprobs = engine.run_reference(completion_logprobs, batch, ids, G, temperature=temperature)
                    if config.num_iterations > 1:  # π_old is needed only when the policy moves between updates
                        old_logprobs = engine.run(completion_logprobs, batch, ids, G, temperature=temperature)
                timing["reference"] += time.perf_counter() - clock
                rollouts.append((batch, ids, mask, advantages, ref_logprobs, old_logprobs, weight))
                if layout.main and config.log_completions_every and step % config.log_completions_every == 0:
                    logged += [{"step": step + 1, "id": s.id, "answer": s.answer, "completion": t, "reward": float(r)}
                               for s, t, r in zip(group_samples, texts, reward)]

            # 2. μ policy updates on this rollout batch. Every process steps when any has something to learn,
            # so replicas never drift apart when one skipped all its groups; when none has, the step is skipped
            # (no weight or optimizer state changes), its passes made only where the engine needs them.
            any_rollouts = layout.any(any(r[-1] > 0 for r in rollouts))
            passes = any_rollouts or engine.passes_without_signal
            num_tokens, accumulated = None, config.grad_accum
            if config.loss_type in GLOBAL_TOKEN_LOSSES:  # each micro-batch's share of the global token mean
                active = sum(float(r[2].sum()) for r in rollouts if r[-1] > 0)
                num_tokens, accumulated = max(layout.mean(active), 1.0), 1
            engine.train(True)
            for _ in range(config.num_iterations):
                clock = time.perf_counter()
                loss_total, stats_total = 0.0, {"kl": 0.0, "clip_ratio": 0.0}
                for i, (batch, ids, mask, advantages, ref_logprobs, old_logprobs, weight) in enumerate(
                        rollouts if passes else []):
                    engine.sync_gradients(i == len(rollouts) - 1)
                    logprobs = engine.run(completion_logprobs, batch, ids, G, temperature=temperature)
                    loss, stats = grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, config.beta,
                                            config.epsilon_low, config.epsilon_high, config.loss_type,
                                            config.max_completion_length, config.importance_sampling,
                                            config.kl_bias_correction, num_tokens)
                    engine.backward(loss * weight / accumulated)
                    loss_total += float(loss.detach()) * weight / accumulated
                    for key in stats_total:
                        stats_total[key] += stats[key] / max(len(rollouts), 1)
                timing["policy"] += time.perf_counter() - clock
                clock = time.perf_counter()
                norm, _ = run.optimizer_step(loss_total, any_rollouts, passes and bool(rollouts))
                timing["optimizer"] += time.perf_counter() - clock
        except torch.cuda.OutOfMemoryError:
            raise UserError(oom_advice("GRPO")) from None

        # Every process's rollouts, not only the main one's.
        reward = layout.gather(torch.cat(totals))
        metrics = {
            "step": step + 1, "loss": layout.mean(loss_total),
            "reward": float(reward.mean()), "reward_std": float(reward.view(-1, G).std(1).mean()),
            **{f"rewards/{name}": float(layout.gather(torch.cat([p[name] for p in reward_parts])).mean())
               for name in reward_fns},
            "kl": layout.mean(stats_total["kl"]), "clip_ratio": layout.mean(stats_total["clip_ratio"]),
            "completion_length": float(layout.gather(torch.cat(lengths)).mean()),
            "frac_reward_zero_std": float((reward.view(-1, G).std(1) == 0).float().mean()),
            "grad_norm": norm, "lr": engine.lr(), "step_seconds": time.perf_counter() - step_began,
            **{f"time/{k}": v for k, v in timing.items()},
            **({"vllm/logprob_abs_diff": sum(logprob_gaps) / len(logprob_gaps)} if logprob_gaps else {}),
        }
        if logged:
            with open(run.out / "completions.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in logged))
        run.bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics.get('rewards/accuracy', float('nan')):.2f}")
        run.end_step(metrics)
    return run.finish()


def run_argv(argv: list[str]) -> int:
    """`audio-rft grpo --config FILE [key=value ...]`."""
    config, flags = parse_train_args(GRPOConfig, argv, "grpo")
    print_result(train_grpo(config, fresh=flags.fresh))
    return 0
