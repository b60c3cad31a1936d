"""Prompts in, completions and their log-probs out: the part of Qwen2-Audio that training and eval share.

Audio is the expensive, frozen part, and the prompt (up to 750 audio tokens) dwarfs a 10-token answer.
So each prompt is encoded once: the audio tower and projector run once per clip, the language model
prefills the prompt once, and its KV cache is repeated for the G completions, both when sampling and
when computing the log-probs the loss needs. Logits are computed only at completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakTensorKeyDictionary

from audio_rft import UserError
from audio_rft.compat import (CacheLayer, audio_output_lengths, bidirectional_mask, is_fake, lm_forward, output_cache,
                              prompt_cache, repeat_cache)
from audio_rft.data.audio import read_wav
from audio_rft.data.dataset import resolve_audio
from audio_rft.data.schema import Sample
from audio_rft.model import NEVER_GENERATE
from audio_rft.prompts import chat_messages


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, P), left-padded
    attention_mask: torch.Tensor  # (B, P)
    input_features: torch.Tensor  # (B, mels, frames)
    feature_attention_mask: torch.Tensor  # (B, frames)
    # The audio tower's output, when it is frozen: computed once (with_audio_encoded) and reused by every
    # pass over the batch, so a GRPO step runs the encoder once instead of once per pass.
    audio_hidden: torch.Tensor | None = None  # (B, frames / 2, audio width)

    def _map(self, fn) -> "PromptBatch":
        return PromptBatch(*(None if t is None else fn(t) for t in (
            self.input_ids, self.attention_mask, self.input_features, self.feature_attention_mask, self.audio_hidden)))

    def to(self, device) -> "PromptBatch":
        return self._map(lambda t: t.to(device))

    def select(self, rows: torch.Tensor) -> "PromptBatch":
        """The prompts at `rows` (a 1-D index tensor)."""
        return self._map(lambda t: t[rows.to(t.device)])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def load_waveforms(folder: str | Path, samples: list[Sample], ablate_audio: bool = False) -> list[np.ndarray]:
    """The prepared 16 kHz clips; with `ablate_audio`, silence of the same length (the no-listening control)."""
    waves = [read_wav(resolve_audio(folder, s)) for s in samples]
    return [np.zeros_like(w) for w in waves] if ablate_audio else waves


def prompt_strings(processor, samples: list[Sample], mode: str | list[str]) -> list[str]:
    """Chat-formatted prompts; `mode` is one prompt mode or one per sample."""
    modes = [mode] * len(samples) if isinstance(mode, str) else mode
    return [processor.apply_chat_template(chat_messages(s, m), add_generation_prompt=True, tokenize=False)
            for s, m in zip(samples, modes)]


def encode_prompts(processor, samples: list[Sample], waveforms: list[np.ndarray], mode: str | list[str],
                   max_prompt_tokens: int | None = None) -> PromptBatch:
    """Chat-format, tokenize (left padding) and featurize a batch of prompts."""
    texts = prompt_strings(processor, samples, mode)
    inputs = processor(text=texts, audio=waveforms, return_tensors="pt", padding=True, sampling_rate=16_000)
    batch = PromptBatch(inputs["input_ids"], inputs["attention_mask"], inputs["input_features"],
                        inputs["feature_attention_mask"])
    if max_prompt_tokens and batch.attention_mask.sum(1).max() > max_prompt_tokens:
        longest = int(batch.attention_mask.sum(1).max())
        # Cutting a prompt would cut audio tokens and break the audio/token alignment: refuse instead.
        raise UserError(f"a prompt has {longest} tokens (audio included), over max_prompt_tokens={max_prompt_tokens}; "
                         "raise max_prompt_tokens rather than truncating audio tokens")
    return batch


def _tower_trains(core) -> bool:
    return any(p.requires_grad for p in core.model.audio_tower.parameters())


def encode_audio(core, batch: PromptBatch) -> torch.Tensor:
    """The audio tower's last hidden state for every clip (padded frames masked out of attention)."""
    tower = core.model.audio_tower
    dtype = core.model.get_input_embeddings().weight.dtype
    feature_lengths, _ = audio_output_lengths(tower, batch.feature_attention_mask.sum(-1))
    frames = (batch.input_features.shape[-1] - 2) // 2 + 1
    device = batch.input_features.device
    valid = (torch.arange(frames, device=device)[None, :] < feature_lengths[:, None]).long()
    mask = bidirectional_mask(tower.config, valid, dtype)
    with torch.set_grad_enabled(torch.is_grad_enabled() and _tower_trains(core)):
        return tower(batch.input_features.to(dtype), attention_mask=mask).last_hidden_state


def with_audio_encoded(core, batch: PromptBatch) -> PromptBatch:
    """The batch with its audio tower output attached, when the tower is frozen (else unchanged)."""
    if _tower_trains(core):
        return batch
    with torch.no_grad():
        return replace(batch, audio_hidden=encode_audio(core, batch))


def prompt_embeddings(core, batch: PromptBatch) -> torch.Tensor:
    """Token embeddings with each clip's audio features written over its <|AUDIO|> placeholders.

    The same merge Qwen2AudioModel.forward does, kept here so the language model can be called on
    embeddings directly (once per prompt) and the frozen audio tower never builds a graph.
    """
    qwen = core.model
    embeds = qwen.get_input_embeddings()(batch.input_ids)
    hidden = batch.audio_hidden if batch.audio_hidden is not None else encode_audio(core, batch)
    _, audio_lengths = audio_output_lengths(qwen.audio_tower, batch.feature_attention_mask.sum(-1))
    features = qwen.multi_modal_projector(hidden)
    placeholders = batch.input_ids == core.config.audio_token_id
    if not is_fake(placeholders):  # fake tensors (audio_rft.trace) carry no data to check
        counts = placeholders.sum(1)
        if not torch.equal(counts, audio_lengths.to(counts.device)):
            raise ValueError(f"audio tokens ({int(counts.sum())}) and audio features ({int(audio_lengths.sum())}) "
                             "do not match")
    # The k-th placeholder of a row takes the row's k-th audio frame: the same copy as masked_scatter of the valid
    # frames (Qwen2AudioModel.forward), in shapes that do not depend on the data, so it also runs on fake tensors.
    frame = (placeholders.cumsum(1) - 1).clamp(min=0)
    gathered = features.gather(1, frame[..., None].expand(-1, -1, features.shape[-1]))
    return torch.where(placeholders[..., None], gathered.to(embeds.dtype), embeds)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: real tokens count from 0, as generate() does.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prefill(core, embeds: torch.Tensor, mask: torch.Tensor, repeats: int):
    """Run the prompt once; return the last hidden state and the KV cache, each repeated per completion."""
    out = core.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                                    use_cache=True)
    cache = output_cache(out)
    if repeats > 1:
        repeat_cache(cache, repeats)
    return out.last_hidden_state[:, -1].repeat_interleave(repeats, 0), cache


def suppressed_ids(processor) -> list[int]:
    return processor.tokenizer.convert_tokens_to_ids(NEVER_GENERATE)


def stop_ids(core, processor) -> list[int]:
    eos = core.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(core, processor, batch: PromptBatch, num_generations: int = 1, max_new_tokens: int = 32,
           temperature: float = 0.0, top_p: float = 1.0, generators: list[torch.Generator] | None = None,
           all_done: Callable[[bool], bool] | None = None,
           stop_tokens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `num_generations` completions per prompt (greedy at temperature 0) from one prefill.

    Each token is drawn by inverting the softmax's cumulative distribution at one uniform per row, and
    each prompt's uniforms come from its own generator, so a prompt's completions depend only on its own
    seed and logits: not on which other prompts share its batch or process.
    Returns completion ids (B*G, L) grouped by prompt, and a mask that is 1 up to and including the
    first stop token (padding after it is 0). The stop tokens are the model's (stop_ids) unless
    `stop_tokens` is given; `stop_tokens=[]` runs every completion to `max_new_tokens` (fixed-length
    benchmarking). `all_done` turns "this batch is done" into "every rank is done": under sharding each
    decode step gathers parameters collectively, so all ranks step together.

    Each step costs little beyond the model's own forward and head: the attention mask, the KV cache
    (see GrowInPlace) and the output buffers are allocated once, and the V-wide work per row is one
    exp, done in place, and one sum (see _InverseCDF).
    """
    device = batch.input_ids.device
    eos = torch.tensor(stop_ids(core, processor) if stop_tokens is None else stop_tokens, dtype=torch.long,
                       device=device)
    pad_id = processor.tokenizer.pad_token_id
    banned = torch.tensor(suppressed_ids(processor), dtype=torch.long, device=device)
    prompt_mask = batch.attention_mask.repeat_interleave(num_generations, 0)
    rows, prompt_len = prompt_mask.shape
    hidden, cache = prefill(core, prompt_embeddings(core, batch), batch.attention_mask, num_generations)
    for layer in cache.layers:
        if type(layer) is CacheLayer:  # (a sliding-window layer keeps its own growth rule)
            GrowInPlace.reserve(layer, max_new_tokens)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, max_new_tokens)], dim=1)  # step t reads mask[:, :P + t + 1]
    position = prompt_mask.sum(-1, keepdim=True)
    embed, head, lm = core.get_input_embeddings(), core.lm_head, core.model.language_model
    head_weight = decode_weight(head)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=device)
    draw = _InverseCDF(num_generations, generators, device) if temperature > 0 else None
    steps = 0
    for t in range(max_new_tokens):
        logits = head_logits(head, head_weight, hidden)
        logits.index_fill_(-1, banned, float("-inf"))
        if draw is None:
            token = logits.argmax(-1)
        else:
            logits.div_(temperature)
            if top_p < 1.0:
                probs, order = F.softmax(logits, dim=-1).sort(-1, descending=True)
                drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
                logits = logits.scatter(-1, order, logits.gather(-1, order).masked_fill(drop, float("-inf")))
            token = draw(logits)
        token.masked_fill_(finished, pad_id)
        tokens[:, t] = token
        alive[:, t] = ~finished
        steps = t + 1
        finished |= torch.isin(token, eos)
        done = bool(finished.all())
        if all_done(done) if all_done is not None else done:
            break
        out = lm_forward(lm, inputs_embeds=embed(token[:, None]), attention_mask=mask[:, :prompt_len + t + 1],
                         position_ids=position + t, cache=cache, use_cache=True)
        cache, hidden = output_cache(out), out.last_hidden_state[:, -1]
    return tokens[:, :steps], alive[:, :steps]


def head_logits(head, weight: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of a few rows (one decode step): (rows, V), a fresh tensor the caller may change in place.

    A plain head's weight, from decode_weight, goes through frozen_linear; a wrapped or sharded head (weight
    None) through its own forward.
    """
    if weight is None:
        return head(hidden).float()
    return frozen_linear(hidden, weight).float()


def decode_weight(head) -> torch.Tensor | None:
    """The plain head's weight as a frozen tensor for one decode loop (the weight cannot change during it): a
    frozen weight itself, whose packed copy then serves every loop, or a training weight's detached alias."""
    weight = _plain_weight(head)
    return weight.detach() if weight is not None and weight.requires_grad else weight


class _InverseCDF:
    """Draws one token per row from softmax(logits): the first token whose cumulative probability passes
    u · total, u ~ U[0, 1), with each prompt's G uniforms drawn from its own generator.

    One uniform per row replaces the V Gumbel variates per row that Gumbel-max needs (the same
    distribution; the draws, and so the samples, differ from Gumbel-max's). The search runs in two
    levels: blocks of BLOCK tokens, then the tokens of the chosen block, each a float64 cumulative sum,
    so no token's probability is lost to rounding while the V-wide work stays one exp and one sum per
    row. A token at −inf weighs 0 and is never drawn.
    """

    BLOCK = 1024

    def __init__(self, group: int, generators: list[torch.Generator] | None, device):
        self.group, self.generators, self.device = group, generators, torch.device(device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        if self.generators is None:
            uniforms = torch.rand(rows, dtype=torch.float64, device=self.device)
        else:  # CPU generators draw on the CPU; G numbers per prompt per step
            uniforms = torch.cat([torch.rand(self.group, dtype=torch.float64, generator=g)
                                  for g in self.generators]).to(self.device)
        weights = logits.sub_(logits.amax(-1, keepdim=True)).exp_()  # unnormalised probabilities, in place
        blocks = -(-vocab // self.BLOCK)
        if blocks * self.BLOCK != vocab:
            weights = F.pad(weights, (0, blocks * self.BLOCK - vocab))  # padding weighs 0
        weights = weights.view(rows, blocks, self.BLOCK)
        block_mass = weights.sum(-1, dtype=torch.float64)
        block_cumulative = block_mass.cumsum(-1)
        target = uniforms[:, None] * block_cumulative[:, -1:]  # < the total, so a block of mass > 0 holds it
        block = torch.searchsorted(block_cumulative, target, right=True).clamp_(max=blocks - 1)
        within = target - (block_cumulative.gather(-1, block) - block_mass.gather(-1, block))
        inner = weights[torch.arange(rows, device=weights.device), block.squeeze(-1)].cumsum(-1, dtype=torch.float64)
        # the block's own sum and its cumulative sum may round apart: stay strictly inside its mass
        within = torch.minimum(within, torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:])))
        token = torch.searchsorted(inner, within, right=True).clamp_(max=self.BLOCK - 1)
        return (block * self.BLOCK + token).squeeze(-1)


class GrowInPlace(CacheLayer):
    """One layer's KV cache with room reserved for the completion: each decode step writes its keys and
    values into the reserved space instead of concatenating (and so copying) the whole cache."""

    @staticmethod
    def reserve(layer: CacheLayer, extra: int) -> None:
        keys, values = layer.keys, layer.values
        n = keys.shape[-2]
        layer._keys = keys.new_empty((*keys.shape[:-2], n + extra, keys.shape[-1]))
        layer._values = values.new_empty((*values.shape[:-2], n + extra, values.shape[-1]))
        layer._keys[..., :n, :] = keys
        layer._values[..., :n, :] = values
        layer.keys, layer.values = layer._keys[..., :n, :], layer._values[..., :n, :]
        layer.__class__ = GrowInPlace

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, m = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        self._keys[..., n:m, :] = key_states
        self._values[..., n:m, :] = value_states
        self.keys, self.values = self._keys[..., :m, :], self._values[..., :m, :]
        return self.keys, self.values


def completion_logprobs(core, batch: PromptBatch, completion_ids: torch.Tensor, num_generations: int,
                        shared_prefix: bool = True, chunk: int = 4096, temperature: float = 1.0,
                        with_neg_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(o_t | q, o_<t) for every completion token: (B*G, L), with π the softmax of logits / temperature.

    With `with_neg_entropy`, also Σ_v π(v) log π(v) at every completion position (B*G, L), without gradient
    (token_neg_entropy): the V-wide term of BNF's loss.

    GRPO passes its sampling temperature, so the policy it scores is the one it sampled from; at T=1
    scoring samples drawn at T=0.7 gives a biased gradient that sharpens the policy without learning.

    With `shared_prefix` (what training uses) and G > 1 the prompt is prefilled once and its cache
    repeated G times, gradients flowing through it, under gradient checkpointing too: every decoder
    layer, of the prefill and of the completion pass, may be checkpointed, because the prefill writes a
    cache whose writes replace (PromptOnly) and the completion pass reads the repeated prefix read-only
    (ReadOnlyPrefix), so a layer recomputed in backward sees exactly what its forward saw. Otherwise
    the prompt embeddings are repeated and the whole sequence runs at once: the plain reference the
    tests compare with, and all a single completion per prompt (SFT) needs. Both give the same numbers.
    """
    embeds = prompt_embeddings(core, batch)
    prompt_mask = batch.attention_mask.repeat_interleave(num_generations, 0)
    completion_embeds = core.get_input_embeddings()(completion_ids)
    full_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
    positions = _positions(full_mask)
    lm = core.model.language_model
    if shared_prefix and num_generations > 1:
        prompt = prompt_cache(PromptOnly)
        out = lm_forward(lm, inputs_embeds=embeds, attention_mask=batch.attention_mask,
                         position_ids=_positions(batch.attention_mask), cache=prompt, use_cache=True)
        last = out.last_hidden_state[:, -1].repeat_interleave(num_generations, 0)
        cache = prompt_cache(layers=[ReadOnlyPrefix.repeated(layer, num_generations) for layer in prompt.layers])
        out = lm_forward(lm, inputs_embeds=completion_embeds, attention_mask=full_mask,
                         position_ids=positions[:, prompt_mask.shape[1]:], cache=cache, use_cache=True)
        hidden = torch.cat([last[:, None], out.last_hidden_state[:, :-1]], dim=1)
    else:
        sequence = torch.cat([embeds.repeat_interleave(num_generations, 0), completion_embeds], dim=1)
        out = lm(inputs_embeds=sequence, attention_mask=full_mask, position_ids=positions, use_cache=False)
        hidden = out.last_hidden_state[:, prompt_mask.shape[1] - 1: -1]
    logps = token_logprobs(core.lm_head, hidden, completion_ids, chunk, temperature)
    if not with_neg_entropy:
        return logps
    return logps, token_neg_entropy(core.lm_head, hidden, chunk, temperature).view_as(logps)


# transformers' dynamic cache layer (compat.CacheLayer) appends each forward's keys to the cache in place: a
# checkpointed layer recomputed in backward would append them a second time. These two never grow, so
# recomputation is safe (model.enable_gradient_checkpointing lets checkpointed decoder layers keep such a cache).


class PromptOnly(CacheLayer):
    """One layer's cache of the prompt, written by the prefill alone: a write replaces, never appends."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class ReadOnlyPrefix(CacheLayer):
    """One layer's prompt keys/values, read by each of a prompt's G completions, never extended.

    The prompt's keys and values are kept once and joined to each completion's inside the layer's own
    forward: `cat` reads them through a broadcast view (no repeated copy is made), and autograd sums their
    G gradients in that layer's backward. Repeated before the completion pass, as they once were, every
    layer's (B·G, heads, P, head dim) prefix gradient waited for the end of backward (the repeat ran before
    the pass, so its backward runs after all of it): traced at the 7B with checkpointing, the policy pass
    held 6.6 GiB more per GPU that way (docs/performance.md).
    """

    @classmethod
    def repeated(cls, prompt: CacheLayer, repeats: int) -> "ReadOnlyPrefix":
        layer = cls()
        layer.lazy_initialization(prompt.keys, prompt.values)
        layer.keys, layer.values, layer.repeats = prompt.keys, prompt.values, repeats
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._joined(self.keys, key_states), self._joined(self.values, value_states)

    def _joined(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """[prefix, new] along the tokens for every completion: (B·G, heads, P + L, head dim), row i·G + g being
        prompt i's prefix and completion g's own, as repeat_interleave(G) then cat would give."""
        batch, heads, _, dim = prefix.shape
        shared = prefix[:, None].expand(batch, self.repeats, heads, prefix.shape[-2], dim)
        own = new.view(batch, self.repeats, heads, new.shape[-2], dim)
        return torch.cat([shared, own], dim=-2).flatten(0, 1)


LOGPROB_CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in fp32): 215 rows at Qwen2-Audio's vocabulary


def token_logprobs(head, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 4096,
                   temperature: float = 1.0, chunk_elements: int = LOGPROB_CHUNK_ELEMENTS) -> torch.Tensor:
    """log-softmax(head(hidden) / temperature) at `ids`, never holding V-wide logits beyond one chunk.

    Rows go through the head `chunk` at a time (fewer when `chunk` rows would pass `chunk_elements` logits).
    With gradients, no (N, V) float32 tensor lives from the forward to the backward, and the values and
    gradients are those of the plain computation (tests/test_logprobs.py), one of two ways:
    - a frozen plain head (LoRA): each chunk's gradient with respect to its hidden rows is taken in the
      forward, where the chunk's softmax is at hand (FrozenHeadLogprobs), so backward does no V-wide work;
    - otherwise each chunk is checkpointed: its forward keeps only its hidden rows, and backward recomputes
      that chunk's logits and log-softmax (the fused linear-cross-entropy idea). The head stays a module
      call, so a sharding engine's hooks gather its weight in the forward and again in the recomputation.
    """
    flat_hidden, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    rows = max(1, min(chunk, chunk_elements // _vocab_width(head, flat_hidden)))
    head_trains = any(p.requires_grad for p in head.parameters())
    recompute = torch.is_grad_enabled() and (flat_hidden.requires_grad or head_trains)
    frozen_weight = None if head_trains else _plain_weight(head)
    parts = []
    for start in range(0, flat_ids.numel(), rows):
        args = (flat_hidden[start:start + rows], flat_ids[start:start + rows], temperature)
        if frozen_weight is not None:
            parts.append(FrozenHeadLogprobs.apply(frozen_weight, *args) if recompute
                         else _frozen_chunk_logprobs(frozen_weight, *args, direction=False)[0])
        elif recompute:
            parts.append(checkpoint(_chunk_logprobs, head, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_chunk_logprobs(head, *args))
    return torch.cat(parts).view_as(ids)


def prompt_logprobs(core, batch: PromptBatch, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_j | x_<j) for every prompt token after the first, and the mask of those that are predicted text:
    (B, P − 1) each. Padding and the audio placeholders (whose embeddings are the clip's features, not tokens the
    model reads or writes) are masked out. ORPO's `nll_tokens=all` adds these to its NLL term."""
    embeds = prompt_embeddings(core, batch)
    out = core.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                    position_ids=_positions(batch.attention_mask), use_cache=False)
    targets = batch.input_ids[:, 1:]
    mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool() & (targets != core.config.audio_token_id)
    return token_logprobs(core.lm_head, out.last_hidden_state[:, :-1], targets, chunk), mask


@torch.no_grad()
def token_neg_entropy(head, hidden: torch.Tensor, chunk: int = 4096, temperature: float = 1.0,
                      chunk_elements: int = LOGPROB_CHUNK_ELEMENTS) -> torch.Tensor:
    """Σ_v p_v log p_v (minus the entropy) of softmax(head(hidden) / temperature) per row, in chunks as
    token_logprobs, never holding more than one chunk of V-wide logits, and without gradient: as a function of
    the logits z with p held fixed (sg(p_v) log p_v, BNF's V-wide term) its gradient is
    p_u − p_u Σ_v p_v = 0, so nothing is lost and nothing V-wide is kept for backward."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = max(1, min(chunk, chunk_elements // _vocab_width(head, flat)))
    weight = None if any(p.requires_grad for p in head.parameters()) else _plain_weight(head)
    parts = []
    for start in range(0, flat.shape[0], rows):
        piece = flat[start:start + rows]
        logits = (head(piece) if weight is None else frozen_linear(piece, weight)).float()
        if temperature != 1.0:
            logits = logits / temperature
        logp = logits.log_softmax(-1)
        parts.append((logp.exp() * logp).sum(-1))
    return torch.cat(parts).view(hidden.shape[:-1])


def _chunk_logprobs(head, hidden: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:  # x / 1.0 is x: skipping it changes no value
        logits = logits / temperature
    return logits.gather(-1, ids[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _frozen_chunk_logprobs(weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, temperature: float,
                           direction: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A frozen head's log-probs at `ids`, and with `direction` their gradient with respect to `hidden`
    (FrozenHeadLogprobs' equation), from one V-wide buffer."""
    logits = frozen_linear(hidden, weight).float()
    if temperature != 1.0:
        logits = logits.div_(temperature)
    chosen = logits.gather(-1, ids[:, None]).squeeze(-1)
    # logsumexp by hand, in place on the chunk's one V-wide buffer: torch.logsumexp allocates two more, and on
    # CPU the fresh pages of a 100+ MB tensor cost as much as the exp itself
    peak = logits.amax(-1, keepdim=True)
    weights = logits.sub_(peak).exp_()  # exp(z − max z): the softmax, unnormalised
    total = weights.sum(-1, keepdim=True)
    values = chosen - (peak + total.log()).squeeze(-1)
    if not direction:
        return values, None
    # W_id − Σ_v p_v W_v = −(p − onehot(id))·W: forming p − onehot first, as autograd's log-softmax backward does,
    # keeps a confident token's small gradient exact (W_id − Σ p_v W_v would cancel two nearly equal rows)
    probs = weights.div_(total)
    probs[torch.arange(ids.numel(), device=ids.device), ids] -= 1.0
    direction = frozen_linear(probs.to(weight.dtype), weight, transposed=True).float().div_(-temperature)
    return values, direction.to(hidden.dtype)


class FrozenHeadLogprobs(torch.autograd.Function):
    """log p(id | h) = z_id − logsumexp(z), z = h Wᵀ / T, for a frozen head W, with its gradient taken in the forward:

        ∂ log p(id | h) / ∂h = (W_id − Σ_v p_v W_v) / T = −(p − onehot(id))·W / T,   p = softmax(z),

    an (N, H) tensor, kept for backward in place of the (N, V) logits; backward multiplies it by the
    incoming gradient. Two V-wide matrix products in all (z, and p·W) where recomputing in backward takes
    three (z, z again, and the gradient's product); the values are the plain path's, the gradient equal
    to it to float rounding.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, temperature: float):
        values, direction = _frozen_chunk_logprobs(weight, hidden, ids, temperature, direction=True)
        ctx.save_for_backward(direction)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (direction,) = ctx.saved_tensors
        return None, grad[:, None].to(direction.dtype) * direction, None, None


_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> {transposed: (version key, packed copy)}


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """x·Wᵀ, or x·W with `transposed`, for a weight that does not train (requires_grad False).

    On CPU in float32 this goes through oneDNN's prepacked matrix product (what torch.compile emits for a
    CPU linear), faster than MKL's at a head's shapes (docs/performance.md), for one more copy of the
    weight (two with the transposed). The packed copy is made on first use and lives as long as the weight
    object; it is remade if the weight's storage or version counter moves (a checkpoint load copies in
    place). A weight that trains is never packed here: an engine may write its updates without moving
    either (under DeepSpeed ZeRO-2 a cached pack went stale, tests/test_distributed.py), so a caller that
    holds a training weight still for a while (a decode loop) passes a detached alias, whose pack dies with
    it. Each row's result does not depend on how many rows share the call (tests/test_logprobs.py).
    Elsewhere it is the plain product.
    """
    if weight.requires_grad or not (_ONEDNN and x.device.type == "cpu" and x.dim() == 2
                                    and x.dtype == weight.dtype == torch.float32):
        return x @ weight if transposed else F.linear(x, weight)
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    packs = _PACKED.setdefault(weight, {})
    if transposed not in packs or packs[transposed][0] != key:
        with torch.no_grad():
            source = weight.detach().t().contiguous() if transposed else weight.detach()
            packs[transposed] = (key, torch.ops.mkldnn._reorder_linear_weight(source, None))
    return torch.ops.mkldnn._linear_pointwise(x, packs[transposed][1], None, "none", [], "")


def _plain_weight(head) -> torch.Tensor | None:
    """The head's weight when the head is a bias-free Linear whose weight is all here (not a DTensor shard or a
    ZeRO-3 placeholder, which only the module's own hooks gather); else None."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or hasattr(weight, "ds_id"):
        return None
    return weight if tuple(weight.shape) == (head.out_features, head.in_features) else None


def _vocab_width(head, hidden: torch.Tensor) -> int:
    out = getattr(head, "out_features", None)
    if out is None:  # a wrapped head: ask it (one row, no gradient)
        with torch.no_grad():
            out = head(hidden[:1]).shape[-1]
    return int(out)


def decode(processor, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """Completion text without the stop token and padding."""
    special = set(processor.tokenizer.all_special_ids)
    texts = []
    for ids, keep in zip(completion_ids.tolist(), completion_mask.tolist()):
        texts.append(processor.tokenizer.decode([t for t, k in zip(ids, keep) if k and t not in special]))
    return texts
