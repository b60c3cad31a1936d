"""Reading an answer out of a completion, and deciding whether it is right.

Shared by the rewards (training) and the scorer (eval), so both judge a completion the same way. Eval can
also read answers as R1-AQA's test script does (`EXTRACTORS["r1-aqa"]`), to reproduce the paper's numbers.
An accuracy rule names both how the answer is read and how it is compared (`ACCURACY_RULES`): `exact` is
R1-AQA's reward (src/utils/rewards.py: the first `<answer>` on one line, case-sensitive equality), `mmau` is the
benchmark's token rule on our extraction (the last `<answer>`).
"""

from __future__ import annotations

import re
from typing import Callable

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_R1_AQA_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # as theirs: no DOTALL, so an answer with a newline is no match
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_WORD = re.compile(r"\b\w+\b")


def extract_answer(completion: str) -> str:
    """The content of the last `<answer>…</answer>`; without one, the completion minus any think block.

    Nested or repeated tags resolve to the innermost text of the last closed answer; an unclosed
    `<answer>` takes what follows it.
    """
    matches = _ANSWER.findall(completion)
    if matches:
        return matches[-1].rsplit("<answer>", 1)[-1].strip()
    if "<answer>" in completion:
        return completion.rsplit("<answer>", 1)[-1].strip()
    return _THINK.sub("", completion).replace("<think>", "").strip()


def extract_answer_r1_aqa(completion: str) -> str:
    """R1-AQA's test script (src/test.py): the first `<answer>…</answer>` within one line; without one, the
    whole output; stripped.

    Where it differs from `extract_answer`: the first answer, not the last; an unclosed `<answer>` or an answer
    spanning lines keeps the whole output, and so does a think-only output, reasoning included (which the MMAU
    rule then matches).
    """
    match = _R1_AQA_ANSWER.search(completion)
    return (match.group(1) if match else completion).strip()


# How eval reads the prediction out of a completion (`audio-rft infer/score --extract NAME`).
EXTRACTORS: dict[str, Callable[[str], str]] = {"audio-rft": extract_answer, "r1-aqa": extract_answer_r1_aqa}


def extractor(name: str) -> Callable[[str], str]:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown answer extraction {name!r} (one of {', '.join(EXTRACTORS)})")
    return EXTRACTORS[name]


def exact_match(prediction: str, answer: str) -> bool:
    """R1-AQA's accuracy reward (its string branch): equal after strip, case kept ("Dog" is not "dog")."""
    return prediction.strip() == answer.strip()


def _tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def mmau_match(prediction: str, answer: str, choices: list[str]) -> bool:
    """The MMAU benchmark's rule, decision for decision (docs/design.md, "How MMAU scores a prediction").

    Correct when the prediction has a word token, holds every token of the answer, and holds no token
    of a wrong choice (a wrong choice's tokens minus the answer's; a choice with the answer's token set
    is not wrong).
    """
    prediction_tokens = _tokens(prediction)
    if not prediction_tokens:
        return False
    answer_tokens = _tokens(answer)
    wrong_tokens: set[str] = set()
    for choice in choices:
        choice_tokens = _tokens(choice)
        if choice_tokens != answer_tokens:
            wrong_tokens |= choice_tokens - answer_tokens
    return answer_tokens <= prediction_tokens and prediction_tokens.isdisjoint(wrong_tokens)


def is_correct(prediction: str, answer: str, choices: list[str], rule: str = "exact") -> bool:
    """Compare an already extracted prediction (`completion_correct` also extracts, as the rule says)."""
    if rule == "exact":
        return exact_match(prediction, answer)
    if rule == "mmau":
        return mmau_match(prediction, answer, choices)
    raise ValueError(f"unknown answer rule {rule!r} (exact or mmau)")


# rule -> how its prediction is read from a completion
ACCURACY_RULES: dict[str, Callable[[str], str]] = {"exact": extract_answer_r1_aqa, "mmau": extract_answer}


def completion_correct(completion: str, answer: str, choices: list[str], rule: str = "exact") -> bool:
    """Read the prediction out of a whole completion as `rule` does, then judge it.

    `exact` is R1-AQA's accuracy reward: the first `<answer>…</answer>` within one line (else the whole
    completion), stripped, equal to the answer with case kept. R1-AQA first tries math_verify's symbolic
    equality on the whole completion; that branch is left out (it can only add matches where both texts parse as
    the same mathematical expression). `mmau`: the last `<answer>`,
    judged by MMAU's token rule.
    """
    if rule not in ACCURACY_RULES:
        raise ValueError(f"unknown answer rule {rule!r} (exact or mmau)")
    return is_correct(ACCURACY_RULES[rule](completion), answer, choices, rule)


def follows_format(completion: str, mode: str) -> bool:
    """Mode `answer`: the whole completion is `<answer>…</answer>`, as R1-AQA's format reward checks it
    (fullmatch on the unstripped text, so a leading space or trailing newline fails; tags inside may repeat);
    mode `think`: `<think>…</think>` then `<answer>…</answer>`, one of each, unstripped too."""
    text = completion
    if mode == "answer":
        return re.fullmatch(r"<answer>.*?</answer>", text, re.DOTALL) is not None
    if mode == "think":
        return re.fullmatch(
            r"<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>|</?think>).)*</answer>", text, re.DOTALL
        ) is not None
    if mode == "direct":
        return "<answer>" not in text and "<think>" not in text and bool(text)
    raise ValueError(f"unknown prompt mode {mode!r}")
