"""`bench eval`: our batched inference (run_inference) against R1-AQA's test script, on the same data."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from audio_rft.bench.common import CHOICES, DEFAULT_MODEL_CACHE, QUESTION, median
from audio_rft.machine import machine_info

logger = logging.getLogger(__name__)


def build_eval_set(out: str | Path, n: int = 64, seed: int = 0, min_seconds: float = 2.0, max_seconds: float = 30.0) -> Path:
    """A prepared dataset of `n` audio questions with clip lengths spread over [min_seconds, max_seconds]."""
    import numpy as np

    from audio_rft.data.dataset import DatasetWriter
    from audio_rft.data.schema import Sample

    out = Path(out)
    if (out / "data.jsonl").is_file() and len((out / "data.jsonl").read_text().splitlines()) == n:
        return out
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, builder="bench-eval", params={"n": n, "seed": seed}) as writer:
        for j in range(n):
            seconds = float(rng.uniform(min_seconds, max_seconds))
            count = int(rng.integers(1, 5))
            t = np.arange(int(seconds * 16_000)) / 16_000
            wave = 0.05 * rng.standard_normal(len(t))
            for b in range(count):
                on = (t >= 0.2 + 0.5 * b) & (t < 0.35 + 0.5 * b)
                wave[on] += 0.5 * np.sin(2 * np.pi * 880 * t[on])
            sample = Sample(id=f"bench-{j:04d}", audio=f"audio/bench-{j:04d}.wav", question=QUESTION, choices=list(CHOICES),
                            answer=CHOICES[count - 1], task="sound", sub_category="beep_count", source="bench", split="test")
            writer.add(sample, wave.astype(np.float32))
    return out


def baseline_inference(model_dir: str | Path, data: str | Path, batch_size: int = 32, max_new_tokens: int = 256,
                       limit: int | None = None) -> dict:
    """R1-AQA's src/test.py way: data order, fixed batches, HF generate with `max_new_tokens` new tokens every time."""
    import torch

    from audio_rft.data.audio import read_wav
    from audio_rft.data.dataset import load_dataset, resolve_audio
    from audio_rft.model import load_model
    from audio_rft.rollout import prompt_strings

    began = time.perf_counter()
    loaded = load_model(str(model_dir), dtype="auto", device="cpu")
    model, processor = loaded.model.eval(), loaded.processor
    load_seconds = time.perf_counter() - began
    samples = load_dataset(data, limit=limit)
    outputs, new_tokens = [], 0
    began = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        group = samples[i:i + batch_size]
        waves = [read_wav(resolve_audio(data, s)) for s in group]
        inputs = processor(text=prompt_strings(processor, group, "answer"), audio=waves, sampling_rate=16_000,
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       do_sample=False)
        generated = generated[:, inputs["input_ids"].shape[1]:]
        new_tokens += generated.numel()
        outputs += processor.batch_decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    seconds = time.perf_counter() - began
    return {"items": len(outputs), "seconds": seconds, "load_seconds": load_seconds, "items_per_second": len(outputs) / seconds,
            "generated_tokens": new_tokens, "batch_size": batch_size, "max_new_tokens": max_new_tokens}


def ours_inference(model_dir: str | Path, data: str | Path, batch_size: int = 32, max_new_tokens: int = 32,
                   limit: int | None = None) -> dict:
    """audio_rft.eval.infer.run_inference as a user runs it (fresh output, so nothing is resumed)."""
    from audio_rft.eval.infer import InferConfig, run_inference
    from audio_rft.model import load_model

    began = time.perf_counter()
    load_model(str(model_dir), dtype="auto", device="cpu")  # what run_inference's own load costs, to subtract
    load_seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predictions.json"
        began = time.perf_counter()
        run_inference(InferConfig(model=str(model_dir), data=str(data), out=str(out), batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, prompt="answer", limit=limit, device="cpu"))
        total = time.perf_counter() - began
        records = json.loads(out.read_text())
    seconds = max(total - load_seconds, 1e-9)
    return {"items": len(records), "seconds": seconds, "seconds_including_load": total, "load_seconds": load_seconds,
            "items_per_second": len(records) / seconds, "generated_tokens": sum(r["completion_tokens"] for r in records),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens}


def run_eval_bench(model_dir: str | Path, data: str | Path | None = None, items: int = 64, batch_size: int = 32,
                   ours_max_new_tokens: int = 32, baseline_max_new_tokens: int = 256, repeats: int = 1,
                   threads: int = 2, equal_length: bool = True, log=None) -> dict:
    """Items/s of our inference against R1-AQA's test-script way, interleaved `repeats` times.

    Progress goes to `log` (default: this module's logger at info)."""
    import torch

    log = log or logger.info

    torch.set_num_threads(threads)
    if data is None:
        data = build_eval_set(Path(DEFAULT_MODEL_CACHE).parent / f"bench-eval-{items}", items)
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    if equal_length:
        runs["baseline_equal_length"] = []
    # warm-up: one small batch each, not counted
    ours_inference(model_dir, data, 2, 2, limit=2)
    baseline_inference(model_dir, data, 2, 2, limit=2)
    for r in range(repeats):
        runs["ours"].append(ours_inference(model_dir, data, batch_size, ours_max_new_tokens))
        log(f"eval ours: {runs['ours'][-1]['items_per_second']:.2f} items/s")
        runs["baseline"].append(baseline_inference(model_dir, data, batch_size, baseline_max_new_tokens))
        log(f"eval baseline ({baseline_max_new_tokens} tokens): {runs['baseline'][-1]['items_per_second']:.2f} items/s")
        if equal_length:
            runs["baseline_equal_length"].append(baseline_inference(model_dir, data, batch_size, ours_max_new_tokens))
            log(f"eval baseline ({ours_max_new_tokens} tokens): "
                f"{runs['baseline_equal_length'][-1]['items_per_second']:.2f} items/s")

    def summary(entries: list[dict]) -> dict:
        best = dict(entries[0])
        best["items_per_second"] = median([e["items_per_second"] for e in entries])
        best["items_per_second_all"] = [round(e["items_per_second"], 4) for e in entries]
        return best

    out = {name: summary(entries) for name, entries in runs.items()}
    out["speedup"] = out["ours"]["items_per_second"] / out["baseline"]["items_per_second"]
    if equal_length:
        out["speedup_at_equal_length"] = out["ours"]["items_per_second"] / out["baseline_equal_length"]["items_per_second"]
    out["config"] = {"model": str(model_dir), "data": str(data), "items": items, "batch_size": batch_size,
                     "ours": f"run_inference: length-sorted batches, stop at EOS, max_new_tokens={ours_max_new_tokens}",
                     "baseline": f"R1-AQA test.py way: data order, HF generate, always {baseline_max_new_tokens} new tokens",
                     "repeats": repeats, "threads": threads, "prompt": "answer"}
    out["machine"] = machine_info(threads)
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return out

