"""Prompt modes, answer extraction and rewards: table-driven, no model needed."""

from __future__ import annotations

import sys

import pytest

from audio_rft import UserError
from audio_rft.answers import extract_answer, follows_format, is_correct
from audio_rft.data.schema import Sample
from audio_rft.prompts import PROMPT_MODES, chat_messages, prompt_text, target_text
from audio_rft.rewards import REWARDS, accuracy, format as format_reward, get_reward

QUESTION = "What animal is heard?"
CHOICES = ["dog", "cat", "bird"]


def sample(answer="dog", choices=CHOICES, reasoning=None) -> Sample:
    return Sample(id="s1", audio="audio/s1.wav", question=QUESTION, choices=list(choices), answer=answer,
                  task="sound", reasoning=reasoning)


# ---------------------------------------------------------------- prompts

@pytest.mark.parametrize("mode, expected", [
    ("direct", "What animal is heard? Please choose the answer from the following options: ['dog', 'cat', 'bird']."),
    ("answer", "What animal is heard? Please choose the answer from the following options: ['dog', 'cat', 'bird']."
               " Output the final answer in <answer> </answer>."),
    ("think", "What animal is heard? Please choose the answer from the following options: ['dog', 'cat', 'bird']."
              " Output the thinking process in <think> </think> and final answer in <answer> </answer>."),
])
def test_prompt_wording(mode, expected):
    assert prompt_text(sample(), mode) == expected


def test_choices_render_as_python_list_with_quotes_escaped():
    s = sample(answer="it's a dog", choices=["it's a dog", 'a "cat"'])
    assert prompt_text(s, "direct").endswith("options: [\"it's a dog\", 'a \"cat\"'].")


def test_modes_and_unknown_mode():
    assert PROMPT_MODES == ("direct", "answer", "think")
    with pytest.raises(ValueError, match="unknown prompt mode 'cot'"):
        prompt_text(sample(), "cot")


def test_chat_messages_put_audio_first():
    (message,) = chat_messages(sample(), "answer")
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["audio", "text"]
    assert message["content"][0]["audio_url"] == "audio/s1.wav"
    assert message["content"][1]["text"] == prompt_text(sample(), "answer")


@pytest.mark.parametrize("mode, reasoning, expected", [
    ("direct", None, "dog"),
    ("answer", None, "<answer>dog</answer>"),
    ("think", "It barks.", "<think>It barks.</think><answer>dog</answer>"),
])
def test_sft_targets(mode, reasoning, expected):
    assert target_text(sample(reasoning=reasoning), mode) == expected


@pytest.mark.parametrize("reasoning", [None, ""])
def test_think_target_needs_reasoning(reasoning):
    with pytest.raises(ValueError, match="no 'reasoning' field"):
        target_text(sample(reasoning=reasoning), "think")


def test_target_needs_an_answer():
    with pytest.raises(ValueError, match="no answer"):
        target_text(sample(answer=None), "answer")


# ---------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("completion, expected", [
    ("<answer>dog</answer>", "dog"),
    ("<answer>  Dog \n</answer>", "Dog"),  # whitespace stripped, case kept (the rule folds it)
    ("  dog\n", "dog"),  # no tags: the whole completion
    ("<answer>cat</answer> no wait <answer>dog</answer>", "dog"),  # repeated: the last one
    ("<answer><answer>dog</answer></answer>", "dog"),  # nested: the innermost text
    ("<answer>cat <answer>dog</answer>", "dog"),
    ("<answer></answer>", ""),  # empty answers
    ("<answer>   </answer>", ""),
    ("<think>It barks, so dog.</think><answer>dog</answer>", "dog"),
    ("<think>It barks, so dog.</think> cat", "cat"),  # a think block without an answer: the rest
    ("<think>It barks.</think>", ""),
    ("<answer>dog", "dog"),  # unclosed answer: what follows it
    ("<answer>dog or cat</answer>", "dog or cat"),  # names two choices: extracted as is, judged below
    ("<answer>line one\nline two</answer>", "line one\nline two"),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("prediction, rule, correct", [
    ("dog", "exact", True),
    ("  dog ", "exact", True),  # stripped, as R1-AQA strips both sides
    ("DOG", "exact", False),  # R1-AQA compares with case kept
    ("Dog.", "exact", False),
    ("the dog", "exact", False),
    ("dog or cat", "exact", False),
    ("", "exact", False),
    ("dog", "mmau", True),
    ("The answer is DOG.", "mmau", True),  # MMAU: answer tokens present, no wrong choice's token
    ("dog or cat", "mmau", False),  # names a wrong choice too
    ("cat", "mmau", False),
    ("", "mmau", False),
    ("...", "mmau", False),  # no word token
])
def test_is_correct(prediction, rule, correct):
    assert is_correct(prediction, "dog", CHOICES, rule) is correct


def test_mmau_rule_ignores_answer_tokens_in_wrong_choices():
    choices = ["a dog barking", "a cat", "a dog"]
    assert is_correct("a dog barking", "a dog barking", choices, "mmau")
    assert not is_correct("a dog", "a dog barking", choices, "mmau")  # misses "barking"
    assert is_correct("dog barking", "a dog barking", choices, "mmau") is False  # misses "a"
    assert not is_correct("a cat dog barking", "a dog barking", choices, "mmau")


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown answer rule"):
        is_correct("dog", "dog", CHOICES, "fuzzy")


@pytest.mark.parametrize("completion, mode, ok", [
    ("<answer>dog</answer>", "answer", True),
    ("  <answer>dog</answer>\n", "answer", False),  # R1-AQA's fullmatch runs on the unstripped output
    ("<answer>dog</answer>\n", "answer", False),
    ("<answer></answer>", "answer", True),
    ("<answer>two\nlines</answer>", "answer", True),  # its format regex has DOTALL (its answer regex has not)
    ("<answer>dog</answer> because", "answer", False),
    ("dog", "answer", False),
    ("<answer><answer>dog</answer></answer>", "answer", True),  # theirs: .*? inside one fullmatch
    ("<answer>cat</answer><answer>dog</answer>", "answer", True),
    ("<think>x</think><answer>dog</answer>", "answer", False),
    ("<think>It barks.</think><answer>dog</answer>", "think", True),
    ("<think>It barks.</think>\n<answer>dog</answer>", "think", True),
    (" <think>It barks.</think><answer>dog</answer>", "think", False),  # unstripped, as the answer mode
    ("<answer>dog</answer>", "think", False),
    ("<think>It barks.</think>", "think", False),
    ("<answer>dog</answer><think>It barks.</think>", "think", False),
    ("<think>a</think><think>b</think><answer>dog</answer>", "think", False),
    ("<think>It barks.</think><answer>dog</answer> done", "think", False),
    ("dog", "direct", True),
    ("<answer>dog</answer>", "direct", False),
])
def test_follows_format(completion, mode, ok):
    assert follows_format(completion, mode) is ok


# ---------------------------------------------------------------- rewards

COMPLETIONS = ["<answer>dog</answer>", "<answer>The dog.</answer>", "<think>hm</think><answer>cat</answer>",
               "dog", "<answer>dog or cat</answer>"]


@pytest.mark.parametrize("rule, expected", [
    ("exact", [1.0, 0.0, 0.0, 1.0, 0.0]),
    ("mmau", [1.0, 1.0, 0.0, 1.0, 0.0]),
])
def test_accuracy_reward(rule, expected):
    samples = [sample()] * len(COMPLETIONS)
    assert accuracy(COMPLETIONS, samples, rule=rule) == expected
    assert get_reward("accuracy", rule=rule)(COMPLETIONS, samples) == expected


@pytest.mark.parametrize("completion, exact, mmau", [
    ("<answer>dog</answer> no, <answer>cat</answer>", 1.0, 0.0),  # exact reads the first answer, mmau the last
    ("<answer>cat</answer> no, <answer>dog</answer>", 0.0, 1.0),
    ("<answer>Dog</answer>", 0.0, 1.0),  # exact keeps case; MMAU lower-cases
    ("<answer>dog\n</answer>", 0.0, 1.0),  # R1-AQA's answer regex has no DOTALL: no match, the whole output is
                                           # compared; ours reads across lines
    ("<answer> dog </answer>", 1.0, 1.0),
])
def test_accuracy_rules_read_answers_as_their_sources(completion, exact, mmau):
    assert accuracy([completion], [sample()], rule="exact") == [exact]
    assert accuracy([completion], [sample()], rule="mmau") == [mmau]


def test_accuracy_reward_without_answer_is_zero():
    assert accuracy(["dog"], [sample(answer=None)]) == [0.0]


@pytest.mark.parametrize("mode, expected", [
    ("answer", [1.0, 1.0, 0.0, 0.0, 1.0]),
    ("think", [0.0, 0.0, 1.0, 0.0, 0.0]),
])
def test_format_reward(mode, expected):
    samples = [sample()] * len(COMPLETIONS)
    assert format_reward(COMPLETIONS, samples, mode=mode) == expected
    assert get_reward("format", mode=mode)(COMPLETIONS, samples) == expected


def test_registry():
    assert set(REWARDS) == {"accuracy", "format"}
    with pytest.raises(ValueError, match="unknown reward 'length'"):
        get_reward("length")


PLUGIN = '''
import pathlib
pathlib.Path(__file__).with_name("imported.marker").write_text("yes")

def short(completions, samples, limit=5, **_):
    return [float(len(c) <= limit) for c in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def plugin_pkg(tmp_path, monkeypatch):
    """A user package `myrewards.extra` on sys.path that leaves a marker file when imported."""
    package = tmp_path / "myrewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "extra.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("myrewards", "myrewards.extra"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return package / "imported.marker"


def test_user_plugin(plugin_pkg):
    fn = get_reward("myrewards.extra:short", limit=3)
    assert plugin_pkg.exists()
    assert fn(["dog", "a dog"], [sample(), sample()]) == [1.0, 0.0]
    assert get_reward("myrewards.extra:short")(["dog", "a dog"], [sample(), sample()]) == [1.0, 1.0]


@pytest.mark.parametrize("name, message", [
    ("myrewards.missing:short", "could not be loaded"),
    ("myrewards.extra:nothing", "could not be loaded"),
    ("no_such_package_xyz.mod:fn", "could not be loaded"),
    ("myrewards.extra:NOT_A_FUNCTION", "is not callable"),
])
def test_user_plugin_errors(plugin_pkg, name, message):
    with pytest.raises(ValueError, match=message):
        get_reward(name)


def test_plugins_never_imported_unless_named(plugin_pkg):
    from audio_rft.train.grpo import GRPOConfig, build_reward_fns

    fns, weights = build_reward_fns(GRPOConfig(rewards=["accuracy", "format"]))
    assert set(fns) == {"accuracy", "format"} and weights == {"accuracy": 1.0, "format": 1.0}
    assert "myrewards.extra" not in sys.modules and not plugin_pkg.exists()
    fns, weights = build_reward_fns(GRPOConfig(rewards=["accuracy", "myrewards.extra:short"], reward_weights=[1.0, 0.5]))
    assert "myrewards.extra" in sys.modules and plugin_pkg.exists()
    assert weights == {"accuracy": 1.0, "myrewards.extra:short": 0.5}


def test_grpo_reward_config_errors(plugin_pkg):
    from audio_rft.train.grpo import GRPOConfig, build_reward_fns

    with pytest.raises(UserError, match="could not be loaded"):
        build_reward_fns(GRPOConfig(rewards=["myrewards.missing:short"]))
    with pytest.raises(UserError, match="reward_weights has 1 values for 2 rewards"):
        build_reward_fns(GRPOConfig(rewards=["accuracy", "format"], reward_weights=[1.0]))
    fns, _ = build_reward_fns(GRPOConfig(rewards=["accuracy", "format"], prompt_mode="think", accuracy_rule="mmau"))
    assert fns["accuracy"](["The dog."], [sample()]) == [1.0]
    assert fns["format"](["<think>x</think><answer>dog</answer>"], [sample()]) == [1.0]
