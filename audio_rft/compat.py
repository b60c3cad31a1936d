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


# ---------------------------------------------------------------- torch internals the trace needs (audio_rft.trace)
# Checked with torch 2.13.0 (tests/test_compat.py and tests/test_trace.py run each).


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a FakeTensor (shape, dtype and device, no data). Checked with torch 2.13.0
    (torch._subclasses.fake_tensor.is_fake)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(tensor)


from contextlib import contextmanager  # noqa: E402


@contextmanager
def fake_mode(enabled: bool = True):
    """FakeTensorMode for a whole traced step, with DTensor's sharding propagation on a fake mode of its own.

    Propagation otherwise reuses the outer fake mode (torch.distributed.tensor._sharding_prop.detect_fake_mode)
    and the memory trackers count its global-size temporaries as if they were allocated (a foreach AdamW step
    came out 13.5 times too large). A module's fake parameters cannot change dtype (Module.to swaps them in
    place, which fake tensors refuse: "has weakref associated with it"): build on `meta` in the final dtype,
    then fake_materialize. Checked with torch 2.13.0."""
    if not enabled:
        yield None
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        _sharding_prop.detect_fake_mode = detect


@contextmanager
def fake_process_group(world: int):
    """A default process group of `world` ranks in which this process is rank 0 and collectives return at
    once (torch.testing._internal.distributed.fake_pg: the "fake" backend and FakeStore), with FSDP2's default
    mesh over it on the CPU. Checked with torch 2.13.0 (fsdp._fully_shard._fully_shard._init_default_mesh)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fully_shard

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; the trace needs its own")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    # fully_shard without a mesh builds the default one on first use, and built inside a FakeTensorMode its
    # rank table is fake (reading it fails): built here, before any fake mode, and handed to it instead
    mesh = init_device_mesh("cpu", (world,))
    default_mesh = _fully_shard._init_default_mesh
    _fully_shard._init_default_mesh = lambda *args, **kwargs: mesh
    try:
        yield
    finally:
        _fully_shard._init_default_mesh = default_mesh
        dist.destroy_process_group()


def fake_materialize(model: torch.nn.Module, fake: bool = True, device="cpu") -> None:
    """Give a model built on the `meta` device CPU storage: fake tensors inside an active FakeTensorMode, else
    real ones with random values (for checking a trace against a real run). Parameters keep their
    requires_grad, and PEFT's adapters the dtype it gave them; real ones may live on another `device`. Checked
    with torch 2.13.0 (Module.to_empty)."""
    model.to_empty(device="cpu" if fake else device)
    if not fake:  # plausible values: norms at 1 and biases at 0, so activations keep their scale layer after layer
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() > 1:
                    param.normal_(0.0, 0.02)
                else:
                    param.fill_(1.0 if "norm" in name else 0.0)
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.uniform_(0.0, 1.0)


def tracker_peak(tracker) -> tuple[int, dict]:
    """An FSDPMemTracker's running peak (bytes, its snapshot) on its one device. Checked with torch 2.13.0
    (MemTracker._peak_mem, _peak_mem_snap)."""
    if not tracker._peak_mem:
        return 0, {}
    device = next(iter(tracker._peak_mem))
    return tracker._peak_mem[device], dict(tracker._peak_mem_snap.get(device, {}))


def tracker_restart_peak(tracker, saved: tuple[int, dict] | None = None) -> tuple[int, dict]:
    """Restart an FSDPMemTracker's running peak at its current total (or put back a `saved` one); returns the
    peak it had. Checked with torch 2.13.0 (MemTracker._peak_mem, _peak_mem_snap, _curr_mem_snap)."""
    before = tracker_peak(tracker)
    if saved is not None:
        if tracker._peak_mem:
            device = next(iter(tracker._peak_mem))
            tracker._peak_mem[device], tracker._peak_mem_snap[device] = saved[0], dict(saved[1])
        return before
    for device, snap in tracker._curr_mem_snap.items():
        tracker._peak_mem[device], tracker._peak_mem_snap[device] = snap["Total"], dict(snap)
    return before


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
