"""Every private or renamed transformers API audio-rft uses, in one place.

The rest of the package calls these functions instead of reaching into transformers, so a transformers
release that moves or renames one of them is fixed here, and tests/test_compat.py says which one moved.
Each docstring names the transformers versions it was checked with; pyproject.toml's range is the one
CI proves (see the comment there).

Kept on purpose:
- the KV cache's layer classes (`CacheLayer`, `Cache`): rollout.py subclasses the dynamic layer to share
  one prompt's cache across G completions, relying on its `keys` / `values` tensors (batch, kv heads,
  tokens, head dim), `is_initialized` and `lazy_initialization`;
- the audio tower's frame arithmetic and the bidirectional mask, which prompt_embeddings / encode_audio
  repeat from Qwen2AudioForConditionalGeneration.forward so the audio can be encoded once per prompt.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = ["Cache", "CacheLayer", "CACHE_KWARG", "allow_checkpoint_with_cache", "audio_output_lengths",
           "bidirectional_mask", "checkpoint_name", "declares_tied_weights", "enable_activation_checkpointing", "lm_forward",
           "output_cache", "prompt_cache", "qwen2_pre_tokenizer", "repeat_cache", "whisper_sinusoids"]

CacheLayer = DynamicLayer
"""The growing (concatenating) per-layer KV cache. Checked with transformers 5.24.0."""

# transformers 5.24 renamed the models' `past_key_values=` keyword (and the outputs' field) to `cache`, and warns
# that the old name goes in 5.40; older releases know only `past_key_values`. Decided once, from the output class.
CACHE_KWARG = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def lm_forward(lm, *, cache: Cache | None = None, **kwargs):
    """`lm(**kwargs)` with `cache` passed under the keyword the installed transformers accepts (no deprecation
    warning). Checked with transformers 5.24.0 (`cache=`); earlier 5.x took `past_key_values=`."""
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    return lm(**kwargs)


def output_cache(out) -> Cache:
    """The KV cache a forward with use_cache=True returned (`out.cache`, formerly `out.past_key_values`).
    Checked with transformers 5.24.0."""
    return getattr(out, CACHE_KWARG)


def prompt_cache(layer_class: type[CacheLayer] | None = None, layers: list[CacheLayer] | None = None) -> Cache:
    """An empty cache that makes a `layer_class` per decoder layer on first write, or one holding `layers`.
    Checked with transformers 5.24.0 (Cache(layer_class_to_replicate=...) / Cache(layers=...))."""
    if layers is not None:
        return Cache(layers=layers)
    return Cache(layer_class_to_replicate=layer_class or CacheLayer)


def repeat_cache(cache: Cache, repeats: int) -> None:
    """Repeat every layer's keys and values `repeats` times along the batch, in place (row i becomes rows
    i*repeats ... i*repeats + repeats - 1, as Tensor.repeat_interleave). Checked with transformers 5.24.0."""
    cache.batch_repeat_interleave(repeats)


def allow_checkpoint_with_cache(layer: torch.nn.Module) -> None:
    """Let a gradient-checkpointed decoder layer keep the cache it is given (transformers otherwise replaces it
    with None under checkpointing). Only for caches whose recomputation in backward reads and writes exactly
    what the forward did (rollout.PromptOnly, rollout.ReadOnlyPrefix). Checked with transformers 5.24.0
    (GradientCheckpointingLayer._can_checkpoint_with_cache)."""
    layer._can_checkpoint_with_cache = True


def enable_activation_checkpointing(model: torch.nn.Module, **checkpoint_kwargs) -> None:
    """Recompute each decoder and encoder layer in backward (`checkpoint_kwargs` go to torch.utils.checkpoint).
    Checked with transformers 5.24.0 (activation_checkpointing_enable; gradient_checkpointing_enable, the name
    before it, warns that it goes in v6 and is used only where the new name is missing)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def audio_output_lengths(tower, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For clips of `feature_lengths` mel frames: (frames after the encoder's stride-2 convolution, audio tokens
    after its pooling), as Qwen2AudioForConditionalGeneration.forward counts them. Checked with transformers
    5.24.0 (Qwen2AudioEncoder._get_feat_extract_output_lengths)."""
    return tower._get_feat_extract_output_lengths(feature_lengths)


def bidirectional_mask(config, valid: torch.Tensor, dtype: torch.dtype):
    """The attention mask the audio encoder wants for `valid` (batch, frames; 1 = a real frame), in the form its
    attention implementation (`config`) takes: padded frames masked out, no causal structure. Checked with
    transformers 5.24.0 (masking_utils.create_bidirectional_mask)."""
    from transformers.masking_utils import create_bidirectional_mask

    embeds = torch.zeros(*valid.shape, 1, dtype=dtype, device=valid.device)  # only its shape, dtype, device are read
    return create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=valid)


def qwen2_pre_tokenizer():
    """Qwen2's byte-level pre-tokenizer (its split regex), from a blank Qwen2Tokenizer. Checked with transformers
    5.24.0 (Qwen2Tokenizer()._tokenizer, the wrapped `tokenizers.Tokenizer`)."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    return Qwen2Tokenizer()._tokenizer.pre_tokenizer


def whisper_sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal position table (length, channels), which the released Qwen2-Audio encoder
    carries. Checked with transformers 5.24.0 (models.whisper.modeling_whisper.sinusoids)."""
    from transformers.models.whisper.modeling_whisper import sinusoids

    return sinusoids(length, channels)


def declares_tied_weights(model_class) -> bool:
    """Whether a model class can tie lm_head to the input embeddings (transformers 5.x: Qwen2-Audio cannot, so a
    config's tie_word_embeddings is ignored). Checked with transformers 5.24.0 (`_tied_weights_keys`)."""
    return bool(getattr(model_class, "_tied_weights_keys", None))


# transformers 5 nests the language model and the audio parts under `model.` in the module tree; Qwen2-Audio-7B's
# hub checkpoint holds the older names, which vLLM's weight loader reads (5.24's save_pretrained writes them too,
# 5.19's the new ones).
_CHECKPOINT_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                        ("model.audio_tower.", "audio_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def checkpoint_name(parameter_name: str) -> str:
    """The hub checkpoint's name for a Qwen2AudioForConditionalGeneration parameter (`model.language_model.X`
    -> `language_model.model.X`, `lm_head.weight` -> `language_model.lm_head.weight`, `model.audio_tower.X` ->
    `audio_tower.X`). Checked with transformers 5.19.0 and 5.24.0 (tests/test_compat.py loads a file so named)."""
    for new, old in _CHECKPOINT_PREFIXES:
        if parameter_name.startswith(new):
            return old + parameter_name[len(new):]
    return parameter_name
