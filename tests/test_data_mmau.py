"""MMAU builder: the shared test-mini metadata with its one shared clip, withheld answers, duplicate choices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import soundfile as sf

from audio_rft.data.mmau import build_mmau
from conftest import MMAU_CLIP_ID, write_audio


def mmau_item(id: str, **extra) -> dict:
    record = {"id": id, "audio_id": f"./test-mini-audios/{id}.wav", "question": "Who speaks?",
              "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Man", "dataset": "AudioSet", "task": "sound",
              "split": "test", "category": "Reasoning", "sub-category": "Acoustic Source Inference",
              "difficulty": "medium"}
    record.update(extra)
    return {k: v for k, v in record.items() if v is not None}


def test_shared_test_mini_gives_one_accepted_and_999_missing(shared_data, tmp_path):
    (tmp_path / "test-mini-audios").mkdir()
    shutil.copy(shared_data / f"mmau-test-mini-{MMAU_CLIP_ID}.wav", tmp_path / "test-mini-audios" / f"{MMAU_CLIP_ID}.wav")
    summary = build_mmau(shared_data / "mmau-test-mini.json", tmp_path / "out", audio_dir=tmp_path)
    assert (summary["accepted"], summary["rejected"]) == (1, 999)
    assert summary["rejected_by_reason"] == {"audio file not found": 999}
    (sample,) = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert sample["id"] == MMAU_CLIP_ID and sample["task"] == "sound" and sample["answer"] == "Man"
    assert sample["sub_category"] == "Acoustic Source Inference" and sample["split"] == "test-mini"
    info = sf.info(str(tmp_path / "out" / sample["audio"]))
    assert (info.samplerate, info.channels, info.frames) == (16_000, 1, 160_000)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert all(r["id"] in r["reason"] and r["reason"].endswith(".wav") for r in rejected)
    assert rejected[0]["where"].startswith("index ")


def test_withheld_answers_kept_as_unanswered_and_duplicate_choices_dropped(tmp_path):
    for id in ("a", "b", "c"):
        write_audio(tmp_path / "test-mini-audios" / f"{id}.wav")
    items = [mmau_item("a"), mmau_item("b", answer=None), mmau_item("c", choices=["one", "two", "two", "three"], answer="two")]
    src = tmp_path / "mmau-test.json"
    src.write_text(json.dumps(items, indent=2))
    summary = build_mmau(src, tmp_path / "out", audio_dir=tmp_path)
    assert (summary["accepted"], summary["unanswered"]) == (3, 1)
    samples = {s["id"]: s for s in map(json.loads, (tmp_path / "out" / "data.jsonl").read_text().splitlines())}
    assert samples["b"]["answer"] is None
    assert samples["c"]["choices"] == ["one", "two", "three"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["unanswered"] == 1 and manifest["notes"] == {"duplicate choices dropped": ["c"]}


def test_audio_dir_may_be_the_audio_folder_itself(tmp_path):
    write_audio(tmp_path / "audios" / "a.wav")
    src = tmp_path / "mmau.json"
    src.write_text(json.dumps([mmau_item("a")]))
    assert build_mmau(src, tmp_path / "out", audio_dir=tmp_path / "audios")["accepted"] == 1


def test_bad_mmau_items_rejected(tmp_path):
    for id in ("a", "b", "c", "d"):
        write_audio(tmp_path / "test-mini-audios" / f"{id}.wav")
    items = [mmau_item("a"), mmau_item("b", task="noise"), mmau_item("c", answer="Alien"), mmau_item("d", question=""),
             mmau_item("a")]
    src = tmp_path / "mmau.json"
    src.write_text(json.dumps(items))
    summary = build_mmau(src, tmp_path / "out", audio_dir=tmp_path)
    assert summary["accepted"] == 1
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r.split(":")[0] for r in reasons] == ["field 'task'", "field 'answer'", "field 'question'", "duplicate id (first one kept)"]


# ---------------------------------------------------------------- versions of the metadata file

def test_both_shared_files_are_known_versions_and_their_recorded_differences_hold(shared_data):
    from audio_rft.data.mmau_versions import DIFFERENCES, PAPER_VERSION, compare_items, file_version

    today, paper = file_version(shared_data / "mmau-test-mini.json"), file_version(shared_data / "mmau-test-mini-2025-01-28.json")
    assert (today["known"], today["commit"], today["latest"]) == (True, "f0a4a97d2b56", True)
    assert (paper["known"], paper["commit"], paper["date"]) == (True, PAPER_VERSION, "2025-01-28")
    old = json.loads((shared_data / "mmau-test-mini-2025-01-28.json").read_text())
    new = json.loads((shared_data / "mmau-test-mini.json").read_text())
    assert compare_items(old, new) == DIFFERENCES[(PAPER_VERSION, "f0a4a97d2b56")]


def test_version_table_matches_the_list_of_versions(shared_data):
    import csv

    from audio_rft.data.mmau_versions import VERSIONS

    with open(shared_data / "mmau-test-mini-versions.csv", newline="") as f:
        rows = [(r["commit"], r["date"], r["sha256"], int(r["items"])) for r in csv.DictReader(f)]
    assert tuple(rows) == VERSIONS


def test_prepare_records_the_version_and_an_edited_file_is_unknown(tmp_path):
    from audio_rft.data.dataset import benchmark_version
    from audio_rft.data.mmau_versions import describe

    write_audio(tmp_path / "test-mini-audios" / "a.wav")
    src = tmp_path / "mmau.json"
    src.write_text(json.dumps([mmau_item("a")]))
    build_mmau(src, tmp_path / "out", audio_dir=tmp_path)
    version = benchmark_version(tmp_path / "out")
    assert version["benchmark"] == "mmau-test-mini" and version["known"] is False and version["commit"] is None
    assert "not in the table of known versions" in describe(version)


def test_prepare_of_the_shared_file_names_its_commit(shared_data, tmp_path):
    from audio_rft.data.dataset import benchmark_version
    from audio_rft.data.mmau_versions import describe, paper_line

    (tmp_path / "test-mini-audios").mkdir()
    shutil.copy(shared_data / f"mmau-test-mini-{MMAU_CLIP_ID}.wav", tmp_path / "test-mini-audios" / f"{MMAU_CLIP_ID}.wav")
    build_mmau(shared_data / "mmau-test-mini.json", tmp_path / "out", audio_dir=tmp_path)
    version = benchmark_version(tmp_path / "out")
    assert (version["known"], version["commit"], version["date"]) == (True, "f0a4a97d2b56", "2025-08-09")
    assert describe(version) == "MMAU test-mini f0a4a97d2b56 (2025-08-09, the newest known)"
    line = paper_line(version)
    assert "a5cd89afa3f5 (2025-01-28)" in line and "364 of 1,000 items differ" in line and "106 ids replaced" in line
    assert "same file" in paper_line({**version, "commit": "a5cd89afa3f5"})
    assert "not recorded" in paper_line({**version, "commit": "1f675a9ae84f"})
