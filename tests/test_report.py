"""`audio-rft report`: intervals, paired tests, balanced accuracy, and the files it writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest

from audio_rft.eval.report import (balanced_accuracy, bootstrap_ci, build_report, paired_test, parse_runs,
                                   plot_accuracy_vs_step)

REPO = Path(__file__).resolve().parents[1]
PAPER_TABLE = REPO.parent / "shared" / "data" / "r1-aqa-paper-table.csv"
PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("sound", "music", "speech")
PITCH = ["low", "middle", "high"]


def _items(n: int, right: np.ndarray, *, constant: str | None = None, mode: str = "answer") -> list[dict]:
    """n pitch questions whose right answers are 60% low, 30% middle, 10% high; `right` says which the model gets."""
    items = []
    for i in range(n):
        answer = PITCH[0] if i % 10 < 6 else PITCH[1] if i % 10 < 9 else PITCH[2]
        predicted = constant or (answer if right[i] else PITCH[(PITCH.index(answer) + 1) % 3])
        items.append({
            "id": f"q{i}", "audio": f"audio/{i}.wav", "question": "Which pitch?", "choices": PITCH, "answer": answer,
            "task": TASKS[i % 3], "difficulty": ["easy", "medium", "hard"][i % 3 // 2],
            "sub_category": "Pitch" if i % 2 else "Tone", "model_output": f"<answer>{predicted}</answer>",
            "model_prediction": predicted, "prompt_mode": mode,
        })
    return items


def _write(tmp_path: Path, name: str, items: list[dict], meta: dict | None = None) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(items))
    if meta is not None:
        path.with_suffix(".meta.json").write_text(json.dumps(meta))
    return path


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_n():
    widths = []
    for n in (50, 500, 5000):
        low, high = bootstrap_ci(int(0.6 * n), n)
        assert low <= 60.0 <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert 24 < widths[0] < 30 and 2.2 < widths[2] < 3.2  # ≈ 2 × 1.96 × sqrt(p(1−p)/n)
    assert bootstrap_ci(30, 50, seed=3) == bootstrap_ci(30, 50, seed=3)  # a fixed seed gives the same interval
    assert bootstrap_ci(0, 0) is None


def test_mcnemar_matches_a_hand_computed_binomial():
    # 20 items both right, 2 only A right, 8 only B right, 10 both wrong.
    a = np.array([1] * 20 + [1] * 2 + [0] * 8 + [0] * 10)
    b = np.array([1] * 20 + [0] * 2 + [1] * 8 + [0] * 10)
    test = paired_test(a, b)
    # Two-sided exact test: 2 × P(X ≤ 2), X ~ Binomial(10, 1/2) = 2 × (1 + 10 + 45) / 1024.
    assert test["mcnemar_p"] == pytest.approx(2 * sum(comb(10, k) for k in range(3)) / 2 ** 10)
    assert (test["only_a_correct"], test["only_b_correct"], test["n"]) == (2, 8, 40)
    assert test["difference"] == 15.0 and not test["significant"]
    low, high = test["difference_ci95"]
    assert low <= 15.0 <= high
    strong = paired_test(np.array([1] + [0] * 12), np.array([0] + [1] * 12))
    assert strong["mcnemar_p"] == pytest.approx(2 * (1 + 13) / 2 ** 13) and strong["significant"]
    assert paired_test(np.ones(5), np.ones(5))["mcnemar_p"] == 1.0  # no discordant item: no evidence


def test_one_point_on_a_thousand_items_is_not_a_win():
    # 1,000 items: 500 right for both, 40 only A, 50 only B: B is one point ahead.
    a = np.array([1] * 500 + [1] * 40 + [0] * 50 + [0] * 410)
    b = np.array([1] * 500 + [0] * 40 + [1] * 50 + [0] * 410)
    test = paired_test(a, b)
    assert test["difference"] == 1.0 and not test["significant"]
    assert test["mcnemar_p"] == pytest.approx(2 * sum(comb(90, k) for k in range(41)) / 2 ** 90)
    low, high = test["difference_ci95"]
    assert low < 0 < high


def test_constant_answer_has_balanced_accuracy_one_over_k():
    rows = [{"sub": "Pitch", "answer": PITCH[0] if i % 10 < 6 else PITCH[1] if i % 10 < 9 else PITCH[2], "match": 0}
            for i in range(100)]
    for r in rows:
        r["match"] = int(r["answer"] == "low")  # always says "low": raw 60%
    assert balanced_accuracy(rows) == pytest.approx(100 / 3, abs=0.01)
    for r in rows:
        r["match"] = int(r["answer"] == "high")  # always says "high": raw 10%, balanced still 1/3
    assert balanced_accuracy(rows) == pytest.approx(100 / 3, abs=0.01)


def test_build_report_writes_everything(tmp_path):
    n = 300
    rng = np.random.default_rng(1)
    base_right = rng.random(n) < 0.5
    grpo_right = base_right | (rng.random(n) < 0.4)
    base = _write(tmp_path, "base", _items(n, base_right), {"model": "tiny", "adapter": None, "prompt": "answer", "ablate_audio": False, "n": n})
    grpo_items = _items(n, grpo_right, mode="think")
    for i, item in enumerate(grpo_items):  # half follow the think format; token counts recorded
        item["model_output"] = ("<think>high or low</think>" if i % 2 else "") + item["model_output"]
        item["completion_tokens"] = 10 + i % 5
    grpo = _write(tmp_path, "grpo", grpo_items, {"model": "tiny", "adapter": "runs/grpo/checkpoint-100", "prompt": "think", "ablate_audio": False, "n": n})
    const = _write(tmp_path, "const", _items(n, base_right, constant="low"), {"model": "tiny", "adapter": None, "prompt": "answer", "ablate_audio": True, "n": n})
    out = tmp_path / "report"
    report = build_report([("base", base), ("grpo", grpo), ("const", const)], out, paper_table=PAPER_TABLE if PAPER_TABLE.exists() else None)

    for name in ("report.md", "report.json", "report.csv", "accuracy.png", "answers.png"):
        assert (out / name).exists(), name
    assert (out / "accuracy.png").read_bytes().startswith(PNG) and (out / "answers.png").read_bytes().startswith(PNG)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))

    names = [v["name"] for v in report["variants"]]
    assert names == ["base", "grpo", "const"] and report["columns"] == ["sound", "music", "speech", "average"]
    base_v, grpo_v, const_v = report["variants"]
    for v in report["variants"]:
        assert set(v["accuracy"]) == set(v["ci95"]) == {"sound", "music", "speech", "average"}
        for c in report["columns"]:
            low, high = v["ci95"][c]
            assert low <= v["accuracy"][c] <= high
        assert v["n"] == n and set(v["per_difficulty"]) == {"easy", "medium"} and set(v["per_sub_category"]) == {"Tone", "Pitch"}
    assert base_v["accuracy"]["average"] == round(100 * base_right.mean(), 2)
    assert grpo_v["checkpoint"] == "runs/grpo/checkpoint-100" and base_v["checkpoint"] == "tiny"
    assert (grpo_v["prompt"], grpo_v["format_rate"], grpo_v["length_unit"], grpo_v["mean_completion_length"]) == ("think", 50.0, "tokens", 12.0)
    assert (base_v["format_rate"], base_v["length_unit"], base_v["mean_completion_length"]) == (100.0, "words", 1.0)
    # The constant "low" predictor: raw 60%; balanced 1/K per sub-category (Tone has 2 right answers,
    # Pitch 3), 150 items each; one answer at 100% of every sub-category.
    assert const_v["control"] and not base_v["control"]
    assert const_v["per_sub_category"]["Tone"]["balanced_accuracy"] == 50.0
    assert const_v["per_sub_category"]["Pitch"]["balanced_accuracy"] == pytest.approx(100 / 3, abs=0.01)
    assert const_v["accuracy"]["average"] == 60.0 and const_v["balanced_accuracy"] == pytest.approx((50 + 100 / 3) / 2, abs=0.01)
    assert all(d["predicted"] == {"low": 1.0} for d in const_v["answer_distribution"].values())
    assert const_v["answer_position"]["predicted"] == {"1": 1.0}

    tests = {(t["a"], t["b"], t["column"]): t for t in report["paired_tests"]}
    assert len(tests) == 3 * 4
    gain = tests[("base", "grpo", "average")]
    assert gain["only_a_correct"] == 0 and gain["only_b_correct"] == int((grpo_right & ~base_right).sum()) and gain["significant"]

    md = (out / "report.md").read_text()
    assert "| base | grpo | average |" in md and "significant at 0.05" in md
    assert "const (no-audio control)" in md and "balanced acc" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    ours = [r for r in rows if r["origin"] == "ours"]
    assert len(ours) == 3 * 4 and {r["column"] for r in ours} == {"sound", "music", "speech", "average"}
    if PAPER_TABLE.exists():
        theirs = [r for r in rows if r["origin"] != "ours"]
        assert theirs and all(r["origin"] == "paper (theirs)" for r in theirs)
        assert all(r["origin"] == "paper (theirs)" for r in report["paper_table"]) and len(report["paper_table"]) == 11
        grpo_paper = next(r for r in report["paper_table"] if r["method"] == "GRPO" and r["prompt"].startswith("2"))
        assert grpo_paper["accuracy"]["average"] == 64.5
        section = md[md.index("## The paper's numbers (theirs)"):]
        assert "not ours" in section and "Not comparable" in section and "| GRPO |" in section
        assert "| GRPO |" not in md[: md.index("## The paper's numbers (theirs)")]  # never mixed into our table


def test_unscored_items_and_different_item_sets(tmp_path):
    items = _items(30, np.ones(30, dtype=bool))
    for item in items[:10]:
        item["answer"] = None  # withheld answers: unscored, not wrong
    a = _write(tmp_path, "a", items)
    b = _write(tmp_path, "b-no-audio", _items(20, np.zeros(20, dtype=bool)))
    report = build_report([("a", a), ("b-no-audio", b)], tmp_path / "out", resamples=200)
    va, vb = report["variants"]
    assert (va["n"], va["unscored"], va["accuracy"]["average"]) == (20, 10, 100.0)
    assert vb["control"] and not report["same_items"]
    assert next(t for t in report["paired_tests"] if t["column"] == "average")["n"] == 10  # q10..q19 in both
    assert "not scored on the same items" in (tmp_path / "out" / "report.md").read_text()


def test_parse_runs(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for p in (tmp_path / "x" / "pred.json", tmp_path / "y" / "pred.json", tmp_path / "base.json"):
        p.write_text("[]")
    assert parse_runs([f"grpo={tmp_path / 'x' / 'pred.json'}", str(tmp_path / "base.json")]) == [
        ("grpo", str(tmp_path / "x" / "pred.json")), ("base", str(tmp_path / "base.json"))]
    assert [n for n, _ in parse_runs([str(tmp_path / "x" / "pred.json"), str(tmp_path / "y" / "pred.json")])] == ["x/pred", "y/pred"]
    assert [n for n, _ in parse_runs([str(tmp_path / "base.json")], names="sft")] == ["sft"]


def test_plot_accuracy_vs_step(tmp_path):
    rows = [{"step": s, "average": 40 + s / 10, "ci_low": 35 + s / 10, "ci_high": 45 + s / 10} for s in (200, 0, 100)]
    plot_accuracy_vs_step(rows, tmp_path / "sweep" / "acc.png")
    assert (tmp_path / "sweep" / "acc.png").read_bytes().startswith(PNG)


def test_cli(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "audio_rft", "report", *map(str, args)],
                                       capture_output=True, text=True, cwd=REPO)
    pred = _write(tmp_path, "base", _items(12, np.ones(12, dtype=bool)))
    proc = run(pred, f"other={pred}", "--out", tmp_path / "out", "--resamples", "100")
    assert proc.returncode == 0, proc.stderr
    assert "base: sound 100.00" in proc.stdout and "not significant" in proc.stdout
    assert (tmp_path / "out" / "report.json").exists()
    proc = run(tmp_path / "missing.json", "--out", tmp_path / "out2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "no such file" in proc.stderr
    proc = run(pred, pred, "--out", tmp_path / "out3")
    assert proc.returncode == 2 and "two runs are named" in proc.stderr


def _think(i: int, reasoning: str, said: str, answer: str = "low") -> dict:
    output = f"<think>{reasoning}</think><answer>{said}</answer>"
    return {"id": f"q{i}", "question": "Which pitch?", "choices": PITCH, "answer": answer, "task": "sound",
            "sub_category": "Pitch", "model_output": output, "model_prediction": said, "prompt_mode": "think"}


def test_think_variant_shows_the_raw_output_score_and_the_flipped_items(tmp_path):
    items = [_think(0, "not high, so", "low"),      # right when extracted; its reasoning names "high": wrong raw
             _think(1, "it sounds deep", "low"),    # right both ways
             _think(2, "deep", "middle"),           # wrong both ways
             {**_think(3, "deep", "low"), "model_prediction": None},  # a null prediction: wrong
             {**_think(4, "deep", "low"), "answer": None}]           # a null answer: unscored
    think = _write(tmp_path, "grpo-think", items, {"prompt": "think", "extract": "audio-rft"})
    answer = _write(tmp_path, "grpo", _items(5, np.ones(5, dtype=bool)), {"prompt": "answer", "extract": "audio-rft"})
    report = build_report([("grpo", answer), ("grpo-think", think)], tmp_path / "out", resamples=100)
    plain, v = report["variants"]
    assert v["accuracy"]["average"] == 50.0 and (v["no_prediction"], v["unscored"], v["extract"]) == (1, 1, "audio-rft")
    raw = v["raw_output"]
    assert (raw["accuracy"], raw["correct"], raw["extracted_only"], raw["raw_only"]) == (50.0, 2, 1, 1)
    assert plain["raw_output"]["extracted_only"] == plain["raw_output"]["raw_only"] == 0
    md = (tmp_path / "out" / "report.md").read_text()
    start = md.index("## Extracted answer vs raw output")
    section = md[start:md.index("\n## ", start + 1)]
    assert "| grpo-think | think | audio-rft | 50.00" in section and "| grpo |" not in section  # the answer prompt agrees
    assert "**grpo-think**: 50.00% on the extracted answer, 50.00% on the raw output; 1 of 4 items flip from right to wrong" in section
    assert "No prediction: grpo 0, grpo-think 1. Unscored (answer withheld): grpo 0, grpo-think 1." in md
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert next(r for r in rows if r["variant"] == "grpo-think" and r["column"] == "average")["raw_output_accuracy"] == "50.0"


def test_training_curves_are_drawn_and_embedded(tmp_path):
    trained = tmp_path / "runs" / "grpo"
    (trained / "final").mkdir(parents=True)
    (trained / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.1, "reward": s / 10, "rewards/accuracy": s / 20, "kl": 0.0}) + "\n" for s in range(1, 6)))
    grpo = _write(tmp_path, "grpo", _items(6, np.ones(6, dtype=bool)), {"adapter": str(trained / "final"), "prompt": "answer"})
    base = _write(tmp_path, "base", _items(6, np.ones(6, dtype=bool)), {"model": "Qwen/Qwen2-Audio-7B-Instruct", "prompt": "answer"})
    control = _write(tmp_path, "grpo-no-audio", _items(6, np.zeros(6, dtype=bool)),
                     {"adapter": str(trained / "checkpoint-5"), "prompt": "answer", "ablate_audio": True})
    out = tmp_path / "out"
    report = build_report([("base", base), ("grpo", grpo), ("grpo-no-audio", control)], out, resamples=50)
    assert report["training_curves"] == [{"folder": str(trained), "variants": ["grpo", "grpo-no-audio"], "png": "curves-grpo.png"}]
    assert (trained / "curves.png").read_bytes().startswith(PNG)
    assert (out / "curves-grpo.png").read_bytes() == (trained / "curves.png").read_bytes()
    md = (out / "report.md").read_text()
    assert "## Training curves" in md and "### grpo, grpo-no-audio" in md and "(curves-grpo.png)" in md
    report = build_report([("base", base)], tmp_path / "out2", resamples=50, training={})
    assert report["training_curves"] == [] and "## Training curves" not in (tmp_path / "out2" / "report.md").read_text()


def test_report_names_the_data_version_and_beside_a_paper_table_the_papers(tmp_path):
    table = tmp_path / "paper.csv"
    table.write_text("model,method,prompt,sound,music,speech,average,source\nQwen2-Audio,GRPO,2,69.37,66.77,57.36,64.50,paper\n")
    today = {"builder": "mmau", "content_sha256": "c" * 64, "benchmark": "mmau-test-mini", "known": True,
             "commit": "f0a4a97d2b56", "date": "2025-08-09", "latest": True, "sha256": "9f18fda9"}
    right = np.arange(30) % 2 == 0
    a = _write(tmp_path, "a", _items(30, right), meta={"benchmark_version": today})
    b = _write(tmp_path, "b", _items(30, right), meta={"benchmark_version": today})
    report = build_report([("a", a), ("b", b)], tmp_path / "r", paper_table=table)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Data: MMAU test-mini f0a4a97d2b56 (2025-08-09, the newest known)." in md
    assert "the paper was scored on MMAU test-mini a5cd89afa3f5 (2025-01-28)" in md and "364 of 1,000 items differ" in md
    assert report["data_versions"]["by_variant"] == {"a": today, "b": today}
    # no paper table: the data line alone; a file without meta says it cannot tell
    c = _write(tmp_path, "c", _items(30, right))
    md = (build_report([("a", a), ("c", c)], tmp_path / "r2"), (tmp_path / "r2" / "report.md").read_text())[1]
    assert "Data (c): a dataset of unknown version" in md and "paper was scored" not in md


def test_choice_order_section_shows_a_position_biased_model(tmp_path):
    """A model that always takes the first choice: its accuracy moves with the order, it is never consistent."""
    right = np.ones(30, dtype=bool)
    original = _items(30, right)  # right in the given order
    for item in original:
        item["choices"] = [item["answer"], *(c for c in PITCH if c != item["answer"])]
    pred = _write(tmp_path, "grpo", original)
    shifted = []
    for item in original:
        choices = item["choices"][1:] + item["choices"][:1]  # the answer moves to the last position
        shifted.append({**item, "choices": choices, "model_prediction": choices[0], "model_output": choices[0],
                        "choice_permutation": [1, 2, 0]})
    _write(tmp_path, "grpo.perm1", shifted)
    steady = _write(tmp_path, "steady", original)
    _write(tmp_path, "steady.perm1", [{**s, "model_prediction": s["answer"], "model_output": s["answer"]} for s in shifted])
    report = build_report([("grpo", pred), ("steady", steady)], tmp_path / "r")
    biased, fine = (v["choice_order"] for v in report["variants"])
    assert biased["accuracy"] == [100.0, 0.0] and (biased["mean"], biased["min"], biased["consistent"]) == (50.0, 0.0, 0.0)
    assert biased["positions"]["predicted"] == {"1": 1.0} and biased["positions"]["gold"] == {"1": 0.5, "3": 0.5}
    assert fine["accuracy"] == [100.0, 100.0] and fine["consistent"] == 100.0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Choice order" in md and "| grpo | 100.00 | 0.00 | 50.00 | 0.00 | 0.00 | 30 |" in md
    alone = _write(tmp_path, "alone", original)  # no perm file beside it: no choice-order figures, no section
    report = build_report([("alone", alone)], tmp_path / "r3")
    assert report["variants"][0]["choice_order"] is None and "## Choice order" not in (tmp_path / "r3" / "report.md").read_text()


def test_report_flags_a_checkpoint_chosen_on_the_split_it_is_scored_on(tmp_path):
    right = np.arange(20) % 2 == 0
    test_version = {"builder": "synth", "content_sha256": "t" * 64}
    on_test = _write(tmp_path, "best-on-test", _items(20, right), meta={
        "data": str(tmp_path / "data" / "test"), "benchmark_version": test_version,
        "chosen_on": {"data": str(tmp_path / "data" / "test"), "version": test_version}})
    copy_of_test = _write(tmp_path, "copy", _items(20, right), meta={  # another folder with the same content
        "data": str(tmp_path / "data" / "test"), "benchmark_version": test_version,
        "chosen_on": {"data": str(tmp_path / "elsewhere"), "version": test_version}})
    on_dev = _write(tmp_path, "chosen-on-dev", _items(20, right), meta={
        "data": str(tmp_path / "data" / "test"), "benchmark_version": test_version,
        "chosen_on": {"data": str(tmp_path / "data" / "dev"), "version": {"builder": "synth", "content_sha256": "d" * 64}}})
    plain = _write(tmp_path, "plain", _items(20, right), meta={"data": str(tmp_path / "data" / "test")})
    report = build_report([("best-on-test", on_test), ("copy", copy_of_test), ("chosen-on-dev", on_dev), ("plain", plain)],
                          tmp_path / "r")
    assert [v["chosen_on_scored_split"] for v in report["variants"]] == [True, True, False, None]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**best-on-test: its checkpoint was chosen on the split it is scored on**" in md
    assert "**chosen-on-dev:" not in md and "**plain:" not in md
