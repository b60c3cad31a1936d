"""Mixed precision that trains: with dtype=bf16, full fine-tuning keeps fp32 master weights and AdamW state."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from helpers import synth_data, tiny_model  # noqa: F401 (fixtures)


def test_full_finetune_in_bf16_at_lr_1e6_changes_most_weights_in_one_step(tiny_model, synth_data, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from audio_rft.train.sft import SFTConfig, train_sft

    out = tmp_path / "run"
    train_sft(SFTConfig(model=str(tiny_model), data=str(synth_data / "train"), out=str(out), lora=False, dtype="bf16",
                        lr=1e-6, max_steps=2, save_every=1, batch_size=4, report_to=[], device="cpu", threads=1))
    dcp_to_torch_save(out / "checkpoint-1" / "training_state" / "dcp", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    trained, optimizer = state["model"], state["optimizer"]["state"]
    from transformers import Qwen2AudioForConditionalGeneration

    base = Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model), dtype=torch.float32).state_dict()
    assert trained and all(t.dtype == torch.float32 for t in trained.values())  # master weights
    assert all(v["exp_avg"].dtype == torch.float32 for v in optimizer.values())
    changed = total = lost_in_bf16 = 0
    for name, weight in trained.items():
        before = base[name].float()
        moved = weight != before
        changed += int(moved.sum())
        total += weight.numel()
        # what bf16 weights would have kept of the same update: almost nothing (the old behaviour)
        lost_in_bf16 += int((moved & (weight.bfloat16() == before.bfloat16())).sum())
    assert changed / total > 0.5, (changed, total)
    assert lost_in_bf16 / changed > 0.9  # the test could fail: bf16 weights round such updates away
    # the loadable checkpoint is written in the compute dtype
    final = load_file(str(out / "final" / "model.safetensors"))
    assert {t.dtype for t in final.values() if t.is_floating_point()} == {torch.bfloat16}


def test_lora_with_the_projector_in_bf16_keeps_every_trained_weight_and_its_adam_state_in_fp32(tiny_model, synth_data,
                                                                                             tmp_path):
    """PEFT upcasts only the LoRA matrices; the projector trained beside them (modules_to_save) must be fp32 too."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from audio_rft.train.sft import SFTConfig, train_sft

    out = tmp_path / "run"
    train_sft(SFTConfig(model=str(tiny_model), data=str(synth_data / "train"), out=str(out), lora=True,
                        train_projector=True, dtype="bf16", lr=1e-3, max_steps=2, save_every=1, batch_size=4,
                        report_to=[], device="cpu", threads=1))
    dcp_to_torch_save(out / "checkpoint-1" / "training_state" / "dcp", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    trained, optimizer = state["model"], state["optimizer"]["state"]
    projector = [name for name in trained if "multi_modal_projector" in name]
    assert projector and any("lora_" in name for name in trained)
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert optimizer and all(v["exp_avg"].dtype == torch.float32 for v in optimizer.values())
