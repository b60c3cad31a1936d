"""Run several trainings in one multi-process launch (torchrun starts each process once; the launch is the
slow part): `torchrun --nproc_per_node 2 tests/dist_driver.py SPEC.json`.

SPEC is a list of {"kind": "sft" | "grpo" | "prefer" | "measure" | "kto_z0", "config": {...}}. `measure` builds the
engine of a GRPO config, takes one optimizer step on zero gradients (so AdamW has its state) and writes, per rank,
the bytes of parameters and optimizer state this rank holds to config["out"]/bytes-RANK.json. `kto_z0` gives
prefer.method_loss (KTO) mismatched log-ratios of +3 on rank 0 and −2.5 on rank 1 and writes the z0 it logs to
config["out"]/z0-RANK.json.
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
    engine = run.engine
    for p in engine.trainable:
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    state = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bytes-{run.layout.rank}.json").write_text(json.dumps({
        "parameters": local_bytes(engine.model.parameters()), "optimizer": local_bytes(state)}))
    run.bar.close()


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

    for job in json.loads(Path(sys.argv[1]).read_text()):
        common.Run.finish = finish_with_checksum if job.get("checksums") else finish
        cls, run = {"sft": (SFTConfig, train_sft), "grpo": (GRPOConfig, train_grpo),
                    "prefer": (PreferConfig, train_prefer), "kto_z0": (PreferConfig, kto_z0),
                    "measure": (GRPOConfig, measure)}[job["kind"]]
        run(build_config(cls, job["config"]))


if __name__ == "__main__":
    main()
