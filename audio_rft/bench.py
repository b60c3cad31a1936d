"""`audio-rft bench`: our GRPO step and our inference against R1-AQA's way, on the same model and inputs.

`bench grpo` runs one GRPO step (rollout + rewards + reference + loss + backward + optimizer) two ways:

- ours: audio_rft.rollout (audio and prompt encoded once per prompt, prompt KV cache shared by the G
  completions, logits only at completion positions), LoRA, reference = the same model with the adapter
  disabled, audio_rft.train.grpo.grpo_loss;
- baseline: a re-implementation of R1-AQA's step (their GRPOTrainer.compute_loss, a fork of TRL's): HF
  `generate(num_return_sequences=G)` (the audio encoder and the prompt run G times), a plain forward over
  prompt + completion with the audio features repeated G times and full-vocabulary logits at every
  position (TRL 0.15's selective_log_softmax), the same again for a deep-copied reference model, full
  fine-tuning of the language model with AdamW, per-sequence mean loss.

Each variant lives in its own freshly spawned process (so its peak RSS is its own), and the parent drives
them step by step, alternately (ours, baseline, ours, baseline, ...), so a change in machine load hits
both alike. Completions have a fixed length on both sides (stop tokens suppressed), so both do the same
work. Warm-up steps are excluded; the median of the measured steps is reported.

`bench eval` times our batched inference (run_inference: length-sorted batches, stop at EOS) against
R1-AQA's test script (fixed-size unsorted batches, HF generate with 256 new tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_MODEL_CACHE = "runs/bench-preset"
PHASES = ("rollout", "reference", "policy_forward", "backward", "optimizer")
# fp32 rows of V logits per completion token that each variant's peak grows by with longer completions
# (baseline: policy and reference logits plus a log-softmax temporary, measured 17.6 vs 14.3 GiB from 32 to
# 256 tokens; ours: at most one, as rollout.token_logprobs keeps no logits for backward). Used only to skip,
# with a message, a case that would pass the memory cap.
LOGIT_ROWS_PER_TOKEN = {"ours": 1, "baseline": 3}
QUESTION = "How many beeps do you hear?"
CHOICES = ["one", "two", "three", "four"]


# ---------------------------------------------------------------- machine and helpers


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process from /proc (Linux)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


MIN_AVAILABLE_BYTES = int(1.5 * 2**30)


def memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(threads: int | None = None) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads or torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["memory_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["load_average_at_start"] = list(os.getloadavg())
    except (OSError, ValueError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_rate(threads: int | None = None, n: int = 2048, repeats: int = 5) -> dict:
    """FLOP/s of a plain fp32 n x n matmul on this machine (median of `repeats`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    times, cpu_times = [], []
    for _ in range(repeats):
        began, cpu = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu)
    seconds, cpu_seconds = statistics.median(times), statistics.median(cpu_times)
    # per CPU-second as well: on a shared machine wall time depends on the other load, CPU time much less
    return {"n": n, "seconds": seconds, "flops_per_second": 2 * n ** 3 / seconds, "cpu_seconds": cpu_seconds,
            "flops_per_cpu_second": 2 * n ** 3 / cpu_seconds, "repeats": repeats}


def ensure_model(model: str | None, preset: str = "bench") -> Path:
    """The model folder to benchmark: `model` if given, else the preset built once into runs/<preset>-preset."""
    from audio_rft import UserError

    if model:
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"{model}: no config.json (pass a local Qwen2-Audio folder)")
        return Path(model)
    folder = Path(DEFAULT_MODEL_CACHE if preset == "bench" else f"runs/{preset}-preset")
    if not (folder / "config.json").is_file():
        from audio_rft.model import build_tiny_preset

        print(f"building the {preset} preset into {folder} (once)", file=sys.stderr)
        build_tiny_preset(preset, folder)
    return folder


def bench_prompt(processor, seconds: float, seed: int = 0):
    """One audio question: a `seconds`-long clip (beeps in noise) and its Sample."""
    import numpy as np

    from audio_rft.data.schema import Sample

    rng = np.random.default_rng(seed)
    sr = 16_000
    n = int(seconds * sr)
    t = np.arange(n) / sr
    wave = 0.05 * rng.standard_normal(n)
    for start in (0.2, 0.7):
        on = (t >= start) & (t < start + 0.15)
        wave[on] += 0.5 * np.sin(2 * np.pi * 880 * t[on])
    sample = Sample(id="bench-0", audio="bench-0.wav", question=QUESTION, choices=list(CHOICES), answer="two",
                    task="sound", sub_category="beep_count")
    return sample, wave.astype(np.float32)


@contextmanager
def no_stop_tokens():
    """Make audio_rft.rollout.sample run to max_new_tokens (fixed-length completions for benchmarking)."""
    from audio_rft import rollout

    original = rollout.stop_ids
    rollout.stop_ids = lambda core, processor: [-1]  # an id no token has
    try:
        yield
    finally:
        rollout.stop_ids = original


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- FLOP model


def model_shapes(model_dir: str | Path) -> dict:
    """The shapes the FLOP and memory estimates need, from a local config.json (see audio_rft.plan)."""
    from audio_rft.plan import shapes_from_config

    return shapes_from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def step_flops(shapes: dict, prompt_tokens: int, audio_frames: int, G: int, L: int, variant: str) -> dict[str, float]:
    """Approximate FLOPs of one GRPO step by phase (2 FLOPs per multiply-add; attention scores included).

    A dense layer's forward costs 2 * params * tokens. The backward costs 2x the forward where the weights
    train (input and weight gradients: the baseline's full fine-tuning) and 1x where only the input
    gradient flows (frozen weights under LoRA; the adapters' own FLOPs are negligible at rank 8).
    """
    from audio_rft.plan import lm_layer_params

    a, t = shapes["audio"], shapes["text"]
    d, V, n_layers = t["hidden"], t["vocab"], t["layers"]
    layer = lm_layer_params(t)
    attn_width = t["heads"] * t["head_dim"]

    def lm(new_tokens: int, context_before: int, logits_tokens: int) -> float:
        """Language model forward over `new_tokens` that also see `context_before` cached tokens."""
        mean_context = context_before + (new_tokens + 1) / 2
        attention = 4 * n_layers * attn_width * mean_context * new_tokens  # QK^T and AV
        return 2 * layer * n_layers * new_tokens + attention + 2 * d * V * logits_tokens

    da, positions = a["d_model"], audio_frames // 2  # conv2 has stride 2
    encoder = (2 * a["mels"] * da * 3 * audio_frames + 2 * da * da * 3 * positions
               + a["layers"] * (2 * (4 * da * da + 2 * da * a["ffn"]) * positions + 4 * da * positions * positions)
               + 2 * da * d * (positions // 2))  # pooled to 750 tokens, projected to the LM width
    P = prompt_tokens
    if variant == "ours":
        rollout = encoder + lm(P, 0, 1) + G * lm(L, P, L)  # prompt once, G completions on its cache
        reference = encoder + lm(P, 0, 0) + G * lm(L, P, L)  # logits at completion positions only
        forward = reference
        backward = lm(P, 0, 0) + G * lm(L, P, L)  # input gradients only (LoRA)
    else:
        rollout = G * (encoder + lm(P, 0, 1) + lm(L, P, L))  # generate(num_return_sequences=G)
        reference = G * (encoder + lm(P + L, 0, P + L))  # full-vocabulary logits at every position
        forward = reference
        backward = 2 * G * lm(P + L, 0, P + L)  # input and weight gradients (full fine-tuning)
    return {"rollout": rollout, "reference": reference, "policy_forward": forward, "backward": backward,
            "total": rollout + reference + forward + backward}


# ---------------------------------------------------------------- the two GRPO steps


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
                                   keep_reference=not lora)
        self.reward_fns, self.weights = build_reward_fns(self.config)
        self.G, self.seed = G, seed

    def step(self, sample, wave, L: int, step: int) -> dict:
        import torch

        from audio_rft.rollout import completion_logprobs, decode, encode_prompts, sample as draw
        from audio_rft.train.grpo import group_advantages, grpo_loss, prompt_generators, score_completions

        G, engine, core, times = self.G, self.engine, self.engine.core, {}
        clock = time.perf_counter()
        batch = encode_prompts(self.processor, [sample], [wave], "answer").to(engine.layout.device)
        core.eval()
        with no_stop_tokens():
            ids, mask = engine.run(draw, self.processor, batch, G, L, 1.0, 1.0, prompt_generators(self.seed, step, [0]),
                                   engine.all_done)
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


def selective_log_softmax(logits, index):
    """TRL 0.15's fp32 path: gather the chosen logits, subtract a row-by-row logsumexp over the full vocabulary."""
    import torch

    chosen = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    normaliser = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return chosen - normaliser


class BaselineStep:
    """R1-AQA's GRPO step re-implemented on the same model: see the module docstring."""

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


VARIANTS = {"ours": OursStep, "baseline": BaselineStep}


def _worker(conn, variant: str, model_dir: str, G: int, seed: int, threads: int, seconds: float) -> None:
    """A fresh process holding one variant; answers ("step", L, k) messages until ("stop",)."""
    try:
        import torch
        import transformers  # noqa: F401  (counted in the import baseline, as the brief's RSS comparison needs)

        if threads:
            torch.set_num_threads(threads)
        import_rss = proc_status()["VmRSS"]
        runner = VARIANTS[variant](model_dir, G, seed)
        sample, wave = bench_prompt(runner.processor, seconds, seed)
        conn.send({"ready": True, "import_rss_bytes": import_rss, "setup_rss_bytes": proc_status()["VmRSS"],
                   "threads": torch.get_num_threads()})
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, L, k = message
            began, cpu = time.perf_counter(), time.process_time()
            result = runner.step(sample, wave, L, k)
            result["step_seconds"] = time.perf_counter() - began
            result["cpu_seconds"] = time.process_time() - cpu  # all threads of the process: robust to other load
            result.update({f"{key}_bytes": value for key, value in proc_status().items()})
            conn.send(result)
    except BaseException as e:  # report, then exit
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
    finally:
        conn.close()


class Worker:
    """Parent-side handle of one variant's process, with a memory watchdog."""

    def __init__(self, variant: str, model_dir: str, G: int, seed: int, threads: int, seconds: float,
                 memory_cap_bytes: int):
        import multiprocessing as mp

        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.variant, self.cap = variant, memory_cap_bytes
        self.process = context.Process(target=_worker, args=(child, variant, model_dir, G, seed, threads, seconds),
                                       daemon=True)
        self.process.start()
        self.max_seen = 0
        self.info: dict = {}

    def wait_ready(self, timeout: float = 900) -> dict:
        self.info = self._receive(timeout)
        return self.info

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.2):
                try:
                    return self.conn.recv()
                except EOFError:
                    break
            rss = proc_status(self.process.pid).get("VmRSS", 0)
            self.max_seen = max(self.max_seen, rss)
            if rss > self.cap:
                self.process.kill()
                return {"error": f"killed: RSS {rss / 2**30:.1f} GiB passed the memory cap of {self.cap / 2**30:.1f} GiB"}
            available = memory_available()
            if available is not None and available < MIN_AVAILABLE_BYTES:
                self.process.kill()  # the machine is shared: never push other people's processes into the OOM killer
                return {"error": f"killed: the machine had only {available / 2**30:.1f} GiB available "
                                 f"(worker RSS {rss / 2**30:.1f} GiB)"}
            if not self.process.is_alive():
                break
        if self.process.is_alive():
            self.process.kill()
            return {"error": f"no answer within {timeout:.0f} s; killed"}
        return {"error": f"worker exited (code {self.process.exitcode})"}

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def step(self, L: int, k: int, timeout: float = 1800) -> dict:
        if not self.alive:
            return {"error": "worker not running"}
        self.conn.send(("step", L, k))
        return self._receive(timeout)

    def close(self) -> None:
        if self.alive:
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()


def _summarise(variant: str, results: list[dict], info: dict, G: int, L: int, error: str | None) -> dict:
    measured = [r for r in results if not r.get("warmup")]
    out: dict = {"steps_measured": len(measured), "step_seconds_all": [round(r["step_seconds"], 3) for r in measured]}
    step_seconds = _median([r["step_seconds"] for r in measured])
    out["step_seconds"] = step_seconds
    out["cpu_seconds"] = _median([r["cpu_seconds"] for r in measured])
    out["tokens_per_second"] = G * L / step_seconds if step_seconds else None
    peaks = [r.get("VmHWM_bytes", 0) for r in results]
    out["peak_memory_bytes"] = max(peaks) if peaks else None
    out["import_rss_bytes"] = info.get("import_rss_bytes")
    out["setup_rss_bytes"] = info.get("setup_rss_bytes")
    if measured:
        profile = {phase: _median([r["times"].get(phase, 0.0) for r in measured]) for phase in PHASES}
        total = sum(profile.values()) or 1.0
        out["profile_seconds"] = profile
        out["profile_share"] = {phase: value / total for phase, value in profile.items()}
        out["prompt_tokens"] = measured[0]["prompt_tokens"]
        out["completion_tokens"] = measured[0]["completion_tokens"]
    if error:
        out["error"] = error
    return out


def run_grpo_bench(model_dir: str | Path, steps: int = 3, completion_tokens: int = 32, think_tokens: int = 256,
                   think_steps: int = 1, warmup: int = 1, threads: int = 2, G: int = 8, seed: int = 0,
                   seconds: float = 30.0, memory_cap_gb: float = 18.0, variants: tuple[str, ...] = ("ours", "baseline"),
                   think_variants: tuple[str, ...] | None = None, matmul_n: int = 2048, log=print) -> dict:
    """Interleaved GRPO-step benchmark; returns the JSON-ready result (see the module docstring)."""
    import torch

    torch.set_num_threads(threads)
    machine = machine_info(threads)
    matmul = matmul_rate(threads, matmul_n)
    log(f"matmul {matmul_n}^2 fp32: {matmul['flops_per_second'] / 1e9:.1f} GFLOP/s on {threads} threads")
    cap = int(memory_cap_gb * 2**30)
    log(f"starting workers: {', '.join(variants)}")
    workers = {v: Worker(v, str(model_dir), G, seed, threads, seconds, cap) for v in variants}  # start together
    for v, worker in workers.items():
        if "error" in worker.wait_ready():
            for other in workers.values():
                other.close()
            raise RuntimeError(f"{v} worker failed to start: {worker.info['error']}\n{worker.info.get('traceback', '')}")
    cases = [("answer", completion_tokens, steps, warmup, variants)]
    if think_tokens and think_steps:
        # the workers are warm from the answer case; the think case needs no warm-up of its own
        chosen = tuple(v for v in (think_variants or variants) if v in variants)
        cases.append(("think", think_tokens, think_steps, 0, chosen))
    shapes = model_shapes(model_dir)
    results: dict[str, dict] = {}
    peaks: dict[str, int] = {}  # each variant's peak RSS so far, to skip (and say so) a case that would pass the cap
    k = 0
    try:
        for name, L, n_steps, n_warm, case_variants in cases:
            per_variant: dict[str, list[dict]] = {v: [] for v in case_variants}
            errors: dict[str, str | None] = {v: None for v in case_variants}
            for v in case_variants:
                if v in peaks and L > completion_tokens:
                    growth = LOGIT_ROWS_PER_TOKEN.get(v, 3) * G * (L - completion_tokens) * shapes["text"]["vocab"] * 4
                    estimate = peaks[v] + growth
                    if estimate > cap:
                        errors[v] = (f"skipped: estimated peak {estimate / 2**30:.1f} GiB passes the memory cap of "
                                     f"{cap / 2**30:.1f} GiB (raise --memory-cap-gb to measure it)")
                        log(f"{name} case, {v}: {errors[v]}")
            for i in range(n_warm + n_steps):
                for v in case_variants:
                    if errors[v]:
                        continue
                    result = workers[v].step(L, k)
                    if "error" in result:
                        errors[v] = result["error"]
                        log(f"{name} {v}: {result['error']}")
                        continue
                    result["warmup"] = i < n_warm
                    per_variant[v].append(result)
                    log(f"{name} L={L} {v} step {i + 1}/{n_warm + n_steps}{' (warm-up)' if i < n_warm else ''}: "
                        f"{result['step_seconds']:.2f} s, peak RSS {result.get('VmHWM_bytes', 0) / 2**30:.2f} GiB")
                k += 1
            case = {v: _summarise(v, per_variant[v], workers[v].info, G, L, errors[v]) for v in case_variants}
            for v in case_variants:
                if per_variant[v]:
                    peaks[v] = max(peaks.get(v, 0), *(r.get("VmHWM_bytes", 0) for r in per_variant[v]))
            prompt_tokens = next((case[v].get("prompt_tokens") for v in case_variants if case[v].get("prompt_tokens")), None)
            frames = int(seconds * 100)
            for v in case_variants:
                flops = step_flops(shapes, prompt_tokens or 0, frames, G, L, v)
                case[v]["flops_estimate"] = flops["total"]
                if case[v].get("step_seconds"):
                    case[v]["achieved_flops_per_second"] = flops["total"] / case[v]["step_seconds"]
                    case[v]["fraction_of_matmul_rate"] = case[v]["achieved_flops_per_second"] / matmul["flops_per_second"]
                    case[v]["flops_by_phase"] = flops
                if case[v].get("cpu_seconds"):
                    case[v]["achieved_flops_per_cpu_second"] = flops["total"] / case[v]["cpu_seconds"]
                    case[v]["fraction_of_matmul_rate_per_cpu_second"] = (case[v]["achieved_flops_per_cpu_second"]
                                                                         / matmul["flops_per_cpu_second"])
            if "ours" in case and "baseline" in case:
                o, b = case["ours"], case["baseline"]
                both_timed = o.get("step_seconds") and b.get("step_seconds")
                case["speedup"] = b["step_seconds"] / o["step_seconds"] if both_timed else None
                both_peaks = o.get("peak_memory_bytes") and b.get("peak_memory_bytes") and not b.get("error")
                case["peak_memory_ratio"] = o["peak_memory_bytes"] / b["peak_memory_bytes"] if both_peaks else None
                case["speedup_cpu_time"] = (b["cpu_seconds"] / o["cpu_seconds"]
                                            if o.get("cpu_seconds") and b.get("cpu_seconds") else None)
            case["variants"] = list(case_variants)
            case["config"] = {"completion_tokens": L, "G": G, "prompt_tokens": prompt_tokens, "audio_seconds": seconds,
                              "steps": n_steps, "warmup_steps": n_warm}
            results[name] = case
            log(format_profile(name, case, case_variants))
    finally:
        for w in workers.values():
            w.close()
    main = results["answer"]
    out = {v: main[v] for v in variants}
    out.update({
        "speedup": main.get("speedup"), "peak_memory_ratio": main.get("peak_memory_ratio"),
        "speedup_cpu_time": main.get("speedup_cpu_time"),
        "config": {"model": str(model_dir), "G": G, "completion_tokens": completion_tokens, "think_tokens": think_tokens,
                   "steps": steps, "think_steps": think_steps, "warmup_steps": warmup, "threads": threads, "seed": seed,
                   "audio_seconds": seconds, "prompt_tokens": main["config"]["prompt_tokens"],
                   "memory_cap_gb": memory_cap_gb, "model_shapes": shapes,
                   "ours": "LoRA r=8 on all LM projections, reference = adapter disabled, beta 0.04, lr 1e-5, AdamW",
                   "baseline": "full fine-tuning of the LM (audio tower frozen), deep-copied reference, beta 0.04, lr 1e-6, AdamW",
                   "peak_memory": "VmHWM of each variant's own freshly spawned process (includes torch/transformers import)",
                   "tokens_per_second": "G x completion tokens per step / median step seconds"},
        "machine": machine, "matmul": matmul, "cases": results,
        "profile": {name: {v: case[v].get("profile_share") for v in case["variants"]} for name, case in results.items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    return out


def format_profile(name: str, case: dict, variants) -> str:
    lines = [f"case {name} (L={case['config']['completion_tokens']}, G={case['config']['G']}, "
             f"prompt {case['config']['prompt_tokens']} tokens)"]
    header = f"  {'phase':<16}" + "".join(f"{v:>22}" for v in variants)
    lines.append(header)
    for phase in PHASES:
        row = f"  {phase:<16}"
        for v in variants:
            seconds = (case[v].get("profile_seconds") or {}).get(phase)
            share = (case[v].get("profile_share") or {}).get(phase)
            row += f"{'-':>22}" if seconds is None else f"{seconds:>12.2f} s ({share:>5.0%})"
        lines.append(row)
    row = f"  {'step (median)':<16}"
    for v in variants:
        s = case[v].get("step_seconds")
        row += f"{'-':>22}" if s is None else f"{s:>12.2f} s       "
    lines.append(row)
    row = f"  {'step CPU time':<16}"
    for v in variants:
        s = case[v].get("cpu_seconds")
        row += f"{'-':>22}" if s is None else f"{s:>12.2f} s       "
    lines.append(row)
    row = f"  {'peak RSS':<16}"
    for v in variants:
        m = case[v].get("peak_memory_bytes")
        row += f"{'-':>22}" if not m else f"{m / 2**30:>12.2f} GiB     "
    lines.append(row)
    if case.get("speedup"):
        lines.append(f"  speedup {case['speedup']:.1f}x, peak memory ratio "
                     + (f"{case['peak_memory_ratio']:.2f}" if case.get("peak_memory_ratio") else "n/a"))
    for v in variants:
        if case[v].get("error"):
            lines.append(f"  {v}: {case[v]['error']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- inference


def build_eval_set(out: str | Path, n: int = 64, seed: int = 0, min_seconds: float = 2.0, max_seconds: float = 30.0) -> Path:
    """A prepared dataset of `n` audio questions with clip lengths spread over [min_seconds, max_seconds]."""
    import numpy as np

    from audio_rft.data.dataset import DatasetWriter
    from audio_rft.data.schema import Sample

    out = Path(out)
    if (out / "data.jsonl").is_file() and len((out / "data.jsonl").read_text().splitlines()) == n:
        return out
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, builder="bench-eval", params={"n": n, "seed": seed}) as writer:
        for j in range(n):
            seconds = float(rng.uniform(min_seconds, max_seconds))
            count = int(rng.integers(1, 5))
            t = np.arange(int(seconds * 16_000)) / 16_000
            wave = 0.05 * rng.standard_normal(len(t))
            for b in range(count):
                on = (t >= 0.2 + 0.5 * b) & (t < 0.35 + 0.5 * b)
                wave[on] += 0.5 * np.sin(2 * np.pi * 880 * t[on])
            sample = Sample(id=f"bench-{j:04d}", audio=f"audio/bench-{j:04d}.wav", question=QUESTION, choices=list(CHOICES),
                            answer=CHOICES[count - 1], task="sound", sub_category="beep_count", source="bench", split="test")
            writer.add(sample, wave.astype(np.float32))
    return out


def baseline_inference(model_dir: str | Path, data: str | Path, batch_size: int = 32, max_new_tokens: int = 256,
                       limit: int | None = None) -> dict:
    """R1-AQA's src/test.py way: data order, fixed batches, HF generate with `max_new_tokens` new tokens every time."""
    import torch

    from audio_rft.data.audio import read_wav
    from audio_rft.data.dataset import load_dataset, resolve_audio
    from audio_rft.model import load_model
    from audio_rft.rollout import prompt_strings

    began = time.perf_counter()
    loaded = load_model(str(model_dir), dtype="auto", device="cpu")
    model, processor = loaded.model.eval(), loaded.processor
    load_seconds = time.perf_counter() - began
    samples = load_dataset(data, limit=limit)
    outputs, new_tokens = [], 0
    began = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        group = samples[i:i + batch_size]
        waves = [read_wav(resolve_audio(data, s)) for s in group]
        inputs = processor(text=prompt_strings(processor, group, "answer"), audio=waves, sampling_rate=16_000,
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       do_sample=False)
        generated = generated[:, inputs["input_ids"].shape[1]:]
        new_tokens += generated.numel()
        outputs += processor.batch_decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    seconds = time.perf_counter() - began
    return {"items": len(outputs), "seconds": seconds, "load_seconds": load_seconds, "items_per_second": len(outputs) / seconds,
            "generated_tokens": new_tokens, "batch_size": batch_size, "max_new_tokens": max_new_tokens}


def ours_inference(model_dir: str | Path, data: str | Path, batch_size: int = 32, max_new_tokens: int = 32,
                   limit: int | None = None) -> dict:
    """audio_rft.eval.infer.run_inference as a user runs it (fresh output, so nothing is resumed)."""
    from audio_rft.eval.infer import InferConfig, run_inference
    from audio_rft.model import load_model

    began = time.perf_counter()
    load_model(str(model_dir), dtype="auto", device="cpu")  # what run_inference's own load costs, to subtract
    load_seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predictions.json"
        began = time.perf_counter()
        run_inference(InferConfig(model=str(model_dir), data=str(data), out=str(out), batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, prompt="answer", limit=limit, device="cpu"))
        total = time.perf_counter() - began
        records = json.loads(out.read_text())
    seconds = max(total - load_seconds, 1e-9)
    return {"items": len(records), "seconds": seconds, "seconds_including_load": total, "load_seconds": load_seconds,
            "items_per_second": len(records) / seconds, "generated_tokens": sum(r["completion_tokens"] for r in records),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens}


def run_eval_bench(model_dir: str | Path, data: str | Path | None = None, items: int = 64, batch_size: int = 32,
                   ours_max_new_tokens: int = 32, baseline_max_new_tokens: int = 256, repeats: int = 1,
                   threads: int = 2, equal_length: bool = True, log=print) -> dict:
    """Items/s of our inference against R1-AQA's test-script way, interleaved `repeats` times."""
    import torch

    torch.set_num_threads(threads)
    if data is None:
        data = build_eval_set(Path(DEFAULT_MODEL_CACHE).parent / f"bench-eval-{items}", items)
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    if equal_length:
        runs["baseline_equal_length"] = []
    # warm-up: one small batch each, not counted
    ours_inference(model_dir, data, 2, 2, limit=2)
    baseline_inference(model_dir, data, 2, 2, limit=2)
    for r in range(repeats):
        runs["ours"].append(ours_inference(model_dir, data, batch_size, ours_max_new_tokens))
        log(f"eval ours: {runs['ours'][-1]['items_per_second']:.2f} items/s")
        runs["baseline"].append(baseline_inference(model_dir, data, batch_size, baseline_max_new_tokens))
        log(f"eval baseline ({baseline_max_new_tokens} tokens): {runs['baseline'][-1]['items_per_second']:.2f} items/s")
        if equal_length:
            runs["baseline_equal_length"].append(baseline_inference(model_dir, data, batch_size, ours_max_new_tokens))
            log(f"eval baseline ({ours_max_new_tokens} tokens): "
                f"{runs['baseline_equal_length'][-1]['items_per_second']:.2f} items/s")

    def summary(entries: list[dict]) -> dict:
        best = dict(entries[0])
        best["items_per_second"] = _median([e["items_per_second"] for e in entries])
        best["items_per_second_all"] = [round(e["items_per_second"], 4) for e in entries]
        return best

    out = {name: summary(entries) for name, entries in runs.items()}
    out["speedup"] = out["ours"]["items_per_second"] / out["baseline"]["items_per_second"]
    if equal_length:
        out["speedup_at_equal_length"] = out["ours"]["items_per_second"] / out["baseline_equal_length"]["items_per_second"]
    out["config"] = {"model": str(model_dir), "data": str(data), "items": items, "batch_size": batch_size,
                     "ours": f"run_inference: length-sorted batches, stop at EOS, max_new_tokens={ours_max_new_tokens}",
                     "baseline": f"R1-AQA test.py way: data order, HF generate, always {baseline_max_new_tokens} new tokens",
                     "repeats": repeats, "threads": threads, "prompt": "answer"}
    out["machine"] = machine_info(threads)
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return out


# ---------------------------------------------------------------- plan check


def _plan_check_worker(conn, model_dir: str, G: int, L: int, seconds: float, threads: int) -> None:
    try:
        import torch
        import transformers  # noqa: F401

        torch.set_num_threads(threads)
        import_rss = proc_status()["VmRSS"]
        import accelerate  # noqa: F401  the rest of what a training process imports, before any weights
        import peft  # noqa: F401

        import audio_rft.rollout  # noqa: F401
        import audio_rft.train.grpo  # noqa: F401

        libraries_rss = proc_status()["VmRSS"]
        runner = OursStep(model_dir, G)
        sample, wave = bench_prompt(runner.processor, seconds)
        result = runner.step(sample, wave, L, 0)
        conn.send({"import_rss_bytes": import_rss, "libraries_rss_bytes": libraries_rss,
                   "peak_rss_bytes": proc_status()["VmHWM"], "prompt_tokens": result["prompt_tokens"]})
    except BaseException as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def run_plan_check(model_dir: str | Path, G: int = 8, L: int = 32, seconds: float | None = None, threads: int = 2) -> dict:
    # a row per model: peak RSS of a fresh process running one of our GRPO steps, minus its RSS after importing
    # torch + transformers (and, second figure, after importing everything else a training process imports)
    """Measured peak RSS of one of our GRPO steps (fresh process, minus the torch+transformers import) against `plan`."""
    import multiprocessing as mp

    from audio_rft.plan import estimate_grpo, shapes_for_model
    from audio_rft.train.grpo import GRPOConfig

    shapes = shapes_for_model(str(model_dir))
    seconds = seconds or min(30.0, shapes["audio"]["max_source_positions"] / 50)
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_plan_check_worker, args=(child, str(model_dir), G, L, seconds, threads))
    process.start()
    measured = parent.recv()
    process.join(60)
    if "error" in measured:
        raise RuntimeError(measured["error"])
    config = GRPOConfig(model=str(model_dir), lora=True, num_generations=G, max_completion_length=L, batch_size=1,
                        dtype="fp32", device="cpu")
    plan = estimate_grpo(config, shapes, prompt_tokens=measured["prompt_tokens"], device="cpu")
    step_bytes = measured["peak_rss_bytes"] - measured["import_rss_bytes"]
    tensor_bytes = measured["peak_rss_bytes"] - measured["libraries_rss_bytes"]
    return {"model": str(model_dir), "G": G, "completion_tokens": L, "audio_seconds": seconds,
            "prompt_tokens": measured["prompt_tokens"], "measured_step_bytes": step_bytes,
            "measured_step_bytes_after_all_imports": tensor_bytes,
            "import_rss_bytes": measured["import_rss_bytes"], "libraries_rss_bytes": measured["libraries_rss_bytes"],
            "peak_rss_bytes": measured["peak_rss_bytes"], "plan_peak_bytes": plan["peak_bytes"],
            "plan_terms": plan["terms"], "plan_over_measured": plan["peak_bytes"] / step_bytes,
            "plan_over_measured_after_all_imports": plan["peak_bytes"] / tensor_bytes}


# ---------------------------------------------------------------- CLI


def _write_json(path: str | Path, data: dict) -> None:
    from audio_rft.fileio import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), data)


def add_parser(subparsers, command: str) -> None:
    parser = subparsers.add_parser(command, help="performance benchmarks against R1-AQA's way",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench_kind", required=True)

    grpo = sub.add_parser("grpo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="one GRPO step, ours vs R1-AQA's, interleaved, in fresh processes")
    grpo.add_argument("--json", required=True, help="write results here")
    grpo.add_argument("--model", help="model folder (default: the bench preset, built once into runs/bench-preset)")
    grpo.add_argument("--preset", default="bench", choices=["bench", "tiny"], help="preset to build when --model is absent")
    grpo.add_argument("--steps", type=int, default=3, help="measured steps per variant (answer case)")
    grpo.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant, not counted")
    grpo.add_argument("--completion-tokens", type=int, default=32, help="answer-mode completion length (fixed)")
    grpo.add_argument("--think-tokens", type=int, default=256, help="think-mode completion length (0: skip the case)")
    grpo.add_argument("--think-steps", type=int, default=1, help="measured steps per variant (think case)")
    grpo.add_argument("--generations", type=int, default=8, help="G")
    grpo.add_argument("--audio-seconds", type=float, default=None, help="clip length (default: the model's window, 30 s)")
    grpo.add_argument("--threads", type=int, default=2)
    grpo.add_argument("--memory-cap-gb", type=float, default=18.0, help="kill a variant whose RSS passes this")
    grpo.add_argument("--variants", default="ours,baseline")
    grpo.add_argument("--think-variants", help="variants for the think case (default: all of --variants)")
    grpo.add_argument("--seed", type=int, default=0)

    def run_grpo(args) -> int:
        model_dir = ensure_model(args.model, args.preset)
        from audio_rft.plan import shapes_for_model

        seconds = args.audio_seconds or shapes_for_model(str(model_dir))["audio"]["max_source_positions"] / 50
        result = run_grpo_bench(model_dir, args.steps, args.completion_tokens, args.think_tokens, args.think_steps,
                                args.warmup, args.threads, args.generations, args.seed, seconds, args.memory_cap_gb,
                                tuple(v for v in args.variants.split(",") if v),
                                tuple(v for v in args.think_variants.split(",") if v) if args.think_variants else None,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
        _write_json(args.json, result)
        print(args.json)
        return 0

    grpo.set_defaults(func=run_grpo)

    ev = sub.add_parser("eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="inference items/s, ours vs R1-AQA's test script")
    ev.add_argument("--json", required=True)
    ev.add_argument("--model", help="model folder (default: the bench preset)")
    ev.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    ev.add_argument("--data", help="prepared dataset (default: a synthetic set of clips from 2 to 30 s)")
    ev.add_argument("--items", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=32, help="ours (answer mode)")
    ev.add_argument("--baseline-new-tokens", type=int, default=256, help="R1-AQA's test script")
    ev.add_argument("--repeats", type=int, default=1)
    ev.add_argument("--threads", type=int, default=2)

    def run_eval(args) -> int:
        model_dir = ensure_model(args.model, args.preset)
        data = args.data
        if data is None:
            from audio_rft.plan import shapes_for_model

            window = shapes_for_model(str(model_dir))["audio"]["max_source_positions"] / 50
            data = build_eval_set(Path(DEFAULT_MODEL_CACHE).parent / f"bench-eval-{args.items}-{window:g}s", args.items,
                                  min_seconds=min(2.0, window), max_seconds=window)
        result = run_eval_bench(model_dir, data, args.items, args.batch_size, args.max_new_tokens,
                                args.baseline_new_tokens, args.repeats, args.threads,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
        _write_json(args.json, result)
        print(args.json)
        return 0

    ev.set_defaults(func=run_eval)

    check = sub.add_parser("plan-check", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="plan's memory estimate against a measured step (fresh process, CPU)")
    check.add_argument("--json", required=True)
    check.add_argument("--model", action="append", help="model folder(s) (default: the tiny and bench presets)")
    check.add_argument("--generations", type=int, default=8)
    check.add_argument("--completion-tokens", type=int, action="append",
                       help="completion length(s) to check (default: 32)")
    check.add_argument("--threads", type=int, default=2)

    def run_check(args) -> int:
        folders = args.model or [str(ensure_model(None, "tiny")), str(ensure_model(None, "bench"))]
        rows = [run_plan_check(f, args.generations, L, threads=args.threads)
                for f in folders for L in (args.completion_tokens or [32])]
        for row in rows:
            print(f"{row['model']}: measured {row['measured_step_bytes'] / 2**20:,.0f} MiB over torch+transformers "
                  f"({row['measured_step_bytes_after_all_imports'] / 2**20:,.0f} MiB over all imports), plan "
                  f"{row['plan_peak_bytes'] / 2**20:,.0f} MiB ({row['plan_over_measured']:.2f}x, "
                  f"{row['plan_over_measured_after_all_imports']:.2f}x)", file=sys.stderr)
        _write_json(args.json, {"checks": rows, "machine": machine_info(args.threads),
                                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        print(args.json)
        return 0

    check.set_defaults(func=run_check)
