"""`MoeMtpCallback`: DeepSeek-V3's recipe for a transformers `Trainer` (loss parts and balance metrics in the logs,
the MTP weight and balancing speed scheduled, `mtp_only` re-alignment). The balancing bias itself needs no callback:
it moves after every optimizer step on its own (see modeling/balancing.py)."""

from __future__ import annotations

import sys
import warnings

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..modeling.balancing import take_balance_metrics
from .distributed import bind_deepspeed, prepare_deepspeed_model, uses_deepspeed
from .recorder import LossRecorder
from .schedules import StepSchedule, apply_schedules


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
