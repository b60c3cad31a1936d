"""Logging for the `audio-rft` commands: one line per event on stderr, from rank 0 only unless asked.

Modules log with `logging.getLogger(__name__)`; `setup_logging` (called once per command by cli.main)
configures the `audio_rft` logger. What a command produces (a table, a path, a summary) is printed to
stdout instead, so it can be piped; logs are what is said along the way.

The level travels to child processes (the pipeline's `launch:` lines, torchrun's workers) through the
environment variable AUDIO_RFT_LOG_LEVEL, which `setup_logging` sets whenever it is given a level.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "AUDIO_RFT_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _rank() -> int:
    """This process's rank as torchrun / accelerate / deepspeed set it (0 when not launched by one)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class _RankFilter(logging.Filter):
    """Other ranks repeat rank 0's progress: they say only warnings and errors, unless every rank was asked
    for (--verbose). The rank is read once, when the filter is made."""

    def __init__(self, every_rank: bool):
        super().__init__()
        self.rank = _rank()
        self.quiet_rank = self.rank != 0 and not every_rank
        self.prefix = f"[rank {self.rank}] " if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return not (self.quiet_rank and record.levelno < logging.WARNING)


class _Formatter(logging.Formatter):
    """`message` for information; `warning: message`, `error: message`, `debug: message` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        text = getattr(record, "rank_prefix", "") + kind + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each event, not as it was at setup (pytest and tools swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str | None = None) -> None:
    """Configure the `audio_rft` logger: `level` (debug, info, warning, error), else $AUDIO_RFT_LOG_LEVEL,
    else info. Debug logs from every rank. Calling it again replaces the previous setup."""
    if level is not None:
        os.environ[ENV] = level  # so that the processes this one starts log alike
    name = (level or os.environ.get(ENV) or "info").lower()
    if name not in LEVELS:
        name = "info"  # a mistyped environment variable must not stop a training run
    logger = logging.getLogger("audio_rft")
    for handler in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Formatter())
    handler.addFilter(_RankFilter(every_rank=LEVELS[name] <= logging.DEBUG))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[name])
    logger.propagate = False  # one line per event, even when the root logger has handlers of its own
