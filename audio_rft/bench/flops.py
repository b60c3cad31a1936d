"""The FLOP model of one GRPO step by phase, and the machine's plain matmul rate to compare it with."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def matmul_rate(threads: int | None = None, n: int = 2048, repeats: int = 5) -> dict:
    """FLOP/s of a plain fp32 n x n matmul on this machine (median of `repeats`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    times, cpu_times = [], []
    for _ in range(repeats):
        began, cpu = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu)
    seconds, cpu_seconds = statistics.median(times), statistics.median(cpu_times)
    # per CPU-second as well: on a shared machine wall time depends on the other load, CPU time much less
    return {"n": n, "seconds": seconds, "flops_per_second": 2 * n ** 3 / seconds, "cpu_seconds": cpu_seconds,
            "flops_per_cpu_second": 2 * n ** 3 / cpu_seconds, "repeats": repeats}



def model_shapes(model_dir: str | Path) -> dict:
    """The shapes the FLOP and memory estimates need, from a local config.json (see audio_rft.plan)."""
    from audio_rft.plan import shapes_from_config

    return shapes_from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def step_flops(shapes: dict, prompt_tokens: int, audio_frames: int, G: int, L: int, variant: str) -> dict[str, float]:
    """Approximate FLOPs of one GRPO step by phase (2 FLOPs per multiply-add; attention scores included).

    A dense layer's forward costs 2 * params * tokens. The backward costs 2x the forward where the weights
    train (input and weight gradients: the baseline's full fine-tuning) and 1x where only the input
    gradient flows (frozen weights under LoRA; the adapters' own FLOPs are negligible at rank 8).
    """
    from audio_rft.plan import lm_layer_params

    a, t = shapes["audio"], shapes["text"]
    d, V, n_layers = t["hidden"], t["vocab"], t["layers"]
    layer = lm_layer_params(t)
    attn_width = t["heads"] * t["head_dim"]

    def lm(new_tokens: int, context_before: int, logits_tokens: int) -> float:
        """Language model forward over `new_tokens` that also see `context_before` cached tokens."""
        mean_context = context_before + (new_tokens + 1) / 2
        attention = 4 * n_layers * attn_width * mean_context * new_tokens  # QK^T and AV
        return 2 * layer * n_layers * new_tokens + attention + 2 * d * V * logits_tokens

    da, positions = a["d_model"], audio_frames // 2  # conv2 has stride 2
    encoder = (2 * a["mels"] * da * 3 * audio_frames + 2 * da * da * 3 * positions
               + a["layers"] * (2 * (4 * da * da + 2 * da * a["ffn"]) * positions + 4 * da * positions * positions)
               + 2 * da * d * (positions // 2))  # pooled to 750 tokens, projected to the LM width
    P = prompt_tokens
    if variant == "ours":
        rollout = encoder + lm(P, 0, 1) + G * lm(L, P, L)  # prompt once, G completions on its cache
        reference = encoder + lm(P, 0, 0) + G * lm(L, P, L)  # logits at completion positions only
        forward = reference
        backward = lm(P, 0, 0) + G * lm(L, P, L)  # input gradients only (LoRA)
    else:
        rollout = G * (encoder + lm(P, 0, 1) + lm(L, P, L))  # generate(num_return_sequences=G)
        reference = G * (encoder + lm(P + L, 0, P + L))  # full-vocabulary logits at every position
        forward = reference
        backward = 2 * G * lm(P + L, 0, P + L)  # input and weight gradients (full fine-tuning)
    return {"rollout": rollout, "reference": reference, "policy_forward": forward, "backward": backward,
            "total": rollout + reference + forward + backward}

