"""The per-part loss record of training forwards (main cross-entropy, each MTP depth, the balance loss), which the
`Trainer` callback and `python -m moe_mtp.train` log beside the total loss."""

from __future__ import annotations

import torch
from torch import nn


def find_moe_mtp_model(model: nn.Module) -> nn.Module:
    """The `MoeMtpForCausalLM` inside a PEFT, DDP, FSDP or Accelerate wrapper."""
    from ..modeling import MoeMtpForCausalLM

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
