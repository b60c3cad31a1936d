"""`bench grpo`: our step against R1-AQA's, interleaved in fresh processes, summarised per case and phase."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from audio_rft.bench.common import median
from audio_rft.bench.flops import matmul_rate, model_shapes, step_flops
from audio_rft.bench.workers import Worker
from audio_rft.machine import machine_info

logger = logging.getLogger(__name__)

PHASES = ("weight_sync", "rollout", "reference", "policy_forward", "backward", "optimizer")  # weight_sync: ours-vllm
# fp32 rows of V logits per completion token that each variant's peak grows by with longer completions
# (baseline: policy and reference logits plus a log-softmax temporary, measured 17.6 vs 14.3 GiB from 32 to
# 256 tokens; ours: at most one, as rollout.token_logprobs keeps no logits for backward). Used only to skip,
# with a message, a case that would pass the memory cap.
LOGIT_ROWS_PER_TOKEN = {"ours": 1, "baseline": 3}


def _summarise(variant: str, results: list[dict], info: dict, G: int, L: int, error: str | None) -> dict:
    measured = [r for r in results if not r.get("warmup")]
    out: dict = {"steps_measured": len(measured), "step_seconds_all": [round(r["step_seconds"], 3) for r in measured]}
    step_seconds = median([r["step_seconds"] for r in measured])
    out["step_seconds"] = step_seconds
    out["cpu_seconds"] = median([r["cpu_seconds"] for r in measured])
    out["tokens_per_second"] = G * L / step_seconds if step_seconds else None
    peaks = [r.get("VmHWM_bytes", 0) for r in results]
    out["peak_memory_bytes"] = max(peaks) if peaks else None
    out["import_rss_bytes"] = info.get("import_rss_bytes")
    out["setup_rss_bytes"] = info.get("setup_rss_bytes")
    if measured:
        profile = {phase: median([r["times"].get(phase, 0.0) for r in measured]) for phase in PHASES}
        total = sum(profile.values()) or 1.0
        out["profile_seconds"] = profile
        out["profile_share"] = {phase: value / total for phase, value in profile.items()}
        out["prompt_tokens"] = measured[0]["prompt_tokens"]
        out["completion_tokens"] = measured[0]["completion_tokens"]
    if error:
        out["error"] = error
    return out


def run_grpo_bench(model_dir: str | Path, steps: int = 3, completion_tokens: int = 32, think_tokens: int = 256,
                   think_steps: int = 1, warmup: int = 1, threads: int = 2, G: int = 8, seed: int = 0,
                   seconds: float = 30.0, memory_cap_gb: float = 18.0, variants: tuple[str, ...] = ("ours", "baseline"),
                   think_variants: tuple[str, ...] | None = None, matmul_n: int = 2048, log=None) -> dict:
    """Interleaved GRPO-step benchmark; returns the JSON-ready result (see audio_rft.bench's docstring).

    Progress goes to `log` (default: this module's logger at info); format_profile makes a case's table.
    """
    import torch

    log = log or logger.info

    torch.set_num_threads(threads)
    machine = machine_info(threads)
    matmul = matmul_rate(threads, matmul_n)
    log(f"matmul {matmul_n}^2 fp32: {matmul['flops_per_second'] / 1e9:.1f} GFLOP/s on {threads} threads")
    cap = int(memory_cap_gb * 2**30)
    log(f"starting workers: {', '.join(variants)}")
    workers = {v: Worker(v, str(model_dir), G, seed, threads, seconds, cap) for v in variants}  # start together
    for v, worker in workers.items():
        if "error" in worker.wait_ready():
            for other in workers.values():
                other.close()
            raise RuntimeError(f"{v} worker failed to start: {worker.info['error']}\n{worker.info.get('traceback', '')}")
    cases = [("answer", completion_tokens, steps, warmup, variants)]
    if think_tokens and think_steps:
        # the workers are warm from the answer case; the think case needs no warm-up of its own
        chosen = tuple(v for v in (think_variants or variants) if v in variants)
        cases.append(("think", think_tokens, think_steps, 0, chosen))
    shapes = model_shapes(model_dir)
    results: dict[str, dict] = {}
    peaks: dict[str, int] = {}  # each variant's peak RSS so far, to skip (and say so) a case that would pass the cap
    k = 0
    try:
        for name, L, n_steps, n_warm, case_variants in cases:
            per_variant: dict[str, list[dict]] = {v: [] for v in case_variants}
            errors: dict[str, str | None] = {v: None for v in case_variants}
            for v in case_variants:
                if v in peaks and L > completion_tokens:
                    growth = LOGIT_ROWS_PER_TOKEN.get(v, 3) * G * (L - completion_tokens) * shapes["text"]["vocab"] * 4
                    estimate = peaks[v] + growth
                    if estimate > cap:
                        errors[v] = (f"skipped: estimated peak {estimate / 2**30:.1f} GiB passes the memory cap of "
                                     f"{cap / 2**30:.1f} GiB (raise --memory-cap-gb to measure it)")
                        log(f"{name} case, {v}: {errors[v]}")
            for i in range(n_warm + n_steps):
                for v in case_variants:
                    if errors[v]:
                        continue
                    result = workers[v].step(L, k)
                    if "error" in result:
                        errors[v] = result["error"]
                        log(f"{name} {v}: {result['error']}")
                        continue
                    result["warmup"] = i < n_warm
                    per_variant[v].append(result)
                    log(f"{name} L={L} {v} step {i + 1}/{n_warm + n_steps}{' (warm-up)' if i < n_warm else ''}: "
                        f"{result['step_seconds']:.2f} s, peak RSS {result.get('VmHWM_bytes', 0) / 2**30:.2f} GiB")
                k += 1
            case = {v: _summarise(v, per_variant[v], workers[v].info, G, L, errors[v]) for v in case_variants}
            for v in case_variants:
                if per_variant[v]:
                    peaks[v] = max(peaks.get(v, 0), *(r.get("VmHWM_bytes", 0) for r in per_variant[v]))
            prompt_tokens = next((case[v].get("prompt_tokens") for v in case_variants if case[v].get("prompt_tokens")), None)
            frames = int(seconds * 100)
            for v in case_variants:
                flops = step_flops(shapes, prompt_tokens or 0, frames, G, L, v)
                case[v]["flops_estimate"] = flops["total"]
                if case[v].get("step_seconds"):
                    case[v]["achieved_flops_per_second"] = flops["total"] / case[v]["step_seconds"]
                    case[v]["fraction_of_matmul_rate"] = case[v]["achieved_flops_per_second"] / matmul["flops_per_second"]
                    case[v]["flops_by_phase"] = flops
                if case[v].get("cpu_seconds"):
                    case[v]["achieved_flops_per_cpu_second"] = flops["total"] / case[v]["cpu_seconds"]
                    case[v]["fraction_of_matmul_rate_per_cpu_second"] = (case[v]["achieved_flops_per_cpu_second"]
                                                                         / matmul["flops_per_cpu_second"])
            if "ours" in case and "baseline" in case:
                o, b = case["ours"], case["baseline"]
                both_timed = o.get("step_seconds") and b.get("step_seconds")
                case["speedup"] = b["step_seconds"] / o["step_seconds"] if both_timed else None
                both_peaks = o.get("peak_memory_bytes") and b.get("peak_memory_bytes") and not b.get("error")
                case["peak_memory_ratio"] = o["peak_memory_bytes"] / b["peak_memory_bytes"] if both_peaks else None
                case["speedup_cpu_time"] = (b["cpu_seconds"] / o["cpu_seconds"]
                                            if o.get("cpu_seconds") and b.get("cpu_seconds") else None)
            case["variants"] = list(case_variants)
            case["config"] = {"completion_tokens": L, "G": G, "prompt_tokens": prompt_tokens, "audio_seconds": seconds,
                              "steps": n_steps, "warmup_steps": n_warm}
            results[name] = case
    finally:
        for w in workers.values():
            w.close()
    main = results["answer"]
    out = {v: main[v] for v in variants}
    out.update({
        "speedup": main.get("speedup"), "peak_memory_ratio": main.get("peak_memory_ratio"),
        "speedup_cpu_time": main.get("speedup_cpu_time"),
        "config": {"model": str(model_dir), "G": G, "completion_tokens": completion_tokens, "think_tokens": think_tokens,
                   "steps": steps, "think_steps": think_steps, "warmup_steps": warmup, "threads": threads, "seed": seed,
                   "audio_seconds": seconds, "prompt_tokens": main["config"]["prompt_tokens"],
                   "memory_cap_gb": memory_cap_gb, "model_shapes": shapes,
                   "ours": "LoRA r=8 on all LM projections, reference = adapter disabled, beta 0.04, lr 1e-5, AdamW",
                   "baseline": "full fine-tuning of the LM (audio tower frozen), deep-copied reference, beta 0.04, lr 1e-6, AdamW",
                   "peak_memory": "VmHWM of each variant's own freshly spawned process (includes torch/transformers import)",
                   "tokens_per_second": "G x completion tokens per step / median step seconds"},
        "machine": machine, "matmul": matmul, "cases": results,
        "profile": {name: {v: case[v].get("profile_share") for v in case["variants"]} for name, case in results.items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    return out


def format_profile(name: str, case: dict, variants) -> str:
    """A case's result table: median seconds and share per phase, step time, CPU time and peak RSS per variant."""
    lines = [f"case {name} (L={case['config']['completion_tokens']}, G={case['config']['G']}, "
             f"prompt {case['config']['prompt_tokens']} tokens)"]
    header = f"  {'phase':<16}" + "".join(f"{v:>22}" for v in variants)
    lines.append(header)
    for phase in PHASES:
        row = f"  {phase:<16}"
        for v in variants:
            seconds = (case[v].get("profile_seconds") or {}).get(phase)
            share = (case[v].get("profile_share") or {}).get(phase)
            row += f"{'-':>22}" if seconds is None else f"{seconds:>12.2f} s ({share:>5.0%})"
        lines.append(row)
    row = f"  {'step (median)':<16}"
    for v in variants:
        s = case[v].get("step_seconds")
        row += f"{'-':>22}" if s is None else f"{s:>12.2f} s       "
    lines.append(row)
    row = f"  {'step CPU time':<16}"
    for v in variants:
        s = case[v].get("cpu_seconds")
        row += f"{'-':>22}" if s is None else f"{s:>12.2f} s       "
    lines.append(row)
    row = f"  {'peak RSS':<16}"
    for v in variants:
        m = case[v].get("peak_memory_bytes")
        row += f"{'-':>22}" if not m else f"{m / 2**30:>12.2f} GiB     "
    lines.append(row)
    if case.get("speedup"):
        lines.append(f"  speedup {case['speedup']:.1f}x, peak memory ratio "
                     + (f"{case['peak_memory_ratio']:.2f}" if case.get("peak_memory_ratio") else "n/a"))
    for v in variants:
        if case[v].get("error"):
            lines.append(f"  {v}: {case[v]['error']}")
    return "\n".join(lines)

