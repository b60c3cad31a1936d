"""`bench plan-check`: `audio-rft plan`'s memory estimate against the measured peak RSS of one of our steps."""

from __future__ import annotations

from pathlib import Path

from audio_rft.bench.common import bench_prompt
from audio_rft.bench.steps import OursStep
from audio_rft.machine import proc_status


def _plan_check_worker(conn, model_dir: str, G: int, L: int, seconds: float, threads: int) -> None:
    try:
        import torch
        import transformers  # noqa: F401

        torch.set_num_threads(threads)
        import_rss = proc_status()["VmRSS"]
        import accelerate  # noqa: F401  the rest of what a training process imports, before any weights
        import peft  # noqa: F401

        import audio_rft.rollout  # noqa: F401
        import audio_rft.train.grpo  # noqa: F401

        libraries_rss = proc_status()["VmRSS"]
        runner = OursStep(model_dir, G)
        sample, wave = bench_prompt(runner.processor, seconds)
        result = runner.step(sample, wave, L, 0)
        conn.send({"import_rss_bytes": import_rss, "libraries_rss_bytes": libraries_rss,
                   "peak_rss_bytes": proc_status()["VmHWM"], "prompt_tokens": result["prompt_tokens"]})
    except BaseException as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def run_plan_check(model_dir: str | Path, G: int = 8, L: int = 32, seconds: float | None = None, threads: int = 2) -> dict:
    # a row per model: peak RSS of a fresh process running one of our GRPO steps, minus its RSS after importing
    # torch + transformers (and, second figure, after importing everything else a training process imports)
    """Measured peak RSS of one of our GRPO steps (fresh process, minus the torch+transformers import) against `plan`."""
    import multiprocessing as mp

    from audio_rft.plan import estimate_grpo, shapes_for_model
    from audio_rft.train.grpo import GRPOConfig

    shapes = shapes_for_model(str(model_dir))
    seconds = seconds or min(30.0, shapes["audio"]["max_source_positions"] / 50)
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_plan_check_worker, args=(child, str(model_dir), G, L, seconds, threads))
    process.start()
    measured = parent.recv()
    process.join(60)
    if "error" in measured:
        raise RuntimeError(measured["error"])
    config = GRPOConfig(model=str(model_dir), lora=True, num_generations=G, max_completion_length=L, batch_size=1,
                        dtype="fp32", device="cpu")
    plan = estimate_grpo(config, shapes, prompt_tokens=measured["prompt_tokens"], device="cpu")
    step_bytes = measured["peak_rss_bytes"] - measured["import_rss_bytes"]
    tensor_bytes = measured["peak_rss_bytes"] - measured["libraries_rss_bytes"]
    return {"model": str(model_dir), "G": G, "completion_tokens": L, "audio_seconds": seconds,
            "prompt_tokens": measured["prompt_tokens"], "measured_step_bytes": step_bytes,
            "measured_step_bytes_after_all_imports": tensor_bytes,
            "import_rss_bytes": measured["import_rss_bytes"], "libraries_rss_bytes": measured["libraries_rss_bytes"],
            "peak_rss_bytes": measured["peak_rss_bytes"], "plan_peak_bytes": plan["peak_bytes"],
            "plan_terms": plan["terms"], "plan_over_measured": plan["peak_bytes"] / step_bytes,
            "plan_over_measured_after_all_imports": plan["peak_bytes"] / tensor_bytes}

