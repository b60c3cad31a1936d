"""Training curves: a training folder's metrics.jsonl drawn against step into curves.png beside it.

The paper shows its reward and accuracy curves; metrics.jsonl has them for every run, whether or not
TensorBoard or W&B is installed, so the picture is drawn from it. `audio-rft curves DIR` draws one folder
(or every training folder of a pipeline run); the pipeline's report embeds one per trained variant.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any

from audio_rft import UserError
from audio_rft.fileio import atomic_write_bytes

METRICS = "metrics.jsonl"
CURVES = "curves.png"
# (panel title, the keys drawn in it), in the order shown; a panel appears when one of its keys is logged.
# Other `rewards/<name>` keys (custom reward functions) get a panel each after "format reward".
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("reward (mean of the group)", ("reward",)),
    ("accuracy reward", ("rewards/accuracy",)),
    ("format reward", ("rewards/format",)),
    ("KL to the reference", ("kl",)),
    ("clip ratio", ("clip_ratio",)),
    ("completion length (tokens)", ("completion_length",)),
    ("loss", ("loss",)),
    ("held-out accuracy", ("eval/accuracy", "eval/accuracy_mmau")),
]
SMOOTH_FROM = 20  # with at least this many points, a moving average is drawn over the faint per-step values


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl's records in step order; a cut or foreign line is skipped, a repeated step keeps its last."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record, dict):
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _panels(records: list[dict]) -> list[tuple[str, list[tuple[str, list[int], list[float]]]]]:
    known = {k for _, keys in PANELS for k in keys}
    extra = sorted({k for r in records for k in r if k.startswith("rewards/") and k not in known})
    layout = list(PANELS)
    at = next(i for i, (_, keys) in enumerate(layout) if keys == ("rewards/format",)) + 1
    layout[at:at] = [(f"{k.removeprefix('rewards/')} reward", (k,)) for k in extra]
    panels = []
    for title, keys in layout:
        lines = [(k, *_series(records, k)) for k in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((title, lines))
    return panels


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(out_dir: str | Path, png: str | Path | None = None) -> Path | None:
    """Draw out_dir/metrics.jsonl into out_dir/curves.png (or `png`); None when there is nothing to draw."""
    from audio_rft.eval.report import _pyplot

    out_dir = Path(out_dir)
    path = out_dir / METRICS
    if not path.is_file():
        return None
    records = read_metrics(path)
    panels = _panels(records)
    if not panels:
        return None
    plt = _pyplot()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    # at least two panels wide, so the title fits when SFT logs only its loss
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * max(2, cols), 2.6 * rows + 0.4), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for key, steps, values in lines:
            label = key if len(lines) > 1 else None
            if len(steps) < SMOOTH_FROM:  # few points (held-out evals, short runs): every one, marked
                ax.plot(steps, values, marker="o", markersize=3, label=label)
            else:  # per step, faint, under a moving average over a twentieth of the run
                shown = ax.plot(steps, values, alpha=0.3, linewidth=0.8)[0]
                ax.plot(steps, _moving_average(values, max(2, len(values) // 20)), color=shown.get_color(), label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    last = records[-1]["step"]
    smoothed = any(len(steps) >= SMOOTH_FROM for _, lines in panels for _, steps, _ in lines)
    fig.suptitle(f"{out_dir.name}: training metrics by step ({len(records)} logged, last step {last})"
                 + ("\nfaint: each step; solid: moving average" if smoothed else ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    target = Path(png) if png is not None else out_dir / CURVES
    atomic_write_bytes(target, buf.getvalue())
    return target


def training_folder(checkpoint: str | Path | None) -> Path | None:
    """The training folder a checkpoint (`<folder>/final`, `<folder>/checkpoint-N`) belongs to, by its
    metrics.jsonl; None for anything else (a hub id, an untrained preset)."""
    if not checkpoint:
        return None
    folder = Path(checkpoint).parent
    return folder if (folder / METRICS).is_file() else None


# ---------------------------------------------------------------- report_to

# report_to name -> (the module it needs, how to install it)
# ---------------------------------------------------------------- CLI

def _folders(path: Path) -> list[Path]:
    """A training folder, or every training folder directly inside a pipeline run folder."""
    if (path / METRICS).is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / METRICS).is_file()) if path.is_dir() else []


def _run(args: argparse.Namespace) -> int:
    drawn = 0
    for given in args.dirs:
        path = Path(given)
        if not path.is_dir():
            raise UserError(f"{path}: no such folder")
        folders = _folders(path)
        if not folders:
            raise UserError(f"{path}: no {METRICS} here or in its subfolders (a training output or pipeline run folder)")
        for folder in folders:
            png = plot_training_curves(folder)
            print(png if png else f"{folder / METRICS}: no numeric metric to draw")
            drawn += png is not None
    return 0 if drawn else 1


def add_parser(subparsers: Any, command: str) -> None:
    p = subparsers.add_parser(command, help="draw training curves (metrics.jsonl -> curves.png)",
                              description="Draw a training run's metrics.jsonl against step into curves.png beside "
                                          "it: GRPO's reward, accuracy and format rewards, KL, clip ratio, "
                                          "completion length and loss; SFT's loss and held-out accuracy.")
    p.add_argument("dirs", nargs="+", metavar="RUN_DIR",
                   help="a training output folder, or a pipeline run folder (every stage with a metrics.jsonl)")
    p.set_defaults(func=_run)
