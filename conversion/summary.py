"""`inspect`: what a checkpoint folder holds, from its config.json and safetensors headers only (no tensor data)."""

from __future__ import annotations

import re
from pathlib import Path

from .configs import config_family, moe_mtp_config_dict, read_json
from .safetensors_io import TensorInfo, check_checkpoint_folder, read_folder_headers
from .spec import is_routed_expert, mtp_index

SCALE_SUFFIX = "_scale_inv"
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def detect_layout(keys, family: str) -> str:
    """'transformers' if experts are stacked ('moe_mtp_model' for a moe_mtp folder: a model's own state dict, as
    `save_pretrained(save_original_format=False)` writes it), 'moe_mtp' for our names ('moe_mtp_base' as the base
    model saves them, without the `model.` prefix), else 'deepseek' (the released layout)."""
    keys = list(keys)
    base = family == "moe_mtp" and "embed_tokens.weight" in keys and not any(k.startswith("model.") for k in keys)
    if any(k.endswith(".mlp.experts.gate_up_proj") or k.endswith(".mlp.experts.down_proj") for k in keys):
        if family == "moe_mtp":
            return "moe_mtp_model_base" if base else "moe_mtp_model"
        return "transformers"
    if base:
        return "moe_mtp_base"
    if family == "moe_mtp" or any(k.startswith("model.mtp_layers.") for k in keys):
        return "moe_mtp"
    return "deepseek"


def mtp_module(key: str, num_hidden_layers: int) -> int | None:
    """Which MTP module a key of either layout belongs to (moe_mtp: mtp_layers.k; released: layers.N+k)."""
    k = mtp_index(key)
    if k is not None:
        return k
    m = LAYER_RE.match(key)
    if m and int(m.group(1)) >= num_hidden_layers:
        return int(m.group(1)) - num_hidden_layers
    return None


def count_parameters(infos: dict[str, TensorInfo], config: dict) -> dict:
    """Parameter counts by role. An FP8 weight counts once; its weight_scale_inv is not a parameter."""
    n_layers = config["num_hidden_layers"]
    experts = config.get("n_routed_experts") or 0
    top_k = config.get("num_experts_per_tok") or 0
    total = mtp = routed = 0
    mtp_modules = set()
    for key, info in infos.items():
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in infos:
            continue
        total += info.numel
        module = mtp_module(key, n_layers)
        if module is not None:
            mtp += info.numel
            mtp_modules.add(module)
        elif is_routed_expert(key):
            routed += info.numel
    main = total - mtp
    # every token runs everything but the routed experts, of which it runs top_k of n_routed_experts per layer
    active = main - routed + (routed * top_k // experts if experts else 0)
    return {
        "total_params": total,
        "main_params": main,
        "mtp_params": mtp,
        "routed_expert_params": routed,
        "active_params": active,
        "mtp_modules": len(mtp_modules),
    }


def inspect(path) -> dict:
    """Summarize a checkpoint folder without reading tensor data.

    Returns the layout, model type, tensor and file counts, parameter counts (total, main model, MTP modules,
    routed experts, and active per token = everything in the main model but the routed experts, plus top-k of
    them: attention, router, shared experts, dense MLPs, norms, embedding and lm_head) and per dtype the number
    of tensors, elements and bytes (FP8 scales are listed under their dtype, not counted as parameters).
    """
    folder = Path(path)
    check_checkpoint_folder(folder)
    released = read_json(folder / "config.json")
    family = config_family(released, str(folder / "config.json"))
    config = moe_mtp_config_dict(released)
    infos = read_folder_headers(folder)
    dtypes: dict[str, dict[str, int]] = {}
    for info in infos.values():
        row = dtypes.setdefault(str(info.dtype).replace("torch.", ""), {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += info.numel
        row["bytes"] += info.nbytes
    files = {info.file for info in infos.values()}
    summary = {
        "path": str(folder),
        "layout": detect_layout(infos, family),
        "model_type": released.get("model_type"),
        "num_tensors": len(infos),
        "num_files": len(files),
        "total_bytes": sum(info.nbytes for info in infos.values()),
        "fp8": any(k.endswith(SCALE_SUFFIX) for k in infos),
        "num_hidden_layers": config["num_hidden_layers"],
        "n_routed_experts": config.get("n_routed_experts") or 0,
        "num_experts_per_tok": config.get("num_experts_per_tok") or 0,
    }
    summary.update(count_parameters(infos, config))
    summary["dtypes"] = dict(sorted(dtypes.items()))
    return summary


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000
    return str(n)


def format_inspect(summary: dict) -> str:
    lines = [
        f"{summary['path']}: {summary['model_type']} in the {summary['layout']} layout, "
        f"{summary['num_tensors']} tensors in {summary['num_files']} file(s), {_human(summary['total_bytes'], 'B')}"
        + (" (FP8)" if summary["fp8"] else ""),
        f"  parameters: {_human(summary['total_params'])} total = {_human(summary['main_params'])} main + "
        f"{_human(summary['mtp_params'])} MTP ({summary['mtp_modules']} module(s)); "
        f"{_human(summary['active_params'])} active per token "
        f"({summary['num_experts_per_tok']} of {summary['n_routed_experts']} routed experts)",
    ]
    for name, row in summary["dtypes"].items():
        lines.append(f"  {name:>14}: {row['tensors']} tensors, {_human(row['elements'])} values, "
                     f"{_human(row['bytes'], 'B')}")  # fmt: skip
    return "\n".join(lines)
