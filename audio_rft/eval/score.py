"""`audio-rft score`: the MMAU benchmark's scoring, decision for decision (docs/design.md, "How MMAU scores a prediction").

Input is MMAU's prediction format: a JSON list of items (id, question, choices, answer, task, difficulty,
sub-category / sub_category, …) each with `model_prediction`, the answer extracted from the completion, and/or
`model_output`, the raw completion. MMAU's official evaluation.py, at its repository's head, reads
`model_output` (fixed in the code, no flag), although its README says `model_prediction`; the key has changed
more than once. So both are scored: the extracted prediction (the headline number) and the raw output (what
the official script reports). They agree on answer-prompt files; with a think prompt the raw output holds the
reasoning, and reasoning that names a wrong choice makes the item wrong by MMAU's rule.

An item whose prediction is null is wrong (counted as "no prediction"); an item whose answer is null (MMAU's
test split) is unscored, not wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from audio_rft import UserError
from audio_rft.answers import EXTRACTORS, extractor, mmau_match
from audio_rft.fileio import atomic_write_json

KEYS = ("model_prediction", "model_output")
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


def read_meta(pred_path: str | Path) -> dict:
    """PRED.meta.json beside a prediction file (written by `audio-rft infer`); {} when there is none."""
    meta_path = Path(pred_path).with_suffix(".meta.json")
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: unreadable meta file ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object")
    return meta


def prediction_text(item: dict, key: str | None = None, extract: str | None = None) -> str | None:
    """The text scored for an item; None when it has none.

    key None: the extracted prediction: `model_output` re-read with `extract` when that is given, else
    `model_prediction`; an item without that key (not a null one: a null prediction is wrong) gives the raw
    `model_output`, as MMAU's script reads a file that has only that key.
    key "model_prediction" or "model_output": that field, as it is.
    """
    if key is not None:
        return item.get(key)
    if extract is not None:
        return None if item.get("model_output") is None else extractor(extract)(item["model_output"])
    return item["model_prediction"] if "model_prediction" in item else item.get("model_output")


def item_match(item: dict, key: str | None = None, extract: str | None = None) -> int | None:
    """1 / 0 by the MMAU rule (a null prediction is wrong); None when the item has no answer to score against."""
    if item.get("answer") is None:
        return None
    return int(mmau_match(prediction_text(item, key, extract) or "", item["answer"], item["choices"]))


def _ordered(counts: dict[str, list[int]], order: tuple[str, ...]) -> dict[str, dict]:
    keys = [k for k in order if k in counts] + [k for k in counts if k not in order]
    return {k: {"accuracy": round(100 * counts[k][0] / counts[k][1], 2), "correct": counts[k][0], "n": counts[k][1]} for k in keys}


def check_options(items: list[dict], key: str | None, extract: str | None) -> None:
    """One-line errors for a key or extraction that cannot apply to these items."""
    if key is not None and key not in KEYS:
        raise UserError(f"unknown key {key!r} (one of {', '.join(KEYS)})")
    if extract is not None and extract not in EXTRACTORS:
        raise UserError(f"unknown extract {extract!r} (one of {', '.join(EXTRACTORS)})")
    if key is not None and extract is not None:
        raise UserError("--key scores a field as it is; --extract re-reads model_output: give one of them")
    needed = key or ("model_output" if extract else None)
    if needed and items and all(item.get(needed) is None for item in items):
        raise UserError(f"no item has {needed!r}")


def score_predictions(items: list[dict], key: str | None = None, extract: str | None = None) -> dict:
    """Score items (already checked by load_predictions) in input order.

    → {"summary", "samples": [{"id", "match"}, …], "key", "extract", "raw_output"}: summary and samples for the
    text `prediction_text(item, key, extract)` picks. Without a key, "raw_output" scores `model_output` as MMAU's
    script does ({"summary", "samples", "flips"}; None when no item has one); with a key, only that field is scored.
    """
    check_options(items, key, extract)
    result = {**_score(items, lambda item: prediction_text(item, key, extract)), "key": key, "extract": extract}
    if key is None:
        has_output = any(item.get("model_output") is not None for item in items)
        result["raw_output"] = raw = _score(items, lambda item: item.get("model_output")) if has_output else None
        if raw is not None:
            pairs = [(a["match"], b["match"]) for a, b in zip(result["samples"], raw["samples"]) if a["match"] is not None]
            # right on the extracted prediction only (typically reasoning that names a wrong choice), and the reverse
            raw["flips"] = {"extracted_only": sum(a > b for a, b in pairs), "raw_only": sum(b > a for a, b in pairs)}
    return result


def _score(items: list[dict], text_of: Callable[[dict], str | None]) -> dict:
    """{"summary", "samples"} for the text `text_of(item)` gives each item."""
    groups: dict[str, dict[str, list[int]]] = {"task": {}, "difficulty": {}, "sub_category": {}}
    samples, correct, n, no_prediction = [], 0, 0, 0
    for item in items:
        if item.get("answer") is None:
            samples.append({"id": item.get("id"), "match": None})
            continue
        text = text_of(item)
        match = int(mmau_match(text or "", item["answer"], item["choices"]))
        samples.append({"id": item.get("id"), "match": match})
        n += 1
        correct += match
        no_prediction += text is None
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


def format_raw_output(result: dict) -> str | None:
    """Two lines on the raw-output score beside the extracted one; None when there is no raw output to score."""
    raw = result.get("raw_output")
    if raw is None or not raw["summary"]["n"]:
        return None
    s, flips = raw["summary"], raw["flips"]
    line = (f"Raw output (model_output, what MMAU's evaluation.py reads at its head): {s['total_accuracy']:.2f}% "
            f"over {s['n']} samples ({s['correct']} correct)")
    if not flips["extracted_only"] and not flips["raw_only"]:
        return line + "; the same items as the extracted prediction"
    return (line + f"\n{flips['extracted_only']} items are right on the extracted prediction and wrong on the raw output "
            f"(its reasoning or other text names a wrong choice), {flips['raw_only']} the other way")


def score_file(path: str | Path, output: str | Path | None = None, key: str | None = None,
               extract: str | None = None, rule: str = "mmau") -> dict:
    """Score a prediction file by `rule`: MMAU's here; MMAR's, MMSU's or AIR-Bench's by eval/benchmarks.py."""
    from audio_rft.eval.benchmarks import check_rule, score_benchmark_file

    check_rule(rule)
    if rule != "mmau":
        if key is not None or extract is not None:
            raise UserError(f"--rule {rule} reads the key its official script reads; --key and --extract are for mmau")
        result = score_benchmark_file(path, rule)
        result["benchmark_version"] = read_meta(path).get("benchmark_version")
        if output is not None:
            atomic_write_json(output, result)
        return result
    items = load_predictions(path)
    try:
        result = score_predictions(items, key, extract)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    meta = read_meta(path)
    if key != "model_output" and extract is None:
        result["extract"] = meta.get("extract")  # how `audio-rft infer` wrote model_prediction, when known
    result["benchmark_version"] = meta.get("benchmark_version")  # which release of the benchmark file was scored
    result["rule"] = "mmau"
    # MMAU's evaluation.py at its head reads model_output and skips an item without that key; here such an item
    # is scored on model_prediction (or counted wrong), so say how many there are
    result["summary"]["official_skips"] = sum("model_output" not in item for item in items if item.get("answer") is not None)
    if output is not None:
        atomic_write_json(output, result)
    return result


def _run(args) -> int:
    result = score_file(args.predictions, args.output, args.key, args.extract, args.rule)
    if result.get("benchmark_version"):
        from audio_rft.data.mmau_versions import describe

        print(f"Scored on: {describe(result['benchmark_version'])}")
    if args.rule != "mmau":
        from audio_rft.eval.benchmarks import format_benchmark_summary

        print(format_benchmark_summary(result))
    else:
        print(format_summary(result["summary"]))
        raw = format_raw_output(result)
        if raw:
            print(raw)
        skips = result["summary"]["official_skips"]
        if skips:
            print(f"MMAU's evaluation.py (at its head) would skip {skips} items that have no model_output; "
                  f"here they are scored on model_prediction, or counted wrong without one")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def add_parser(subparsers: Any, command: str) -> None:
    p = subparsers.add_parser(
        command, help="score predictions with a benchmark's official rule (MMAU by default)",
        description="Score a prediction file with a benchmark's own rule. --rule mmau (the default): the extracted "
                    "prediction (model_prediction) and, beside it, the raw output (model_output), which is what MMAU's "
                    "official evaluation.py reads at its head; --key scores one field only. --rule mmar / mmsu / "
                    "airbench: that benchmark's official script's rule, reading its own prediction key "
                    "(answer_prediction / response / response), with its per-category tables and the count of "
                    "what it skips. Rules that need a judge model (sakura, mmau-pro, mmar-rubrics) are not offered.")
    p.add_argument("predictions", metavar="PRED.json", help="JSON list of items with model_prediction and/or model_output")
    p.add_argument("--output", metavar="SCORED.json", help="write the summaries and per-item matches here")
    p.add_argument("--rule", default="mmau", help="mmau (default), mmar, mmsu or airbench")
    p.add_argument("--key", choices=KEYS, help="score exactly this field, as it is (model_output: as the official "
                                               "script at MMAU's head; model_prediction: as its README says)")
    p.add_argument("--extract", choices=list(EXTRACTORS),
                   help="re-read the prediction from model_output: audio-rft (the last <answer>, think blocks "
                        "dropped) or r1-aqa (R1-AQA's test script: the first <answer>, else the whole output)")
    p.set_defaults(func=_run)
