"""`audio-rft bench`: our GRPO step and our inference against R1-AQA's way, on the same model and inputs.

`bench grpo` runs one GRPO step (rollout + rewards + reference + loss + backward + optimizer) two ways:

- ours: audio_rft.rollout (audio and prompt encoded once per prompt, prompt KV cache shared by the G
  completions, logits only at completion positions), LoRA, reference = the same model with the adapter
  disabled, audio_rft.train.grpo.grpo_loss;
- baseline: a re-implementation of R1-AQA's step (their GRPOTrainer.compute_loss, a fork of TRL's): HF
  `generate(num_return_sequences=G)` (the audio encoder and the prompt run G times), a plain forward over
  prompt + completion with the audio features repeated G times and full-vocabulary logits at every
  position (TRL 0.15's selective_log_softmax), the same again for a deep-copied reference model, full
  fine-tuning of the language model with AdamW, per-sequence mean loss;
- ours-vllm (`--rollout-engine vllm`, beside ours): ours with the G completions sampled on vLLM
  (audio_rft.vllm_rollout), after pushing the weights the last step trained into it (`weight_sync`).

Each variant lives in its own freshly spawned process (so its peak RSS is its own), and the parent drives
them step by step, alternately (ours, baseline, ours, baseline, ...), so a change in machine load hits
both alike. Completions have a fixed length on both sides (stop tokens suppressed), so both do the same
work. Warm-up steps are excluded; the median of the measured steps is reported.

`bench eval` times our batched inference (run_inference: length-sorted batches, stop at EOS) against
R1-AQA's test script (fixed-size unsorted batches, HF generate with 256 new tokens).

`bench plan-check` compares `audio-rft plan`'s memory estimate with the measured peak of one of our steps.

This module is the command line; the parts, each readable alone: steps.py (the two GRPO steps),
workers.py (a variant per spawned process, with a memory watchdog), grpo.py, inference.py and
plan_check.py (the three benchmarks), flops.py (the FLOP model and matmul rate), common.py (the model
folder and the audio question). Progress is logged (logging.getLogger); result tables and the path of
the JSON written go to stdout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from audio_rft.bench.common import DEFAULT_MODEL_CACHE, bench_prompt, ensure_model
from audio_rft.bench.grpo import format_profile, run_grpo_bench
from audio_rft.bench.inference import build_eval_set, run_eval_bench
from audio_rft.bench.plan_check import run_plan_check
from audio_rft.bench.steps import BaselineStep, OursStep
from audio_rft.machine import machine_info

__all__ = ["BaselineStep", "DEFAULT_MODEL_CACHE", "OursStep", "add_parser", "bench_prompt", "build_eval_set",
           "ensure_model", "format_profile", "run_eval_bench", "run_grpo_bench", "run_plan_check"]


def _write_json(path: str | Path, data: dict) -> None:
    from audio_rft.fileio import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), data)


def add_parser(subparsers, command: str) -> None:
    parser = subparsers.add_parser(command, help="performance benchmarks against R1-AQA's way",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench_kind", required=True)

    grpo = sub.add_parser("grpo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="one GRPO step, ours vs R1-AQA's, interleaved, in fresh processes")
    grpo.add_argument("--json", required=True, help="write results here")
    grpo.add_argument("--model", help="model folder (default: the bench preset, built once into runs/bench-preset)")
    grpo.add_argument("--preset", default="bench", choices=["bench", "tiny"], help="preset to build when --model is absent")
    grpo.add_argument("--steps", type=int, default=3, help="measured steps per variant (answer case)")
    grpo.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant, not counted")
    grpo.add_argument("--completion-tokens", type=int, default=32, help="answer-mode completion length (fixed)")
    grpo.add_argument("--think-tokens", type=int, default=256, help="think-mode completion length (0: skip the case)")
    grpo.add_argument("--think-steps", type=int, default=1, help="measured steps per variant (think case)")
    grpo.add_argument("--generations", type=int, default=8, help="G")
    grpo.add_argument("--audio-seconds", type=float, default=None, help="clip length (default: the model's window, 30 s)")
    grpo.add_argument("--threads", type=int, default=2)
    grpo.add_argument("--memory-cap-gb", type=float, default=18.0, help="kill a variant whose RSS passes this")
    grpo.add_argument("--variants", default="ours,baseline")
    grpo.add_argument("--think-variants", help="variants for the think case (default: all of --variants)")
    grpo.add_argument("--seed", type=int, default=0)
    grpo.add_argument("--rollout-engine", choices=["native", "vllm"], default="native",
                      help="vllm: also run ours-vllm, ours with its rollout on vLLM (needs audio-rft[vllm])")

    def run_grpo(args) -> int:
        if args.rollout_engine == "vllm":
            from audio_rft.vllm_rollout import check_rollout_engine

            check_rollout_engine("vllm")
            if "ours-vllm" not in args.variants.split(","):
                args.variants += ",ours-vllm"
        model_dir = ensure_model(args.model, args.preset)
        from audio_rft.plan import shapes_for_model

        seconds = args.audio_seconds or shapes_for_model(str(model_dir))["audio"]["max_source_positions"] / 50
        result = run_grpo_bench(model_dir, args.steps, args.completion_tokens, args.think_tokens, args.think_steps,
                                args.warmup, args.threads, args.generations, args.seed, seconds, args.memory_cap_gb,
                                tuple(v for v in args.variants.split(",") if v),
                                tuple(v for v in args.think_variants.split(",") if v) if args.think_variants else None)
        for name, case in result["cases"].items():
            print(format_profile(name, case, case["variants"]))
        _write_json(args.json, result)
        print(args.json)
        return 0

    grpo.set_defaults(func=run_grpo)

    ev = sub.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="inference items/s, ours vs R1-AQA's test script")
    ev.add_argument("--json", required=True)
    ev.add_argument("--model", help="model folder (default: the bench preset)")
    ev.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    ev.add_argument("--data", help="prepared dataset (default: a synthetic set of clips from 2 to 30 s)")
    ev.add_argument("--items", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=32, help="ours (answer mode)")
    ev.add_argument("--baseline-new-tokens", type=int, default=256, help="R1-AQA's test script")
    ev.add_argument("--repeats", type=int, default=1)
    ev.add_argument("--threads", type=int, default=2)

    def run_eval(args) -> int:
        model_dir = ensure_model(args.model, args.preset)
        data = args.data
        if data is None:
            from audio_rft.plan import shapes_for_model

            window = shapes_for_model(str(model_dir))["audio"]["max_source_positions"] / 50
            data = build_eval_set(Path(DEFAULT_MODEL_CACHE).parent / f"bench-eval-{args.items}-{window:g}s", args.items,
                                  min_seconds=min(2.0, window), max_seconds=window)
        result = run_eval_bench(model_dir, data, args.items, args.batch_size, args.max_new_tokens,
                                args.baseline_new_tokens, args.repeats, args.threads)
        _write_json(args.json, result)
        print(args.json)
        return 0

    ev.set_defaults(func=run_eval)

    check = sub.add_parser("plan-check", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="plan's memory estimate against a measured step (fresh process, CPU)")
    check.add_argument("--json", required=True)
    check.add_argument("--model", action="append", help="model folder(s) (default: the tiny and bench presets)")
    check.add_argument("--generations", type=int, default=8)
    check.add_argument("--completion-tokens", type=int, action="append",
                       help="completion length(s) to check (default: 32)")
    check.add_argument("--threads", type=int, default=2)

    def run_check(args) -> int:
        folders = args.model or [str(ensure_model(None, "tiny")), str(ensure_model(None, "bench"))]
        rows = [run_plan_check(f, args.generations, L, threads=args.threads)
                for f in folders for L in (args.completion_tokens or [32])]
        for row in rows:
            print(f"{row['model']}: measured {row['measured_step_bytes'] / 2**20:,.0f} MiB over torch+transformers "
                  f"({row['measured_step_bytes_after_all_imports'] / 2**20:,.0f} MiB over all imports), plan "
                  f"{row['plan_peak_bytes'] / 2**20:,.0f} MiB ({row['plan_over_measured']:.2f}x, "
                  f"{row['plan_over_measured_after_all_imports']:.2f}x)")
        _write_json(args.json, {"checks": rows, "machine": machine_info(args.threads),
                                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        print(args.json)
        return 0

    check.set_defaults(func=run_check)

