"""audio_rft.launch: what a stage's `launch:` line runs (plan reads it), the line for another GPU count, and
scripts/reproduce_r1_aqa.sh, which keeps each stage's strategy for any GPU count (its dry run: ~4 s each
on a quiet 2-core machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from audio_rft import UserError
from audio_rft.launch import for_gpus, launched
from audio_rft.plan import plan
from audio_rft.train.grpo import GRPOConfig

REPO = Path(__file__).resolve().parents[1]
R1_AQA = REPO / "pipelines" / "r1-aqa.yaml"


def _line(config_file: str, *extra: str) -> list[str]:
    return ["accelerate", "launch", "--config_file", f"pipelines/accelerate/{config_file}", *extra]


@pytest.mark.parametrize("config_file, extra, processes, strategy", [
    ("fsdp.yaml", ("--num_processes", "8"), 8, "fsdp"),
    ("ddp.yaml", ("--num_processes", "4"), 4, "ddp"),
    ("deepspeed-zero3.yaml", (), 8, "zero3"),          # the config's own num_processes and zero_stage
    ("fsdp.yaml", ("--num_processes", "1"), 1, "none"),  # one process: nothing to shard
    ("cpu.yaml", (), 2, "ddp"),
])
def test_a_launch_line_gives_the_processes_and_strategy_the_engine_will_pick(config_file, extra, processes, strategy):
    launch = launched(_line(config_file, *extra), GRPOConfig(), R1_AQA)
    assert (launch.processes, launch.strategy) == (processes, strategy)


def test_torchrun_an_explicit_strategy_and_no_launch_line():
    assert launched(["torchrun", "--nproc_per_node", "4"], GRPOConfig(), R1_AQA).strategy == "ddp"
    assert launched(["torchrun", "--nproc_per_node=4"], GRPOConfig(strategy="fsdp"), R1_AQA).strategy == "fsdp"
    assert launched(_line("ddp.yaml"), GRPOConfig(strategy="fsdp"), R1_AQA).strategy == "fsdp"  # the config wins
    assert (launched(None, GRPOConfig()).processes, launched(None, GRPOConfig()).strategy) == (1, "none")


def test_a_missing_accelerate_config_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="nope.yaml"):
        launched(["accelerate", "launch", "--config_file", "nope.yaml"], GRPOConfig(), R1_AQA, "stage grpo")


def test_the_same_stage_on_another_gpu_count_keeps_its_launcher_and_strategy():
    config = GRPOConfig()
    fsdp = launched(_line("fsdp.yaml", "--num_processes", "8"), config, R1_AQA)
    four = for_gpus(fsdp, 4, config, R1_AQA)
    assert (four.processes, four.strategy) == (4, "fsdp")
    assert four.command.count("--num_processes") == 1 and Path(four.command[four.command.index("--config_file") + 1]).is_absolute()
    one = for_gpus(fsdp, 1, config, R1_AQA)
    assert (one.processes, one.strategy, one.command) == (1, "none", None)  # in-process: never 8 ranks on one GPU
    torchrun = for_gpus(launched(["torchrun", "--nproc_per_node", "8"], config), 2, config)
    assert torchrun.command == ["torchrun", "--nproc_per_node", "2"]


def test_plan_reports_r1_aqa_stages_under_their_launch_strategy():
    results = {r["name"]: r for r in plan(R1_AQA)}
    assert {name: (r["strategy"], r["launch"]["processes"]) for name, r in results.items()} == {
        "grpo": ("ddp", 8), "grpo-think": ("ddp", 8), "grpo-full": ("fsdp", 8), "sft-lora": ("ddp", 8),
        "sft-full": ("fsdp", 8)}
    assert results["grpo-full"]["fits"] and results["sft-full"]["fits"]  # FSDP over 8 x 80 GB
    one = {r["name"]: r for r in plan(R1_AQA, gpus=1)}
    assert {r["strategy"] for r in one.values()} == {"none"}
    assert not one["grpo-full"]["fits"] and not one["sft-full"]["fits"] and one["grpo"]["fits"]


@pytest.mark.parametrize("gpus", [8, 1])
def test_the_pipeline_for_n_gpus_keeps_each_launch_strategy_and_leaves_out_what_does_not_fit(gpus):
    from audio_rft.launch import fitted_pipeline

    results = plan(R1_AQA, gpus=gpus)
    data, lines = fitted_pipeline(R1_AQA, results, gpus)
    stages = {s["name"]: s for s in data["stages"]}
    if gpus == 8:
        assert "fsdp.yaml" in stages["grpo-full"]["launch"] and "fsdp.yaml" in stages["sft-full"]["launch"]
        assert "ddp.yaml" in stages["grpo"]["launch"] and "--num_processes 8" in stages["sft-lora"]["launch"]
        assert len(stages["eval"]["config"]["variants"]) == 8
    else:
        assert "grpo-full" not in stages and "sft-full" not in stages
        assert not any("launch" in s for s in stages.values())
        assert {v["name"] for v in stages["eval"]["config"]["variants"]} >= {"grpo", "sft-lora", "grpo-think"}
        assert not any("full" in v["name"] for v in stages["eval"]["config"]["variants"])
        assert any(line.startswith("grpo-full: skipped: needs") for line in lines)


def _reproduce(tmp_path: Path, gpus: int) -> str:
    for name in ("avqa.json", "mmau.json"):
        (tmp_path / name).write_text("[]")
    env = {**os.environ, "GPUS": str(gpus), "AVQA_JSON": str(tmp_path / "avqa.json"),
           "MMAU_JSON": str(tmp_path / "mmau.json"), "OUT": str(tmp_path / f"run{gpus}"),
           "AUDIO_RFT": f"{sys.executable} -m audio_rft", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_r1_aqa.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_reproduce_script_on_8_gpus_keeps_fsdp_for_full_fine_tuning_and_ddp_for_lora(tmp_path):
    out = _reproduce(tmp_path, 8)
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if "launch:" in line and "would run" in line}
    for stage, config_file in [("[3/9] grpo (grpo)", "ddp.yaml"), ("[5/9] grpo-full (grpo)", "fsdp.yaml"),
                               ("[7/9] sft-full (sft)", "fsdp.yaml"), ("[6/9] sft-lora (sft)", "ddp.yaml")]:
        line = next(v for k, v in lines.items() if k == stage.split(":")[0])
        assert config_file in line and "--num_processes 8" in line


def test_reproduce_script_on_1_gpu_runs_in_process_and_says_what_it_skips(tmp_path):
    out = _reproduce(tmp_path, 1)
    assert "grpo-full: skipped: needs" in out and "sft-full: skipped: needs" in out
    assert "variant grpo-full left out" in out
    assert "--num_processes" not in out.split("+ exec")[-1]  # nothing launches 8 ranks
    fitted = yaml.safe_load((tmp_path / "run1" / "pipeline-1gpu.yaml").read_text())
    names = [s["name"] for s in fitted["stages"]]
    assert "grpo-full" not in names and "sft-full" not in names and "grpo" in names
    assert not any("launch" in s for s in fitted["stages"])


def test_pipelines_readme_quotes_what_plan_prints_for_r1_aqa():
    import re

    text = (REPO / "pipelines" / "README.md").read_text()
    table = text[text.index("| stage | as launched: 8 GPUs | on 1 GPU (in-process) |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split(" ")[0]] = [float(re.search(r"\d+\.\d+", c).group()) for c in cells[1:]]
    launched8 = {r["name"]: r for r in plan(R1_AQA)}
    one = {r["name"]: r for r in plan(R1_AQA, gpus=1)}
    assert set(rows) == set(launched8)
    for name, (eight, single) in rows.items():
        assert eight == launched8[name]["per_gpu_gib"] and single == one[name]["per_gpu_gib"], name
    assert "commented" not in text.split("## The paper on a GPU")[1].split("## Several GPUs")[0]
