"""scripts/eval_checkpoints.sh: every checkpoint scored on the test split and on a dev split; the checkpoint
chosen on the dev split is reported beside the best-on-test (flagged) and the mean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audio_rft.eval.report import build_report
from helpers import synth_data, tiny_model  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpoint_chosen_on_dev_is_reported_and_best_on_test_is_flagged(tiny_model, synth_data, tmp_path):
    from audio_rft.data.dataset import split_off_dev

    run = tmp_path / "run"
    for step in (1, 2):  # two "checkpoints": the same tiny weights, so dev ties and the earliest step is chosen
        shutil.copytree(tiny_model, run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "COMPLETE.json").write_text(json.dumps({"step": step}))
    split_off_dev(synth_data / "train", 8, 0, tmp_path / "rest", tmp_path / "dev")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DEV": str(tmp_path / "dev"),
           "LIMIT": "8", "BATCH_SIZE": "8", "MAX_NEW_TOKENS": "6", "DEVICE": "cpu", "DTYPE": "fp32", "OUT": str(tmp_path / "out"),
           "AUDIO_RFT": f"{sys.executable} -m audio_rft", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "eval_checkpoints.sh"), str(run), str(synth_data / "test")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    selection = json.loads((out / "selection.json").read_text())
    assert selection["chosen_on_dev"]["step"] == 1 and selection["best_on_test"]["step"] == 1
    assert selection["chosen_on_dev"]["test_accuracy"] == selection["mean_over_checkpoints"]  # identical weights
    assert (out / "dev" / "step-2.scored.json").is_file() and "Chosen on the dev split" in (out / "accuracy_by_step.md").read_text()
    report = build_report([("chosen", out / "chosen.json"), ("best-on-test", out / "best-on-test.json")], tmp_path / "r")
    assert [v["chosen_on_scored_split"] for v in report["variants"]] == [False, True]
    # without DEV: only the best-on-test, and the table says nothing was chosen on a dev split
    env.pop("DEV")
    env["OUT"] = str(tmp_path / "out2")
    done = subprocess.run(["bash", str(REPO / "scripts" / "eval_checkpoints.sh"), str(run), str(synth_data / "test")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out2" / "selection.json").read_text())["chosen_on_dev"] is None
    assert "No dev split given" in done.stdout and not (tmp_path / "out2" / "chosen.json").exists()
