"""One command-line dialect: `--config FILE key=value` over a dataclass, flag spellings read as key=value,
defaults declared once (prepare, infer, the training commands, the eval stage's shared keys)."""

from __future__ import annotations

import dataclasses

import pytest

from audio_rft import UserError
from audio_rft.config import option, parse_command


@dataclasses.dataclass
class Toy:
    model: str = option("", "model")
    batch_size: int = option(16, "batch")
    ablate_audio: bool = option(False, "silence")
    limit: int | None = option(None, "first N")


def test_flags_are_key_value(tmp_path):
    config, _ = parse_command(Toy, ["--model", "m", "--batch-size=4", "--ablate-audio", "limit=3"], "toy")
    assert config == Toy("m", 4, True, 3)
    config, _ = parse_command(Toy, ["--ablate-audio", "false", "model=m"], "toy")
    assert config.ablate_audio is False and config.model == "m"
    file = tmp_path / "toy.yaml"
    file.write_text("model: from-file\nbatch_size: 2\n")
    config, _ = parse_command(Toy, ["batch_size=8", "--config", str(file)], "toy")  # key=value beats the file
    assert (config.model, config.batch_size) == ("from-file", 8)
    with pytest.raises(UserError, match="expected key=value"):
        parse_command(Toy, ["stray"], "toy")
    with pytest.raises(UserError, match="unknown key 'nope'"):
        parse_command(Toy, ["nope=1"], "toy")
    config, _ = parse_command(Toy, ["here", "--limit", "2"], "toy", positional="model")
    assert (config.model, config.limit) == ("here", 2)


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_command(Toy, ["--help"], "toy")
    text = capsys.readouterr().out
    assert "model=''" in text and "batch_size=16" in text and "limit=None" in text


def test_prepare_keeps_its_flag_spellings():
    from audio_rft.data.prepare import _parse

    config, args = _parse("jsonl", ["my.jsonl", "--field", "question=q", "--out", "o", "--answer-index",
                                    "--index-base", "1", "--strict"])
    assert (config.source, config.input, config.out, config.fields) == ("jsonl", "my.jsonl", "o", {"question": "q"})
    assert config.answer_index and config.index_base == 1 and args.strict
    config, _ = _parse("synth", ["--out", "s", "--train", "48", "--test", "24", "--seed", "3"])
    assert (config.train, config.test, config.seed) == (48, 24, 3)
    with pytest.raises(UserError, match="not one of its keys"):
        _parse("synth", ["--out", "s", "--audio-dir", "x"])


def test_eval_stage_takes_every_infer_key_with_infer_defaults():
    pytest.importorskip("torch")
    from audio_rft.eval.infer import InferConfig
    from audio_rft.pipeline import eval_config

    infer = {f.name: f for f in dataclasses.fields(InferConfig)}
    shared = {f.name: f for f in dataclasses.fields(eval_config())}
    assert set(shared) == set(infer) - {"out"} | {"variants"}
    assert all(shared[k].default == infer[k].default for k in infer if k != "out")
