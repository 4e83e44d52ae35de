"""Tiny checkpoints for the conversion tests, built independently of the converter.

The released ("deepseek") layout is written here by hand: MTP module k renamed to layer N+k with its own copies
of the embedding and head, the release's FP8 weights (`released_as_fp8`) quantized to block FP8, sharded with an
index.
Dimensions are deliberately not multiples of 128, so FP8 edge blocks are partial.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_mtp.configuration import MoeMtpConfig, preset
from moe_mtp.conversion import deepseek_config_dict, quantize_block_fp8
from moe_mtp.conversion.spec import canonical_shapes

V2_LITE = dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None,
               norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0)  # fmt: skip

# What the DeepSeek-V3 release stores as FP8, from its files (not from the converter's rule): in every decoder layer,
# main or MTP (N+k), the attention projections and the dense / routed-expert / shared-expert MLP projections.
# kv_a_proj_with_mqa is FP8 (576 x 7168 with a [5, 56] scale); the MTP module's eh_proj is bf16.
FP8_ATTENTION = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
FP8_MLP = {"gate_proj", "up_proj", "down_proj"}


def released_as_fp8(name: str) -> bool:
    """Whether the release stores tensor `name` (its own key names) as block FP8."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[-1] != "weight":
        return False
    block, proj = parts[3], parts[-2]
    return (block == "self_attn" and proj in FP8_ATTENTION) or (block == "mlp" and proj in FP8_MLP)


INDEX = "model.safetensors.index.json"

TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 512}',
    "special_tokens_map.json": "{}",
    "generation_config.json": '{"bos_token_id": 0, "eos_token_id": 1}',
}


def tiny_config(**overrides) -> MoeMtpConfig:
    """The `tiny-release` preset (hidden 192 = 128 + 64 and intermediate 200 = 128 + 72: partial FP8 blocks in both
    directions) with YaRN rope, a shorter context and `overrides`."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 128}  # fmt: skip
    return preset("tiny-release", **{"max_position_embeddings": 512, "rope_parameters": rope, **overrides})


def random_state_dict(config, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    """moe_mtp names -> random tensors (norms near 1, weights ~0.02, a nonzero float32 router bias)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(config).items():
        if name.endswith("e_score_correction_bias"):
            out[name] = torch.randn(shape, generator=g) * 0.1
        elif name.endswith("norm.weight"):
            out[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            out[name] = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    return out


def released_state_dict(ours: dict[str, torch.Tensor], config, fp8=True, scale_fmt=None) -> dict[str, torch.Tensor]:
    """The released layout of a moe_mtp state dict, written out by hand."""
    n = config.num_hidden_layers
    out = {}
    for name, tensor in ours.items():
        m = re.match(r"model\.mtp_layers\.(\d+)\.(.+)", name)
        if m:
            name = f"model.layers.{n + int(m[1])}.{m[2]}"
        if fp8 and released_as_fp8(name):
            out[name], out[name + "_scale_inv"] = quantize_block_fp8(tensor, scale_fmt=scale_fmt)
        else:
            out[name] = tensor
    for k in range(config.num_nextn_predict_layers):
        out[f"model.layers.{n + k}.embed_tokens.weight"] = ours["model.embed_tokens.weight"].clone()
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        out[f"model.layers.{n + k}.shared_head.head.weight"] = ours[head].clone()
    if not has_router_bias(config):
        out = {k: v for k, v in out.items() if not k.endswith("e_score_correction_bias")}
    return out


def has_router_bias(config) -> bool:
    return config.scoring_func == "sigmoid" and config.topk_method == "noaux_tc"


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config_dict: dict, shards: int = 3) -> Path:
    """Save tensors over `shards` files (contiguous runs of keys) with an index, plus config and tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    return folder


def released_config(config, fp8=True, scale_fmt=None) -> dict:
    quantization = None
    if fp8:
        quantization = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                        "weight_block_size": [128, 128]}  # fmt: skip
        if scale_fmt:
            quantization["scale_fmt"] = scale_fmt
    return deepseek_config_dict(config.to_diff_dict(), quantization)


def write_released(folder, config, seed=0, fp8=True, scale_fmt=None, shards=3):
    """A released-layout checkpoint; returns (folder, the moe_mtp state dict it was made from)."""
    ours = random_state_dict(config, seed=seed)
    tensors = released_state_dict(ours, config, fp8=fp8, scale_fmt=scale_fmt)
    write_checkpoint(folder, tensors, released_config(config, fp8, scale_fmt), shards)
    return Path(folder), ours


def write_moe_mtp(folder, config, seed=0, dtype=torch.bfloat16, shards=2):
    ours = random_state_dict(config, dtype=dtype, seed=seed)
    config_dict = {**config.to_diff_dict(), "architectures": ["MoeMtpForCausalLM"]}
    write_checkpoint(folder, ours, config_dict, shards)
    return Path(folder), ours


def load_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder (plain safetensors loading, not the converter's reader)."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


def edit_shard(folder: Path, key: str, new_value=None, new_key=None):
    """Replace (or with new_value None, delete) tensor `key` in its shard, keeping the index right."""
    path = shard_of(folder, key)
    tensors = load_file(path)
    del tensors[key]
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"][key]
    if new_value is not None:
        tensors[new_key or key] = new_value
        index["weight_map"][new_key or key] = path.name
    save_file(tensors, path, metadata={"format": "pt"})
    (folder / INDEX).write_text(json.dumps(index))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to check that a folder was left exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
