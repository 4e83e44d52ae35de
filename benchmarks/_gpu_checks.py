"""GPU checks run by benchmarks/gpu.sh (a helper: `make bench` skips files starting with `_`).

    python benchmarks/_gpu_checks.py moe   [--dry-run]   # MoE layer fwd+bwd at DeepSeek-V3 dims, ours vs transformers
    python benchmarks/_gpu_checks.py quant [--dry-run]   # int8 / nf4 (bitsandbytes) load + forward vs bf16

--dry-run runs the same code on CPU at tiny sizes, so the script's logic is tested without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch
from transformers.utils import logging

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.configuration import preset

# DeepSeek-V3's MoE layer as released (hidden 7168, 256 routed experts of width 2048, top-8 in 4 of 8 groups, 1 shared
# expert); the dry run's is V3's routing shrunk to 16 experts.
MOE_FULL = dict(tokens=8192)
MOE_DRY = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
               topk_group=2, tokens=256)  # fmt: skip


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(layer, hidden, device, repeats: int) -> float:
    """Median seconds of one forward + backward of `layer` on `hidden`."""
    grad = torch.randn_like(hidden)
    times = []
    for step in range(repeats + 2):  # two warm-ups
        layer.zero_grad(set_to_none=True)
        hidden.grad = None
        synchronize(device)
        start = time.perf_counter()
        layer(hidden).backward(grad)
        synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def moe_layers(dims: dict, device, dtype):
    """Yields (name, layer) one at a time, so only one copy of the ~45 GB (weights + grads) lives at once."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from moe_mtp.conversion import transformers_config
    from moe_mtp.modeling.modeling_moe_mtp import MoeMtpMoE

    sizes = {k: v for k, v in dims.items() if k != "tokens"}
    config = preset("deepseek-v3", **sizes, num_hidden_layers=1, first_k_dense_replace=0, vocab_size=256)
    for name in ("moe_mtp", "transformers grouped_mm"):
        torch.manual_seed(0)
        with torch.device(device):
            if name == "moe_mtp":
                layer = MoeMtpMoE(config)
            else:
                their_config = transformers_config(config)
                their_config._experts_implementation = "grouped_mm"
                layer = DeepseekV3MoE(their_config)
        with torch.no_grad():
            for param in layer.parameters():
                param.normal_(0.0, 0.02)
        yield name, layer.to(dtype)
        del layer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_moe(dry_run: bool, repeats: int):
    device = torch.device("cpu" if dry_run else "cuda")
    dims = MOE_DRY if dry_run else MOE_FULL
    dtype = torch.bfloat16
    print(f"MoE layer fwd+bwd, {dtype}, {device}: {dims}")
    hidden = torch.randn(1, dims["tokens"], dims["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    seconds = {}
    for name, layer in moe_layers(dims, device, dtype):
        try:
            seconds[name] = time_fwd_bwd(layer, hidden, device, repeats)
            print(f"  {name:<26}{seconds[name] * 1e3:>10.1f} ms  {dims['tokens'] / seconds[name]:>12.0f} tok/s")
        except Exception as error:  # one implementation failing must not hide the other's number
            print(f"  {name:<26}FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    if len(seconds) == 2:
        ratio = seconds["transformers grouped_mm"] / seconds["moe_mtp"]
        print(f"  moe_mtp speed vs transformers grouped_mm: {ratio:.2f}x")


def run_quant(dry_run: bool):
    """Saves a small model in bf16, loads it back in int8 and nf4 through bitsandbytes, and compares logits."""
    from transformers import BitsAndBytesConfig

    device = torch.device("cpu" if dry_run else "cuda")
    if dry_run:
        config = preset("tiny", vocab_size=512, num_hidden_layers=2, num_nextn_predict_layers=1)
    else:  # DeepSeek-V3 at ~1B parameters: 4 layers of width 2048, 64 experts top-6
        config = preset(
            "deepseek-v3", hidden_size=2048, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=4,
            first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64, num_experts_per_tok=6,
            q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
            vocab_size=32000,
        )  # fmt: skip
    torch.manual_seed(0)
    model = MoeMtpForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 64), device=device)
    with tempfile.TemporaryDirectory() as folder:
        model.to(torch.bfloat16).save_pretrained(folder)
        reference = MoeMtpForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
        with torch.no_grad():
            expected = reference(input_ids).logits.float()
        print(f"int8/nf4 load + forward, {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")
        print(f"  {'bf16':<6} footprint {reference.get_memory_footprint() / 2**20:>8.1f} MiB")
        del reference
        quantizations = {
            "int8": BitsAndBytesConfig(load_in_8bit=True),
            "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        }  # fmt: skip
        for name, quantization in quantizations.items():
            try:
                quantized = MoeMtpForCausalLM.from_pretrained(
                    folder, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
                ).eval()
                with torch.no_grad():
                    logits = quantized(input_ids).logits.float()
                agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
                diff = (logits - expected).abs().max().item()
                print(
                    f"  {name:<6} footprint {quantized.get_memory_footprint() / 2**20:>8.1f} MiB, "
                    f"max |logit diff| vs bf16 {diff:.3f}, top-1 agreement {agree:.3f}"
                )
                del quantized
            except Exception as error:
                print(f"  {name:<6} FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["moe", "quant"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: tests the script, not the GPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.set_verbosity_error()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to test the script on CPU")
    if args.check == "moe":
        run_moe(args.dry_run, 1 if args.dry_run else args.repeats)
    else:
        run_quant(args.dry_run)


if __name__ == "__main__":
    main()
