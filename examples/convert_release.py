"""Convert a released DeepSeek-V3-layout checkpoint to moe_mtp and back, printing `inspect` for each folder.

The released layout stores the MTP module as decoder layer N (with its own copies of the embedding and head) and
most linear weights as block FP8 with a `weight_scale_inv` per 128x128 block. moe_mtp stores MTP as
`model.mtp_layers.0` in bf16 (or fp32). Given no `--src`, this script writes a tiny released-layout folder by hand
(random weights, FP8 quantized as the release does) so the round trip runs anywhere.

    python examples/convert_release.py --smoke                          # seconds, a tiny hand-made release
    python examples/convert_release.py --src path/to/DeepSeek-V3 --output-dir /big/disk/v3   # the real one
    python examples/convert_release.py --smoke --overwrite              # again, replacing the earlier conversions

The same conversions from the shell:

    python -m moe_mtp.conversion --inspect SRC
    python -m moe_mtp.conversion SRC OUT/moe_mtp --dtype bf16
    python -m moe_mtp.conversion OUT/moe_mtp OUT/deepseek --to deepseek --dtype fp8
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.configuration import preset
from moe_mtp.conversion import convert, convert_state_dict, deepseek_config_dict, inspect, quantize_block_fp8
from moe_mtp.conversion.summary import format_inspect

# What the release stores in FP8: the attention and MLP projections of every decoder layer (MTP's included).
FP8_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|"
                        r"kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")  # fmt: skip


def write_tiny_release(folder: Path) -> Path:
    """A DeepSeek-V3-shaped checkpoint at toy size, in the released layout, from a randomly initialized model."""
    config = preset("tiny-release")
    torch.manual_seed(0)
    ours = convert_state_dict(MoeMtpForCausalLM(config).state_dict(), config, "moe_mtp_model", "moe_mtp")
    n = config.num_hidden_layers
    tensors = {}
    for name, tensor in ours.items():
        name = re.sub(r"^model\.mtp_layers\.(\d+)\.", lambda m: f"model.layers.{n + int(m[1])}.", name)
        if FP8_WEIGHT.match(name):
            tensors[name], tensors[name + "_scale_inv"] = quantize_block_fp8(tensor.to(torch.bfloat16))
        else:
            tensors[name] = (
                tensor.to(torch.bfloat16) if tensor.dtype == torch.float32 and "bias" not in name else tensor
            )
    # The release gives the MTP layer its own embedding and output head.
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    fp8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(deepseek_config_dict(config.to_diff_dict(), fp8), indent=2))
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=None, help="A released-layout folder (default: write a tiny one).")
    parser.add_argument("--output-dir", default="outputs/convert")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the moe_mtp copy.")
    parser.add_argument("--smoke", action="store_true", help="The tiny hand-made release (the default without --src).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the folders an earlier run wrote here.")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    given = args.src and not args.smoke
    # Only the folders this script writes: a --src folder is never touched.
    names = ("moe_mtp", "deepseek") if given else ("release", "moe_mtp", "deepseek")
    written = [output / name for name in names if (output / name).exists()]
    if written and not args.overwrite:
        raise SystemExit(
            f"{output} already holds {', '.join(p.name for p in written)} from an earlier run; "
            "pass --overwrite to replace them, or choose another --output-dir"
        )
    for folder in written:
        shutil.rmtree(folder)
    src = Path(args.src) if given else write_tiny_release(output / "release")

    print(f"== {src} (released layout)\n{format_inspect(inspect(src))}\n")
    ours, back = output / "moe_mtp", output / "deepseek"
    convert(src, ours, dtype=args.dtype)
    print(f"== {ours}\n{format_inspect(inspect(ours))}\n")
    convert(ours, back, dst_format="deepseek", dtype="fp8")
    print(f"== {back} (released layout again)\n{format_inspect(inspect(back))}\n")

    # The moe_mtp folder loads with from_pretrained, MTP included.
    model = MoeMtpForCausalLM.from_pretrained(ours)
    ids = torch.arange(3, 19).view(1, -1) % model.config.vocab_size
    logits = model(ids).logits
    # The FP8 weights survive the round trip: requantizing the dequantized values gives the release's bytes back.
    original, again = {}, {}
    for path in sorted(src.glob("*.safetensors")):
        original.update(load_file(path))
    for path in sorted(back.glob("*.safetensors")):
        again.update(load_file(path))
    fp8_names = [k for k, t in original.items() if t.dtype == torch.float8_e4m3fn]
    same = sum(k in again and torch.equal(original[k].view(torch.uint8), again[k].view(torch.uint8)) for k in fp8_names)
    result = {
        "tensors_released": len(original), "tensors_back": len(again), "fp8_tensors": len(fp8_names),
        "fp8_tensors_bit_identical": same, "logits_finite": bool(torch.isfinite(logits).all()),
        "mtp_layers": model.config.num_nextn_predict_layers,
    }  # fmt: skip
    (output / "roundtrip.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
