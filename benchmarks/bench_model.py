"""moe-mtp vs transformers' built-in DeepseekV3ForCausalLM: same config, same weights, one process, CPU fp32.

Rows: training step (forward + backward, tokens/s), prefill (tokens/s) and greedy decode (new tokens/s), then rows
at DeepSeek-V3's MoE proportions (256 routed experts, top-8, 8 groups with top-4, 1 shared expert; hidden 256, expert
width 64, 2048 tokens): one MoE layer forward + backward against transformers' grouped_mm experts and against a dense
lower bound, a 4-layer training step and greedy decoding after a 1k-token prompt. Then a sweep of one MoE layer over the tokens in a step, from 1 (decode)
to 8192, forward without grad and forward + backward, at DeepSeek-V3's proportions and at the 32-expert config.
Runs alternate between the models and the median is reported, so they see the same machine load. A missed target
prints by how much and a profiler breakdown of our side.

    python benchmarks/bench_model.py [--threads N] [--repeats R] [--deepseek-v3-only] [--sweep-only | --no-sweep]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DeepseekV3ForCausalLM
from transformers.utils import logging

from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM
from moe_mtp.configuration import preset_kwargs
from moe_mtp.conversion import convert_state_dict, transformers_config

# A scaled-down DeepSeek-V3: sigmoid/noaux_tc routing over groups, q compression, fine-grained experts (32); no MTP
# and no balance loss, as transformers' class has neither: compare like with like.
CONFIG = preset_kwargs("bench-model")
# DeepSeek-V3's MoE proportions (256 routed experts, top-8, 8 groups with top-4, 1 shared) at a CPU-sized width.
DSV3_CONFIG = preset_kwargs("bench-model-v3")
DSV3_BATCH, DSV3_SEQ = 4, 512  # 2048 tokens, 16384 routed rows per MoE layer
BATCH, SEQ, PROMPT, NEW_TOKENS = 4, 256, 256, 32
LONG_PROMPT = 1024  # one sequence: MLA decodes from the latent cache, transformers re-expands it every step


def build_models(config=CONFIG):
    torch.manual_seed(0)
    ours = MoeMtpForCausalLM(MoeMtpConfig(**config, attn_implementation="sdpa"))
    theirs = DeepseekV3ForCausalLM(transformers_config(ours.config))
    theirs.set_attn_implementation("sdpa")
    theirs.load_state_dict(
        convert_state_dict(ours.state_dict(), ours.config, "moe_mtp_model", "transformers"), strict=True
    )
    return ours, theirs


def train_step(model, input_ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=input_ids).loss.backward()


@torch.no_grad()
def prefill(model, input_ids):
    model.eval()
    model(input_ids, use_cache=True)


@torch.no_grad()
def decode(model, input_ids):
    model.eval()
    model.generate(input_ids[:, :PROMPT], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@torch.no_grad()
def decode_long_context(model, long_input_ids):
    model.eval()
    model.generate(long_input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def moe_layer_step(layer, hidden_states):
    """One MoE layer alone, forward + backward: shows whether expert dispatch is a bottleneck."""
    layer.zero_grad(set_to_none=True)
    layer(hidden_states).sum().backward()


class DenseEquivalent(torch.nn.Module):
    """The GEMMs of one MoE layer with no dispatch: a dense SwiGLU over all routed rows (tokens x top_k), the shared
    expert and the router. Nothing that routes can be faster, so it is the lower bound for the MoE layer."""

    def __init__(self, config):
        super().__init__()
        hidden, width = config["hidden_size"], config["moe_intermediate_size"]
        self.top_k = config["num_experts_per_tok"]
        self.router = torch.nn.Linear(hidden, config["n_routed_experts"], bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * width, bias=False)
        self.down = torch.nn.Linear(width, hidden, bias=False)
        self.shared_gate_up = torch.nn.Linear(hidden, 2 * width * config["n_shared_experts"], bias=False)
        self.shared_down = torch.nn.Linear(width * config["n_shared_experts"], hidden, bias=False)

    @staticmethod
    def swiglu(x, gate_up, down):
        gate, up = gate_up(x).chunk(2, dim=-1)
        return down(F.silu(gate) * up)

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.router(flat)
        routed = self.swiglu(flat.repeat_interleave(self.top_k, dim=0), self.gate_up, self.down)
        routed = routed.view(flat.shape[0], self.top_k, -1).sum(dim=1)
        return (routed + self.swiglu(flat, self.shared_gate_up, self.shared_down)).view_as(hidden_states)


def measure(fn, models, input_ids, repeats):
    times = {name: [] for name in models}
    for model in models.values():
        fn(model, input_ids)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            fn(model, input_ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_row(label, ours_seconds, ref_seconds, tokens, target, ref_name="transformers"):
    ratio = ref_seconds / ours_seconds
    shown_target = f"{target:>7.1f}x" if target else f"{'-':>8}"
    verdict = ""
    if target and ratio < target:
        verdict = f"  MISSED by {(target - ratio) / target:.0%} ({ratio:.2f}x < {target:.1f}x)"
    print(
        f"{label:<30}{tokens / ours_seconds:>15.0f}{tokens / ref_seconds:>20.0f}{ratio:>7.2f}x{shown_target}{verdict}"
    )
    return not verdict


def profile_breakdown(label, fn, model, inputs, rows=12):
    """Where our side spends its time, by operator (self CPU time)."""
    fn(model, inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(model, inputs)
    print(f"\n  profile of moe_mtp, {label}:")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
    print("\n".join("    " + line for line in table.splitlines()))


def main_rows(args):
    ours, theirs = build_models()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    long_input_ids = torch.randint(0, CONFIG["vocab_size"], (1, LONG_PROMPT))
    with torch.no_grad():
        diff = (ours.eval()(input_ids).logits - theirs.eval()(input_ids).logits).abs().max().item()
    print(f"config: {CONFIG}")
    print(
        f"batch {BATCH} x {SEQ} tokens, decode {PROMPT} -> +{NEW_TOKENS} (and 1 x {LONG_PROMPT} -> +{NEW_TOKENS}), "
        f"{args.threads} threads, fp32 CPU"
    )
    print(f"same weights check: max |logits diff| = {diff:.2e}\n")

    models = {"moe_mtp": ours, "transformers": theirs}
    hidden_states = torch.randn(BATCH, SEQ, CONFIG["hidden_size"], requires_grad=True)
    moe_layers = {"moe_mtp": ours.model.layers[1].mlp, "transformers": theirs.model.layers[1].mlp}
    rows = [
        ("train step (fwd+bwd)", train_step, models, input_ids, BATCH * SEQ, 1.3),
        ("prefill", prefill, models, input_ids, BATCH * SEQ, 1.0),
        ("greedy decode", decode, models, input_ids, BATCH * NEW_TOKENS, 1.0),
        ("decode, 1k context", decode_long_context, models, long_input_ids, NEW_TOKENS, 1.0),
        ("MoE layer (fwd+bwd)", moe_layer_step, moe_layers, hidden_states, BATCH * SEQ, None),
    ]
    print(f"{'row':<30}{'moe_mtp tok/s':>15}{'transformers tok/s':>20}{'ratio':>8}{'target':>8}")
    for label, fn, pair, inputs, tokens, target in rows:
        seconds = measure(fn, pair, inputs, args.repeats)
        print_row(label, seconds["moe_mtp"], seconds["transformers"], tokens, target)


def deepseek_v3_rows(args):
    ours, theirs = build_models(DSV3_CONFIG)
    tokens = DSV3_BATCH * DSV3_SEQ
    experts = ours.model.layers[1].mlp.experts
    print(
        f"\nDeepSeek-V3 proportions: {DSV3_CONFIG['n_routed_experts']} routed experts, top-"
        f"{DSV3_CONFIG['num_experts_per_tok']}, {DSV3_CONFIG['n_group']} groups top-{DSV3_CONFIG['topk_group']}, "
        f"{DSV3_CONFIG['n_shared_experts']} shared, hidden {DSV3_CONFIG['hidden_size']}, expert width "
        f"{DSV3_CONFIG['moe_intermediate_size']}, {tokens} tokens, {args.threads} threads, fp32 CPU"
    )
    print(f"transformers experts_implementation: {theirs.config._experts_implementation}")
    torch.manual_seed(1)
    dense = DenseEquivalent(DSV3_CONFIG)
    hidden_states = torch.randn(DSV3_BATCH, DSV3_SEQ, DSV3_CONFIG["hidden_size"], requires_grad=True)
    layers = {"moe_mtp": ours.model.layers[1].mlp, "transformers": theirs.model.layers[1].mlp, "dense": dense}
    seconds = measure(moe_layer_step, layers, hidden_states, args.repeats)
    print(f"our expert path: {experts.last_path} (grouped = grouped GEMMs on the 3-D expert parameters)\n")
    print(f"{'row':<30}{'moe_mtp tok/s':>15}{'reference tok/s':>20}{'ratio':>8}{'target':>8}")
    missed = []
    if not print_row("MoE layer vs transformers", seconds["moe_mtp"], seconds["transformers"], tokens, 1.2):
        missed.append(("MoE layer (fwd+bwd)", moe_layer_step, layers["moe_mtp"], hidden_states))
    # Against the lower bound the ratio is at most 1: the target is to stay within 1.6x of it.
    bound = seconds["moe_mtp"] / seconds["dense"]
    verdict = "" if bound <= 1.6 else f"  MISSED by {(bound - 1.6) / 1.6:.0%} ({bound:.2f}x > 1.6x)"
    print(
        f"{'MoE layer vs dense bound':<30}{tokens / seconds['moe_mtp']:>15.0f}{tokens / seconds['dense']:>20.0f}"
        f"{bound:>7.2f}x{'<=1.6x':>8}{verdict}  (time ours / time bound)"
    )
    if verdict and not missed:
        missed.append(("MoE layer (fwd+bwd)", moe_layer_step, layers["moe_mtp"], hidden_states))
    input_ids = torch.randint(0, DSV3_CONFIG["vocab_size"], (DSV3_BATCH, DSV3_SEQ))
    models = {"moe_mtp": ours, "transformers": theirs}
    seconds = measure(train_step, models, input_ids, args.repeats)
    if not print_row("4-layer train step", seconds["moe_mtp"], seconds["transformers"], tokens, 1.1):
        missed.append(("4-layer train step", train_step, ours, input_ids))
    long_input_ids = torch.randint(0, DSV3_CONFIG["vocab_size"], (1, LONG_PROMPT))
    seconds = measure(decode_long_context, models, long_input_ids, args.repeats)
    if not print_row("decode, 1k context", seconds["moe_mtp"], seconds["transformers"], NEW_TOKENS, 1.5):
        missed.append(("decode, 1k context", decode_long_context, ours, long_input_ids))
    for label, fn, model, inputs in missed:
        profile_breakdown(label, fn, model, inputs)


SWEEP_TOKENS = (1, 4, 16, 128, 512, 2048, 8192)


def moe_layer_forward(layer, hidden_states):
    with torch.no_grad():
        layer(hidden_states)


def repeated(fn, times):
    """`fn` run `times` times per measurement, so that a 1-token step is not timed at the clock's resolution."""

    def run(model, inputs):
        for _ in range(times):
            fn(model, inputs)

    return run


def sweep_rows(args, config, name):
    """One MoE layer, ours against transformers' (and the dense bound), at each token count of SWEEP_TOKENS.
    Targets (issue 19): >= 1.0x everywhere, >= 1.3x forward + backward at 2048 and 8192 tokens, and within 1.5x of
    the dense bound at 8192."""
    ours, theirs = build_models(config)
    torch.manual_seed(1)
    layers = {"moe_mtp": ours.model.layers[1].mlp, "transformers": theirs.model.layers[1].mlp}
    layers["dense"] = DenseEquivalent(config)
    print(
        f"\nMoE layer sweep, {name}: {config['n_routed_experts']} routed experts, top-{config['num_experts_per_tok']}, "
        f"hidden {config['hidden_size']}, expert width {config['moe_intermediate_size']}, {args.threads} threads, "
        "fp32 CPU; ratio = transformers time / ours"
    )
    print(
        f"{'tokens':>7}  {'fwd no-grad':>12} {'path':>10}  {'fwd+bwd':>9} {'path':>10}  {'fwd+bwd / dense bound':>22}"
    )
    missed = []
    for tokens in SWEEP_TOKENS:
        inner = max(1, 512 // tokens)
        hidden_states = torch.randn(1, tokens, config["hidden_size"], requires_grad=True)
        cells = []
        for label, fn, target in (
            ("fwd no-grad", moe_layer_forward, 1.0),
            ("fwd+bwd", moe_layer_step, 1.3 if tokens >= 2048 else 1.0),
        ):
            seconds = measure(repeated(fn, inner), layers, hidden_states, args.repeats)
            ratio = seconds["transformers"] / seconds["moe_mtp"]
            path = layers["moe_mtp"].experts.last_path
            cells.append((ratio, path, seconds))
            if ratio < target:
                # The profile covers one step: the profiler's records of a repeated 1-token fwd+bwd (1,500 GEMM
                # calls per step) took 23 GB.
                missed.append((f"{label}, {tokens} tokens: {ratio:.2f}x < {target}x", fn, hidden_states))
        bound = cells[1][2]["moe_mtp"] / cells[1][2]["dense"]
        if tokens == 8192 and bound > 1.5:
            missed.append((f"fwd+bwd, 8192 tokens: {bound:.2f}x the dense bound > 1.5x", moe_layer_step, hidden_states))
        print(
            f"{tokens:>7}  {cells[0][0]:>11.2f}x {cells[0][1]:>10}  {cells[1][0]:>8.2f}x {cells[1][1]:>10}  {bound:>21.2f}x"
        )
    for label, *_ in missed:
        print(f"  MISSED: {label}")
    for label, fn, inputs in missed[:2]:
        profile_breakdown(label, fn, layers["moe_mtp"], inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deepseek-v3-only", action="store_true", help="run only the rows at DeepSeek-V3 proportions")
    parser.add_argument("--sweep-only", action="store_true", help="run only the MoE layer sweep over token counts")
    parser.add_argument("--no-sweep", action="store_true", help="skip the MoE layer sweep over token counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    if not args.sweep_only:
        if not args.deepseek_v3_only:
            main_rows(args)
        deepseek_v3_rows(args)
    if args.no_sweep:
        return
    sweep_rows(args, DSV3_CONFIG, "DeepSeek-V3 proportions")
    if not args.deepseek_v3_only:
        sweep_rows(args, CONFIG, "32 experts")


if __name__ == "__main__":
    main()
