"""`audio-rft score`: the MMAU benchmark's scoring, decision for decision (docs/design.md, "How MMAU scores a prediction").

Input is MMAU's prediction format: a JSON list of items (id, question, choices, answer, task, difficulty,
sub-category / sub_category, …) each with `model_prediction` (or only `model_output`, read raw as
MMAU's older scripts did). Items whose answer is withheld (MMAU's test split) are unscored, not wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audio_rft import UserError
from audio_rft.answers import mmau_match
from audio_rft.fileio import atomic_write_json

TASK_ORDER = ("sound", "music", "speech")
DIFFICULTY_ORDER = ("easy", "medium", "hard")


def load_predictions(path: str | Path) -> list[dict]:
    """Read and check a prediction file; every problem is a one-line UserError naming the file."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of prediction items, got {type(items).__name__}")
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
        choices = item.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: field 'choices' missing or not a non-empty list of strings")
        if item.get("answer") is not None and not isinstance(item["answer"], str):
            raise UserError(f"{where}: field 'answer' must be a string or null")
        for key in ("model_prediction", "model_output"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise UserError(f"{where}: field {key!r} must be a string or null")
    return items


def sub_category(item: dict) -> str | None:
    # MMAU's files say `sub-category`; our samples say `sub_category`.
    return item.get("sub_category", item.get("sub-category"))


def prediction_text(item: dict) -> str | None:
    """`model_prediction`, else the raw `model_output` (no extraction: MMAU matches the raw text); None if neither."""
    for key in ("model_prediction", "model_output"):
        if item.get(key) is not None:
            return item[key]
    return None


def item_match(item: dict) -> int | None:
    """1 / 0 by the MMAU rule; None when the item has no answer to score against."""
    if item.get("answer") is None:
        return None
    return int(mmau_match(prediction_text(item) or "", item["answer"], item["choices"]))


def _ordered(counts: dict[str, list[int]], order: tuple[str, ...]) -> dict[str, dict]:
    keys = [k for k in order if k in counts] + [k for k in counts if k not in order]
    return {k: {"accuracy": round(100 * counts[k][0] / counts[k][1], 2), "correct": counts[k][0], "n": counts[k][1]} for k in keys}


def score_predictions(items: list[dict]) -> dict:
    """Score items (already checked by load_predictions) → {"summary": …, "samples": [{"id", "match"}, …]} in input order."""
    groups: dict[str, dict[str, list[int]]] = {"task": {}, "difficulty": {}, "sub_category": {}}
    samples, correct, n, no_prediction = [], 0, 0, 0
    for item in items:
        match = item_match(item)
        samples.append({"id": item.get("id"), "match": match})
        if match is None:
            continue
        n += 1
        correct += match
        no_prediction += prediction_text(item) is None
        # As the official script: an item without a sub-category counts in the total, not in that table.
        for group, key in (("task", item.get("task")), ("difficulty", item.get("difficulty")), ("sub_category", sub_category(item))):
            if key is not None:
                counts = groups[group].setdefault(str(key), [0, 0])
                counts[0] += match
                counts[1] += 1
    summary = {
        "total_accuracy": round(100 * correct / n, 2) if n else None,
        "n": n,
        "correct": correct,
        "unscored": len(items) - n,
        "no_prediction": no_prediction,
        "task": _ordered(groups["task"], TASK_ORDER),
        "difficulty": _ordered(groups["difficulty"], DIFFICULTY_ORDER),
        "sub_category": _ordered(groups["sub_category"], ()),
    }
    return {"summary": summary, "samples": samples}


def format_summary(summary: dict) -> str:
    """The official script's printout (percent with 2 decimals, "over N samples"), plus the correct counts."""
    bar = "*" * 30
    lines = []
    for title, group in (("Task-wise", "task"), ("Difficulty-wise", "difficulty"), ("Sub-category-wise", "sub_category")):
        lines += [bar, f"{title} Accuracy:"]
        lines += [f"{k} : {v['accuracy']:.2f}% over {v['n']} samples ({v['correct']} correct)" for k, v in summary[group].items()]
    lines.append(bar)
    if summary["n"]:
        lines.append(f"Total Accuracy: {summary['total_accuracy']:.2f}% over {summary['n']} samples ({summary['correct']} correct)")
    else:
        lines.append("Total Accuracy: n/a (no item has an answer to score against)")
    lines += [bar, f"No prediction count: {summary['no_prediction']}"]
    if summary["unscored"]:
        lines.append(f"Unscored (answer withheld, e.g. MMAU test split): {summary['unscored']}")
    return "\n".join(lines)


def score_file(path: str | Path, output: str | Path | None = None) -> dict:
    result = score_predictions(load_predictions(path))
    if output is not None:
        atomic_write_json(output, result)
    return result


def _run(args) -> int:
    result = score_file(args.predictions, args.output)
    print(format_summary(result["summary"]))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def add_parser(subparsers: Any, command: str) -> None:
    p = subparsers.add_parser(command, help="score predictions with the MMAU rule",
                              description="Score an MMAU-format prediction file with the benchmark's own rule.")
    p.add_argument("predictions", metavar="PRED.json", help="JSON list of items with model_prediction (or model_output)")
    p.add_argument("--output", metavar="SCORED.json", help="write the summary and per-item matches here")
    p.set_defaults(func=_run)
