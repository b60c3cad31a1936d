"""One GRPO step at Qwen2-Audio-7B's sequence shapes (the `bench` preset) under each training strategy:
one process, then ddp and fsdp with two processes (torchrun, gloo on CPU): seconds per step and each rank's
peak memory (VmHWM), LoRA and full fine-tuning.

    python scripts/bench_strategies.py [--steps 3] [--completion 32] [--out docs/bench/strategies.json]

Each rank takes one prompt (833 tokens: a 10 s clip) and G = 8 completions of exactly --completion tokens,
so two processes do twice the work of one: compare seconds per prompt. On a 2-core CPU the two processes
share the cores; the memory column is the point here (fsdp holds each parameter, gradient and AdamW state
once across ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from audio_rft.bench import OursStep, bench_prompt
    from audio_rft.machine import proc_status

    torch.set_num_threads(args.threads)
    runner = OursStep(args.model, args.generations, strategy=args.strategy, lora=args.mode == "lora")
    rank = runner.engine.layout.rank
    sample, wave = bench_prompt(runner.processor, 10.0, seed=rank)
    times = []
    for step in range(args.steps + 1):  # the first step warms up and is not counted
        began = time.perf_counter()
        result = runner.step(sample, wave, args.completion, step)
        times.append(time.perf_counter() - began)
    record = {"rank": rank, "strategy": runner.engine.strategy, "seconds": times[1:], "peak_rss_bytes": proc_status()["VmHWM"],
              "prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"]}
    Path(args.record).with_suffix(f".{rank}.json").write_text(json.dumps(record))


def measure(model: str, strategy: str, processes: int, mode: str, args, folder: Path) -> list[dict]:
    record = folder / f"{strategy}-{mode}"
    worker_args = [str(Path(__file__).resolve()), "--worker", "--model", model, "--strategy", strategy, "--mode", mode,
                   "--steps", str(args.steps), "--completion", str(args.completion), "--generations",
                   str(args.generations), "--threads", str(max(1, args.threads // processes)), "--record", str(record)]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    done = subprocess.run(launcher + worker_args, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{strategy}/{mode} failed:\n{done.stderr[-3000:]}")
    return [json.loads(record.with_suffix(f".{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen2-Audio folder (default: build the bench preset once)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--completion", type=int, default=32, help="completion tokens per sample")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split between processes)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    from audio_rft.bench import ensure_model

    model = str(ensure_model(args.model, "bench"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("lora", "full"):
            for strategy, processes in (("none", 1), ("ddp", 2), ("fsdp", 2)):
                ranks = measure(model, strategy, processes, mode, args, Path(tmp))
                step = max(sum(r["seconds"]) / len(r["seconds"]) for r in ranks)
                rows.append({"mode": mode, "strategy": strategy, "processes": processes, "seconds_per_step": step,
                             "seconds_per_prompt": step / processes,
                             "peak_rss_gib_per_rank": max(r["peak_rss_bytes"] for r in ranks) / 2**30,
                             "prompt_tokens": ranks[0]["prompt_tokens"], "completion_tokens": ranks[0]["completion_tokens"]})
                print(f"{mode:<5} {strategy:<5} x{processes}: {step:7.2f} s/step  {step / processes:7.2f} s/prompt  "
                      f"peak {rows[-1]['peak_rss_gib_per_rank']:.2f} GiB/rank", flush=True)
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "platform": platform.platform()}
    try:
        machine["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {"machine": machine, "settings": {k: getattr(args, k) for k in ("steps", "completion", "generations", "threads")},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
