"""Training curves (metrics.jsonl -> curves.png)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from audio_rft.eval.curves import _panels, plot_training_curves, read_metrics, training_folder

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _grpo_record(step: int) -> dict:
    return {"step": step, "loss": 0.01 * step, "reward": step / 40, "reward_std": 0.1, "rewards/accuracy": step / 80,
            "rewards/format": 1.0, "rewards/length": 0.5, "kl": 0.001 * step, "clip_ratio": 0.0,
            "completion_length": 11.0, "lr": 1e-4, "time/rollout": 0.5}


def _write(folder: Path, records: list, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


def test_grpo_panels_in_order_with_custom_rewards(tmp_path):
    records = [_grpo_record(s) for s in range(1, 41)]
    records[19].update({"eval/accuracy": 0.4, "eval/accuracy_mmau": 0.45, "eval/n": 10})
    titles = [title for title, _ in _panels(records)]
    assert titles == ["reward (mean of the group)", "accuracy reward", "format reward", "length reward",
                      "KL to the reference", "clip ratio", "completion length (tokens)", "loss", "held-out accuracy"]
    held_out = dict(_panels(records))["held-out accuracy"]
    assert [(key, steps) for key, steps, _ in held_out] == [("eval/accuracy", [20]), ("eval/accuracy_mmau", [20])]
    folder = _write(tmp_path / "grpo", records, tail='{"step": 41, "loss"')  # a line cut by a crash
    png = plot_training_curves(folder)
    assert png == folder / "curves.png" and png.read_bytes().startswith(PNG)


def test_sft_loss_only_and_nothing_to_draw(tmp_path):
    sft = _write(tmp_path / "sft", [{"step": s, "loss": 1 / s, "lr": 1e-4, "skipped": "x" if s == 2 else None} for s in (1, 2, 3)])
    assert [title for title, _ in _panels(read_metrics(sft / "metrics.jsonl"))] == ["loss"]
    assert plot_training_curves(sft).read_bytes().startswith(PNG)
    assert plot_training_curves(tmp_path / "none") is None  # no metrics.jsonl
    assert plot_training_curves(_write(tmp_path / "empty", [])) is None
    assert plot_training_curves(_write(tmp_path / "nan", [{"step": 1, "loss": float("nan")}])) is None


def test_read_metrics_orders_steps_and_keeps_the_last_of_a_repeat(tmp_path):
    folder = _write(tmp_path / "run", [{"step": 2, "loss": 2.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 3.0}],
                    tail="not json\n[1, 2]\n")
    assert read_metrics(folder / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 3.0}]


def test_training_folder(tmp_path):
    folder = _write(tmp_path / "grpo", [{"step": 1, "loss": 1.0}])
    assert training_folder(str(folder / "final")) == folder and training_folder(folder / "checkpoint-40") == folder
    assert training_folder("Qwen/Qwen2-Audio-7B-Instruct") is None and training_folder(None) is None


def test_cli_draws_every_training_folder_of_a_run(tmp_path):
    run = tmp_path / "run"
    _write(run / "sft", [{"step": 1, "loss": 1.0}])
    _write(run / "grpo", [_grpo_record(1), _grpo_record(2)])
    (run / "eval").mkdir()
    cli = lambda *a: subprocess.run([sys.executable, "-m", "audio_rft", "curves", *map(str, a)],
                                    capture_output=True, text=True, cwd=REPO)
    proc = cli(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(run / "grpo" / "curves.png"), str(run / "sft" / "curves.png")]
    proc = cli(run / "eval")
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
