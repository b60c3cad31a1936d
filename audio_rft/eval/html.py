"""report.html: the report as one static page where every test item plays its clip beside every variant's answer.

Audio QA errors are understood by listening, so the page puts, for each item, an audio player, the question, the
choices with the right one marked, and each variant's extracted answer (right or wrong; a think variant's
reasoning collapsed beneath it), with the no-audio control beside its listening twin. Above the items sit the
summary tables and charts of report.md. Filters (task, sub-category, difficulty; "variants disagree", "all
wrong", "only X right", "A right, B wrong") and sorting by any column run in the page; the paired-test cells
link to the items that make the difference.

No server and no network: the page is opened by double-click. Clips are linked relative to the page, so a copied
run folder still plays them, or embedded as data URIs (`embed_audio`); charts are always embedded. Rows are
rendered once here; the page's script only toggles `hidden` on them and re-counts from its JSON, which keeps
1,000 items (MMAU test-mini) responsive.

The per-item facts are re-read from the same prediction files, by the same rules (item_match, resolve_choice,
pairing by (id, occurrence)) as report.py, so a link's count equals the paired test's.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from audio_rft.eval.report import resolve_choice
from audio_rft.eval.score import (DIFFICULTY_ORDER, TASK_ORDER, item_match, load_predictions, prediction_text, read_meta,
                                  sub_category)
from audio_rft.fileio import atomic_write_text

PAGE = "report.html"
ROWS_SHOWN = 200  # matching rows shown at once ("show more" adds as many): layout cost stays flat at 1,000 items
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".m4a": "audio/mp4"}
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
# headings of report.md whose sections the page shows open; the others start collapsed
OPEN_SECTIONS = ("Accuracy", "Paired comparisons")
PAIRED_HEADER = ("A", "B", "column")
PAIRED_COUNTS = "only A / only B right"


# ---------------------------------------------------------------- the items

def clip_path(item: dict, meta: dict, pred_path: Path) -> Path | None:
    """Where an item's clip is: `audio` (or MMAU's `audio_id`) relative to the dataset folder the predictions
    were made on (meta "data"), else to the prediction file's folder; None when the item names none."""
    audio = item.get("audio") or item.get("audio_id")
    if not isinstance(audio, str) or not audio:
        return None
    path = Path(audio)
    if path.is_absolute():
        return path
    base = Path(meta["data"]) if meta.get("data") else pred_path.parent
    return (base / path).resolve()


def _twin(v: dict, variants: list[dict]) -> str | None:
    """The listening variant a no-audio control silences: the same model, adapter and prompt, else its name
    without the "-no-audio" suffix."""
    same = lambda w: (w["meta"].get("model"), w["meta"].get("adapter"), w["prompt"]) == (v["meta"].get("model"), v["meta"].get("adapter"), v["prompt"])
    listening = [w for w in variants if not w["control"]]
    found = next((w for w in listening if v["meta"] and same(w)), None) or next(
        (w for w in listening if w["name"] == v["name"].removesuffix("-no-audio")), None)
    return found["name"] if found else None


def column_order(variants: list[dict]) -> list[dict]:
    """Variants as the page shows them: the report's order, each no-audio control right after its twin."""
    twins = {v["name"]: _twin(v, variants) for v in variants if v["control"]}
    placed = [v for v in variants if not (v["control"] and twins[v["name"]])]
    for v in variants:
        if v["control"] and twins[v["name"]]:
            at = next(i for i, w in enumerate(placed) if w["name"] == twins[v["name"]])
            while at + 1 < len(placed) and placed[at + 1]["control"]:
                at += 1  # two controls of one twin keep their report order
            placed.insert(at + 1, v)
    return [{"name": v["name"], "prompt": v["prompt"], "control": v["control"], "twin": twins.get(v["name"])} for v in placed]


def page_items(report: dict, runs: list[tuple[str, str | Path]]) -> tuple[list[dict], list[dict]]:
    """(columns, items): one item per (id, occurrence) over all runs, in first-seen order, with each column's answer.

    An answer is {"label": the choice it resolves to (or a marker such as "(empty)"), "is_choice": whether it is
    a choice, "text": the extracted prediction, "match": 1/0 (None: unscored), "output": the raw completion,
    "reasoning": the think block or None}; None where that variant has no such item.
    """
    columns = column_order(report["variants"])
    paths = dict(runs)
    items: dict[tuple[str, int], dict] = {}
    for index, column in enumerate(columns):
        pred_path = Path(paths[column["name"]])
        meta = read_meta(pred_path)
        seen: Counter = Counter()
        for entry in load_predictions(pred_path):
            item_id = str(entry.get("id"))
            seen[item_id] += 1
            key = (item_id, seen[item_id])
            if key not in items:
                items[key] = {"key": key, "id": item_id, "clip": clip_path(entry, meta, pred_path),
                              "question": str(entry.get("question") or ""), "choices": entry["choices"],
                              "answer": entry.get("answer"), "task": str(entry.get("task")),
                              "sub": str(sub_category(entry) or ""),
                              "difficulty": "" if entry.get("difficulty") is None else str(entry["difficulty"]),
                              "answers": [None] * len(columns)}
            text = prediction_text(entry) or ""
            output = entry.get("model_output")
            think = _THINK.search(output) if isinstance(output, str) else None
            label, position = resolve_choice(text, entry["choices"])
            items[key]["answers"][index] = {
                "label": label, "is_choice": position is not None, "text": text, "match": item_match(entry),
                "output": output, "reasoning": think.group(1).strip() if think else None}
    return columns, list(items.values())


# ---------------------------------------------------------------- report.md, as HTML

def _inline(text: str) -> str:
    """The inline markup report.md uses: `code`, **bold**, *italic*; everything else escaped."""
    out, last = [], 0
    for m in re.finditer(r"`([^`]+)`", text):
        out += [_emphasis(text[last:m.start()]), f"<code>{html.escape(m.group(1))}</code>"]
        last = m.end()
    return "".join(out + [_emphasis(text[last:])])


def _emphasis(text: str) -> str:
    text = html.escape(text.replace("\\|", "|"), quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))] if line.strip() != "|" else []


def _slug(text: str) -> str:
    return "s-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def markdown_html(markdown: str, paired_links: dict[tuple[str, str, str], tuple[str, str]], image_src) -> str:
    """report.md → HTML: headings (each `##` section a <details>), tables, lists, images, paragraphs. The paired
    table's "only A / only B right" cells become links to those items (paired_links[(a, b, column)]);
    image_src(path) gives an <img>'s src."""
    out: list[str] = []
    lines = markdown.splitlines()
    section_open = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if heading := re.match(r"(#{1,4}) (.*)", line):
            level, title = len(heading.group(1)), heading.group(2).strip()
            if level == 1:
                out.append(f"<h1>{_inline(title)}</h1>")
            elif level == 2:
                if section_open:
                    out.append("</details>")
                opened = " open" if title.startswith(OPEN_SECTIONS) else ""
                out.append(f'<details class="section" id="{_slug(title)}"{opened}><summary><h2>{_inline(title)}</h2></summary>')
                section_open = True
            else:
                out.append(f"<h{level}>{_inline(title)}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(_cells(lines[i]))
                i += 1
            out.append(_table_html(block, paired_links))
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
        elif image := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            out.append(f'<img class="chart" alt="{html.escape(image.group(1))}" src="{image_src(image.group(2))}">')
            i += 1
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"#{1,4} |\||- |!\[", lines[i]):
                paragraph.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    if section_open:
        out.append("</details>")
    return "\n".join(out)


def _table_html(block: list[list[str]], paired_links: dict) -> str:
    header, rows = block[0], [r for r in block[1:] if not all(set(c) <= set("-:") for c in r)]
    paired = tuple(header[:3]) == PAIRED_HEADER and PAIRED_COUNTS in header
    counts_at = header.index(PAIRED_COUNTS) if paired else -1
    body = []
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            links = paired_links.get(tuple(c.replace("\\|", "|") for c in row[:3])) if j == counts_at else None
            numbers = cell.split(" / ")
            if links and len(numbers) == 2:
                cells.append(f'<td class="num"><a class="pair" href="{links[0]}" title="items only A gets right">{numbers[0]}</a>'
                             f' / <a class="pair" href="{links[1]}" title="items only B gets right">{numbers[1]}</a></td>')
            else:
                numeric = re.fullmatch(r"[-+0-9.,%\s\[\]—/]+", cell) is not None
                cells.append(('<td class="num">' if numeric else "<td>") + f"{_inline(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    return f'<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


# ---------------------------------------------------------------- the page

def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _link(target: Path, page_dir: Path) -> str:
    """A URL for target relative to the page's folder (so the folder can move), or a file URI where none exists."""
    try:
        relative = os.path.relpath(target, page_dir.resolve())
    except ValueError:  # another drive (Windows)
        return target.as_uri()
    return quote(Path(relative).as_posix(), safe="/")


def _choices_html(item: dict) -> str:
    lis = []
    for choice in item["choices"]:
        right = choice == item["answer"]
        lis.append(f'<li class="answer" title="the right answer">{html.escape(choice)} ✓</li>' if right
                   else f"<li>{html.escape(choice)}</li>")
    return '<ol class="choices">' + "".join(lis) + "</ol>"


def _answer_html(answer: dict | None, column: dict) -> str:
    if answer is None:
        return '<td class="ans missing" title="not in this variant\'s predictions">—</td>'
    outcome = {1: ("right", "✓"), 0: ("wrong", "✗"), None: ("unscored", "·")}[answer["match"]]
    label = answer["label"]
    text = " ".join(answer["text"].split())
    quoted = text if len(text) <= 60 else text[:59] + "…"  # the whole of it is under "raw output"
    shown = html.escape(label) if answer["is_choice"] or not text else f'{html.escape(label)}: “{html.escape(quoted)}”'
    parts = [f'<span class="mark">{outcome[1]}</span> {shown}']
    if column["prompt"] == "think" or answer["reasoning"] is not None:
        reasoning = answer["reasoning"] if answer["reasoning"] is not None else "(no <think> block) " + (answer["output"] or "")
        parts.append(f"<details><summary>reasoning</summary><pre>{html.escape(reasoning)}</pre></details>")
    elif isinstance(answer["output"], str) and (quoted != text or answer["output"].strip() not in (
            answer["text"], f"<answer>{answer['text']}</answer>")):
        parts.append(f"<details><summary>raw output</summary><pre>{html.escape(answer['output'])}</pre></details>")
    classes = f"ans {outcome[0]}" + (" control" if column["control"] else "")
    return f'<td class="{classes}">' + "".join(parts) + "</td>"


def _audio_html(item: dict, page_dir: Path, embed_audio: bool) -> str:
    clip = item["clip"]
    if clip is None:
        return '<td class="clip"><span class="note">no clip named</span></td>'
    if not clip.is_file():
        return f'<td class="clip"><span class="note" title="{html.escape(str(clip))}">clip not found</span></td>'
    mime = AUDIO_TYPES.get(clip.suffix.lower(), "audio/wav")
    src = _data_uri(clip, mime) if embed_audio else _link(clip, page_dir)
    # a button that becomes the player when pressed: a thousand <audio controls> make the page slow to lay out
    return (f'<td class="clip"><button type="button" class="play" data-src="{html.escape(src)}" '
            f'title="{html.escape(clip.name)}">▶ play</button></td>')


def _order(values: list[str], known: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in known if v in present] + sorted(v for v in present if v not in known)


def render_html(report: dict, runs: list[tuple[str, str | Path]], markdown: str, page_dir: str | Path,
                source_dir: str | Path, embed_audio: bool = False) -> str:
    """The page, for a file in page_dir; report.md's images and the charts are read from source_dir."""
    page_dir, source_dir = Path(page_dir), Path(source_dir)
    columns, items = page_items(report, runs)
    index = {c["name"]: i for i, c in enumerate(columns)}
    paired_links = {}
    for t in report["paired_tests"]:
        task = "" if t["column"] == "average" else f"&task={quote(t['column'])}"
        a, b = index[t["a"]], index[t["b"]]
        paired_links[(t["a"], t["b"], t["column"])] = (f"#outcome=beats-{a}-{b}{task}", f"#outcome=beats-{b}-{a}{task}")

    def image_src(name: str) -> str:
        path = source_dir / name
        return _data_uri(path, "image/png") if path.is_file() else html.escape(_link(path, page_dir))

    summary = markdown_html(markdown, paired_links, image_src)
    charts = "".join(f'<figure><img class="chart" alt="{alt}" src="{image_src(name)}"><figcaption>{alt}</figcaption></figure>'
                     for name, alt in ((report["files"]["accuracy_chart"], "accuracy with 95% CI whiskers"),
                                       (report["files"]["answers_chart"], "predicted-answer shares per sub-category"))
                     if (source_dir / name).is_file())

    tasks = _order([i["task"] for i in items], TASK_ORDER)
    subs = sorted(dict.fromkeys(i["sub"] for i in items if i["sub"]))
    difficulties = _order([i["difficulty"] for i in items if i["difficulty"]], DIFFICULTY_ORDER)
    select = lambda name, label, values: (
        f'<label>{label} <select id="f-{name}" data-filter="{name}"><option value="">all</option>'
        + "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values) + "</select></label>")
    outcomes = [("", "all items"), ("disagree", "variants disagree"), ("wrong", "all wrong"), ("right", "all right")]
    outcomes += [(f"only-{i}", f"only {c['name']} right") for i, c in enumerate(columns)]
    chips = "".join(f'<button type="button" class="chip" data-outcome="{v}">{html.escape(label)} <span class="count"></span></button>'
                    for v, label in outcomes)

    widths = ["40px", "170px", "260px", "64px", "110px", "72px", *[""] * len(columns)]
    colgroup = "".join(f'<col style="width:{w}">' if w else "<col>" for w in widths)
    head_cells = ['<th data-sort="n" class="sortable">#</th>', '<th>clip</th>',
                  '<th data-sort="question" class="sortable">question · choices (✓ the answer)</th>',
                  '<th data-sort="task" class="sortable">task</th>', '<th data-sort="sub" class="sortable">sub-category</th>',
                  '<th data-sort="difficulty" class="sortable">difficulty</th>']
    for i, c in enumerate(columns):
        note = f"no audio · twin of {c['twin']}" if c["control"] and c["twin"] else "no audio" if c["control"] else ""
        head_cells.append(f'<th data-sort="v{i}" class="sortable variant{" control" if c["control"] else ""}">'
                          f'{html.escape(c["name"])}<div class="sub">{html.escape(c["prompt"] or "")}'
                          f'{" · " + html.escape(note) if note else ""}</div><div class="score" id="score-{i}"></div></th>')
    rows = []
    for n, item in enumerate(items):
        row = [f'<td class="num">{n + 1}</td>', _audio_html(item, page_dir, embed_audio),
               f'<td class="q"><div class="question">{html.escape(item["question"])}</div>{_choices_html(item)}'
               f'<div class="id">{html.escape(item["id"])}</div></td>',
               f'<td>{html.escape(item["task"])}</td>', f'<td>{html.escape(item["sub"])}</td>',
               f'<td>{html.escape(item["difficulty"])}</td>']
        row += [_answer_html(a, c) for a, c in zip(item["answers"], columns)]
        rows.append(f'<tr data-n="{n}">' + "".join(row) + "</tr>")

    data = {"columns": columns, "tasks": tasks, "difficulties": difficulties, "rows_shown": ROWS_SHOWN,
            # per item: task, sub-category, difficulty, id, question, each column's match (1/0/null; -1 absent), label
            "items": [[i["task"], i["sub"], i["difficulty"], i["id"], i["question"],
                       [-1 if a is None else a["match"] for a in i["answers"]],
                       ["" if a is None else a["label"] for a in i["answers"]]] for i in items]}
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    title = "audio-rft report" + (f" · {report['pipeline']['path']}" if report.get("pipeline") else "")
    return _TEMPLATE.format(
        title=html.escape(title), css=_CSS, step=ROWS_SHOWN, summary=summary, charts=charts, n=len(items),
        filters=select("task", "task", tasks) + select("sub", "sub-category", subs) + select("difficulty", "difficulty", difficulties),
        chips=chips, colgroup=colgroup, min_width=716 + 130 * len(columns), head="".join(head_cells),
        rows="\n".join(rows), data=payload, script=_SCRIPT)


def write_html(out_dir: str | Path, report: dict, runs: list[tuple[str, str | Path]], markdown: str | None = None,
               embed_audio: bool = False, source_dir: str | Path | None = None) -> Path:
    """Write out_dir/report.html (atomically); markdown defaults to source_dir/report.md, source_dir to out_dir."""
    out_dir = Path(out_dir)
    source_dir = Path(source_dir) if source_dir is not None else out_dir
    if markdown is None:
        markdown = (source_dir / "report.md").read_text(encoding="utf-8")
    page = render_html(report, runs, markdown, out_dir, source_dir, embed_audio)
    atomic_write_text(out_dir / PAGE, page)
    return out_dir / PAGE


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<nav><a href="#summary">summary</a> · <a href="#items">items ({n})</a></nav>
<main>
<section id="summary">
{summary}
<div class="charts">{charts}</div>
</section>
<section id="items">
<h2>Items: listen to each clip beside every variant's answer</h2>
<div class="filters">{filters} <button type="button" id="reset">reset</button></div>
<div class="chips">{chips}</div>
<p class="shown"><strong id="shown-count">{n}</strong> of {n} items match <span id="shown-note"></span></p>
<table id="item-table" style="min-width:{min_width}px">
<colgroup>{colgroup}</colgroup>
<thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p id="empty" hidden>No item matches these filters.</p>
<p id="more" hidden><span id="more-note"></span> <button type="button" id="show-more">show {step} more</button>
<button type="button" id="show-all">show all</button></p>
</section>
</main>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_CSS = """
:root { --right: #1a7f37; --wrong: #c0392b; --line: #d8dee4; --muted: #57606a; --control: #f6f3ea; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; background: #fff; }
nav { position: sticky; top: 0; z-index: 3; background: #24292f; color: #fff; padding: 0 16px; height: 30px; line-height: 30px; }
nav a { color: #fff; }
main { padding: 8px 16px 40px; }
h1 { font-size: 22px; margin: 10px 0; }
h2 { font-size: 17px; display: inline; margin: 0; }
h3 { font-size: 15px; margin: 12px 0 4px; }
details.section { border-top: 1px solid var(--line); padding: 6px 0; }
details.section > summary { cursor: pointer; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; }
table.summary { margin: 8px 0; font-size: 13px; }
table.summary th, table.summary td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
table.summary th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
a.pair { font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
img.chart { max-width: 100%; height: auto; border: 1px solid var(--line); }
figure { margin: 8px 0; }
figcaption { color: var(--muted); font-size: 12px; }
#items { border-top: 2px solid #24292f; margin-top: 12px; padding-top: 8px; }
.filters, .chips { margin: 8px 0; display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
.chips { gap: 6px; }
.chip { border: 1px solid var(--line); border-radius: 14px; background: #f6f8fa; padding: 3px 10px; cursor: pointer; font: inherit; }
.chip.active { background: #0969da; border-color: #0969da; color: #fff; }
.chip .count { color: var(--muted); }
.chip.active .count { color: #dbe9ff; }
.shown { margin: 6px 0; color: var(--muted); }
#item-table { width: 100%; font-size: 13px; table-layout: fixed; }
#item-table th, #item-table td { border-bottom: 1px solid var(--line); padding: 5px 6px; vertical-align: top; text-align: left; }
#item-table thead th { position: sticky; top: 30px; background: #f6f8fa; z-index: 2; border-bottom: 2px solid #afb8c1; }
th.sortable { cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " ▲"; } th.sorted-desc::after { content: " ▼"; }
th .sub { font-weight: normal; color: var(--muted); font-size: 11px; }
th .score { font-weight: normal; font-size: 12px; }
td.clip audio { width: 100%; height: 32px; }
button.play { font: inherit; padding: 4px 12px; border: 1px solid #afb8c1; border-radius: 16px; background: #fff; cursor: pointer; }
button.play:hover { background: #f3f4f6; }
#more { margin: 10px 0; }
td.q, td.ans { overflow-wrap: anywhere; }
.question { font-weight: 600; }
ol.choices { margin: 2px 0; padding-left: 20px; }
ol.choices li.answer { color: var(--right); font-weight: 600; }
.id { color: var(--muted); font-size: 11px; }
td.ans.right .mark { color: var(--right); font-weight: 700; }
td.ans.wrong .mark { color: var(--wrong); font-weight: 700; }
td.ans.wrong { background: #fff5f4; }
th.control, td.control { background: var(--control); border-left: 1px dashed #b7a97a; }
td.ans.wrong.control { background: #f9ece6; }
td.ans details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
td.ans pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0; font-size: 12px; max-height: 240px; overflow: auto; }
.note { color: var(--muted); font-style: italic; }
"""

# Filtering toggles `hidden` on rows rendered once, and shows at most `rows_shown` of the matching ones (in the
# sorted order) until "show more"; sorting re-appends the rows in one fragment; every count comes from the JSON.
# The state lives in the URL hash, so the paired-test links (and a shared link) set a filter.
_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var columns = data.columns, items = data.items, V = columns.length, STEP = data.rows_shown;
  var tbody = document.querySelector("#item-table tbody");
  var rows = Array.prototype.slice.call(tbody.rows);
  var order = rows.map(function (_, i) { return i; });
  var selects = Array.prototype.slice.call(document.querySelectorAll("select[data-filter]"));
  var chips = Array.prototype.slice.call(document.querySelectorAll(".chip"));
  var state = { task: "", sub: "", difficulty: "", outcome: "", sort: "n", dir: 1, limit: STEP };
  var FIELD = { task: 0, sub: 1, difficulty: 2 };

  function scored(item) { return item[5].filter(function (m) { return m === 0 || m === 1; }); }
  function outcomeTest(name) {
    if (!name) return function () { return true; };
    if (name === "disagree") return function (it) { var s = scored(it); return s.indexOf(0) >= 0 && s.indexOf(1) >= 0; };
    if (name === "wrong") return function (it) { var s = scored(it); return s.length > 0 && s.indexOf(1) < 0; };
    if (name === "right") return function (it) { var s = scored(it); return s.length > 0 && s.indexOf(0) < 0; };
    var only = /^only-(\d+)$/.exec(name);
    if (only) {
      var x = +only[1];
      return function (it) {
        return it[5][x] === 1 && it[5].every(function (m, j) { return j === x || m !== 1; });
      };
    }
    var beats = /^beats-(\d+)-(\d+)$/.exec(name);
    if (beats) {
      var a = +beats[1], b = +beats[2];
      return function (it) { return it[5][a] === 1 && it[5][b] === 0; };
    }
    return function () { return false; };
  }
  function facetTest(it) {
    return (!state.task || it[0] === state.task) && (!state.sub || it[1] === state.sub) &&
           (!state.difficulty || it[2] === state.difficulty);
  }

  function apply() {
    var test = outcomeTest(state.outcome), matching = 0, right = new Array(V).fill(0), scoredN = new Array(V).fill(0);
    var inFacet = [];
    for (var k = 0; k < order.length; k++) {
      var i = order[k], it = items[i], facet = facetTest(it), match = facet && test(it);
      if (facet) inFacet.push(it);
      var visible = match && matching < state.limit;
      if (rows[i].hidden === visible) rows[i].hidden = !visible;
      if (!match) continue;
      matching++;
      for (var j = 0; j < V; j++) {
        if (it[5][j] === 0 || it[5][j] === 1) { scoredN[j]++; right[j] += it[5][j]; }
      }
    }
    document.getElementById("shown-count").textContent = matching;
    document.getElementById("empty").hidden = matching > 0;
    var more = matching > state.limit;
    document.getElementById("more").hidden = !more;
    document.getElementById("more-note").textContent = more ? "Showing the first " + state.limit + " of " + matching + "." : "";
    for (var c = 0; c < V; c++) {
      document.getElementById("score-" + c).textContent = scoredN[c]
        ? right[c] + "/" + scoredN[c] + " right (" + (100 * right[c] / scoredN[c]).toFixed(1) + "%)" : "";
    }
    chips.forEach(function (chip) {
      var name = chip.getAttribute("data-outcome"), t = outcomeTest(name);
      chip.classList.toggle("active", name === state.outcome);
      chip.querySelector(".count").textContent = "(" + inFacet.filter(t).length + ")";
    });
    var beats = /^beats-(\d+)-(\d+)$/.exec(state.outcome);
    document.getElementById("shown-note").textContent = beats
      ? "· " + columns[+beats[1]].name + " right, " + columns[+beats[2]].name + " wrong" : "";
    selects.forEach(function (s) { s.value = state[s.getAttribute("data-filter")]; });
  }

  var DIFF = data.difficulties, TASKS = data.tasks;
  function sortKey(i) {
    var it = items[i], key = state.sort;
    if (key === "n") return [i];
    if (key === "question") return [it[4].toLowerCase()];
    if (key === "task") return [TASKS.indexOf(it[0])];
    if (key === "sub") return [it[1].toLowerCase()];
    if (key === "difficulty") { var d = DIFF.indexOf(it[2]); return [d < 0 ? DIFF.length : d]; }
    var j = +key.slice(1), m = it[5][j];
    return [m === 1 ? 0 : m === 0 ? 1 : 2, it[6][j].toLowerCase()];  // right first, then by answer
  }
  function compare(a, b) {
    for (var k = 0; k < a.length; k++) { if (a[k] < b[k]) return -1; if (a[k] > b[k]) return 1; }
    return 0;
  }
  function sort() {
    var keys = rows.map(function (_, i) { return sortKey(i); });
    order.sort(function (a, b) {
      var c = compare(keys[a], keys[b]);
      return c !== 0 ? state.dir * c : a - b;  // ties keep the report's order
    });
    apply();  // which rows are among the first shown depends on the order
    var fragment = document.createDocumentFragment();
    order.forEach(function (i) { fragment.appendChild(rows[i]); });
    tbody.appendChild(fragment);
    document.querySelectorAll("th.sortable").forEach(function (th) {
      var on = th.getAttribute("data-sort") === state.sort;
      th.classList.toggle("sorted-asc", on && state.dir === 1);
      th.classList.toggle("sorted-desc", on && state.dir === -1);
    });
  }

  function writeHash() {
    var parts = [];
    ["outcome", "task", "sub", "difficulty"].forEach(function (k) {
      if (state[k]) parts.push(k + "=" + encodeURIComponent(state[k]));
    });
    var hash = parts.length ? "#" + parts.join("&") : "#items";
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }
  function readHash() {
    var hash = location.hash.slice(1);
    if (!/(^|&)(outcome|task|sub|difficulty)=/.test(hash)) return false;
    state.task = state.sub = state.difficulty = state.outcome = "";
    hash.split("&").forEach(function (part) {
      var eq = part.indexOf("="), k = part.slice(0, eq);
      if (eq > 0 && (k in FIELD || k === "outcome")) state[k] = decodeURIComponent(part.slice(eq + 1));
    });
    state.limit = STEP;
    return true;
  }
  function changed() { state.limit = STEP; writeHash(); apply(); }

  selects.forEach(function (s) {
    s.addEventListener("change", function () { state[s.getAttribute("data-filter")] = s.value; changed(); });
  });
  chips.forEach(function (chip) {
    chip.addEventListener("click", function () { state.outcome = chip.getAttribute("data-outcome"); changed(); });
  });
  document.getElementById("reset").addEventListener("click", function () {
    state.task = state.sub = state.difficulty = state.outcome = ""; changed();
  });
  document.getElementById("show-more").addEventListener("click", function () { state.limit += STEP; apply(); });
  document.getElementById("show-all").addEventListener("click", function () { state.limit = Infinity; apply(); });
  document.querySelectorAll("th.sortable").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-sort");
      state.dir = state.sort === key ? -state.dir : 1;
      state.sort = key;
      sort();
    });
  });
  // A clip's player is made when its button is pressed; one clip plays at a time.
  tbody.addEventListener("click", function (event) {
    var button = event.target.closest("button.play");
    if (!button) return;
    var audio = document.createElement("audio");
    audio.controls = true;
    audio.src = button.getAttribute("data-src");
    button.replaceWith(audio);
    var playing = audio.play();
    if (playing) playing.catch(function () {});  // refused autoplay: the controls are there to press
  });
  document.addEventListener("play", function (event) {
    document.querySelectorAll("audio").forEach(function (a) { if (a !== event.target) a.pause(); });
  }, true);
  window.addEventListener("hashchange", function () {
    if (readHash()) { apply(); document.getElementById("items").scrollIntoView(); }
  });
  var linked = readHash();
  apply();
  if (linked) document.getElementById("items").scrollIntoView();
})();
"""
