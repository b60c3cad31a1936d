"""Logging: one line per event on stderr, rank 0 only unless --verbose, --quiet for warnings and errors,
the level passed on to child processes through AUDIO_RFT_LOG_LEVEL; a command's output stays on stdout."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from audio_rft.cli import main
from audio_rft.log import ENV, setup_logging

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("audio_rft.test")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """setup_logging writes the level into the environment (for child processes): undo it after each test."""
    for name in (ENV, "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield
    setup_logging("info")


def say_all() -> None:
    logger.debug("a detail")
    logger.info("a step")
    logger.warning("a doubt")


def test_levels_and_format(capsys):
    setup_logging()
    say_all()
    captured = capsys.readouterr()
    assert captured.err == "a step\nwarning: a doubt\n" and captured.out == ""
    setup_logging("warning")
    say_all()
    assert capsys.readouterr().err == "warning: a doubt\n"
    setup_logging("debug")
    say_all()
    assert capsys.readouterr().err == "debug: a detail\na step\nwarning: a doubt\n"


def test_other_ranks_say_only_warnings_unless_verbose(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    setup_logging()
    say_all()
    assert capsys.readouterr().err == "[rank 1] warning: a doubt\n"
    setup_logging("debug")
    say_all()
    assert capsys.readouterr().err.splitlines() == ["[rank 1] debug: a detail", "[rank 1] a step",
                                                    "[rank 1] warning: a doubt"]
    monkeypatch.setenv("RANK", "0")
    setup_logging("info")
    say_all()
    assert capsys.readouterr().err == "[rank 0] a step\n[rank 0] warning: a doubt\n"


def test_level_from_the_environment_and_passed_on(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "warning")
    setup_logging()
    say_all()
    assert capsys.readouterr().err == "warning: a doubt\n"
    monkeypatch.setenv(ENV, "nonsense")  # a typo must not stop a run: the default
    setup_logging()
    say_all()
    assert capsys.readouterr().err == "a step\nwarning: a doubt\n"
    setup_logging("debug")
    import os
    assert os.environ[ENV] == "debug"  # what a launched child reads


def test_quiet_and_verbose_are_global_flags(tmp_path, capsys):
    """--quiet silences the log, not the command's output; the flags may stand before or after the command."""
    import os

    folder = tmp_path / "missing"
    with pytest.raises(SystemExit) as exited:
        main(["--quiet", "validate", str(folder)])
    assert exited.value.code == 2 and os.environ[ENV] == "warning"
    with pytest.raises(SystemExit):
        main(["validate", str(folder), "--verbose"])
    assert os.environ[ENV] == "debug"
    assert capsys.readouterr().err.count("error:") == 2  # the failed command's line shows at every level


def test_a_child_process_inherits_the_level(tmp_path):
    code = ("import logging; from audio_rft.log import setup_logging; setup_logging(); "
            "logging.getLogger('audio_rft.x').info('child info'); logging.getLogger('audio_rft.x').warning('child warn')")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), ENV: "warning"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert done.stderr == "warning: child warn\n"
