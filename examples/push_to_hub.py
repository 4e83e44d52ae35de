"""Save a Hub-ready folder of a trained moe_mtp model and push it, or print what would be uploaded.

`model.save_pretrained` writes the weights, config.json with an `auto_map`, the self-contained remote code
(`configuration_moe_mtp.py`, `modeling_moe_mtp.py` and its helpers) and a generated model card (README.md). This
script adds the tokenizer and, when the model comes from `python -m moe_mtp.train`, the run's plots and final eval
metrics, which the card then shows. The folder loads without moe_mtp installed:

    AutoModelForCausalLM.from_pretrained("user/name", trust_remote_code=True)

    python examples/push_to_hub.py --smoke                                  # seconds: a tiny model, prints the upload
    python examples/push_to_hub.py --model outputs/pretrain/model --output-dir outputs/hub/my-moe
    HF_TOKEN=hf_... python examples/push_to_hub.py --model outputs/pretrain/model --repo-id you/my-moe

It pushes (one commit, with `moe_mtp.hub.upload_folder`) only when `--repo-id` is given and a token is found
(`HF_TOKEN` or `huggingface-cli login`).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.hub import TRAINING_SUMMARY, upload_folder

PLOTS = ("loss.png", "expert_load.png")


def trained_model(args) -> Path:
    if args.model:
        return Path(args.model)
    run = Path(args.output_dir).with_name(Path(args.output_dir).name + "-train")
    if not (run / "model").is_dir():
        # --resume: a run that was interrupted continues instead of refusing its folder
        trained = subprocess.run([sys.executable, "-m", "moe_mtp.train", "--smoke", "--resume", "--no-progress",
                                  "--output-dir", str(run)])  # fmt: skip
        if trained.returncode:
            raise SystemExit(f"training a model in {run} failed (above); pass --model to use another one")
    return run / "model"


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A moe_mtp folder (default: train a tiny one).")
    parser.add_argument("--output-dir", default="outputs/hub/moe-mtp-tiny", help="The Hub-ready folder to write.")
    parser.add_argument("--repo-id", default=None, help="user/name on the Hub; without it nothing is pushed.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--data-description", default=None, help="What the model was trained on, for the card.")
    parser.add_argument("--smoke", action="store_true", help="A tiny model: seconds (never pushes without --repo-id).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the folder an earlier run wrote.")
    args = parser.parse_args(argv)
    target = Path(args.output_dir)
    if target.exists() and not args.overwrite:
        raise SystemExit(f"{target} already exists; pass --overwrite to replace it, or choose another --output-dir")

    source = trained_model(args)
    if target.exists():  # --overwrite
        shutil.rmtree(target)
    model = MoeMtpForCausalLM.from_pretrained(source, dtype=torch.float32)
    run = source.parent  # a `python -m moe_mtp.train` output folder holds the plots and summary.json
    target.mkdir(parents=True)
    plots = [name for name in PLOTS if (run / name).is_file()]
    for name in plots:
        shutil.copy2(run / name, target / name)
    if (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
        metrics = {k: v for k, v in (summary.get("eval") or {}).items() if k != "step"}
        metrics.update(steps=summary["steps"], tokens=summary["tokens"])
        card = {"name": target.name, "data": args.data_description, "metrics": metrics, "plots": plots}
        (target / TRAINING_SUMMARY).write_text(json.dumps(card, indent=2) + "\n")
    model.save_pretrained(target)  # weights, config with auto_map, remote code, model card (reads the summary)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)

    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    for name in files:
        print(f"{(target / name).stat().st_size:>12,}  {name}")
    from huggingface_hub import get_token

    if args.repo_id and get_token():
        info = upload_folder(target, args.repo_id, private=args.private or None)
        print(f"pushed {len(files)} files to {info.commit_url}")
    else:
        why = "no --repo-id given" if not args.repo_id else "no token (set HF_TOKEN or run `huggingface-cli login`)"
        print(f"not pushed ({why}): these {len(files)} files of {target} would be uploaded in one commit")
    return files


if __name__ == "__main__":
    main()
