"""Batched greedy inference over a prepared dataset, written in MMAU's prediction format.

Items are sorted by prompt length so batches carry little padding; each finished batch is appended to
`PRED.json.partial.jsonl`, so a rerun after a crash continues where it stopped. Batches are fixed by
the sorted order, so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio_rft import UserError
from audio_rft.answers import EXTRACTORS, extractor
from audio_rft.config import config_to_dict, option
from audio_rft.data.dataset import benchmark_version, load_dataset
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
    shuffle_choices: int = option(0, "also answer every item under K seeded orders of its choices (the prompt shows "
                                     "them in that order), into PRED.perm1.json ... PRED.permK.json; the report "
                                     "gives accuracy per order, answer consistency and chosen positions")
    shuffle_seed: int = option(0, "seed of those orders")
    letter_choices: bool = option(False, "show each choice as 'A. text' (MMSU's and AIR-Bench's prompts list lettered "
                                         "options, and their rules read a letter); predictions keep the choices as given")
    chosen_on: str | None = option(None, "the dataset this checkpoint was chosen on (e.g. the dev split given to "
                                         "scripts/eval_checkpoints.sh); the report flags a checkpoint chosen on the "
                                         "split it is scored on")
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


# benchmark (a sample's source) -> the key its official scorer reads the prediction from
BENCHMARK_PREDICTION_KEYS = {"mmar": "answer_prediction", "mmsu": "response", "airbench": "response"}


def prediction_record(sample: Sample, text: str, tokens: int, mode: str, extract: str = "audio-rft") -> dict:
    record = sample.to_json()
    record["sub-category"] = record.get("sub_category")  # MMAU's own key, so its script reads the file unchanged
    # A benchmark's own fields at the top level, as its official script reads them (ours win a clash of names).
    for key, value in (record.pop("benchmark_fields", None) or {}).items():
        record.setdefault(key, value)
    # Both keys, since MMAU's script has read either over its history: model_output raw, model_prediction extracted.
    record.update(model_output=text, model_prediction=extractor(extract)(text), prompt_mode=mode,
                  completion_tokens=tokens)
    if sample.source in BENCHMARK_PREDICTION_KEYS:
        record[BENCHMARK_PREDICTION_KEYS[sample.source]] = record["model_prediction"]
    return record


def choice_permutation(sample_id: str, order: int, seed: int, n_choices: int) -> list[int]:
    """The `order`-th seeded permutation of an item's choices (indices into the original list): drawn again when
    it comes out as the original order, so every order asked for really moves the choices (2 choices: swapped)."""
    rng = np.random.default_rng([seed, order, zlib.crc32(sample_id.encode("utf-8"))])
    for _ in range(100):
        permutation = rng.permutation(n_choices).tolist()
        if permutation != list(range(n_choices)) or n_choices < 2:
            return permutation
    return permutation


def permuted(sample: Sample, permutation: list[int]) -> Sample:
    return dataclasses.replace(sample, choices=[sample.choices[i] for i in permutation])


def lettered(sample: Sample) -> Sample:
    """The sample as the prompt shows it with letter_choices: "A. male", "B. female", ..."""
    return dataclasses.replace(sample, choices=[f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(sample.choices)])


def permutation_path(out: str | Path, order: int) -> Path:
    """PRED.perm<k>.json beside PRED.json: the predictions with each item's choices in its k-th order."""
    out = Path(out)
    return out.with_name(f"{out.stem}.perm{order}{out.suffix}")


def run_inference(config: InferConfig) -> Path:
    """Predict every item of `config.data` (and, with shuffle_choices=K, again under K seeded orders of its
    choices, into PRED.perm1.json … PRED.permK.json); resumable; returns the predictions file."""
    from audio_rft.vllm_rollout import check_rollout_engine

    check_mode(config.prompt)
    check_rollout_engine(config.rollout_engine)
    if config.extract not in EXTRACTORS:
        raise UserError(f"unknown extract {config.extract!r} (one of {', '.join(EXTRACTORS)})")
    if not config.model or not config.data or not config.out:
        raise UserError("infer needs model, data and out")
    if config.shuffle_choices < 0:
        raise UserError(f"shuffle_choices={config.shuffle_choices}: give a number of orders, 0 or more")
    folder, out = Path(config.data), Path(config.out)
    samples = load_dataset(folder, limit=config.limit)
    model: list = []  # loaded on first need, then shared by every order
    _predict_file(config, samples, out, model, order=0)
    for order in range(1, config.shuffle_choices + 1):
        permutations = [choice_permutation(s.id, order, config.shuffle_seed, len(s.choices)) for s in samples]
        _predict_file(config, [permuted(s, p) for s, p in zip(samples, permutations)], permutation_path(out, order),
                      model, order=order, permutations=permutations)
    order = config.shuffle_choices + 1
    while permutation_path(out, order).is_file():  # orders a former run asked for: the report would read them
        stale = permutation_path(out, order)
        for path in (stale, stale.with_name(stale.stem + ".meta.json")):
            path.unlink(missing_ok=True)
        order += 1
    return out


def _predict_file(config: InferConfig, samples: list[Sample], out: Path, model: list, order: int,
                  permutations: list[list[int]] | None = None) -> None:
    """One predictions file for these samples (order 0: the choices as given); resumable through its partial."""
    from audio_rft.model import core_model, load_model

    folder = Path(config.data)
    partial = out.with_name(out.name + ".partial.jsonl")
    # What the saved outputs depend on; `extract` is applied afterwards, so changing it reuses them.
    generation = {k: v for k, v in config_to_dict(config).items() if k not in ("extract", "shuffle_choices", "shuffle_seed", "chosen_on")}
    meta = {"model": config.model, "adapter": config.adapter, "prompt": config.prompt,
            "ablate_audio": config.ablate_audio, "data": str(folder), "n": len(samples), "config": generation,
            "benchmark_version": benchmark_version(folder)}
    if order:
        meta["choice_order"] = {"order": order, "seed": config.shuffle_seed}
    if config.chosen_on:
        meta["chosen_on"] = {"data": config.chosen_on, "version": benchmark_version(config.chosen_on)}
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
    if not model:
        from audio_rft.vllm_rollout import VLLMRollout, trained_weights

        loaded = load_model(config.model, config.adapter, config.dtype, config.device)
        # inference only: frozen weights let the decode head keep one packed copy for the whole run (frozen_linear)
        core = core_model(loaded.model).eval().requires_grad_(False)
        vllm = None
        if config.rollout_engine == "vllm":
            vllm = VLLMRollout(config.model, core, loaded.processor, core.get_input_embeddings().weight.dtype,
                               core.device, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
            if trained_weights(core):  # an adapter: its weights merged in
                vllm.load_weights(core)
        model += [loaded, core, vllm]
    loaded, core, vllm = model
    batches = batch_order(folder, samples, config.batch_size)
    started, new_items = time.perf_counter(), 0
    bar = tqdm(total=len(samples), initial=len(done), unit="item",
               desc=f"infer {config.prompt}" + (f" order {order}" if order else ""))
    with open(partial, "a", encoding="utf-8") as log:
        for group in batches:
            if all(i in done for i in group):
                continue
            shown = [lettered(samples[i]) if config.letter_choices else samples[i] for i in group]
            answers = generate_answers(core, loaded.processor, folder, shown, config.prompt, config.max_new_tokens,
                                       config.ablate_audio, vllm)
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
    for record, permutation in zip(records, permutations or []):
        record["choice_permutation"] = permutation  # the original index of each choice as shown
    atomic_write_json(out.with_name(out.stem + ".meta.json"),
                      {**meta, "extract": config.extract, "config": config_to_dict(config)})
    atomic_write_json(out, records)
    partial.unlink(missing_ok=True)


def reextract(out: str | Path, extract: str) -> bool:
    """Re-read model_prediction from model_output with another extraction, in place (no new generation), in
    PRED.json and its PRED.perm<k>.json files; False when it already used it (a file from before `extract`
    existed used audio-rft)."""
    out = Path(out)
    changed = False
    order = 0
    while order == 0 or permutation_path(out, order).is_file():
        path = out if order == 0 else permutation_path(out, order)
        changed |= _reextract_file(path, extract)
        order += 1
    return changed


def _reextract_file(out: Path, extract: str) -> bool:
    meta_path = out.with_name(out.stem + ".meta.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if meta.get("extract", "audio-rft") == extract:
        return False
    read = extractor(extract)
    records = [{**r, "model_prediction": read(r["model_output"])} for r in json.loads(out.read_text(encoding="utf-8"))]
    for r in records:
        key = BENCHMARK_PREDICTION_KEYS.get(r.get("source"))
        if key:
            r[key] = r["model_prediction"]
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
