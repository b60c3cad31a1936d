"""The checks that need a GPU (scripts/gpu_check.sh runs this, then the tests marked `gpu`).

On one CUDA GPU of 80 GB or more, with no download: Qwen2-Audio-7B-Instruct's architecture with random weights
(audio_rft.trace builds it from the shapes audio_rft.plan knows), one LoRA GRPO step of our own code at
R1-AQA's shapes (G = 8, an 833-token prompt with a 30 s clip, 32- and then 256-token completions, bf16,
gradient checkpointing, as pipelines/r1-aqa.yaml's grpo stages), measured with torch.cuda.max_memory_allocated
beside the traced prediction for the same step (fake tensors on the CPU), then one batched greedy decode
(rollout.sample, 16 prompts x 32 new tokens, the eval stage's batch) timed and measured. Writes OUT (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch


def lora_grpo_config(completion_tokens: int):
    from audio_rft.plan import plan_targets

    repo = Path(__file__).resolve().parents[1]
    targets, _ = plan_targets(repo / "pipelines" / "r1-aqa.yaml")
    config = next(config for name, _, config in targets if name == "grpo")
    return dataclasses.replace(config, max_completion_length=completion_tokens)


def grpo_steps(shapes: dict, prompt_tokens: int) -> list[dict]:
    from audio_rft.trace import trace_step

    rows = []
    for completion_tokens in (32, 256):
        config = lora_grpo_config(completion_tokens)
        predicted = trace_step("grpo", config, shapes, world=1, strategy="none", prompt_tokens=prompt_tokens)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        measured = trace_step("grpo", config, shapes, world=1, strategy="none", prompt_tokens=prompt_tokens,
                              fake=False, device="cuda")
        torch.cuda.synchronize()
        rows.append({"completion_tokens": completion_tokens, "seconds": round(time.perf_counter() - began, 1),
                     "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "counted_on_gpu_gib": measured["peak_gib"], "traced_gib": predicted["peak_gib"],
                     "traced_breakdown": predicted["breakdown"], "step_seconds_gpu": measured["step_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
        del measured
        torch.cuda.empty_cache()
    return rows


def batch_decode(shapes: dict, prompt_tokens: int, batch_size: int = 16, new_tokens: int = 32) -> dict:
    from audio_rft.compat import fake_materialize
    from audio_rft.model import build_processor
    from audio_rft.rollout import sample, with_audio_encoded
    from audio_rft.trace import build_model, model_config, prompt_batch
    from audio_rft.train.grpo import GRPOConfig

    config = GRPOConfig(model="random", lora=False, dtype="bf16")
    model = build_model(shapes, config, torch.bfloat16)
    fake_materialize(model, fake=False, device="cuda")
    model.eval().requires_grad_(False)
    processor = build_processor("bench")  # only its special-token ids are read; they exist in the 7B's vocabulary
    batch = prompt_batch(shapes, batch_size, prompt_tokens, model_config(shapes).audio_token_id,
                         shapes["text"]["vocab"]).to("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    with torch.no_grad():
        ids, _ = sample(model, processor, with_audio_encoded(model, batch), 1, new_tokens, stop_tokens=[])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return {"prompts": batch_size, "new_tokens": new_tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(ids.numel() / seconds, 1),
            "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    from audio_rft.plan import shapes_for_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--prompt-tokens", type=int, default=833)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to check", file=sys.stderr)
        return 2
    shapes = shapes_for_model("Qwen/Qwen2-Audio-7B-Instruct")
    props = torch.cuda.get_device_properties(0)
    record = {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "model": "Qwen2-Audio-7B-Instruct "
              "architecture, random weights", "prompt_tokens": args.prompt_tokens,
              "grpo_lora_steps": grpo_steps(shapes, args.prompt_tokens),
              "batch_decode": batch_decode(shapes, args.prompt_tokens)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
