"""`python -m moe_mtp.train`: pretrain a moe_mtp model from scratch, or fine-tune one, with DeepSeek-V3's recipe.

    python -m moe_mtp.train --smoke                               # seconds: tiny model on the stdlib's English text
    python -m moe_mtp.train --data corpus.txt --output-dir outputs/run1
    accelerate launch --config_file examples/accelerate/ddp.yaml -m moe_mtp.train --data corpus.jsonl
    torchrun --nproc_per_node 2 -m moe_mtp.train --smoke           # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 -m moe_mtp.train --smoke --tp-size 2 --ep-size 2   # transformers' TP + EP
    torchrun --nproc_per_node 2 -m moe_mtp.train --smoke --fsdp-size 2             # transformers' FSDP2
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml -m moe_mtp.train --data corpus.jsonl

Without `--data` the corpus is the English text of the stdlib's `pydoc_data/topics.py`. The corpus is tokenized once
into a memory-mapped token store in a cache folder, reused by later runs and every process (a byte-level BPE is
trained on a sample of it when no tokenizer is given; see data.py), and training reads fixed-length blocks from it;
`--streaming` tokenizes as it trains instead. The loop is AdamW with
warmup and cosine decay, gradient accumulation, bf16 autocast on GPUs that support it, gradient clipping and optional
activation checkpointing; the loss is the main cross-entropy plus the scheduled MTP loss and the sequence-wise
balance loss, and the balancing bias moves after every optimizer step (modeling/balancing.py). Every `--save-every` steps an
atomic checkpoint (model, optimizer, scheduler, RNG and data position) lands in `OUTPUT/checkpoints/step-N`;
`--resume` continues from the latest one exactly. The output folder gets the trained model and tokenizer
(`OUTPUT/model`, a `from_pretrained` folder), `metrics.jsonl`/`metrics.csv`, `summary.json` and PNG plots.

This file is the entry point only: the flags are in training/cli.py, the loop in training/loop.py, and the other
parts beside them (training/__init__.py lists which module holds what); `--mtp-only`/`--add-mtp` run
training/mtp_align.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .configuration.presets import train_flags
from .training import mtp_align
from .training.cli import build_parser, check_args
from .training.loop import train

# A run shrunk to seconds, for tests and `make quickstart`; explicit flags still win.
SMOKE = train_flags("smoke")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.split("\n\n")[0])
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:
        parser.set_defaults(**SMOKE)
    return check_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = mtp_align.run(args) if args.mtp_only or args.add_mtp is not None else train(args)
    if summary is not None and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if k not in ("fingerprint", "history")}))


__all__ = ["SMOKE", "main", "parse_args", "train"]

if __name__ == "__main__":
    main()
