"""`score --rule mmar|mmsu|airbench`: every hand-made edge case, with the verdict each official script gave on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from audio_rft import UserError
from audio_rft.eval.benchmarks import (NOT_OFFERED, airbench_verdict, check_rule, letter_of, mmsu_verdict,
                                       score_benchmark_file, score_records)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def edge_cases(shared_data) -> dict:
    return json.loads((shared_data / "benchmark-edge-cases.json").read_text())


def _records(tmp_path: Path, records: list[dict], name: str = "pred.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- MMAR


def test_mmar_edge_cases_give_the_official_verdicts(edge_cases, tmp_path):
    cases = edge_cases["MMAR"]["cases"]
    scored = [c for c in cases if isinstance(c["official_verdict"], bool)]
    assert len(scored) == 13
    for case in scored:
        record = {"id": case["id"], "choices": case["choices"], "answer": case["answer"],
                  "answer_prediction": case["prediction"], "modality": "music", "category": "c", "sub-category": "s"}
        result = score_records([{**record, "_where": "item 0"}], "mmar")
        assert result["samples"][0]["verdict"] == ("correct" if case["official_verdict"] else "wrong"), case
    base = {k: scored[0][k] for k in ("choices", "answer")}
    null = next(c for c in cases if c["prediction"] is None)
    assert null["official_verdict"].startswith("CRASH")
    with pytest.raises(UserError, match="line 1: answer_prediction is null: MMAR's evaluation.py crashes"):
        score_benchmark_file(_records(tmp_path, [{**base, "answer_prediction": None}]), "mmar")
    missing = next(c for c in cases if c["prediction"] == "<record has no 'answer_prediction' key>")
    assert missing["official_verdict"].startswith("SKIPPED")
    result = score_benchmark_file(_records(tmp_path, [{**base, "answer_prediction": "Open Grassland", "modality": "music"},
                                                      {**base, "modality": "music"}]), "mmar")
    assert (result["summary"]["n"], result["summary"]["skipped"], result["summary"]["accuracy"]) == (1, 1, 100.0)


def test_mmar_tables_per_modality_category_and_sub_category(tmp_path):
    base = {"choices": ["a dog", "a cat"], "answer": "a dog"}
    records = [{**base, "answer_prediction": p, "modality": m, "category": c, "sub-category": s}
               for p, m, c, s in [("a dog", "sound", "Signal Layer", "x"), ("a cat", "sound", "Signal Layer", "y"),
                                  ("dog", "speech", "Semantic Layer", "x")]]
    pred = tmp_path / "pred.json"  # a JSON list, as `audio-rft infer` writes it
    pred.write_text(json.dumps(records))
    result = score_benchmark_file(pred, "mmar")
    tables = result["summary"]["tables"]
    assert tables["modality"]["sound"] == {"accuracy": 50.0, "correct": 1, "n": 2}
    assert tables["category"]["Semantic Layer"]["accuracy"] == 0.0  # "dog" lacks the answer's token "a"
    assert tables["sub_category"]["x"]["n"] == 2 and result["summary"]["accuracy"] == 33.33


# ---------------------------------------------------------------- MMSU and AIR-Bench: letters at two positions


def _verdict_word(text: str) -> str:
    return text.split()[0].lower()


def test_mmsu_edge_cases_give_the_official_verdicts(edge_cases):
    item = edge_cases["MMSU"]["item"]
    cases = [c for c in edge_cases["MMSU"]["cases"] if "response" in c]
    assert len(cases) == 14
    for case in cases:
        record = dict(item) if case["response"] == "<key missing>" else {**item, "response": case["response"]}
        assert mmsu_verdict(record) == _verdict_word(case["official_verdict"]), case


def test_mmsu_empty_response_takes_no_letter_from_the_record_before(edge_cases, tmp_path):
    item = edge_cases["MMSU"]["item"]
    (current,) = [c for c in edge_cases["MMSU"]["cases"] if c.get("script") == "current"]
    records = [{**item, "response": r, "category": "perception", "sub-category": "gender"} for r in current["sequence"]]
    result = score_benchmark_file(_records(tmp_path, records), "mmsu")
    assert (result["summary"]["accuracy"], result["summary"]["n"]) == (current["overall"], current["total"])


def test_mmsu_drops_lines_that_do_not_parse_and_tables_by_category(tmp_path):
    item = {"choice_a": "male", "choice_b": "female", "choice_c": "child", "choice_d": "elderly", "answer_gt": "female"}
    path = tmp_path / "pred.jsonl"
    lines = [json.dumps({**item, "response": "B", "category": "perception", "sub-category": "gender"}),
             "{not json", json.dumps({**item, "response": "A", "category": "perception", "sub-category": "age"}),
             json.dumps({**item, "response": "b", "category": "reasoning", "sub-category": "age"})]
    path.write_text("\n".join(lines) + "\n")
    result = score_benchmark_file(path, "mmsu")
    s = result["summary"]
    assert (s["dropped_lines"], s["skipped"], s["n"], s["accuracy"]) == (1, 1, 2, 0.5)
    assert s["tables"]["category_sub_category"] == {"perception / gender": {"accuracy": 1.0, "correct": 1, "n": 1},
                                                    "perception / age": {"accuracy": 0.0, "correct": 0, "n": 1}}
    assert "reasoning" not in s["tables"]["category"]  # its only record was dropped


def test_airbench_edge_cases_give_the_official_verdicts(edge_cases, tmp_path):
    item = edge_cases["AIR-Bench-foundation"]["item"]
    group = {"task_name": "Speaker_Gender_Recognition", "dataset_name": "demo"}
    cases = edge_cases["AIR-Bench-foundation"]["cases"]
    plain = [c for c in cases if "response" in c and c["response"] != "C on 2-choice item"]
    assert len(plain) == 11
    for case in plain:
        assert airbench_verdict({**item, **group, "response": case["response"]}) == _verdict_word(case["official_verdict"]), case
    # C on an item without choice_c: counted wrong (the script's run paired it with one right record)
    two = {k: v for k, v in item.items() if k not in ("choice_c", "choice_d")}
    result = score_benchmark_file(_records(tmp_path, [{**two, **group, "response": "B"}, {**two, **group, "response": "C"}]),
                                  "airbench")
    (expected,) = [c["stdout"] for c in cases if c.get("response") == "C on 2-choice item"]
    row = result["summary"]["tables"]["task"]["Speaker_Gender_Recognition_demo"]
    assert f"Sum={row['n']}, correct={row['correct']}, acc={row['correct'] / row['n']}" in expected
    # what stops the official run is a one-line error naming the record
    with pytest.raises(UserError, match="line 1: answer_gt 'Female' equals none of choice_a..choice_d"):
        score_benchmark_file(_records(tmp_path, [{**item, **group, "answer_gt": "Female", "response": "B"}]), "airbench")
    with pytest.raises(UserError, match="line 2: response is null"):
        score_benchmark_file(_records(tmp_path, [{**item, **group, "response": "B"}, {**item, **group, "response": None}]),
                             "airbench")
    # a task whose every response fails: the official report crashes (KeyError); here it is named
    result = score_benchmark_file(_records(tmp_path, [{**item, **group, "response": "b"},
                                                      {**item, "task_name": "Other", "dataset_name": "x", "response": "B"},
                                                      {**item, "task_name": None, "response": "B"}]), "airbench")
    s = result["summary"]
    assert s["failed_groups"] == ["Speaker_Gender_Recognition_demo"] and s["skipped"] == 1
    assert s["left_out_no_task_name"] == 1 and (s["n"], s["correct"]) == (1, 1)


@pytest.mark.parametrize("text, letter", [("Answer: B", "A"), ("Definitely B.", "D"), ("(B)", "B"), ("The answer is B", None),
                                          ("b", None), ("B", "B")])
def test_letters_come_from_two_fixed_positions(text, letter):
    assert letter_of(text) == letter


def test_mmsu_and_airbench_differ_on_empty_and_none():
    item = {"choice_a": "male", "choice_b": "female", "answer_gt": "female", "task_name": "t"}
    for response in ("", "None"):
        assert mmsu_verdict({**item, "response": response}) == "wrong"
        assert airbench_verdict({**item, "response": response}) == "skipped"
    assert mmsu_verdict({**item, "response": None}) == "skipped"


# ---------------------------------------------------------------- the command


def test_judge_rules_are_named_as_not_offered():
    for rule in ("sakura", "mmau-pro", "mmar-rubrics"):
        with pytest.raises(UserError, match=f"rule '{rule}' is not offered: .*(judge|external)"):
            check_rule(rule)
    assert set(NOT_OFFERED) == {"sakura", "mmau-pro", "mmar-rubrics"}
    with pytest.raises(UserError, match="unknown rule 'mmlu'"):
        check_rule("mmlu")


@pytest.mark.parametrize("content, rule, message", [
    ("[1, 2]", "mmar", "item 0: expected a JSON object, got int"),
    ('{"answer_prediction": "x"}\n{oops\n', "mmar", "line 2: not valid JSON"),
    ('{"answer_prediction": "x", "choices": ["x", "y"]}\n', "mmar", "line 1: field 'answer' missing"),
    ('{"response": "B"}\n', "mmsu", "line 1: field 'answer_gt' missing"),
    ("", "airbench", "no prediction records"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, rule, message):
    path = tmp_path / "pred.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        score_benchmark_file(path, rule)


def test_cli_rule_prints_the_official_tables(tmp_path):
    item = {"choice_a": "male", "choice_b": "female", "answer_gt": "female", "category": "perception",
            "sub-category": "gender"}
    pred = _records(tmp_path, [{**item, "response": "B."}, {**item, "response": "female"}])
    proc = subprocess.run([sys.executable, "-m", "audio_rft", "score", str(pred), "--rule", "mmsu", "--output",
                           str(tmp_path / "s.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "perception / gender: 1.0000 (1/1)" in proc.stdout and "Skipped as the official script skips them" in proc.stdout
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["skipped"] == 1
    proc = subprocess.run([sys.executable, "-m", "audio_rft", "score", str(pred), "--rule", "sakura"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not offered" in proc.stderr
