"""Run several trainings in one multi-process launch (torchrun starts each process once; the launch is the
slow part): `torchrun --nproc_per_node 2 tests/dist_driver.py SPEC.json`.

SPEC is a list of {"kind": "sft" | "grpo" | "prefer" | "measure" | "gradients" | "load" | "kto_z0", "config": {...}},
each optionally with "checksums" (weights-RANK.txt: a digest of this rank's weights at the end), "record_steps" (steps-RANK.json: per
optimizer step, whether it was to be applied and whether this rank's weights or optimizer state changed) and
"nan_calls" [first, last] (SFT: those calls of sft_nll, 1-based, return NaN).

`measure` builds the engine of a GRPO config, takes one optimizer step on zero gradients (so AdamW has its
state) and writes, per rank, the bytes of parameters and optimizer state this rank holds, and four draws of
the RNG dropout uses, to config["out"]/bytes-RANK.json. `gradients` runs the first micro-batch of an SFT step
with grad_accum > 1 (no sync, as train_sft does) and writes the gradient bytes this rank then holds, FSDP2's
unsharded accumulation buffers included, beside the bytes of the whole fp32 gradient (gradients-RANK.json).
`load` builds the engine of an SFT config and writes its peak resident memory (memory-RANK.json).
`kto_z0` gives prefer.method_loss (KTO) mismatched log-ratios of +3 on rank 0 and −2.5 on rank 1 and writes the
z0 it logs to config["out"]/z0-RANK.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def measure(config) -> None:
    from audio_rft.train.common import start_run

    run = start_run(config, fresh=True, schedule_steps=1, desc="measure")
    dropout_draws = torch.rand(4).tolist()
    engine = run.engine
    for p in engine.trainable:
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    state = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bytes-{run.layout.rank}.json").write_text(json.dumps({
        "parameters": local_bytes(engine.model.parameters()), "optimizer": local_bytes(state),
        "dropout_draws": dropout_draws}))
    run.bar.close()


def held_gradient_bytes(model) -> int:
    """Bytes of every gradient this rank holds: parameters' (local shards) and FSDP2's unsharded ones."""
    from torch.distributed.fsdp import FSDPModule

    held = [p.grad for p in model.parameters() if p.grad is not None]
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fsdp_param in group.fsdp_params if group is not None else []:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            held += [t for t in (fsdp_param.unsharded_accumulated_grad, getattr(unsharded, "grad", None)) if t is not None]
    return local_bytes(held)


def gradients(config) -> None:
    from audio_rft.data.dataset import load_dataset
    from audio_rft.train.common import start_run
    from audio_rft.train.sft import sft_inputs, sft_nll

    assert config.grad_accum > 1
    run = start_run(config, fresh=True, schedule_steps=1, desc="gradients")
    engine, samples = run.engine, load_dataset(config.data)
    engine.train(True)
    engine.sync_gradients(False)  # micro-batch 0 of grad_accum, as train_sft calls it
    inputs = sft_inputs(run.processor, config.data, [samples[i] for i in run.indices(len(samples), 0, 0)], config,
                        run.layout.device)
    loss, _ = engine.run(sft_nll, *inputs)
    engine.backward(loss)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gradients-{run.layout.rank}.json").write_text(json.dumps({
        "held": held_gradient_bytes(engine.model), "full_fp32": 4 * sum(p.numel() for p in engine.trainable)}))
    run.bar.close()


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load(config) -> None:
    """Peak resident memory of building the engine (loading and sharding the model), over what the process
    held before it (memory-RANK.json)."""
    import resource

    before = resident_bytes()
    run = start_run_for(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory-{run.layout.rank}.json").write_text(json.dumps({"before": before, "peak": peak,
                                                                   "after": resident_bytes()}))
    run.bar.close()


def start_run_for(config):
    from audio_rft.train.common import start_run

    return start_run(config, fresh=True, schedule_steps=1, desc="load")


def state_digest(engine) -> str:
    """This rank's weights and optimizer state (ZeRO's includes its fp32 partitions)."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for inner in value:
                add(inner)
        elif torch.is_tensor(value):
            local = value.to_local() if hasattr(value, "to_local") else value
            digest.update(local.detach().cpu().float().numpy().tobytes())

    # ZeRO-3 holds each rank's weights in `ds_tensor`; the parameter itself is gathered or empty depending on
    # what ran last, which is not a change of weights.
    add([getattr(p, "ds_tensor", p) for p in engine.model.parameters()])
    add(engine.optimizer.state_dict())
    return digest.hexdigest()


def record_steps(out: Path, rank_of) -> None:
    """Wrap Engine.optimizer_step: log, per call, whether the step was to be applied and whether it changed this
    rank's weights or optimizer state."""
    from audio_rft.train.engine import Engine

    real, records = Engine.optimizer_step, []

    def recording(self, apply, any_backward=True):
        before = state_digest(self)
        result = real(self, apply, any_backward)
        records.append({"apply": bool(apply and any_backward), "changed": state_digest(self) != before})
        out.mkdir(parents=True, exist_ok=True)
        (out / f"steps-{rank_of(self)}.json").write_text(json.dumps(records))
        return result

    Engine.optimizer_step = recording
    return real


def nan_calls(first: int, last: int):
    """sft_nll whose calls first..last (1-based) return NaN, connected to the graph."""
    import audio_rft.train.sft as sft

    real, calls = sft.sft_nll, {"n": 0}

    def loss_fn(*args, **kwargs):
        calls["n"] += 1
        loss, tokens = real(*args, **kwargs)
        return (loss * float("nan") if first <= calls["n"] <= last else loss), tokens

    sft.sft_nll = loss_fn
    return real


def kto_z0(config) -> None:
    from audio_rft.train.engine import process_layout
    from audio_rft.train.prefer import method_loss

    layout = process_layout(config)
    ratio = 3.0 if layout.rank == 0 else -2.5
    logps = torch.tensor([[-1.0], [ratio], [-1.0], [ratio]])  # [own, mismatched] per item; the reference is 0
    _, stats = method_loss(config, layout, [{"label": True}, {"label": False}], logps, torch.zeros(4, 1),
                           torch.ones(4, 1))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"z0-{layout.rank}.json").write_text(json.dumps(float(stats["kto/z0"])))


def main() -> None:
    from audio_rft.config import build_config
    from audio_rft.log import setup_logging
    from audio_rft.train.grpo import GRPOConfig, train_grpo
    from audio_rft.train.prefer import PreferConfig, train_prefer
    from audio_rft.train.sft import SFTConfig, train_sft

    setup_logging()  # as `audio-rft` does: the tests read "resuming from" in rank 0's stderr
    from audio_rft.train import common

    finish = common.Run.finish

    def finish_with_checksum(run):
        digest = hashlib.sha256()
        for name, param in sorted(run.engine.model.named_parameters()):
            local = param.to_local() if hasattr(param, "to_local") else param
            digest.update(name.encode() + local.detach().cpu().float().numpy().tobytes())
        (run.out / f"weights-{run.layout.rank}.txt").write_text(digest.hexdigest())
        return finish(run)

    import audio_rft.train.sft as sft
    from audio_rft.train.engine import Engine

    for job in json.loads(Path(sys.argv[1]).read_text()):
        common.Run.finish = finish_with_checksum if job.get("checksums") else finish
        cls, run = {"sft": (SFTConfig, train_sft), "grpo": (GRPOConfig, train_grpo),
                    "prefer": (PreferConfig, train_prefer),
                    "measure": (GRPOConfig, measure), "gradients": (SFTConfig, gradients),
                    "load": (SFTConfig, load), "kto_z0": (PreferConfig, kto_z0)}[job["kind"]]
        config = build_config(cls, job["config"])
        real_step = record_steps(Path(config.out), lambda engine: engine.layout.rank) if job.get("record_steps") else None
        real_nll = nan_calls(*job["nan_calls"]) if job.get("nan_calls") else None
        try:
            run(config)
        finally:
            if real_step is not None:
                Engine.optimizer_step = real_step
            if real_nll is not None:
                sft.sft_nll = real_nll
    # Leave together: a rank that exits while another still talks to it (a last job without a collective at its
    # end, such as kto_z0) can abort in gloo's teardown ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
