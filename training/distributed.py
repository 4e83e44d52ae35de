"""Helpers for training a moe_mtp model on several processes, in any loop (`Trainer`'s or `python -m moe_mtp.train`'s):
optimizer groups and gradient clipping over the mixed meshes of a model loaded with a `distributed_config`, FSDP2's
deferred gradient sync, and the DeepSpeed ZeRO-3 hooks (docs/distributed.md)."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..modeling.balancing import bind_optimizer
from .recorder import find_moe_mtp_model


def _mesh_of(tensor: torch.Tensor):
    """The device mesh of a DTensor, None for a plain tensor."""
    return getattr(tensor, "device_mesh", None)


def split_groups_by_mesh(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups split so that each holds plain tensors or DTensors of one device mesh only.

    A model loaded with a `distributed_config` mixes them: under tensor parallelism the replicated parameters stay plain
    tensors beside the sharded DTensors, and expert parallelism puts the routed experts on a mesh of their own. torch's
    fused and foreach optimizer kernels take one list per group and refuse such a mix ("got mixed torch.Tensor and
    DTensor"); one group per mesh keeps them. Each group keeps its other options (weight decay, ...)."""
    split = []
    for group in groups:
        by_mesh: dict = {}
        for param in group["params"]:
            by_mesh.setdefault(_mesh_of(param), []).append(param)
        split.extend({**group, "params": params} for params in by_mesh.values())
    return split


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model loaded with a `distributed_config`, whose gradients may be plain
    tensors and DTensors on several device meshes, which torch's version cannot stack. The norm is taken per mesh
    (each already reduced over its ranks, so it is the norm of the full gradient), then combined: every rank gets
    the same total and scales by the same factor. Returns the total norm before clipping (a plain tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    by_mesh: dict = {}
    for grad in grads:
        by_mesh.setdefault(_mesh_of(grad), []).append(grad)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    if max_norm and max_norm != float("inf"):
        scale = float((max_norm / (total + 1e-6)).clamp(max=1.0))
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
    return total


def uses_deepspeed(args=None) -> bool:
    """Whether this process trains under DeepSpeed: `accelerate launch` with a DeepSpeed config, or a `Trainer` given
    `TrainingArguments(deepspeed=...)`."""
    if args is not None and getattr(args, "deepspeed", None):
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def prepare_deepspeed_model(model: nn.Module) -> None:
    """Marks every MoE block (router, routed and shared experts) a ZeRO-3 leaf module, before DeepSpeed wraps the
    model. ZeRO-3 then gathers a block's parameters once, on entry, instead of fetching each submodule's as it runs:
    a rank whose tokens reach only some experts (or none) never leaves the others waiting for a fetch it does not
    make. Call it before `deepspeed.initialize` / `accelerator.prepare`."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..modeling.modeling_moe_mtp import MoeMtpMoE

    set_z3_leaf_modules(find_moe_mtp_model(model), [MoeMtpMoE])


def bind_deepspeed(optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Makes the balancing bias move on every real DeepSpeed optimizer step. ZeRO steps the torch optimizer it wraps
    over flat fp32 partitions, so the automatic hook (which finds a model through the optimizer's parameters) would
    no longer find the model and the bias would silently stop moving; this binds that innermost optimizer to the
    model explicitly (modeling/balancing.py). `optimizer` may be accelerate's or DeepSpeed's wrapper. Returns the
    bound optimizer."""
    base = optimizer
    while getattr(base, "optimizer", None) is not None:  # accelerate's wrapper -> ZeRO's -> the torch optimizer
        base = base.optimizer
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__} to bind the balancing update to")
    bind_optimizer(base, find_moe_mtp_model(model).model)
    return base


@contextlib.contextmanager
def deferred_fsdp_sync(model):
    """No gradient reduce-scatter until the last micro-batch (FSDP2's own `no_sync`); nothing to defer otherwise."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)
