"""audio_rft.compat: each fenced transformers internal does what the package relies on, on the tiny preset.

When a transformers upgrade breaks one of these, the failing test names the function to fix in compat.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from audio_rft import compat
from audio_rft.model import core_model
from audio_rft.rollout import prompt_embeddings
from helpers import load_tiny, one_thread, prompt_batch, samples_of, synth_data, tiny_model  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def tiny(tiny_model, synth_data):
    processor, model = load_tiny(tiny_model)
    batch = prompt_batch(processor, synth_data / "test", samples_of(synth_data / "test", ids=[0, 5]))
    return processor, core_model(model), batch


def _lm_inputs(core, batch):
    with torch.no_grad():
        embeds = prompt_embeddings(core, batch)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return dict(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions)


def test_lm_forward_passes_the_cache_under_the_current_keyword_without_a_warning(tiny, caplog):
    _, core, batch = tiny
    lm = core.model.language_model
    cache = compat.prompt_cache()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        out = compat.lm_forward(lm, cache=cache, use_cache=True, **_lm_inputs(core, batch))
    assert "deprecated" not in caplog.text
    assert compat.output_cache(out) is cache  # the forward wrote into the cache it was given
    assert len(cache.layers) == core.config.text_config.num_hidden_layers
    import transformers

    if transformers.__version__.startswith("5.24"):
        assert compat.CACHE_KWARG == "cache"


def test_cache_layers_hold_batch_heads_tokens_head_dim_and_concatenate(tiny):
    _, core, batch = tiny
    text = core.config.text_config
    cache = compat.prompt_cache(compat.CacheLayer)
    with torch.no_grad():
        compat.lm_forward(core.model.language_model, cache=cache, use_cache=True, **_lm_inputs(core, batch))
    B, P = batch.input_ids.shape
    layer = cache.layers[0]
    assert type(layer) is compat.CacheLayer and layer.is_initialized
    assert tuple(layer.keys.shape) == (B, text.num_key_value_heads, P, text.head_dim) == tuple(layer.values.shape)
    keys, values = layer.keys.clone(), layer.values.clone()
    new = torch.randn(B, text.num_key_value_heads, 1, text.head_dim)
    out_keys, _ = layer.update(new, new.clone())
    assert torch.equal(out_keys, torch.cat([keys, new], dim=-2)) and torch.equal(layer.keys, out_keys)

    fresh = compat.CacheLayer()
    assert not fresh.is_initialized
    fresh.lazy_initialization(keys, values)
    assert fresh.is_initialized
    held = compat.prompt_cache(layers=[fresh])
    assert held.layers == [fresh]


def test_repeat_cache_is_repeat_interleave_along_the_batch(tiny):
    _, core, batch = tiny
    cache = compat.prompt_cache()
    with torch.no_grad():
        compat.lm_forward(core.model.language_model, cache=cache, use_cache=True, **_lm_inputs(core, batch))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    compat.repeat_cache(cache, 3)
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, keys.repeat_interleave(3, 0))
        assert torch.equal(layer.values, values.repeat_interleave(3, 0))


def test_audio_output_lengths_count_the_audio_tokens_of_each_prompt(tiny):
    processor, core, batch = tiny
    frames = batch.feature_attention_mask.sum(-1)
    after_conv, tokens = compat.audio_output_lengths(core.model.audio_tower, frames)
    assert torch.equal(after_conv, (frames - 1) // 2 + 1)
    assert torch.equal(tokens, (after_conv - 2) // 2 + 1)
    placeholders = (batch.input_ids == core.config.audio_token_id).sum(-1)
    assert torch.equal(tokens, placeholders)  # the processor expanded <|AUDIO|> to as many tokens


def test_bidirectional_mask_hides_padded_frames_from_the_encoder(tiny):
    _, core, batch = tiny
    tower = core.model.audio_tower
    frames = (batch.input_features.shape[-1] - 2) // 2 + 1
    valid = torch.zeros(1, frames, dtype=torch.long)
    valid[:, : frames // 2] = 1
    mask = compat.bidirectional_mask(tower.config, valid, torch.float32)
    features = batch.input_features[:1].clone()
    changed = features.clone()
    # the mel frames that only padded positions see (conv2 position j reads mel frames 2j - 2 ... 2j + 2)
    changed[..., frames + 2:] = torch.randn_like(changed[..., frames + 2:])
    with torch.no_grad():
        a = tower(features, attention_mask=mask).last_hidden_state
        b = tower(changed, attention_mask=mask).last_hidden_state
        unmasked = tower(changed).last_hidden_state
    kept = frames // 4  # the valid frames after the encoder's final average pooling by 2
    torch.testing.assert_close(a[:, :kept], b[:, :kept], rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked[:, :kept], a[:, :kept], atol=1e-5)  # without the mask they would see it
    everything = compat.bidirectional_mask(tower.config, torch.ones(1, frames, dtype=torch.long), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(tower(features, attention_mask=everything).last_hidden_state,
                                   tower(features).last_hidden_state, rtol=0, atol=1e-5)


def test_checkpointed_layers_keep_a_cache_only_when_allowed(tiny_model, synth_data):
    from audio_rft.model import add_lora

    processor, model = load_tiny(tiny_model)
    model = add_lora(model)
    core = core_model(model)
    batch = prompt_batch(processor, synth_data / "test", samples_of(synth_data / "test", n=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated name on the way
        compat.enable_activation_checkpointing(model, use_reentrant=False)
    model.enable_input_require_grads()
    model.train()
    lm = core.model.language_model
    assert all(layer.gradient_checkpointing for layer in lm.layers)

    def written(cache) -> bool:
        compat.lm_forward(lm, cache=cache, use_cache=True, **_lm_inputs(core, batch))
        return any(layer.is_initialized for layer in cache.layers)

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not written(compat.prompt_cache())  # transformers drops the cache of a checkpointed layer
        for layer in lm.layers:
            compat.allow_checkpoint_with_cache(layer)
        assert written(compat.prompt_cache())


def test_qwen2_pre_tokenizer_splits_words_and_single_digits():
    pieces = [p for p, _ in compat.qwen2_pre_tokenizer().pre_tokenize_str("Hello world 123")]
    assert pieces == ["Hello", "Ġworld", "Ġ", "1", "2", "3"]


def test_whisper_sinusoids_are_the_sin_cos_table():
    table = compat.whisper_sinusoids(5, 8)
    assert table.shape == (5, 8)
    assert torch.equal(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(table[1, 0], torch.sin(torch.tensor(1.0)))
    torch.testing.assert_close(table[:, :4] ** 2 + table[:, 4:] ** 2, torch.ones(5, 4))


def test_qwen2_audio_declares_no_tied_weights_in_transformers_5():
    from transformers import Qwen2AudioForConditionalGeneration

    from audio_rft.plan import architecture_ties_embeddings

    assert compat.declares_tied_weights(Qwen2AudioForConditionalGeneration) is architecture_ties_embeddings()
    import transformers

    if int(transformers.__version__.split(".")[0]) == 5:
        assert not compat.declares_tied_weights(Qwen2AudioForConditionalGeneration)


def test_checkpoint_names_are_the_hub_checkpoints_names(tiny_model, tmp_path):
    """A file written under checkpoint_name's names (Qwen2-Audio-7B's hub layout) loads back into every weight."""
    import shutil

    from safetensors.torch import save_file
    from transformers import Qwen2AudioForConditionalGeneration

    _, model = load_tiny(tiny_model)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_model / name, tmp_path / name)
    state = {compat.checkpoint_name(n): p.detach().clone() + 1.0 for n, p in model.named_parameters()}
    assert "language_model.lm_head.weight" in state and "language_model.model.norm.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, original), (_, reloaded) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(reloaded, original + 1.0), name


# ---------------------------------------------------------------- torch internals of the trace (audio_rft.trace)


def test_fake_mode_gives_sharding_propagation_its_own_mode_and_restores_it():
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    with compat.fake_mode() as mode:
        assert _sharding_prop.detect_fake_mode() is None  # propagation then makes a mode of its own
        tensor = torch.empty(1000, 1000)
        assert compat.is_fake(tensor) and tensor.fake_mode is mode
    assert _sharding_prop.detect_fake_mode is detect
    assert not compat.is_fake(torch.zeros(1))


def test_fake_process_group_shards_by_its_world_size_and_the_tracker_peak_can_restart():
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    with compat.fake_process_group(4), compat.fake_mode():
        assert dist.get_world_size() == 4
        compat.fake_materialize(model)
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        assert model[0].weight.to_local().shape == (64, 256)
        optimizer = torch.optim.AdamW(model.parameters())
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            model(torch.randn(8, 256)).sum().backward()
            optimizer.step()
            peak, _ = compat.tracker_peak(tracker)
            restarted = compat.tracker_restart_peak(tracker)
            assert restarted[0] == peak and compat.tracker_peak(tracker)[0] <= peak
            compat.tracker_restart_peak(tracker, restarted)
            assert compat.tracker_peak(tracker)[0] == peak
        assert peak >= 2 * 2 * 256 * 256 * 4 / 4  # AdamW's two moments of each layer's shard, at least
    assert not dist.is_initialized()
