"""The known versions of MMAU's test-mini metadata file, named by the file's sha256.

`mmau-test-mini.json` changed 17 times in the MMAU repository (github.com/Sakshi113/MMAU) between 2024-10-23
and 2025-08-09, ids replaced and answers corrected along the way, so two runs "on MMAU test-mini" may have
scored different questions. `prepare mmau` records which of these versions it read (or that its hash is
unknown); infer, score and the report carry it, and a report that shows a paper's table says which version
the paper was scored on beside the one the run used.

The table was computed from the repository's git history: for each commit that changed the file, its date,
the sha256 of the file and its item count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audio_rft.fileio import sha256_file

# (commit, date, sha256, items), newest first
VERSIONS: tuple[tuple[str, str, str, int], ...] = (
    ("f0a4a97d2b56", "2025-08-09", "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c", 1000),
    ("82f34fd05a5a", "2025-06-23", "3940399a013d5f6d528ad4f5d1701cce29cdb5b19ccd4e6ab2800e0665dd6ac9", 1000),
    ("b070fb3461be", "2025-06-23", "5c63fe8f2de12e848be146e48436567c2022fe84ea0012da560003c30a24b2b7", 1000),
    ("0a30c303361d", "2025-05-30", "0bbabee60dcbd76815948394ac2dd31c41d18ab1215fe6fd6f93e0e510f78d7a", 1000),
    ("8415fc1f8acc", "2025-05-24", "e0042de8b99492539b0a17997b6c12fff90a6d42a47ad5fd8801c80dcb52b405", 1000),
    ("65c057476cba", "2025-05-22", "157f1968a686c9e7ffb3669e13296349af72afe78af19c049e5d459ccb59d402", 1000),
    ("8f62d71774d5", "2025-05-19", "cc59d9e3fad1a675f311f341b53b05079b94e735e5bc8992ac881ebeda2976f5", 1000),
    ("77fbb8918bf2", "2025-05-18", "cafecebbb4e48b9eb83fd88916911a853245379812e08f118984510340b2dc5b", 1000),
    ("2dcf44d3de17", "2025-05-16", "ea9f3f53085a2dfcf9ea7f5b2fca76a6634cd212af084bbb4cd8bf22c8903537", 1000),
    ("f2017e3698d7", "2025-05-16", "9da96f00e43890adfbac3628b7b0dab3a32a6d6ec2d0a800b892ee261d35b818", 1000),
    ("6674fa13f953", "2025-05-15", "d35ec10bc3097fc605661b0eed00a487da74a6e7d9e23736567312c632347400", 1000),
    ("1f675a9ae84f", "2025-03-25", "e8cc09223b497191781756212cb616315690aaa6ea7ac359db1b65d97d1e2433", 1000),
    ("a5cd89afa3f5", "2025-01-28", "ed2fd6b6c24ebec1a5a496de5d767e7ebfe79556044d8f0d8bd00ad0cf02d623", 1000),
    ("a8d61f7590c3", "2024-12-09", "850c2794664d53c1f7e7e2bcf35744b9ab4e60debad2156d67efd6956220affa", 1000),
    ("26d93426418e", "2024-10-29", "1b6d31d0b70c2944a064a5de0147435427af0bcd3167eff175daa8bd5321e9d3", 1000),
    ("78fe032d9c4d", "2024-10-25", "a5006730ccb3fbf1fc72016774413b9b4a596bb00ce8f37796d9d30979b46192", 1000),
    ("1c6af99b880e", "2024-10-23", "bef649e4bdeb436779a929ccdb9caa3f5144899bd087fc05e23065268ba888cc", 1000),
)

# R1-AQA's paper (2025-03-14) does not name its file; a5cd89a (2025-01-28) is the version that was current then.
PAPER_VERSION = "a5cd89afa3f5"

# Item differences between two versions, where both files were compared item by item (compare_items):
# (older commit, newer commit) -> counts. Other pairs are not recorded: the report then says so.
DIFFERENCES: dict[tuple[str, str], dict[str, int]] = {
    ("a5cd89afa3f5", "f0a4a97d2b56"): {"ids_replaced": 106, "shared": 894, "answer": 210, "question": 218,
                                       "choices": 164, "items_differ": 364},
}


def version_of(sha256: str | None) -> dict[str, Any]:
    """{"sha256", "known", "commit", "date", "items", "latest"} for a file hash; known False when the table lacks it."""
    for i, (commit, date, digest, items) in enumerate(VERSIONS):
        if digest == sha256:
            return {"sha256": sha256, "known": True, "commit": commit, "date": date, "items": items, "latest": i == 0}
    return {"sha256": sha256, "known": False, "commit": None, "date": None, "items": None, "latest": False}


def file_version(path: str | Path) -> dict[str, Any]:
    return version_of(sha256_file(Path(path)))


def describe(version: dict[str, Any] | None) -> str:
    """One phrase for what a run was scored on: "MMAU test-mini a5cd89afa3f5 (2025-01-28)", an unknown hash, or
    another dataset by its builder and content hash (dataset.benchmark_version)."""
    if not version:
        return "a dataset of unknown version (its predictions carry no benchmark_version)"
    content = f"content sha256 {str(version.get('content_sha256'))[:12]}…" if version.get("content_sha256") else ""
    if version.get("benchmark") is None:
        if version.get("builder") == "synth":
            return f"audio-rft's synthetic bench (generator {version.get('generator')}, seed {version.get('seed')}; {content})"
        return f"a {version.get('builder')} dataset, not a benchmark file of known version ({content})"
    if version["benchmark"] != "mmau-test-mini":
        name, digest = version["benchmark"], str(version.get("sha256"))[:12]
        if version.get("known"):
            return f"{name} {version.get('release')}"
        if name == "mmar":
            return f"an MMAR metadata file that is neither known release (sha256 {digest}…)"
        return f"{name} metadata with sha256 {digest}… (no table of its releases is kept)"
    if not version.get("known"):
        return f"an MMAU test-mini file not in the table of known versions (sha256 {str(version.get('sha256'))[:12]}…)"
    return f"MMAU test-mini {version['commit']} ({version['date']}{', the newest known' if version.get('latest') else ''})"


def differences(commit_a: str | None, commit_b: str | None) -> dict[str, int] | None:
    """The recorded item differences between two versions (either order); {"items_differ": 0} for the same one."""
    if commit_a is None or commit_b is None:
        return None
    if commit_a == commit_b:
        return {"ids_replaced": 0, "items_differ": 0}
    return DIFFERENCES.get((commit_a, commit_b)) or DIFFERENCES.get((commit_b, commit_a))


def compare_items(items_a: list[dict], items_b: list[dict]) -> dict[str, int]:
    """How two MMAU files differ in what is scored: ids in one only, and, over the shared ids, items whose
    answer, question or choices differ; `items_differ` counts an item once (replaced, or any of the three)."""
    a = {r["id"]: r for r in items_a}
    b = {r["id"]: r for r in items_b}
    shared = a.keys() & b.keys()
    changed = {field: sum(a[i].get(field) != b[i].get(field) for i in shared) for field in ("answer", "question", "choices")}
    any_changed = sum(any(a[i].get(f) != b[i].get(f) for f in ("answer", "question", "choices")) for i in shared)
    replaced = len(a.keys() - b.keys())
    return {"ids_replaced": replaced, "shared": len(shared), **changed, "items_differ": replaced + any_changed}


def paper_line(run_version: dict[str, Any] | None, paper_commit: str = PAPER_VERSION) -> str:
    """The report's one line: which version the paper was scored on, which this run used, how many items differ."""
    paper = next((v for v in VERSIONS if v[0] == paper_commit), None)
    paper_text = f"MMAU test-mini {paper_commit} ({paper[1]})" if paper else f"MMAU test-mini {paper_commit}"
    line = f"Versions: the paper was scored on {paper_text} (the file current when it appeared); this run on {describe(run_version)}"
    diff = differences(paper_commit, (run_version or {}).get("commit"))
    if diff is None:
        return line + "; how many items differ between them is not recorded, so compare with care."
    if not diff["items_differ"]:
        return line + ": the same file."
    return (line + f": {diff['items_differ']} of 1,000 items differ ({diff['ids_replaced']} ids replaced; of the "
            f"{diff['shared']} shared, {diff['answer']} answers and {diff['question']} questions changed), so the "
            f"numbers are not directly comparable.")
