"""Memory of one expert-dominated checkpoint loaded in fp32, bf16, int8, nf4 and fp8, beside transformers' DeepseekV3
in int8 on the same weights.

The checkpoint has DeepSeek-V3's proportions: 256 routed experts (top-8 over 8 groups, 4 kept), one shared expert,
a dense first layer and one MTP module, with the routed experts over 90% of the parameters. It is written once in
the released layout with block-FP8 weights (as DeepSeek ships it), plus a moe_mtp bf16 copy and a transformers
bf16 copy. Each load runs in its own process, which reports `get_memory_footprint()`, its peak RSS during the load
and its RSS once loaded (both from /proc, VmHWM / VmRSS), beside its RSS before loading (imports only).

    python benchmarks/bench_memory.py [--experts 256] [--hidden 512] [--check]

Quantized modes keep what they do not quantize (embeddings, head, norms) in bf16 and 4-bit uses double
quantization with a bf16 compute dtype: the usual QLoRA recipe. Targets: footprint int8 <= 0.27x fp32,
nf4 <= 0.15x, fp8 <= 0.27x; peak RSS while loading int8 <= 1.3x the final RSS, from the moe_mtp folder and the
released FP8 folder alike. RSS is counted above the process's RSS before loading (torch, transformers and
bitsandbytes imported), the stricter reading; the final RSS is taken after malloc_trim, so heap glibc merely kept
does not count as model. The peak is also shown against the footprint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TARGETS = {"int8": 0.27, "nf4": 0.15, "fp8": 0.27}
RSS_TARGET = 1.3

CHILD = r"""
import json, sys, warnings
import torch
import moe_mtp
from transformers import BitsAndBytesConfig

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

folder, mode, library = sys.argv[1:4]
bnb = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16),
}
kwargs = {"fp32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16}, "fp8": {"dtype": "fp8"}}.get(mode)
if kwargs is None:
    kwargs = {"dtype": torch.bfloat16, "quantization_config": bnb[mode]}
if library == "transformers":
    from transformers import DeepseekV3ForCausalLM as cls
else:
    from moe_mtp import MoeMtpForCausalLM as cls
import bitsandbytes  # imported before the baseline, so both sides count it alike
before = status()["VmRSS"]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = cls.from_pretrained(folder, **kwargs)
peak = status()["VmHWM"]
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the final RSS is what the model holds
after = status()
experts = model.model.layers[1].mlp.experts
kind = type(experts[0].up_proj).__name__ if isinstance(experts, torch.nn.ModuleList) else (
    f"{type(experts).__name__} {experts.gate_up_proj.dtype}".replace("torch.", ""))
forward = "ok"
try:
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 8)))
except Exception as exc:
    forward = f"fails: {type(exc).__name__}"
print(json.dumps({"footprint": model.get_memory_footprint(), "before": before, "rss": after["VmRSS"],
                  "peak": peak, "experts": kind, "forward": forward}))
"""


def bench_config(experts: int, hidden: int):
    from moe_mtp.configuration import preset

    # DeepSeek-V3's routing (top-8 in 4 of 8 groups, 1 shared expert, 1 MTP module) at a width that fits here.
    return preset(
        "deepseek-v3", vocab_size=4096, hidden_size=hidden, intermediate_size=4 * hidden,
        moe_intermediate_size=hidden // 4, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=8,
        n_routed_experts=experts, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=1024,
    )  # fmt: skip


def build(root: Path, experts: int, hidden: int) -> dict[str, Path]:
    """The checkpoint in three folders: released FP8 (deepseek layout), moe_mtp bf16, transformers bf16."""
    from moe_mtp import MoeMtpForCausalLM
    from moe_mtp.conversion import convert

    torch.manual_seed(0)
    config = bench_config(experts, hidden)
    model = MoeMtpForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"checkpoint: {params / 1e6:.1f}M parameters, routed experts {100 * routed / params:.1f}% "
          f"({experts} experts, top-8 of 8 groups, 1 shared expert, 1 MTP module)")  # fmt: skip
    folders = {"moe_mtp": root / "moe_mtp", "release": root / "release_fp8", "transformers": root / "transformers"}
    model.save_pretrained(folders["moe_mtp"])
    del model
    convert(folders["moe_mtp"], folders["release"], dst_format="deepseek", dtype="fp8", progress=False)
    convert(folders["moe_mtp"], folders["transformers"], dst_format="transformers", progress=False)
    return folders


def run(folder: Path, mode: str, library: str = "moe_mtp") -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), mode, library], capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(f"{library} {mode} from {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp), args.experts, args.hidden)
        rows = [("moe_mtp", mode, folders["release"], mode) for mode in ("fp32", "bf16", "int8", "nf4", "fp8")]
        rows.append(("moe_mtp", "int8", folders["moe_mtp"], "int8 (moe_mtp bf16 folder)"))
        # transformers' layout has no MTP module: its ratio is to its own fp32 load
        rows.append(("transformers", "fp32", folders["transformers"], "fp32 (transformers DeepseekV3)"))
        rows.append(("transformers", "int8", folders["transformers"], "int8 (transformers DeepseekV3)"))
        results = {}
        for library, mode, folder, label in rows:
            results[label] = run(folder, mode, library)
    mib = 2**20
    print("\nloaded from the released FP8 folder unless said otherwise; memory in MiB")
    print("RSS above the pre-load baseline (imports): peak while loading, and final (after malloc_trim)")
    print(
        "| mode | footprint | vs fp32 | target | peak RSS | final RSS | peak / final | peak / footprint | routed experts "
        "| forward |"
    )
    print("|" + "---|" * 10)
    for label, r in results.items():
        mode = label.split()[0]
        fp32 = results["fp32 (transformers DeepseekV3)" if "transformers" in label else "fp32"]["footprint"]
        ratio = r["footprint"] / fp32
        target = TARGETS.get(mode) if label in TARGETS else None
        peak, final = r["peak"] - r["before"], r["rss"] - r["before"]
        over = peak / final
        rss_target = mode == "int8" and "transformers" not in label
        cells = [
            label, f"{r['footprint'] / mib:.1f}", f"**{ratio:.3f}x**", f"≤ {target}x" if target else "",
            f"{peak / mib:.0f}", f"{final / mib:.0f}", f"**{over:.2f}x**" + (f" (≤ {RSS_TARGET}x)" if rss_target else ""),
            f"{peak / r['footprint']:.2f}x",
            r["experts"], r["forward"],
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
        if target and ratio > target:
            missed.append(f"{label} footprint {ratio:.3f}x > {target}x")
        if rss_target and over > RSS_TARGET:
            missed.append(f"{label} peak RSS while loading {over:.2f}x > {RSS_TARGET}x the final RSS")
    print("\n" + ("all targets met" if not missed else "missed: " + "; ".join(missed)))
    if args.check and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
