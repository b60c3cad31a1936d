"""How report.html holds up at MMAU test-mini's size: N items x V variants of made-up predictions (with a short
clip each), timed from writing the page to a filter click and a sort in headless Chromium.

    python scripts/bench_report_page.py [--items 1000] [--variants 5] [--out /tmp/report-page-bench]

The browser is driven with the test suite's DevTools client (tests/browser.py); without chromium only the
writing is timed. Prints one line per measurement (the clicks twice: first and repeated); docs/report-page.md keeps the numbers with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from audio_rft.eval.html import write_html  # noqa: E402
from audio_rft.eval.report import build_report  # noqa: E402
from audio_rft.machine import machine_info  # noqa: E402
from browser import Browser, find_chromium  # noqa: E402

TASKS = ("sound", "music", "speech")


def make_run(root: Path, n: int, variants: int, seed: int = 0) -> list[tuple[str, Path]]:
    rng = np.random.default_rng(seed)
    clip = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16_000 * 3) / 16_000)).astype(np.float32)
    (root / "data" / "audio").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(str(root / "data" / "audio" / f"{i}.wav"), clip, 16_000)
    runs = []
    for v in range(variants):
        think = v == variants - 1
        items = []
        for i in range(n):
            choices = [f"answer {k} of item {i}" for k in range(4)]
            answer, said = choices[i % 4], choices[i % 4] if rng.random() < 0.3 + 0.1 * v else choices[(i + 1) % 4]
            output = (f"<think>a reasoning of some forty words about item {i} " + "and so on " * 15 + "</think>" if think else "") + f"<answer>{said}</answer>"
            items.append({"id": f"item-{i}", "audio": f"audio/{i}.wav", "question": f"Question {i}: what is heard in this clip?",
                          "choices": choices, "answer": answer, "task": TASKS[i % 3], "sub_category": f"sub-{i % 27}",
                          "difficulty": ("easy", "medium", "hard")[i % 3], "model_output": output, "model_prediction": said,
                          "prompt_mode": "think" if think else "answer"})
        path = root / "eval" / f"variant-{v}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))
        path.with_suffix(".meta.json").write_text(json.dumps({"data": str(root / "data"), "prompt": items[0]["prompt_mode"]}))
        runs.append((f"variant-{v}", path))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--out", default="/tmp/report-page-bench")
    args = parser.parse_args()
    root = Path(args.out)
    runs = make_run(root, args.items, args.variants)
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{args.items} items x {args.variants} variants")
    report = build_report(runs, root / "report", resamples=200)
    began = time.perf_counter()
    page = write_html(root / "report", report, runs)
    print(f"write report.html: {time.perf_counter() - began:.2f} s, {page.stat().st_size / 1e6:.2f} MB")
    if find_chromium() is None:
        print("no chromium: browser timings skipped")
        return
    browser = Browser(root / "profile", timeout=120)
    try:
        browser.call("Page.enable")
        began = time.perf_counter()
        browser.call("Page.navigate", url=page.as_uri())
        browser.wait_for("Page.loadEventFired")
        print(f"load (navigate to load event): {time.perf_counter() - began:.2f} s")
        # in-page timings: the handlers run synchronously, and reading offsetHeight forces the layout they cause
        timed = lambda action: browser.evaluate(
            f"(function () {{ var t = performance.now(); {action}; document.body.offsetHeight; return performance.now() - t; }})()")
        chip = lambda outcome: f"document.querySelector('.chip[data-outcome=\"{outcome}\"]').click()"
        header = lambda key: f"document.querySelector('th[data-sort=\"{key}\"]').click()"
        actions = [("filter click (only variant-0 right)", chip("only-0")), ("filter click (variants disagree)", chip("disagree")),
                   ("filter click (all items)", chip("")), ("sort click (by variant-1)", header("v1")),
                   ("sort click (by question)", header("question"))]
        for label, action in actions + [(f"{label}, again", action) for label, action in actions]:
            print(f"{label}: {timed(action):.0f} ms")
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
