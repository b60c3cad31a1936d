"""What the benchmarks share: the model folder to measure and the one audio question they ask."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_CACHE = "runs/bench-preset"
QUESTION = "How many beeps do you hear?"
CHOICES = ["one", "two", "three", "four"]


def ensure_model(model: str | None, preset: str = "bench") -> Path:
    """The model folder to benchmark: `model` if given, else the preset built once into runs/<preset>-preset."""
    from audio_rft import UserError

    if model:
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"{model}: no config.json (pass a local Qwen2-Audio folder)")
        return Path(model)
    folder = Path(DEFAULT_MODEL_CACHE if preset == "bench" else f"runs/{preset}-preset")
    if not (folder / "config.json").is_file():
        from audio_rft.model import build_tiny_preset

        logger.info("building the %s preset into %s (once)", preset, folder)
        build_tiny_preset(preset, folder)
    return folder


def bench_prompt(processor, seconds: float, seed: int = 0):
    """One audio question: a `seconds`-long clip (beeps in noise) and its Sample."""
    import numpy as np

    from audio_rft.data.schema import Sample

    rng = np.random.default_rng(seed)
    sr = 16_000
    n = int(seconds * sr)
    t = np.arange(n) / sr
    wave = 0.05 * rng.standard_normal(n)
    for start in (0.2, 0.7):
        on = (t >= start) & (t < start + 0.15)
        wave[on] += 0.5 * np.sin(2 * np.pi * 880 * t[on])
    sample = Sample(id="bench-0", audio="bench-0.wav", question=QUESTION, choices=list(CHOICES), answer="two",
                    task="sound", sub_category="beep_count")
    return sample, wave.astype(np.float32)


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None
