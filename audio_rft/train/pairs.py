"""Preference data for `audio-rft prefer`, built from the same audio questions GRPO trains on.

Two sources:

- `samples` (default, on-policy): the model samples G completions per question (rollout.sample, one
  generator per prompt as GRPO's), GRPO's reward functions score them, and a question whose group has
  a contrast yields one pair: the highest against the lowest reward (first of each on ties). A group
  of equal rewards has nothing to prefer: it is counted, never paired.
- `choices` (offline, no model): the correct choice against a wrong one (picked per seed), both
  rendered in the prompt mode's target format (prompts.target_text), scored by the same rewards.

Out (one folder, written atomically): pairs.jsonl (DPO, ORPO), singles.jsonl (KTO: each pair's chosen
labelled desirable and rejected undesirable, so the two classes stay balanced as the KTO paper asks),
manifest.json (counts, including every question that gave no pair and why).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from audio_rft import UserError
from audio_rft.config import config_to_dict, option

logger = logging.getLogger(__name__)

SOURCES = ("samples", "choices")
STOP = "<|im_end|>"


@dataclass
class PairsConfig:
    data: str = option("", "prepared dataset folder (the questions)")
    out: str = option("", "output folder: pairs.jsonl, singles.jsonl, manifest.json")
    source: str = option("samples", "samples (on-policy: sample G per question, rewards pick chosen/rejected) "
                                    "or choices (offline: correct choice against a wrong one)")
    model: str = option("", "base model for source=samples: hub id or local folder")
    adapter: str | None = option(None, "PEFT adapter to sample from (e.g. an SFT warm-up)")
    prompt_mode: str = option("answer", "prompt mode: direct, answer or think")
    seed: int = option(0, "seed for sampling and for the wrong choice")
    limit: int | None = option(None, "only the first N questions")
    num_generations: int = option(8, "G: completions sampled per question")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling mass")
    max_completion_length: int = option(32, "completion length limit in tokens")
    max_prompt_tokens: int = option(2048, "refuse longer prompts (audio tokens are never cut)")
    batch_size: int = option(8, "questions per sampling batch")
    rewards: list[str] = option(["accuracy", "format"], "reward functions, as GRPO's: accuracy, format, or pkg.module:function")
    reward_weights: list[float] = option([], "one weight per reward (default: all 1.0)")
    accuracy_rule: str = option("exact", "accuracy reward rule: exact or mmau")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    device: str = option("auto", "auto, cpu, cuda")
    threads: int = option(0, "torch CPU threads (0: leave as is)")
    rollout_engine: str = option("native", "native (our decode loop) or vllm (30 s audio window; "
                                           "pip install 'audio-rft[vllm]', README \"Rollouts on vLLM\")")
    vllm_gpu_memory_utilization: float = option(0.3, "share of the GPU the vLLM engine takes (weights, KV cache)")


def pick_pair(rewards: list[float]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest reward (first of each on ties); None when all are equal."""
    best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
    return None if rewards[best] == rewards[worst] else (best, worst)


def pair_record(sample, mode: str, chosen: dict, rejected: dict) -> dict:
    """One pair; `chosen`/`rejected` are {text, reward, stopped}. `stopped`: the completion ended with the
    stop token, so the trainer appends it (a completion cut at the length limit did not stop)."""
    return {"id": sample.id, "prompt_mode": mode,
            "chosen": chosen["text"], "rejected": rejected["text"],
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
            "chosen_stopped": chosen["stopped"], "rejected_stopped": rejected["stopped"]}


def singles_of(pair: dict) -> list[dict]:
    return [{"id": pair["id"], "prompt_mode": pair["prompt_mode"], "completion": pair[k], "label": k == "chosen",
             "reward": pair[f"{k}_reward"], "stopped": pair[f"{k}_stopped"]} for k in ("chosen", "rejected")]


def _weighted(texts: list[str], samples: list, reward_fns: dict, weights: dict) -> list[float]:
    from audio_rft.train.grpo import score_completions

    parts = score_completions(texts, samples, reward_fns)
    return [float(x) for x in sum(weights[name] * value for name, value in parts.items())]


def choice_pairs(samples: list, config: PairsConfig, reward_fns: dict, weights: dict) -> tuple[list[dict], Counter]:
    """The correct choice against a wrong one drawn per (seed, position): no model needed."""
    from audio_rft.prompts import target_text

    pairs, unpaired = [], Counter()
    for index, s in enumerate(samples):
        wrong = [c for c in s.choices if c != s.answer]
        if not wrong:
            unpaired["no_wrong_choice"] += 1
            continue
        if config.prompt_mode == "think" and not s.reasoning:
            unpaired["no_reasoning"] += 1
            continue
        other = wrong[int(np.random.default_rng([config.seed, index]).integers(len(wrong)))]
        texts = [target_text(s, config.prompt_mode), target_text(replace(s, answer=other), config.prompt_mode)]
        rewards = _weighted(texts, [s, s], reward_fns, weights)
        if rewards[0] <= rewards[1]:  # the rewards must agree that the right answer is better
            unpaired["rewards_do_not_prefer_correct"] += 1
            continue
        pairs.append(pair_record(s, config.prompt_mode, *({"text": t, "reward": r, "stopped": True}
                                                          for t, r in zip(texts, rewards))))
    return pairs, unpaired


def sampled_pairs(samples: list, config: PairsConfig, reward_fns: dict, weights: dict) -> tuple[list[dict], Counter]:
    """G completions per question from the model; highest against lowest reward where they differ."""
    import torch

    from audio_rft.model import core_model, load_model
    from audio_rft.rollout import decode, encode_prompts, load_waveforms, sample, with_audio_encoded
    from audio_rft.train.grpo import prompt_generators
    from audio_rft.vllm_rollout import check_rollout_engine, request_seeds, start_engine

    check_rollout_engine(config.rollout_engine)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.num_generations < 2:
        raise UserError("num_generations must be at least 2 (a pair needs two completions to compare)")
    loaded = load_model(config.model, config.adapter, config.dtype, config.device)
    # sampling only: frozen weights let the decode head keep one packed copy for the whole run (frozen_linear)
    processor, core = loaded.processor, core_model(loaded.model).eval().requires_grad_(False)
    G = config.num_generations
    vllm = None
    if config.rollout_engine == "vllm":
        vllm = start_engine(config, core, processor, core.device, core.get_input_embeddings().weight.dtype)
    pairs, unpaired = [], Counter()
    for start in range(0, len(samples), config.batch_size):
        idx = list(range(start, min(start + config.batch_size, len(samples))))
        batch_samples = [samples[i] for i in idx]
        waveforms = load_waveforms(config.data, batch_samples)
        batch = encode_prompts(processor, batch_samples, waveforms, config.prompt_mode,
                               config.max_prompt_tokens).to(core.device)
        # Step 0 of GRPO's seed scheme: a question's completions depend only on (seed, its index).
        if vllm is not None:
            ids, mask, _ = vllm.sample(processor, batch_samples, waveforms, config.prompt_mode, G,
                                       config.max_completion_length, config.temperature, config.top_p,
                                       request_seeds(config.seed, 0, idx))
        else:
            with torch.no_grad():
                batch = with_audio_encoded(core, batch)
                ids, mask = sample(core, processor, batch, G, config.max_completion_length, config.temperature,
                                   config.top_p, prompt_generators(config.seed, 0, idx))
        texts = decode(processor, ids, mask)
        # Stopped: the mask ends before the last column, or the last kept token is a stop token.
        last = ids.gather(1, (mask.sum(1) - 1).clamp(min=0)[:, None]).squeeze(1)
        stop = torch.tensor(processor.tokenizer.convert_tokens_to_ids([STOP]) + _eos(core), device=ids.device)
        stopped = torch.isin(last, stop).tolist()
        rewards = _weighted(texts, [s for s in batch_samples for _ in range(G)], reward_fns, weights)
        for j, s in enumerate(batch_samples):
            group = range(j * G, (j + 1) * G)
            picked = pick_pair([rewards[k] for k in group])
            if picked is None:
                unpaired["no_contrast"] += 1
                continue
            chosen, rejected = (j * G + k for k in picked)
            pairs.append(pair_record(s, config.prompt_mode,
                                     *({"text": texts[k], "reward": rewards[k], "stopped": bool(stopped[k])}
                                       for k in (chosen, rejected))))
    return pairs, unpaired


def _eos(core) -> list[int]:
    eos = core.generation_config.eos_token_id
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def build_pairs(config: PairsConfig) -> Path:
    """Write pairs.jsonl, singles.jsonl and manifest.json into `config.out` (atomically); returns the folder."""
    from audio_rft.data.dataset import load_dataset
    from audio_rft.fileio import atomic_dir
    from audio_rft.prompts import check_mode
    from audio_rft.train.grpo import build_reward_fns

    check_mode(config.prompt_mode)
    if config.source not in SOURCES:
        raise UserError(f"source {config.source!r}: choose {' or '.join(SOURCES)}")
    if not (config.data and config.out) or (config.source == "samples" and not config.model):
        raise UserError("pairs needs data and out, and model for source=samples "
                        "(e.g. `audio-rft pairs model=M data=D out=O`)")
    reward_fns, weights = build_reward_fns(config)  # GRPO's, from the same config keys
    everything = load_dataset(config.data, limit=config.limit)
    samples = [s for s in everything if s.answer is not None]
    build = sampled_pairs if config.source == "samples" else choice_pairs
    pairs, unpaired = build(samples, config, reward_fns, weights)
    if len(everything) > len(samples):
        unpaired["no_answer"] = len(everything) - len(samples)
    singles = [single for pair in pairs for single in singles_of(pair)]
    manifest = {"source": config.source, "data": config.data, "prompt_mode": config.prompt_mode,
                "questions": len(everything), "pairs": len(pairs), "singles": len(singles),
                "desirable": sum(s["label"] for s in singles), "unpaired": dict(sorted(unpaired.items())),
                "config": config_to_dict(config)}
    out = Path(config.out)
    with atomic_dir(out) as tmp:
        for name, rows in (("pairs.jsonl", pairs), ("singles.jsonl", singles)):
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("pairs: %d from %d questions; unpaired %s", len(pairs), len(everything), dict(unpaired) or 0)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def run_argv(argv: list[str]) -> int:
    """`audio-rft pairs --config FILE [key=value ...]`."""
    from audio_rft.config import parse_command

    config, _ = parse_command(PairsConfig, argv, "audio-rft pairs", description=__doc__.split("\n\n")[0])
    print(build_pairs(config))
    return 0

