"""The command line of `python -m moe_mtp.train`: its flags, grouped as `--help` shows them, and their checks."""

from __future__ import annotations

import argparse

from .layout import PARALLEL_FLAGS, sharded_requested
from .mtp_align import add_arguments as _alignment_flags
from .schedules import StepSchedule

DESCRIPTION = (
    "`python -m moe_mtp.train`: pretrain a moe_mtp model from scratch, or fine-tune one, with DeepSeek-V3's recipe."
)


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_mtp.train", description=description)
    for add_group in (_run_flags, _data_flags, _model_flags, _recipe_flags, _optim_flags, _parallel_flags, _loop_flags,
                      _alignment_flags):  # fmt: skip
        add_group(parser)
    return parser


def _run_flags(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="outputs/train", help="Folder for checkpoints, model, metrics and plots.")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="Continue from the latest checkpoint in OUTPUT/checkpoints, or from the folder given.",
    )
    run.add_argument("--overwrite", action="store_true", help="Start over in an output folder that already has a run.")
    run.add_argument("--smoke", action="store_true", help="A tiny run that finishes in seconds.")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--cpu", action="store_true", help="Train on the CPU even when a GPU is present.")
    run.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    run.add_argument("--no-progress", action="store_true", help="No tqdm bar.")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="Local .txt/.jsonl/.json/.parquet files, or a dataset name on the Hub (when online). "
        "Default: the English text of the stdlib's pydoc_data/topics.py.",
    )
    data.add_argument("--data-config", default=None, help="Configuration name of a Hub dataset.")
    data.add_argument("--text-column", default="text")
    data.add_argument("--max-documents", type=int, default=None, help="Use only the first N documents.")
    data.add_argument("--seq-len", type=int, default=256, help="Tokens per packed training block.")
    data.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="Share of the documents held out for eval (chosen by a hash of each document's text).",
    )
    data.add_argument("--tokenizer", default=None, help="Tokenizer to use (default: the model's, or a new BPE).")
    data.add_argument("--vocab-size", type=int, default=4096, help="Vocabulary of the BPE trained from scratch.")
    data.add_argument(
        "--tokenizer-sample-bytes",
        type=int,
        default=100_000_000,
        help="The BPE is trained on the first this many bytes of the training documents.",
    )
    data.add_argument(
        "--cache-dir",
        default=None,
        help="Where trained tokenizers and token stores are kept and reused "
        "(default: $MOE_MTP_CACHE, else ~/.cache/moe_mtp).",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Tokenize while training, from a datasets stream, without a token store (no full pass first).",
    )
    data.add_argument(
        "--shuffle-buffer",
        type=int,
        default=10_000,
        help="--streaming: documents in the seeded shuffle buffer (0: corpus order).",
    )


def _model_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (from scratch unless --model is given)")
    model.add_argument("--model", default=None, help="Fine-tune this moe_mtp (or released DeepSeek) folder.")
    for flag, default in [
        ("hidden-size", 256), ("intermediate-size", 512), ("moe-intermediate-size", 128), ("num-layers", 4),
        ("num-heads", 4), ("first-k-dense", 1), ("n-routed-experts", 16), ("n-shared-experts", 1), ("top-k", 2),
        ("n-group", 4), ("topk-group", 2), ("q-lora-rank", 128), ("kv-lora-rank", 64), ("qk-nope-head-dim", 32),
        ("qk-rope-head-dim", 16), ("v-head-dim", 32), ("mtp-depth", 1),
    ]:  # fmt: skip
        model.add_argument(f"--{flag}", type=int, default=default)


def _recipe_flags(parser: argparse.ArgumentParser) -> None:
    recipe = parser.add_argument_group("recipe (schedules are VALUE[@FRACTION],...; see training.StepSchedule)")
    recipe.add_argument("--mtp-loss-weight", default="0.3,0.1@0.7", help="MTP loss weight schedule (DeepSeek-V3).")
    recipe.add_argument("--bias-update-speed", default="1e-3,0@0.97", help="Balancing speed gamma schedule.")
    recipe.add_argument("--seq-aux-loss-alpha", type=float, default=1e-4, help="Sequence-wise balance loss weight.")


def _optim_flags(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimization")
    optim.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="AdamW (the recipe), or plain SGD (no momentum), which shows a sum-vs-mean gradient mistake that "
        "AdamW's normalization hides: what the parity tests against one process use.",
    )
    optim.add_argument("--max-steps", type=int, default=300, help="Optimizer steps.")
    optim.add_argument("--batch-size", type=int, default=8, help="Blocks per micro-batch per process.")
    optim.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="Cosine decay ends at lr * this.")
    optim.add_argument("--warmup-steps", type=int, default=20)
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.95)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="Gradient clipping; 0 turns it off.")
    optim.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 on GPUs that support it, else fp32.",
    )
    optim.add_argument("--activation-checkpointing", action="store_true")


def _parallel_flags(parser: argparse.ArgumentParser) -> None:
    parallel = parser.add_argument_group(
        "sharded engines (under torchrun; the model is loaded through transformers' DistributedConfig, "
        "docs/distributed.md)"
    )
    parallel.add_argument(
        "--tp-size", type=int, default=1, help="Tensor-parallel ranks (attention heads, dense and shared MLPs)."
    )
    parallel.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="Expert-parallel ranks: each holds n_routed_experts / ep_size whole experts. A multiple of --tp-size "
        "that divides --tp-size x --fsdp-size.",
    )
    parallel.add_argument(
        "--fsdp-size",
        type=int,
        default=1,
        help="FSDP2 ranks (data parallel, parameters, gradients and optimizer states sharded). "
        "--tp-size x --fsdp-size must equal the number of processes.",
    )


def _loop_flags(parser: argparse.ArgumentParser) -> None:
    loop = parser.add_argument_group("logging, eval, checkpoints")
    loop.add_argument("--log-every", type=int, default=10)
    loop.add_argument("--eval-every", type=int, default=100, help="Eval perplexity every N steps (and at the end).")
    loop.add_argument("--eval-batches", type=int, default=20, help="Eval micro-batches per process; 0: all blocks.")
    loop.add_argument("--save-every", type=int, default=100, help="Checkpoint every N steps; 0: only at the end.")
    loop.add_argument("--keep-checkpoints", type=int, default=2, help="Complete checkpoints kept.")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuses (through `parser.error`) values and combinations that cannot work, and parses the schedules into
    `args.mtp_schedule` and `args.bias_schedule`."""
    for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "tokenizer_sample_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in PARALLEL_FLAGS:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if sharded_requested(args):
        flags = " ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in PARALLEL_FLAGS if getattr(args, n) > 1)
        if args.mtp_only or args.add_mtp is not None:
            parser.error(f"{flags}: --mtp-only/--add-mtp run in one process or under DDP only")
        if args.mixed_precision == "fp16":
            parser.error(f"{flags}: --mixed-precision fp16 needs a gradient scaler, which the sharded engines lack here; "
                         "use bf16 or no")  # fmt: skip
    if args.streaming and not args.eval_batches:
        parser.error("--eval-batches 0 (every held-out block) needs the token store; give a number with --streaming")
    if not 0 < args.eval_fraction < 1:
        parser.error(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    try:
        args.mtp_schedule = StepSchedule.parse(args.mtp_loss_weight, "--mtp-loss-weight")
        args.bias_schedule = StepSchedule.parse(args.bias_update_speed, "--bias-update-speed")
    except ValueError as error:
        parser.error(str(error))
    return args
