"""Training speed: `python -m moe_mtp.train` and the recipe's overhead, against transformers' DeepseekV3ForCausalLM.

One process, CPU fp32, same config, weights and batch. Each optimizer step (AdamW, gradient clipping) is timed in:
- `recipe`: our model with everything the training script adds: MTP loss, sequence balance loss, the balancing-bias
  update after the optimizer step and the per-step metrics (loss parts, MaxVio);
- `no-MTP recipe`: the same without the MTP loss (its module is not run);
- `plain`: our model, main loss only, no bias update and no metrics;
- `transformers`: DeepseekV3ForCausalLM (no MTP, frozen bias), main loss only.
- `one more layer`: `plain` with one more decoder layer, and `MTP projections`: an MTP module's `eh_proj`, the LM
  head and the cross-entropy alone (forward and backward). With the extra layer's cost, that is the model compute
  an MTP module adds.
Variants take turns in a new random order each round and the median is reported, so they see the same machine load
and cache. The recipe's overhead is what it costs beyond the model compute, as a fraction of its step (target
<= 10%): the bookkeeping (bias update + metrics + balance loss: `no-MTP recipe - plain`) plus what the MTP module
costs (`recipe - no-MTP recipe`) beyond the compute it adds to the model (`one more layer - plain + MTP
projections`). The MTP module's share of the step is printed too: model compute, which shrinks with depth. The last
rows run `python -m moe_mtp.train`'s own loop in-process and read its tokens/s.

    python benchmarks/bench_train.py [--threads N] [--repeats R] [--steps S]
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DeepseekV3ForCausalLM
from transformers.utils import logging

from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM
from moe_mtp.configuration import preset_kwargs
from moe_mtp.conversion import convert_state_dict, transformers_config
from moe_mtp.modeling.balancing import automatic_bias_update, take_balance_metrics
from moe_mtp.training import LossRecorder

CONFIGS = {
    # The training script's default model, with MTP and both balancing terms on.
    "script default": preset_kwargs("bench-train"),
    # DeepSeek-V3's routing proportions: 256 routed experts, top-8, 8 groups of which 4 are eligible.
    "V3 routing (256 experts)": preset_kwargs("bench-train-v3"),
}
BATCH, SEQ = 4, 128
SCRIPT_FLAGS = ["--hidden-size", "256", "--moe-intermediate-size", "128", "--num-layers", "4", "--vocab-size", "4096"]


def build(config: dict):
    torch.manual_seed(0)
    ours = MoeMtpForCausalLM(MoeMtpConfig(**config, attn_implementation="sdpa"))
    theirs = DeepseekV3ForCausalLM(transformers_config(ours.config))
    theirs.set_attn_implementation("sdpa")
    state = convert_state_dict(ours.state_dict(), ours.config, "moe_mtp_model", "transformers")
    theirs.load_state_dict(state, strict=False)  # transformers' class has no MTP module
    return ours, theirs


def one_more_layer(config: dict) -> MoeMtpForCausalLM:
    torch.manual_seed(0)
    deeper = {**config, "num_hidden_layers": config["num_hidden_layers"] + 1}
    return MoeMtpForCausalLM(MoeMtpConfig(**deeper, attn_implementation="sdpa"))


class Variant:
    def __init__(self, name, model, mtp: bool, recipe: bool):
        self.name, self.model, self.mtp, self.recipe = name, model, mtp, recipe
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training script
        self.recorder = LossRecorder(model) if recipe else None
        self.times = []

    def step(self, input_ids):
        model = self.model.train()
        if isinstance(model, MoeMtpForCausalLM):
            model.config.mtp_loss_weight = 0.3 if self.mtp else 0.0
            model.config.seq_aux_loss_alpha = 1e-4 if self.recipe else 0.0
        start = time.perf_counter()
        model(input_ids, labels=input_ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with automatic_bias_update(self.recipe):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe:
            self.recorder.take()
            take_balance_metrics(model)
        else:
            for router in getattr(model, "moe_routers", list)():
                router.tokens_per_expert.zero_()
        self.times.append(time.perf_counter() - start)


class MtpProjections:
    """What an MTP module computes besides its block: the projection of [embedding; hidden] back to the hidden size,
    then the LM head and cross-entropy; forward and backward over one batch."""

    name = "MTP projections"

    def __init__(self, model: MoeMtpForCausalLM):
        hidden = model.config.hidden_size
        self.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, model.config.vocab_size, bias=False)
        self.inputs = torch.randn(BATCH, SEQ - 1, 2 * hidden, requires_grad=True)
        self.times = []

    def step(self, input_ids):
        start = time.perf_counter()
        logits = self.head(self.eh_proj(self.inputs))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten()).backward()
        self.eh_proj.zero_grad(set_to_none=True)
        self.head.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)


def script_tokens_per_s(steps: int) -> float:
    """tokens/s that `python -m moe_mtp.train` itself reports, after its first logging window."""
    from moe_mtp.train import parse_args, train

    with tempfile.TemporaryDirectory() as tmp:
        flags = [*SCRIPT_FLAGS, "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--max-steps", str(steps)]
        flags += ["--log-every", "2", "--eval-every", "0", "--save-every", "0", "--no-plots", "--no-progress"]
        train(parse_args([*flags, "--output-dir", str(Path(tmp) / "run")]))
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--steps", type=int, default=12, help="steps of the in-process training-script run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    tokens = BATCH * SEQ
    print(f"batch {BATCH} x {SEQ} tokens, torch threads {torch.get_num_threads()}, CPU fp32\n")

    header = f"{'config':<26}{'row':<34}{'tok/s':>10}{'ratio':>9}{'target':>9}"
    print(header)
    print("-" * len(header))
    for label, config in CONFIGS.items():
        ours, theirs = build(config)
        variants = [
            Variant("recipe", ours, mtp=True, recipe=True),
            Variant("no-MTP recipe", ours, mtp=False, recipe=True),
            Variant("plain", ours, mtp=False, recipe=False),
            Variant("transformers", theirs, mtp=False, recipe=False),
            Variant("one more layer", one_more_layer(config), mtp=False, recipe=False),
            MtpProjections(ours),
        ]
        input_ids = torch.randint(0, ours.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        for variant in variants:
            variant.step(input_ids)  # warm-up
            variant.times.clear()
        shuffle = random.Random(0).shuffle
        for _ in range(args.repeats):
            # A new order each round: a variant that follows another on the same weights finds them in cache.
            shuffle(order := list(variants))
            for variant in order:
                variant.step(input_ids)
        median = {v.name: statistics.median(v.times) for v in variants}
        step = median["recipe"]
        bookkeeping = median["no-MTP recipe"] - median["plain"]
        mtp_cost = median["recipe"] - median["no-MTP recipe"]
        mtp_compute = median["one more layer"] - median["plain"] + median["MTP projections"]
        rows = [
            (
                "recipe vs transformers (tok/s)",
                tokens / median["recipe"],
                median["transformers"] / median["recipe"],
                "",
            ),
            ("plain vs transformers (tok/s)", tokens / median["plain"], median["transformers"] / median["plain"], ""),
            ("MTP module share of recipe step", None, mtp_cost / step, "(model)"),
            ("bias update+metrics+balance loss", None, bookkeeping / step, ""),
            ("MTP losses beyond model compute", None, (mtp_cost - mtp_compute) / step, ""),
            ("recipe overhead (both above)", None, (bookkeeping + mtp_cost - mtp_compute) / step, "<= 0.10"),
        ]
        for name, rate, ratio, target in rows:
            rate_text = f"{rate:>10.0f}" if rate is not None else f"{'':>10}"
            print(f"{label:<26}{name:<34}{rate_text}{ratio:>9.3f}{target:>9}")

    ours, theirs = build(CONFIGS["script default"])
    reference = Variant("transformers", theirs, mtp=False, recipe=False)
    input_ids = torch.randint(0, 4096, (BATCH, SEQ))
    for _ in range(args.repeats + 1):
        reference.step(input_ids)
    script = script_tokens_per_s(args.steps)
    reference_rate = tokens / statistics.median(reference.times[1:])
    print(
        f"{'script default':<26}{'python -m moe_mtp.train (tok/s)':<34}{script:>10.0f}{script / reference_rate:>9.3f}{'':>9}"
    )
    print(f"{'script default':<26}{'transformers plain loop (tok/s)':<34}{reference_rate:>10.0f}")
    print("\nratio: ours relative to transformers (tok/s), or the overhead fraction; target only where stated.")


if __name__ == "__main__":
    main()
