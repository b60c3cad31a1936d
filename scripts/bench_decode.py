#!/usr/bin/env python
"""Micro-benchmark of the GRPO think case's two hot spots (issue #20), on the bench preset:

- decode: ms per token of rollout.sample for G completions of one 30 s prompt (stop tokens suppressed, so
  every run decodes exactly L tokens), next to what one step's parts cost alone: the head's matrix
  product for G rows, the per-prompt draw (inverse CDF), and one language-model decode forward;
- log-probs: seconds of completion_logprobs over the G x L completion tokens without gradients (the
  reference and old passes) and with forward + backward through LoRA (the policy pass), and the peak RSS.

Usage: python scripts/bench_decode.py [--model runs/bench-preset] [--G 8] [--L 256] [--threads 2]
Run it with PYTHONPATH pointing at another checkout to measure that checkout's rollout.py (the script
uses only sample and completion_logprobs). Keep the machine quiet: it prints medians, not error bars.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the bench preset, built once into runs/bench-preset)")
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--L", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length (30 s: 833 prompt tokens)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from audio_rft import rollout
    from audio_rft.bench import DEFAULT_MODEL_CACHE, bench_prompt
    from audio_rft.compat import lm_forward
    from audio_rft.model import add_lora, build_tiny_preset, core_model, load_model

    folder = Path(args.model or DEFAULT_MODEL_CACHE)
    if not (folder / "config.json").is_file():
        print(f"building the bench preset into {folder} (once)", file=sys.stderr)
        build_tiny_preset("bench", folder)
    loaded = load_model(folder, device="cpu", dtype="fp32")
    processor, model = loaded.processor, add_lora(loaded.model)
    core = core_model(model)
    core.eval()
    sample, wave = bench_prompt(processor, args.seconds)
    batch = rollout.with_audio_encoded(core, rollout.encode_prompts(processor, [sample], [wave], "answer"))
    G, L, P = args.G, args.L, batch.input_ids.shape[1]
    generators = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731

    def draw(n: int):  # fixed length: no stop token
        return rollout.sample(core, processor, batch, G, n, 1.0, 1.0, generators(), stop_tokens=[])

    rows = []
    # per token: the difference between L tokens and 1 token (the prefill and setup cancel out)
    one, full = timed(lambda: draw(1), args.repeats), timed(lambda: draw(L), args.repeats)
    rows.append(("decode: rollout.sample, per token", (full - one) / max(L - 1, 1) * 1e3, "ms"))
    hidden = torch.randn(G, core.lm_head.in_features)
    with torch.no_grad():
        weight = rollout.decode_weight(core.lm_head)  # as one decode loop holds it (packed once, on first use)
        rows.append(("  head alone (G rows, rollout.head_logits)", timed(
            lambda: rollout.head_logits(core.lm_head, weight, hidden), 10) * 1e3, "ms"))
        V = core.lm_head.out_features
        logits = torch.randn(G, V)
        draw_token = rollout._InverseCDF(G, [torch.Generator().manual_seed(0)], "cpu")
        rows.append(("  draw alone (G x V, inverse CDF)", timed(lambda: draw_token(logits.clone()), 10) * 1e3, "ms"))
        _, cache = rollout.prefill(core, rollout.prompt_embeddings(core, batch), batch.attention_mask, G)
        mask = batch.attention_mask.repeat_interleave(G, 0)
        step_mask = torch.cat([mask, mask.new_ones(G, 1)], 1)
        embeds = core.get_input_embeddings()(torch.zeros(G, 1, dtype=torch.long))
        position = mask.sum(-1, keepdim=True)

        def lm_step():  # one decode forward at context P; cropped back so every repeat sees the same cache
            lm_forward(core.model.language_model, inputs_embeds=embeds, attention_mask=step_mask, position_ids=position,
                       cache=cache, use_cache=True)
            cache.crop(-1)

        rows.append(("  language model decode forward", timed(lambda: lm_step(), 10) * 1e3, "ms"))
    ids, _ = draw(L)
    with torch.no_grad():
        rows.append((f"log-probs, no grad ({G}x{L} tokens)", timed(
            lambda: rollout.completion_logprobs(core, batch, ids, G), args.repeats), "s"))
    model.train()

    def policy():
        rollout.completion_logprobs(core, batch, ids, G).sum().backward()
        model.zero_grad(set_to_none=True)

    rows.append((f"log-probs, forward + backward (LoRA)", timed(policy, args.repeats), "s"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"bench preset, G={G}, L={L}, prompt {P} tokens, {args.threads} threads, torch {torch.__version__}")
    for name, value, unit in rows:
        print(f"{name:<42} {value:>9.2f} {unit}")
    print(f"{'peak RSS of this process':<42} {peak:>9.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
