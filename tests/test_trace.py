"""audio_rft.trace (`audio-rft plan --trace`): a training step of our own code traced on fake tensors, and the
shape-static prompt embedding it needs."""

from __future__ import annotations

import pytest
import torch

from audio_rft.model import core_model
from audio_rft.rollout import encode_audio, prompt_embeddings
from helpers import load_tiny, one_thread, prompt_batch, samples_of, synth_data, tiny_model  # noqa: F401 (fixtures)


def _masked_scatter_embeddings(core, batch):
    """prompt_embeddings as it was written before it had to run on fake tensors (Qwen2AudioModel.forward's merge)."""
    from audio_rft.compat import audio_output_lengths

    qwen = core.model
    embeds = qwen.get_input_embeddings()(batch.input_ids)
    _, lengths = audio_output_lengths(qwen.audio_tower, batch.feature_attention_mask.sum(-1))
    features = qwen.multi_modal_projector(encode_audio(core, batch))
    keep = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    placeholders = batch.input_ids == core.config.audio_token_id
    return embeds.masked_scatter(placeholders[..., None], features[keep].to(embeds.dtype))


@pytest.fixture(scope="module")
def tiny(tiny_model, synth_data):
    processor, model = load_tiny(tiny_model)
    # clips 0 and 5 differ in length: left padding and a shorter clip's padded frames are both exercised
    batch = prompt_batch(processor, synth_data / "test", samples_of(synth_data / "test", ids=[0, 5]))
    return processor, core_model(model), batch


def test_shape_static_prompt_embeddings_equal_the_masked_scatter_merge_values_and_gradients(tiny):
    _, core, batch = tiny
    lengths = batch.feature_attention_mask.sum(-1)
    assert lengths[0] != lengths[1]
    projector = core.model.multi_modal_projector
    weights = torch.randn(*batch.input_ids.shape, core.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    results = []
    for merge in (prompt_embeddings, _masked_scatter_embeddings):
        projector.zero_grad(set_to_none=True)
        embeds = merge(core, batch)
        (embeds * weights).sum().backward()
        results.append((embeds.detach(), projector.linear.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_a_prompt_whose_audio_tokens_do_not_match_its_clip_is_refused(tiny):
    _, core, batch = tiny
    ids = batch.input_ids.clone()
    first = (ids[0] == core.config.audio_token_id).nonzero()[0, 0]
    ids[0, first] = 0  # one placeholder fewer than the clip's frames
    from dataclasses import replace

    with pytest.raises(ValueError, match="do not match"):
        prompt_embeddings(core, replace(batch, input_ids=ids))
