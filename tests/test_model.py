"""The model layer: presets in plain transformers, the tokenizer, adapters, LoRA, and the rollout maths."""

from __future__ import annotations

import contextlib
import unicodedata

import numpy as np
import pytest
import torch

from audio_rft import UserError
from audio_rft.model import (
    CHAT_TEMPLATE, NEVER_GENERATE, PRESETS, SPECIAL_TOKENS, add_lora, build_processor, build_tiny_preset, core_model,
    load_model, set_full_finetune,
)
from audio_rft.rollout import (completion_logprobs, decode, encode_audio, sample, stop_ids, suppressed_ids,
                              with_audio_encoded)
from helpers import (  # noqa: F401 (fixtures)
    one_thread,
    load_tiny, perturb_lora, prompt_batch, run_cli, samples_of, shared_clip, synth_data, tiny_model,
)

INSTRUCT_LAYOUT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat's that sound?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
AUDIO_MESSAGE = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                              {"type": "text", "text": "What's that sound?"}]}]


def clip_16k(path) -> np.ndarray:
    from audio_rft.data.audio import load_audio

    wave, info = load_audio(path, max_seconds=None)
    assert info.original_sample_rate == 32_000 and abs(len(wave) / 16_000 - 10.0) < 0.01
    return wave


def plain_transformers_generate(folder, wave: np.ndarray, max_new_tokens: int = 4):
    """What a user does with a checkpoint: AutoProcessor + Qwen2AudioForConditionalGeneration, nothing of ours."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(folder))
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(folder)).eval()
    text = processor.apply_chat_template(AUDIO_MESSAGE, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], audio=[wave], sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    audio_tokens = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    return processor, model, out[:, inputs["input_ids"].shape[1]:], audio_tokens


# ---------------------------------------------------------------- presets in plain transformers

def test_tiny_preset_loads_and_generates_in_plain_transformers(tiny_model, shared_clip):
    processor, model, new_tokens, audio_tokens = plain_transformers_generate(tiny_model, clip_16k(shared_clip))
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert model.config.audio_config.max_source_positions == 50 * PRESETS["tiny"]["window_seconds"]
    assert processor.feature_extractor.chunk_length == PRESETS["tiny"]["window_seconds"]
    assert audio_tokens == 25 * PRESETS["tiny"]["window_seconds"]  # the 10 s clip is cut to the 4 s window
    assert 1 <= new_tokens.shape[1] <= 4
    assert not set(new_tokens.flatten().tolist()) & {model.config.audio_token_id}
    assert (tiny_model / "README.md").is_file()
    params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < params < 3e6


def test_tiny_preset_encoder_positions_are_whisper_sinusoids(tiny_model):
    # The released Qwen2-Audio encoder has Whisper's fixed table; a random one leaves frame order unlearnable.
    from transformers import Qwen2AudioForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import sinusoids

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_model)
    positions = model.model.audio_tower.embed_positions.weight
    assert torch.allclose(positions, sinusoids(*positions.shape))


def test_bench_processor_gives_250_audio_tokens_for_a_10s_clip(shared_clip):
    processor = build_processor("bench")
    text = processor.apply_chat_template(AUDIO_MESSAGE, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], audio=[clip_16k(shared_clip)], sampling_rate=16_000, return_tensors="pt")
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert int((inputs["input_ids"] == audio_id).sum()) == 250
    assert tuple(inputs["input_features"].shape) == (1, 128, 3000)  # 128 mels, Qwen2-Audio's 30 s window
    assert int(inputs["feature_attention_mask"].sum()) == 1000


@pytest.mark.slow
def test_bench_preset_builds_loads_and_generates(tmp_path, shared_clip):
    folder = build_tiny_preset("bench", tmp_path / "bench")
    processor, model, new_tokens, audio_tokens = plain_transformers_generate(folder, clip_16k(shared_clip), 3)
    assert audio_tokens == 250
    assert model.config.text_config.vocab_size == 156_032
    assert model.config.text_config.head_dim == 128 and model.config.audio_config.num_mel_bins == 128
    params = sum(p.numel() for p in model.parameters())
    assert 80e6 < params < 90e6, params
    assert new_tokens.shape[1] >= 1


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        build_processor("huge")


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tiny_processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model))


def test_special_tokens(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]  # one piece, never split
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_no_token_type_ids(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
    assert "token_type_ids" not in tokenizer(["a b", "c"], padding=True)


@pytest.mark.parametrize("text", [
    "plain ascii, punctuation!? 0123456789",
    "héllo wörld — ünïcödé “quotes” ‘single’",
    "中文 日本語 한국어 العربية עברית हिन्दी",
    "emoji 🎵🎶🐕‍🦺 👍🏽 flags 🇫🇷",
    "  leading and trailing spaces \t tabs \n newlines \r\n  ",
    "control \x00\x01\x7f and zero\u200bwidth",
    "ligatures ﬁ ﬂ and math ∑∫√ ≠ ≤",
    "<answer>dog</answer><think>x</think>",
])
def test_unicode_round_trips(tiny_processor, text):
    tokenizer = tiny_processor.tokenizer
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("text", ["e\u0301", "A\u030a", "\u1100\u1161"])
def test_non_nfc_text_comes_back_nfc(tiny_processor, text):
    """Like Qwen2's own tokenizer, the preset normalises to NFC: decomposed text decodes composed."""
    tokenizer = tiny_processor.tokenizer
    decoded = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert decoded == unicodedata.normalize("NFC", text)


def test_chat_template_renders_instruct_layout(tiny_processor):
    assert tiny_processor.apply_chat_template(AUDIO_MESSAGE, add_generation_prompt=True, tokenize=False) == INSTRUCT_LAYOUT
    with_system = [{"role": "system", "content": "Be brief."}] + AUDIO_MESSAGE
    rendered = tiny_processor.apply_chat_template(with_system, add_generation_prompt=False, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAudio 1: ")
    assert rendered.count("<|im_start|>system") == 1 and not rendered.endswith("assistant\n")
    two = [{"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"}, {"type": "audio", "audio_url": "b.wav"},
                                         {"type": "text", "text": "Same?"}]}]
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nSame?" in \
        tiny_processor.apply_chat_template(two, tokenize=False)
    assert tiny_processor.chat_template == CHAT_TEMPLATE


def test_load_model_pads_left(tiny_model):
    processor, _ = load_tiny(tiny_model)
    assert processor.tokenizer.padding_side == "left"


# ---------------------------------------------------------------- adapters and trainable parameters

def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return core_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 input_features=batch.input_features,
                                 feature_attention_mask=batch.feature_attention_mask).logits


def test_saved_adapter_folder_reproduces_logits(tiny_model, synth_data, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2AudioForConditionalGeneration

    processor, model = load_tiny(tiny_model)
    folder = synth_data / "train"
    batch = prompt_batch(processor, folder, samples_of(folder, 2))
    base = logits_of(model, batch)
    model = add_lora(model, rank=4, train_projector=True)
    perturb_lora(model, seed=1, scale=0.3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1)
    model.eval()
    expected = logits_of(model, batch)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    model.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")

    _, reloaded = load_tiny(tiny_model, adapter=tmp_path / "adapter")
    assert torch.allclose(logits_of(reloaded, batch), expected, atol=1e-5)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference load: frozen

    # the checkpoint folder alone (adapter + processor) as `model`: transformers finds the base through
    # adapter_config.json's base_model_name_or_path
    _, direct = load_tiny(tmp_path / "adapter")
    assert torch.allclose(logits_of(direct, batch), expected, atol=1e-5)

    plain = PeftModel.from_pretrained(Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_model)),
                                      str(tmp_path / "adapter")).eval()
    assert torch.allclose(logits_of(plain, batch), expected, atol=1e-5)


def test_adapter_folder_without_config(tiny_model, tmp_path):
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_model(tiny_model, adapter=tmp_path, device="cpu")


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lora_leaves_audio_encoder_and_projector_frozen(tiny_model):
    _, model = load_tiny(tiny_model)
    model = add_lora(model)
    names = trainable(model)
    assert names and all("lora_" in n and ".language_model." in n for n in names)
    assert not any("audio_tower" in n for n, _ in model.named_modules() if "lora" in n)  # no LoRA inside the encoder
    assert not any("audio_tower" in n or "multi_modal_projector" in n for n in names)
    targets = {n.split(".")[-4] for n in names}  # ...q_proj.lora_A.default.weight
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_trains_projector_only_when_asked(tiny_model):
    _, model = load_tiny(tiny_model)
    model = add_lora(model, train_projector=True)
    names = trainable(model)
    assert any("multi_modal_projector" in n for n in names)
    assert not any("audio_tower" in n for n in names)


@pytest.mark.parametrize("train_projector", [False, True])
def test_full_finetune_keeps_audio_tower_frozen(tiny_model, train_projector):
    _, model = load_tiny(tiny_model)
    set_full_finetune(model, train_projector)
    for name, param in model.named_parameters():
        if "audio_tower" in name:
            assert not param.requires_grad, name
        elif "multi_modal_projector" in name:
            assert param.requires_grad is train_projector, name
        else:
            assert param.requires_grad, name


def test_full_finetune_can_train_the_encoder_but_not_its_position_table(tiny_model):
    _, model = load_tiny(tiny_model)
    set_full_finetune(model, train_audio_encoder=True)
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    assert frozen == ["model.audio_tower.embed_positions.weight"]


def test_setup_model_trainable_sets(tiny_model, synth_data):
    from audio_rft.train.common import TrainConfig, setup_model
    from audio_rft.train.engine import Layout

    config = TrainConfig(model=str(tiny_model), data=str(synth_data / "train"), out="unused", device="cpu")
    _, lora, _ = setup_model(config, Layout(), "none")
    assert trainable(lora) and all("lora_" in n for n in trainable(lora))
    config.lora = False
    _, full, _ = setup_model(config, Layout(), "none")
    assert not any("audio_tower" in n or "multi_modal_projector" in n for n in trainable(full))
    assert any("language_model" in n for n in trainable(full)) and any("lm_head" in n or "embed_tokens" in n
                                                                      for n in trainable(full))
    config.lora = True
    config.train_audio_encoder = True
    with pytest.raises(UserError, match="train_audio_encoder=true needs lora=false"):
        setup_model(config, Layout(), "none")


# ---------------------------------------------------------------- rollout

@pytest.fixture(scope="module")
def rollout_setup(tiny_model, synth_data):
    """The tiny model with a perturbed LoRA (so its outputs are not the base's) and 3 prompts of different audio length."""
    processor, model = load_tiny(tiny_model)
    model = add_lora(model, rank=4)
    perturb_lora(model, seed=3, scale=0.2)
    model.eval()
    folder = synth_data / "train"
    samples = samples_of(folder, ids=[0, 1, 2])
    batch = prompt_batch(processor, folder, samples)
    return processor, model, core_model(model), folder, samples, batch


def test_prompts_are_left_padded_with_different_audio_lengths(rollout_setup):
    processor, _, _, _, _, batch = rollout_setup
    lengths = batch.attention_mask.sum(1)
    assert len(set(batch.feature_attention_mask.sum(1).tolist())) == 3
    assert len(set(lengths.tolist())) == 3
    for row, length in zip(batch.attention_mask, lengths):
        assert row[-int(length):].all() and not row[:-int(length)].any()  # left padding


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_completion_logprobs_equal_a_plain_forward(rollout_setup, shared_prefix):
    processor, _, core, _, _, batch = rollout_setup
    G, L = 2, 6
    generator = torch.Generator().manual_seed(0)
    completions = torch.randint(len(SPECIAL_TOKENS), len(processor.tokenizer), (len(batch) * G, L), generator=generator)
    with torch.no_grad():
        got = completion_logprobs(core, batch, completions, G, shared_prefix=shared_prefix, chunk=5)
        repeat = lambda t: t.repeat_interleave(G, 0)  # noqa: E731
        out = core(input_ids=torch.cat([repeat(batch.input_ids), completions], 1),
                   attention_mask=torch.cat([repeat(batch.attention_mask), torch.ones_like(completions)], 1),
                   input_features=repeat(batch.input_features), feature_attention_mask=repeat(batch.feature_attention_mask))
    P = batch.input_ids.shape[1]
    expected = out.logits[:, P - 1:-1].float().log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
    assert got.shape == (len(batch) * G, L)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # fp32 summation order differs
    with torch.no_grad():
        hot = completion_logprobs(core, batch, completions, G, shared_prefix=shared_prefix, temperature=0.5)
    expected_hot = (out.logits[:, P - 1:-1].float() / 0.5).log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
    torch.testing.assert_close(hot, expected_hot, atol=1e-5, rtol=1e-5)


def test_completion_logprobs_gradients_same_with_and_without_shared_prefix(rollout_setup):
    """The shared prefill's cache carries gradients: both paths give the LoRA weights the same gradient."""
    processor, model, core, _, _, batch = rollout_setup
    completions = torch.randint(len(SPECIAL_TOKENS), len(processor.tokenizer), (len(batch) * 2, 3),
                                generator=torch.Generator().manual_seed(7))
    weights = torch.linspace(-1, 1, completions.numel()).view_as(completions)
    grads = []
    try:
        for shared_prefix in (True, False):
            model.zero_grad(set_to_none=True)
            (completion_logprobs(core, batch, completions, 2, shared_prefix=shared_prefix) * weights).sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            assert all(p.grad is None for n, p in model.named_parameters() if "audio_tower" in n)
    finally:
        model.zero_grad(set_to_none=True)
    shared, full = grads
    assert any(g.abs().sum() > 0 for g in shared.values())
    # fp32 sums in a different order: the absolute tolerance scales with the largest gradient (a finite
    # difference in float64 agreed with both paths to 1e-5 relative; transformers keeps parts in fp32).
    scale = max(float(g.abs().max()) for g in shared.values())
    for name in shared:
        torch.testing.assert_close(shared[name], full[name], atol=1e-5 * scale, rtol=1e-4)


def test_gradient_checkpointing_keeps_one_prefill_per_prompt_and_the_same_gradient(tiny_model, synth_data):
    """Under gradient checkpointing the policy pass still prefills each prompt once (not G times), and its
    gradient equals the uncheckpointed shared-prefix path's."""
    from audio_rft.model import enable_gradient_checkpointing

    processor, model = load_tiny(tiny_model)
    model = add_lora(model, rank=4, dropout=0.0)
    perturb_lora(model, seed=3, scale=0.2)
    core = core_model(model)
    folder = synth_data / "train"
    batch = prompt_batch(processor, folder, samples_of(folder, ids=[0, 1, 2]))
    G, L = 4, 5
    completions = torch.randint(len(SPECIAL_TOKENS), len(processor.tokenizer), (len(batch) * G, L),
                                generator=torch.Generator().manual_seed(11))
    weights = torch.linspace(-1, 1, completions.numel()).view_as(completions)
    mlp = core.model.language_model.layers[0].mlp  # inside the checkpointed forward: it sees the recomputation

    def gradient(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        shapes = []
        hook = mlp.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape[:2])))
        try:
            model.zero_grad(set_to_none=True)
            (completion_logprobs(core, batch, completions, G) * weights).sum().backward()
        finally:
            hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, shapes

    plain, plain_shapes = gradient(False)
    checkpointed, shapes = gradient(True)
    P = batch.input_ids.shape[1]
    assert plain_shapes == [(len(batch), P), (len(batch) * G, L)]
    # the prefill once per prompt, the completion pass, and their recomputations in backward: never G x (P + L)
    assert shapes == [(len(batch), P), (len(batch) * G, L), (len(batch) * G, L), (len(batch), P)]
    assert any(g.abs().sum() > 0 for g in plain.values())
    scale = max(float(g.abs().max()) for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6 * scale, rtol=1e-5)


def test_audio_encoded_once_gives_the_same_samples_logprobs_and_selection(rollout_setup):
    """GRPO runs a frozen encoder once per step and reuses its output: nothing may change by it."""
    processor, _, core, _, _, batch = rollout_setup
    encoded = with_audio_encoded(core, batch)
    assert encoded.audio_hidden is not None and encoded.audio_hidden.shape[0] == len(batch)
    draw = lambda b: sample(core, processor, b, 2, 6, 1.0, 1.0, [torch.Generator().manual_seed(i) for i in range(len(b))])  # noqa: E731
    (ids, mask), (ids_cached, mask_cached) = draw(batch), draw(encoded)
    assert torch.equal(ids, ids_cached) and torch.equal(mask, mask_cached)
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(core, encoded, ids, 2), completion_logprobs(core, batch, ids, 2))
    rows = torch.tensor([2, 0])
    picked = encoded.select(rows)
    assert torch.equal(picked.input_ids, batch.input_ids[rows])
    torch.testing.assert_close(picked.audio_hidden, encode_audio(core, batch.select(rows)))


def test_a_trainable_encoder_is_never_cached(tiny_model, synth_data):
    processor, model = load_tiny(tiny_model)
    set_full_finetune(model, train_audio_encoder=True)
    folder = synth_data / "train"
    batch = prompt_batch(processor, folder, samples_of(folder, ids=[0, 1]))
    assert with_audio_encoded(model, batch).audio_hidden is None


def test_greedy_sample_equals_hf_generate(rollout_setup):
    processor, _, core, _, _, batch = rollout_setup
    ids, mask = sample(core, processor, batch, 1, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        out = core.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            input_features=batch.input_features, feature_attention_mask=batch.feature_attention_mask,
                            do_sample=False, max_new_tokens=8, suppress_tokens=suppressed_ids(processor),
                            eos_token_id=stop_ids(core, processor), pad_token_id=processor.tokenizer.pad_token_id)
    generated = out[:, batch.input_ids.shape[1]:]
    assert generated.shape[1] == ids.shape[1]
    assert torch.equal(generated, ids)


@contextlib.contextmanager
def boosted_head(core, boost: dict[int, float]):
    """Temporarily add `boost` to some token ids' logits (monkeypatch.setattr can't restore a submodule)."""
    original = core.lm_head
    core.lm_head = BoostedHead(original, boost)
    try:
        yield
    finally:
        core.lm_head = original


def test_nucleus_sampling_with_tiny_top_p_is_greedy(rollout_setup):
    processor, _, core, _, _, batch = rollout_setup
    greedy, greedy_mask = sample(core, processor, batch, 1, max_new_tokens=6, temperature=0.0)
    nucleus, nucleus_mask = sample(core, processor, batch, 1, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                                   generators=[torch.Generator().manual_seed(i) for i in range(len(batch))])
    assert torch.equal(greedy, nucleus) and torch.equal(greedy_mask, nucleus_mask)


class BoostedHead(torch.nn.Module):
    """An lm_head that adds `boost` to some token ids' logits (to make them the most likely)."""

    def __init__(self, head, boost: dict[int, float]):
        super().__init__()
        self.head, self.boost = head, boost

    def forward(self, hidden):
        logits = self.head(hidden).clone()
        for token, value in self.boost.items():
            logits[..., token] += value
        return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_audio_token_is_never_sampled(rollout_setup, temperature):
    processor, _, core, _, _, batch = rollout_setup
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    banned = set(processor.tokenizer.convert_tokens_to_ids(NEVER_GENERATE))
    with boosted_head(core, {audio_id: 1e4, **{b: 1e3 for b in banned - {audio_id}}}):
        with torch.no_grad():
            assert int(core.lm_head(torch.randn(2, core.config.text_config.hidden_size)).argmax(-1)[0]) == audio_id
        generators = [torch.Generator().manual_seed(i) for i in range(len(batch))]
        ids, mask = sample(core, processor, batch, 2, max_new_tokens=6, temperature=temperature, generators=generators)
    assert not set(ids[mask.bool()].tolist()) & banned
    assert audio_id not in ids.tolist()


def test_per_prompt_generators_make_sampling_independent_of_batching(rollout_setup):
    processor, _, core, folder, samples, batch = rollout_setup
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with boosted_head(core, {im_end: 3.0}):  # so some completions stop early
        check_batching(processor, core, folder, samples, batch)


def check_batching(processor, core, folder, samples, batch):
    seeds = [11, 22, 33]
    G, L = 3, 8
    together, together_mask = sample(core, processor, batch, G, L, temperature=1.0,
                                     generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert together.shape[0] == len(seeds) * G
    stopped = 0
    for k, (s, seed) in enumerate(zip(samples, seeds)):
        alone, alone_mask = sample(core, processor, prompt_batch(processor, folder, [s]), G, L, temperature=1.0,
                                   generators=[torch.Generator().manual_seed(seed)])
        rows = slice(k * G, (k + 1) * G)
        assert torch.equal(together_mask[rows, :alone.shape[1]], alone_mask)
        assert torch.equal(together[rows, :alone.shape[1]] * alone_mask, alone * alone_mask)
        assert not together_mask[rows, alone.shape[1]:].any()
        stopped += int((alone_mask.sum(1) < alone.shape[1]).sum())
    assert stopped > 0  # the stop path was exercised
    # the group's G completions differ from one another (noise is drawn per completion)
    assert len({tuple(r) for r in together[:G].tolist()}) > 1


def test_sample_mask_ends_at_first_stop_token(rollout_setup):
    processor, _, core, _, _, batch = rollout_setup
    stops = set(stop_ids(core, processor))
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with boosted_head(core, {im_end: 3.0}):
        ids, mask = sample(core, processor, batch, 4, 10, temperature=1.0,
                           generators=[torch.Generator().manual_seed(i) for i in range(len(batch))])
    pad = processor.tokenizer.pad_token_id
    for row, keep in zip(ids.tolist(), mask.tolist()):
        n = sum(keep)
        assert keep == [1] * n + [0] * (len(keep) - n)  # a prefix
        first_stop = next((i for i, t in enumerate(row) if t in stops), None)
        if first_stop is not None:
            assert n == first_stop + 1 and all(t == pad for t in row[n:])
        else:
            assert n == len(row)
    texts = decode(processor, ids, mask)
    assert not any("<|im_end|>" in t or "<|endoftext|>" in t for t in texts)


def test_stop_tokens_default_to_the_model_s_and_an_empty_list_runs_to_max_new_tokens(rollout_setup):
    processor, _, core, _, _, batch = rollout_setup
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def draw(**kw):
        return sample(core, processor, batch, 4, 10, temperature=1.0,
                      generators=[torch.Generator().manual_seed(i) for i in range(len(batch))], **kw)

    # +5 makes <|im_end|> about 14% likely per token: some of the 120 draws stop early, whatever the seeds
    with boosted_head(core, {im_end: 5.0}):
        default, explicit, fixed = draw(), draw(stop_tokens=stop_ids(core, processor)), draw(stop_tokens=[])
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    assert default[1].sum() < default[1].numel()  # some completions stopped early by default
    ids, mask = fixed
    assert ids.shape == (4 * len(batch), 10) and bool(mask.all())  # with no stop token, every one runs to L
    # the same draws up to each row's first stop: the stop tokens change only where a completion ends
    assert torch.equal(ids[:, :default[0].shape[1]] * default[1], default[0] * default[1])


# ---------------------------------------------------------------- errors

def test_uncached_hub_id_offline_is_a_one_line_user_error(synth_data, tmp_path):
    done = run_cli(["infer", "--model", "Qwen/Qwen2-Audio-7B-Instruct", "--data", str(synth_data / "test"),
                    "--out", str(tmp_path / "pred.json")],
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hub")},
                   timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("audio-rft")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "not in the Hugging Face cache" in lines[0] and "`hf download Qwen/Qwen2-Audio-7B-Instruct`" in lines[0]


def test_bare_name_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="no such folder"):
        load_model("no-such-model-folder", device="cpu")
