"""The project's headline claims, reproduced at small scale on the quickstart corpus in one run.

Three models are trained from scratch with `python -m moe_mtp.train` (in this process, same data, tokenizer, seed,
steps and tokens) on its default corpus, the English text of the stdlib's `pydoc_data/topics.py`:

- `moe`: the training script's default shape (k of E routed experts plus shared experts, one MTP module, the
  DeepSeek-V3 recipe), with the first dense layer as wide as the experts a token runs;
- `dense`: the same model with every layer dense (also the MTP block), its MLP as wide as the (top-k + shared)
  experts a token runs, so both have the same active parameters and training FLOPs per token;
- `moe_no_mtp`: `moe` trained with `--mtp-loss-weight 0`.

Then it measures, on the held-out blocks the training script kept aside (its eval split):

- int8 and nf4 (bitsandbytes) memory (`get_memory_footprint`) and perplexity against fp32 (`moe`);
- validation loss of `moe` against `dense` (equal training FLOPs), and of `moe` against `moe_no_mtp`;
- MTP self-speculative decoding: acceptance and decode speed of `generate(use_mtp=True)` against plain greedy;
- active / total parameters.

    python benchmarks/reproduce_claims.py                  # ~30 min on 2 idle CPU cores
    python benchmarks/reproduce_claims.py --quick          # ~1-2 min: tiny models, a smoke run

It prints one table and writes it to OUTPUT (default outputs/claims) as claims.md and claims.json, with claims.png
and each training run (model, metrics, loss and expert-load plots) under OUTPUT/runs. A claim that does not hold at
this scale is reported as such, with the reason. Nothing is tuned to pass.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

# Sibling benchmarks (this folder is on sys.path when the script runs): their measuring code and targets.
import bench_decode
import bench_memory
import bench_quality
import torch
from tqdm.auto import tqdm

from moe_mtp.atomic import replace

ROOT = Path(__file__).resolve().parents[1]
# DeepSeek-V3: 37B of 671B parameters active per token (the main model; the MTP module adds 14B).
DEEPSEEK_V3_ACTIVE_RATIO = 37 / 671
QUICK_TRAIN_ARGS = ["--smoke", "--max-documents", "400", "--max-steps", "40", "--eval-every", "20", "--log-every", "5"]
DEFAULT_TRAIN_ARGS = ["--max-steps", "600", "--eval-every", "100", "--log-every", "10"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "claims")
    parser.add_argument("--overwrite", action="store_true", help="replace an OUTPUT that already exists")
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps: about 1-2 minutes")
    parser.add_argument(
        "--train-args",
        default="",
        help='extra flags for every `python -m moe_mtp.train` run, e.g. "--max-steps 600 --hidden-size 384"',
    )
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts decoded (default 4, quick 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 64, quick 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per prompt (default 64, quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per prompt (default 3, quick 1)")
    parser.add_argument(
        "--heldout-tokens",
        type=int,
        default=None,
        help="evaluate on the first N held-out tokens (default all, quick 4096)",
    )
    args = parser.parse_args(argv)
    args.heldout_tokens = args.heldout_tokens or (4096 if args.quick else None)
    args.prompts = args.prompts or (2 if args.quick else 4)
    args.prompt_len = args.prompt_len or (16 if args.quick else 64)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


# ------------------------------------------------------------------------------------------------------- training


def train_runs(base: list[str], runs_dir: Path) -> dict[str, dict]:
    """Trains moe, dense and moe_no_mtp with the training script; returns each run's command, summary and records."""
    from moe_mtp import train as train_script

    shape = train_script.parse_args(base)
    active_width = (shape.top_k + shape.n_shared_experts) * shape.moe_intermediate_size
    # Both models' dense MLPs are as wide as the experts a token runs: equal active parameters, equal FLOPs.
    common = [*base, "--intermediate-size", str(active_width), "--seed", str(shape.seed)]
    tokenizer = runs_dir / "moe" / "tokenizer"  # trained by the first run, reused: identical data for all three
    variants = {
        "moe": [],
        "dense": ["--n-routed-experts", "0", "--tokenizer", str(tokenizer)],
        "moe_no_mtp": ["--mtp-loss-weight", "0", "--tokenizer", str(tokenizer)],
    }
    runs = {}
    for name, extra in variants.items():
        argv = [*common, *extra, "--output-dir", str(runs_dir / name)]
        command = "python -m moe_mtp.train " + shlex.join(argv)
        print(f"\n== training {name}: {command}", flush=True)
        start = time.perf_counter()
        summary = train_script.train(train_script.parse_args(argv))
        records = [json.loads(line) for line in (runs_dir / name / "metrics.jsonl").read_text().splitlines() if line]
        runs[name] = {
            "command": command,
            "summary": summary,
            "records": records,
            "seconds": time.perf_counter() - start,
        }
        print(f"   eval loss {summary['eval']['eval_loss']:.4f} after {summary['tokens']} tokens", flush=True)
    return runs


def heldout_ids(model_dir: Path, base: list[str]) -> torch.Tensor:
    """The eval blocks the training script held out (its token store's held-out documents), flattened."""
    from transformers import AutoTokenizer

    from moe_mtp import data
    from moe_mtp import train as train_script
    from moe_mtp.training.dataloader import cache_dir

    args = train_script.parse_args(base)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cache = cache_dir(args)
    store, _ = data.prepare_store(data.Corpus.from_args(args), tokenizer, args.eval_fraction, cache, builder=True)
    blocks = store.blocks("eval", args.seq_len)
    return blocks[range(len(blocks))].flatten()


# --------------------------------------------------------------------------------------------------- measurements


def quantization_rows(model_dir: Path, ids: torch.Tensor) -> dict[str, dict]:
    """Footprint, held-out perplexity and top-1 agreement with fp32 of the trained model in each dtype."""
    from transformers import BitsAndBytesConfig

    from moe_mtp import MoeMtpForCausalLM

    modes = {
        "fp32": {"dtype": torch.float32},
        "bf16": {"dtype": torch.bfloat16},
        # as bench_memory/bench_quality: what is not quantized stays in bf16; nf4 is the QLoRA recipe
        "int8": {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
        "nf4": {
            "dtype": torch.bfloat16,
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        },
    }  # fmt: skip
    results = {}
    for mode, kwargs in tqdm(modes.items(), desc="quantized evals", unit="mode"):
        model = MoeMtpForCausalLM.from_pretrained(model_dir, **kwargs).eval()
        top, loss = bench_quality.predictions(model, ids)
        results[mode] = {"footprint": model.get_memory_footprint(), "loss": loss, "top": top}
        del model
    base = results["fp32"]
    for r in results.values():
        r["agreement"] = (r["top"] == base["top"]).float().mean().item()
        r["memory_ratio"] = r["footprint"] / base["footprint"]
        r["ppl"] = math.exp(r["loss"])
        r["ppl_change"] = math.exp(r["loss"] - base["loss"]) - 1
    for r in results.values():
        del r["top"]
    return results


def decode_rows(model_dir: Path, ids: torch.Tensor, args) -> dict:
    """Greedy decoding of held-out prompts (batch 1), plain and with MTP speculation, on the trained `moe` model."""
    from moe_mtp import MoeMtpForCausalLM

    model = MoeMtpForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0  # exactly N tokens
    # Plain decoding must use the KV cache, as the MTP loop does, or the comparison times quadratic recomputation;
    # folders from before the training script saved use_cache=True still say False.
    model.config.use_cache = model.generation_config.use_cache = True
    stride = max(args.prompt_len, (len(ids) - args.prompt_len) // max(args.prompts, 1))
    starts = [i * stride for i in range(args.prompts) if i * stride + args.prompt_len <= len(ids)]
    plain_seconds = mtp_seconds = 0.0
    stats = []
    identical = True
    bench_decode.generate_seconds(model, ids[: args.prompt_len][None], 2)  # warm-up
    for start in tqdm(starts, desc="decoding held-out prompts", unit="prompt"):
        prompt = ids[start : start + args.prompt_len][None]
        runs = {"plain": (model, {}), "mtp": (model, {"use_mtp": True})}
        rates, last, _ = bench_decode.decode_rates(runs, [prompt], args.new_tokens, args.repeats)
        plain_seconds += (args.new_tokens - 1) / rates["plain"]
        mtp_seconds += (args.new_tokens - 1) / rates["mtp"]
        ([plain], _), ([spec], prompt_stats) = last["plain"], last["mtp"]
        stats.append(prompt_stats)
        identical &= torch.equal(plain, spec)
    total = bench_decode.merged_stats(stats)
    accepted, drafted, steps = total.accepted, total.drafted, total.steps_rows
    tokens = len(starts) * (args.new_tokens - 1)
    return {
        "prompts": len(starts), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "plain_tokens_per_s": tokens / plain_seconds, "mtp_tokens_per_s": tokens / mtp_seconds,
        "speedup": plain_seconds / mtp_seconds, "acceptance": accepted / max(drafted, 1), "identical": identical,
        # what speculation alone can give: tokens per main-model forward (a speedup if an MTP step cost a plain one)
        "tokens_per_step": (accepted + steps) / max(steps, 1), "layers": model.config.num_hidden_layers,
    }  # fmt: skip


def parameter_rows(runs_dir: Path) -> dict[str, dict]:
    """`moe_mtp.hub.parameter_counts` of both models, and the share of `moe`'s parameters that bitsandbytes leaves
    unquantized (everything but the Linear layers; the head too, as transformers keeps it)."""
    from moe_mtp import MoeMtpForCausalLM
    from moe_mtp.hub import parameter_counts

    counts = {}
    for name in ("moe", "dense"):
        model = MoeMtpForCausalLM.from_pretrained(runs_dir / name / "model")
        counts[name] = parameter_counts(model)
        linear = sum(
            m.weight.numel()
            for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not path.endswith("lm_head")
        )
        counts[name]["unquantized_share"] = 1 - linear / sum(p.numel() for p in model.parameters())
    return counts


# ------------------------------------------------------------------------------------------------------- the table


def build_table(runs, quant, decode, params, config) -> tuple[list[dict], dict]:
    """One row per claim: what the seed / DeepSeek-V3 says, what came out here, whether it holds, and why not."""
    moe, dense, no_mtp = (runs[n]["summary"]["eval"]["eval_loss"] for n in ("moe", "dense", "moe_no_mtp"))
    tokens, steps = runs["moe"]["summary"]["tokens"], runs["moe"]["summary"]["steps"]
    p = params["moe"]
    embed_share = 1 - p["routed_expert_params"] / p["main_params"]
    scale = (
        f"{count(p['main_params'])} parameters ({count(p['active_params'])} active, MTP module aside), trained {steps} steps on "
        f"{count(tokens)} tokens"
    )
    rows = []

    def row(claim, reference, measured, holds, why=""):
        rows.append({"claim": claim, "reference": reference, "measured": measured, "holds": holds,
                     "why": "" if holds else why})  # fmt: skip

    for mode in ("int8", "nf4"):
        q, target = quant[mode], bench_memory.TARGETS[mode]
        row(
            f"{mode} memory vs fp32",
            f"≤ {target}x (seed: a quarter of the memory)" if mode == "int8" else f"≤ {target}x",
            f"{q['footprint'] / 2**20:.2f} / {quant['fp32']['footprint'] / 2**20:.2f} MiB = {q['memory_ratio']:.3f}x",
            q["memory_ratio"] <= target,
            f"bitsandbytes quantizes only the linear layers; embeddings, head and norms stay in bf16 and are "
            f"{100 * config['unquantized_share']:.0f}% of this small model's parameters (a few % of DeepSeek-V3's)",
        )
    for mode in ("int8", "nf4"):
        q, target = quant[mode], bench_quality.PERPLEXITY[mode]
        row(
            f"{mode} held-out perplexity change vs fp32",
            f"≤ +{100 * target:g}%",
            f"{quant['fp32']['ppl']:.2f} -> {q['ppl']:.2f} ({100 * q['ppl_change']:+.2f}%), "
            f"top-1 agreement {100 * q['agreement']:.1f}%",
            q["ppl_change"] <= target,
            f"a {scale} has few, small matrices whose quantization error does not average out",
        )
    active_ratio = params["dense"]["active_params"] / p["active_params"]
    row(
        f"MoE ({config['top_k']} of {config['experts']} experts + {config['shared']} shared) vs dense, same active "
        "params: validation loss at equal training FLOPs",
        "MoE lower",
        f"{moe:.4f} vs {dense:.4f} ({moe - dense:+.4f}); dense/MoE active params {active_ratio:.3f}x",
        moe < dense,
        f"each routed expert sees only ~{config['top_k']}/{config['experts']} of the {count(tokens)} training "
        "tokens; experts pay off once there is enough data to specialize (DeepSeekMoE's comparisons use billions "
        "of tokens)",
    )
    row(
        "MTP loss on vs off: main-model validation loss",
        "on ≤ off (DeepSeek-V3 ablation: MTP helps)",
        f"{moe:.4f} vs {no_mtp:.4f} ({moe - no_mtp:+.4f})",
        moe <= no_mtp,
        f"at {scale} the extra objective competes with next-token prediction for a small model's capacity; "
        "DeepSeek-V3's gain was measured on models of billions of parameters and hundreds of billions of tokens",
    )
    d, acceptance_target, speed_target = (
        decode,
        bench_decode.TARGETS["acceptance"],
        bench_decode.TARGETS["mtp_vs_plain"],
    )
    why_acceptance = (
        f"the MTP module of a {scale} predicts the second-next token far less reliably than DeepSeek-V3's "
        '(671B parameters, 14.8T tokens, 85-90% acceptance); train longer (--train-args "--max-steps N")'
    )
    row(
        "MTP draft acceptance (greedy, held-out prompts)",
        f"≥ {acceptance_target:g} (seed: ~0.9)",
        f"{d['acceptance']:.3f}",
        d["acceptance"] >= acceptance_target,
        why_acceptance,
    )
    row(
        "MTP speculative decode speedup vs plain greedy",
        f"≥ {speed_target:g}x (seed: ~2x)",
        f"{d['mtp_tokens_per_s']:.1f} / {d['plain_tokens_per_s']:.1f} tok/s = {d['speedup']:.2f}x "
        f"({d['tokens_per_step']:.2f} tokens per main-model forward"
        + (
            "; a ratio above that is timing noise or plain `generate`'s per-step overhead"
            if d["speedup"] > d["tokens_per_step"]
            else ""
        )
        + f"), identical output: {d['identical']}",
        d["speedup"] >= speed_target,
        f"the speedup follows acceptance ({d['acceptance']:.2f} here) and the cost of a step: a verify forward plus "
        f"one MTP-module forward, a block next to the main model's {d['layers']} layers (DeepSeek-V3: one next to 61)",
    )
    ratio = p["active_params"] / p["main_params"]
    row(
        "active / total parameters (main model)",
        f"{100 * DEEPSEEK_V3_ACTIVE_RATIO:.1f}% (DeepSeek-V3: 37B of 671B)",
        f"{count(p['active_params'])} / {count(p['main_params'])} = {100 * ratio:.1f}%",
        ratio <= 2 * DEEPSEEK_V3_ACTIVE_RATIO,
        f"a property of the shape: {config['top_k']} of {config['experts']} experts (DeepSeek-V3: 8 of 256) and "
        f"{100 * embed_share:.0f}% of the parameters outside the routed experts (embeddings, attention, dense and "
        "shared MLPs)",
    )
    return rows, {"scale": scale}


def count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def markdown(rows, settings) -> str:
    lines = ["| claim | seed / DeepSeek-V3 | measured here | holds here |", "|---|---|---|---|"]
    lines += [
        f"| {r['claim']} | {r['reference']} | {r['measured']} | {'yes' if r['holds'] else '**no**'} |" for r in rows
    ]
    why = [f"- {r['claim']}: {r['why']}." for r in rows if not r["holds"]]
    if why:
        lines += ["", "Why a claim does not hold at this scale:", "", *why]
    lines += ["", f"Settings: {settings['scale']}; command: `{settings['command']}`.", ""]
    lines += ["Training runs:", "", *[f"- `{c}`" for c in settings["train_commands"]]]
    return "\n".join(lines) + "\n"


def plot(path: Path, runs, quant, decode, params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0, 0]
    modes = list(quant)
    bars = ax.bar(modes, [quant[m]["footprint"] / 2**20 for m in modes], color="tab:blue")
    for bar, mode in zip(bars, modes, strict=True):
        q = quant[mode]
        ax.annotate(f"{q['memory_ratio']:.2f}x\nppl {100 * q['ppl_change']:+.1f}%", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("get_memory_footprint (MiB)")
    ax.set_title("memory and held-out perplexity vs fp32")
    ax.margins(y=0.25)

    ax = axes[0, 1]
    for name, run in runs.items():
        points = [(r["step"], r["eval_loss"]) for r in run["records"] if "eval_loss" in r]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{name} (eval)")
        points = [(r["step"], r["main_loss"]) for r in run["records"] if "main_loss" in r]
        ax.plot(*zip(*points, strict=True), alpha=0.3, color=ax.lines[-1].get_color())
    ax.set_xlabel("optimizer step (same tokens per step for all)")
    ax.set_ylabel("main-model cross-entropy (nats)")
    ax.set_title("MoE vs dense (same active params), MTP loss on/off\n(dots: eval, faint: training)")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    ax.bar(["plain greedy", "MTP speculative"], [decode["plain_tokens_per_s"], decode["mtp_tokens_per_s"]],
           color=["tab:gray", "tab:green"])  # fmt: skip
    ax.set_ylabel("decode tokens/s (batch 1, CPU)")
    ax.set_title(f"speedup {decode['speedup']:.2f}x, acceptance {decode['acceptance']:.2f}")

    ax = axes[1, 1]
    names = list(params)
    ax.bar(names, [params[n]["main_params"] / 1e6 for n in names], label="total", color="tab:orange")
    ax.bar(names, [params[n]["active_params"] / 1e6 for n in names], label="active per token", color="tab:blue")
    ax.set_ylabel("parameters (M, main model)")
    ax.set_title("active vs total parameters")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    out = args.output_dir
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} already holds files; pass --overwrite to replace them, or choose another --output-dir")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    base = (QUICK_TRAIN_ARGS if args.quick else DEFAULT_TRAIN_ARGS) + shlex.split(args.train_args)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # per-load "Loading weights" bars; ours stay
    start = time.perf_counter()
    runs = train_runs(base, partial / "runs")
    moe_dir = partial / "runs" / "moe" / "model"
    ids = heldout_ids(moe_dir, base)[: args.heldout_tokens]
    print(f"\nheld-out: {len(ids)} tokens", flush=True)
    quant = quantization_rows(moe_dir, ids)
    decode = decode_rows(moe_dir, ids, args)
    params = parameter_rows(partial / "runs")

    from moe_mtp import train as train_script

    shape = train_script.parse_args(base)
    config = {"top_k": shape.top_k, "experts": shape.n_routed_experts, "shared": shape.n_shared_experts,
              "unquantized_share": params["moe"]["unquantized_share"]}  # fmt: skip
    rows, settings = build_table(runs, quant, decode, params, config)
    command = "python benchmarks/reproduce_claims.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    for run in runs.values():  # the runs' final place, once OUTPUT.partial is renamed
        run["command"] = run["command"].replace(str(partial), str(out))
    settings.update(command=command.strip(), train_commands=[r["command"] for r in runs.values()])
    table = markdown(rows, settings)
    result = {
        "rows": rows, "settings": settings, "quantization": quant, "decode": decode, "parameters": params,
        "runs": {name: {"command": r["command"], "summary": r["summary"], "seconds": r["seconds"]}
                 for name, r in runs.items()},
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    (partial / "claims.md").write_text(table)
    (partial / "claims.json").write_text(json.dumps(result, indent=2, default=float))
    plot(partial / "claims.png", runs, quant, decode, params)
    replace(partial, out)  # the old results are deleted only once the new ones are in place
    print("\n" + table)
    print(f"wrote {out}/claims.md, claims.json, claims.png and runs/ in {result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
