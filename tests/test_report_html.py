"""report.html: one row per item, relative clip links that survive a moved folder, the no-audio control beside
its twin, paired-test links whose counts are the page's, and (in headless Chromium) filters that work."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from audio_rft.eval.html import column_order, markdown_html, write_html
from audio_rft.eval.report import build_report
from browser import Browser, find_chromium
from conftest import write_audio

REPO = Path(__file__).resolve().parents[1]
PITCH = ["low", "middle", "high"]
N = 12
# which items each variant gets right; grpo-no-audio is the control of grpo (same model, adapter and prompt)
RIGHT = {
    "base": np.arange(N) < 6,
    "grpo-no-audio": np.arange(N) == 11,
    "grpo-think": np.arange(N) % 2 == 0,
    "grpo": np.isin(np.arange(N), [0, 1, 2, 6, 7, 8, 9]),
}
PROMPT = {"base": "answer", "grpo-no-audio": "answer", "grpo-think": "think", "grpo": "answer"}


def _run_folder(root: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """root/data (clips + nothing else needed), root/eval/<variant>.json with meta, as an eval stage leaves them."""
    data = root / "data"
    for i in range(N):
        write_audio(data / "audio" / f"q{i}.wav", seconds=0.3)
    runs = []
    for name, right in RIGHT.items():
        items = []
        for i in range(N):
            answer = PITCH[i % 3]
            said = answer if right[i] else PITCH[(i + 1) % 3]
            output = (f"<think>it sounds {said} to me</think>" if PROMPT[name] == "think" else "") + f"<answer>{said}</answer>"
            # markup in a question must reach the reader as text, in the rows and in the page's JSON
            items.append({"id": f"q{i}", "audio": f"audio/q{i}.wav", "question": f"Which pitch is tone {i}? <b>&amp;</script>",
                          "choices": PITCH, "answer": answer, "task": ("sound", "music", "speech")[i % 3],
                          "sub_category": "Pitch" if i < 8 else "Tone", "difficulty": ("easy", "hard")[i % 2],
                          "model_output": output, "model_prediction": said, "prompt_mode": PROMPT[name]})
        path = root / "eval" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))
        adapter = None if name == "base" else f"{name.removesuffix('-no-audio')}/final"
        path.with_suffix(".meta.json").write_text(json.dumps({
            "model": "warmup/final", "adapter": adapter, "prompt": PROMPT[name], "data": str(data),
            "ablate_audio": name.endswith("-no-audio"), "n": N}))
        runs.append((name, path))
    return data, runs


@pytest.fixture
def page(tmp_path):
    data, runs = _run_folder(tmp_path / "run")
    out = tmp_path / "run" / "report"
    report = build_report(runs, out, resamples=50)
    return write_html(out, report, runs), report, runs


class Page(HTMLParser):
    """The page as the tests read it: tags checked for balance, ids for uniqueness; rows, links and cells kept."""

    VOID = {"meta", "link", "img", "br", "hr", "input", "source", "wbr", "col"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.rows, self.urls, self.headers, self.pairs = [], set(), [], [], [], []
        self.in_items = self.in_head = False
        self.text_target = None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"duplicate id {attrs['id']}"
            self.ids.add(attrs["id"])
        for key in ("src", "href", "data-src"):
            if key in attrs:
                self.urls.append(attrs[key])
        if attrs.get("id") == "item-table":
            self.in_items = True
        if self.in_items and tag == "thead":
            self.in_head = True
        if self.in_items and tag == "tr" and not self.in_head:
            self.rows.append({"cells": [], "audio": None, "answer": []})
        if self.in_items and self.rows and not self.in_head:
            row = self.rows[-1]
            if tag == "td":
                row["cells"].append({"class": attrs.get("class", ""), "text": ""})
            if tag == "button" and "play" in attrs.get("class", ""):
                row["audio"] = attrs["data-src"]
            if tag == "li" and "answer" in attrs.get("class", ""):
                self.text_target = row["answer"]
        if self.in_head and tag == "th" and "variant" in attrs.get("class", ""):
            self.headers.append("")
            self.text_target = "header"
        if tag == "a" and "pair" in attrs.get("class", ""):
            self.pairs.append([attrs["href"], ""])
            self.text_target = "pair"

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "thead":
            self.in_head = False
        if tag == "table":
            self.in_items = False
        if tag in ("li", "a") or (tag == "th" and self.text_target == "header"):
            self.text_target = None

    def handle_data(self, data):
        if self.text_target == "header":
            self.headers[-1] += " " + data
        elif self.text_target == "pair":
            self.pairs[-1][1] += data
        elif isinstance(self.text_target, list):
            self.text_target.append(data)
        if self.in_items and self.rows and not self.in_head and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1]["text"] += data


def _data(text: str) -> dict:
    start = text.index('<script type="application/json" id="report-data">') + len('<script type="application/json" id="report-data">')
    return json.loads(text[start:text.index("</script>", start)])


def test_one_row_per_item_with_clips_that_play_from_a_copied_folder(page, tmp_path):
    path, report, runs = page
    text = path.read_text()
    parsed = Page(text)
    assert len(parsed.rows) == N
    assert not [u for u in parsed.urls if u.startswith(("http:", "https:", "//"))]  # nothing fetched at view time
    moved = tmp_path / "elsewhere" / "copied-run"
    shutil.copytree(tmp_path / "run", moved)
    shutil.rmtree(tmp_path / "run")  # the original is gone: only relative links still play
    for i, row in enumerate(parsed.rows):
        assert row["audio"] == f"../data/audio/q{i}.wav"
        clip = (moved / "report" / unquote(row["audio"])).resolve()
        assert clip.is_file() and clip.is_relative_to(moved)
        assert "".join(row["answer"]).strip() == f"{PITCH[i % 3]} ✓"  # the right choice is marked
        assert row["cells"][2]["text"].startswith(f"Which pitch is tone {i}? <b>&amp;</script>")
    assert [it[4] for it in _data(text)["items"]] == [f"Which pitch is tone {i}? <b>&amp;</script>" for i in range(N)]


def test_the_control_sits_beside_its_twin_and_every_answer_is_marked(page):
    path, report, _ = page
    parsed = Page(path.read_text())
    assert [c["name"] for c in column_order(report["variants"])] == ["base", "grpo-think", "grpo", "grpo-no-audio"]
    assert [h.split()[0] for h in parsed.headers] == ["base", "grpo-think", "grpo", "grpo-no-audio"]
    assert "twin of grpo" in parsed.headers[3]
    for i, row in enumerate(parsed.rows):
        answers = row["cells"][6:]
        for cell, name in zip(answers, ["base", "grpo-think", "grpo", "grpo-no-audio"]):
            assert ("right" if RIGHT[name][i] else "wrong") in cell["class"].split()
            said = PITCH[i % 3] if RIGHT[name][i] else PITCH[(i + 1) % 3]
            assert cell["text"].strip().startswith(("✓ " if RIGHT[name][i] else "✗ ") + said)
        assert f"it sounds {PITCH[i % 3] if RIGHT['grpo-think'][i] else PITCH[(i + 1) % 3]} to me" in answers[1]["text"]
        assert "control" in answers[3]["class"] and "reasoning" not in answers[0]["text"]


def test_paired_cells_link_to_the_items_that_make_the_difference(page):
    path, report, _ = page
    text = path.read_text()
    data, parsed = _data(text), Page(text)
    names = [c["name"] for c in data["columns"]]
    links = dict((href, int(count)) for href, count in parsed.pairs)
    assert len(parsed.pairs) == 2 * len(report["paired_tests"])
    for t in report["paired_tests"]:
        a, b = names.index(t["a"]), names.index(t["b"])
        task = "" if t["column"] == "average" else f"&task={t['column']}"
        for winner, loser, count in ((a, b, t["only_a_correct"]), (b, a, t["only_b_correct"])):
            href = f"#outcome=beats-{winner}-{loser}{task}"
            assert links[href] == count
            # the items the page's filter selects for that link: winner right, loser wrong, in the column's task
            chosen = [it for it in data["items"] if it[5][winner] == 1 and it[5][loser] == 0 and (not task or it[0] == t["column"])]
            assert len(chosen) == count == int((RIGHT[names[winner]] & ~RIGHT[names[loser]]
                                                & (np.arange(N) % 3 == ["sound", "music", "speech"].index(t["column"])
                                                   if task else True)).sum())


def test_embedded_audio_is_the_clip_itself(page, tmp_path):
    _, report, runs = page
    out = tmp_path / "embedded"
    write_html(out, report, runs, embed_audio=True, source_dir=tmp_path / "run" / "report")
    parsed = Page((out / "report.html").read_text())
    assert len(parsed.rows) == N
    for i, row in enumerate(parsed.rows):
        prefix, _, encoded = row["audio"].partition(",")
        assert prefix == "data:audio/wav;base64"
        assert base64.b64decode(encoded) == (tmp_path / "run" / "data" / "audio" / f"q{i}.wav").read_bytes()
    charts = [u for u in parsed.urls if u.startswith("data:image/png;base64,")]
    assert len(charts) == 2  # accuracy.png and answers.png travel inside the page


def test_a_missing_clip_is_said_not_linked(page, tmp_path):
    _, report, runs = page
    (tmp_path / "run" / "data" / "audio" / "q3.wav").unlink()
    write_html(tmp_path / "run" / "report", report, runs)
    parsed = Page((tmp_path / "run" / "report" / "report.html").read_text())
    assert parsed.rows[3]["audio"] is None and "clip not found" in parsed.rows[3]["cells"][1]["text"]
    assert sum(r["audio"] is not None for r in parsed.rows) == N - 1


def test_cli_writes_the_page(tmp_path):
    _, runs = _run_folder(tmp_path / "run")
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "audio_rft", "report", *(f"{n}={p}" for n, p in runs), "--out", str(out),
                           "--resamples", "50", "--html"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout
    assert len(Page((out / "report.html").read_text()).rows) == N


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (.ci/run installs Debian's chromium with "
                                                    "apt-get where apt is available)")
def test_in_a_browser_filters_change_the_visible_rows(page, tmp_path, monkeypatch):
    path, report, runs = page
    monkeypatch.setattr("audio_rft.eval.html.ROWS_SHOWN", 5)
    paged = write_html(tmp_path / "paged", report, runs, source_dir=path.parent)
    names = [c["name"] for c in column_order(report["variants"])]
    browser = Browser(tmp_path / "profile", timeout=60)  # a loaded 2-core machine starts chromium slowly
    try:
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable")
        browser.call("Page.navigate", url=path.as_uri())
        browser.wait_for("Page.loadEventFired")
        rows = "document.querySelectorAll('#item-table tbody tr:not([hidden])').length"
        visible = lambda expected: browser.settle(rows, expected)
        assert visible(N) == N

        only = names.index("grpo")
        browser.click(f'.chip[data-outcome="only-{only}"]')
        expected = RIGHT["grpo"] & ~RIGHT["base"] & ~RIGHT["grpo-think"] & ~RIGHT["grpo-no-audio"]
        assert 0 < expected.sum() < N and visible(expected.sum()) == expected.sum()
        assert browser.evaluate("document.getElementById('shown-count').textContent") == str(expected.sum())
        shown = browser.evaluate("Array.from(document.querySelectorAll('#item-table tbody tr:not([hidden])'), r => +r.dataset.n)")
        assert shown == [int(i) for i in np.flatnonzero(expected)]

        test = next(t for t in report["paired_tests"] if (t["a"], t["b"], t["column"]) == ("base", "grpo", "average"))
        browser.click(f'a.pair[href="#outcome=beats-{names.index("grpo")}-{names.index("base")}"]')
        assert visible(test["only_b_correct"]) == test["only_b_correct"] > 0

        browser.click("#reset")
        assert visible(N) == N
        browser.click(f'th[data-sort="v{names.index("base")}"]')  # sorted by base: its right answers first
        order = browser.evaluate("Array.from(document.querySelectorAll('#item-table tbody tr'), r => +r.dataset.n)")
        assert order == sorted(range(N), key=lambda i: (not RIGHT["base"][i], PITCH[i % 3] if RIGHT["base"][i] else PITCH[(i + 1) % 3], i))

        # pressing a clip's button makes its player, which loads the clip from its relative link
        assert browser.evaluate("document.querySelectorAll('audio').length") == 0
        browser.click("#item-table tbody tr button.play")
        duration = browser.evaluate("new Promise((ok, fail) => { const a = document.querySelector('#item-table audio'); "
                                    "if (!a) fail('no player'); if (a.readyState >= 1) ok(a.duration); "
                                    "a.addEventListener('loadedmetadata', () => ok(a.duration)); "
                                    "a.addEventListener('error', () => fail('audio error')); setTimeout(() => fail('timeout'), 10000); })")
        assert duration == pytest.approx(0.3, abs=0.01)

        shot = browser.screenshot(tmp_path / "report.png")
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 10_000

        # at most ROWS_SHOWN matching rows at once; "show more" adds as many, "show all" the rest
        browser.call("Page.navigate", url=paged.as_uri())
        browser.wait_for("Page.loadEventFired")
        assert visible(5) == 5 and browser.evaluate("document.getElementById('shown-count').textContent") == str(N)
        browser.click("#show-more")
        assert visible(10) == 10
        browser.click("#show-all")
        assert visible(N) == N and browser.evaluate("document.getElementById('more').hidden")
        browser.call("Runtime.evaluate", expression="0")  # drains the events that arrived meanwhile
    finally:
        browser.quit()
    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests


def test_report_markdown_becomes_html_with_everything_escaped():
    markdown = "\n".join([
        "# Evaluation report", "", "Scoring: **MMAU** rule, `mmau_match` <b>not bold</b>.", "",
        "## Accuracy (%)", "", "| variant | note |", "|---|---|", "| a\\|b | *said* <i> |", "",
        "## Per difficulty", "", "- one", "- two", "", "![curves](curves-grpo.png)", ""])
    text = markdown_html(markdown, {}, lambda name: f"src:{name}")
    assert "<h1>Evaluation report</h1>" in text
    assert "<strong>MMAU</strong>" in text and "<code>mmau_match</code>" in text and "&lt;b&gt;not bold&lt;/b&gt;" in text
    assert '<details class="section" id="s-accuracy" open>' in text and '<details class="section" id="s-per-difficulty">' in text
    assert "<td>a|b</td><td><em>said</em> &lt;i&gt;</td>" in text  # an escaped pipe stays in its cell
    assert "<ul><li>one</li><li>two</li></ul>" in text.replace("\n", "")
    assert '<img class="chart" alt="curves" src="src:curves-grpo.png">' in text
    assert text.count("<details") == text.count("</details>") == 2
