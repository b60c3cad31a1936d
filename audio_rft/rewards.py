"""Rewards are plain functions with one signature, kept in one registry (as open-r1 does):

    reward(completions: list[str], samples: list[Sample], **options) -> list[float]

A user's own reward is named `pkg.module:function` in the config and imported only then.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from audio_rft.answers import completion_correct, follows_format
from audio_rft.data.schema import Sample

RewardFn = Callable[..., list[float]]


def accuracy(completions: list[str], samples: list[Sample], rule: str = "exact", **_: object) -> list[float]:
    """1.0 when the completion's answer is the right choice: rule `exact` is R1-AQA's (the first `<answer>`,
    case-sensitive equality), `mmau` the benchmark's token rule on the last `<answer>` (answers.completion_correct)."""
    return [
        float(s.answer is not None and completion_correct(c, s.answer, s.choices, rule))
        for c, s in zip(completions, samples)
    ]


def format(completions: list[str], samples: list[Sample], mode: str = "answer", **_: object) -> list[float]:  # noqa: A001
    """1.0 when the completion is exactly the prompt mode's tag layout."""
    return [float(follows_format(c, mode)) for c in completions]


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy, "format": format}


def get_reward(name: str, **options: object) -> RewardFn:
    """A registered reward, or `pkg.module:function` imported now; options are bound as keywords."""
    if name in REWARDS:
        fn = REWARDS[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward plugin {name!r} could not be loaded: {e}") from None
        if not callable(fn):
            raise ValueError(f"reward plugin {name!r} is not callable")
    else:
        raise ValueError(f"unknown reward {name!r}: built in are {', '.join(REWARDS)}, or name pkg.module:function")
    return functools.partial(fn, **options) if options else fn
