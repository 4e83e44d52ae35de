"""Pretrain a small MoE + MTP model from scratch on local text: a byte-level BPE tokenizer, then the Accelerate loop.

This is `python -m moe_mtp.train` (the same code path as `make quickstart`); every flag is forwarded to it, so
`--help` lists them all. Without `--data` the corpus is the English text of the stdlib's `pydoc_data/topics.py`.

    python examples/pretrain_from_scratch.py --smoke --output-dir outputs/pretrain-smoke    # seconds
    python examples/pretrain_from_scratch.py --output-dir outputs/pretrain                 # a few minutes on a CPU
    python examples/pretrain_from_scratch.py --data my_corpus.txt --max-steps 2000 --output-dir outputs/mine
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/pretrain_from_scratch.py --data corpus.jsonl

The output folder holds the model and its tokenizer (`OUTPUT/model`, loadable with `from_pretrained`),
`metrics.jsonl`/`metrics.csv`, `summary.json`, and the plots `loss.png` and `expert_load.png`.
"""

import sys

from moe_mtp.train import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--output-dir" not in args and not any(a.startswith("--output-dir=") for a in args):
        args += ["--output-dir", "outputs/pretrain-smoke" if "--smoke" in args else "outputs/pretrain"]
    main(args)
    if "--help" not in args and "-h" not in args:
        output = args[args.index("--output-dir") + 1] if "--output-dir" in args else None
        if output:
            print(f"model and tokenizer: {output}/model; plots: {output}/loss.png, {output}/expert_load.png")
