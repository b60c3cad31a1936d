"""The model layer: load Qwen2-Audio (hub id or local folder), put LoRA on it, and build the offline
tiny presets of the same architecture that every CPU path here runs on.

The 7B and the tiny preset go through the same `load_model`; only the folder differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from audio_rft import UserError
from audio_rft.fileio import atomic_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
# Ids that must never be sampled: a generated <|AUDIO|> makes the next forward pass fail with
# "Audio features and audio tokens do not match" (docs/design.md, pitfalls).
NEVER_GENERATE = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>"]

# Qwen2-Audio-7B-Instruct's chat layout: a system turn, then "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n" + text.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# window_seconds sets both the feature extractor's chunk_length and max_source_positions (= 50 per
# second), which must agree: the encoder expects exactly 2 x max_source_positions feature frames.
PRESETS = {
    # The embedded default: learns the synthetic bench on 2 CPU cores in minutes (clips <= 4 s).
    "tiny": dict(window_seconds=4, mel_bins=64, audio_width=128, audio_layers=2, audio_heads=4,
                 text_width=128, text_layers=2, text_heads=4, kv_heads=2, head_dim=32, vocab_size=None,
                 tokenizer_vocab=1024, tie_embeddings=True),
    # The tiny model with Qwen2-Audio's real 30 s window (3000 mel frames, as the 7B), the only window vLLM's
    # Qwen2-Audio accepts: what the vLLM rollout tests run on. A clip's audio tokens follow its length, not
    # the window, so prompts are as short as tiny's; the encoder runs over the padded 30 s.
    "tiny30": dict(window_seconds=30, mel_bins=64, audio_width=128, audio_layers=2, audio_heads=4,
                   text_width=128, text_layers=2, text_heads=4, kv_heads=2, head_dim=32, vocab_size=None,
                   tokenizer_vocab=1024, tie_embeddings=True),
    # Qwen2-Audio-7B-Instruct's sequence shapes (128 mels, 30 s window, vocab 156,032, head dim 128)
    # with few, narrow layers: for performance work at real shapes.
    "bench": dict(window_seconds=30, mel_bins=128, audio_width=256, audio_layers=2, audio_heads=4,
                  text_width=256, text_layers=2, text_heads=2, kv_heads=2, head_dim=128, vocab_size=156_032,
                  tokenizer_vocab=1024, tie_embeddings=False),
}

_BASE_CORPUS = [
    "Please choose the answer from the following options: ['a', 'b', 'c', 'd'].",
    "Output the final answer in <answer> </answer>.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
    "<think>I hear it.</think><answer>yes</answer>", "You are a helpful assistant.",
    "system user assistant Audio 1: What is the sound? Which one? How many? Is it rising or falling?",
    "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100",
    "The quick brown fox jumps over the lazy dog. video audio music speech sound voice man woman",
]


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE in Qwen2's tokenizer class, trained offline; any text still encodes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from audio_rft.compat import qwen2_pre_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = qwen2_pre_tokenizer()
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    # Without this the tokenizer emits token_type_ids, which generate() refuses (docs/design.md, pitfalls).
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.padding_side = "left"
    return tokenizer


def _corpus_from_datasets(folders: Iterable[str | Path]) -> list[str]:
    from audio_rft.data.dataset import load_dataset
    from audio_rft.prompts import PROMPT_MODES, prompt_text, target_text

    texts = []
    for folder in folders:
        for sample in load_dataset(folder):
            texts += [prompt_text(sample, mode) for mode in PROMPT_MODES]
            if sample.answer is not None:
                texts += [target_text(sample, "answer")] + ([target_text(sample, "think")] if sample.reasoning else [])
    return texts


def build_processor(preset: str, corpus_datasets: Iterable[str | Path] = ()):
    """The preset's processor alone (tokenizer, feature extractor, chat template): cheap, no weights."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    corpus = _BASE_CORPUS * 4 + _corpus_from_datasets(corpus_datasets)
    tokenizer = build_tokenizer(corpus, p["tokenizer_vocab"])
    feature_extractor = WhisperFeatureExtractor(feature_size=p["mel_bins"], sampling_rate=16_000, hop_length=160,
                                                chunk_length=p["window_seconds"], n_fft=400)
    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_tiny_preset(preset: str, out: str | Path, corpus_datasets: Iterable[str | Path] = (), seed: int = 0) -> Path:
    """Build a randomly initialised Qwen2-Audio of preset shape plus its processor, saved with save_pretrained."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from audio_rft.compat import whisper_sinusoids

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    processor = build_processor(preset, corpus_datasets)
    tokenizer = processor.tokenizer
    vocab_size = p["vocab_size"] or (len(tokenizer) + 63) // 64 * 64
    im_end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=p["mel_bins"], d_model=p["audio_width"],
                          encoder_layers=p["audio_layers"], encoder_attention_heads=p["audio_heads"],
                          encoder_ffn_dim=4 * p["audio_width"], max_source_positions=50 * p["window_seconds"]),
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=p["text_width"],
                         intermediate_size=4 * p["text_width"], num_hidden_layers=p["text_layers"],
                         num_attention_heads=p["text_heads"], num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"],
                         max_position_embeddings=2048, tie_word_embeddings=p["tie_embeddings"],
                         eos_token_id=im_end, pad_token_id=pad, bos_token_id=None),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        tie_word_embeddings=p["tie_embeddings"],
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    # The released Qwen2-Audio encoder carries Whisper's fixed sinusoidal position table; a fresh model gets a
    # random frozen one instead, which leaves the encoder nearly blind to frame order (loudness trends and
    # melody direction stayed at chance in the synth probe until this table was set).
    # The convolutions get He-normal weights so that the clip's content reaches the encoder on the same scale
    # as that table (std ~0.6); at the default std 0.02 the conv output is ~0.015 and the table swamps it.
    tower = model.model.audio_tower
    with torch.no_grad():
        tower.embed_positions.weight.copy_(whisper_sinusoids(*tower.embed_positions.weight.shape))
        for conv in (tower.conv1, tower.conv2):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            conv.bias.zero_()
    model.generation_config.eos_token_id = [im_end, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        _write_hub_names(model, tmp / "model.safetensors")
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"# audio-rft `{preset}` preset\n\nA randomly initialised Qwen2AudioForConditionalGeneration "
            f"({sum(t.numel() for t in model.parameters()):,} parameters) built offline by `audio-rft tiny-model`.\n"
            f"Preset: {json.dumps(p)}\n")
    return Path(out)


def _write_hub_names(model: torch.nn.Module, path: Path) -> None:
    """Rewrite the saved weights under Qwen2-Audio-7B's hub names (compat.checkpoint_name), which every
    transformers 5.x and vLLM read: transformers 5.19's save_pretrained writes `language_model.model.model.*`,
    which vLLM's loader cannot place."""
    from safetensors.torch import save_file

    from audio_rft.compat import checkpoint_name

    state = {checkpoint_name(name): param.detach().contiguous() for name, param in model.named_parameters()}
    save_file(state, str(path), metadata={"format": "pt"})


@dataclass
class Loaded:
    processor: object
    model: torch.nn.Module  # the PeftModel when an adapter or LoRA is on, else the plain model


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r} (auto, bf16, fp16, fp32)") from None


def load_model(model: str | Path, adapter: str | Path | None = None, dtype: str = "auto", device: str = "auto",
               attn_implementation: str | None = None, adapter_trainable: bool = False,
               empty_weights: bool = False) -> Loaded:
    """Processor and Qwen2AudioForConditionalGeneration from a hub id or a local folder, optionally with a PEFT adapter.

    `empty_weights`: the same model with every parameter on the meta device and no weight read (buffers real, on
    `device`): what a rank builds that receives its shard from rank 0 (engine.load_shards)."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    local = Path(model).exists()
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in str(model):
        raise UserError(f"model {model!r}: no such folder")
    target = pick_device(device)
    try:
        processor = AutoProcessor.from_pretrained(str(model))
        if empty_weights:
            network = _empty_model(str(model), pick_dtype(dtype, target), attn_implementation)
        else:
            network = Qwen2AudioForConditionalGeneration.from_pretrained(
                str(model), dtype=pick_dtype(dtype, target), attn_implementation=attn_implementation)
    except OSError as e:
        if local:
            raise UserError(f"{model}: not a loadable Qwen2-Audio folder ({str(e).splitlines()[0][:160]})") from None
        raise UserError(
            f"model {model!r} is not a local folder and is not in the Hugging Face cache; download it first with "
            f"`hf download {model}` (or pass a local folder)") from None
    processor.tokenizer.padding_side = "left"
    if empty_weights:
        buffers_to(network, target)
    else:
        network.to(target)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: no adapter_config.json (not a PEFT adapter folder)")
        network = PeftModel.from_pretrained(network, str(adapter), is_trainable=adapter_trainable)
    return Loaded(processor, network)


def _empty_model(model: str, dtype: torch.dtype, attn_implementation: str | None = None):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig, Qwen2AudioForConditionalGeneration

    config = AutoConfig.from_pretrained(model)
    with init_empty_weights(include_buffers=False):
        network = Qwen2AudioForConditionalGeneration._from_config(config, dtype=dtype,
                                                                  attn_implementation=attn_implementation)
    try:  # the stop tokens sampling uses; a folder without one keeps what the config implies
        network.generation_config = GenerationConfig.from_pretrained(model)
    except OSError:
        pass
    return network


def buffers_to(module: torch.nn.Module, device: torch.device) -> None:
    """Move a meta-device model's buffers (rotary tables: computed, not loaded) to `device`."""
    for inner in module.modules():
        for name, buffer in inner._buffers.items():
            if buffer is not None:
                inner._buffers[name] = buffer.to(device)


def default_lora_targets() -> list[str]:
    # Regex so only the language model's projections match, never the audio encoder's q/k/v/out_proj.
    return [r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"]


def add_lora(model: torch.nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: list[str] | str | None = None, train_projector: bool = False):
    """Wrap in a PEFT LoRA model; the audio encoder stays frozen, the projector by the switch."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules or default_lora_targets()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=targets[0] if len(targets) == 1 else targets,
                        modules_to_save=["multi_modal_projector"] if train_projector else None)
    return get_peft_model(model, config)


def set_full_finetune(model: torch.nn.Module, train_projector: bool = False, train_audio_encoder: bool = False) -> None:
    """Full fine-tuning: the language model trains; the audio encoder only when asked.

    Training the encoder is for building a small base from random initialisation (the demo's warm-up
    stands in for Qwen2-Audio's pre-training); post-training keeps it frozen, as R1-AQA does. Its
    position table stays fixed either way, as in Whisper.
    """
    for name, param in model.named_parameters():
        if ".audio_tower." in f".{name}":
            param.requires_grad_(train_audio_encoder and "embed_positions" not in name)
        elif "multi_modal_projector" in name:
            param.requires_grad_(train_projector or train_audio_encoder)
        else:
            param.requires_grad_(True)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder and encoder layer in backward instead of keeping its activations.

    Our passes keep the shared-prefix path under checkpointing (rollout.completion_logprobs): the
    decoder layers get caches whose recomputation reads and writes exactly what the forward did
    (rollout.PromptOnly, rollout.ReadOnlyPrefix), which transformers lets a checkpointed layer keep
    only when the layer says so.
    """
    from audio_rft.compat import allow_checkpoint_with_cache, enable_activation_checkpointing

    enable_activation_checkpointing(model, use_reentrant=False)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    for layer in core_model(model).model.language_model.layers:
        allow_checkpoint_with_cache(layer)


def core_model(model: torch.nn.Module):
    """The Qwen2AudioForConditionalGeneration inside a PeftModel (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def add_parser(subparsers, command: str) -> None:
    parser = subparsers.add_parser(
        command, help="build an offline tiny Qwen2-Audio preset",
        description="Build a randomly initialised Qwen2-Audio of the real architecture offline (no download), "
                    "saved with save_pretrained and loadable by AutoProcessor + Qwen2AudioForConditionalGeneration.")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="tiny: the CPU demo model (4 s window); tiny30: the same with a 30 s window (vLLM's); bench: Qwen2-Audio-7B's shapes, few narrow layers")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--corpus", action="append", default=[], metavar="DATASET_DIR",
                        help="prepared dataset(s) whose prompts also train the tokenizer (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=lambda a: print(build_tiny_preset(a.preset, a.out, a.corpus, a.seed)))
