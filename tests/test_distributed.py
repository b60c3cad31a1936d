"""Several processes on the CPU over gloo: ddp and fsdp (and deepspeed where installed) against one process.

Each launch (torchrun, 2 processes) runs several trainings through tests/dist_driver.py, since starting the
processes is the slow part. One process with batch B and two with B/2 each see the same global batch, so
losses and weights must agree to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (HALF_PLUGIN, PLUGIN, ROOT, adapter_weights, assert_same_weights,  # noqa: F401
                     assert_same_weights_but_adam_noise, plugin_dir,
                     read_metrics, synth_data, tiny_model)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")

DRIVER = ROOT / "tests" / "dist_driver.py"
STRATEGIES = ["ddp", "fsdp"]


def deepspeed_or_reason() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "DeepSpeed is not installed (pip install 'audio-rft[deepspeed]')"
    return None


def env(plugin: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": f"{plugin}{os.pathsep}{ROOT}", "DS_ACCELERATOR": "cpu"}


def launch_command(spec: Path, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(DRIVER), str(spec)]


def launch(jobs: list[dict], folder: Path, plugin: Path, processes: int = 2) -> None:
    spec = folder / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    done = subprocess.run(launch_command(spec, processes), env=env(plugin), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]


def grpo(tiny, data, out, **extra) -> dict:
    return {"model": str(tiny), "data": str(data / "train"), "out": str(out), "max_steps": 3, "grad_accum": 1,
            "num_generations": 4, "max_completion_length": 6, "save_every": 1, "report_to": [], "device": "cpu",
            "threads": 1, "loss_type": "sequence", "lora_dropout": 0.0, "beta": 0.04, "lr": 1e-3,
            "rewards": ["accuracy", "format", PLUGIN], "log_completions_every": 0, "seed": 0, **extra}


def sft(tiny, data, out, **extra) -> dict:
    return {"model": str(tiny), "data": str(data / "train"), "out": str(out), "max_steps": 3, "grad_accum": 2,
            "save_every": 0, "report_to": [], "device": "cpu", "threads": 1, "lora_dropout": 0.0, "lr": 1e-3,
            "prompt_mode": "answer", "seed": 0, **extra}


# name -> (kind, config maker, one-process batch size, extra keys); two processes take half the batch each
CASES = {
    "grpo-lora": ("grpo", grpo, 2, {}),
    "grpo-full": ("grpo", grpo, 2, {"lora": False, "lr": 1e-4}),
    "sft-lora": ("sft", sft, 2, {}),
    "sft-full": ("sft", sft, 2, {"lora": False, "lr": 1e-4}),
}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (out / "final" / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(out / "final" / name))


@pytest.fixture(scope="module")
def runs(tiny_model, synth_data, plugin_dir, tmp_path_factory):
    """Every case in one process, and under each strategy with two (one launch per strategy)."""
    from audio_rft.config import build_config
    from audio_rft.train.grpo import GRPOConfig, train_grpo
    from audio_rft.train.sft import SFTConfig, train_sft

    root = tmp_path_factory.mktemp("dist")
    sys.path.insert(0, str(plugin_dir))
    try:
        for name, (kind, make, batch, extra) in CASES.items():
            cls, train = (GRPOConfig, train_grpo) if kind == "grpo" else (SFTConfig, train_sft)
            train(build_config(cls, make(tiny_model, synth_data, root / "one" / name, batch_size=batch, **extra)))
    finally:
        sys.path.remove(str(plugin_dir))
    for strategy in STRATEGIES:
        jobs = [{"kind": kind, "config": make(tiny_model, synth_data, root / strategy / name, batch_size=batch // 2,
                                              strategy=strategy, **extra)}
                for name, (kind, make, batch, extra) in CASES.items()]
        jobs.append({"kind": "measure", "config": grpo(tiny_model, synth_data, root / strategy / "measure",
                                                       batch_size=1, strategy=strategy, lora=False)})
        jobs += extra_jobs(tiny_model, synth_data, root / strategy, strategy)
        launch(jobs, root, plugin_dir)
    return root


def extra_jobs(tiny_model, synth_data, root: Path, strategy: str, **extra) -> list[dict]:
    """What breaks at full size, shown small (issue 25): held-out evaluation every step, skipped steps (a NaN loss;
    no rank with signal), and the gradient bytes a rank holds mid-accumulation."""
    return [
        {"kind": "grpo", "config": grpo(tiny_model, synth_data, root / "eval-every-step", batch_size=1, strategy=strategy,
                                        max_steps=2, save_every=0, eval_data=str(synth_data / "test"), eval_every=1,
                                        eval_limit=4, eval_batch_size=4, **extra)},
        {"kind": "sft", "config": sft(tiny_model, synth_data, root / "skip-nan", batch_size=1, strategy=strategy,
                                      **extra), "record_steps": True, "nan_calls": [3, 3]},
        {"kind": "grpo", "config": grpo(tiny_model, synth_data, root / "skip-no-signal", batch_size=1, strategy=strategy,
                                        max_steps=2, save_every=0, rewards=["accuracy"], skip_equal_groups=True,
                                        **extra), "record_steps": True},
        {"kind": "gradients", "config": sft(tiny_model, synth_data, root / "gradients", batch_size=1, strategy=strategy,
                                            lora=False, **extra)},
        {"kind": "gradients", "config": sft(tiny_model, synth_data, root / "gradients-bf16", batch_size=1,
                                            strategy=strategy, lora=False, **{**extra, "dtype": "bf16"})},
    ]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_on_the_same_global_batch(runs, strategy, case):
    one, two = runs / "one" / case, runs / strategy / case
    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in b] == [1, 2, 3]
    assert a[0]["loss"] != 0.0  # a real number to compare
    for ma, mb in zip(a, b):
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5, abs=1e-7), (case, ma["step"])
        for key in ("reward", "kl", "completion_length", "grad_norm"):
            if key in ma:
                assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), (case, ma["step"], key)
    assert json.loads((two / "run.json").read_text())["engine"]["strategy"] == strategy
    assert_same_weights_but_adam_noise(final_weights(one), final_weights(two), lr=CASES[case][3].get("lr", 1e-3))


def test_the_runs_compared_really_trained(runs, tiny_model):
    from safetensors.torch import load_file

    base = load_file(str(tiny_model / "model.safetensors"))
    for case in CASES:
        weights = final_weights(runs / "one" / case)
        if "lora" in case:
            assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), case
        else:
            assert any(not torch.equal(v, base[k]) for k, v in weights.items() if k in base), case


def test_fsdp_holds_half_the_parameter_and_optimizer_bytes_of_ddp(runs):
    measured = {s: [json.loads((runs / s / "measure" / f"bytes-{r}.json").read_text()) for r in (0, 1)]
                for s in STRATEGIES}
    for kind in ("parameters", "optimizer"):
        ddp = measured["ddp"][0][kind]
        assert ddp > 0
        for rank in (0, 1):
            share = measured["fsdp"][rank][kind] / ddp
            assert 0.40 < share < 0.62, (kind, rank, share)  # half, plus padding of uneven shards


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranks_draw_different_dropout_masks(runs, strategy):
    draws = [json.loads((runs / strategy / "measure" / f"bytes-{r}.json").read_text())["dropout_draws"] for r in (0, 1)]
    assert draws[0] != draws[1]


def gradient_share(folder: Path, rank: int) -> float:
    measured = json.loads((folder / f"gradients-{rank}.json").read_text())
    return measured["held"] / measured["full_fp32"]


@pytest.mark.parametrize("case", ["gradients", "gradients-bf16"])
def test_fsdp_keeps_gradients_sharded_under_accumulation(runs, case):
    """After the first of two micro-batches each fsdp rank holds about half the fp32 gradient (FSDP2 reduce-
    scatters every micro-batch); DDP, for contrast, holds all of it. sft-full (grad_accum 2) still matches one
    process (test_two_processes_match_one_on_the_same_global_batch)."""
    for rank in (0, 1):
        assert 0.40 < gradient_share(runs / "fsdp" / case, rank) < 0.62
        assert gradient_share(runs / "ddp" / case, rank) > 0.95


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_held_out_evaluation_every_step_neither_hangs_nor_skips(runs, strategy):
    metrics = read_metrics(runs / strategy / "eval-every-step")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["eval/n"] == 4 and 0.0 <= m["eval/accuracy"] <= 1.0 for m in metrics)


def assert_skipped_steps_change_nothing(folder: Path, expected_apply: list[bool]) -> None:
    for case in ("skip-nan", "skip-no-signal"):
        for rank in (0, 1):
            records = json.loads((folder / case / f"steps-{rank}.json").read_text())
            want = expected_apply if case == "skip-nan" else [False, False]
            assert [r["apply"] for r in records] == want, (case, rank)
            assert [r["changed"] for r in records] == want, (case, rank, records)
        metrics = read_metrics(folder / case)
        if case == "skip-nan":
            assert ["skipped" in m for m in metrics] == [not a for a in expected_apply]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_skipped_steps_change_no_weight_and_no_optimizer_state(runs, strategy):
    """A NaN loss at step 2 of 3, and steps where no rank has signal: neither moves weights or AdamW state."""
    assert_skipped_steps_change_nothing(runs / strategy, [True, False, True])


def test_deepspeed_skipped_steps_change_no_weight_and_no_optimizer_state(runs, tiny_model, synth_data, plugin_dir):
    reason = deepspeed_or_reason()
    if reason:
        pytest.skip(reason)
    # bf16, where ZeRO had no overflow skip (fp32 ZeRO skips on a non-finite norm); one launch for both stages
    folders = [runs / f"ds-skip-{stage}-bf16" for stage in (2, 3)]
    jobs = [job for folder in folders
            for job in extra_jobs(tiny_model, synth_data, folder, "deepspeed", zero_stage=int(folder.name[8]),
                                  dtype=folder.name[10:])
            if job["config"]["out"].split("/")[-1].startswith("skip")]
    launch(jobs, runs, plugin_dir)
    for folder in folders:
        assert_skipped_steps_change_nothing(folder, [True, False, True])


def test_checkpoint_manifests_split_the_hashing_between_ranks(runs, tmp_path):
    """Each rank hashed about half the bytes of a sharded checkpoint; resume refuses a byte flipped in a file
    that rank 1 vouched for."""
    import shutil

    from audio_rft.train.common import COMPLETE, is_complete

    checkpoint = runs / "fsdp" / "grpo-full" / "checkpoint-2"
    marker = json.loads((checkpoint / COMPLETE).read_text())
    assert sorted(marker["manifests"]) == ["manifests/rank-0.json", "manifests/rank-1.json"]
    shares = [json.loads((checkpoint / name).read_text()) for name in sorted(marker["manifests"])]
    assert not shares[0].keys() & shares[1].keys()
    every = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    assert shares[0].keys() | shares[1].keys() == every - {COMPLETE, *marker["manifests"]}
    sizes = [sum(size for _, size in share.values()) for share in shares]
    assert min(sizes) / sum(sizes) > 0.3, sizes
    assert is_complete(checkpoint) and all(is_complete(checkpoint, r, 2) for r in (0, 1))
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    victim = copy / max(shares[1], key=lambda name: shares[1][name][1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert is_complete(copy, 0, 2) and not is_complete(copy, 1, 2) and not is_complete(copy)


def test_killed_sharded_grpo_reruns_to_the_uninterrupted_weights(runs, tiny_model, synth_data, plugin_dir, tmp_path):
    """Kill an fsdp GRPO run (the whole process group) once checkpoint-1 is complete; the same command again
    resumes from it and ends with the weights and metrics of the uninterrupted run."""
    from audio_rft.train.common import is_complete

    out = tmp_path / "run"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"kind": "grpo", "config": grpo(tiny_model, synth_data, out, batch_size=1,
                                                                 strategy="fsdp")}]))
    proc = subprocess.Popen(launch_command(spec), env=env(plugin_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and not (out / "checkpoint-1" / "COMPLETE.json").exists():
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert is_complete(out / "checkpoint-1") and not (out / "final").exists()
    done = subprocess.run(launch_command(spec), env=env(plugin_dir), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming from" in done.stderr
    whole = runs / "fsdp" / "grpo-lora"
    assert_same_weights(final_weights(whole), final_weights(out), atol=1e-6)
    for a, b in zip(read_metrics(whole), read_metrics(out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)


def test_deepspeed_matches_one_process(runs, tiny_model, synth_data, plugin_dir):
    reason = deepspeed_or_reason()
    if reason:
        pytest.skip(reason)
    for stage in (2, 3):
        jobs = [{"kind": kind, "config": make(tiny_model, synth_data, runs / f"zero{stage}" / name, batch_size=batch // 2,
                                              strategy="deepspeed", zero_stage=stage, **extra)}
                for name, (kind, make, batch, extra) in CASES.items()]
        launch(jobs, runs, plugin_dir)
        for name in CASES:
            engine = json.loads((runs / f"zero{stage}" / name / "run.json").read_text())["engine"]
            assert engine["strategy"] == "deepspeed" and engine["processes"] == 2
            a, b = read_metrics(runs / "one" / name), read_metrics(runs / f"zero{stage}" / name)
            for ma, mb in zip(a, b):
                assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5, abs=1e-7), (stage, name, ma["step"])
            assert_same_weights_but_adam_noise(final_weights(runs / "one" / name),
                                               final_weights(runs / f"zero{stage}" / name), lr=CASES[name][3].get("lr", 1e-3))


@pytest.mark.parametrize("launch_config, strategy", [("fsdp.yaml", "fsdp"), ("deepspeed-zero3.yaml", "deepspeed")])
def test_accelerate_launch_configs_pick_the_engine(tiny_model, synth_data, plugin_dir, tmp_path, launch_config, strategy):
    """`accelerate launch --config_file pipelines/accelerate/X.yaml` with strategy=auto trains under that engine."""
    if strategy == "deepspeed" and deepspeed_or_reason():
        pytest.skip(deepspeed_or_reason())
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "pipelines" / "accelerate" / launch_config), "--num_processes", "2", "--main_process_port", "0",
               "-m", "audio_rft", "sft", f"model={tiny_model}", f"data={synth_data / 'train'}", f"out={out}",
               "max_steps=1", "batch_size=2", "report_to=[]", "device=cpu", "save_every=0", "threads=1"]
    done = subprocess.run(command, env=env(plugin_dir), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    engine = json.loads((out / "run.json").read_text())["engine"]
    assert engine["strategy"] == strategy and engine["processes"] == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_rank_with_nothing_to_learn_and_ranks_stopping_apart_neither_hang_nor_drift(
        tiny_model, synth_data, plugin_dir, tmp_path, strategy):
    """Rewards that leave about half the questions with equal rewards: with skip_equal_groups some steps find one
    rank with every group skipped while the other trains, and completions stop at different lengths on the two
    ranks (a stop token is likely here). The run must end (no collective left waiting), and under ddp both
    replicas must hold the same weights at the end."""
    out = tmp_path / "run"
    config = grpo(tiny_model, synth_data, out, batch_size=1, strategy=strategy, max_steps=6, save_every=0,
                  rewards=[HALF_PLUGIN], skip_equal_groups=True, max_completion_length=10, temperature=1.5)
    launch([{"kind": "grpo", "config": config, "checksums": True}], tmp_path, plugin_dir)
    metrics = read_metrics(out)
    assert len(metrics) == 6
    assert any(m["frac_reward_zero_std"] == 0.5 for m in metrics)  # one rank skipped all its groups that step
    digests = [(out / f"weights-{rank}.txt").read_text() for rank in (0, 1)]
    if strategy == "ddp":
        assert digests[0] == digests[1]


def test_sampling_steps_until_every_rank_is_done(tiny_model, synth_data):
    """`all_done` keeps a finished batch decoding (padding) until the others are done, without changing it."""
    from helpers import load_tiny, prompt_batch, samples_of

    from audio_rft.rollout import sample

    processor, model = load_tiny(tiny_model)
    folder = synth_data / "train"
    batch = prompt_batch(processor, folder, samples_of(folder, 2))
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
        model.lm_head.bias[im_end] = 50.0  # every completion stops at its first token
        alone, alone_mask = sample(model, processor, batch, 2, 8, 0.0)
        steps = []

        def others_need_three(done: bool) -> bool:
            steps.append(done)
            return done and len(steps) >= 3

        waiting, waiting_mask = sample(model, processor, batch, 2, 8, 0.0, all_done=others_need_three)
    assert alone.shape[1] == 1 and waiting.shape[1] == 3 and steps == [True, True, True]
    assert torch.equal(waiting[:, :1], alone) and torch.equal(waiting_mask[:, :1], alone_mask)
    assert not waiting_mask[:, 1:].any()


@pytest.mark.slow
def test_sharded_loading_holds_a_shard_per_rank_not_the_model(synth_data, plugin_dir, tmp_path):
    """Peak resident memory of loading the bench preset (Qwen2-Audio-7B's vocabulary, 2 x 156,032 x 256 embedding
    and head, two narrow layers) for full fine-tuning: one process, and a rank other than 0 of a 2-process fsdp
    load, which builds on the meta device and receives its shard one tensor at a time."""
    from audio_rft.model import build_tiny_preset

    model = build_tiny_preset("bench", tmp_path / "bench")
    loaded = {}
    for processes, strategy in ((1, "none"), (2, "fsdp")):
        out = tmp_path / strategy
        launch([{"kind": "load", "config": sft(model, synth_data, out, lora=False, strategy=strategy, batch_size=1)}],
               tmp_path, plugin_dir, processes)
        loaded[strategy] = [json.loads((out / f"memory-{r}.json").read_text()) for r in range(processes)]
    growth = {k: [m["peak"] - m["before"] for m in v] for k, v in loaded.items()}
    print("peak resident growth while loading, MiB:", {k: [round(b / 2**20) for b in v] for k, v in growth.items()})
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert growth["none"][0] > 0.9 * weights  # one process holds the whole model
    assert growth["fsdp"][1] < 0.75 * growth["none"][0]
