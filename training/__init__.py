"""Training moe_mtp models: the components a `Trainer` user needs, and `python -m moe_mtp.train` (train.py) built
on them. One module per concern:

- schedules.py: `StepSchedule`, DeepSeek-V3's MTP-weight and balancing-speed schedules;
- recorder.py: `LossRecorder`, the main, MTP and balance loss parts of every training forward;
- callback.py: `MoeMtpCallback`, the recipe for a transformers `Trainer`;
- distributed.py: optimizer groups and clipping across device meshes, FSDP2's deferred sync, the DeepSpeed hooks;

and for the script (`python -m moe_mtp.train`):

- cli.py: its flags and their checks;
- layout.py: how the processes share the work (--tp/--ep/--fsdp-size), and what each holds;
- dataloader.py: the tokenizer, the token store or stream, and which blocks each process reads at each step;
- model.py: the model (from scratch, fine-tuned or sharded), its optimizer and learning-rate schedule;
- loop.py: `train(args)`, the training loop, its eval and summary;
- checkpoint.py: the output folder, checkpoints (save, resume) and the final Hub-ready model folder;
- metrics.py and plots.py: metrics.jsonl/.csv, summary.json and the PNG plots;
- mtp_align.py: `--mtp-only`/`--add-mtp`, re-aligning (or adding) the MTP modules of a finished model.

The balancing bias needs none of this: it moves after every optimizer step on its own (see modeling/balancing.py).
"""

from .callback import MoeMtpCallback
from .distributed import bind_deepspeed, clip_grad_norm_, prepare_deepspeed_model, split_groups_by_mesh, uses_deepspeed
from .recorder import LossRecorder, find_moe_mtp_model
from .schedules import StepSchedule, apply_schedules

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
