"""Plain greedy decoding vs MTP self-speculative decoding (`generate(..., use_mtp=True)`) on a trained model.

With `use_mtp=True` the model's own MTP modules draft the next tokens and the main model verifies them all in one
forward, so each step can emit more than one token. Under greedy decoding the output is the same as plain
`generate` (the script checks it); what changes is the number of forwards. It prints the draft acceptance rate
(`model.last_mtp_stats`), tokens/s of both and their ratio.

    python examples/speculative_generate.py --smoke                         # seconds: a tiny, briefly trained model
    python examples/speculative_generate.py --model outputs/pretrain/model  # a model you trained
    python examples/speculative_generate.py                                 # trains a small one first (a minute)

Acceptance depends on training: an MTP module trained alongside its model agrees with it often; a barely trained
one rarely does, and then speculation costs more than it saves.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moe_mtp import MoeMtpForCausalLM

PROMPTS = ["The for statement is used to", "A class definition", "Exceptions can be raised", "The import statement"]


def trained_model(args) -> str:
    """--model, or a model trained here by `python -m moe_mtp.train` on the stdlib's English text."""
    if args.model:
        return args.model
    run = Path(args.output_dir) / "train"
    if not (run / "model").is_dir():
        # the smoke-sized model; without --smoke it trains 25 times longer, so its MTP module agrees more often
        flags = ["--smoke"] if args.smoke else ["--smoke", "--max-steps", "300", "--eval-every", "100"]
        # --resume: a run that was interrupted continues instead of refusing its folder
        trained = subprocess.run([sys.executable, "-m", "moe_mtp.train", *flags, "--resume", "--no-progress",
                                  "--output-dir", str(run)])  # fmt: skip
        if trained.returncode:
            raise SystemExit(f"training a model in {run} failed (above); pass --model to use another one")
    return str(run / "model")


def timed_generate(model, inputs, **kwargs):
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **kwargs)
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A trained moe_mtp folder with its tokenizer.")
    parser.add_argument("--output-dir", default="outputs/speculative", help="Where a model is trained if needed.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="A tiny model and few tokens: seconds.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_new_tokens = min(args.max_new_tokens, 16)

    folder = trained_model(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left
    model = MoeMtpForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    # use_cache: a folder saved with use_cache=false (as training scripts often do) would time plain decoding
    # without its KV cache.
    common = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fmt: skip

    timed_generate(model, inputs, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)  # warm-up
    plain, plain_s = timed_generate(model, inputs, **common)
    mtp, mtp_s = timed_generate(model, inputs, use_mtp=True, **common)
    stats = model.last_mtp_stats
    new_tokens = plain[:, inputs["input_ids"].shape[1] :].numel()
    result = {
        "identical": torch.equal(plain, mtp), "acceptance_rate": stats.acceptance_rate,
        "tokens_per_step": stats.tokens_per_step, "plain_tokens_per_s": new_tokens / plain_s,
        "mtp_tokens_per_s": new_tokens / mtp_s, "speedup": plain_s / mtp_s,
    }  # fmt: skip
    print(f"MTP drafts accepted: {stats.accepted}/{stats.drafted} ({100 * stats.acceptance_rate:.0f}%), "
          f"{stats.tokens_per_step:.2f} tokens per verification forward")  # fmt: skip
    print(f"plain: {result['plain_tokens_per_s']:.1f} tokens/s; use_mtp: {result['mtp_tokens_per_s']:.1f} tokens/s; "
          f"speed ratio {result['speedup']:.2f}x; greedy outputs identical: {result['identical']}")  # fmt: skip
    print("sample:", repr(tokenizer.decode(mtp[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    if not result["identical"]:
        raise SystemExit("greedy outputs differ between plain and use_mtp=True generation")
    return result


if __name__ == "__main__":
    main()
