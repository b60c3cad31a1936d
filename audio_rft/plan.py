"""`audio-rft plan`: estimate per-GPU memory of one GRPO or SFT step before renting the GPU.

Each stage of a pipeline is planned under what it runs as: its `launch:` line's strategy and process count
(audio_rft.launch), or `--gpus N` of them. The formulas below are the fast first estimate; `--trace` runs one
step of our own code at full size on fake tensors (audio_rft.trace) and the traced peak decides what fits.

It stays one module (over 500 lines) because its memory terms must be read together: one formula per term,
each checked against the code it models, and the shapes, the estimate and its table share them.

The estimate adds up what our own loop holds (audio_rft.train.grpo / sft, audio_rft.rollout, and the
strategy's engine, audio_rft.train.engine), term by term, so each line of the table can be checked
against the code. Static terms, by strategy (N GPUs; "/N": each GPU holds its shard):

- none / ddp (every GPU holds everything): LoRA keeps the base in the model dtype and PEFT's adapters in
  fp32; full fine-tuning in 16 bits loads the whole model in fp32 (the weights are the master weights,
  engine.master_dtype), so gradients are fp32 too and there is no separate master copy. AdamW's two
  states are fp32. ddp keeps the gradients in its reducer's buckets (gradient_as_bucket_view): no copy;
- fsdp (FSDP2 on every encoder and decoder layer and the root): weights loaded in fp32 (LoRA too),
  weights, gradients and AdamW state /N;
- zero3 (DeepSpeed): the module in the compute dtype /N, fp32 master weights, gradients and AdamW state
  /N; zero2: the module replicated, the rest /N;
- full fine-tuning with β > 0 keeps a frozen reference copy in the compute dtype: /N under fsdp,
  replicated under DeepSpeed and none/ddp (LoRA needs none: the adapter is disabled instead).

Phases, each on top of the static part:

- training pass: gradients; activations: our loop prefills each prompt once and repeats its K/V G times
  (shared prefix). Without gradient checkpointing it keeps activations for P + G·L tokens per prompt and
  the G copies of the prompt's K/V for backward; with checkpointing every decoder layer of the prefill
  (P tokens) and of the completion pass (G·L tokens) keeps only its input plus one layer's
  recomputation, next to the prompt's K/V and its G copies;
- logits (fp32) at completion positions only, one chunk at a time (recomputed in backward);
- the rollout: a KV cache for B·G sequences of P + L tokens (rollout.prefill repeats the prompt cache G
  times with batch_repeat_interleave, so it is G real copies);
- the reference pass (no gradients): its cache and one chunk of logits;
- what the strategy adds to every pass: none/ddp full fine-tuning in 16 bits, torch.autocast's cached
  16-bit casts of the trainable fp32 weights (kept until the pass ends); fsdp, the gathered root
  (embeddings, head, projector, encoder convolutions: gathered for the whole pass) plus two gathered
  layers (the one computing and the one prefetched), and in backward a unit's unsharded gradients and
  their fp32 cast for the reduce-scatter; zero3, the largest module and the prefetch bucket gathered;
  DeepSpeed, its reduce bucket.

The peak is the static part plus the largest phase (rollout, reference pass, or the training pass with
its gradients), plus 1 GiB of CUDA context per GPU. `audio-rft plan --gpus N` prints the table for the
chosen strategy and the per-GPU totals of ddp, fsdp and zero3 side by side. `audio-rft bench
plan-check` compares the formulas with measured peaks of a real step on CPU; docs/performance.md
records that comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from audio_rft import UserError

GIB = 2**30
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context + kernels: outside torch's allocator, on every GPU process
HEADROOM = 0.10  # fragmentation / allocator slack we want left over before calling it a fit
LOGPROB_CHUNK = 4096  # rollout.token_logprobs' chunk size in rows...
LOGPROB_CHUNK_ELEMENTS = 2**25  # ...and in logits (rollout.LOGPROB_CHUNK_ELEMENTS), whichever is smaller
STRATEGY_CHOICES = ("auto", "none", "ddp", "fsdp", "deepspeed", "zero2", "zero3")  # deepspeed: the config's zero_stage
SIDE_BY_SIDE = ("ddp", "fsdp", "zero3")  # what `plan` compares for every stage
ZERO3_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default (parameters)
ZERO_REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default (elements)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Qwen2-Audio-7B(-Instruct): config.json of the hub repos (no download needed to plan).
QWEN2_AUDIO_7B = {
    "audio": {"mels": 128, "d_model": 1280, "layers": 32, "heads": 20, "ffn": 5120, "max_source_positions": 1500},
    "text": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "head_dim": 128, "intermediate": 11008,
             "vocab": 156032, "tied": False},
}
KNOWN_MODELS = {"Qwen/Qwen2-Audio-7B-Instruct": QWEN2_AUDIO_7B, "Qwen/Qwen2-Audio-7B": QWEN2_AUDIO_7B}
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


# ---------------------------------------------------------------- shapes and parameter counts


def architecture_ties_embeddings() -> bool:
    """Whether the installed transformers' Qwen2AudioForConditionalGeneration can tie lm_head to the embeddings.

    transformers 5.x declares no tied weights for it, so a config's tie_word_embeddings is ignored there and
    the model carries a separate lm_head (the plan counts what the model will really hold)."""
    try:
        from transformers import Qwen2AudioForConditionalGeneration

        from audio_rft.compat import declares_tied_weights
    except ImportError:
        return True
    return declares_tied_weights(Qwen2AudioForConditionalGeneration)


def shapes_from_config(config: dict) -> dict:
    """Shapes from a Qwen2-Audio config.json (a dict)."""
    a, t = config.get("audio_config", {}), config.get("text_config", {})
    try:
        heads = t["num_attention_heads"]
        return {
            "audio": {"mels": a.get("num_mel_bins", 128), "d_model": a["d_model"], "layers": a["encoder_layers"],
                      "heads": a["encoder_attention_heads"], "ffn": a["encoder_ffn_dim"],
                      "max_source_positions": a.get("max_source_positions", 1500)},
            "text": {"hidden": t["hidden_size"], "layers": t["num_hidden_layers"], "heads": heads,
                     "kv_heads": t.get("num_key_value_heads") or heads,
                     "head_dim": t.get("head_dim") or t["hidden_size"] // heads, "intermediate": t["intermediate_size"],
                     "vocab": t["vocab_size"],
                     "tied": bool(t.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
                     and architecture_ties_embeddings()},
        }
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}: not a Qwen2-Audio config") from None


def shapes_for_model(model: str) -> dict:
    """A local folder's config.json, else the known shapes of a Qwen2-Audio-7B hub id."""
    path = Path(model) / "config.json"
    if path.is_file():
        shapes = shapes_from_config(json.loads(path.read_text()))
        shapes["source"] = str(path)
        return shapes
    if model in KNOWN_MODELS:
        shapes = json.loads(json.dumps(KNOWN_MODELS[model]))
        shapes["source"] = f"known shapes of {model}"
        return shapes
    raise UserError(f"model {model!r}: no local config.json and not one of the known hub ids "
                    f"({', '.join(KNOWN_MODELS)}); pass a local model folder")


def shapes_for_preset(preset: str) -> dict:
    """Shapes of an offline preset (audio_rft.model.PRESETS) without building it; the tokenizer's vocabulary
    is approximated by its target size when the preset does not fix the model's vocabulary."""
    from audio_rft.model import PRESETS

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}")
    p = PRESETS[preset]
    return {
        "audio": {"mels": p["mel_bins"], "d_model": p["audio_width"], "layers": p["audio_layers"], "heads": p["audio_heads"],
                  "ffn": 4 * p["audio_width"], "max_source_positions": 50 * p["window_seconds"]},
        "text": {"hidden": p["text_width"], "layers": p["text_layers"], "heads": p["text_heads"], "kv_heads": p["kv_heads"],
                 "head_dim": p["head_dim"], "intermediate": 4 * p["text_width"],
                 "vocab": p["vocab_size"] or (p["tokenizer_vocab"] + 63) // 64 * 64,
                 "tied": p["tie_embeddings"] and architecture_ties_embeddings()},
        "source": f"the {preset} preset's shapes",
    }


def lm_layer_params(t: dict) -> int:
    """One Qwen2 decoder layer: q/k/v (with bias), o, gate/up/down, two RMSNorms."""
    h, q, kv, inter = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"], t["intermediate"]
    return h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * inter + 2 * h


def parameter_counts(shapes: dict) -> dict[str, int]:
    """Exact parameter counts of Qwen2AudioForConditionalGeneration with these shapes."""
    a, t = shapes["audio"], shapes["text"]
    d, ffn = a["d_model"], a["ffn"]
    audio = (a["mels"] * d * 3 + d) + (d * d * 3 + d) + a["max_source_positions"] * d \
        + a["layers"] * (4 * d * d + 2 * d * ffn + 8 * d + ffn) + 2 * d
    projector = d * t["hidden"] + t["hidden"]
    embed = t["vocab"] * t["hidden"]
    head = 0 if t["tied"] else t["vocab"] * t["hidden"]
    layers = t["layers"] * lm_layer_params(t)
    language = embed + layers + t["hidden"] + head
    return {"audio_tower": audio, "projector": projector, "language_model": language, "embeddings": embed,
            "lm_head": head, "total": audio + projector + language}


def lora_parameters(t: dict, rank: int, targets: list[str] | None = None) -> int:
    h, q, kv, inter = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"], t["intermediate"]
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    chosen = _lora_modules(targets)
    return t["layers"] * sum(rank * (i + o) for name, (i, o) in shapes.items() if name in chosen)


def _lora_modules(targets: list[str] | None) -> set[str]:
    if not targets:
        return set(LORA_TARGETS)
    text = " ".join(targets)
    return {name for name in LORA_TARGETS if name in text} or set(LORA_TARGETS)


# ---------------------------------------------------------------- the estimate


@dataclass
class Layout:
    """What one step processes on one device."""

    prompts: int  # B
    generations: int  # G (1 for SFT)
    prompt_tokens: int  # P
    completion_tokens: int  # L (SFT: target tokens)


def _activation_elements_per_token_layer(t: dict, lora: bool, lora_dropout: float, lora_rank: int,
                                         modules: set[str]) -> int:
    """Elements one decoder layer keeps for backward, per token (flash/SDPA attention: no score matrix)."""
    h, q, kv, inter = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"], t["intermediate"]
    elements = (2 * h  # input RMSNorm: its input and output (the q/k/v input)
                + q + 2 * kv  # q, k, v projections
                + q + kv  # rotary outputs of q and k
                + 2 * q  # attention output and its reshaped copy (o_proj input)
                + h  # residual
                + 2 * h  # post-attention RMSNorm input and output
                + 4 * inter)  # gate, up, act(gate), act(gate)*up
    if lora:
        inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": inter}
        for name in modules:
            elements += lora_rank  # lora_A output
            if lora_dropout > 0:
                elements += inputs[name]  # PEFT applies dropout to each adapted module's input separately
    return elements


def resolve_strategy(strategy: str, gpus: int, zero_stage: int = 3) -> str:
    """The strategy a run of `gpus` processes gets (audio_rft.train.engine.resolve_strategy), with
    deepspeed spelled by its ZeRO stage: none, ddp, fsdp, zero2 or zero3."""
    if gpus < 1:
        raise UserError(f"gpus {gpus}: need at least 1")
    if strategy not in STRATEGY_CHOICES:
        raise UserError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGY_CHOICES)}")
    if strategy == "auto":
        return "ddp" if gpus > 1 else "none"
    if strategy in ("ddp", "fsdp") and gpus == 1:
        return "none"  # one process: nothing to average or shard
    if strategy == "deepspeed":
        if zero_stage not in (2, 3):
            raise UserError(f"zero_stage {zero_stage}: choose 2 or 3")
        return f"zero{zero_stage}"
    return strategy


def unit_parameters(shapes: dict) -> dict[str, int]:
    """Parameters of the units FSDP2 gathers (engine._fully_shard: each encoder layer, each decoder layer,
    and the root: embeddings, head, projector, encoder convolutions, position table and norms), and of the
    largest single module (what ZeRO-3 gathers at once: the embedding table or the head)."""
    a, t = shapes["audio"], shapes["text"]
    d, ffn = a["d_model"], a["ffn"]
    counts = parameter_counts(shapes)
    encoder_layer = 4 * d * d + 2 * d * ffn + 8 * d + ffn
    decoder_layer = lm_layer_params(t)
    root = counts["total"] - a["layers"] * encoder_layer - t["layers"] * decoder_layer
    return {"encoder_layer": encoder_layer, "decoder_layer": decoder_layer, "root": root,
            "largest_module": max(counts["embeddings"], counts["lm_head"], t["hidden"] * t["intermediate"])}


def estimate(kind: str, config, shapes: dict, prompt_tokens: int = 830, device: str = "cuda", gpus: int = 1,
             strategy: str | None = None) -> dict:
    """Per-GPU memory terms (bytes) of one `kind` ("grpo" or "sft") step for a GRPOConfig / SFTConfig, on
    `gpus` GPUs under `strategy` (default: the config's; auto is ddp on several GPUs, else none)."""
    a, t = shapes["audio"], shapes["text"]
    counts = parameter_counts(shapes)
    dtype = config.dtype
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype {config.dtype!r}: plan knows bf16, fp16, fp32 and auto")
    w = DTYPE_BYTES[dtype]
    mixed = w < 4  # 16-bit compute
    strategy = resolve_strategy(strategy or getattr(config, "strategy", "auto"), gpus, getattr(config, "zero_stage", 3))
    N = gpus if strategy in ("fsdp", "zero2", "zero3") else 1

    def shard(nbytes: int) -> int:  # one rank's share (FSDP2 pads each parameter to a multiple of N)
        return -(-nbytes // N)

    grpo = kind == "grpo"
    B = config.batch_size
    G = config.num_generations if grpo else 1
    L = config.max_completion_length if grpo else config.max_target_tokens
    P = prompt_tokens
    layers, h, V = t["layers"], t["hidden"], t["vocab"]
    kv_width = 2 * t["kv_heads"] * t["head_dim"]  # K and V per token per layer
    modules = _lora_modules(config.lora_targets)
    lora = config.lora
    projector = counts["projector"] if config.train_projector else 0
    units = unit_parameters(shapes)
    terms: dict[str, int] = {}
    notes: list[str] = []

    # static: weights, reference copy, optimizer state (engine.master_dtype: what the weights are loaded in)
    if lora:
        adapters = lora_parameters(t, config.lora_rank, config.lora_targets)
        trainable = adapters + projector
        root_trainable, layer_trainable = projector, adapters // layers
    else:
        adapters = 0
        trainable = counts["language_model"] + projector
        root_trainable = counts["embeddings"] + counts["lm_head"] + t["hidden"] + projector
        layer_trainable = units["decoder_layer"]
    if strategy in ("none", "ddp"):
        # LoRA: the base in the compute dtype, PEFT's adapters in fp32 (autocast_adapter_dtype). Full
        # fine-tuning in 16 bits: the whole model loaded in fp32 (the weights are the master weights).
        weight_bytes = w if lora else 4
    elif strategy == "fsdp":
        weight_bytes = 4  # sharded in one dtype: fp32 (FSDP2's policy gathers them in the compute dtype)
    else:
        weight_bytes = w  # DeepSpeed's bf16 mode holds the module in bf16; fp32 master weights in the optimizer
    shard_weights = shard if strategy in ("fsdp", "zero3") else (lambda nbytes: nbytes)  # ZeRO-2: replicated
    terms["weights"] = shard_weights(counts["total"] * weight_bytes)
    if lora:
        terms["lora_adapters"] = shard_weights(adapters * (w if strategy in ("zero2", "zero3") else 4))
    if grpo and config.beta and not lora:
        reference = counts["total"] * w  # frozen, in the compute dtype (engine._frozen_copy)
        terms["reference_model"] = shard(reference) if strategy == "fsdp" else reference  # DeepSpeed: replicated
    terms["optimizer_states"] = shard(trainable * 2 * 4)
    if strategy in ("zero2", "zero3") and mixed:
        terms["fp32_master_weights"] = shard(trainable * 4)
    grad_bytes = 4  # fp32: the trainable weights are fp32 (DeepSpeed: its fp32 gradient partition)
    static = sum(terms.values())

    # what every pass of the policy holds on top, by strategy
    per_pass: dict[str, int] = {}
    if strategy in ("none", "ddp") and not lora and mixed:
        # torch.autocast caches the 16-bit cast of every fp32 weight that requires grad until the pass ends
        # (engine.run wraps a whole pass); without checkpointing backward keeps those casts anyway.
        per_pass["autocast_weight_copies"] = trainable * w
    elif strategy == "fsdp":
        # the root (embeddings, head, projector, encoder convolutions) stays gathered for the whole pass;
        # each layer is gathered when called, the next one prefetched
        per_pass["gathered_parameters"] = (units["root"] + 2 * max(units["decoder_layer"], units["encoder_layer"])) * w
    elif strategy == "zero3":
        per_pass["gathered_parameters"] = (units["largest_module"] + ZERO3_PREFETCH_BUCKET) * w
    # full fine-tuning's frozen reference: FSDP2 shards it and gathers its units the same way; under
    # DeepSpeed it is a plain replicated module (nothing to gather)
    gathered_reference = dict(per_pass) if strategy == "fsdp" else {}

    # training pass
    checkpointing = config.gradient_checkpointing
    per_layer = _activation_elements_per_token_layer(t, lora, config.lora_dropout, config.lora_rank, modules)
    attention_probs = device == "cpu"  # CPU attention with masks falls back to the math kernel, which keeps them
    heads = t["heads"]
    train: dict[str, int] = {}
    train["gradients"] = shard(trainable * grad_bytes)
    if strategy == "fsdp" and mixed:
        # a unit's gradients arrive unsharded in the compute dtype and are cast to fp32 to be reduce-scattered;
        # the root's are held until the end of backward
        train["unsharded_gradients"] = max(root_trainable, layer_trainable) * (w + 4)
    elif strategy in ("zero2", "zero3"):
        train["zero_reduce_bucket"] = min(trainable, ZERO_REDUCE_BUCKET) * w
    if checkpointing:
        # every decoder layer of the prefill (B·P tokens) and of the completion pass (B·G·L tokens) keeps only its
        # input, plus one layer's recomputation in backward (the larger of the two passes)
        train["activations"] = (B * P + B * G * L) * h * w * layers + max(B * P, B * G * L) * per_layer * w
        if G > 1:  # the prompt's K/V (written once), its G copies read by the completion pass, + one layer's prefix+new
            train["prefix_kv_copies"] = B * (G + 1) * P * kv_width * w * layers + B * G * (P + L) * kv_width * w
        if attention_probs:
            train["attention_scores"] = layers * B * heads * P * P * w + B * G * heads * L * (P + L) * w
    else:
        tokens = B * (P + G * L)
        train["activations"] = tokens * per_layer * w * layers
        if G > 1:
            train["prefix_kv_copies"] = B * G * (P + L) * kv_width * w * layers
        if attention_probs:
            train["attention_scores"] = layers * B * heads * (P * P + G * L * (P + L)) * w
    completion = B * G * L
    chunk = min(completion, LOGPROB_CHUNK, max(1, LOGPROB_CHUNK_ELEMENTS // V))
    # rollout.token_logprobs keeps no logits for backward: a trained head recomputes each chunk there, a frozen
    # one takes the chunk's gradient in the forward; either way one chunk's fp32 logits, its log-softmax and
    # gradient (at most) are alive at a time, never all the completion's
    train["logits"] = 3 * chunk * V * 4
    train["hidden_states"] = 3 * B * G * (P + L) * h * w  # embeddings, final norm, gathered hidden for the head
    train.update(per_pass)

    phases: dict[str, dict[str, int]] = {"train": train}
    if grpo:
        audio_transient = B * (a["max_source_positions"] * (4 * a["d_model"] + a["ffn"])
                               + a["heads"] * a["max_source_positions"] ** 2) * w
        phases["rollout"] = {
            "kv_cache": B * G * (P + L) * kv_width * w * layers + B * G * (P + L) * kv_width * w,  # + one layer's cat copy
            "prefill_transient": B * P * (per_layer * w + (heads * P * w if attention_probs else 0)) + audio_transient,
            "sampling_logits": 4 * B * G * V * 4,
            # fsdp gathers the whole model once for the decode loop (engine.Engine.gathered)
            **({"gathered_for_sampling": counts["total"] * w} if strategy == "fsdp" else per_pass),
        }
        reference = {
            "kv_cache": B * G * (P + L) * kv_width * w * layers,
            "logits_chunk": chunk * V * (w + 8),
            "prefill_transient": B * P * per_layer * w + audio_transient,
        }
        if config.beta:  # the frozen copy (no autocast cache: nothing in it requires grad), or LoRA's disabled adapter
            phases["reference"] = {**reference, **(gathered_reference if not lora else per_pass)}
        if config.num_iterations > 1:
            phases["old_policy"] = {**reference, **per_pass}
    peaks = {name: sum(values.values()) for name, values in phases.items()}
    worst = max(peaks, key=peaks.get)
    peak = static + peaks[worst]
    total = peak + (CUDA_CONTEXT_BYTES if device != "cpu" else 0)
    return {"kind": kind, "dtype": dtype, "device": device, "lora": lora, "gradient_checkpointing": checkpointing,
            "strategy": strategy, "gpus": gpus,
            "layout": {"prompts": B, "generations": G, "prompt_tokens": P, "completion_tokens": L},
            "parameters": counts, "trainable_parameters": trainable,
            "terms": {**terms, **{f"{worst}/{k}": v for k, v in phases[worst].items()}},
            "static": terms, "phases": phases, "phase_peaks": peaks, "peak_phase": worst, "peak_bytes": peak,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES if device != "cpu" else 0, "total_bytes": total, "notes": notes}


def estimate_grpo(config, shapes: dict, prompt_tokens: int = 830, device: str = "cuda") -> dict:
    return estimate("grpo", config, shapes, prompt_tokens, device)


def verdict(total_bytes: int, gpu_gb: float) -> str:
    capacity = gpu_gb * GIB
    if total_bytes <= capacity * (1 - HEADROOM):
        return f"fits on a {gpu_gb:g} GB GPU ({total_bytes / capacity:.0%} of it)"
    if total_bytes <= capacity:
        return f"tight on a {gpu_gb:g} GB GPU ({total_bytes / capacity:.0%}; under {HEADROOM:.0%} left for fragmentation)"
    return f"does NOT fit on a {gpu_gb:g} GB GPU ({total_bytes / capacity:.0%} of it)"


def fits(total_bytes: int, gpu_gb: float) -> bool:
    return total_bytes <= gpu_gb * GIB * (1 - HEADROOM)


def format_table(name: str, result: dict, gpu_gb: float) -> str:
    lay = result["layout"]
    mode = ("LoRA" if result["lora"] else "full") + (", gradient checkpointing" if result["gradient_checkpointing"] else "")
    gpus = result.get("gpus", 1)
    lines = [f"{name}: {result['kind'].upper()} step, {result['dtype']}, {mode}; "
             f"{lay['prompts']} prompt(s) x G={lay['generations']}, "
             f"prompt {lay['prompt_tokens']} + {lay['completion_tokens']} tokens; "
             f"{result['parameters']['total'] / 1e9:.2f}B parameters ({result['trainable_parameters'] / 1e6:,.1f}M trainable); "
             f"strategy {result.get('strategy', 'none')} on {gpus} GPU{'s' if gpus > 1 else ''}"]
    for key, value in result["static"].items():
        lines.append(f"  {key:<34}{value / GIB:>9.2f} GiB")
    for phase, values in result["phases"].items():
        marker = "  <- peak" if phase == result["peak_phase"] else ""
        lines.append(f"  [{phase}]{'':<{31 - len(phase)}}{sum(values.values()) / GIB:>9.2f} GiB{marker}")
        for key, value in values.items():
            lines.append(f"    {key:<32}{value / GIB:>9.2f} GiB")
    lines.append(f"  {'peak (static + largest phase)':<34}{result['peak_bytes'] / GIB:>9.2f} GiB")
    if result["cuda_context_bytes"]:
        lines.append(f"  {'+ CUDA context':<34}{result['cuda_context_bytes'] / GIB:>9.2f} GiB")
    lines.append(f"  {'total per GPU':<34}{result['total_bytes'] / GIB:>9.2f} GiB: {verdict(result['total_bytes'], gpu_gb)}")
    if result.get("strategies"):
        cells = []
        for label, other in result["strategies"].items():
            resolved = f" (= {other['strategy']})" if other["strategy"] != label else ""
            cells.append(f"{label}{resolved} {other['per_gpu_gib']:.2f} GiB {'fits' if other['fits'] else 'does NOT fit'}")
        lines.append(f"  {'per GPU by strategy, ' + str(gpus) + ' GPU' + ('s' if gpus > 1 else ''):<34}" + " | ".join(cells))
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result.get("launch"):
        lines.append(f"  launch: {result['launch']['text']}")
    traced_lines = format_trace(result)
    if traced_lines:
        lines.append(traced_lines)
    return "\n".join(lines)


def fit_summary(results: list[dict], gpu_gb: float) -> str:
    """One line per stage: strategy, processes, per-GPU figure (traced where traced) and whether it fits."""
    lines = [f"summary on {gpu_gb:g} GB GPUs (per GPU; 'trace' where traced, else the formula's first estimate):"]
    for r in results:
        launch = r.get("launch") or {"processes": r.get("gpus", 1)}
        lines.append(f"  {r['name']:<14}{r['strategy']:<6} x{launch['processes']:<3}{r['per_gpu_gib']:>8.2f} GiB "
                     f"({r['fits_by']}{', formula ' + format(r['formula_gib'], '.2f') if r['fits_by'] == 'trace' else ''})"
                     f"  {'fits' if r['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- configs and pipelines


def _config_class(kind: str):
    if kind == "grpo":
        from audio_rft.train.grpo import GRPOConfig

        return GRPOConfig
    if kind == "sft":
        from audio_rft.train.sft import SFTConfig

        return SFTConfig
    raise UserError(f"plan knows stage kinds grpo and sft, not {kind!r}")


def _guess_kind(values: dict) -> str:
    grpo_keys = {"num_generations", "beta", "max_completion_length", "temperature", "rewards", "epsilon_low",
                 "epsilon_high", "num_iterations", "loss_type", "scale_rewards"}
    if set(values) & grpo_keys:
        return "grpo"
    if "max_target_tokens" in values:
        return "sft"
    return "grpo"


def _model_shapes(model: str, stages: list, seen: tuple[str, ...] = ()) -> dict:
    """Shapes for a model string; in a pipeline, a path into a stage's folder (`${stage}`, `${stage}/final`)
    follows that stage back to its base model (a training stage's `model`, or a tiny-model stage's preset)."""
    import os

    for stage in stages:
        if model != str(stage.folder) and not model.startswith(str(stage.folder) + os.sep):
            continue
        if stage.kind == "tiny-model":
            return shapes_for_preset(stage.config.preset)
        if isinstance(getattr(stage.config, "model", None), str) and stage.name not in seen:
            return _model_shapes(stage.config.model, stages, seen + (stage.name,))
        raise UserError(f"model {model!r}: stage {stage.name!r} ({stage.kind}) does not name a model; pass --model")
    return shapes_for_model(model)


def plan_targets(path: str | Path, kind: str = "auto",
                 overrides: list[str] | tuple[str, ...] = ()) -> tuple[list[tuple[str, str, object]], list]:
    """(name, kind, config) for a stage config YAML, or for every sft/grpo stage of a pipeline YAML, and the
    pipeline's stages (to follow model references). A pipeline is read by the runner's own loader
    (pipeline.load_pipeline): the same rules, references and `STAGE.KEY=VALUE` overrides as `audio-rft run`."""
    from audio_rft.config import load_config, read_yaml
    from audio_rft.pipeline import load_pipeline

    data = read_yaml(path)
    if "stages" not in data:
        stage_kind = _guess_kind(data) if kind == "auto" else kind
        return [(Path(path).stem, stage_kind, load_config(_config_class(stage_kind), path, overrides))], []
    pipe = load_pipeline(path, overrides)
    targets = [(stage.name, stage.kind, stage.config) for stage in pipe.stages if stage.kind in ("sft", "grpo")]
    if not targets:
        raise UserError(f"{path}: no sft or grpo stage to plan")
    return targets, pipe.stages


def stage_launch(name: str, config, stage, pipeline: Path | None, gpus: int | None):
    """The processes and strategy a stage runs under (audio_rft.launch): its `launch:` line as written, or as
    rewritten for `gpus` GPUs; a single-stage config (no pipeline) runs on `gpus` processes (default 1)."""
    from audio_rft.launch import Launch, for_gpus, launched

    if stage is None:
        processes = gpus or 1
        return Launch(processes, resolve_strategy(config.strategy, processes, getattr(config, "zero_stage", 3)), None)
    launch = launched(stage.launch, config, pipeline, f"{pipeline}: stage {name!r}")
    return launch if gpus is None else for_gpus(launch, gpus, config, pipeline)


def plan(path: str | Path, gpu_gb: float = 80.0, kind: str = "auto", prompt_tokens: int = 830, device: str = "cuda",
         overrides: list[str] | tuple[str, ...] = (), model: str | None = None, gpus: int | None = None,
         strategy: str | None = None, trace: bool = False, shared_prefix: bool = True,
         only: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Per stage: the estimate under the strategy the stage runs under (its `launch:` line, or `strategy` when
    given) on its processes (the launch line's, or `gpus`), with `per_gpu_gib` and `fits`, and `strategies`: the
    same for ddp, fsdp and zero3 side by side. With `trace`, one step traced at full size (audio_rft.trace) beside
    the formula: the traced figure decides `fits`."""
    targets, stages = plan_targets(path, kind, overrides)
    unknown = set(only) - {name for name, _, _ in targets}
    if unknown:
        raise UserError(f"--only {', '.join(sorted(unknown))}: no such sft/grpo stage in {path}")
    targets = [t for t in targets if not only or t[0] in only]
    by_name = {stage.name: stage for stage in stages}
    pipeline = Path(path) if stages else None
    results = []
    for name, stage_kind, config in targets:
        target_model = model or config.model
        if not target_model:
            raise UserError(f"{name}: no model in the config; pass --model")
        shapes = _model_shapes(target_model, stages)
        launch = stage_launch(name, config, by_name.get(name), pipeline, gpus)
        processes = launch.processes
        result = estimate(stage_kind, config, shapes, prompt_tokens, device, processes, strategy or launch.strategy)
        others = {label: estimate(stage_kind, config, shapes, prompt_tokens, device, processes, label)
                  for label in SIDE_BY_SIDE}
        result.update(name=name, model=target_model, shapes_source=shapes["source"], gpu_gb=gpu_gb,
                      launch={"command": launch.command, "text": launch.text, "processes": processes,
                              "strategy": launch.strategy},
                      verdict=verdict(result["total_bytes"], gpu_gb), per_gpu_gib=round(result["total_bytes"] / GIB, 2),
                      fits=fits(result["total_bytes"], gpu_gb), fits_by="formula",
                      formula_gib=round(result["total_bytes"] / GIB, 2),
                      strategies={label: {"strategy": other["strategy"],
                                          "per_gpu_gib": round(other["total_bytes"] / GIB, 2),
                                          "fits": fits(other["total_bytes"], gpu_gb)}
                                  for label, other in others.items()})
        if trace:
            result["trace"] = traced(stage_kind, config, shapes, processes, result["strategy"], prompt_tokens, device,
                                     shared_prefix)
            if "peak_bytes" in result["trace"]:
                total = result["trace"]["total_bytes"]
                result.update(per_gpu_gib=round(total / GIB, 2), fits=fits(total, gpu_gb), fits_by="trace",
                              verdict=verdict(total, gpu_gb))
        results.append(result)
    return results


def traced(kind: str, config, shapes: dict, processes: int, strategy: str, prompt_tokens: int, device: str,
           shared_prefix: bool = True) -> dict:
    """audio_rft.trace.trace_step for a stage, plus the CUDA context; or why it cannot be traced."""
    from audio_rft.trace import TRACEABLE, trace_step

    if strategy not in TRACEABLE:
        return {"skipped": f"{strategy} cannot be traced on fake tensors (DeepSpeed allocates real buffers): "
                           "the formula stands"}
    result = trace_step(kind, config, shapes, processes, strategy, prompt_tokens, shared_prefix=shared_prefix)
    result["cuda_context_bytes"] = CUDA_CONTEXT_BYTES if device != "cpu" else 0
    result["total_bytes"] = result["peak_bytes"] + result["cuda_context_bytes"]
    return result


def format_trace(result: dict) -> str:
    """The traced peak and its breakdown, beside the formula's total."""
    trace = result.get("trace")
    if trace is None:
        return ""
    if "skipped" in trace:
        return f"  traced: not traced ({trace['skipped']})"
    formula = result["formula_gib"]
    total = trace["total_bytes"] / GIB
    gap = (formula - total) / total if total else 0.0
    lines = [f"  {'traced peak per GPU':<34}{trace['peak_bytes'] / GIB:>9.2f} GiB  ({trace['counted_by']}; "
             f"{'ddp traced as one process' if trace['traced_as'] != trace['strategy'] else trace['strategy']}"
             f"{' on ' + str(trace['world']) + ' simulated GPUs' if trace['traced_as'] == 'fsdp' else ''}; "
             f"2 steps, {sum(trace['step_seconds']):.0f} s)"]
    for key, value in trace["breakdown"].items():
        if value >= GIB / 100:
            lines.append(f"    {key:<32}{value / GIB:>9.2f} GiB")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in trace["phase_peaks_gib"].items())
    lines.append(f"    {'peak by phase (GiB)':<32}{phases}")
    if trace["cuda_context_bytes"]:
        lines.append(f"  {'+ CUDA context':<34}{trace['cuda_context_bytes'] / GIB:>9.2f} GiB")
    lines.append(f"  {'traced total per GPU':<34}{total:>9.2f} GiB: {verdict(trace['total_bytes'], result['gpu_gb'])}"
                 f" (formula {formula:.2f} GiB, {gap:+.0%})")
    lines.append(f"  rollout {trace['rollout']}")
    return "\n".join(lines)


def add_parser(subparsers, command: str) -> None:
    parser = subparsers.add_parser(
        command, help="estimate GPU memory for a training config", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Estimate per-GPU memory of one GRPO or SFT step for a stage config YAML, or for every "
                    "sft/grpo stage of a pipeline YAML (a top-level `stages:` list), and say whether it fits; "
                    "with --gpus N, side by side for ddp, fsdp and zero3 (sharded state divided by N).")
    parser.add_argument("--config", required=True, help="stage config YAML or pipeline YAML")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GiB")
    parser.add_argument("--gpus", type=int,
                        help="GPUs (processes) each stage runs on (default: a pipeline stage's `launch:` line, one "
                             "process without one; 1 for a single-stage config): the launch line's process count is "
                             "replaced, one GPU runs the stage in-process")
    parser.add_argument("--trace", action="store_true",
                        help="also trace one step of each stage at full size (fake tensors, a fake process group of "
                             "the stage's world size; ddp and none as one process): the traced per-GPU peak and its "
                             "breakdown beside the formula, and the trace decides whether it fits (minutes)")
    parser.add_argument("--trace-pass", choices=["shared", "repeated"], default="shared",
                        help="GRPO's log-prob passes in the trace: shared (each prompt prefilled once for its G "
                             "completions, what training runs) or repeated (the naive pass, each prompt repeated G "
                             "times in one sequence), to compare the two at the same settings")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help="plan only this stage of a pipeline (repeatable)")
    parser.add_argument("--summary", action="store_true", help="print only the one-line-per-stage summary")
    parser.add_argument("--write-pipeline", metavar="FILE",
                        help="write the pipeline for --gpus GPUs: each launch line with that process count, the stages "
                             "that do not fit (and what reads from them) left out; prints what each stage gets")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES,
                        help="strategy of the term-by-term table (default: the stage config's `strategy`; auto is "
                             "ddp on several GPUs, else none; deepspeed takes the config's zero_stage); ddp, fsdp "
                             "and zero3 are always compared on one line")
    parser.add_argument("--kind", choices=["auto", "grpo", "sft"], default="auto",
                        help="stage kind of a single-stage config (auto: from its keys)")
    parser.add_argument("--prompt-tokens", type=int, default=830,
                        help="prompt length incl. audio tokens (30 s of audio = 750 tokens)")
    parser.add_argument("--model", help="override the config's model (hub id or local folder) for the shapes")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: no CUDA context, fp32 for dtype=auto, math attention keeps scores")
    parser.add_argument("--json", help="also write the estimate as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides: key=value for a stage config, STAGE.KEY=VALUE for a pipeline (as audio-rft run), e.g. grpo.num_generations=16")

    def run(args: argparse.Namespace) -> int:
        from audio_rft.fileio import atomic_write_json, atomic_write_text

        if args.write_pipeline and not args.gpus:
            raise UserError("--write-pipeline needs --gpus N (the GPUs the pipeline will run on)")
        results = plan(args.config, args.gpu_gb, args.kind, args.prompt_tokens, args.device, args.overrides, args.model,
                       args.gpus, args.strategy, args.trace, args.trace_pass == "shared", args.only)
        if not args.summary:
            print("\n\n".join(format_table(r["name"], r, args.gpu_gb) for r in results) + "\n")
        print(fit_summary(results, args.gpu_gb))
        if args.json:
            atomic_write_json(Path(args.json), {"stages": results})
        if args.write_pipeline:
            import yaml

            from audio_rft.launch import fitted_pipeline

            data, lines = fitted_pipeline(args.config, results, args.gpus)
            atomic_write_text(Path(args.write_pipeline), yaml.safe_dump(data, sort_keys=False, width=120))
            print(f"\n{args.write_pipeline}: the pipeline on {args.gpus} GPU{'s' if args.gpus > 1 else ''}:")
            print("\n".join(f"  {line}" for line in lines))
        return 0

    parser.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    print("use `audio-rft plan`", file=sys.stderr)
