"""`audio-rft plan --trace`: one training step of our own code, traced at full size without its memory.

The step is built from the pieces a run uses: the engine (audio_rft.train.engine.build_engine: DDP, FSDP2
`fully_shard` per layer, the frozen reference copy), rollout.py's passes (the audio encoded once, each
prompt prefilled once for its G completions, completion-only log-probs, the reference pass) and the
trainers' losses (grpo_loss, sft_nll), at the stage's own grad_accum, G, prompt and completion lengths
and on the real model config. Under torch's FakeTensorMode every tensor has its shape, dtype and device
but no data, so the 7B's 8.4B parameters cost nothing, and a fake process group of the stage's world
size stands in for the other GPUs (collectives return at once; FSDP2 still allocates its buffers).

What is counted:
- fsdp: torch's FSDPMemTracker (sharded and gathered parameters, gradients, optimizer state,
  activations, backward temporaries, collective buffers), plus the frozen reference copy's shards,
  which exist before the tracker starts and which it does not see;
- none / ddp (each GPU holds the whole model; DDP's gradients live in its buckets, so a ddp GPU holds
  what one process holds; the trace runs one process): ByteCounter, below, a light counter of live
  tensor storages (torch's MemTracker is too slow on PEFT models: minutes per step);
- deepspeed cannot be faked (its engine allocates real flat buffers): plan says so and keeps the formula.

Sampling cannot run on fake tensors (it stops on data), so the rollout is bounded, not replayed: the
prefill of G copies, the KV cache grown to its full length (rollout.GrowInPlace reserves it whole
before the first token, so its size is the loop's for every step), and one decode step at the last
position, every completion at max_completion_length (the worst case).

Two steps are traced: AdamW's state exists only from the second. Not modelled: the CUDA context (plan
adds it), NCCL's own buffers, allocator fragmentation, and the difference between CPU and CUDA kernels'
workspaces. The fake-tensor pieces rest on torch internals, all in audio_rft.compat (`fake_*`).
"""

from __future__ import annotations

import functools
import time
import types
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from audio_rft import UserError

GIB = 2**30
TRACEABLE = ("none", "ddp", "fsdp")
AUDIO_TOKEN_ID = 151646  # Qwen2-Audio-7B's <|AUDIO|>
TEXT_TOKENS = 10  # prompt tokens that are not audio, at least (chat markers, the question)
REFERENCE = "Reference (sharded, outside the tracker)"


# ---------------------------------------------------------------- the model, from its shapes


def model_config(shapes: dict):
    """A Qwen2AudioConfig with plan's shapes (audio_rft.plan.shapes_for_*), set explicitly: Qwen2AudioConfig's own
    text defaults are not the 7B's."""
    from transformers import Qwen2AudioConfig

    a, t = shapes["audio"], shapes["text"]
    audio_token = AUDIO_TOKEN_ID if t["vocab"] > AUDIO_TOKEN_ID else t["vocab"] - 2
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=a["mels"], d_model=a["d_model"],
                          encoder_layers=a["layers"], encoder_attention_heads=a["heads"], encoder_ffn_dim=a["ffn"],
                          max_source_positions=a["max_source_positions"]),
        text_config=dict(model_type="qwen2", vocab_size=t["vocab"], hidden_size=t["hidden"],
                         intermediate_size=t["intermediate"], num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], head_dim=t["head_dim"],
                         rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=t["tied"]),
        audio_token_index=audio_token, tie_word_embeddings=t["tied"])


def build_model(shapes: dict, config, master: torch.dtype):
    """The stage's model with exactly its trainable parameters, as common.setup_model makes it (LoRA or full,
    projector, gradient checkpointing), in the dtype the engine loads, on the `meta` device (no storage: PEFT
    never touches data there); compat.fake_materialize then gives it fake (or real random) CPU tensors."""
    from transformers import Qwen2AudioForConditionalGeneration

    from audio_rft.model import add_lora, enable_gradient_checkpointing, set_full_finetune

    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(model_config(shapes)).to(master)
    if config.lora:
        model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets or None,
                         config.train_projector)
    else:
        set_full_finetune(model, config.train_projector, config.train_audio_encoder)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def prompt_batch(shapes: dict, batch_size: int, prompt_tokens: int, audio_token_id: int, vocab: int):
    """B prompts of P tokens, each with one clip of the encoder's full window (30 s for the 7B: 750 audio tokens)."""
    from audio_rft.rollout import PromptBatch

    a = shapes["audio"]
    frames = 2 * a["max_source_positions"]
    audio = a["max_source_positions"] // 2
    if prompt_tokens < audio + TEXT_TOKENS:
        raise UserError(f"prompt_tokens {prompt_tokens}: a full clip alone is {audio} audio tokens "
                        f"(give at least {audio + TEXT_TOKENS})")
    ids = torch.randint(0, min(vocab, audio_token_id), (batch_size, prompt_tokens))
    ids[:, 5:5 + audio] = audio_token_id
    return PromptBatch(ids, torch.ones_like(ids), torch.randn(batch_size, a["mels"], frames),
                       torch.ones(batch_size, frames, dtype=torch.long))


# ---------------------------------------------------------------- counting


class ByteCounter(TorchDispatchMode):
    """Bytes of live tensor storages, their peak, what the peak was made of, and the peak of each phase.

    Every storage an operation returns is counted once, until it is freed, under a category: "activations"
    (made in a forward), "backward temporaries" (made in backward), "optimizer state" (made in the optimizer
    phase); `track` adds storages made before counting began (parameters, buffers) under a name of their own,
    and gradients move to "gradients" as they are accumulated. Resizing a storage in place
    (torch.UntypedStorage.resize_, which no dispatch mode sees) is followed too. Cheap: per operation, a
    dictionary lookup per output; per new peak, a copy of a handful of totals. (torch's MemTracker also keeps
    per-module snapshots at every operation, which takes minutes per step on a PEFT model.)
    """

    OPTIMIZER = "optimizer step"

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()  # storage -> [bytes, category]
        self.totals: dict[str, int] = {}
        self.current = self.peak = self.phase_peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self.phase_name: str | None = None
        self._resize = None

    def _add(self, storage, category: str) -> None:
        if storage in self.live:
            return
        entry = [storage.nbytes(), category]
        self.live[storage] = entry
        weakref.finalize(storage, self._move, entry, -1)
        self._move(entry, 1)

    def _move(self, entry, sign: int) -> None:
        self._change(entry[1], sign * entry[0])

    def _change(self, category: str, nbytes: int) -> None:
        self.totals[category] = self.totals.get(category, 0) + nbytes
        self.current += nbytes
        if self.current > self.phase_peak:
            self.phase_peak = self.current
            if self.current > self.peak:
                self.peak = self.current
                self.peak_breakdown = dict(self.totals)

    def relabel(self, tensor: torch.Tensor, category: str) -> None:
        storage = _local(tensor).untyped_storage()
        entry = self.live.get(storage)
        if entry is None:
            self._add(storage, category)
        elif entry[1] != category:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] = self.totals.get(category, 0) + entry[0]
            entry[1] = category

    def track(self, tensors, category: str) -> None:
        for tensor in tensors:
            self._add(_local(tensor).untyped_storage(), category)

    def watch_gradients(self, params) -> list:
        return [p.register_post_accumulate_grad_hook(lambda p: self.relabel(p.grad, "gradients"))
                for p in params if p.requires_grad]

    @contextmanager
    def phase(self, name: str):
        self.phase_name, self.phase_peak = name, self.current
        try:
            yield
        finally:
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.phase_peak)
            self.phase_name = None

    def __enter__(self):
        original = self._resize = torch.UntypedStorage.resize_
        counter = self

        def resize_(storage, size):
            entry = counter.live.get(storage)
            result = original(storage, size)
            if entry is not None and storage.nbytes() != entry[0]:
                change, entry[0] = storage.nbytes() - entry[0], storage.nbytes()
                counter._change(entry[1], change)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.phase_name == self.OPTIMIZER:
            category = "optimizer state"
        else:
            category = "backward temporaries" if _in_backward() else "activations"
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage(), category)
        return out


def _in_backward() -> bool:
    return torch._C._current_autograd_node() is not None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ---------------------------------------------------------------- the step


@torch.no_grad()  # as sample() is
def decode_bound(core, processor_stub, batch, num_generations: int, max_new_tokens: int):
    """What sample() holds at its last decode step, without its data-dependent stops: the prefill of G copies
    (rollout.prefill), the KV cache reserved at its full length (rollout.GrowInPlace, as sample does), and one
    decode step (the head's logits, the language model at the last position)."""
    from audio_rft.compat import CacheLayer, lm_forward, output_cache
    from audio_rft.rollout import GrowInPlace, decode_weight, head_logits, prefill, prompt_embeddings

    hidden, cache = prefill(core, prompt_embeddings(core, batch), batch.attention_mask, num_generations)
    for layer in cache.layers:
        if type(layer) is CacheLayer:
            GrowInPlace.reserve(layer, max_new_tokens)
            n = layer.keys.shape[-2] + max_new_tokens - 1  # the cache as the last step reads it
            layer.keys, layer.values = layer._keys[..., :n, :], layer._values[..., :n, :]
    rows, prompt_len = num_generations * len(batch), batch.attention_mask.shape[1]
    head = core.lm_head
    logits = head_logits(head, decode_weight(head), hidden)
    token = logits.argmax(-1)
    device = batch.input_ids.device
    mask = torch.ones(rows, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    position = torch.full((rows, 1), prompt_len + max_new_tokens - 1, device=device)
    out = lm_forward(core.model.language_model, inputs_embeds=core.get_input_embeddings()(token[:, None]),
                     attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    return output_cache(out), out.last_hidden_state


def _grpo_step(engine, config, batches, completions, counter, shared_prefix: bool = True) -> None:
    from audio_rft.rollout import completion_logprobs, with_audio_encoded
    from audio_rft.train.grpo import grpo_loss

    G, temperature = config.num_generations, config.temperature if config.temperature > 0 else 1.0
    rollouts = []
    for batch, ids in zip(batches, completions):
        engine.core.eval()
        with counter.phase("rollout"):
            batch = engine.run(with_audio_encoded, batch)
            with engine.gathered():
                engine.run(decode_bound, None, batch, G, config.max_completion_length)
        mask = torch.ones_like(ids)
        advantages = torch.zeros(ids.shape[0], device=ids.device)
        ref = old = None
        with torch.no_grad(), counter.phase("reference pass"):
            if config.beta:
                ref = engine.run_reference(completion_logprobs, batch, ids, G, shared_prefix, temperature=temperature)
            if config.num_iterations > 1:
                old = engine.run(completion_logprobs, batch, ids, G, shared_prefix, temperature=temperature)
        rollouts.append((batch, ids, mask, advantages, ref, old))
    engine.core.train()
    with counter.phase("policy pass"):
        for i, (batch, ids, mask, advantages, ref, old) in enumerate(rollouts):
            engine.sync_gradients(i == len(rollouts) - 1)
            logprobs = engine.run(completion_logprobs, batch, ids, G, shared_prefix, temperature=temperature)
            loss, _ = grpo_loss(logprobs, old, ref, advantages, mask, config.beta, config.epsilon_low,
                                config.epsilon_high, config.loss_type, config.max_completion_length)
            engine.backward(loss / config.grad_accum)


def _sft_step(engine, config, batches, completions, counter, shared_prefix: bool = True) -> None:
    from audio_rft.train.sft import sft_nll

    engine.core.train()
    with counter.phase("policy pass"):
        for i, (batch, ids) in enumerate(zip(batches, completions)):
            engine.sync_gradients(i == len(batches) - 1)
            loss, _ = engine.run(sft_nll, batch, ids, torch.ones_like(ids))
            engine.backward(loss / config.grad_accum)


def _optimizer_step(engine, config, counter, after_step) -> None:
    with counter.phase(ByteCounter.OPTIMIZER):
        params = [p for p in engine.trainable if p.grad is not None]
        if config.max_grad_norm and params:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)  # engine.clip_gradients, without reading it
        engine.optimizer.step()
        after_step()  # weights, gradients and optimizer state, before the gradients are dropped
        engine.optimizer.zero_grad(set_to_none=True)


def trace_step(kind: str, config, shapes: dict, world: int, strategy: str, prompt_tokens: int = 830,
               steps: int = 2, fake: bool = True, shared_prefix: bool = True, device: str = "cpu") -> dict:
    """Trace `steps` optimizer steps of a `kind` ("grpo" or "sft") stage with `config` (GRPOConfig / SFTConfig)
    on rank 0 of `world` processes under `strategy` (none, ddp or fsdp); returns the per-GPU peak in bytes with
    its breakdown. `fake=False` runs the same step on real CPU tensors (to check the trace at small sizes);
    `shared_prefix=False` traces GRPO's log-prob passes the naive way (each prompt repeated G times in one
    sequence: rollout.completion_logprobs' plain path), to compare with ours at the same settings. `device`
    (real tensors only): where the check runs, e.g. "cuda" (scripts/gpu_check.py)."""
    from audio_rft.compat import fake_materialize, fake_mode, fake_process_group
    from audio_rft.model import pick_dtype
    from audio_rft.train.common import optimizer_factory
    from audio_rft.train.engine import Layout, build_engine, master_dtype

    if strategy not in TRACEABLE:
        raise UserError(f"strategy {strategy!r} cannot be traced (only {', '.join(TRACEABLE)})")
    if fake and device != "cpu":
        raise UserError("a fake-tensor trace runs on the CPU (fully_shard needs a real CUDA device otherwise)")
    traced_as = "none" if strategy == "ddp" else strategy  # a ddp GPU holds what one process does (module docstring)
    ranks = world if traced_as == "fsdp" else 1
    compute = pick_dtype(config.dtype, torch.device("cuda"))
    grpo = kind == "grpo"
    G = config.num_generations if grpo else 1
    L = config.max_completion_length if grpo else config.max_target_tokens
    config = replace(config, strategy=traced_as, device=device)
    began = time.perf_counter()
    model = build_model(shapes, config, master_dtype(compute, config.lora, traced_as))
    reference = None
    if grpo and config.beta and not config.lora:  # full fine-tuning's frozen copy (LoRA disables its adapter)
        reference = build_model(shapes, replace(config, lora=False, gradient_checkpointing=False), compute)
    with _plain_products(), fake_process_group(ranks) if ranks > 1 else nullcontext(), fake_mode(fake):
        fake_materialize(model, fake, device)
        with _no_weights_to_load(fake):
            engine = build_engine(config, Layout(0, ranks, torch.device(device)), model, compute,
                                  optimizer_factory(config, steps), reference=False)
        if reference is not None:
            engine.reference = _frozen_reference(reference, compute, fake, traced_as, device)
        _pass_through_call(engine)
        built = time.perf_counter() - began
        audio_id = model_config(shapes).audio_token_id
        batches = [prompt_batch(shapes, config.batch_size, prompt_tokens, audio_id, shapes["text"]["vocab"]).to(device)
                   for _ in range(config.grad_accum)]
        completions = [torch.randint(0, audio_id, (config.batch_size * G, L), device=device)
                       for _ in range(config.grad_accum)]
        step = functools.partial(_grpo_step if grpo else _sft_step, shared_prefix=shared_prefix)
        result = _count(engine, step, config, batches, completions, steps)
    result.update(kind=kind, strategy=strategy, traced_as=traced_as, world=world, fake=fake,
                  logprob_pass="shared prefix" if shared_prefix else "repeated sequence (naive)",
                  layout={"prompts": config.batch_size, "generations": G, "prompt_tokens": prompt_tokens,
                          "completion_tokens": L, "grad_accum": config.grad_accum},
                  seconds={"build": round(built, 1), "total": round(time.perf_counter() - began, 1)},
                  rollout="bounded: prefill of G copies + KV cache at full length + the last decode step")
    return result


@contextmanager
def _no_weights_to_load(fake: bool):
    """Fake weights have no values to send: engine.load_shards (rank 0's weights broadcast into every rank's
    shard) reads offsets as numbers, which fake tensors cannot give, and would move nothing."""
    from audio_rft.train import engine

    if not fake:
        yield
        return
    real, engine.load_shards = engine.load_shards, lambda model, loaded: None
    try:
        yield
    finally:
        engine.load_shards = real


@contextmanager
def _plain_products():
    """The step as a GPU runs it: rollout.frozen_linear's oneDNN packed copy of a frozen weight is a CPU-only
    speed-up (an extra copy of the head that no GPU run holds)."""
    from audio_rft import rollout

    packing, rollout._ONEDNN = rollout._ONEDNN, False
    try:
        yield
    finally:
        rollout._ONEDNN = packing


def _frozen_reference(reference, compute: torch.dtype, fake: bool, strategy: str, device):
    """Full fine-tuning's frozen reference as build_engine makes it (engine._frozen_copy: the model in the compute
    dtype, eval, no gradients; sharded like the policy under fsdp), from its own meta model: a deep copy of fake
    parameters cannot be cast (torch refuses to swap a fake tensor that has weak references)."""
    from audio_rft.compat import fake_materialize
    from audio_rft.train.engine import _fully_shard

    fake_materialize(reference, fake, device)
    reference.eval().requires_grad_(False)
    if strategy == "fsdp":
        _fully_shard(reference, compute)
    return reference


def _pass_through_call(engine) -> None:
    """Under fsdp, run each pass through the root's __call__ (its forward is the pass): torch's module trackers
    refuse a submodule called twice (our shared-prefix pass calls the language model twice) unless a tracked
    parent is running; the root's FSDP hooks run as they do for the registered forward method."""
    from audio_rft.train.engine import PASS_METHOD, _run_pass

    if engine.strategy != "fsdp":
        return
    for module in [engine.core] + ([engine.reference] if engine.reference is not None else []):
        module.forward = types.MethodType(_run_pass, module)
        setattr(module, PASS_METHOD, module.__call__)


def _count(engine, step, config, batches, completions, steps: int) -> dict:
    from audio_rft.train.engine import PASS_METHOD

    reference_bytes = 0
    if engine.reference is not None:
        reference_bytes = sum(_local(p).untyped_storage().nbytes() for p in engine.reference.parameters())
    step_seconds, after = [], []
    if engine.strategy == "fsdp":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(engine.core, engine.optimizer)
        tracker.track_inputs((batches, completions))
        core = engine.core

        def each_pass_anew(fn, *args, **kwargs):
            # the tracker takes a second forward of the root for a second iteration and refuses it; every pass of
            # ours is one (the backward of the one before has finished): the root's statistics start afresh (the
            # other units keep theirs: a unit that ran only in an earlier pass, the audio encoder, still has its
            # gradients' hooks called at the end of backward), the overall peak stays
            tracker.memory_tracking.pop(core, None)
            return core(fn, *args, **kwargs)

        setattr(core, PASS_METHOD, each_pass_anew)
        phases = TrackerPhases(tracker)
        with tracker:
            for _ in range(steps):
                clock = time.perf_counter()
                step(engine, config, batches, completions, phases)
                _optimizer_step(engine, config, phases, lambda: after.append(_named(
                    next(iter(tracker.get_tracker_snapshot("current").values())))))
                step_seconds.append(round(time.perf_counter() - clock, 1))
        breakdown = _named(next(iter(tracker.get_tracker_snapshot("peak").values())))
        total = breakdown.pop("Total")
        after[-1].pop("Total", None)
        if reference_bytes:
            breakdown[REFERENCE] = after[-1][REFERENCE] = reference_bytes
        counted_by = "torch FSDPMemTracker"
        peak_bytes = total + reference_bytes
        phase_peaks = {name: value + reference_bytes for name, value in phases.peaks.items()}
    else:
        counter = ByteCounter()
        counter.track([p for p in engine.model.parameters()], "parameters")
        counter.track([b for b in engine.model.buffers()], "buffers")
        if engine.reference is not None:
            counter.track(list(engine.reference.parameters()), "reference model")
        counter.track([t for b in batches for t in (b.input_ids, b.attention_mask, b.input_features,
                                                    b.feature_attention_mask)] + list(completions), "inputs")
        hooks = counter.watch_gradients(engine.trainable)
        with counter:
            for _ in range(steps):
                clock = time.perf_counter()
                step(engine, config, batches, completions, counter)
                _optimizer_step(engine, config, counter, lambda: after.append(dict(counter.totals)))
                step_seconds.append(round(time.perf_counter() - clock, 1))
        for hook in hooks:
            hook.remove()
        breakdown = {k: v for k, v in counter.peak_breakdown.items() if v}
        counted_by = "audio_rft.trace.ByteCounter"
        peak_bytes = counter.peak
        phase_peaks = counter.phase_peaks
    return {"peak_bytes": peak_bytes, "peak_gib": round(peak_bytes / GIB, 2),
            "breakdown": dict(sorted(breakdown.items(), key=lambda kv: -kv[1])),
            "phase_peaks_gib": {name: round(value / GIB, 2) for name, value in phase_peaks.items()},
            "after_last_step": {k: v for k, v in after[-1].items() if v},
            "counted_by": counted_by, "step_seconds": step_seconds}


def _named(snapshot: dict) -> dict[str, int]:
    return {str(getattr(key, "value", key)): value for key, value in snapshot.items()}


class TrackerPhases:
    """The peak of each phase of the step, read from an FSDPMemTracker: its running peak restarts at each phase
    and the overall peak is put back after it (torch's tracker keeps one peak per device)."""

    def __init__(self, tracker):
        self.tracker, self.peaks = tracker, {}

    @contextmanager
    def phase(self, name: str):
        from audio_rft.compat import tracker_peak, tracker_restart_peak

        overall = tracker_restart_peak(self.tracker)
        try:
            yield
        finally:
            peak = tracker_peak(self.tracker)
            self.peaks[name] = max(self.peaks.get(name, 0), peak[0])
            if overall[0] >= peak[0]:
                tracker_restart_peak(self.tracker, overall)
