"""Plain greedy decoding vs MTP self-speculative decoding (`generate(..., use_mtp=True)`) on a trained model.

With `use_mtp=True` the model's own MTP modules draft the next tokens and the main model verifies them all in one
forward, so each step can emit more than one token. Under greedy decoding the output is the same as plain
`generate` (the script checks it); what changes is the number of forwards. It prints the draft acceptance rate
(`model.last_mtp_stats`: of the first draft of each step, and of all drafts), tokens/s of both and their ratio.
Each model drafts its config's `num_mtp_draft_tokens` per step (`--mtp-only` saves `adaptive`: the count is chosen step
by step from the measured speed).

    python examples/speculative_generate.py --smoke                         # seconds: a tiny, briefly trained model
    python examples/speculative_generate.py --model outputs/pretrain/model  # a model you trained
    python examples/speculative_generate.py                                 # trains a small one first (a minute)
    python examples/speculative_generate.py --model BEFORE AFTER --prompts heldout.jsonl   # e.g. around --mtp-only

Acceptance depends on training: an MTP module trained alongside its model agrees with it often; a barely trained
one rarely does, and then speculation costs more than it saves.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moe_mtp import MoeMtpForCausalLM

PROMPTS = ["The for statement is used to", "A class definition", "Exceptions can be raised", "The import statement"]


def trained_model(args) -> str:
    """A model trained here by `python -m moe_mtp.train` on the stdlib's English text."""
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


def prompt_batches(args, tokenizer) -> list[dict]:
    """Batches of --batch-size prompts: the built-in sentences, or the first --prompt-tokens tokens of the documents
    of a held-out .jsonl file (`text` field), such as the quickstart corpus's heldout.jsonl."""
    if args.prompts:
        texts = [json.loads(line)["text"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][: args.prompt_tokens] for text in texts]
        texts = [tokenizer.decode(row) for row in ids if len(row) == args.prompt_tokens][: args.num_prompts]
        if not texts:
            raise SystemExit(f"--prompts {args.prompts}: no document has {args.prompt_tokens} tokens")
    else:
        texts = PROMPTS
    return [
        tokenizer(texts[i : i + args.batch_size], return_tensors="pt", padding=True)
        for i in range(0, len(texts), args.batch_size)
    ]


def compare(folder: str, args) -> dict:
    """Plain and use_mtp=True greedy generation on the same prompts, alternating over --repeats runs (so that a
    busy machine slows both alike); the speed ratio is the ratio of the median total times."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left
    model = MoeMtpForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batches = prompt_batches(args, tokenizer)
    # use_cache: a folder saved with use_cache=false (as training scripts often do) would time plain decoding
    # without its KV cache.
    common = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fmt: skip

    timed_generate(model, batches[0], max_new_tokens=2, pad_token_id=tokenizer.pad_token_id)  # warm-up
    plain_times, mtp_times, identical, accepted, drafted, steps_rows = [], [], True, 0, 0, 0
    first_accepted = first_drafted = 0
    steps_by_drafts: dict[int, int] = {}
    for repeat in range(args.repeats):
        plain_total = mtp_total = 0.0
        for inputs in batches:
            plain, plain_s = timed_generate(model, inputs, **common)
            mtp, mtp_s = timed_generate(model, inputs, use_mtp=True, **common)
            plain_total, mtp_total = plain_total + plain_s, mtp_total + mtp_s
            identical &= torch.equal(plain, mtp)
            if repeat == 0:
                stats = model.last_mtp_stats
                accepted, drafted, steps_rows = (
                    accepted + stats.accepted,
                    drafted + stats.drafted,
                    steps_rows + stats.steps_rows,
                )
                first_accepted += stats.accepted_per_position[0]
                for count, steps in stats.steps_by_drafts.items():
                    steps_by_drafts[count] = steps_by_drafts.get(count, 0) + steps
                first_drafted += stats.drafted_per_position[0]
        plain_times.append(plain_total)
        mtp_times.append(mtp_total)
    new_tokens = sum(inputs["input_ids"].shape[0] for inputs in batches) * args.max_new_tokens
    plain_s, mtp_s = statistics.median(plain_times), statistics.median(mtp_times)
    result = {
        "model": folder, "identical": identical, "acceptance_rate": accepted / max(drafted, 1),
        "first_draft_acceptance": first_accepted / max(first_drafted, 1),
        "drafts_per_step": model.config.num_mtp_draft_tokens or len(model.model.mtp_layers),
        "steps_by_drafts": dict(sorted(steps_by_drafts.items())),
        "tokens_per_step": (accepted + steps_rows) / max(steps_rows, 1), "plain_tokens_per_s": new_tokens / plain_s,
        "mtp_tokens_per_s": new_tokens / mtp_s, "speedup": plain_s / mtp_s, "prompts": new_tokens // args.max_new_tokens,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
    }  # fmt: skip
    drafts = result["drafts_per_step"]
    if drafts == "adaptive":
        counts = result["steps_by_drafts"]
        drafts = f"adaptive (steps with {'/'.join(map(str, counts))} drafts: {'/'.join(map(str, counts.values()))})"
    print(f"{folder}: drafts per step (num_mtp_draft_tokens): {drafts}; first drafts accepted: {first_accepted}/"
          f"{first_drafted} ({100 * result['first_draft_acceptance']:.0f}%); MTP drafts accepted: {accepted}/{drafted} "
          f"({100 * result['acceptance_rate']:.0f}%), {result['tokens_per_step']:.2f} tokens per verification "
          "forward")  # fmt: skip
    print(f"  plain: {result['plain_tokens_per_s']:.1f} tokens/s; use_mtp: {result['mtp_tokens_per_s']:.1f} tokens/s; "
          f"speed ratio {result['speedup']:.2f}x; greedy outputs identical: {result['identical']}")  # fmt: skip
    print("  sample:", repr(tokenizer.decode(mtp[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=None,
                        help="Trained moe_mtp folder(s) with their tokenizer; several are compared on the same prompts "
                        "(e.g. a model before and after --mtp-only).")  # fmt: skip
    parser.add_argument("--output-dir", default="outputs/speculative", help="Where a model is trained if needed.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", default=None, help="A .jsonl file of held-out documents to take prompts from.")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="Prompt length taken from --prompts.")
    parser.add_argument("--num-prompts", type=int, default=8, help="Prompts taken from --prompts.")
    parser.add_argument("--batch-size", type=int, default=1, help="Prompts per generate call.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating plain/MTP runs; medians are compared.")
    parser.add_argument("--smoke", action="store_true", help="A tiny model and few tokens: seconds.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_new_tokens, args.repeats, args.num_prompts = min(args.max_new_tokens, 16), 1, min(args.num_prompts, 2)

    folders = args.model or [trained_model(args)]
    results = [compare(folder, args) for folder in folders]
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"first-draft acceptance {first['first_draft_acceptance']:.2f} -> {last['first_draft_acceptance']:.2f}; "
              f"drafts per step {first['drafts_per_step']} -> {last['drafts_per_step']}; "
              f"speed ratio {first['speedup']:.2f}x -> {last['speedup']:.2f}x")  # fmt: skip
    result = {**results[-1], "models": results}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["identical"] for r in results):
        raise SystemExit("greedy outputs differ between plain and use_mtp=True generation")
    return result


if __name__ == "__main__":
    main()
