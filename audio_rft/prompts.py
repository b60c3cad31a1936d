"""The paper's three prompt modes, and the chat messages Qwen2-Audio expects (audio first, then text)."""

from __future__ import annotations

from audio_rft import UserError
from audio_rft.data.schema import Sample

PROMPT_MODES = ("direct", "answer", "think")

_INSTRUCTIONS = {
    "direct": "",  # Prompt <1>, the paper's SFT
    "answer": " Output the final answer in <answer> </answer>.",  # Prompt <2>, their best GRPO
    "think": " Output the thinking process in <think> </think> and final answer in <answer> </answer>.",  # Prompt <3>
}


def check_mode(mode: str) -> str:
    if mode not in PROMPT_MODES:
        raise UserError(f"unknown prompt mode {mode!r}; choose one of {', '.join(PROMPT_MODES)}")
    return mode


def prompt_text(sample: Sample, mode: str) -> str:
    # str(list) renders the choices as a Python list, exactly as R1-AQA does.
    return f"{sample.question} Please choose the answer from the following options: {sample.choices}." + _INSTRUCTIONS[check_mode(mode)]


def chat_messages(sample: Sample, mode: str, audio_ref: str | None = None) -> list[dict]:
    """One user turn: the audio placeholder, then the question text (Qwen2-Audio's chat format)."""
    return [{
        "role": "user",
        "content": [
            {"type": "audio", "audio_url": audio_ref or sample.audio},
            {"type": "text", "text": prompt_text(sample, mode)},
        ],
    }]


def target_text(sample: Sample, mode: str) -> str:
    """The SFT target for a prompt mode; `think` needs the sample's rationale."""
    if sample.answer is None:
        raise ValueError(f"sample {sample.id!r} has no answer to train on")
    if mode == "direct":
        return sample.answer
    if mode == "answer":
        return f"<answer>{sample.answer}</answer>"
    if not sample.reasoning:
        raise ValueError(f"sample {sample.id!r} has no 'reasoning' field, which the think target needs")
    return f"<think>{sample.reasoning}</think><answer>{sample.answer}</answer>"
