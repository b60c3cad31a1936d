"""`audio-rft report`: variants side by side as the paper's Table 1 reads, with the checks a small test set needs.

Raw accuracy alone misleads on a few hundred items (docs/design.md, "Measuring honestly"): a model that always
gives one answer scores that answer's share, and evaluations swing by several points. So every cell
carries a 95% bootstrap interval, every pair of variants gets a paired test on the same items, and beside
raw accuracy sit balanced accuracy, the answer distribution, format compliance and completion length. Each
variant is also scored on its raw output, as MMAU's official script does, and the report says where and why
that differs (think prompts); the pipeline adds each trained variant's training curves.

It stays one module (over 500 lines) because its statistics, rendering and charts are one report: the
renderers and charts read exactly the dict build_report makes, so a key changed in one part is seen in the others.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from audio_rft import UserError
from audio_rft.answers import follows_format, mmau_match
from audio_rft.eval.score import (TASK_ORDER, DIFFICULTY_ORDER, item_match, load_predictions, prediction_text, read_meta,
                                  sub_category)
from audio_rft.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

RESAMPLES = 2000
TOP_ANSWERS = 10  # answers listed per sub-category; the rest are summed as "(other answers)"
PAPER_COLUMNS = ("model", "method", "prompt", "sound", "music", "speech", "average", "source")
PAPER_CAVEAT = ("Their numbers, not ours: Li et al. 2025 (arXiv 2503.11197) Table 1, Qwen2-Audio-7B-Instruct on MMAU "
                "test-mini. Not comparable to a tiny model on synthetic data; shown for orientation only.")


# ---------------------------------------------------------------- statistics

def bootstrap_ci(correct: int, n: int, resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of an accuracy (percent) over n items, k of them correct.

    Resampling n items with replacement from a 0/1 vector draws the count of correct ones from
    Binomial(n, k/n): the same distribution as index resampling, at O(resamples) cost whatever n is.
    """
    if n == 0:
        return None
    draws = np.random.default_rng(seed).binomial(n, correct / n, resamples) / n * 100
    return [round(float(x), 2) for x in np.percentile(draws, [2.5, 97.5])]


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Two variants' 0/1 outcomes on the same items: exact McNemar test and paired-bootstrap CI of b − a.

    Only discordant items carry information about which is better: under "no difference", the items
    that b alone gets right are Binomial(discordant, 1/2). The paired bootstrap resamples items, i.e.
    draws the four (a, b) outcome cells from a multinomial.
    """
    from scipy.stats import binomtest  # scipy arrives with librosa; imported here so `score` never needs it

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = len(a)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p_value = float(binomtest(only_b, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    ci = None
    if n:
        cells = np.array([np.sum(a & b), only_a, only_b, np.sum(~a & ~b)]) / n
        counts = np.random.default_rng(seed).multinomial(n, cells, resamples)
        diffs = (counts[:, 2] - counts[:, 1]) / n * 100
        ci = [round(float(x), 2) for x in np.percentile(diffs, [2.5, 97.5])]
    return {
        "n": n,
        "accuracy_a": _pct(int(a.sum()), n), "accuracy_b": _pct(int(b.sum()), n),
        "difference": round((only_b - only_a) / n * 100, 2) if n else None,
        "difference_ci95": ci, "only_a_correct": only_a, "only_b_correct": only_b,
        "mcnemar_p": p_value, "significant": p_value < 0.05,
    }


def balanced_accuracy(rows: list[dict]) -> float | None:
    """Mean per-answer recall within each sub-category, then averaged over sub-categories weighted by items.

    A constant answer scores 1/K in a sub-category with K distinct right answers, however the answers are
    distributed; the item weighting keeps the sub-category mix the same as raw accuracy's.
    """
    if not rows:
        return None
    by_sub: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_sub[r["sub"]][r["answer"].strip().lower()].append(r["match"])
    weighted = sum(sum(map(len, answers.values())) * np.mean([np.mean(m) for m in answers.values()])
                   for answers in by_sub.values())
    return round(float(weighted / len(rows) * 100), 2)


def _pct(k: int, n: int) -> float | None:
    return round(k / n * 100, 2) if n else None


# ---------------------------------------------------------------- loading

def resolve_choice(prediction: str, choices: list[str]) -> tuple[str, int | None]:
    """Which choice a prediction names, by the same MMAU rule: (choice text, 1-based position), or a marker."""
    if not prediction.strip():
        return "(empty)", None
    for position, choice in enumerate(choices, 1):
        if mmau_match(prediction, choice, choices):
            return choice, position
    return "(no single choice)", None



def load_variant(name: str, pred_path: str | Path) -> dict:
    """One run's predictions → per-item rows (scored items only) and run-level facts."""
    pred_path = Path(pred_path)
    items = load_predictions(pred_path)
    meta = read_meta(pred_path)
    has_output = any(item.get("model_output") is not None for item in items)
    rows, seen, no_prediction = [], Counter(), 0
    for item in items:
        match = item_match(item)
        if match is None:
            continue
        item_id = str(item.get("id"))
        seen[item_id] += 1  # repeated ids pair by occurrence
        text = prediction_text(item)
        no_prediction += text is None
        label, position = resolve_choice(text or "", item["choices"])
        rows.append({
            "key": (item_id, seen[item_id]), "match": match, "task": str(item.get("task")),
            # as MMAU's official script scores it (the raw output); None when the file has no model_output
            "raw_match": item_match(item, "model_output") if has_output else None,
            "difficulty": None if item.get("difficulty") is None else str(item["difficulty"]),
            "sub": str(sub_category(item) or item.get("task")),  # without a sub-category, balance within the task
            "answer": item["answer"], "predicted": label, "position": position,
            "gold_position": item["choices"].index(item["answer"]) + 1 if item["answer"] in item["choices"] else None,
        })
    prompt = meta.get("prompt") or next((i["prompt_mode"] for i in items if i.get("prompt_mode")), None)
    return {
        "name": name, "path": str(pred_path), "meta": meta, "rows": rows, "unscored": len(items) - len(rows),
        "no_prediction": no_prediction, "has_output": has_output, "extract": meta.get("extract"),
        "prompt": prompt, "checkpoint": meta.get("adapter") or meta.get("model"),
        "control": bool(meta.get("ablate_audio")) or name.endswith("-no-audio"),
        "format_rate": _format_rate(items, prompt), **_completion_length(items),
        "choice_orders": _choice_orders(pred_path, rows),
    }


def chosen_on_scored_split(meta: dict) -> bool | None:
    """True when the variant's checkpoint was chosen (meta `chosen_on`) on the data it is scored on: the same
    folder, or a dataset with the same content hash; None when the predictions do not say how it was chosen."""
    chosen = meta.get("chosen_on")
    if not isinstance(chosen, dict):
        return None
    if meta.get("data") and Path(chosen.get("data", "")).resolve() == Path(meta["data"]).resolve():
        return True
    content = lambda version: (version or {}).get("content_sha256")
    return content(chosen.get("version")) is not None and content(chosen.get("version")) == content(meta.get("benchmark_version"))


def _choice_orders(pred_path: Path, rows: list[dict]) -> list[list[dict]] | None:
    """Per-item (match, chosen choice, chosen position, answer position) in the original order and in every
    PRED.perm<k>.json that `infer shuffle_choices=K` wrote beside it; None when there are none."""
    orders = [[{k: r[k] for k in ("key", "match", "predicted", "position", "gold_position")} for r in rows]]
    k = 1
    while (path := pred_path.with_name(f"{pred_path.stem}.perm{k}{pred_path.suffix}")).is_file():
        order, seen = [], Counter()
        for item in load_predictions(path):
            match = item_match(item)
            if match is None:
                continue
            seen[str(item.get("id"))] += 1
            label, position = resolve_choice(prediction_text(item) or "", item["choices"])
            order.append({"key": (str(item.get("id")), seen[str(item.get("id"))]), "match": match, "predicted": label,
                          "position": position, "gold_position": item["choices"].index(item["answer"]) + 1})
        orders.append(order)
        k += 1
    return orders if len(orders) > 1 else None


def _choice_order_summary(orders: list[list[dict]] | None) -> dict | None:
    """Accuracy per order (mean, min), the share of items given the same choice in every order, and where the
    chosen choice sat against where the right one did, over all orders."""
    if orders is None:
        return None
    by_key = [{r["key"]: r for r in order} for order in orders]
    common = [key for key in by_key[0] if all(key in order for order in by_key[1:])]
    accuracy = [_pct(sum(order[key]["match"] for key in common), len(common)) for order in by_key]
    consistent = sum(len({order[key]["predicted"] for order in by_key}) == 1
                     and by_key[0][key]["position"] is not None for key in common)
    every = [order[key] for order in by_key for key in common]
    return {"orders": len(orders), "n": len(common), "accuracy": accuracy,
            "mean": round(float(np.mean(accuracy)), 2) if common else None,
            "min": min(accuracy) if common else None, "consistent": _pct(consistent, len(common)),
            "positions": {"predicted": _position_shares([r["position"] for r in every]),
                          "gold": _position_shares([r["gold_position"] for r in every])}}


def _format_rate(items: list[dict], default_mode: str | None) -> float | None:
    """Share (percent) of raw completions that follow their prompt mode's format; None when unknowable."""
    checked = []
    for item in items:
        mode = item.get("prompt_mode") or default_mode
        if item.get("model_output") is None or mode is None:
            continue
        try:
            checked.append(follows_format(item["model_output"], mode))
        except ValueError:
            return None  # a mode the format rule does not know
    return _pct(sum(checked), len(checked))


def _completion_length(items: list[dict]) -> dict:
    # Tokens when infer recorded them for every item; otherwise words, so one variant never mixes units.
    if items and all(isinstance(i.get("completion_tokens"), int) for i in items):
        return {"mean_completion_length": round(float(np.mean([i["completion_tokens"] for i in items])), 2), "length_unit": "tokens"}
    outputs = [i["model_output"] for i in items if isinstance(i.get("model_output"), str)]
    if not outputs:
        return {"mean_completion_length": None, "length_unit": None}
    return {"mean_completion_length": round(float(np.mean([len(o.split()) for o in outputs])), 2), "length_unit": "words"}


def read_paper_table(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in PAPER_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: paper table lacks column {missing[0]!r} (need {','.join(PAPER_COLUMNS)})")
            rows = list(reader)
    except OSError as e:
        raise UserError(f"{path}: cannot read paper table ({e.strerror})") from None
    out = []
    for i, row in enumerate(rows, 2):
        try:
            scores = {c: float(row[c]) for c in ("sound", "music", "speech", "average")}
        except (TypeError, ValueError):
            raise UserError(f"{path}: line {i}: sound/music/speech/average must be numbers") from None
        out.append({"origin": "paper (theirs)", "model": row["model"], "method": row["method"],
                    "prompt": row["prompt"], "accuracy": scores, "source": row["source"]})
    return out


# ---------------------------------------------------------------- the report

def _cell(rows: list[dict], resamples: int, seed: int) -> dict:
    k, n = sum(r["match"] for r in rows), len(rows)
    return {"accuracy": _pct(k, n), "ci95": bootstrap_ci(k, n, resamples, seed), "n": n}


def _distribution(labels: list[str]) -> dict[str, float]:
    counts = Counter(labels).most_common()
    shares = {label: round(c / len(labels), 4) for label, c in counts[:TOP_ANSWERS]}
    rest = sum(c for _, c in counts[TOP_ANSWERS:])
    if rest:
        shares["(other answers)"] = round(rest / len(labels), 4)
    return shares


def _position_shares(positions: list[int | None]) -> dict[str, float]:
    counts = Counter("none" if p is None else str(p) for p in positions)
    keys = sorted((k for k in counts if k != "none"), key=int) + (["none"] if "none" in counts else [])
    return {k: round(counts[k] / len(positions), 4) for k in keys} if positions else {}


def _raw_output(v: dict, resamples: int, seed: int) -> dict | None:
    """The score on the raw output beside the extracted one, and the items that flip between them."""
    if not v["has_output"]:
        return None
    rows = v["rows"]
    k = sum(r["raw_match"] for r in rows)
    return {"accuracy": _pct(k, len(rows)), "ci95": bootstrap_ci(k, len(rows), resamples, seed), "correct": k,
            "n": len(rows), "extracted_only": sum(r["match"] > r["raw_match"] for r in rows),
            "raw_only": sum(r["raw_match"] > r["match"] for r in rows)}


def _columns(variants: list[dict]) -> list[str]:
    tasks = {r["task"] for v in variants for r in v["rows"]}
    return [*TASK_ORDER, *sorted(tasks - set(TASK_ORDER)), "average"]


def _summarise(v: dict, columns: list[str], resamples: int, seed: int) -> dict:
    rows = v["rows"]
    cells = {c: _cell(rows if c == "average" else [r for r in rows if r["task"] == c], resamples, seed) for c in columns}
    groups = lambda key: {k: [r for r in rows if r[key] == k] for k in dict.fromkeys(r[key] for r in rows)}
    by_difficulty = groups("difficulty")
    order = dict.fromkeys([*DIFFICULTY_ORDER, *sorted(d for d in by_difficulty if d is not None)])
    difficulties = {d: by_difficulty[d] for d in order if d in by_difficulty}
    subs = groups("sub")
    return {
        "name": v["name"], "path": v["path"], "prompt": v["prompt"], "checkpoint": v["checkpoint"],
        "control": v["control"],
        "accuracy": {c: cells[c]["accuracy"] for c in columns},
        "ci95": {c: cells[c]["ci95"] for c in columns},
        "counts": {c: cells[c]["n"] for c in columns},
        "n": len(rows), "unscored": v["unscored"], "no_prediction": v["no_prediction"], "extract": v["extract"],
        "raw_output": _raw_output(v, resamples, seed),
        "balanced_accuracy": balanced_accuracy(rows),
        "format_rate": v["format_rate"],
        "mean_completion_length": v["mean_completion_length"], "length_unit": v["length_unit"],
        "per_difficulty": {d: _cell(r, resamples, seed) for d, r in difficulties.items()},
        "per_sub_category": {s: {**_cell(r, resamples, seed), "balanced_accuracy": balanced_accuracy(r)} for s, r in subs.items()},
        "answer_distribution": {s: {"predicted": _distribution([x["predicted"] for x in r]),
                                    "gold": _distribution([x["answer"] for x in r])} for s, r in subs.items()},
        "answer_position": {"predicted": _position_shares([r["position"] for r in rows]),
                            "gold": _position_shares([r["gold_position"] for r in rows])},
        "choice_order": _choice_order_summary(v["choice_orders"]),
        "chosen_on_scored_split": chosen_on_scored_split(v["meta"]),
        "meta": v["meta"],
    }


def _paired_tests(variants: list[dict], columns: list[str], resamples: int, seed: int) -> list[dict]:
    tests = []
    for va, vb in combinations(variants, 2):
        b_rows = {r["key"]: r for r in vb["rows"]}
        common = [(r, b_rows[r["key"]]) for r in va["rows"] if r["key"] in b_rows]
        for c in columns:
            pairs = common if c == "average" else [(ra, rb) for ra, rb in common if ra["task"] == c]
            if not pairs:
                continue
            test = paired_test(np.array([ra["match"] for ra, _ in pairs]), np.array([rb["match"] for _, rb in pairs]), resamples, seed)
            tests.append({"a": va["name"], "b": vb["name"], "column": c, **test})
    return tests


def build_report(runs: list[tuple[str, str | Path]], out_dir: str | Path, paper_table: str | Path | None = None,
                 seed: int = 0, resamples: int = RESAMPLES, training: dict[str, str | Path] | None = None,
                 write: bool = True) -> dict:
    """Compare runs [(name, PRED.json)]; draw the charts into out_dir, write report.md/.json/.csv there
    (unless `write` is false: the pipeline adds its own fields, then calls write_report once); return the JSON.

    training: variant name -> the training folder its checkpoint comes from, whose curves the report shows;
    None: found from each variant's checkpoint (a `final` or `checkpoint-N` beside a metrics.jsonl).
    """
    if not runs:
        raise UserError("no runs to compare")
    if resamples < 1:
        raise UserError(f"--resamples must be at least 1, got {resamples}")
    names = [name for name, _ in runs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"two runs are named {duplicate!r}; name them: NAME=PRED.json or --names")
    loaded = [load_variant(name, path) for name, path in runs]
    columns = _columns(loaded)
    key_sets = {frozenset(r["key"] for r in v["rows"]) for v in loaded}
    report = {
        "scoring": "MMAU benchmark rule (audio_rft.answers.mmau_match); accuracy in percent; average = all scored items",
        "ci": {"level": 0.95, "method": "percentile bootstrap over items", "resamples": resamples, "seed": seed},
        "paired_test": "exact McNemar (binomial on discordant items, two-sided) + paired-bootstrap 95% CI of b - a",
        "columns": columns,
        "same_items": len(key_sets) == 1,
        "variants": [_summarise(v, columns, resamples, seed) for v in loaded],
        "paired_tests": _paired_tests(loaded, columns, resamples, seed),
        "paper_table": read_paper_table(paper_table) if paper_table else [],
        "paper_table_note": PAPER_CAVEAT if paper_table else None,
        "data_versions": _data_versions(loaded, bool(paper_table)),
        "files": {"markdown": "report.md", "csv": "report.csv", "accuracy_chart": "accuracy.png", "answers_chart": "answers.png"},
    }
    out_dir = Path(out_dir)
    report["training_curves"] = training_curves(loaded, out_dir, training)
    plot_accuracy(report, out_dir / "accuracy.png")
    plot_answers(report, out_dir / "answers.png")
    if write:
        write_report(out_dir, report)
    return report


def _data_versions(variants: list[dict], paper_table: bool) -> dict:
    """What each variant was scored on (its predictions' benchmark_version), as lines for the report; with a paper
    table, the line that says which MMAU version the paper used against this run's, and how many items differ."""
    from audio_rft.data.mmau_versions import describe, paper_line

    by_variant = {v["name"]: v["meta"].get("benchmark_version") for v in variants}
    distinct = list({json.dumps(x, sort_keys=True): x for x in by_variant.values()}.values())
    if len(distinct) == 1:
        lines = [f"Data: {describe(distinct[0])}."]
    else:
        lines = [f"Data ({name}): {describe(x)}." for name, x in by_variant.items()]
    if paper_table:
        lines += [paper_line(x) for x in distinct]
    return {"by_variant": by_variant, "lines": lines}


def write_report(out_dir: str | Path, report: dict, appendix: str = "") -> None:
    """report.json, report.md (+ `appendix`) and report.csv; a variant without a checkpoint of ours shows none."""
    out_dir = Path(out_dir)
    shown = {**report, "variants": [{**v, "checkpoint": v.get("checkpoint")} for v in report["variants"]]}
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", render_markdown(shown) + appendix)
    atomic_write_text(out_dir / "report.csv", render_csv(shown))


def training_curves(variants: list[dict], out_dir: Path, training: dict[str, str | Path] | None) -> list[dict]:
    """Draw each training folder's curves (curves.png beside its metrics.jsonl) and copy them into out_dir as
    curves-<folder>.png: one entry per folder, with the variants trained there."""
    from audio_rft.eval.curves import plot_training_curves, training_folder

    if training is None:
        training = {v["name"]: f for v in variants if (f := training_folder(v["checkpoint"])) is not None}
    by_folder: dict[Path, list[str]] = {}
    for v in variants:
        if training.get(v["name"]) is not None:
            by_folder.setdefault(Path(training[v["name"]]), []).append(v["name"])
    entries, used = [], set()
    for folder, names in by_folder.items():
        png = plot_training_curves(folder)
        name = f"curves-{folder.name}.png"
        for i in range(2, len(by_folder) + 2):  # two folders of the same name (runs/a/grpo, runs/b/grpo)
            if name not in used:
                break
            name = f"curves-{folder.name}-{i}.png"
        if png is not None:
            used.add(name)
            atomic_write_bytes(out_dir / name, png.read_bytes())
        entries.append({"folder": str(folder), "variants": names, "png": name if png is not None else None})
    return entries


# ---------------------------------------------------------------- rendering

def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _short(text: str, width: int = 32) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _acc_ci(acc: float | None, ci: list[float] | None) -> str:
    return "—" if acc is None else f"{acc:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = lambda r: "| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |"
    return [cells(header), "|" + "---|" * len(header), *map(cells, rows), ""]


def render_markdown(report: dict) -> str:
    cols, variants, ci = report["columns"], report["variants"], report["ci"]
    label = lambda v: v["name"] + (" (no-audio control)" if v["control"] else "")
    md = ["# Evaluation report", "",
          f"Scoring: {report['scoring']}. Cells: accuracy % [95% CI, {ci['method']}, {ci['resamples']:,} resamples, seed {ci['seed']}].",
          "Balanced accuracy: mean per-answer recall within each sub-category (a constant answer scores 1/K), item-weighted.", ""]
    md += [*report.get("data_versions", {}).get("lines", []), ""]
    for v in variants:
        if v.get("chosen_on_scored_split"):
            md += [f"**{v['name']}: its checkpoint was chosen on the split it is scored on**, so its score is the best "
                   f"of several tries on these items, not an estimate for new ones: choose on a dev split "
                   f"(scripts/eval_checkpoints.sh with DEV=).", ""]
    if not report["same_items"]:
        md += ["**Variants were not scored on the same items**: compare the paired tests (common items only), not the raw table.", ""]
    md += ["## Accuracy (%), laid out as the paper's Table 1", ""]
    md += _table(["variant", "prompt", "checkpoint", *cols, "n", "balanced acc", "format %", "mean length"],
                 [[label(v), v["prompt"] or "—", v.get("checkpoint") or "—", *(_acc_ci(v["accuracy"][c], v["ci95"][c]) for c in cols),
                   v["n"], _fmt(v["balanced_accuracy"]), _fmt(v["format_rate"]),
                   f"{_fmt(v['mean_completion_length'], 1)} {v['length_unit'] or ''}".strip()] for v in variants])
    md += ["Items without a prediction count as wrong; items without an answer are unscored. No prediction: "
           + ", ".join(f"{v['name']} {v['no_prediction']}" for v in variants) + ". Unscored (answer withheld): "
           + ", ".join(f"{v['name']} {v['unscored']}" for v in variants) + ".", ""]
    if any(v["control"] for v in variants):
        md += ["The no-audio control answers without hearing the audio: what it scores comes from the text alone, "
               "so only the margin above it measures listening.", ""]
    md += _raw_output_section(variants)
    if report["paired_tests"]:
        md += ["## Paired comparisons (same items)", "",
               "Exact McNemar test on the items exactly one of the two gets right; difference = B − A in points, "
               "with its paired-bootstrap 95% CI. No correction for multiple comparisons.", ""]
        md += _table(["A", "B", "column", "n", "A %", "B %", "B − A", "95% CI", "only A / only B right", "McNemar p", "verdict"],
                     [[t["a"], t["b"], t["column"], t["n"], _fmt(t["accuracy_a"]), _fmt(t["accuracy_b"]),
                       f"{t['difference']:+.2f}", f"[{t['difference_ci95'][0]:+.1f}, {t['difference_ci95'][1]:+.1f}]",
                       f"{t['only_a_correct']} / {t['only_b_correct']}", f"{t['mcnemar_p']:.3g}",
                       "significant at 0.05" if t["significant"] else "not significant"] for t in report["paired_tests"]])
    difficulties = list(dict.fromkeys(d for v in variants for d in v["per_difficulty"]))
    if difficulties:
        md += ["## Per difficulty", ""]
        md += _table(["variant", *difficulties], [[label(v), *(_acc_ci(v["per_difficulty"].get(d, {}).get("accuracy"),
                                                                       v["per_difficulty"].get(d, {}).get("ci95")) for d in difficulties)]
                                                  for v in variants])
    subs = list(dict.fromkeys(s for v in variants for s in v["per_sub_category"]))
    if subs:
        md += ["## Per sub-category: accuracy % [95% CI] / balanced %", ""]
        md += _table(["sub-category", "n", *(v["name"] for v in variants)],
                     [[s, max(v["per_sub_category"].get(s, {}).get("n", 0) for v in variants),
                       *(f"{_acc_ci(e['accuracy'], e['ci95'])} / {_fmt(e['balanced_accuracy'])}" if (e := v["per_sub_category"].get(s)) else "—"
                         for v in variants)] for s in subs])
        md += ["## Answer distribution per sub-category", "",
               "Share of each predicted answer (resolved to a choice by the MMAU rule); a model that always says one thing shows one answer near 100%.", ""]
        share = lambda d: ", ".join(f"{_short(k)} {p:.0%}" for k, p in list(d.items())[:3])
        md += _table(["sub-category", "gold (top 3)", *(v["name"] for v in variants)],
                     [[s, share(next(v["answer_distribution"][s]["gold"] for v in variants if s in v["answer_distribution"])),
                       *(share(v["answer_distribution"][s]["predicted"]) if s in v["answer_distribution"] else "—" for v in variants)]
                      for s in subs])
        positions = list(dict.fromkeys(p for v in variants for side in ("gold", "predicted") for p in v["answer_position"][side]))
        positions = sorted((p for p in positions if p != "none"), key=int) + (["none"] if "none" in positions else [])
        md += ["Share of predictions at each choice position (position bias), with the right answers' positions for reference:", ""]
        # The right answers' positions are the same for every variant when all were scored on the same items.
        gold_rows = variants[:1] if report["same_items"] else variants
        md += _table(["", *positions],
                     [[label(v), *(f"{v['answer_position']['predicted'].get(p, 0):.0%}" for p in positions)] for v in variants]
                     + [[f"right answers ({v['name']}'s items)", *(f"{v['answer_position']['gold'].get(p, 0):.0%}" for p in positions)]
                        for v in gold_rows])
    md += _choice_order_section(variants)
    if report["paper_table"]:
        md += ["## The paper's numbers (theirs)", "", f"*{report['paper_table_note']}*", ""]
        md += _table(["model", "method", "prompt", "sound", "music", "speech", "average", "source"],
                     [[r["model"], r["method"], r["prompt"], *(_fmt(r["accuracy"][c]) for c in ("sound", "music", "speech", "average")),
                       r["source"]] for r in report["paper_table"]])
    md += _curves_section(report.get("training_curves") or [])
    md += ["Charts: accuracy.png (accuracy with 95% CI whiskers), answers.png (predicted-answer shares per sub-category).", ""]
    return "\n".join(md)


def _choice_order_section(variants: list[dict]) -> list[str]:
    """Accuracy under each order of the choices (`infer shuffle_choices=K`), consistency, and chosen positions."""
    shuffled = [v for v in variants if v.get("choice_order")]
    if not shuffled:
        return []
    orders = max(v["choice_order"]["orders"] for v in shuffled)
    md = ["## Choice order", "",
          "Each item answered again with its choices in seeded random orders (the prompt shows them in that order). "
          "A model that reads the choices, not their positions, scores the same in every order; consistent = the "
          "same choice in every order.", ""]
    md += _table(["variant", "original", *(f"order {k}" for k in range(1, orders)), "mean", "min", "consistent %", "n"],
                 [[v["name"], *(_fmt(a) for a in v["choice_order"]["accuracy"]),
                   *(["—"] * (orders - v["choice_order"]["orders"])), _fmt(v["choice_order"]["mean"]),
                   _fmt(v["choice_order"]["min"]), _fmt(v["choice_order"]["consistent"]), v["choice_order"]["n"]]
                  for v in shuffled])
    positions = list(dict.fromkeys(p for v in shuffled for side in ("gold", "predicted")
                                   for p in v["choice_order"]["positions"][side]))
    positions = sorted((p for p in positions if p != "none"), key=int) + (["none"] if "none" in positions else [])
    md += ["Chosen position against the right answer's, over all orders:", ""]
    md += _table(["", *positions], [row for v in shuffled for row in (
        [f"{v['name']}: chosen", *(f"{v['choice_order']['positions']['predicted'].get(p, 0):.0%}" for p in positions)],
        [f"{v['name']}: right answer", *(f"{v['choice_order']['positions']['gold'].get(p, 0):.0%}" for p in positions)])])
    return md


def _raw_output_section(variants: list[dict]) -> list[str]:
    """The raw-output score beside every variant whose prompt asks for reasoning (and any other where it differs)."""
    shown = [v for v in variants if v.get("raw_output") and (v["prompt"] == "think" or v["raw_output"]["extracted_only"]
                                                             or v["raw_output"]["raw_only"])]
    if not shown:
        if any(v.get("raw_output") for v in variants):
            return ["Scored on the raw output (`model_output`), as MMAU's official evaluation.py does, every variant "
                    "gets the same items right as above.", ""]
        return []
    md = ["## Extracted answer vs raw output (what MMAU's official script scores)", "",
          "The table above scores the answer extracted from each completion (`model_prediction`). MMAU's official "
          "evaluation.py, at its repository's head, scores `model_output`, the raw completion: with a think prompt "
          "that includes the reasoning, and reasoning that names a wrong choice makes the item wrong under MMAU's "
          "rule (no token of a wrong choice), so the official script usually reports less for the same predictions.", ""]
    md += _table(["variant", "prompt", "extraction", "extracted %", "raw output % (official script)",
                  "right only when extracted", "right only on the raw output"],
                 [[v["name"], v["prompt"] or "—", v.get("extract") or "—", _acc_ci(v["accuracy"]["average"], v["ci95"]["average"]),
                   _acc_ci(v["raw_output"]["accuracy"], v["raw_output"]["ci95"]), v["raw_output"]["extracted_only"],
                   v["raw_output"]["raw_only"]] for v in shown])
    for v in shown:
        r = v["raw_output"]
        md.append(f"- **{v['name']}**: {_fmt(v['accuracy']['average'])}% on the extracted answer, {_fmt(r['accuracy'])}% "
                  f"on the raw output; {r['extracted_only']} of {r['n']} items flip from right to wrong, because the "
                  f"text around the answer names a wrong choice, and {r['raw_only']} from wrong to right.")
    return md + [""]


def _curves_section(curves: list[dict]) -> list[str]:
    if not curves:
        return []
    md = ["## Training curves", "",
          "Each trained variant's metrics.jsonl against step (GRPO: reward, accuracy and format rewards, KL, clip "
          "ratio, completion length, loss; SFT: loss and held-out accuracy when measured).", ""]
    for c in curves:
        title = f"### {', '.join(c['variants'])} (trained in `{c['folder']}`)"
        md += [title, "", f"![training curves of {c['folder']}]({c['png']})" if c["png"] else
               "No metrics to draw (metrics.jsonl is empty).", ""]
    return md


def render_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["origin", "variant", "prompt", "checkpoint", "column", "accuracy", "ci_low", "ci_high", "n",
                     "balanced_accuracy", "format_rate", "mean_completion_length", "control", "raw_output_accuracy"])
    for v in report["variants"]:
        raw = (v.get("raw_output") or {}).get("accuracy")
        for c in report["columns"]:
            ci = v["ci95"][c] or [None, None]
            writer.writerow(["ours", v["name"], v["prompt"], v.get("checkpoint"), c, v["accuracy"][c], *ci, v["counts"][c],
                             v["balanced_accuracy"] if c == "average" else None, v["format_rate"], v["mean_completion_length"],
                             v["control"], raw if c == "average" else None])
    for r in report["paper_table"]:
        for c in ("sound", "music", "speech", "average"):
            writer.writerow([r["origin"], f"{r['model']} / {r['method']}", r["prompt"], None, c, r["accuracy"][c],
                             None, None, None, None, None, None, None, None])
    return buf.getvalue()


# ---------------------------------------------------------------- charts

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_accuracy(report: dict, out_png: str | Path) -> None:
    """Bars per task column, grouped by variant, with 95% CI whiskers."""
    plt = _pyplot()
    variants, cols = report["variants"], report["columns"]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(variants) * len(cols) * 0.45 + 2), 4))
    x = np.arange(len(variants))
    for j, c in enumerate(cols):
        acc = np.array([np.nan if v["accuracy"][c] is None else v["accuracy"][c] for v in variants])
        lo = np.array([0 if v["ci95"][c] is None else v["accuracy"][c] - v["ci95"][c][0] for v in variants])
        hi = np.array([0 if v["ci95"][c] is None else v["ci95"][c][1] - v["accuracy"][c] for v in variants])
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, acc, width, yerr=[lo, hi], capsize=3, label=c)
    ax.set_xticks(x, [v["name"] + ("\n(no audio)" if v["control"] else "") for v in variants], rotation=15 if len(variants) > 4 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy with 95% bootstrap CI")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out_png)


def plot_answers(report: dict, out_png: str | Path, max_subs: int = 40) -> None:
    """Per variant (and the right answers), each sub-category's predicted-answer shares, stacked largest first."""
    plt = _pyplot()
    variants = report["variants"]
    subs = list(dict.fromkeys(s for v in variants for s in v["answer_distribution"]))[:max_subs] or ["(none)"]
    panels = [("right answers", {s: d["gold"] for s, d in variants[0]["answer_distribution"].items()})]
    panels += [(v["name"], {s: d["predicted"] for s, d in v["answer_distribution"].items()}) for v in variants]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 2, 0.32 * len(subs) + 1.5), sharey=True, squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, (title, dist) in zip(axes[0], panels):
        ranked = [list(dist.get(s, {}).items()) for s in subs]
        left = np.zeros(len(subs))
        for rank in range(max(map(len, ranked))):  # one barh call per rank keeps 40 sub-categories fast
            cells = [r[rank] if rank < len(r) else ("", 0.0) for r in ranked]
            widths = np.array([share for _, share in cells])
            # markers such as "(other answers)", "(empty)", "(no single choice)" are grey
            ax.barh(range(len(subs)), widths, left=left, edgecolor="white", linewidth=0.5,
                    color=["lightgrey" if a.startswith("(") else colours[rank % len(colours)] for a, _ in cells])
            for y, (answer, share) in enumerate(cells):
                if share >= 0.2:
                    ax.text(left[y] + share / 2, y, answer if len(answer) <= 15 else answer[:14] + "…", ha="center", va="center", fontsize=6)
            left += widths
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of items")
    axes[0][0].set_yticks(range(len(subs)), subs, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("Answer distribution per sub-category (one bar near 100% = a constant answer)", fontsize=10)
    _save(fig, out_png)


def plot_accuracy_vs_step(rows: list[dict], out_png: str | Path, title: str = "Accuracy by checkpoint") -> None:
    """Checkpoint sweep: rows of {"step", "average", "ci_low", "ci_high"} → a line with its 95% CI band."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    nan = lambda x: np.nan if x is None else x
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.fill_between(steps, [nan(r.get("ci_low")) for r in rows], [nan(r.get("ci_high")) for r in rows], alpha=0.25, label="95% CI")
    ax.plot(steps, [nan(r["average"]) for r in rows], marker="o", label="average accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out_png)


# ---------------------------------------------------------------- CLI

def parse_runs(specs: list[str], names: str | None = None) -> list[tuple[str, str]]:
    """`name=PRED.json` or `PRED.json` (named by its meta's "name", else the file stem; its folder if stems repeat)."""
    runs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = "", spec
        runs.append([name, path])
    stems = [Path(p).name.removesuffix(".json") for _, p in runs]
    for run, stem in zip(runs, stems):
        if not run[0]:
            meta_name = read_meta(Path(run[1])).get("name") if Path(run[1]).exists() else None
            run[0] = meta_name or (f"{Path(run[1]).parent.name}/{stem}" if stems.count(stem) > 1 else stem)
    if names:
        given = [n.strip() for n in names.split(",")]
        if len(given) != len(runs):
            raise UserError(f"--names gives {len(given)} names for {len(runs)} runs")
        runs = [[n, p] for n, (_, p) in zip(given, runs)]
    return [(n, p) for n, p in runs]


def _run(args) -> int:
    runs = parse_runs(args.runs, args.names)
    report = build_report(runs, args.out, args.paper_table, args.seed, args.resamples)
    if args.html or args.embed_audio:
        from audio_rft.eval.html import write_html
        write_html(args.out, report, runs, embed_audio=args.embed_audio)
    for v in report["variants"]:
        cells = "  ".join(f"{c} {_acc_ci(v['accuracy'][c], v['ci95'][c])}" for c in report["columns"])
        print(f"{v['name']}: {cells}  (n={v['n']}, balanced {_fmt(v['balanced_accuracy'])})")
        raw = v["raw_output"]
        if raw and (raw["extracted_only"] or raw["raw_only"]):
            print(f"  on the raw output (MMAU's official script): {_fmt(raw['accuracy'])}%; {raw['extracted_only']} items "
                  f"flip to wrong, {raw['raw_only']} to right")
    for t in report["paired_tests"]:
        if t["column"] == "average":
            verdict = "significant at 0.05" if t["significant"] else "not significant"
            print(f"{t['b']} − {t['a']}: {t['difference']:+.2f} points, McNemar p={t['mcnemar_p']:.3g} ({verdict})")
    print(f"wrote {Path(args.out) / 'report.md'} (+ report.json, report.csv, accuracy.png, answers.png"
          + "".join(f", {c['png']}" for c in report["training_curves"] if c["png"])
          + (", report.html" if args.html or args.embed_audio else "") + ")")
    return 0


def add_parser(subparsers: Any, command: str) -> None:
    p = subparsers.add_parser(command, help="compare scored runs with confidence intervals",
                              description="Compare prediction files side by side (paper Table 1 layout) with "
                                          "bootstrap CIs, paired McNemar tests, balanced accuracy and answer distributions.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="NAME=PRED.json or PRED.json (PRED.meta.json beside it is read when present)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, report.json, report.csv and the PNG charts")
    p.add_argument("--paper-table", metavar="CSV", help="the paper's numbers to show beside ours, labelled as theirs")
    p.add_argument("--names", metavar="a,b,...", help="names for the runs, in order (override NAME= and file stems)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples (default {RESAMPLES})")
    p.add_argument("--html", action="store_true", help="also write report.html: every item's clip beside each "
                   "variant's answer, with filters (clips linked relative to the page)")
    p.add_argument("--embed-audio", action="store_true", help="report.html with the clips embedded (implies --html)")
    p.set_defaults(func=_run)
