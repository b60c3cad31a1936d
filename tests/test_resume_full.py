"""Full fine-tuning resumes exactly: the checkpoint's full weights (not just an adapter) are restored."""

import torch
from safetensors.torch import load_file

from helpers import synth_data, tiny_model  # noqa: F401  (session fixtures)

from audio_rft.train.sft import SFTConfig, train_sft


def _config(model, data, out, max_steps):
    return SFTConfig(model=str(model), data=str(data / "train"), out=str(out), prompt_mode="answer", lora=False,
                     batch_size=4, max_steps=max_steps, save_every=1, threads=1, report_to=[])


def test_full_finetune_resume_restores_every_weight(tiny_model, synth_data, tmp_path):  # noqa: F811
    whole = train_sft(_config(tiny_model, synth_data, tmp_path / "whole", 3))
    train_sft(_config(tiny_model, synth_data, tmp_path / "split", 2))
    split = train_sft(_config(tiny_model, synth_data, tmp_path / "split", 3))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    start = load_file(str(tiny_model / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training really moved the language model, so equality above is not trivially true
    assert any(not torch.equal(a[k], start[k]) for k in a if "language_model" in k)
