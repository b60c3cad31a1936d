"""The official scoring rules of MMAR, MMSU and AIR-Bench (foundation), decision for decision
(`audio-rft score PRED --rule mmar|mmsu|airbench`; MMAU's rule is score.py's).

Each rule reads the prediction from the key its official script reads, counts what it counts, and drops from
the denominator what it drops; what it would do instead of scoring (crash, exit) is a one-line error naming
the item. Restated from the official scripts at the commits named in docs/benchmarks.md:

- MMAR (ddlBoJack/MMAR@3bce090 code/evaluation.py): the prediction is `answer_prediction`, judged by the same
  token rule as MMAU (answers.mmau_match: no letters, a bare "C" is wrong); a record without the key is skipped;
  a null prediction crashes it. Accuracy per modality, category and sub-category, in percent.
- MMSU (dingdongwang/MMSU@217d1d3 mmsu_evaluation.py): the prediction is `response`, stripped with newlines
  deleted; the letter is its first character if that is A-D (upper case), else its second-to-last; correct
  when `choice_<letter>` equals `answer_gt`. No letter found: dropped; empty or "None" (or no key): counted
  wrong; null: dropped. Accuracy per (category, sub-category), per category and overall, as fractions.
- AIR-Bench foundation (OFA-Sys/AIR-Bench@9832476 score_foundation.py): the same letter positions, but empty or
  "None" are dropped too (`fail_num`); a record without task_name is left out; a null response crashes it;
  a letter's item whose answer_gt equals no option stops the run. Accuracy per task_name_dataset_name only;
  the official script prints no overall, the one given here is labelled as ours.

Rules that need an external judge model are not offered (`NOT_OFFERED`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audio_rft import UserError
from audio_rft.answers import mmau_match

RULES = ("mmau", "mmar", "mmsu", "airbench")
# rule -> the key its official script reads the prediction from
PREDICTION_KEYS = {"mmau": "model_output", "mmar": "answer_prediction", "mmsu": "response", "airbench": "response"}
NOT_OFFERED = {
    "sakura": "SAKURA is scored by a GPT-4o judge (evaluation/llm_judge.py), an external model",
    "mmau-pro": "MMAU-Pro scores multiple choice with NV-Embed-v2 embeddings and open answers with a "
                "Qwen2.5-7B-Instruct judge, external models",
    "mmar-rubrics": "MMAR-Rubrics is scored by a GPT-4o judge, an external model (MMAR's accuracy rule is `mmar`)",
}
LETTERS = "ABCD"
CORRECT, WRONG, SKIPPED = "correct", "wrong", "skipped"


def check_rule(rule: str) -> str:
    if rule in NOT_OFFERED:
        raise UserError(f"rule {rule!r} is not offered: {NOT_OFFERED[rule]}")
    if rule not in RULES:
        raise UserError(f"unknown rule {rule!r} (one of {', '.join(RULES)}; not offered: {', '.join(NOT_OFFERED)})")
    return rule


# ---------------------------------------------------------------- reading prediction files


def load_records(path: str | Path, rule: str) -> tuple[list[dict], int]:
    """A JSON list or JSONL file of prediction records -> (records, lines dropped). MMSU's script drops a JSONL
    line it cannot parse (counted here); for the other rules such a line is a one-line error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        where = [f"item {i}" for i in range(len(records))]
        dropped = 0
    else:
        records, where, dropped = [], [], 0
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
                where.append(f"line {number}")
            except json.JSONDecodeError as e:
                if rule == "mmsu":
                    dropped += 1
                    continue
                raise UserError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
    if not records:
        raise UserError(f"{path}: no prediction records")
    for w, record in zip(where, records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: {w}: expected a JSON object, got {type(record).__name__}")
        record["_where"] = w
    return records, dropped


def _need(record: dict, fields: tuple[str, ...], path: Path) -> None:
    for field in fields:
        if field not in record:
            raise UserError(f"{path}: {record['_where']}: field {field!r} missing (the official script needs it)")


# ---------------------------------------------------------------- one record's verdict


def mmar_verdict(record: dict) -> str:
    if "answer_prediction" not in record:
        return SKIPPED
    prediction = record["answer_prediction"]
    if not isinstance(prediction, str):
        raise ValueError(f"answer_prediction is {json.dumps(prediction)}: MMAR's evaluation.py crashes on it "
                         f"(AttributeError); give a string")
    return CORRECT if mmau_match(prediction, record["answer"], record["choices"]) else WRONG


def letter_of(text: str) -> str | None:
    """MMSU's and AIR-Bench's letter: the first character if it is A-D, else the second-to-last (upper case only)."""
    if text[0] in LETTERS:
        return text[0]
    if len(text) > 1 and text[-2] in LETTERS:
        return text[-2]
    return None


def mmsu_verdict(record: dict) -> str:
    response = record.get("response", "")
    if not isinstance(response, str):
        return SKIPPED  # its strip() raises and the script prints "Error prediction!"
    text = response.strip().replace("\n", "")
    if not text or text == "None":
        return WRONG  # no letter, but counted
    letter = letter_of(text)
    if letter is None:
        return SKIPPED  # "Wrong format response"
    return CORRECT if record.get(f"choice_{letter.lower()}") == record["answer_gt"] else WRONG


def airbench_verdict(record: dict) -> str:
    response = record.get("response")
    if not isinstance(response, str):
        raise ValueError(f"response is {json.dumps(response)}: AIR-Bench's score_foundation.py crashes on it "
                         f"(AttributeError); give a string")
    text = response.strip().replace("\n", "")
    if not text or text == "None":
        return SKIPPED  # fail_num
    letter = letter_of(text)
    if letter is None:
        return SKIPPED  # fail_num
    gold = next((x for x in LETTERS if record.get(f"choice_{x.lower()}") == record["answer_gt"]), None)
    if gold is None:
        raise ValueError(f"answer_gt {record['answer_gt']!r} equals none of choice_a..choice_d: AIR-Bench's "
                         f"score_foundation.py exits the whole run here")
    return CORRECT if letter == gold else WRONG


# ---------------------------------------------------------------- tables


def _table(counts: dict[str, list[int]], percent: bool) -> dict[str, dict]:
    def value(correct: int, n: int) -> float | None:
        if not n:
            return None
        return round(100 * correct / n, 2) if percent else round(correct / n, 4)

    return {k: {"accuracy": value(c, n), "correct": c, "n": n} for k, (c, n) in counts.items()}


def _add(counts: dict[str, list[int]], key: Any, verdict: str) -> None:
    entry = counts.setdefault("" if key is None else str(key), [0, 0])
    entry[0] += verdict == CORRECT
    entry[1] += 1


def score_records(records: list[dict], rule: str, path: str | Path = "predictions") -> dict:
    """{"rule", "summary", "samples": [{"id", "verdict"}]} for records read by load_records."""
    path = Path(path)
    required = {"mmar": ("answer", "choices"), "mmsu": ("answer_gt",), "airbench": ("answer_gt",)}[rule]
    verdict_of = {"mmar": mmar_verdict, "mmsu": mmsu_verdict, "airbench": airbench_verdict}[rule]
    samples, groups, skipped, left_out = [], {}, 0, 0
    totals = [0, 0]
    for record in records:
        if rule == "airbench" and record.get("task_name") is None:
            left_out += 1  # score_foundation.py passes over a record without task_name
            samples.append({"id": record.get("uniq_id", record.get("id")), "verdict": "left out (no task_name)"})
            continue
        _need(record, required, path)
        try:
            verdict = verdict_of(record)
        except ValueError as e:
            raise UserError(f"{path}: {record['_where']}: {e}") from None
        samples.append({"id": record.get("uniq_id", record.get("id")), "verdict": verdict})
        if verdict == SKIPPED:
            skipped += 1
            if rule == "airbench":  # its fail_num is kept per group too, so an all-failed group can be named
                groups.setdefault("task", {}).setdefault(f"{record['task_name']}_{record.get('dataset_name')}", [0, 0])
            continue
        totals[0] += verdict == CORRECT
        totals[1] += 1
        if rule == "mmar":
            for group, key in (("modality", record.get("modality")), ("category", record.get("category")),
                               ("sub_category", record.get("sub-category", record.get("sub_category")))):
                _add(groups.setdefault(group, {}), key, verdict)
        elif rule == "mmsu":
            category = record.get("category") or ""
            _add(groups.setdefault("category_sub_category", {}),
                 f"{category} / {record.get('sub-category', record.get('sub_category')) or ''}", verdict)
            _add(groups.setdefault("category", {}), category, verdict)
        else:
            _add(groups.setdefault("task", {}), f"{record['task_name']}_{record.get('dataset_name')}", verdict)
    percent = rule == "mmar"
    summary = {
        "accuracy": (round(100 * totals[0] / totals[1], 2) if percent else round(totals[0] / totals[1], 4))
        if totals[1] else None,
        "unit": "percent" if percent else "fraction",
        "correct": totals[0], "n": totals[1], "skipped": skipped,
        "tables": {name: _table(counts, percent) for name, counts in groups.items()},
    }
    if rule == "airbench":
        summary["left_out_no_task_name"] = left_out
        summary["failed_groups"] = [k for k, (_, n) in groups.get("task", {}).items() if n == 0]
    if not totals[1] and rule == "mmar":
        raise UserError(f"{path}: no record has answer_prediction (MMAR's evaluation.py divides by zero here)")
    return {"rule": rule, "summary": summary, "samples": samples}


def score_benchmark_file(path: str | Path, rule: str, output: str | Path | None = None) -> dict:
    from audio_rft.fileio import atomic_write_json

    check_rule(rule)
    records, dropped = load_records(path, rule)
    result = score_records(records, rule, path)
    result["summary"]["dropped_lines"] = dropped
    if output is not None:
        atomic_write_json(output, result)
    return result


def format_benchmark_summary(result: dict) -> str:
    """The official script's figures: MMAR in percent with 2 decimals, MMSU with 4, AIR-Bench unrounded."""
    rule, s = result["rule"], result["summary"]
    lines = []
    fmt = {"mmar": lambda v: f"{v['accuracy']:.2f}% over {v['n']} samples",
           "mmsu": lambda v: f"{v['accuracy']:.4f} ({v['correct']}/{v['n']})",
           "airbench": lambda v: f"Sum={v['n']}, correct={v['correct']}, acc={v['correct'] / v['n']}"}[rule]
    titles = {"modality": "Modality-wise", "category": "Category-wise", "sub_category": "Sub-category-wise",
              "category_sub_category": "Per category / sub-category", "task": "Per task_name_dataset_name"}
    for name, table in s["tables"].items():
        lines.append(f"{titles[name]} accuracy:")
        lines += [f"  {k}: " + (fmt(v) if v["n"] else "no counted record (the official script crashes here: KeyError)")
                  for k, v in table.items()]
    total = "n/a" if s["accuracy"] is None else (f"{s['accuracy']:.2f}%" if s["unit"] == "percent" else f"{s['accuracy']:.4f}")
    label = "Overall (ours: the official script prints none)" if rule == "airbench" else "Overall"
    lines.append(f"{label}: {total} over {s['n']} counted ({s['correct']} correct)")
    lines.append(f"Skipped as the official script skips them (not in the denominator): {s['skipped']}"
                 + {"mmar": " (no answer_prediction)", "mmsu": " (no letter at the first or second-to-last character, "
                    "or a null response)", "airbench": " (fail_num: no letter, empty or None)"}[rule])
    if s.get("dropped_lines"):
        lines.append(f"JSONL lines that did not parse, dropped as MMSU's script drops them: {s['dropped_lines']}")
    if s.get("left_out_no_task_name"):
        lines.append(f"Records without task_name, passed over: {s['left_out_no_task_name']}")
    return "\n".join(lines)
