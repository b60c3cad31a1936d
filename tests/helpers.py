"""Shared builders and session fixtures for the model-layer and training tests.

Import the fixtures explicitly, with the fixtures they depend on (`from helpers import synth_data,
tiny_model`): pytest registers a fixture imported into a test module, but once per module, so the
builders below cache their results in this module and each is built once per session: a small
synthetic bench (48 train / 24 test items) and the tiny preset (tokenizer trained on its prompts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_CLIP = ROOT.parent / "shared" / "data" / "mmau-test-mini-3fe64f3d-282c-4bc8-a753-68f8f6c35652.wav"
NO_SHARED = "../shared is absent (a user's clone has none)"

# A reward plugin whose value varies with the completion text, so that even an untrained model's groups
# have unequal rewards and GRPO steps move the weights (accuracy alone is 0 for every random completion).
PLUGIN_SOURCE = '''
import zlib


def variety(completions, samples, **_):
    """Distinct characters / 10: different for almost every random completion."""
    return [len(set(c)) / 10.0 for c in completions]


def half(completions, samples, **_):
    """variety for about half the questions (by id), 0 for the others: their groups have nothing to learn."""
    return [len(set(c)) / 10.0 if zlib.crc32(s.id.encode()) % 2 else 0.0 for c, s in zip(completions, samples)]
'''
PLUGIN = "rft_test_rewards:variety"
HALF_PLUGIN = "rft_test_rewards:half"

_BUILT: dict[str, Path] = {}


def _once(key: str, build) -> Path:
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A synthetic bench: <root>/train (48 items) and <root>/test (24 items)."""
    from audio_rft.data.synth import build_synth

    def build() -> Path:
        root = tmp_path_factory.mktemp("synth")
        build_synth(root, 48, 24, seed=0)
        return root

    return _once("synth", build)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, synth_data) -> Path:
    """The tiny preset (random weights, tokenizer trained on the bench's prompts), built once."""
    from audio_rft.model import build_tiny_preset

    return _once("tiny", lambda: build_tiny_preset("tiny", tmp_path_factory.mktemp("models") / "tiny",
                                                   [synth_data / "train"], seed=0))


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> Path:
    """A folder holding the `rft_test_rewards` module; put it on sys.path (monkeypatch) or PYTHONPATH."""
    def build() -> Path:
        folder = tmp_path_factory.mktemp("plugin")
        (folder / "rft_test_rewards.py").write_text(PLUGIN_SOURCE)
        return folder

    return _once("plugin", build)


@pytest.fixture
def with_plugin(plugin_dir, monkeypatch) -> str:
    monkeypatch.syspath_prepend(str(plugin_dir))
    return PLUGIN


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread for a module (restored after): the tiny model gains nothing from more, and on a
    busy 2-core machine OpenMP threads waiting on each other make steps many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_clip() -> Path:
    if not SHARED_CLIP.is_file():
        pytest.skip(NO_SHARED)
    return SHARED_CLIP


def load_tiny(folder: Path, adapter: Path | None = None):
    """Processor and model on CPU in fp32 (a fresh copy each call: tests may change it)."""
    from audio_rft.model import load_model

    loaded = load_model(folder, adapter, dtype="fp32", device="cpu")
    return loaded.processor, loaded.model.eval()


def samples_of(folder: Path, n: int | None = None, ids: list[int] | None = None):
    from audio_rft.data.dataset import load_dataset

    samples = load_dataset(folder)
    return [samples[i] for i in ids] if ids is not None else samples[:n]


def prompt_batch(processor, folder: Path, samples, mode: str = "answer"):
    from audio_rft.rollout import encode_prompts, load_waveforms

    return encode_prompts(processor, samples, load_waveforms(folder, samples), mode)


def perturb_lora(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give every LoRA matrix random values so the adapter changes the outputs (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


TIMING_KEYS = ("step_seconds", "tokens_per_second")


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS and not k.startswith("time/")}


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), f"{key}: max diff {(a[key] - b[key]).abs().max()}"


def assert_same_weights_but_adam_noise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> None:
    """Equal to 1e-5, except at most 1 element in 1,000, which stays within lr: where an element's true gradient
    is 0, what is computed is summation-order noise (~1e-9) that differs between 1 and 2 processes, and Adam
    divides it by eps (1e-8), moving that element by a fraction of lr either way."""
    assert_same_weights(a, b, atol=lr)
    apart = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert apart <= max(1, sum(t.numel() for t in a.values()) // 1000), f"{apart} elements differ by more than 1e-5"


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None, launcher: list[str] | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m audio_rft ARGS` in a subprocess, offline, one thread; fails the test with its stderr."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    command = (launcher or [sys.executable]) + ["-m", "audio_rft", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    return done
