"""Conversion speed against a plain file copy of the same checkpoint, in the same run.

Builds (in a temporary folder) a released-layout checkpoint of a few hundred MB, in bf16 and in FP8, then times
    bf16 -> bf16   deepseek layout -> moe_mtp (renames only)          target: <= 3x the copy time
    fp8  -> bf16   deepseek FP8 -> moe_mtp bf16 (block dequantization)  target: <= 6x the copy time
against `shutil.copy` of the source's files. Each timing is the best of --repeat runs.

    python benchmarks/bench_convert.py [--size-mb 400] [--repeat 3] [--check]

--check exits 1 when a target is missed (timings on a shared machine are noisy, so it is opt-in).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_mtp.configuration import MoeMtpConfig, preset
from moe_mtp.conversion import convert, deepseek_config_dict
from moe_mtp.conversion.fp8 import scale_shape
from moe_mtp.conversion.rules import RELEASE_FP8
from moe_mtp.conversion.spec import canonical_shapes

TARGETS = {"bf16 -> bf16": 3.0, "fp8 -> bf16": 6.0}


def bench_config(size_mb: int) -> MoeMtpConfig:
    """A DeepSeek-V3-shaped config (128-multiple dimensions, as released) of at least `size_mb` MB in bf16.

    Layers are added to reach big sizes; small ones shrink the vocabulary and the expert count first, so the
    checkpoint built is the smallest of these shapes that is not below the size asked for."""
    for vocab, experts in ((4096, 8), (8192, 16), (16384, 32), (32768, 32)):
        for layers in range(2, 202):
            config = preset(
                "deepseek-v3", vocab_size=vocab, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                num_hidden_layers=layers, num_attention_heads=8, n_routed_experts=experts, n_group=4,
                topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256,
                qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
            )  # fmt: skip
            size = bf16_size_mb(config)
            if size >= size_mb:
                break
            if layers >= 4 and vocab < 32768:
                break  # a bigger vocabulary and more experts before more layers
        if size >= size_mb:
            return config
    return config


def bf16_size_mb(config: MoeMtpConfig) -> float:
    return 2 * sum(torch.Size(shape).numel() for shape in canonical_shapes(config).values()) / 1e6


def build(folder: Path, config: MoeMtpConfig, fp8: bool, shard_bytes: int = 200 * 10**6):
    """A released-layout checkpoint with cheap pseudo-random data (the values do not matter for speed)."""
    folder.mkdir(parents=True)
    n = config.num_hidden_layers
    pool = (torch.randn(1 << 22) * 0.02).to(torch.bfloat16)
    codes = torch.randint(0, 0x7E, (1 << 22,), dtype=torch.uint8) | (
        torch.randint(0, 2, (1 << 22,), dtype=torch.uint8) << 7
    )
    tensors: dict[str, torch.Tensor] = {}

    def data(source, numel):
        return source.repeat(-(-numel // source.numel()))[:numel].clone()

    for name, shape in canonical_shapes(config).items():
        name = name.replace("model.mtp_layers.0.", f"model.layers.{n}.")
        numel = torch.Size(shape).numel()
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros(shape)
        elif fp8 and re.fullmatch(RELEASE_FP8, name):
            tensors[name] = data(codes, numel).view(torch.float8_e4m3fn).view(shape)
            tensors[name + "_scale_inv"] = torch.rand(scale_shape(shape)) * 1e-3
        else:
            tensors[name] = data(pool, numel).view(shape)
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    shards, size = [{}], 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quantization = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    (folder / "config.json").write_text(
        json.dumps(deepseek_config_dict(config.to_diff_dict(), quantization if fp8 else None))
    )
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def best_of(repeat: int, run, cleanup) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        cleanup()
    return min(times)


def copy_folder(src: Path, dst: Path):
    dst.mkdir()
    for path in src.glob("*.safetensors"):
        shutil.copy(path, dst / path.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=400, help="bf16 checkpoint size (default 400)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    config = bench_config(args.size_mb)
    print(f"building a {bf16_size_mb(config):.0f} MB bf16 checkpoint for --size-mb {args.size_mb} "
          f"({config.num_hidden_layers} layers, {config.n_routed_experts} experts, vocabulary {config.vocab_size})")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        tmp = Path(tmp)
        sources = {"bf16 -> bf16": tmp / "bf16", "fp8 -> bf16": tmp / "fp8"}
        sizes = {case: build(folder, config, fp8=case.startswith("fp8")) for case, folder in sources.items()}
        out = tmp / "out"

        def cleanup():
            shutil.rmtree(out, ignore_errors=True)

        for case, src in sources.items():
            copy_s = best_of(args.repeat, lambda src=src: copy_folder(src, out), cleanup)
            convert_s = best_of(
                args.repeat, lambda src=src: convert(src, out, dtype="bf16", progress=False, shard_size="5GB"), cleanup
            )
            rows.append((case, sizes[case], copy_s, convert_s))
    print(f"{'case':<14}{'source':>10}{'copy':>9}{'convert':>10}{'ratio':>8}{'target':>8}  result")
    ok = True
    for case, size, copy_s, convert_s in rows:
        ratio = convert_s / copy_s
        passed = ratio <= TARGETS[case]
        ok &= passed
        print(f"{case:<14}{size / 1e6:>8.0f}MB{copy_s:>8.3f}s{convert_s:>9.3f}s{ratio:>7.2f}x{TARGETS[case]:>7.1f}x  "
              f"{'ok' if passed else 'MISSED'}")  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
