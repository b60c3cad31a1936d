"""Where the training strategy lives: one process, DDP, FSDP2 or DeepSpeed ZeRO, chosen by `strategy`.

Every trainer calls the model only through `Engine.run(fn, ...)`, where `fn(core, ...)` is one of
rollout.py's passes. Those passes call the audio tower, projector, language model and head directly
(that is how each clip is encoded and each prompt prefilled once for all G completions), and each
engine must see such a call as a forward of the module it manages, or it silently does nothing:

- `ddp`: `Passes`, a thin module whose forward runs `fn`, wrapped by DistributedDataParallel, so the
  reducer averages gradients in backward (DDP around the model, with calls on `.module`, never syncs);
- `fsdp`: `fully_shard` on every encoder and decoder layer, the embeddings and the head, then on the
  root, and `fn` registered as a forward method of the root (`register_fsdp_forward_method`), so the
  root's own parameters (projector, encoder convolutions, norms) are gathered for it and
  reduce-scattered after backward, while each unit gathers its shard when it is called;
- `deepspeed`: the same `Passes` module handed to `deepspeed.initialize` (ZeRO-2 or ZeRO-3); launch it
  with torchrun or `accelerate launch` like the others.

The engine averages gradients; nothing here is a hand-written collective on them. Mixed precision:
with `dtype=bf16`, weights that train are kept in fp32 (master weights, fp32 AdamW state) and compute
runs in bf16: torch.autocast for one process and DDP, FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16
mode. A frozen LoRA base stays in bf16 where no engine needs one dtype per shard.

Under fsdp and deepspeed every rank must make the same sequence of passes (each pass gathers
parameters collectively): trainers keep pass counts equal and `sample` runs until every rank is done.
"""

from __future__ import annotations

import json
import os
import random
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from audio_rft import UserError

STRATEGIES = ("auto", "none", "ddp", "fsdp", "deepspeed")
SHARDED = ("fsdp", "deepspeed")
PASS_METHOD = "audio_rft_pass"


class Passes(torch.nn.Module):
    """A module whose forward is one of rollout.py's passes, so DDP and DeepSpeed see it as the forward."""

    def __init__(self, core: torch.nn.Module):
        super().__init__()
        self.core = core

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.core, *args, **kwargs)


def _run_pass(self, fn: Callable, *args, **kwargs):
    return fn(self, *args, **kwargs)


# ---------------------------------------------------------------- processes


@dataclass
class Layout:
    """Which process this is, of how many, on which device (from torchrun / accelerate launch)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        """The mean of a metric over ranks."""
        return float(np.mean(self.gather_objects(value)))

    def any(self, flag: bool) -> bool:
        return any(self.gather_objects(bool(flag)))

    def gather_objects(self, value: Any) -> list:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a metric tensor, concatenated in rank order (on the CPU)."""
        return torch.cat([torch.as_tensor(t) for t in self.gather_objects(tensor.detach().cpu())])


def process_layout(config) -> Layout:
    """Start (or join) the process group that torchrun / accelerate launch describe in the environment."""
    from accelerate import PartialState

    state = PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())
    return Layout(state.process_index, state.num_processes, torch.device(state.device))


def resolve_strategy(strategy: str, world: int) -> str:
    """`auto` follows the launcher: an accelerate config of type FSDP or DEEPSPEED picks that engine
    (pipelines/accelerate/), anything else DDP for several processes and none for one."""
    if strategy not in STRATEGIES:
        raise UserError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            strategy = "fsdp"
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return "deepspeed"
        else:
            return "ddp" if world > 1 else "none"
    if strategy in ("ddp", "fsdp") and world == 1:
        return "none"  # one process: nothing to average or shard
    return strategy


def deepspeed_config(config, compute_dtype: torch.dtype) -> dict:
    """ZeRO-2/3 with our batch, accumulation and clipping; bf16 keeps fp32 master weights in the optimizer."""
    stage = zero_stage(config)
    if stage not in (2, 3):
        raise UserError(f"zero_stage {stage}: choose 2 or 3")
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.max_grad_norm or 0.0,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": compute_dtype == torch.bfloat16, **_bf16_overflow_check()},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def _bf16_overflow_check() -> dict:
    """ZeRO skips a bf16 step with non-finite gradients only with `check_grad_overflow` (a key of newer
    DeepSpeed releases; older ones refuse unknown keys and have no such skip: Engine.optimizer_step then stops)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return {}
    return {"check_grad_overflow": True} if "check_grad_overflow" in DeepSpeedBF16Config.model_fields else {}


def zero_stage(config) -> int:
    """The config's zero_stage, or the accelerate launch config's when the strategy is left to the launcher."""
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(launcher) if config.strategy == "auto" and launcher else config.zero_stage


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError("strategy=deepspeed needs DeepSpeed: pip install 'audio-rft[deepspeed]' "
                        "(or choose strategy=fsdp, which needs nothing more)") from None
    return deepspeed


# ---------------------------------------------------------------- the engine


@dataclass
class Engine:
    """The model as the strategy holds it, with its optimizer and scheduler; see the module docstring."""

    strategy: str
    layout: Layout
    model: torch.nn.Module  # PeftModel (LoRA) or Qwen2AudioForConditionalGeneration: what save_pretrained saves
    core: torch.nn.Module  # the Qwen2AudioForConditionalGeneration inside `model`
    compute_dtype: torch.dtype
    optimizer: Any = None
    scheduler: Any = None
    wrapped: Any = None  # DDP(Passes) or the DeepSpeed engine around Passes
    autocast_dtype: torch.dtype | None = None
    reference: torch.nn.Module | None = None  # frozen copy for full fine-tuning with a KL term
    reference_adapter: str | None = None  # LoRA started from an adapter: the name of its frozen second copy

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.layout.device.type, dtype=self.autocast_dtype)

    def run(self, fn: Callable, *args, **kwargs):
        """`fn(core, *args, **kwargs)` as a forward of the engine's module (see the module docstring)."""
        with self.autocast():
            if self.strategy == "fsdp":
                return getattr(self.core, PASS_METHOD)(fn, *args, **kwargs)
            if self.wrapped is not None:
                return self.wrapped(fn, *args, **kwargs)
            return fn(self.core, *args, **kwargs)

    def run_reference(self, fn: Callable, *args, **kwargs):
        """A pass of the reference policy, the policy the run started from: the frozen copy (full fine-tuning),
        the frozen second copy of the starting adapter (LoRA from `adapter=`), or the model with its LoRA adapter
        disabled (LoRA from the base)."""
        if self.reference is None:
            switch = (active_adapter(self.model, self.reference_adapter) if self.reference_adapter
                      else self.model.disable_adapter())
            with switch:
                return self.run(fn, *args, **kwargs)
        with self.autocast():
            if self.strategy == "fsdp":
                return getattr(self.reference, PASS_METHOD)(fn, *args, **kwargs)
            return fn(self.reference, *args, **kwargs)

    @contextmanager
    def gathered(self):
        """Sampling under fsdp: each unit gathered once and kept for the whole decode loop, then resharded.
        Otherwise every decode step would all-gather every layer again (measured on 2 CPU processes: 41 s
        per GRPO step at the bench shapes against 6 s under ddp). It holds the whole model in the compute
        dtype while sampling, as DDP always does (`audio-rft plan` counts it)."""
        if self.strategy != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        models = [self.core] + ([self.reference] if self.reference is not None else [])
        for model in models:
            model.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for model in models:
                model.set_reshard_after_forward(True)
                model.set_reshard_after_forward(False, recurse=False)  # the root keeps FSDP2's default
                for unit in model.modules():
                    if isinstance(unit, FSDPModule):
                        unit.reshard()

    def train(self, on: bool = True) -> None:
        """Train mode for the passes that form a ratio or a KL (π_old, policy, reference; chosen, rejected),
        eval mode for sampling and held-out evaluation. Dropout is off in every pass unless the run keeps it
        (`dropout=true`, see disable_dropout); then every one of those passes has it, the reference included."""
        self.core.train(on)
        if self.reference is not None:
            self.reference.train(on)

    @property
    def passes_without_signal(self) -> bool:
        """Whether a step where no rank has signal still makes its passes (at weight 0, then drops the gradients):
        FSDP2 needs the backward (after no-grad passes alone its next reshard failed, "Trying to resize storage that
        is not resizable", torch 2.13 CPU), while DeepSpeed must not see one: its step() would feed the zero
        gradients to AdamW, so it skips the passes and its step() altogether."""
        return self.strategy != "deepspeed"

    def all_done(self, done: bool) -> bool:
        """Whether every rank is done (sampling under sharding must run the same number of steps everywhere)."""
        return not self.layout.any(not done) if self.sharded else done

    def sync_gradients(self, on: bool) -> None:
        """Whether the next backward averages gradients (the last micro-batch of a step) or only accumulates.

        FSDP2 reduce-scatters after every micro-batch, as torchtune does, and accumulates into the sharded
        gradient: skipping the sync (`set_requires_gradient_sync(False)`) would keep every parameter's whole
        gradient, in the fp32 reduce dtype, on every rank until the last micro-batch, undoing gradient sharding."""
        if self.strategy == "ddp":
            self.wrapped.require_backward_grad_sync = on
        elif self.strategy == "deepspeed":
            self.wrapped.set_gradient_accumulation_boundary(on)

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":
            self.wrapped.backward(loss, scale_wrt_gas=False)  # the trainers already divide by grad_accum
        else:
            loss.backward()

    def clip_gradients(self, max_norm: float) -> float:
        """Clip to `max_norm` (0: measure only) and return the global gradient norm (before clipping)."""
        if self.strategy == "deepspeed":
            return float("nan")  # DeepSpeed clips inside step(); grad_norm() reads its norm afterwards
        params = [p for p in self.trainable if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def optimizer_step(self, apply: bool, any_backward: bool = True) -> float | None:
        """Apply (or, for a skipped step, drop) the accumulated gradients; advance the schedule.

        A skipped step changes no weight and no optimizer state on any engine. DeepSpeed has no call that drops
        accumulated gradients: a step that made no backward (no rank had signal) does not call its step() at all,
        and one with non-finite gradients relies on ZeRO's own overflow skip (`check_grad_overflow`, which
        deepspeed_config turns on for bf16); `was_step_applied()` confirms it, or the run stops."""
        norm = None
        if self.strategy == "deepspeed":
            if any_backward:
                self.wrapped.step()
                if self.wrapped.was_step_applied() and not apply:
                    raise UserError("DeepSpeed applied a step with non-finite gradients (this DeepSpeed has no "
                                    "overflow skip in this precision); upgrade it or use strategy=fsdp")
                norm = self.wrapped.get_global_grad_norm()
                norm = None if norm is None else float(norm)
        else:
            if apply:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------ checkpoints

    def full_weights(self, lora: bool) -> dict[str, torch.Tensor] | None:
        """The whole (LoRA: adapter) state dict on rank 0 in the saved dtype; collective under sharding.

        None where `model.save_pretrained` can read the weights itself (one process or DDP, no cast needed).
        """
        if self.strategy == "deepspeed":
            state = self.wrapped._zero3_consolidated_16bit_state_dict() if self.wrapped.zero_optimization_stage() == 3 \
                else self.wrapped.module.state_dict()
            prefix = "base_model.model." if lora else ""
            trained = {prefix + k.removeprefix("core."): v for k, v in self.wrapped.module.named_parameters()
                       if v.requires_grad}
            state = None if state is None else {prefix + k.removeprefix("core."): v for k, v in state.items()
                                                if not lora or prefix + k.removeprefix("core.") in trained}
        elif self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora))
        elif lora or self.compute_dtype == torch.float32:
            return None
        else:
            state = self.model.state_dict()
        if not self.layout.main or state is None:
            return None
        if not lora and self.compute_dtype != torch.float32:  # fp32 master weights, saved in the compute dtype
            state = {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in state.items()}
        return state

    def save_state(self, folder: Path) -> None:
        """Sharded training state for exact resume: trainable weights and optimizer (each rank its shard),
        scheduler, and every rank's RNG. Collective: every rank calls it with the same folder."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.strategy == "deepspeed":
            self.wrapped.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True)
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._dcp_state(), checkpoint_id=str(folder / "dcp"))
        if self.layout.main:
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(_rng_state(self.layout.device), folder / f"rng-{self.layout.rank}.pt")

    def load_state(self, folder: Path) -> None:
        if self.strategy == "deepspeed":
            self.wrapped.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                         load_lr_scheduler_states=False)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = self._dcp_state()
            dcp.load(state, checkpoint_id=str(folder / "dcp"))
            # Frozen weights are not in the checkpoint (they come from the base model), hence strict=False;
            # every trainable one must be restored.
            result = set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                                    optim_state_dict=state["optimizer"], options=self._dcp_options(strict=False))
            missing = set(result.missing_keys) & set(state["model"])
            if missing:
                raise UserError(f"{folder}: training state does not match the model (missing {sorted(missing)[:3]})")
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = folder / f"rng-{self.layout.rank}.pt"
        _set_rng_state(torch.load(rng if rng.exists() else folder / "rng-0.pt", weights_only=True), self.layout.device)

    def _dcp_options(self, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=strict)

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=self._dcp_options())
        return {"model": model_state, "optimizer": optimizer_state}


def dropout_generator(device: torch.device) -> torch.Generator:
    """The generator dropout on `device` draws from: the CPU's, or the CUDA device's own."""
    if device.type == "cpu":
        return torch.default_generator
    torch.cuda.init()
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def seed_dropout(seed: int, rank: int) -> None:
    """A dropout seed per rank, so ranks draw different masks (sampling has its own generators per prompt,
    a pure function of (seed, step, index), and model setup was seeded alike on every rank before this)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, python_state, _ = random.getstate()
    _, numpy_keys, numpy_pos, *_ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": torch.tensor(python_state, dtype=torch.int64),
            "python_version": version, "numpy": torch.from_numpy(numpy_keys.astype(np.int64)), "numpy_pos": int(numpy_pos),
            "device_type": device.type, "device_rng": dropout_generator(device).get_state()}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    # Older states hold the CPU's generator alone; a state from another kind of device has no generator for this one.
    if state.get("device_type") == device.type:
        dropout_generator(device).set_state(state["device_rng"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))


# ---------------------------------------------------------------- building it


REFERENCE_ADAPTER = "reference"


@contextmanager
def active_adapter(model: torch.nn.Module, name: str):
    """Every PEFT layer of `model` computes with adapter `name` for the duration. PeftModel.set_adapter would
    also flip which parameters require gradients, which the engines' shards and the optimizer were built on."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    before = [m._active_adapter for m in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, names in zip(layers, before):
            layer._active_adapter = names


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every pass (as TRL's preference trainers do by default): the π_old, policy and reference
    passes then run the same network, so a ratio is exactly 1 before the first update and a KL compares
    policies, not dropout masks. Train mode still switches gradient checkpointing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):  # transformers' functional ones
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def upcast_trained(model: torch.nn.Module) -> None:
    """fp32 master copies of every trained parameter in a 16-bit run: PEFT upcasts only the LoRA matrices, so
    a projector trained beside them (modules_to_save) would otherwise train, and keep its AdamW state, in bf16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def master_dtype(compute: torch.dtype, lora: bool, strategy: str) -> torch.dtype:
    """The dtype weights are loaded in: fp32 where 16-bit compute needs fp32 master weights (full
    fine-tuning), or where the engine shards every weight in one dtype (fsdp, deepspeed)."""
    if compute == torch.float32 or (lora and strategy not in SHARDED):
        return compute
    return torch.float32


def build_engine(config, layout: Layout, model: torch.nn.Module, compute_dtype: torch.dtype,
                 make_optimizer: Callable, reference: bool) -> Engine:
    """Wrap or shard the model for the strategy, then build the optimizer over what each rank holds.
    `reference`: the method needs the starting policy (full fine-tuning: a frozen copy; see run_reference)."""
    from audio_rft.model import core_model

    strategy = resolve_strategy(config.strategy, layout.world)
    core = core_model(model)
    engine = Engine(strategy, layout, model, core, compute_dtype)
    full_reference = reference and not config.lora  # a frozen copy: no master weights, kept in the compute dtype
    if full_reference and strategy != "fsdp":
        engine.reference = _frozen_copy(core, compute_dtype)
    elif reference and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        engine.reference_adapter = REFERENCE_ADAPTER
    if strategy == "none" or strategy == "ddp":
        if any(p.dtype != compute_dtype for p in core.parameters()):  # fp32 master weights: compute in 16 bits
            engine.autocast_dtype = compute_dtype
        if strategy == "ddp":
            device_ids = [layout.device.index] if layout.device.type == "cuda" else None
            # gradient_as_bucket_view: gradients live in DDP's buckets instead of in a second copy
            engine.wrapped = torch.nn.parallel.DistributedDataParallel(
                Passes(core), device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)
        engine.optimizer, engine.scheduler = make_optimizer(engine.trainable)
    elif strategy == "fsdp":
        skeleton = _empty_copy(core, compute_dtype) if full_reference else None
        loaded = model.state_dict() if layout.main else {}  # the others' weights are on the meta device
        _fully_shard(core, compute_dtype)
        load_shards(model, loaded)
        del loaded
        if skeleton is not None:
            engine.reference = _sharded_reference(skeleton, core, compute_dtype)
        engine.optimizer, engine.scheduler = make_optimizer(engine.trainable)  # over the local shards
    else:
        deepspeed = _import_deepspeed()
        # The schedule drives the base optimizer's param_groups, which DeepSpeed's ZeRO optimizer steps with.
        optimizer, engine.scheduler = make_optimizer(engine.trainable)
        if zero_stage(config) == 3:  # the encoder reads its position table directly, not through a module call
            deepspeed.zero.register_external_parameter(core.model.audio_tower,
                                                       core.model.audio_tower.embed_positions.weight)
        engine.wrapped, engine.optimizer, _, _ = deepspeed.initialize(
            model=Passes(core), optimizer=optimizer, config=deepspeed_config(config, compute_dtype))
        if engine.reference is not None:
            engine.reference.to(layout.device)
    return engine


def load_shards(model: torch.nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    """Fill a sharded model from rank 0's whole weights (`loaded`; empty elsewhere): rank 0 sends one tensor at a
    time and every rank keeps its shard of it (torch.distributed.checkpoint's broadcast_from_rank0), so a rank
    other than 0 never holds more than its shard plus one tensor. Rank 0 holds the whole model it loaded, as one
    process does, until this returns."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, loaded, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _empty_copy(core: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen model of `core`'s architecture with its parameters on the meta device (no memory) and its
    buffers real, on `core`'s device."""
    from accelerate import init_empty_weights

    from audio_rft.model import buffers_to

    with init_empty_weights(include_buffers=False):
        copy = type(core)._from_config(core.config, dtype=dtype)
    buffers_to(copy, next(core.buffers()).device)
    copy.generation_config = core.generation_config
    return copy.eval().requires_grad_(False)


def _sharded_reference(skeleton: torch.nn.Module, core: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen reference under fsdp, from the policy's own shards: sharded like the policy, each rank copies
    its shard of each weight (no collective, and no rank ever holds a whole copy)."""
    _fully_shard(skeleton, dtype)
    shards = {name: param.detach().to(dtype).clone() for name, param in core.named_parameters()}
    missing = {name for name, _ in skeleton.named_parameters()} - shards.keys()
    if missing:
        raise RuntimeError(f"reference copy: no policy weight for {sorted(missing)[:3]}")
    skeleton.load_state_dict(shards, strict=False, assign=True)
    return skeleton.requires_grad_(False)


def _frozen_copy(core: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(core).to(dtype).eval().requires_grad_(False)


def _fully_shard(core: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """FSDP2, as torchtune does it: each encoder and decoder layer, then the root; our passes registered
    as forward methods of the root so its own parameters are gathered for them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in [*core.model.audio_tower.layers, *core.model.language_model.layers]:
        fully_shard(layer, mp_policy=policy)
    # The embeddings and the head are a large share of the 7B (2 x 156,032 x 4,096) and of the small presets:
    # their own units, gathered only while called, not for a whole pass as the root is. Tied, they are one unit.
    embed, head = core.get_input_embeddings(), core.lm_head
    fully_shard([embed, head] if head.weight is embed.weight else embed, mp_policy=policy)
    if head.weight is not embed.weight:
        fully_shard(head, mp_policy=policy)
    fully_shard(core, mp_policy=policy)
    setattr(core, PASS_METHOD, types.MethodType(_run_pass, core))
    register_fsdp_forward_method(core, PASS_METHOD)


def describe(engine: Engine) -> str:
    layout = engine.layout
    return json.dumps({"strategy": engine.strategy, "processes": layout.world, "device": str(layout.device),
                       "compute_dtype": str(engine.compute_dtype).removeprefix("torch."),
                       "weights_dtype": str(next(engine.core.parameters()).dtype).removeprefix("torch.")})
