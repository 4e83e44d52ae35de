"""Auxiliary-loss-free load balancing (DeepSeek-V3, section 2.1.2): the balancing bias moves once per optimizer step.

Every MoE layer counts the tokens its router sends to each expert in training-mode forwards (`count_routed_tokens`
into the router's `tokens_per_expert`; the recomputation inside backward under activation checkpointing is not
counted). After each optimizer step, `update_balancing_bias` sums those counts over data-parallel ranks, moves every
MoE layer's `e_score_correction_bias` by `gamma * sign(mean_load - load_i)` (gamma = `config.bias_update_speed`, 0
freezes it) and resets the counts. The bias is a buffer: saved with the model, never seen by the optimizer.

Who calls it: torch's global optimizer-step post hook (`torch.optim.optimizer.register_optimizer_step_post_hook`).
It runs after every real `optimizer.step()` of any torch optimizer, so a plain `Trainer`, an Accelerate loop (whose
wrapped optimizer only steps on gradient-sync steps under accumulation) and `python -m moe_mtp.train` get the update
with no user code. The hook finds the moe_mtp models whose parameters that optimizer holds (LoRA adapters included:
they live inside the model) among the models built or put in train mode in this process, and updates those in train
mode. A user who calls `model.update_balancing_bias()` takes over: from then on the hook leaves that model alone.

An engine that steps a torch optimizer over its own copies of the parameters (DeepSpeed ZeRO replaces the
optimizer's `param_groups` with flat partitions) hides the model from that lookup, and the bias would silently stop
moving: `bind_optimizer(optimizer, model)` names the model explicitly (`moe_mtp.training.bind_deepspeed` does it for
ZeRO, for `python -m moe_mtp.train` and `MoeMtpCallback`).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.module_tracker import ModuleTracker


@dataclass
class BalancingState:
    """Per-model record of the bias updates, read by the Trainer callback and the training script."""

    updates: int = 0
    """Bias updates that saw routed tokens (one per optimizer step in training)."""
    manual: bool = False
    """Set once the user calls `update_balancing_bias` directly; the automatic hook then skips the model."""
    last_load: torch.Tensor | None = None
    """Tokens per expert of the last update, summed over ranks: (moe_layers, experts)."""
    load_since_read: torch.Tensor | None = None
    """Tokens per expert summed over the updates since `take_balance_metrics` last read them."""
    max_vio_since_read: list[torch.Tensor] = field(default_factory=list)
    """Per-layer MaxVio of each update since the last read."""


class BiasUpdateHook:
    """The process's optimizer-step post hook and what it needs: the models to update (weakly held), the optimizers
    bound to a model explicitly, and whether updates are on. One instance, `BIAS_UPDATE_HOOK`, which torch's global
    hook registry calls; the functions below are its interface."""

    def __init__(self):
        self.tracked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.generation = 0  # bumped when a model is first tracked, so cached optimizer lookups are redone
        self.optimizer_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.bound: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> weakref of its model
        self.enabled = True
        self.handle = None

    def track(self, model: nn.Module) -> None:
        if model not in self.tracked:
            self.tracked.add(model)
            self.generation += 1
        if self.handle is None:
            self.handle = register_optimizer_step_post_hook(self)

    def bind(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.track(model)
        self.bound[optimizer] = weakref.ref(model)

    def models_stepped_by(self, optimizer: torch.optim.Optimizer) -> list[nn.Module]:
        bound = self.bound.get(optimizer)
        if bound is not None:
            model = bound()
            return [model] if model is not None else []
        signature = (self.generation, tuple(len(group["params"]) for group in optimizer.param_groups))
        cached = self.optimizer_models.get(optimizer)
        if cached is None or cached[0] != signature:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            models = [m for m in list(self.tracked) if any(id(p) in held for p in m.parameters())]
            cached = (signature, [weakref.ref(m) for m in models])
            self.optimizer_models[optimizer] = cached
        return [m for m in (ref() for ref in cached[1]) if m is not None]

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if not self.enabled or not len(self.tracked):
            return
        # A GradScaler calls a fused optimizer's step even on overflow (the kernel then does nothing): a skipped step
        # moves no bias, as when it skips a non-fused optimizer's step altogether.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        for model in self.models_stepped_by(optimizer):
            if model.training and not balancing_state(model).manual:
                update_balancing_bias(model, manual=False)


BIAS_UPDATE_HOOK = BiasUpdateHook()


def track(model: nn.Module) -> None:
    """Registers a model (the module owning the routers) for the automatic update. Called by `MoeMtpModel`."""
    BIAS_UPDATE_HOOK.track(model)


@contextmanager
def automatic_bias_update(enabled: bool):
    """Turns the automatic post-step update off (or on) inside the block, e.g. around a second optimizer's step."""
    previous, BIAS_UPDATE_HOOK.enabled = BIAS_UPDATE_HOOK.enabled, enabled
    try:
        yield
    finally:
        BIAS_UPDATE_HOOK.enabled = previous


def set_automatic_bias_update(enabled: bool) -> None:
    """Turns the automatic post-step update off (or on) for the whole process."""
    BIAS_UPDATE_HOOK.enabled = enabled


def balancing_state(model: nn.Module) -> BalancingState:
    state = getattr(model, "_balancing_state", None)
    if state is None:
        state = BalancingState()
        model._balancing_state = state
    return state


# Asked only whether autograd's engine is running: its `is_bw` is torch's public form of that question.
_AUTOGRAD = ModuleTracker()


def count_routed_tokens(router: nn.Module, topk_indices: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Adds the tokens a training-mode forward sent to each expert to `router.tokens_per_expert`.

    `token_mask` (True = real token) keeps padding out. The recomputation that activation checkpointing runs inside
    backward is not counted, or a checkpointed layer would count its tokens twice."""
    if not router.training or (not torch.compiler.is_compiling() and _AUTOGRAD.is_bw):
        return
    counts = router.tokens_per_expert
    if counts.device != topk_indices.device:  # a plain tensor, not a buffer: `model.to(...)` leaves it behind
        counts = (
            torch.zeros_like(counts, device=topk_indices.device) if counts.is_meta else counts.to(topk_indices.device)
        )
        router.tokens_per_expert = counts
    # A masked scatter_add rather than bincount of the real tokens: fixed shapes, so torch.compile keeps it.
    counted = torch.ones_like(topk_indices, dtype=counts.dtype)
    if token_mask is not None:
        counted = counted * token_mask.reshape(-1, 1).to(counted.dtype)
    counts.scatter_add_(0, topk_indices.flatten(), counted.flatten())


def named_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(`layers.3`, router) pairs in execution order: main layers, then the MTP modules (`mtp_layers.0`, ...).

    The one router lookup of the package: the bias update, `MoeMtpForCausalLM.moe_routers`, the sequence-wise balance
    loss and the training script's per-layer metrics all use it. It spots a router by its balancing state (the bias
    and the load counts), so it also finds the routers of the Hub bundle's copy of the classes."""
    found = []

    # Runs after every optimizer step: the walk skips the routed experts (thousands of modules at V3 scale).
    def walk(module: nn.Module, prefix: str):
        for name, child in module._modules.items():
            if child is None or getattr(child, "holds_no_routers", False):
                continue
            path = f"{prefix}{name}"
            if hasattr(child, "e_score_correction_bias") and hasattr(child, "tokens_per_expert"):
                found.append((path.removesuffix(".mlp.gate"), child))
            else:
                walk(child, f"{path}.")

    walk(model, "")
    return found


def owner_of_routers(model: nn.Module) -> nn.Module:
    """The tracked module (MoeMtpModel) inside a causal LM, a PEFT or DDP wrapper; the model itself otherwise."""
    for module in model.modules():
        if module in BIAS_UPDATE_HOOK.tracked:
            return module
    return model


@torch.no_grad()
def update_balancing_bias(model: nn.Module, gamma: float | None = None, *, manual: bool = True) -> dict[str, float]:
    """Moves every router's `e_score_correction_bias` by `gamma * sign(mean_load - load)` from the tokens counted since
    the last update (summed over ranks when torch.distributed is initialized), then resets the counts.

    `gamma` defaults to `config.bias_update_speed`. Returns each MoE layer's MaxVio (max load / mean load - 1) of the
    step. Every data-parallel rank must call it together (it all-reduces). Calling it yourself turns the automatic
    post-optimizer-step update off for this model.
    """
    owner = owner_of_routers(model)
    state = balancing_state(owner)
    state.manual = state.manual or manual
    routers = named_routers(owner)
    if not routers:
        return {}
    if gamma is None:
        gamma = owner.config.bias_update_speed
    device = routers[0][1].e_score_correction_bias.device  # where the collective backend wants it (NCCL: CUDA)
    # A router that has not run a training forward since loading (a model restored from a sharded checkpoint is built
    # on the meta device) has no counts yet: zeros, which every rank still all-reduces.
    load = torch.stack([
        torch.zeros(router.num_experts, dtype=torch.float64, device=device) if router.tokens_per_expert.is_meta
        else router.tokens_per_expert.to(device=device, dtype=torch.float64)
        for _, router in routers
    ])  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(load)
        # Ranks of one tensor-parallel group route the same batch (expert parallelism within it included): count it
        # once. DDP and FSDP ranks each see their own data, and sum.
        load /= max(getattr(getattr(owner.config, "distributed_config", None), "tp_size", 1) or 1, 1)
    for _, router in routers:
        if router.tokens_per_expert.is_meta:
            router.tokens_per_expert = torch.zeros(router.num_experts, dtype=torch.long, device=device)
        else:
            router.tokens_per_expert.zero_()
    if load.sum() == 0:
        return {}  # nothing was routed in training mode since the last update
    mean = load.mean(dim=-1, keepdim=True)
    if gamma:
        direction = torch.sign(mean - load).float()
        for (_, router), step in zip(routers, direction, strict=True):
            bias = router.e_score_correction_bias
            bias += gamma * step.to(bias.device, bias.dtype)
    max_vio = (load.amax(dim=-1) / mean.squeeze(-1).clamp(min=1e-12) - 1).float().cpu()
    state.updates += 1
    state.last_load = load.float().cpu()
    state.load_since_read = (
        state.last_load if state.load_since_read is None else state.load_since_read + state.last_load
    )
    state.max_vio_since_read.append(max_vio)
    return {name: float(value) for (name, _), value in zip(routers, max_vio, strict=True)}


def take_balance_metrics(model: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean per-layer MaxVio over the bias updates since the last call, and their summed expert load (layers,
    experts); both reset. Every rank sees the same values (the loads were all-reduced)."""
    owner = owner_of_routers(model)
    state = balancing_state(owner)
    load, state.load_since_read = state.load_since_read, None
    if not state.max_vio_since_read:
        return {}, load
    mean_vio = torch.stack(state.max_vio_since_read).mean(dim=0)
    state.max_vio_since_read = []
    names = [name for name, _ in named_routers(owner)]
    return {f"max_vio/{name}": float(v) for name, v in zip(names, mean_vio, strict=True)}, load


def bind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Every real step of `optimizer` moves `model`'s balancing bias, whatever tensors the optimizer holds. For
    engines whose optimizer steps copies or flat partitions of the parameters (DeepSpeed ZeRO), which the automatic
    lookup through the optimizer's parameters cannot trace back to the model. Bind the innermost torch optimizer,
    the one that really steps, on every rank."""
    BIAS_UPDATE_HOOK.bind(optimizer, owner_of_routers(model))


__all__ = [
    "BalancingState",
    "automatic_bias_update",
    "balancing_state",
    "bind_optimizer",
    "count_routed_tokens",
    "named_routers",
    "set_automatic_bias_update",
    "take_balance_metrics",
    "update_balancing_bias",
]
