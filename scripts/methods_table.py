"""The table of docs/methods-results.md from finished `pipelines/methods.yaml` runs (DIR/seed-N/report.json):
average accuracy per method and seed, and each method against GRPO and against SFT with the paired bootstrap
95% interval and the exact McNemar p from that seed's report.

    python scripts/methods_table.py DIR SEED [SEED ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def paired(report: dict, method: str, against: str) -> dict | None:
    """method − against on the same items (the report stores b − a for each pair a, b)."""
    for test in report.get("paired_tests", []):
        if test.get("column") == "average" and {test["a"], test["b"]} == {method, against}:
            sign = 1 if test["b"] == method else -1
            low, high = (sign * x for x in test["difference_ci95"])
            return {"diff": sign * test["difference"], "ci": sorted((low, high)), "p": test["mcnemar_p"]}
    return None


def main() -> None:
    out, seeds = Path(sys.argv[1]), sys.argv[2:]
    reports = {seed: json.loads((out / f"seed-{seed}" / "report.json").read_text()) for seed in seeds}
    names = [v["name"] for v in next(iter(reports.values()))["variants"]]
    print("\naverage accuracy (%) on the test split (400 items), per seed\n")
    print("| seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for seed, report in reports.items():
        acc = {v["name"]: v["accuracy"]["average"] for v in report["variants"]}
        print(f"| {seed} | " + " | ".join(f"{acc[n]:.2f}" for n in names) + " |")
    for against in ("grpo", "sft"):
        print(f"\nmethod − {against} (points), paired bootstrap 95% interval, McNemar p\n")
        others = [n for n in names if n != against]
        print("| seed | " + " | ".join(others) + " |")
        print("|---" * (len(others) + 1) + "|")
        for seed, report in reports.items():
            cells = []
            for name in others:
                test = paired(report, name, against)
                cells.append("n/a" if test is None else
                             f"{test['diff']:+.2f} [{test['ci'][0]:+.1f}, {test['ci'][1]:+.1f}]"
                             + (f" p={test['p']:.2g}" if test.get("p") is not None else ""))
            print(f"| {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
