"""The streaming folder converter, and folder loading for `from_pretrained`.

`convert` reads one tensor (or one chunk of rows) at a time and streams each output shard to disk, so its memory
stays around the largest single tensor it has to transform (a float32 copy of it when quantizing to FP8), whatever
the model size. Output goes to `DST.partial`, swapped into DST only once complete (see `destination.py`); any
error removes it.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

from . import destination
from .configs import (
    DTYPE_STRINGS,
    build_moe_mtp_config,
    config_family,
    deepseek_config_dict,
    moe_mtp_config_dict,
    read_json,
    transformers_config_dict,
)
from .errors import ConversionError
from .layouts import (
    FolderStore,
    FP8Format,
    Plan,
    Source,
    check_dropped,
    get_layout,
    plan_outputs,
    resolve_dtype,
    resolve_source,
    run_to_dict,
)
from .safetensors_io import (
    INDEX_NAME,
    check_checkpoint_folder,
    parse_size,
    plan_shards,
    read_folder_headers,
    shard_names,
)
from .summary import detect_layout, format_inspect, inspect, mtp_module

FORMATS = ("moe_mtp", "deepseek", "transformers")
# Files besides the weights that a checkpoint needs to be usable: tokenizer, chat template, generation defaults.
COPY_PATTERNS = ("tokenizer*.json", "tokenizer.model", "tokenizer*.model", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "*.tiktoken",
                 "tiktoken.model", "chat_template*", "*.jinja", "tokenization_*.py")  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def open_source(
    src,
    src_format: str = "auto",
    allow_unknown: bool = False,
    config=None,
    *,
    allow_missing: bool = False,
    missing_hint: str = "",
) -> tuple[dict, Source]:
    """Read a folder's config and headers and match them: (moe_mtp config dict, Source). Only FP8 scales are read
    (to check them). `config` (a MoeMtpConfig) overrides the folder's config.json for the shape checks; see
    `resolve_source` for `allow_unknown`, `allow_missing` and `missing_hint`.
    """
    src = Path(src)
    check_checkpoint_folder(src)
    released = read_json(src / "config.json")
    family = config_family(released, str(src / "config.json"))
    infos = read_folder_headers(src)
    layout_name = detect_layout(infos, family) if src_format == "auto" else src_format
    layout = get_layout(layout_name)
    ours = moe_mtp_config_dict(released)
    if family != "moe_mtp" and "num_nextn_predict_layers" not in released:
        # a config that does not say: the MTP modules present decide
        n = ours["num_hidden_layers"]
        modules = {m for m in (mtp_module(k, n) for k in infos) if m is not None}
        ours["num_nextn_predict_layers"] = max(modules) + 1 if modules else 0
    if config is None:
        config = build_moe_mtp_config(ours, str(src / "config.json"))
    fp8_format = FP8Format.from_config(released.get("quantization_config"), str(src / "config.json"))
    store = FolderStore(infos)
    try:
        source = resolve_source(store, layout, config, fp8_format, allow_unknown, allow_missing, missing_hint)
    except BaseException:
        store.close()
        raise
    if source.config.num_nextn_predict_layers != config.num_nextn_predict_layers:
        ours["num_nextn_predict_layers"] = source.config.num_nextn_predict_layers
    return ours, source


def read_config_dict(folder, mtp_from_weights: bool = True) -> dict:
    """The moe_mtp config dict of any supported folder (released deepseek, transformers or moe_mtp).

    With `mtp_from_weights`, MTP modules count as present only if their weights are (transformers-saved folders
    have none); otherwise `num_nextn_predict_layers` is what config.json says.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown tensors: reading the config is not the place to report them
        ours, source = open_source(folder, allow_unknown=True, allow_missing=True)
    source.store.close()
    if not mtp_from_weights:
        ours["num_nextn_predict_layers"] = read_json(Path(folder) / "config.json").get(
            "num_nextn_predict_layers", ours["num_nextn_predict_layers"]
        )
    return ours


def load_state_dict_from_folder(
    folder, config, dtype=None, *, allow_missing: bool = False, layout: str = "moe_mtp"
) -> dict[str, torch.Tensor]:
    """All weights of a deepseek / transformers / moe_mtp folder, in moe_mtp names, checked against `config`.

    `layout="moe_mtp_model"` stacks the routed experts as a model holds them, for `model.load_state_dict`.

    FP8 weights are dequantized (to `dtype`, else to the folder's unquantized dtype); `dtype` (a torch dtype or
    'bf16'/'fp32') casts floating tensors, except the float32 router bias. The whole state dict is in memory.
    Missing tensors are an error, unless `allow_missing` (they are then simply absent from the result); trailing
    MTP modules absent as a whole are absent from the result too.
    """
    _, source = open_source(folder, config=config, allow_missing=allow_missing)
    try:
        plan = plan_outputs(source, get_layout(layout), resolve_dtype(dtype), allow_raw=False)
        return run_to_dict(plan)
    finally:
        source.store.close()


def folder_family(folder, config_given: bool = False) -> str | None:
    """What a local checkpoint folder holds, from its config.json: 'moe_mtp', 'deepseek_v3' (aliases such as
    kimi_k2, or only `architectures`, included) or 'deepseek_v2'; None for a folder without config.json when the
    caller brings its own config (`config_given`). A missing or malformed config.json raises ConversionError."""
    path = Path(folder) / "config.json"
    if not path.is_file() and config_given:
        return None
    if not path.is_file():
        raise ConversionError(
            f"{path}: not found; a checkpoint folder needs its config.json (or pass config=... to from_pretrained)"
        )
    return config_family(read_json(path), str(path))


def check_folder(folder, *, allow_missing: bool = False, missing_hint: str = "") -> list[str]:
    """Check a local checkpoint folder before loading it, from its config.json, headers and FP8 scales: every
    name, shape and dtype, as the converter does. Missing tensors raise ConversionError (ending with
    `missing_hint`) unless `allow_missing`; tensors the config does not account for are left to the loader.
    Returns one-line notes: MTP modules the folder lacks (the model initializes them), a missing router bias.

    Folders that another quantizer wrote (a moe_mtp config with a `quantization_config`) are not checked here.
    """
    released = read_json(Path(folder) / "config.json")
    if config_family(released) == "moe_mtp" and released.get("quantization_config") is not None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown tensors: the loader reports them
        _, source = open_source(folder, allow_unknown=True, allow_missing=allow_missing, missing_hint=missing_hint)
    source.store.close()
    notes = list(source.notes)
    held, asked = source.config.num_nextn_predict_layers, source.asked_mtp
    if held < asked:
        notes.append(
            f"{folder} holds {held} of the {asked} MTP module(s) its config asks for: modules {held}..{asked - 1} "
            "are newly initialized (as when starting MTP training from a base model)"
        )
    if source.missing:
        notes.append(
            f"{len(source.missing)} tensor(s) missing from {folder} will be newly initialized: "
            + ", ".join(source.missing[:3])
            + (" ..." if len(source.missing) > 3 else "")
        )
    return notes


def destination_config(ours: dict, plan: Plan, dst_format: str) -> dict:
    """config.json for the destination, from the source's moe_mtp config dict and the plan."""
    ours = dict(ours)
    ours["num_nextn_predict_layers"] = plan.config.num_nextn_predict_layers
    dtype = _dtype_name(plan.dtype)
    if dst_format == "moe_mtp":
        ours["dtype"] = dtype
        return ours
    if dst_format == "deepseek":
        quantization = plan.fp8.quantization_config() if plan.fp8 else None
        return deepseek_config_dict(ours, quantization, DTYPE_STRINGS.get(dtype, dtype))
    return transformers_config_dict(plan.config, dtype)


def _config_changes(before: dict, after: dict) -> dict:
    return {
        "added": {k: after[k] for k in after if k not in before},
        "removed": sorted(k for k in before if k not in after),
        "changed": {k: [before[k], after[k]] for k in after if k in before and before[k] != after[k]},
    }


def _copy_extra_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in COPY_PATTERNS:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and path.name not in copied and path.name != "config.json":
                shutil.copy2(path, dst / path.name)
                copied.append(path.name)
    return copied


def _write(plan: Plan, source: Source, out: Path, shard_bytes: int, progress: bool) -> tuple[list[str], int]:
    from tqdm.auto import tqdm

    from .safetensors_io import write_shard

    entries = [o.entry for o in plan.outputs]
    producers = {o.entry.key: o.produce for o in plan.outputs}
    shards = plan_shards(entries, shard_bytes)
    names = list(shard_names(len(shards)))
    total = sum(e.nbytes for e in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, desc="converting",
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    done = [0]

    def advance(entry):
        done[0] += 1
        bar.update(entry.nbytes)
        if done[0] % 64 == 0 or done[0] == len(entries):
            bar.set_postfix_str(f"{done[0]}/{len(entries)} tensors", refresh=False)

    reader = getattr(source.store, "reader", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chunked kernels are memory-bound: extra threads only add overhead
    try:
        for name, shard in zip(names, shards, strict=True):
            write_shard(out / name, shard, lambda e: producers[e.key](), reader, advance)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    if len(shards) > 1:
        weight_map = {e.key: name for name, shard in zip(names, shards, strict=True) for e in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names, total


def convert(
    src,
    dst,
    *,
    src_format: str = "auto",
    dst_format: str = "moe_mtp",
    dtype=None,
    shard_size="5GB",
    dry_run: bool = False,
    force: bool = False,
    allow_unknown: bool = False,
    progress: bool = True,
    scale_fmt: str | None = "inherit",
) -> dict:
    """Convert checkpoint folder `src` into `dst` (see docs/conversion.md).

    src_format: "auto" (from config.json and tensor names), "deepseek", "transformers" or "moe_mtp".
    dst_format: "moe_mtp", "deepseek" or "transformers".
    dtype: None (keep; FP8 stays FP8 only into deepseek), "bf16", "fp32", or "fp8" (deepseek only, quantized as
    the release: 128x128 blocks, `scale_fmt` "inherit" from an FP8 source, None or "ue8m0").
    The tokenizer/generation files are copied and config.json is translated. DST is written as DST.partial and
    renamed when complete; an existing DST is replaced only with `force` (and only once the new one is complete).
    Returns a summary dict (also printed for `dry_run`, which writes nothing). Errors raise ConversionError.
    """
    src, dst = Path(src), destination.normalize(dst)
    if src_format not in ("auto", *FORMATS):
        raise ConversionError(f"unknown source format {src_format!r}; expected auto or one of {FORMATS}")
    if dst_format not in FORMATS:
        raise ConversionError(f"unknown destination format {dst_format!r}; expected one of {FORMATS}")
    shard_bytes = parse_size(shard_size)
    check_checkpoint_folder(src)
    destination.check(src, dst, force=True, dry_run=True)  # never recover into the source
    recovered = [] if dry_run else destination.recover(dst)
    for note in recovered:
        print(f"note: {note}", file=sys.stderr)
    destination.check(src, dst, force, dry_run)
    ours, source = open_source(src, src_format, allow_unknown)
    try:
        plan = plan_outputs(source, get_layout(dst_format), resolve_dtype(dtype), scale_fmt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_dropped(source, plan)
        notes = [source.mtp_note()] if source.mtp_note() else []
        notes += source.notes + [str(w.message) for w in caught]
        new_config = destination_config(ours, plan, dst_format)
        summary = _summary(src, dst, source, dst_format, plan, shard_bytes, new_config, notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if dry_run:
            summary["inspect"] = inspect(src)
            print(format_dry_run(summary))
            return summary
        summary["copied_files"], installed = _write_destination(
            src, dst, plan, source, new_config, shard_bytes, progress
        )
        for note in installed:
            print(f"note: {note}", file=sys.stderr)
        summary["notes"] += recovered + installed
        return summary
    finally:
        source.store.close()


def _summary(src, dst, source, dst_format, plan, shard_bytes, new_config, notes) -> dict:
    entries = [o.entry for o in plan.outputs]
    return {
        "src": str(src),
        "dst": str(dst),
        "src_format": source.layout.name,
        "dst_format": dst_format,
        "dtype": "fp8" if plan.fp8 else _dtype_name(plan.dtype),
        "num_tensors": len(entries),
        "total_bytes": sum(e.nbytes for e in entries),
        "num_shards": len(plan_shards(entries, shard_bytes)),
        "config_changes": _config_changes(read_json(src / "config.json"), new_config),
        "notes": notes,
    }


def _write_destination(src, dst, plan, source, new_config, shard_bytes, progress) -> tuple[list[str], list[str]]:
    """Writes DST.partial, commits it and swaps it into DST; returns the copied extra files and the swap's notes.
    On any failure (Ctrl-C included) DST.partial and the parent folders this run created are removed."""
    partial = destination.partial_of(dst)
    created = destination.missing_parents(partial)
    try:
        destination.make_partial(partial)
        _write(plan, source, partial, shard_bytes, progress)
        (partial / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        copied = _copy_extra_files(src, partial)
        destination.commit(partial)
        return copied, destination.install(partial, dst)
    except BaseException as exc:
        destination.remove(partial)
        destination.remove_empty(created)
        if isinstance(exc, OSError):
            raise ConversionError(f"writing {dst}: {exc}") from exc
        raise


def format_dry_run(summary: dict) -> str:
    changes = summary["config_changes"]
    lines = [
        f"dry run: {summary['src']} ({summary['src_format']}) -> {summary['dst']} ({summary['dst_format']}, "
        f"{summary['dtype']})",
        f"would write {summary['num_tensors']} tensors, {summary['total_bytes']} bytes "
        f"({summary['total_bytes'] / 1e9:.3f} GB) in {summary['num_shards']} shard(s)",
        "config.json changes:",
    ]
    for key, value in changes["added"].items():
        lines.append(f"  + {key}: {json.dumps(value)}")
    for key in changes["removed"]:
        lines.append(f"  - {key}")
    for key, (old, new) in changes["changed"].items():
        lines.append(f"  ~ {key}: {json.dumps(old)} -> {json.dumps(new)}")
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    lines.append("source:")
    lines.append(format_inspect(summary["inspect"]))
    return "\n".join(lines)
