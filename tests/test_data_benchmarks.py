"""prepare mmar / mmsu / airbench: real MMAR metadata parsed into samples; MMSU and AIR-Bench from files made
here (their metadata is on Hugging Face only); the predictions infer writes are read by the official rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile as sf

from audio_rft import UserError
from audio_rft.data.benchmarks import (airbench_audio_path, build_airbench, build_mmar, build_mmsu, mmar_sample)
from audio_rft.data.dataset import benchmark_version, load_dataset
from audio_rft.data.mmau_versions import describe
from audio_rft.data.schema import SampleError
from audio_rft.eval.benchmarks import score_records
from audio_rft.eval.infer import prediction_record
from conftest import tone, write_audio
from helpers import synth_data, tiny_model  # noqa: F401 (fixtures)


def _convert_all(records: list[dict], root: Path) -> tuple[list, list[str]]:
    samples, reasons = [], []
    for record in records:
        try:
            item = mmar_sample(record, root)
            item.sample.validate()
            samples.append(item.sample)
        except SampleError as e:
            reasons.append(str(e))
    return samples, reasons


def test_real_mmar_metadata_parses_into_samples(shared_data, tmp_path):
    current = [json.loads(line) for line in (shared_data / "mmar-MMAR-meta.jsonl").read_text().splitlines() if line.strip()]
    samples, reasons = _convert_all(current, tmp_path)
    assert len(samples) == 1000 and reasons == []
    assert sum(len(s.choices) != len(r["choices"]) for s, r in zip(samples, current)) == 4  # an empty option dropped
    assert {s.task for s in samples} == {"sound", "music", "speech", "other"}  # mix-* modalities are `other`
    assert sum(s.benchmark_fields["modality"].startswith("mix-") for s in samples) == 218 + 82 + 24 + 11
    assert sum(s.category == "Semantic Layer" for s in samples) == 412 and len({s.sub_category for s in samples}) == 16
    # the first release: its 6 since-corrected items are rejected where the answer is no option
    first = json.loads((shared_data / "mmar-MMAR-meta-v1.json").read_text())
    samples, reasons = _convert_all(first, tmp_path)
    assert len(samples) == 994 and len(reasons) == 6 and all("is not among the choices" in r for r in reasons)


def test_prepare_mmar_records_the_release_and_its_predictions_score_by_mmar_rule(shared_data, tmp_path):
    records = [json.loads(line) for line in (shared_data / "mmar-MMAR-meta.jsonl").read_text().splitlines()[:4]]
    for record in records:
        write_audio(tmp_path / "audio_root" / record["audio_path"], seconds=0.3)
    src = tmp_path / "MMAR-meta.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = build_mmar(src, tmp_path / "out", audio_dir=tmp_path / "audio_root")
    assert summary["accepted"] == 4
    version = benchmark_version(tmp_path / "out")
    assert version["benchmark"] == "mmar" and version["known"] is False  # a 4-line copy is no known release
    assert "neither known release" in describe(version)
    samples = load_dataset(tmp_path / "out")
    predictions = [prediction_record(s, f"<answer>{s.answer if i % 2 else 'C'}</answer>", 3, "answer")
                   for i, s in enumerate(samples)]
    assert all(p["answer_prediction"] == p["model_prediction"] and p["modality"] == r["modality"]
               for p, r in zip(predictions, records))
    result = score_records([{**p, "_where": f"item {i}"} for i, p in enumerate(predictions)], "mmar")
    assert (result["summary"]["n"], result["summary"]["correct"]) == (4, 2)  # a bare letter is wrong by MMAR's rule


def test_the_known_mmar_releases_are_named(shared_data, tmp_path):
    from audio_rft.data.benchmarks import MMAR_RELEASES
    from audio_rft.fileio import sha256_file

    assert sha256_file(shared_data / "mmar-MMAR-meta.jsonl") in MMAR_RELEASES
    assert "first release" in MMAR_RELEASES[sha256_file(shared_data / "mmar-MMAR-meta-v1.json")]


def _wav_bytes(seconds: float = 0.3) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds), 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _mmsu_row(i: int, **extra) -> dict:
    row = {"id": f"mmsu-{i}", "task_name": "gender_recognition", "question": "Who speaks?", "choice_a": "male",
           "choice_b": "female", "choice_c": "child", "choice_d": "elderly", "answer_gt": "female",
           "category": "perception", "sub-category": "paralinguistics", "sub-sub-category": "speaker traits",
           "linguistics_sub_discipline": "none", "audio_path": f"clips/{i}.wav"}
    row.update(extra)
    return {k: v for k, v in row.items() if v is not None}


def test_prepare_mmsu_from_jsonl_and_the_letter_rule_on_its_predictions(tmp_path):
    for i in range(4):
        write_audio(tmp_path / "clips" / f"{i}.wav", seconds=0.3)
    rows = [_mmsu_row(0), _mmsu_row(1, choice_c="", choice_d=None), _mmsu_row(2, answer_gt="Female"), _mmsu_row(3)]
    src = tmp_path / "mmsu.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = build_mmsu(src, tmp_path / "out")
    assert (summary["accepted"], summary["rejected"]) == (3, 1)
    rejected = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert rejected["id"] == "mmsu-2" and "'Female' equals none of choice_a..choice_d" in rejected["reason"]
    samples = {s.id: s for s in load_dataset(tmp_path / "out")}
    assert samples["mmsu-1"].choices == ["male", "female"] and samples["mmsu-0"].task == "speech"
    responses = {"mmsu-0": "B", "mmsu-1": "female", "mmsu-3": "Answer: B"}
    records = [{**prediction_record(s, responses[s.id], 1, "direct"), "_where": s.id} for s in samples.values()]
    assert records[0]["response"] == "B" and records[0]["choice_b"] == "female" and records[0]["sub-sub-category"]
    result = score_records(records, "mmsu")
    assert [x["verdict"] for x in result["samples"]] == ["correct", "skipped", "wrong"]


def test_prepare_mmsu_from_parquet_with_embedded_audio(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [_mmsu_row(i, audio_path=None) for i in range(2)]
    for row in rows:
        row["audio"] = {"bytes": _wav_bytes(), "path": f"{row['id']}.wav"}
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mmsu.parquet"))
    summary = build_mmsu(tmp_path / "mmsu.parquet", tmp_path / "out")
    assert summary["accepted"] == 2
    assert [s.benchmark_fields["answer_gt"] for s in load_dataset(tmp_path / "out")] == ["female", "female"]


def _air_row(i: int, task: str = "Speaker_Gender_Recognition", **extra) -> dict:
    row = {"uniq_id": i, "path": f"{i}.wav", "question": "Who speaks?", "choice_a": "male", "choice_b": "female",
           "answer_gt": "female", "task_name": task, "dataset_name": "demo"}
    row.update(extra)
    return row


def test_prepare_airbench_finds_audio_by_task_and_dataset(tmp_path):
    root = tmp_path / "Foundation"
    write_audio(root / "Speaker_Gender_Recognition_demo" / "0.wav", seconds=0.3)
    write_audio(root / "Audio_Grounding_demo" / "1.flac", seconds=0.3, format="FLAC")
    write_audio(root / "Music_Genre_Recognition_demo" / "2.wav", seconds=0.3)
    rows = [_air_row(0), _air_row(1, "Audio_Grounding", path="1.wav"), _air_row(2, "Music_Genre_Recognition"),
            _air_row(3), _air_row(4, answer_gt="Female")]
    assert airbench_audio_path(rows[1]) == "Audio_Grounding_demo/1.flac"
    src = root / "Foundation_meta.json"
    src.write_text(json.dumps(rows))
    summary = build_airbench(src, tmp_path / "out")
    assert (summary["accepted"], summary["rejected"]) == (3, 2)
    reasons = sorted(json.loads(line)["reason"] for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())
    assert reasons[0].startswith("audio file not found") and "equals none of choice_a..choice_d" in reasons[1]
    samples = load_dataset(tmp_path / "out")
    assert [(s.id, s.task) for s in samples] == [("0", "speech"), ("1", "sound"), ("2", "music")]
    records = [{**prediction_record(s, "B.", 1, "direct"), "_where": s.id} for s in samples]
    assert records[0]["task_name"] == "Speaker_Gender_Recognition" and records[0]["response"] == "B."
    result = score_records(records, "airbench")
    assert set(result["summary"]["tables"]["task"]) == {"Speaker_Gender_Recognition_demo", "Audio_Grounding_demo",
                                                        "Music_Genre_Recognition_demo"}
    assert result["summary"]["correct"] == 3


@pytest.mark.parametrize("builder, content, message", [
    (build_mmar, "[{\"id\": 1,", "malformed JSON"),
    (build_airbench, "{\"a\": 1}\n{\"b\": 2}\n", "nothing accepted"),
    (build_mmsu, "", "no items"),
])
def test_bad_metadata_files_are_one_line_errors(tmp_path, builder, content, message):
    src = tmp_path / "meta.json"
    src.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        builder(src, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_a_pipeline_eval_on_mmar_data_also_applies_mmars_rule(shared_data, tmp_path, tiny_model):
    import yaml

    from audio_rft.pipeline import load_pipeline
    from audio_rft.runner import run_pipeline

    records = [json.loads(line) for line in (shared_data / "mmar-MMAR-meta.jsonl").read_text().splitlines()[:3]]
    for record in records:
        write_audio(tmp_path / "audio_root" / record["audio_path"], seconds=0.3)
    (tmp_path / "MMAR-meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pipeline = {"name": "mmar", "out": str(tmp_path / "run"), "stages": [
        {"name": "mmar", "kind": "prepare", "config": {"source": "mmar", "input": str(tmp_path / "MMAR-meta.jsonl"),
                                                        "audio_dir": str(tmp_path / "audio_root")}},
        {"name": "eval", "kind": "eval", "config": {"data": "${mmar}", "batch_size": 4, "max_new_tokens": 4, "device": "cpu",
                                                    "dtype": "fp32", "variants": [{"name": "tiny", "model": str(tiny_model)}]}}]}
    path = tmp_path / "mmar.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    run_pipeline(load_pipeline(path))
    own = json.loads((tmp_path / "run" / "eval" / "tiny.mmar.scored.json").read_text())
    assert own["rule"] == "mmar" and own["benchmark_version"]["benchmark"] == "mmar"
    assert own["summary"]["n"] + own["summary"]["skipped"] == 3
