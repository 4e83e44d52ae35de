"""moe-mtp vs transformers' built-in DeepseekV3ForCausalLM: same config, same weights, one process, CPU fp32.

Rows: training step (forward + backward, tokens/s), prefill (tokens/s) and greedy decode (new tokens/s).
Runs alternate between the two models and the median is reported, so the two see the same machine load.

    python benchmarks/bench_model.py [--threads N] [--repeats R]
"""

import argparse
import statistics
import time

import torch
from transformers import DeepseekV3ForCausalLM
from transformers.utils import logging

from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM
from moe_mtp.conversion import convert_state_dict, transformers_config

# A scaled-down DeepSeek-V3: sigmoid/noaux_tc routing over groups, q compression, fine-grained experts.
CONFIG = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    max_position_embeddings=1024,
    # transformers' class has no MTP training and no balance loss: compare like with like.
    num_nextn_predict_layers=0,
    seq_aux_loss_alpha=0.0,
)
BATCH, SEQ, PROMPT, NEW_TOKENS = 4, 256, 256, 32
LONG_PROMPT = 1024  # one sequence: MLA decodes from the latent cache, transformers re-expands it every step


def build_models():
    torch.manual_seed(0)
    ours = MoeMtpForCausalLM(MoeMtpConfig(**CONFIG, attn_implementation="sdpa"))
    theirs = DeepseekV3ForCausalLM(transformers_config(ours.config))
    theirs.set_attn_implementation("sdpa")
    theirs.load_state_dict(convert_state_dict(ours.state_dict(), ours.config, "moe_mtp", "transformers"), strict=True)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()

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
    rows = [
        ("train step (fwd+bwd)", train_step, BATCH * SEQ, 1.3),
        ("prefill", prefill, BATCH * SEQ, 1.0),
        ("greedy decode", decode, BATCH * NEW_TOKENS, 1.0),
    ]
    hidden_states = torch.randn(BATCH, SEQ, CONFIG["hidden_size"], requires_grad=True)
    moe_layers = {"moe_mtp": ours.model.layers[1].mlp, "transformers": theirs.model.layers[1].mlp}
    print(f"{'row':<22}{'moe_mtp tok/s':>15}{'transformers tok/s':>20}{'ratio':>8}{'target':>8}")
    for label, fn, tokens, target in rows:
        seconds = measure(fn, models, input_ids, args.repeats)
        ratio = seconds["transformers"] / seconds["moe_mtp"]
        print(
            f"{label:<22}{tokens / seconds['moe_mtp']:>15.0f}{tokens / seconds['transformers']:>20.0f}"
            f"{ratio:>7.2f}x{target:>7.1f}x"
        )
    extra_rows = [
        ("decode, 1k context", decode_long_context, models, long_input_ids, NEW_TOKENS, 1.0),
        ("MoE layer (fwd+bwd)", moe_layer_step, moe_layers, hidden_states, BATCH * SEQ, None),
    ]
    for label, fn, pair, inputs, tokens, target in extra_rows:
        seconds = measure(fn, pair, inputs, args.repeats)
        ratio = seconds["transformers"] / seconds["moe_mtp"]
        shown_target = f"{target:>7.1f}x" if target else f"{'-':>8}"
        print(
            f"{label:<22}{tokens / seconds['moe_mtp']:>15.0f}{tokens / seconds['transformers']:>20.0f}"
            f"{ratio:>7.2f}x{shown_target}"
        )


if __name__ == "__main__":
    main()
