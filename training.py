"""Training components shared by `Trainer` users and `python -m moe_mtp.train`: the DeepSeek-V3 schedules of the MTP
loss weight and the balancing speed, the per-part loss record, and a `Trainer` callback that logs them.

The balancing bias itself needs none of this: it moves after every optimizer step on its own (see modeling/balancing.py).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .modeling.balancing import bind_optimizer, take_balance_metrics


@dataclass(frozen=True)
class StepSchedule:
    """A piecewise-constant value over the fraction of training done, written `VALUE[@FRACTION],...`.

    `"0.3,0.1@0.7"` is 0.3 until 70% of the steps, then 0.1: DeepSeek-V3's MTP weight (0.3 for the first 10T of
    14.8T tokens, then 0.1). `"1e-3,0@0.97"` is its balancing speed (frozen for the last 500B tokens).
    """

    points: tuple[tuple[float, float], ...]  # (from_fraction, value), sorted

    @classmethod
    def parse(cls, text: str | float, name: str = "schedule") -> StepSchedule:
        if isinstance(text, (int, float)):
            return cls(((0.0, float(text)),))
        points = []
        for part in str(text).split(","):
            value, _, start = part.strip().partition("@")
            try:
                point = (float(start) if start else 0.0, float(value))
            except ValueError:
                raise ValueError(
                    f"{name}: cannot read {part!r}; write VALUE[@FRACTION],... e.g. '0.3,0.1@0.7'"
                ) from None
            if not 0.0 <= point[0] <= 1.0 or point[1] < 0:
                raise ValueError(f"{name}: {part!r} needs a fraction in [0, 1] and a non-negative value")
            points.append(point)
        points.sort()
        if points[0][0] != 0.0:
            raise ValueError(f"{name}: {text!r} must give a value from the start (a first entry without @FRACTION)")
        return cls(tuple(points))

    def __call__(self, step: int, total_steps: int) -> float:
        fraction = step / max(total_steps, 1)
        value = self.points[0][1]
        for start, point_value in self.points:
            if fraction >= start:
                value = point_value
        return value


def find_moe_mtp_model(model: nn.Module) -> nn.Module:
    """The `MoeMtpForCausalLM` inside a PEFT, DDP, FSDP or Accelerate wrapper."""
    from .modeling import MoeMtpForCausalLM

    for module in model.modules():
        if isinstance(module, MoeMtpForCausalLM):  # FSDP2 subclasses it on the fly
            return module
    raise ValueError(f"{type(model).__name__} holds no MoeMtpForCausalLM")


class LossRecorder:
    """Accumulates the detached loss parts of every training forward with labels: the main cross-entropy, each MTP
    depth's cross-entropy and the sequence-wise balance loss. `take()` returns their means (over ranks too) and
    resets them."""

    def __init__(self, model: nn.Module):
        self.model = find_moe_mtp_model(model)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.handle = self.model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        if not module.training or getattr(output, "main_loss", None) is None:
            return
        parts = {"main_loss": output.main_loss}
        for depth, depth_loss in enumerate(output.mtp_losses or (), start=1):
            parts[f"mtp_loss_{depth}"] = depth_loss
        if output.aux_loss is not None:
            parts["balance_loss"] = output.aux_loss
        _to_local_means(module, kwargs, parts)
        for key, value in parts.items():
            value = value.detach().float()
            self.sums[key] = value if key not in self.sums else self.sums[key] + value.to(self.sums[key].device)
        self.count += 1

    def take(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k].to(self.sums[keys[0]].device) for k in keys]) / self.count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        self.sums, self.count = {}, 0
        return dict(zip(keys, means.tolist(), strict=True))

    def remove(self):
        self.handle.remove()


def _to_local_means(module, kwargs: dict, parts: dict[str, torch.Tensor]) -> None:
    """Turns cross-entropies normalized by a `num_items_in_batch` back into this forward's own means.

    `Trainer` passes `num_items_in_batch`, the label count of the whole optimizer step: over its gradient-accumulation
    micro-batches and, with `average_tokens_across_devices`, over all ranks. The losses are then sums divided by
    that count, a fraction of the micro-batch's mean, and averaging them as means would log a half of the real value
    on 2 ranks (or with 2 micro-batches). Rescaled by count / this forward's own label count, they are what one
    process without accumulation logs. The MTP depths are normalized by the main label count in the loss (and so
    here), and the balance loss is weighted by the forward's share of the labels (MoeMtpForCausalLM.forward), so
    that `loss = main_loss + mtp_loss_weight * mean(mtp_loss_k) + balance_loss` still holds."""
    items = kwargs.get("num_items_in_batch")
    shift = kwargs.get("shift_labels")
    labels = kwargs.get("labels")
    if items is None or (shift is None and labels is None):
        return
    if shift is None:
        shift = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
    device = parts["main_loss"].device
    scale = torch.as_tensor(items, dtype=torch.float32).to(device) / (shift != -100).sum().clamp(min=1).to(device)
    distilled = getattr(module.config, "mtp_loss_targets", "labels") != "labels"  # their own means, no num_items
    for key in list(parts):
        if key in ("main_loss", "balance_loss") or (key.startswith("mtp_loss_") and not distilled):
            parts[key] = parts[key] * scale


class MoeMtpCallback(TrainerCallback):
    """Adds DeepSeek-V3's recipe to a `Trainer`: logs `main_loss`, `mtp_loss_k`, `balance_loss` and per-layer
    `max_vio/<layer>` beside `loss`, and schedules `mtp_loss_weight` and `bias_update_speed` over the run.

    ```python
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MoeMtpCallback(mtp_loss_weight="0.3,0.1@0.7")])
    ```
    Schedules left as None keep the config's values. The bias update itself needs no callback.

    `mtp_loss_targets="self_kl"` (or `"self_greedy"`) makes the MTP modules learn the main model's own predictions
    instead of the text (self-distillation, see `MoeMtpConfig.mtp_loss_targets`), so that a fine-tune does not leave
    them stale; `mtp_only=True` also freezes every other weight and the balancing bias, which is what
    `python -m moe_mtp.train --mtp-only` does. Both are undone when training ends.
    """

    def __init__(
        self,
        mtp_loss_weight: str | float | None = None,
        bias_update_speed: str | float | None = None,
        mtp_loss_targets: str | None = None,
        mtp_only: bool = False,
    ):
        self.schedules = {
            name: StepSchedule.parse(value, name)
            for name, value in (("mtp_loss_weight", mtp_loss_weight), ("bias_update_speed", bias_update_speed))
            if value is not None
        }
        if mtp_only and bias_update_speed is not None:
            raise ValueError("MoeMtpCallback(mtp_only=True) freezes the balancing bias; drop bias_update_speed")
        if mtp_only and mtp_loss_targets is None:
            mtp_loss_targets = "self_kl"
        self.mtp_loss_targets, self.mtp_only = mtp_loss_targets, mtp_only
        self.recorder: LossRecorder | None = None
        self._restore: dict = {}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _call_before_the_others(self)
        if model is not None and uses_deepspeed(args):
            prepare_deepspeed_model(model)  # before Trainer hands the model to DeepSpeed (in train())

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _call_before_the_others(self)  # a callback added with trainer.add_callback after __init__
        if optimizer is not None and uses_deepspeed(args):
            bind_deepspeed(optimizer, model)
        if self.recorder is not None:
            self.recorder.remove()
        self.recorder = LossRecorder(model)
        config = self.recorder.model.config
        if self.mtp_loss_targets is not None:
            self._restore = {"mtp_loss_targets": config.mtp_loss_targets, "bias_update_speed": config.bias_update_speed}
            config.mtp_loss_targets = self.mtp_loss_targets
        if self.mtp_only:
            trainable = 0
            for name, parameter in model.named_parameters():
                parameter.requires_grad_("mtp_layers." in name)
                trainable += parameter.requires_grad
            if not trainable:
                raise ValueError("MoeMtpCallback(mtp_only=True): the model has no MTP modules to train")
            config.bias_update_speed = 0.0  # main-model buffers stay as they are

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.recorder is not None:
            apply_schedules(self.recorder.model.config, self.schedules, state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.recorder is None or logs is None or "loss" not in logs:
            return
        extra = self.recorder.take()
        extra.update(take_balance_metrics(self.recorder.model)[0])
        config = self.recorder.model.config
        extra.update(mtp_loss_weight=config.mtp_loss_weight, bias_update_speed=config.bias_update_speed)
        logs.update(extra)
        # Trainer stored its copy of `logs` just before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            for name, value in self._restore.items():
                setattr(self.recorder.model.config, name, value)
            self.recorder.remove()
            self.recorder = None


def _call_before_the_others(callback: TrainerCallback) -> None:
    """Moves `callback` to the front of the `Trainer`'s callback list, so that what its `on_log` adds to `logs`
    reaches the reporting callbacks (TensorBoard, W&B, MLflow, ...). `Trainer` puts those before the user's
    callbacks and offers no ordering option, and events carry no reference to the list, so it is found on the
    caller's frames (the `CallbackHandler` dispatching this event)."""
    frame = sys._getframe(1)
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks):
            # A new list: the handler may be iterating over the old one right now.
            handler.callbacks = [callback, *(c for c in handler.callbacks if c is not callback)]
            return
        frame = frame.f_back
    warnings.warn(
        f"{type(callback).__name__} could not move ahead of the reporting callbacks: its metrics reach "
        "trainer.state.log_history but may miss TensorBoard/W&B/MLflow",
        stacklevel=2,
    )


def apply_schedules(config, schedules: dict[str, StepSchedule], step: int, total_steps: int) -> None:
    for name, schedule in schedules.items():
        setattr(config, name, schedule(step, total_steps))


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

    from .modeling.modeling_moe_mtp import MoeMtpMoE

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


__all__ = [
    "LossRecorder",
    "MoeMtpCallback",
    "StepSchedule",
    "apply_schedules",
    "bind_deepspeed",
    "clip_grad_norm_",
    "find_moe_mtp_model",
    "prepare_deepspeed_model",
    "split_groups_by_mesh",
    "uses_deepspeed",
]
