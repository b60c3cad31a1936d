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


# ---------------------------------------------------------------- traced steps


def _seven_b(layers: int) -> dict:
    """Qwen2-Audio-7B's real widths (vocabulary, hidden, heads, audio window) with few layers."""
    from audio_rft.plan import shapes_for_model

    shapes = shapes_for_model("Qwen/Qwen2-Audio-7B-Instruct")
    shapes["audio"]["layers"] = shapes["text"]["layers"] = layers
    return shapes


def test_a_2_layer_7b_width_full_step_on_8_simulated_ranks_shards_weights_and_adamw_state():
    from audio_rft.plan import parameter_counts
    from audio_rft.trace import trace_step
    from audio_rft.train.sft import SFTConfig

    shapes = _seven_b(2)
    config = SFTConfig(model="x", lora=False, dtype="bf16", batch_size=1, grad_accum=1, max_target_tokens=8)
    result = trace_step("sft", config, shapes, world=8, strategy="fsdp", prompt_tokens=760)
    assert result["traced_as"] == "fsdp" and result["counted_by"].startswith("torch FSDPMemTracker")
    counts = parameter_counts(shapes)
    after = result["after_last_step"]
    assert after["Sharded Param"] == pytest.approx(counts["total"] * 4 / 8, rel=0.01)  # fp32 master weights / 8
    trainable = counts["language_model"]  # the tower and projector stay frozen in full fine-tuning
    assert after["OptState"] == pytest.approx(2 * trainable * 4 / 8, rel=0.01)  # AdamW's two fp32 moments / 8
    assert after["Sharded Grad"] == pytest.approx(trainable * 4 / 8, rel=0.01)
    assert result["peak_bytes"] > sum(after.values())  # the step's activations and gathered layers come on top


@pytest.mark.parametrize("lora", [False, True])
def test_a_trace_on_fake_tensors_matches_the_same_step_counted_on_real_cpu_tensors(lora):
    from audio_rft.plan import shapes_for_preset
    from audio_rft.trace import trace_step
    from audio_rft.train.grpo import GRPOConfig

    shapes = shapes_for_preset("tiny")
    config = GRPOConfig(model="x", lora=lora, dtype="fp32", batch_size=1, grad_accum=1, num_generations=2,
                        max_completion_length=4, gradient_checkpointing=not lora)
    fake = trace_step("grpo", config, shapes, world=1, strategy="none", prompt_tokens=110)
    real = trace_step("grpo", config, shapes, world=1, strategy="none", prompt_tokens=110, fake=False)
    assert not real["fake"] and fake["fake"]
    assert fake["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.20)
    assert fake["after_last_step"]["optimizer state"] == real["after_last_step"]["optimizer state"]


def test_a_stage_whose_traced_peak_exceeds_the_gpu_is_reported_as_not_fitting(tmp_path, monkeypatch, capsys):
    import yaml

    import audio_rft.plan as plan_module
    from audio_rft.plan import GIB, plan, shapes_for_preset

    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"model": "the-tiny-preset", "lora": False, "dtype": "fp32", "grad_accum": 1,
                                    "batch_size": 1, "max_target_tokens": 4}))
    monkeypatch.setattr(plan_module, "_model_shapes", lambda model, stages: shapes_for_preset("tiny"))
    gpu_gib = 0.01
    result, = plan(path, gpu_gb=gpu_gib, kind="sft", prompt_tokens=110, device="cpu", trace=True)
    assert result["fits_by"] == "trace"
    assert result["trace"]["total_bytes"] > gpu_gib * GIB and not result["fits"]
    assert "does NOT fit" in result["verdict"]
