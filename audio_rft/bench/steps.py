"""One GRPO step two ways on the same model and inputs: ours (OursStep) and R1-AQA's (BaselineStep).

See audio_rft.bench's docstring for what each does; each step returns its phase times and sizes.
"""

from __future__ import annotations

import time


class OursStep:
    """audio-rft's GRPO step, built from the same functions train_grpo uses (LoRA, β = 0.04 via disable_adapter)."""

    def __init__(self, model_dir: str, G: int, seed: int = 0, lr: float = 1e-5, strategy: str = "none",
                 lora: bool = True):
        from audio_rft.train.common import optimizer_factory, setup_model
        from audio_rft.train.engine import build_engine, process_layout, resolve_strategy
        from audio_rft.train.grpo import GRPOConfig, build_reward_fns

        self.config = GRPOConfig(model=str(model_dir), data="-", out="-", lora=lora, device="cpu", lr=lr,
                                 num_generations=G, beta=0.04, batch_size=1, grad_accum=1, seed=seed, strategy=strategy)
        layout = process_layout(self.config)
        resolved = resolve_strategy(strategy, layout.world)
        self.processor, model, compute = setup_model(self.config, layout, resolved)
        self.engine = build_engine(self.config, layout, model, compute, optimizer_factory(self.config, 10_000),
                                   reference=True)
        self.reward_fns, self.weights = build_reward_fns(self.config)
        self.G, self.seed = G, seed
        self.draw = None  # the sampler, rollout.sample unless a variant brings its own (VLLMStep)

    def step(self, sample, wave, L: int, step: int) -> dict:
        import torch

        from audio_rft.rollout import completion_logprobs, decode, encode_prompts, sample as native_draw
        from audio_rft.train.grpo import group_advantages, grpo_loss, prompt_generators, score_completions

        G, engine, core, times = self.G, self.engine, self.engine.core, {}
        clock = time.perf_counter()
        batch = encode_prompts(self.processor, [sample], [wave], "answer").to(engine.layout.device)
        core.eval()
        # stop_tokens=[]: every completion runs to L tokens, as the baseline's min_new_tokens=L makes its own
        with engine.gathered():
            ids, mask = engine.run(self.draw or native_draw, self.processor, batch, G, L, 1.0, 1.0,
                                   prompt_generators(self.seed, step, [0]), engine.all_done, stop_tokens=[])
        texts = decode(self.processor, ids, mask)
        parts = score_completions(texts, [sample] * G, self.reward_fns)
        reward = sum(self.weights[name] * value for name, value in parts.items())
        advantages = group_advantages(reward, G)
        times["rollout"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with torch.no_grad():
            ref = engine.run_reference(completion_logprobs, batch, ids, G)
        times["reference"] = time.perf_counter() - clock
        clock = time.perf_counter()
        core.train()
        logprobs = engine.run(completion_logprobs, batch, ids, G)
        loss, _ = grpo_loss(logprobs, None, ref, advantages, mask, 0.04, 0.2, 0.2, "sequence", L)
        times["policy_forward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        engine.backward(loss)
        times["backward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        engine.clip_gradients(1.0)
        engine.optimizer_step(True)
        times["optimizer"] = time.perf_counter() - clock
        return {"times": times, "completion_tokens": int(mask.sum()), "shape": list(ids.shape),
                "prompt_tokens": int(batch.input_ids.shape[1]), "loss": float(loss.detach())}


class VLLMStep(OursStep):
    """OursStep with the rollout on vLLM (rollout_engine=vllm): the weights the last step trained are pushed into
    the engine first (timed apart, as `weight_sync`), then the G completions are sampled there."""

    def __init__(self, model_dir: str, G: int, seed: int = 0, lr: float = 1e-5):
        super().__init__(model_dir, G, seed, lr)
        from audio_rft.vllm_rollout import VLLMRollout, check_rollout_engine

        check_rollout_engine("vllm")
        self.vllm = VLLMRollout(model_dir, self.engine.core, self.processor, self.engine.compute_dtype,
                                self.engine.layout.device, seed=seed)

    def step(self, sample, wave, L: int, step: int) -> dict:
        from audio_rft.vllm_rollout import request_seeds

        weight_sync = self.vllm.load_weights(self.engine.core)

        def vllm_draw(core, processor, batch, G, L, temperature, top_p, generators, all_done, stop_tokens):
            ids, mask, _ = self.vllm.sample(processor, [sample], [wave], "answer", G, L, temperature, top_p,
                                            request_seeds(self.seed, step, [0]), stop_tokens)
            return ids.to(batch.input_ids.device), mask.to(batch.input_ids.device)

        self.draw = vllm_draw
        result = super().step(sample, wave, L, step)
        result["times"]["weight_sync"] = weight_sync
        return result


def selective_log_softmax(logits, index):
    """TRL 0.15's fp32 path: gather the chosen logits, subtract a row-by-row logsumexp over the full vocabulary."""
    import torch

    chosen = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    normaliser = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return chosen - normaliser


class BaselineStep:
    """R1-AQA's GRPO step re-implemented on the same model: see audio_rft.bench's docstring."""

    def __init__(self, model_dir: str, G: int, seed: int = 0, lr: float = 1e-6):
        import copy

        import torch

        from audio_rft.model import load_model, set_full_finetune
        from audio_rft.train.grpo import GRPOConfig, build_reward_fns

        loaded = load_model(str(model_dir), dtype="fp32", device="cpu")
        self.processor, self.model = loaded.processor, loaded.model
        set_full_finetune(self.model)  # the language model trains; the audio tower stays frozen
        # TRL's create_reference_model: a deep copy, eval mode, no gradients
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)  # HF Trainer's adamw_torch
        self.reward_fns, self.weights = build_reward_fns(GRPOConfig(num_generations=G))
        self.G, self.seed = G, seed

    def _per_token_logps(self, model, input_ids, attention_mask, features, feature_mask):
        logits = model(input_ids, attention_mask=attention_mask, input_features=features,
                       feature_attention_mask=feature_mask).logits  # (B, L, V): every position, full vocabulary
        return selective_log_softmax(logits[:, :-1, :], input_ids[:, 1:])

    def step(self, sample, wave, L: int, step: int) -> dict:
        import torch
        from transformers import GenerationConfig

        from audio_rft.model import NEVER_GENERATE
        from audio_rft.rollout import prompt_strings
        from audio_rft.train.grpo import score_completions

        G, times, processor = self.G, {}, self.processor
        tokenizer = processor.tokenizer
        torch.manual_seed(self.seed * 1_000_003 + step)
        self.model.train()  # the HF Trainer's training_step
        clock = time.perf_counter()
        inputs = processor(text=prompt_strings(processor, [sample], "answer"), audio=[wave], sampling_rate=16_000,
                           return_tensors="pt", padding=True)
        generation = GenerationConfig(
            max_new_tokens=L, min_new_tokens=L,  # fixed length: EOS suppressed until L, as ours
            do_sample=True, temperature=1.0, num_return_sequences=G, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            # a random model could sample <|AUDIO|>, which breaks the next forward; R1-AQA's trained model never does
            suppress_tokens=tokenizer.convert_tokens_to_ids(NEVER_GENERATE))
        prompt_completion_ids = self.model.generate(**inputs, generation_config=generation)
        P = inputs["input_ids"].shape[1]
        completion_ids = prompt_completion_ids[:, P:]
        prompt_mask = inputs["attention_mask"].repeat_interleave(G, dim=0)
        is_eos = completion_ids == tokenizer.eos_token_id
        eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
        eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
        completion_mask = (torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1) <= eos_idx.unsqueeze(1)).int()
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        features = inputs["input_features"].repeat(G, 1, 1)
        feature_mask = inputs["feature_attention_mask"].repeat_interleave(G, dim=0)
        times["rollout"] = time.perf_counter() - clock
        clock = time.perf_counter()
        per_token_logps = self._per_token_logps(self.model, prompt_completion_ids, attention_mask, features,
                                                feature_mask)[:, P - 1:]
        times["policy_forward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with torch.inference_mode():
            ref = self._per_token_logps(self.ref_model, prompt_completion_ids, attention_mask, features,
                                        feature_mask)[:, P - 1:]
        times["reference"] = time.perf_counter() - clock
        clock = time.perf_counter()
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        parts = score_completions(texts, [sample] * G, self.reward_fns)
        rewards = sum(self.weights[name] * value for name, value in parts.items())
        mean = rewards.view(-1, G).mean(dim=1).repeat_interleave(G, dim=0)
        std = rewards.view(-1, G).std(dim=1).repeat_interleave(G, dim=0)
        advantages = (rewards - mean) / (std + 1e-4)
        per_token_loss = torch.exp(per_token_logps - per_token_logps.detach()) * advantages.unsqueeze(1)
        per_token_loss = -(per_token_loss - 0.04 * per_token_kl)
        loss = ((per_token_loss * completion_mask).sum(dim=1) / completion_mask.sum(dim=1)).mean()
        times["rollout"] += time.perf_counter() - clock  # decoding and rewards count as rollout in both variants
        clock = time.perf_counter()
        loss.backward()
        times["backward"] = time.perf_counter() - clock
        clock = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - clock
        return {"times": times, "completion_tokens": int(completion_mask.sum()), "shape": list(completion_ids.shape),
                "prompt_tokens": int(P), "loss": float(loss.detach())}


VARIANTS = {"ours": OursStep, "baseline": BaselineStep, "ours-vllm": VLLMStep}
