"""`audio-rft score`: the MMAU rule decision for decision, the output format, and malformed input."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from audio_rft.answers import EXTRACTORS, extract_answer, extract_answer_r1_aqa, mmau_match
from audio_rft.eval.score import format_raw_output, format_summary, score_file, score_predictions

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


# An independent reference, written from the rule's wording in shared/data/README.md, not from answers.py.
def _words(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def reference_correct(prediction: str, answer: str, choices: list[str]) -> bool:
    pred, ans = _words(prediction), _words(answer)
    if len(pred) == 0:  # (1) at least one token
        return False
    if any(t not in pred for t in ans):  # (2) every answer token is in the prediction
        return False
    for choice in choices:  # (3) no token of a wrong choice, counted after removing the answer's tokens
        tokens = _words(choice)
        if tokens == ans:  # same token set as the answer: not a wrong choice
            continue
        if any(t in pred and t not in ans for t in tokens):
            return False
    return True


def _variants(item: dict, rng: random.Random) -> list[str]:
    """Predictions a model might give for one item: right, wrong, hedged, garbled, partial."""
    answer, choices = item["answer"], item["choices"]
    wrong = rng.choice([c for c in choices if c != answer])
    words = answer.split()
    letter = "ABCDEFGH"[choices.index(answer)]
    return [
        answer, wrong, rng.choice(choices), f"The answer is {answer}.", letter, rng.choice(["A", "B", "(C)", "d"]),
        f"{letter}. {answer}", f"{answer} or {wrong}", f"{wrong}, not {answer}", answer.upper(), answer.lower(),
        f"  {answer}!!! ", answer.replace(" ", "-"), answer.replace(" ", ""), "", "   ", "...",
        f"I think the answer is {answer} because of what I hear in the clip", words[0], answer[: max(1, len(answer) // 2)],
        f"<answer>{answer}</answer>", f"<think>it could be {wrong}</think><answer>{answer}</answer>", " ".join(choices),
        " ".join(rng.sample(item["question"].split(), min(3, len(item["question"].split())))), " ".join(reversed(words)),
        f"{answer} é", f"({letter}) {answer}", str(choices), rng.choice(["yes", "no", "none of the above", "Man", "1"]),
    ]


@pytest.fixture(scope="module")
def mmau_items() -> list[dict]:
    path = SHARED / "mmau-test-mini.json"
    if not path.exists():
        pytest.skip("../shared is absent (a user's clone has none)")
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_decision_matches_the_official_rule(mmau_items):
    rng = random.Random(1234)
    decisions = {True: 0, False: 0}
    for item in mmau_items:
        for prediction in _variants(item, rng):
            expected = reference_correct(prediction, item["answer"], item["choices"])
            assert mmau_match(prediction, item["answer"], item["choices"]) == expected, (item["id"], prediction)
            decisions[expected] += 1
    assert len(mmau_items) == 1000 and decisions[True] > 5000 and decisions[False] > 5000  # both outcomes well exercised


def test_score_file_applies_the_rule_to_every_item(mmau_items, tmp_path):
    rng = random.Random(7)
    items = [{**item, "model_prediction": rng.choice(_variants(item, rng))} for item in mmau_items]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(items))
    result = score_file(path)
    expected = [int(reference_correct(i["model_prediction"], i["answer"], i["choices"])) for i in items]
    assert [s["match"] for s in result["samples"]] == expected
    assert [s["id"] for s in result["samples"]] == [i["id"] for i in items]
    summary = result["summary"]
    assert summary["n"] == 1000 and summary["total_accuracy"] == round(100 * sum(expected) / 1000, 2)
    assert sum(v["n"] for v in summary["task"].values()) == 1000 and list(summary["task"]) == ["sound", "music", "speech"]
    assert sum(v["n"] for v in summary["sub_category"].values()) == 1000 and len(summary["sub_category"]) == 27
    assert list(summary["difficulty"]) == ["easy", "medium", "hard"]


@pytest.mark.parametrize("prediction, answer, choices, correct", [
    ("woman", "Man", ["Man", "Woman"], False),  # "woman" is one token, not "wo" + "man"
    ("Woman.", "Woman", ["Man", "Woman"], True),
    ("dog barking", "A dog barking", ["A dog barking", "A cat meowing"], False),  # the answer's "a" is missing
    ("a dog barking loudly", "A dog barking", ["A dog barking", "A cat meowing"], True),
    ("a dog barking, not a cat", "A dog barking", ["A dog barking", "A cat meowing"], False),
    ("Piano", "Piano", ["Piano and guitar", "Piano", "Guitar"], True),
    ("piano and guitar", "Piano", ["Piano and guitar", "Piano", "Guitar"], False),
    ("guitar and piano", "Piano and guitar", ["Piano and guitar", "Piano", "Guitar"], True),  # order is ignored
    ("piano", "Piano and guitar", ["Piano and guitar", "Piano", "Guitar"], False),
    ("C-major", "C major", ["C-major", "C major", "D minor"], True),  # same token set: not a wrong choice
    ("c major or d", "C major", ["C-major", "C major", "D minor"], False),
    ("4/3", "3/4", ["3/4", "4/4"], True),  # tokens {3, 4}: the rule cannot see order
    ("4/4", "3/4", ["3/4", "4/4"], False),
    ("CAFÉ", "Café", ["Café", "Bar"], True),  # \w is Unicode-aware
    ("maybe", "?", ["?", "yes"], True),  # an answer without tokens: any non-wrong text passes (the official quirk)
    ("", "Man", ["Man", "Woman"], False),
    ("!!!", "?", ["?", "yes"], False),  # no token at all is never correct
])
def test_subtle_cases(prediction, answer, choices, correct):
    assert reference_correct(prediction, answer, choices) == correct
    assert mmau_match(prediction, answer, choices) == correct


def _item(i, answer="Man", **extra):
    return {"id": f"q{i}", "audio": f"a{i}.wav", "question": "Who speaks?", "choices": ["Man", "Woman"],
            "answer": answer, "task": "sound", "difficulty": "easy", "sub_category": "Speaker", **extra}


def test_summary_samples_unscored_and_fallbacks():
    items = [
        _item(0, model_prediction="Man"),
        _item(1, answer=None, model_prediction="Man"),  # MMAU test split: no answer
        {**_item(2, model_prediction="Woman"), "sub-category": "Gender"},  # MMAU's key
        _item(3, task="music", difficulty="hard", model_output="<think>maybe a woman</think><answer>Man</answer>"),
        _item(4, task="speech", model_output="<answer>Man</answer>", model_prediction="Woman"),  # prediction wins
        _item(5, task="speech"),  # no prediction at all: wrong, as the official script counts it
    ]
    del items[2]["sub_category"]
    result = score_predictions(items)
    assert [s["id"] for s in result["samples"]] == [f"q{i}" for i in range(6)]
    assert [s["match"] for s in result["samples"]] == [1, None, 0, 0, 0, 0]  # q3: raw output, nothing extracted
    s = result["summary"]
    assert (s["n"], s["correct"], s["unscored"], s["no_prediction"], s["total_accuracy"]) == (5, 1, 1, 1, 20.0)
    assert s["task"] == {"sound": {"accuracy": 50.0, "correct": 1, "n": 2}, "music": {"accuracy": 0.0, "correct": 0, "n": 1},
                         "speech": {"accuracy": 0.0, "correct": 0, "n": 2}}
    assert s["sub_category"]["Gender"] == {"accuracy": 0.0, "correct": 0, "n": 1}
    assert s["difficulty"]["easy"]["n"] == 4 and s["difficulty"]["hard"]["n"] == 1
    text = format_summary(s)
    assert "sound : 50.00% over 2 samples" in text and "Total Accuracy: 20.00% over 5 samples" in text
    assert "No prediction count: 1" in text and "Unscored" in text


def test_all_unscored_has_no_accuracy():
    result = score_predictions([_item(0, answer=None, model_prediction="Man")])
    assert result["summary"]["total_accuracy"] is None and result["samples"] == [{"id": "q0", "match": None}]
    assert "n/a" in format_summary(result["summary"])


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "audio_rft", "score", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_prints_and_writes(tmp_path):
    pred, out = tmp_path / "pred.json", tmp_path / "out" / "scored.json"
    pred.write_text(json.dumps([_item(0, model_prediction="man"), _item(1, model_prediction="woman")]))
    proc = _cli(pred, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "Task-wise Accuracy:" in proc.stdout and "Total Accuracy: 50.00% over 2 samples" in proc.stdout
    written = json.loads(out.read_text())
    assert set(written) == {"summary", "samples", "key", "extract", "raw_output", "benchmark_version", "rule"}
    assert written["benchmark_version"] is None and written["rule"] == "mmau"  # no meta file beside it
    assert written["samples"] == [{"id": "q0", "match": 1}, {"id": "q1", "match": 0}]
    assert written["summary"]["total_accuracy"] == 50.0 and written["summary"]["n"] == 2
    assert written["raw_output"] is None  # no item has model_output: nothing raw to score


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"choices": ["a", "b"], "answer": "a"}, 3]', "item 1: expected a JSON object"),
    ('[{"id": "x", "answer": "a"}]', "item 0: field 'choices'"),
    ('[{"choices": ["a", "b"], "answer": "a", "model_prediction": 5}]', "item 0: field 'model_prediction'"),
    (None, "no such file"),
])
def test_malformed_files_are_one_line_errors(tmp_path, content, expected):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    proc = _cli(bad)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(bad) in lines[0] and expected in lines[0]


# ---------------------------------------------------------------- extraction and the two keys

@pytest.mark.parametrize("output, r1_aqa, ours", [
    ("  Man  ", "Man", "Man"),  # no tags: both keep the whole output, stripped
    ("I hear a man", "I hear a man", "I hear a man"),
    ("<answer>Man", "<answer>Man", "Man"),  # unclosed tag: theirs keeps it all, ours takes what follows
    ("<answer>Woman</answer> no, <answer>Man</answer>", "Woman", "Man"),  # two answers: first vs last
    ("<think>a deep voice, so a man</think>", "<think>a deep voice, so a man</think>", ""),  # think only
    ("<think>deep voice</think><answer> Man </answer>", "Man", "Man"),  # the well-formed case agrees
    ("<answer>Man\n</answer>", "<answer>Man\n</answer>", "Man"),  # theirs matches within one line only
    ("<think>hmm</think>\n<answer>Man</answer>", "Man", "Man"),
])
def test_r1_aqa_extraction_where_it_differs(output, r1_aqa, ours):
    assert extract_answer_r1_aqa(output) == r1_aqa
    assert extract_answer(output) == ours
    assert EXTRACTORS == {"audio-rft": extract_answer, "r1-aqa": extract_answer_r1_aqa}


def _think_item(i, reasoning, answer_tag="Man", answer="Man"):
    output = f"<think>{reasoning}</think><answer>{answer_tag}</answer>"
    return _item(i, answer=answer, prompt_mode="think", model_output=output, model_prediction=extract_answer(output))


def test_reasoning_that_names_a_wrong_choice_flips_on_the_raw_output():
    items = [
        _think_item(0, "It could be a woman, but the voice is deep"),  # right when extracted, wrong raw
        _think_item(1, "A deep voice"),                                 # right both ways
        _think_item(2, "A deep voice", answer_tag="Woman"),             # wrong both ways
        _item(3, answer=None, model_output="<answer>Man</answer>", model_prediction="Man"),  # unscored
        _item(4, model_output="<think>a man</think>", model_prediction=None),  # null prediction: wrong
    ]
    result = score_predictions(items)
    assert [s["match"] for s in result["samples"]] == [1, 1, 0, None, 0]
    raw = result["raw_output"]
    assert [s["match"] for s in raw["samples"]] == [0, 1, 0, None, 1]  # q4: the raw reasoning names the answer
    assert raw["flips"] == {"extracted_only": 1, "raw_only": 1}
    assert (result["summary"]["correct"], raw["summary"]["correct"]) == (2, 2)
    assert (result["summary"]["no_prediction"], result["summary"]["unscored"]) == (1, 1)
    text = format_raw_output(result)
    assert "Raw output (model_output" in text and "1 items are right on the extracted prediction and wrong" in text


def test_key_scores_exactly_one_field_and_extract_rereads_the_output(tmp_path):
    items = [_think_item(0, "not a woman"), _think_item(1, "deep"),
             _item(2, model_output="<answer>Woman</answer> <answer>Man</answer>", model_prediction="Man")]
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(items))
    assert [s["match"] for s in score_file(pred)["samples"]] == [1, 1, 1]
    by_output = score_file(pred, key="model_output")
    assert [s["match"] for s in by_output["samples"]] == [0, 1, 0] and "raw_output" not in by_output
    assert by_output["key"] == "model_output"
    by_prediction = score_file(pred, key="model_prediction")
    assert [s["match"] for s in by_prediction["samples"]] == [1, 1, 1] and "raw_output" not in by_prediction
    r1 = score_file(pred, extract="r1-aqa")  # the first answer: "Woman" for q2
    assert [s["match"] for s in r1["samples"]] == [1, 1, 0] and r1["extract"] == "r1-aqa"


def test_score_reads_the_extraction_from_the_meta_file(tmp_path):
    pred = tmp_path / "grpo-think.json"
    pred.write_text(json.dumps([_think_item(0, "a woman? no")]))
    assert score_file(pred)["extract"] is None
    (tmp_path / "grpo-think.meta.json").write_text(json.dumps({"extract": "r1-aqa", "prompt": "think"}))
    assert score_file(pred)["extract"] == "r1-aqa"


def test_cli_key_and_extract(tmp_path):
    pred, out = tmp_path / "pred.json", tmp_path / "scored.json"
    pred.write_text(json.dumps([_think_item(0, "could be a woman"), _think_item(1, "deep")]))
    proc = _cli(pred, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "Total Accuracy: 100.00% over 2 samples" in proc.stdout and "Raw output (model_output" in proc.stdout
    assert "50.00% over 2 samples (1 correct)" in proc.stdout
    proc = _cli(pred, "--key", "model_output", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "Total Accuracy: 50.00% over 2 samples" in proc.stdout and "Raw output" not in proc.stdout
    assert json.loads(out.read_text())["key"] == "model_output"
    proc = _cli(pred, "--key", "model_output", "--extract", "r1-aqa")
    assert proc.returncode == 2 and "give one of them" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    only_prediction = tmp_path / "only.json"
    only_prediction.write_text(json.dumps([_item(0, model_prediction="Man")]))
    proc = _cli(only_prediction, "--extract", "r1-aqa")
    assert proc.returncode == 2 and "no item has 'model_output'" in proc.stderr and str(only_prediction) in proc.stderr


def test_score_counts_what_mmaus_script_would_skip(tmp_path):
    """MMAU's evaluation.py (at its head) reads model_output and skips an item without it; we score such an item
    on model_prediction, or count it wrong, and say how many there are."""
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([_item(0, model_prediction="Man"), _item(1, model_prediction="Man", model_output="Man"),
                                _item(2, model_prediction=None), _item(3, answer=None, model_prediction="Man")]))
    result = score_file(pred)
    assert result["summary"]["official_skips"] == 2 and result["summary"]["n"] == 3  # the unanswered item is not one
    assert result["summary"]["correct"] == 2 and result["summary"]["no_prediction"] == 1
    proc = _cli(pred)
    assert proc.returncode == 0 and "would skip 2 items that have no model_output" in proc.stdout
