"""`audio-rft plan` (memory estimate) and `audio-rft bench` (plumbing only: numbers are never asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from audio_rft.plan import QWEN2_AUDIO_7B, estimate, parameter_counts, plan, plan_targets, shapes_for_model
from audio_rft.train.grpo import GRPOConfig
from audio_rft.train.sft import SFTConfig

HUB_ID = "Qwen/Qwen2-Audio-7B-Instruct"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from audio_rft.model import build_tiny_preset

    return build_tiny_preset("tiny", tmp_path_factory.mktemp("models") / "tiny")


def grpo(**kw) -> GRPOConfig:
    base = dict(model=HUB_ID, lora=True, dtype="bf16", num_generations=8, max_completion_length=32, batch_size=1)
    return GRPOConfig(**{**base, **kw})


def peak(config, kind="grpo", prompt_tokens=830) -> int:
    return estimate(kind, config, shapes_for_model(config.model), prompt_tokens)["peak_bytes"]


# ---------------------------------------------------------------- plan


def test_weight_term_is_the_exact_parameter_count_of_the_tiny_preset(tiny_model):
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model), dtype=torch.float32)
    exact = sum(p.numel() for p in model.parameters())
    shapes = shapes_for_model(str(tiny_model))
    assert parameter_counts(shapes)["total"] == exact
    result = estimate("grpo", GRPOConfig(model=str(tiny_model), dtype="fp32"), shapes, 100, device="cpu")
    assert result["static"]["weights"] == exact * 4
    bf16 = estimate("grpo", GRPOConfig(model=str(tiny_model), dtype="bf16"), shapes, 100, device="cuda")
    assert bf16["static"]["weights"] == exact * 2


def test_known_7b_shapes_give_about_8_4b_parameters():
    total = parameter_counts(shapes_for_model(HUB_ID))["total"]
    assert 8.3e9 < total < 8.5e9
    assert shapes_for_model(HUB_ID)["text"] == QWEN2_AUDIO_7B["text"]


def test_more_generations_or_longer_completions_need_more_memory():
    assert peak(grpo(num_generations=16)) > peak(grpo(num_generations=8)) > peak(grpo(num_generations=2))
    assert peak(grpo(max_completion_length=256)) > peak(grpo(max_completion_length=32))
    assert peak(grpo(batch_size=2)) > peak(grpo(batch_size=1))
    assert peak(grpo(), prompt_tokens=1500) > peak(grpo(), prompt_tokens=830)


def test_gradient_checkpointing_needs_less_memory():
    for lora in (True, False):
        assert peak(grpo(lora=lora, gradient_checkpointing=True)) < peak(grpo(lora=lora))
    sft = SFTConfig(model=HUB_ID, dtype="bf16", batch_size=8)
    assert peak(SFTConfig(model=HUB_ID, dtype="bf16", batch_size=8, gradient_checkpointing=True), "sft") < peak(sft, "sft")


def test_lora_needs_less_than_full_fine_tuning():
    assert peak(grpo(lora=True)) < peak(grpo(lora=False))
    assert peak(SFTConfig(model=HUB_ID, dtype="bf16"), "sft") < peak(SFTConfig(model=HUB_ID, dtype="bf16", lora=False), "sft")
    full = estimate("grpo", grpo(lora=False), shapes_for_model(HUB_ID))
    assert "reference_model" in full["static"]
    # one process: the whole model in fp32 (engine.master_dtype), no separate master copy
    assert full["static"]["weights"] == full["parameters"]["total"] * 4 and "fp32_master_weights" not in full["static"]
    assert "fp32_master_weights" in estimate("grpo", grpo(lora=False), shapes_for_model(HUB_ID), gpus=8,
                                             strategy="zero3")["static"]
    lora = estimate("grpo", grpo(lora=True), shapes_for_model(HUB_ID))
    assert "reference_model" not in lora["static"]  # the adapter is disabled instead


def r1_aqa_full(**kw) -> GRPOConfig:
    """R1-AQA's own run: all parameters, lr 1e-6, 1 prompt x G=8, 32 tokens, bf16, KL 0.04, checkpointing."""
    return grpo(lora=False, lr=1e-6, beta=0.04, gradient_checkpointing=True, **kw)


def test_sharding_divides_the_static_state_of_full_fine_tuning_by_the_gpus():
    shapes = shapes_for_model(HUB_ID)
    by = {s: estimate("grpo", r1_aqa_full(), shapes, gpus=8, strategy=s) for s in ("ddp", "fsdp", "zero3")}
    ddp, fsdp, zero3 = by["ddp"], by["fsdp"], by["zero3"]
    assert (ddp["strategy"], fsdp["strategy"], zero3["strategy"]) == ("ddp", "fsdp", "zero3")
    assert fsdp["total_bytes"] < ddp["total_bytes"]
    for key in ("weights", "reference_model", "optimizer_states"):  # fp32 weights, bf16 reference, fp32 AdamW
        assert 0 <= fsdp["static"][key] * 8 - ddp["static"][key] < 8, key
    assert 0 <= fsdp["phases"]["train"]["gradients"] * 8 - ddp["phases"]["train"]["gradients"] < 8
    # DeepSpeed replicates the frozen reference; apart from that, ZeRO-3 is about FSDP
    reference_difference = zero3["static"]["reference_model"] - fsdp["static"]["reference_model"]
    assert reference_difference > 10 * 2**30
    assert abs(zero3["total_bytes"] - fsdp["total_bytes"]) < reference_difference
    assert not plan_fits(ddp) and plan_fits(fsdp)


def plan_fits(result, gpu_gb=80) -> bool:
    from audio_rft.plan import fits

    return fits(result["total_bytes"], gpu_gb)


def test_lora_on_one_gpu_is_the_single_process_plan():
    shapes = shapes_for_model(HUB_ID)
    default = estimate("grpo", grpo(), shapes)
    assert default["strategy"] == "none" and default["gpus"] == 1
    for strategy in ("none", "ddp", "fsdp"):  # one process: nothing to average or shard
        assert estimate("grpo", grpo(), shapes, gpus=1, strategy=strategy)["total_bytes"] == default["total_bytes"]
    # LoRA at one GPU fits an 80 GB card with room to spare (docs/performance.md quotes the table)
    assert plan_fits(default) and default["total_bytes"] < 0.5 * 80 * 2**30
    assert "autocast_weight_copies" not in default["phases"]["train"]


def test_checkpointing_keeps_the_shared_prefix():
    shapes = shapes_for_model(HUB_ID)

    def activations(prompt_tokens, **kw):
        return estimate("grpo", grpo(**kw), shapes, prompt_tokens)["phases"]["train"]["activations"]

    assert activations(830, gradient_checkpointing=True) < activations(830)
    # the prompt is prefilled once: its activations grow with P the same for G=8 as for G=2 (no G·(P+L))
    per_prompt_token = {G: activations(930, num_generations=G, gradient_checkpointing=True)
                        - activations(830, num_generations=G, gradient_checkpointing=True) for G in (2, 8)}
    assert per_prompt_token[2] == per_prompt_token[8] > 0


def test_plan_cli_compares_strategies_on_several_gpus(tmp_path, capsys):
    stage = tmp_path / "grpo-full.yaml"
    stage.write_text(yaml.safe_dump({"model": HUB_ID, "lora": False, "lr": 1e-6, "dtype": "bf16", "beta": 0.04,
                                     "num_generations": 8, "max_completion_length": 32, "batch_size": 1,
                                     "gradient_checkpointing": True}))
    from audio_rft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", str(stage), "--gpus", "8", "--gpu-gb", "80", "--json", str(tmp_path / "plan.json")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "strategy ddp on 8 GPUs" in out
    assert "ddp" in out and "fsdp" in out and "zero3" in out
    [entry] = json.loads((tmp_path / "plan.json").read_text())["stages"]
    assert (entry["strategy"], entry["gpus"], entry["fits"]) == ("ddp", 8, False)
    assert entry["per_gpu_gib"] == entry["strategies"]["ddp"]["per_gpu_gib"]
    assert set(entry["strategies"]) == {"ddp", "fsdp", "zero3"}
    assert entry["strategies"]["fsdp"]["fits"] and not entry["strategies"]["ddp"]["fits"]
    assert entry["strategies"]["fsdp"]["per_gpu_gib"] < entry["per_gpu_gib"]
    [chosen] = plan(stage, gpu_gb=80, gpus=8, strategy="fsdp")
    assert chosen["strategy"] == "fsdp" and chosen["fits"]


def test_stage_config_and_pipeline_yaml(tmp_path, capsys):
    stage = tmp_path / "grpo.yaml"
    stage.write_text(yaml.safe_dump({"model": HUB_ID, "num_generations": 8, "lora": True, "dtype": "bf16"}))
    [(name, kind, config)], _ = plan_targets(stage)
    assert kind == "grpo" and isinstance(config, GRPOConfig)
    sft_only = tmp_path / "sft.yaml"
    sft_only.write_text(yaml.safe_dump({"model": HUB_ID, "max_target_tokens": 64}))
    assert plan_targets(sft_only)[0][0][1] == "sft"

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [
        {"name": "data", "kind": "prepare", "config": {"source": "synth"}},
        {"name": "sft", "kind": "sft", "config": {"model": HUB_ID, "data": "${data}/train", "lora": True, "batch_size": 4}},
        {"name": "grpo", "kind": "grpo", "config": {"model": HUB_ID, "data": "${data}/train", "num_generations": 8,
                                                    "gradient_checkpointing": True}},
        {"name": "eval", "kind": "eval", "config": {"data": "${data}/test",
                                                    "variants": [{"name": "grpo", "model": "${grpo}/final"}]}},
    ]}))
    results = plan(pipeline, gpu_gb=80)
    assert [r["name"] for r in results] == ["sft", "grpo"]
    assert all(r["fits"] for r in results)
    assert not plan(pipeline, gpu_gb=8)[1]["fits"]
    # the runner's rules and overrides: STAGE.KEY=VALUE reaches that stage only; a mistake names the stage
    changed = plan(pipeline, gpu_gb=80, overrides=["grpo.num_generations=16"])
    assert [r["layout"]["generations"] for r in changed] == [1, 16]
    from audio_rft import UserError

    with pytest.raises(UserError, match="stage 'grpo'.*unknown key 'num_generation'"):
        plan(pipeline, overrides=["grpo.num_generation=16"])

    from audio_rft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", str(pipeline), "--gpu-gb", "80", "--json", str(tmp_path / "plan.json")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "sft:" in out and "grpo:" in out and "fits on a 80 GB GPU" in out
    assert len(json.loads((tmp_path / "plan.json").read_text())["stages"]) == 2


def test_pipeline_models_given_by_stage_references(tmp_path, tiny_model):
    from audio_rft.plan import shapes_for_preset

    pipeline = tmp_path / "demo.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [
        {"name": "base-model", "kind": "tiny-model", "config": {"preset": "tiny"}},
        {"name": "warmup", "kind": "sft", "config": {"model": "${base-model}", "data": "d", "lora": False, "dtype": "fp32"}},
        {"name": "grpo", "kind": "grpo", "config": {"model": "${warmup}/final", "data": "d", "lora": False, "dtype": "fp32"}},
    ]}))
    results = plan(pipeline, gpu_gb=80, device="cpu")
    assert [r["shapes_source"] for r in results] == ["the tiny preset's shapes"] * 2
    built = shapes_for_model(str(tiny_model))
    preset = shapes_for_preset("tiny")
    assert preset["audio"] == built["audio"]
    assert {k: v for k, v in preset["text"].items() if k != "vocab"} == {k: v for k, v in built["text"].items() if k != "vocab"}


def test_unknown_model_is_a_user_error(tmp_path):
    from audio_rft import UserError

    with pytest.raises(UserError, match="known hub ids"):
        shapes_for_model("someone/unknown-model")


# ---------------------------------------------------------------- bench (tiny preset, tiny lengths)


def test_bench_grpo_runs_both_variants_and_writes_the_keys(tiny_model, tmp_path):
    from audio_rft.bench import run_grpo_bench

    result = run_grpo_bench(tiny_model, steps=1, completion_tokens=3, think_tokens=4, think_steps=1, warmup=0,
                            threads=1, G=2, seconds=2.0, think_variants=("ours",), matmul_n=256,
                            log=lambda m: None)
    for key in ("ours", "baseline", "speedup", "peak_memory_ratio", "config", "machine", "profile", "matmul"):
        assert key in result
    for variant in ("ours", "baseline"):
        for key in ("step_seconds", "tokens_per_second", "peak_memory_bytes", "profile_seconds",
                    "achieved_flops_per_second", "fraction_of_matmul_rate"):
            assert key in result[variant], (variant, key)
        assert "error" not in result[variant]
    assert result["cases"]["think"]["variants"] == ["ours"]
    assert {"cpu", "cores", "torch", "threads"} <= set(result["machine"])
    json.dumps(result)


def test_bench_eval_runs_both_ways(tiny_model, tmp_path):
    from audio_rft.bench import build_eval_set, run_eval_bench

    data = build_eval_set(tmp_path / "data", n=4, min_seconds=1.0, max_seconds=3.0)
    result = run_eval_bench(tiny_model, data, items=4, batch_size=2, ours_max_new_tokens=2, baseline_max_new_tokens=4,
                            threads=1, log=lambda m: None)
    for key in ("ours", "baseline", "speedup", "config", "machine"):
        assert key in result
    assert result["ours"]["items"] == result["baseline"]["items"] == 4
    json.dumps(result)
