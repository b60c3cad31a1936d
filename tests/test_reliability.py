"""Reliability: kill a command with SIGKILL and rerun it; training guards; failed checkpoint writes; OOM.

The kill tests start `python -m audio_rft ...` as a real process, watch the file system every few
milliseconds, and SIGKILL it at a chosen point (before the first checkpoint, while a checkpoint is being
written, after the last step). Rerunning the same command must finish, and what it leaves must equal an
uninterrupted run's: every file of a prepared dataset byte for byte, the final adapter's tensors
(torch.equal on CPU), every logged loss and completion, and the predictions file byte for byte. That
equality is what shows that data order, RNG and optimizer state are restored on resume.

Whether a kill lands exactly inside a checkpoint write depends on timing; wherever it lands, no
checkpoint folder may look whole unless it is, and the half checkpoint case is also built by hand
(a complete checkpoint copied, then a file cut or its marker removed) so it is checked every run.

The default set covers each command with one kill-and-rerun chain; the longer chains with every kill
point are marked slow (`pytest -m slow tests/test_reliability.py`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from audio_rft import UserError
from audio_rft.config import build_config
from audio_rft.train.common import COMPLETE, checkpoint_dirs, is_complete, latest_checkpoint, oom_advice

REPO = Path(__file__).resolve().parents[1]
# Nothing may be fetched: the subprocesses run offline, on one thread (so their numbers match in-process runs).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
ENV.pop("AUDIO_RFT_DEBUG", None)

# A GRPO reward plugin with varied values, so advantages are non-zero and the weights really move
# (accuracy and format are all zero for a random tiny model, which would make equality trivial).
PLUGIN = '''
def varied(completions, samples, **_):
    return [(sum(map(ord, c)) % 7) / 6.0 for c in completions]
'''

SFT_ARGS = ["max_steps=6", "save_every=2", "batch_size=4", "threads=1", "report_to=[]", "seed=0"]
GRPO_ARGS = ["max_steps=4", "save_every=2", "batch_size=4", "grad_accum=1", "num_generations=4",
             "max_completion_length=8", "threads=1", "report_to=[]", "seed=0", "log_completions_every=1",
             "rewards=[accuracy,format,rel_plugin:varied]", "lr=1e-3"]
INFER_ARGS = ["--batch-size", "8", "--max-new-tokens", "8"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "audio_rft", *args]


def env_with(plugin_dir: Path | None = None) -> dict[str, str]:
    env = dict(ENV)
    if plugin_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_to_end(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def run_and_kill(args: list[str], cwd: Path, env: dict[str, str], when: Callable[[], str | None],
                 poll: float = 0.002, timeout: float = 600) -> str:
    """Start the command, call `when()` every `poll` seconds, SIGKILL the process as soon as it names a
    point; return that name. Fails if the command ends on its own first."""
    log = cwd / f"killed-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        began = time.monotonic()
        try:
            while proc.poll() is None:
                point = when()
                if point:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return point
                if time.monotonic() - began > timeout:
                    raise AssertionError(f"{args}: kill point never reached in {timeout} s")
                time.sleep(poll)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    raise AssertionError(f"{args} ended (exit {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")


def listing(root: Path) -> set[str]:
    """Every file and folder under root, hidden ones included (leftover temporaries count)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def training_state(checkpoint: Path) -> dict:
    """A checkpoint's training state (torch.distributed.checkpoint format), flattened to dotted keys."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}-state.pt"
    dcp_to_torch_save(checkpoint / "training_state" / "dcp", target)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(f"{prefix}.{i}", inner)
        else:
            flat[prefix] = value

    walk("", torch.load(target, weights_only=False))
    target.unlink()
    return flat


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def same_numbers(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert ra[key] == rb[key], f"step {ra['step']}: {key} {ra[key]} != {rb[key]} (resumed vs uninterrupted)"


def entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


# kill points for training: each returns the point's name once reached, else None
def before_first_checkpoint(out: Path) -> Callable[[], str | None]:
    def when():
        if last_step(out) >= 1:
            names = entries(out)
            assert not any(n.startswith("checkpoint-") for n in names), "too slow: a checkpoint already exists"
            return "before the first checkpoint"
        return None
    return when


def mid_save(out: Path, step: int) -> Callable[[], str | None]:
    def when():
        names = entries(out)
        if any(n.startswith(f".checkpoint-{step}.") and n.endswith(".tmp") for n in names):
            return f"while checkpoint-{step} was being written"
        if f"checkpoint-{step}" in names:
            return f"just after checkpoint-{step} was written"
        return None
    return when


def after_last_step(out: Path, steps: int) -> Callable[[], str | None]:
    def when():
        names = entries(out)
        if any(n.startswith(".final.") and n.endswith(".tmp") for n in names):
            return "while final/ was being written"
        if last_step(out) >= steps:
            return "after the last step, before final/"
        return None
    return when


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def plant_half_checkpoints(out: Path, whole: Path, steps: int) -> list[Path]:
    """Copies of a complete checkpoint numbered past it, one with a weight file cut short, one without its
    marker, one with a flipped byte: exactly what a crash without atomic writes would leave."""
    planted = []
    # odd numbers: with save_every=2 the run never writes these itself
    for n, damage in zip(range(steps - 1, 0, -2), ("truncate", "no-marker", "flip")):
        half = out / f"checkpoint-{n}"
        shutil.copytree(whole, half)
        weights = half / "adapter_model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "no-marker":
            (half / COMPLETE).unlink()
        else:
            flip_byte(half / "training_state" / "dcp" / "__0_0.distcp")
        planted.append(half)
    return planted


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic dataset (the prepare reference), the tiny preset, and a reward plugin folder."""
    from audio_rft.model import build_tiny_preset

    root = tmp_path_factory.mktemp("reliability")
    run_to_end(cli("prepare", "synth", "--out", "D", "--train", "48", "--test", "24", "--seed", "0"), root, ENV)
    build_tiny_preset("tiny", root / "M")
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "rel_plugin.py").write_text(PLUGIN)
    return {"root": root, "data": root / "D", "model": root / "M", "plugins": plugins}


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sft_config(base, out: Path, *extra: str):
    from audio_rft.config import parse_overrides
    from audio_rft.train.sft import SFTConfig

    args = [f"model={base['model']}", f"data={base['data'] / 'train'}", f"out={out}", *SFT_ARGS, *extra]
    return build_config(SFTConfig, {}, parse_overrides(args))


def grpo_config(base, out: Path, *extra: str):
    from audio_rft.config import parse_overrides
    from audio_rft.train.grpo import GRPOConfig

    args = [f"model={base['model']}", f"data={base['data'] / 'train'}", f"out={out}", *GRPO_ARGS, *extra]
    return build_config(GRPOConfig, {}, parse_overrides(args))


@pytest.fixture(scope="module")
def sft_reference(base, one_thread) -> Path:
    """An uninterrupted SFT run (in this process: the same entry function the CLI calls)."""
    from audio_rft.train.sft import train_sft

    out = base["root"] / "ref-sft"
    train_sft(sft_config(base, out))
    return out


@pytest.fixture(scope="module")
def grpo_reference(base, one_thread) -> Path:
    from audio_rft.train.grpo import train_grpo

    sys.path.insert(0, str(base["plugins"]))
    try:
        out = base["root"] / "ref-grpo"
        train_grpo(grpo_config(base, out))
    finally:
        sys.path.remove(str(base["plugins"]))
        sys.modules.pop("rel_plugin", None)
    return out


@pytest.fixture(scope="module")
def infer_reference(base, one_thread) -> Path:
    from audio_rft.eval.infer import InferConfig, run_inference

    out = base["root"] / "ref-pred" / "P.json"
    run_inference(InferConfig(model=str(base["model"]), data=str(base["data"] / "test"), out=str(out),
                              batch_size=8, max_new_tokens=8))
    return out


# ---------------------------------------------------------------- prepare


def test_prepare_killed_mid_write_reruns_to_identical_bytes(base, tmp_path):
    reference = base["data"]
    out = tmp_path / "D"
    args = cli("prepare", "synth", "--out", str(out), "--train", "48", "--test", "24", "--seed", "0")

    def writing(split: str) -> Callable[[], str | None]:
        def when():
            temps = [n for n in entries(out) if n.startswith(f".{split}.") and n.endswith(".tmp")]
            if temps and len(entries(out / temps[0] / "audio")) >= 5:
                return f"while {split}/ was being written"
            return None
        return when

    # 1. killed while writing train/: nothing that looks prepared is left.
    run_and_kill(args, tmp_path, ENV, writing("train"))
    assert not (out / "train").exists() and not (out / "test").exists()
    # 2. killed while writing test/: train/ is whole (valid, hash matches), test/ absent.
    run_and_kill(args, tmp_path, ENV, writing("test"))
    from audio_rft.data.prepare import validate_dataset

    assert validate_dataset(out / "train") == []
    assert not (out / "test").exists()
    # 3. the rerun: every file, hidden leftovers included, equals the uninterrupted run's, byte for byte.
    run_to_end(args, tmp_path, ENV)
    assert listing(out) == listing(reference)
    for name in sorted(listing(reference)):
        if (reference / name).is_file():
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------- training: kill and rerun


def check_sft_equal(out: Path, reference: Path) -> None:
    assert_same_tensors(out / "final" / "adapter_model.safetensors", reference / "final" / "adapter_model.safetensors")
    same_numbers(metric_lines(out), metric_lines(reference), ("loss", "grad_norm", "lr"))
    for n in (4,):  # the last checkpoint kept carries the same optimizer state
        a, b = training_state(out / f"checkpoint-{n}"), training_state(reference / f"checkpoint-{n}")
        assert a.keys() == b.keys() and any(key.startswith("optimizer.state.") for key in a)
        for key in b:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(b[key]) else a[key] == b[key], key
    assert (out / "run.json").is_file()


def kill_chain(base, tmp_path: Path, command: str, points: list[str], steps: int, reference: Path,
               env: dict[str, str]) -> list[str]:
    """Run `command` killed at each point in turn (each rerun resumes from what the last one left), then
    once to the end; return what each kill actually hit."""
    out = tmp_path / "out"
    args_of = {"sft": SFT_ARGS, "grpo": GRPO_ARGS}[command]
    args = cli(command, f"model={base['model']}", f"data={base['data'] / 'train'}", f"out={out}", *args_of)
    hit, planted = [], []
    for point in points:
        if point == "plant":
            whole = latest_checkpoint(out) or latest_checkpoint(reference)
            planted = plant_half_checkpoints(out, whole, steps)
            assert all(not is_complete(p) for p in planted)
            assert latest_checkpoint(out) in (None, *[p for _, p in checkpoint_dirs(out) if p not in planted])
            continue
        when = {"first": before_first_checkpoint(out), "save": mid_save(out, 2),
                "last": after_last_step(out, steps)}[point]
        hit.append(run_and_kill(args, tmp_path, env, when))
        for _, path in checkpoint_dirs(out):
            assert path in planted or is_complete(path), f"{path} looks like a checkpoint but is not complete"
        assert not (out / "final").exists() or is_complete(out / "final")
        assert not (out / "run.json").exists() or is_complete(out / "final")
    run_to_end(args, tmp_path, env)
    # no leftover temporaries from the killed runs; the planted half checkpoints were never used (pruning may
    # have deleted one that carries a marker: it trusts markers, which the checkpoint just saved makes safe)
    assert {n for n in entries(out) if n.startswith(".")} == set(), entries(out)
    for path in planted:
        if path.exists():
            assert not is_complete(path)
            shutil.rmtree(path)
    assert listing(out) == listing(reference)
    return hit


SFT_CHAINS = [
    pytest.param(["save", "plant"], id="mid-save+half-checkpoints"),
    pytest.param(["first", "save", "plant", "last"], id="every-point", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("points", SFT_CHAINS)
def test_sft_killed_and_rerun_equals_uninterrupted(base, sft_reference, tmp_path, points):
    hit = kill_chain(base, tmp_path, "sft", points, 6, sft_reference, ENV)
    print("sft kills hit:", hit)
    check_sft_equal(tmp_path / "out", sft_reference)


GRPO_CHAINS = [
    pytest.param(["first", "last"], id="before-first-checkpoint+after-last-step"),
    pytest.param(["first", "save", "plant", "last"], id="every-point", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("points", GRPO_CHAINS)
def test_grpo_killed_and_rerun_equals_uninterrupted(base, grpo_reference, tmp_path, points):
    hit = kill_chain(base, tmp_path, "grpo", points, 4, grpo_reference, env_with(base["plugins"]))
    print("grpo kills hit:", hit)
    out = tmp_path / "out"
    assert_same_tensors(out / "final" / "adapter_model.safetensors",
                        grpo_reference / "final" / "adapter_model.safetensors")
    same_numbers(metric_lines(out), metric_lines(grpo_reference),
                 ("loss", "reward", "reward_std", "kl", "grad_norm", "completion_length"))
    # the sampled completions (and their rewards) are the same, each logged once
    assert (out / "completions.jsonl").read_text() == (grpo_reference / "completions.jsonl").read_text()
    # and the test is not vacuous: the adapter moved away from its initialisation
    lora_b = [t for k, t in tensors(out / "final" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in lora_b)


INFER_CHAINS = [
    pytest.param(["batch"], id="after-first-batch"),
    pytest.param(["start", "batch", "cut", "last"], id="every-point", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("points", INFER_CHAINS)
def test_infer_killed_and_rerun_writes_identical_predictions(base, infer_reference, tmp_path, points):
    out = tmp_path / "P.json"
    partial = tmp_path / "P.json.partial.jsonl"
    args = cli("infer", "--model", str(base["model"]), "--data", str(base["data"] / "test"), "--out", str(out),
               *INFER_ARGS)

    def lines_at_least(n: int, name: str) -> Callable[[], str | None]:
        def when():
            try:
                return name if len(partial.read_text().splitlines()) >= n else None
            except FileNotFoundError:
                return None
        return when

    for point in points:
        if point == "cut":  # a line cut short by the crash, as a kill inside a large write leaves it
            with open(partial, "a") as f:
                f.write('{"index": 3, "output": "<answer>fo')
            continue
        when = {"start": lines_at_least(1, "before the first batch"),
                "batch": lines_at_least(1 + 8, "after the first batch"),
                "last": lines_at_least(1 + 24, "after the last batch, before the predictions file")}[point]
        run_and_kill(args, tmp_path, ENV, when)
        assert not out.exists() or out.read_bytes() == infer_reference.read_bytes()
        if point != "start":  # a rerun appends after whole lines only, never onto a cut one
            for line in partial.read_bytes().split(b"\n")[:-1]:
                json.loads(line)
    run_to_end(args, tmp_path, ENV)
    assert out.read_bytes() == infer_reference.read_bytes()
    assert not partial.exists()


def test_infer_resume_builds_on_whole_lines_only(base, monkeypatch, tmp_path, one_thread):
    """In-process and exact: a cut last line is dropped before new lines are appended, and outputs holding
    U+2028 or U+0085 (which str.splitlines breaks at) are reused, not recomputed."""
    from audio_rft.eval import infer

    calls = {"n": 0, "stop_at": 2}

    def fake(core, processor, folder, samples, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return [(f"<answer>{s.id}\u2028\x85</answer>", 3) for s in samples]

    monkeypatch.setattr(infer, "generate_answers", fake)
    out = tmp_path / "P.json"
    partial = tmp_path / "P.json.partial.jsonl"
    config = infer.InferConfig(model=str(base["model"]), data=str(base["data"] / "test"), out=str(out), batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        infer.run_inference(config)  # first batch written, interrupted in the second
    with open(partial, "ab") as f:
        f.write(b'{"index": 3, "output": "<answer>fo')  # and the crash cut a line short
    calls.update(n=0, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        infer.run_inference(config)  # the first batch is reused; the second written after whole lines
    lines = partial.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1 + 8 + 8 + 1
    assert all(json.loads(line) for line in lines[:-1])
    calls.update(n=0, stop_at=0)
    infer.run_inference(config)
    assert calls["n"] == 1  # only the third batch was left to do
    records = json.loads(out.read_text())
    assert [r["model_output"] for r in records] == [f"<answer>{r['id']}\u2028\x85</answer>" for r in records]
    assert not partial.exists()


# ---------------------------------------------------------------- half checkpoints (no timing involved)


def test_half_written_checkpoint_is_never_taken_for_whole(sft_reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sft_reference / "checkpoint-2", out / "checkpoint-2")
    whole = out / "checkpoint-2"
    assert is_complete(whole) and latest_checkpoint(out) == whole

    def variant(n: int, damage: Callable[[Path], None]) -> Path:
        path = out / f"checkpoint-{n}"
        shutil.copytree(whole, path)
        damage(path)
        assert not is_complete(path)
        assert latest_checkpoint(out) == whole, f"checkpoint-{n} taken for whole"
        return path

    variant(3, lambda p: (p / COMPLETE).unlink())                                    # marker not yet written
    variant(4, lambda p: (p / COMPLETE).write_text('{"step": 4, "fi'))              # marker cut short
    variant(5, lambda p: (p / "adapter_model.safetensors").write_bytes(b""))        # weights empty
    variant(6, lambda p: (p / "training_state" / "scheduler.pt").unlink())           # a listed file missing
    variant(7, lambda p: flip_byte(p / "training_state" / "rng-0.pt"))                # same size, one byte off
    # a temporary folder of an interrupted save is not a checkpoint either
    shutil.copytree(whole, out / ".checkpoint-8.123-abcdefgh.tmp")
    assert [n for n, _ in checkpoint_dirs(out)] == [2, 3, 4, 5, 6, 7]
    assert latest_checkpoint(out) == whole


# ---------------------------------------------------------------- training guards (in-process)


def nan_after(real: Callable, first_bad: int, last_bad: int | None = None):
    """Wrap a loss function: calls first_bad..last_bad (1-based) return NaN, connected to the graph."""
    calls = {"n": 0}

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        loss, *rest = real(*args, **kwargs)
        if calls["n"] >= first_bad and (last_bad is None or calls["n"] <= last_bad):
            loss = loss * float("nan")
        return (loss, *rest)
    return loss_fn


def test_sft_nonfinite_step_is_skipped_and_logged(base, monkeypatch, tmp_path, one_thread):
    import audio_rft.train.sft as sft

    monkeypatch.setattr(sft, "sft_nll", nan_after(sft.sft_nll, 2, 2))
    out = tmp_path / "sft"
    sft.train_sft(sft_config(base, out, "max_steps=3", "save_every=0"))
    lines = metric_lines(out)
    assert [("skipped" in r) for r in lines] == [False, True, False]
    assert "non-finite" in lines[1]["skipped"]
    assert (out / "final" / COMPLETE).is_file()
    assert all(torch.isfinite(t).all() for t in tensors(out / "final" / "adapter_model.safetensors").values())


def test_sft_nonfinite_in_a_row_stops_naming_causes_and_last_checkpoint(base, monkeypatch, tmp_path, one_thread):
    import audio_rft.train.sft as sft

    monkeypatch.setattr(sft, "sft_nll", nan_after(sft.sft_nll, 3))
    out = tmp_path / "sft"
    with pytest.raises(UserError) as caught:
        sft.train_sft(sft_config(base, out, "max_steps=6", "save_every=2", "max_bad_steps=2"))
    message = str(caught.value)
    assert "\n" not in message
    assert "2 non-finite steps in a row" in message
    assert "learning rate" in message and "fp16" in message
    assert str(out / "checkpoint-2") in message
    assert is_complete(out / "checkpoint-2") and not (out / "final").exists()
    # step 3 skipped and logged; step 4, the second in a row, stops the run
    assert [("skipped" in r) for r in metric_lines(out)] == [False, False, True]


def test_grpo_nan_reward_skips_then_stops(base, monkeypatch, tmp_path, one_thread):
    from audio_rft import rewards
    from audio_rft.train.grpo import train_grpo

    calls = {"n": 0}

    def nan_reward(completions, samples, **_):
        calls["n"] += 1
        return [float("nan") if calls["n"] >= 2 else 0.5 * (i % 2) for i in range(len(completions))]

    monkeypatch.setitem(rewards.REWARDS, "nan_test", nan_reward)
    out = tmp_path / "grpo"
    with pytest.raises(UserError) as caught:
        train_grpo(grpo_config(base, out, "rewards=[nan_test]", "max_steps=4", "save_every=1", "max_bad_steps=2"))
    assert "2 non-finite steps in a row" in str(caught.value)
    assert str(out / "checkpoint-2") in str(caught.value)  # taken after the skipped step: weights unchanged
    assert [("skipped" in r) for r in metric_lines(out)] == [False, True]


def test_failed_checkpoint_write_keeps_previous_and_stops_cleanly(base, monkeypatch, tmp_path, capsys, one_thread):
    """Disk full while writing checkpoint-4: checkpoint-2 intact, no temporary left, exit 2 and one line."""
    from audio_rft.cli import main

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".checkpoint-4." in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.delenv("AUDIO_RFT_DEBUG", raising=False)
    out = tmp_path / "sft"
    argv = ["sft", f"model={base['model']}", f"data={base['data'] / 'train'}", f"out={out}", *SFT_ARGS]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert "No space left on device" in errors[0]
    assert str(out / "checkpoint-2") in errors[0] and "intact" in errors[0]
    assert is_complete(out / "checkpoint-2")
    assert [n for n, _ in checkpoint_dirs(out)] == [2]
    assert not [n for n in entries(out) if n.endswith(".tmp")]

    # with space again, the same command resumes from checkpoint-2 and finishes
    monkeypatch.setattr(torch, "save", real_save)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "resuming from" in capsys.readouterr().err
    assert is_complete(out / "final")


def test_failed_save_pretrained_is_a_checkpoint_error(base, monkeypatch, tmp_path, one_thread):
    from audio_rft.train import common
    from audio_rft.train.sft import train_sft

    real = common.save_checkpoint

    def save_checkpoint(path, engine, *args, **kwargs):
        if path.name == "final":
            def full(*a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(engine.model, "save_pretrained", full)
        return real(path, engine, *args, **kwargs)

    monkeypatch.setattr(common, "save_checkpoint", save_checkpoint)
    out = tmp_path / "sft"
    with pytest.raises(common.CheckpointError, match="previous checkpoint .*checkpoint-2 is intact"):
        train_sft(sft_config(base, out, "max_steps=3", "save_every=2"))
    assert is_complete(out / "checkpoint-2") and not (out / "final").exists()
    assert not [n for n in entries(out) if n.endswith(".tmp")]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_out_of_memory_gives_advice(base, monkeypatch, tmp_path, stage, one_thread):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if stage == "sft":
        import audio_rft.train.sft as sft

        monkeypatch.setattr(sft, "sft_nll", oom)
        run = lambda: sft.train_sft(sft_config(base, tmp_path / "o", "max_steps=2"))  # noqa: E731
        kind = "SFT"
    else:
        import audio_rft.rollout as rollout
        from audio_rft.train.grpo import train_grpo

        monkeypatch.setattr(rollout, "sample", oom)
        run = lambda: train_grpo(grpo_config(base, tmp_path / "o", "max_steps=2", "rewards=[accuracy]"))  # noqa: E731
        kind = "GRPO"
    with pytest.raises(UserError) as caught:
        run()
    assert str(caught.value) == oom_advice(kind)
    assert "batch_size" in str(caught.value) and "gradient_checkpointing" in str(caught.value)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_the_resume_state_restores_the_generator_dropout_draws_from(device):
    """CPU and CUDA alike: the RNG state a checkpoint saves puts the device's dropout generator back."""
    from audio_rft.train.engine import _rng_state, _set_rng_state, dropout_generator

    device = torch.device(device)
    state = _rng_state(device)
    first = torch.rand(5, generator=dropout_generator(device), device=device)
    torch.rand(7, generator=dropout_generator(device), device=device)
    _set_rng_state(state, device)
    assert state["device_type"] == device.type
    assert torch.equal(torch.rand(5, generator=dropout_generator(device), device=device), first)
