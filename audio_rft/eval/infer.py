"""Batched greedy inference over a prepared dataset, written in MMAU's prediction format.

Items are sorted by prompt length so batches carry little padding; each finished batch is appended to
`PRED.json.partial.jsonl`, so a rerun after a crash continues where it stopped. Batches are fixed by
the sorted order, so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from audio_rft import UserError
from audio_rft.answers import EXTRACTORS, extractor
from audio_rft.config import config_to_dict, option
from audio_rft.data.dataset import load_dataset
from audio_rft.data.schema import Sample
from audio_rft.fileio import atomic_write_json
from audio_rft.prompts import check_mode


@dataclass
class InferConfig:
    model: str = option("", "model: hub id or local folder (a tiny preset, a full checkpoint)")
    data: str = option("", "prepared dataset folder")
    out: str = option("", "predictions file (JSON list, MMAU format)")
    adapter: str | None = option(None, "PEFT adapter folder to put on the model")
    prompt: str = option("answer", "prompt mode: direct, answer or think")
    extract: str = option("audio-rft", "how model_prediction is read from the output: audio-rft (the last <answer>, "
                                       "think blocks dropped) or r1-aqa (the paper's: the first <answer>, else all)")
    batch_size: int = option(16, "prompts per batch")
    max_new_tokens: int = option(32, "completion length limit (raise it for think)")
    ablate_audio: bool = option(False, "replace every clip with silence of the same length (the no-listening control)")
    limit: int | None = option(None, "only the first N items")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    rollout_engine: str = option("native", "native (our decode loop) or vllm (30 s audio window; "
                                           "pip install 'audio-rft[vllm]', README \"Rollouts on vLLM\")")
    vllm_gpu_memory_utilization: float = option(0.8, "share of the GPU the vLLM engine takes (weights, KV cache)")


def _length_key(folder: Path, sample: Sample) -> tuple:
    from audio_rft.data.dataset import resolve_audio

    try:
        size = resolve_audio(folder, sample).stat().st_size
    except OSError:
        size = 0
    return (size, len(sample.question) + sum(map(len, sample.choices)))


def batch_order(folder: Path, samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (audio size, then text length)."""
    order = sorted(range(len(samples)), key=lambda i: (_length_key(folder, samples[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_answers(core, processor, folder: Path, samples: list[Sample], mode: str, max_new_tokens: int,
                     ablate_audio: bool = False, vllm=None) -> list[tuple[str, int]]:
    """Greedy completions for one batch: (text, completion token count) per sample; on `vllm` (a
    vllm_rollout.VLLMRollout) when given, the same tokens (tests/test_vllm.py)."""
    from audio_rft.rollout import decode, encode_prompts, load_waveforms, sample

    waveforms = load_waveforms(folder, samples, ablate_audio)
    if vllm is not None:
        ids, mask, _ = vllm.sample(processor, samples, waveforms, mode, 1, max_new_tokens)
        return list(zip(decode(processor, ids, mask), mask.sum(1).tolist()))
    batch = encode_prompts(processor, samples, waveforms, mode)
    ids, mask = sample(core, processor, batch.to(core.device), 1, max_new_tokens, temperature=0.0)
    return list(zip(decode(processor, ids, mask), mask.sum(1).tolist()))


def predict(core, processor, folder: str | Path, samples: list[Sample], mode: str, batch_size: int = 16,
            max_new_tokens: int = 32, ablate_audio: bool = False, progress: bool = False) -> list[tuple[str, int]]:
    """Greedy completions for all samples, in input order (used by training's held-out evaluation)."""
    was_training = core.training
    core.eval()
    results: list[tuple[str, int] | None] = [None] * len(samples)
    for group in tqdm(batch_order(Path(folder), samples, batch_size), disable=not progress, unit="batch"):
        for i, result in zip(group, generate_answers(core, processor, Path(folder), [samples[i] for i in group],
                                                     mode, max_new_tokens, ablate_audio)):
            results[i] = result
    core.train(was_training)
    return results  # type: ignore[return-value]


def prediction_record(sample: Sample, text: str, tokens: int, mode: str, extract: str = "audio-rft") -> dict:
    record = sample.to_json()
    record["sub-category"] = record.get("sub_category")  # MMAU's own key, so its script reads the file unchanged
    # Both keys, since MMAU's script has read either over its history: model_output raw, model_prediction extracted.
    record.update(model_output=text, model_prediction=extractor(extract)(text), prompt_mode=mode,
                  completion_tokens=tokens)
    return record


def run_inference(config: InferConfig) -> Path:
    """Predict every item of `config.data`; resumable; returns the predictions file."""
    from audio_rft.model import core_model, load_model

    from audio_rft.vllm_rollout import VLLMRollout, check_rollout_engine, trained_weights

    check_mode(config.prompt)
    check_rollout_engine(config.rollout_engine)
    if config.extract not in EXTRACTORS:
        raise UserError(f"unknown extract {config.extract!r} (one of {', '.join(EXTRACTORS)})")
    if not config.model or not config.data or not config.out:
        raise UserError("infer needs model, data and out")
    folder, out = Path(config.data), Path(config.out)
    samples = load_dataset(folder, limit=config.limit)
    partial = out.with_name(out.name + ".partial.jsonl")
    # What the saved outputs depend on; `extract` is applied afterwards, so changing it reuses them.
    generation = {k: v for k, v in config_to_dict(config).items() if k != "extract"}
    meta = {"model": config.model, "adapter": config.adapter, "prompt": config.prompt,
            "ablate_audio": config.ablate_audio, "data": str(folder), "n": len(samples), "config": generation}
    done: dict[int, tuple[str, int]] = {}
    if partial.exists():
        data, whole = partial.read_bytes(), 0  # whole: bytes of the whole lines read
        # split at "\n" only (an output may hold U+2028); what follows the last "\n" is empty or cut
        for line in data.split(b"\n")[:-1]:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a line cut by the crash: redo from there
            whole += len(line) + 1
            if entry.get("meta") is not None:
                if entry["meta"] != meta:
                    partial.unlink()  # predictions from another config: start over
                    done = {}
                    break
                continue
            done[entry["index"]] = (entry["output"], entry["tokens"])
        if partial.exists() and whole == 0:
            partial.unlink()  # not even the meta line is whole
        elif partial.exists() and whole < len(data):
            with open(partial, "r+b") as f:  # drop the cut line, so new lines never follow it
                f.truncate(whole)
    if not partial.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"meta": meta}) + "\n", encoding="utf-8")
    loaded = load_model(config.model, config.adapter, config.dtype, config.device)
    # inference only: frozen weights let the decode head keep one packed copy for the whole run (frozen_linear)
    core = core_model(loaded.model).eval().requires_grad_(False)
    vllm = None
    if config.rollout_engine == "vllm":
        vllm = VLLMRollout(config.model, core, loaded.processor, core.get_input_embeddings().weight.dtype, core.device,
                           gpu_memory_utilization=config.vllm_gpu_memory_utilization)
        if trained_weights(core):  # an adapter: its weights merged in
            vllm.load_weights(core)
    batches = batch_order(folder, samples, config.batch_size)
    started, new_items = time.perf_counter(), 0
    bar = tqdm(total=len(samples), initial=len(done), unit="item", desc=f"infer {config.prompt}")
    with open(partial, "a", encoding="utf-8") as log:
        for group in batches:
            if all(i in done for i in group):
                continue
            answers = generate_answers(core, loaded.processor, folder, [samples[i] for i in group], config.prompt,
                                       config.max_new_tokens, config.ablate_audio, vllm)
            lines = []
            for i, (text, tokens) in zip(group, answers):
                done[i] = (text, tokens)
                lines.append(json.dumps({"index": i, "output": text, "tokens": tokens}, ensure_ascii=False) + "\n")
            log.write("".join(lines))  # one write per batch: a crash loses at most the batch in flight
            log.flush()
            new_items += len(group)
            bar.update(len(group))
            bar.set_postfix(items_per_s=f"{new_items / (time.perf_counter() - started):.2f}")
    bar.close()
    records = [prediction_record(s, *done[i], config.prompt, config.extract) for i, s in enumerate(samples)]
    atomic_write_json(out.with_name(out.stem + ".meta.json"),
                      {**meta, "extract": config.extract, "config": config_to_dict(config)})
    atomic_write_json(out, records)
    partial.unlink(missing_ok=True)
    return out


def reextract(out: str | Path, extract: str) -> bool:
    """Re-read model_prediction from model_output with another extraction, in place (no new generation);
    False when the file already used it (a file from before `extract` existed used audio-rft)."""
    out = Path(out)
    meta_path = out.with_name(out.stem + ".meta.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if meta.get("extract", "audio-rft") == extract:
        return False
    read = extractor(extract)
    records = [{**r, "model_prediction": read(r["model_output"])} for r in json.loads(out.read_text(encoding="utf-8"))]
    atomic_write_json(out, records)
    atomic_write_json(meta_path, {**meta, "extract": extract, "config": {**meta.get("config", {}), "extract": extract}})
    return True


def run_argv(argv: list[str]) -> int:
    """`audio-rft infer [--config FILE] [key=value ...]` (or `--model M --data D --out PRED.json ...`)."""
    from audio_rft.config import parse_command

    config, _ = parse_command(InferConfig, argv, "audio-rft infer", description=(
        "Greedy answers for every item of a prepared dataset, written as MMAU predictions (model_output, "
        "model_prediction). Needs model, data and out. Resumable: rerun the same command after a crash."))
    print(run_inference(config))
    return 0
