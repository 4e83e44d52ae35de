"""Loading, saving and publishing: what `MoeMtpPreTrainedModel.from_pretrained`, `save_pretrained`,
`push_to_hub` and `get_memory_footprint` hand over to, and how routed experts' on-disk keys map to the model's
stacked parameters.

This module travels in the Hub bundle beside the modeling file. The rest of the package (converter, quantization,
Hub helpers) is imported lazily through `package_module`: as remote code, without moe_mtp installed, loading falls
back to transformers' own.
"""

import importlib
import json
import os
import re
from contextlib import contextmanager

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.utils import logging

from ..configuration import MoeMtpConfig

logger = logging.get_logger(__name__)


# On disk (every folder moe_mtp writes or reads, like the release) each routed expert has its own keys; in memory
# they are stacked into MoeMtpExperts' two 3-D parameters. transformers' loader applies this mapping while it reads
# (sharding the stacked result under tensor/expert parallelism) and `save_pretrained` reverses it.
EXPERT_CHECKPOINT_MAPPING = [
    WeightConverter(
        source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        target_patterns="mlp.experts.gate_up_proj",
        operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        source_patterns="mlp.experts.*.down_proj.weight",
        target_patterns="mlp.experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]
# Registered by class name rather than model type: PEFT (0.19) rewrites LoRA adapter state dicts for any model type
# with a mapping while loading them, which fails on transformers 5.24; our adapters are stored as the model holds
# them and need no rewriting. overwrite: this file also runs as Hub remote code, beside an installed moe_mtp.
MAPPED_CLASSES = ("MoeMtpForCausalLM", "MoeMtpModel")
for _name in MAPPED_CLASSES:
    register_checkpoint_conversion_mapping(_name, EXPERT_CHECKPOINT_MAPPING, overwrite=True)


PER_EXPERT_KEY = re.compile(r"(?P<experts>(?:.+\.)?experts)\.(?P<expert>\d+)\.(?P<part>gate|up|down)_proj\.weight")


def fuse_expert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with per-expert keys (as on disk, or from MoeMtpExpertList) in MoeMtpExperts' stacked form, for
    `load_state_dict` into a model with 3-D experts. Other keys pass through."""
    out, experts = {}, {}
    for key, value in state.items():
        m = PER_EXPERT_KEY.fullmatch(key)
        if m is None:
            out[key] = value
        else:
            experts.setdefault(m["experts"], {})[(m["part"], int(m["expert"]))] = value
    for prefix, parts in experts.items():
        count = 1 + max(e for _, e in parts)
        try:
            gate_up = [torch.cat((parts[("gate", e)], parts[("up", e)])) for e in range(count)]
            down = [parts[("down", e)] for e in range(count)]
        except KeyError as missing:
            raise KeyError(f"{prefix}: expert tensor {missing} is missing, so its experts cannot be stacked") from None
        out[f"{prefix}.gate_up_proj"], out[f"{prefix}.down_proj"] = torch.stack(gate_up), torch.stack(down)
    return out


@contextmanager
def expert_checkpoint_mapping(per_expert_model: bool):
    """Leaves the expert mapping out of a load whose model holds per-expert modules (MoeMtpExpertList), whose
    parameters already carry the on-disk keys. transformers looks mappings up by class, not by instance."""
    if not per_expert_model:
        yield
        return
    import transformers.conversion_mapping as mappings

    get_checkpoint_conversion_mapping(MAPPED_CLASSES[0])  # builds the table if nothing has yet
    table = mappings._checkpoint_conversion_mapping_cache
    held = {name: table.get(name) for name in MAPPED_CLASSES}
    table.update(dict.fromkeys(MAPPED_CLASSES, []))
    try:
        yield
    finally:
        table.update(held)


def package_module(name: str):
    """Imports `moe_mtp.<name>` (the converter, quantization, the Hub helpers) lazily. Those stay out of the
    self-contained Hub bundle, so a model loaded with `trust_remote_code=True` gets a clear ImportError instead."""
    try:
        return importlib.import_module(f"moe_mtp.{name}")
    except ImportError as error:
        raise ImportError(f"This needs the moe-mtp package (`pip install moe-mtp`): {error}") from error


FOREIGN_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
MISSING_WEIGHTS_HINT = " (pass allow_missing_weights=True to from_pretrained to initialize them instead)"


def _checked_local_family(path, allow_missing: bool, kwargs: dict) -> str | None:
    """'moe_mtp', 'deepseek_v3' or 'deepseek_v2' for a local checkpoint folder, once its config.json and weights
    passed the converter's checks (notes are logged); None when `path` is not a local folder."""
    folder = os.path.join(os.fspath(path), kwargs.get("subfolder") or "") if path is not None else None
    if folder is None or not os.path.isdir(folder):
        return None
    try:
        conversion = package_module("conversion")
    except ImportError:  # running as remote code, without moe_mtp: transformers' own loading
        return None
    from transformers.distributed.checkpoint import is_sharded_checkpoint

    if is_sharded_checkpoint(folder):
        # Rank-local files of `save_pretrained(..., distributed_checkpoint=True)`: the model's own names, one file
        # per rank, which transformers loads strictly under a distributed_config (torch.distributed.checkpoint).
        return "moe_mtp"
    family = conversion.folder_family(folder, config_given=kwargs.get("config") is not None)
    if family is not None:
        for note in conversion.check_folder(folder, allow_missing=allow_missing, missing_hint=MISSING_WEIGHTS_HINT):
            logger.warning(note)
    return family


def _loads_lazily(path, family: str | None, saved: dict | None, kwargs: dict, keep_fp8: bool) -> bool:
    """Released and transformers-saved folders, and local folders quantized while loading (bitsandbytes, native
    FP8, or an FP8 folder to dequantize), go through the lazy reader; a saved bitsandbytes model does not."""
    as_bnb_config = package_module("quantization").as_bnb_config
    saved = saved or {}
    if family in FOREIGN_MODEL_TYPES:
        return True
    stored = saved.get("quantization_config") or {}
    quantizing = keep_fp8 or stored.get("quant_method") == "fp8"
    quantizing = quantizing or as_bnb_config(kwargs.get("quantization_config")) is not None
    if quantizing and as_bnb_config(stored) is None and os.path.isdir(str(path)):
        return True
    if keep_fp8:
        raise OSError(f"{path}: dtype='fp8' loads from a local folder; download it first.")
    return False


def _builds_expert_list(kwargs: dict, saved: dict | None, config=None) -> bool:
    """Whether the model `from_pretrained` is about to build gets per-expert modules (MoeMtpExpertList): the same
    test as MoeMtpMoE's, on the quantization_config the loader will put in the config."""
    config = config if config is not None else kwargs.get("config")
    return (
        kwargs.get("quantization_config") is not None
        or getattr(config, "quantization_config", None) is not None
        or (not isinstance(config, MoeMtpConfig) and (saved or {}).get("quantization_config") is not None)
    )


def _note_dropped_mtp(saved_depth: int, kept_depth: int):
    logger.warning(
        f"The checkpoint has {saved_depth} MTP module(s); modules {kept_depth}..{saved_depth - 1} were dropped "
        f"because num_nextn_predict_layers={kept_depth}."
    )


def _saved_config(path, kwargs: dict) -> dict | None:
    """The checkpoint's own config.json as a dict (before any override), None if there is none. Nothing to read for
    `None` (weights given as `state_dict`); a local folder is read directly, so neither asks the Hub."""
    from transformers.utils import cached_file

    if path is None:
        return None
    if os.path.isdir(path):
        config_file = os.path.join(path, kwargs.get("subfolder") or "", "config.json")
        config_file = config_file if os.path.isfile(config_file) else None
    else:
        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs
        }
        try:
            config_file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        except OSError:
            return None
    if config_file is None:
        return None
    with open(config_file) as f:
        return json.load(f)


def memory_footprint(model, fallback, return_buffers: bool) -> int:
    """Bytes held by the model, counting the quantization state bitsandbytes keeps outside the parameters and each
    shared storage (a tied head) once. `fallback` is transformers' own count, used as remote code."""
    try:
        quantization = package_module("quantization")
    except ImportError:
        return fallback(return_buffers)
    return quantization.memory_footprint(model, return_buffers)


def load_model(cls, load, path, *model_args, **kwargs):
    """`cls.from_pretrained(path, ...)`; `load` is transformers' `PreTrainedModel.from_pretrained` bound to `cls`.

    Loads moe_mtp folders, and also released DeepSeek (`deepseek_v3`/`deepseek_v2`, FP8 or not) and
    transformers-saved folders directly: the config is translated, FP8 weights are dequantized and the MTP layer
    (released at `model.layers.{num_hidden_layers + k}`) lands in `model.mtp_layers`.

    Those folders, and any local folder loaded with a bitsandbytes `quantization_config` or `dtype="fp8"`, are read
    lazily, one tensor at a time, so quantizing while loading never holds the full-precision model. `dtype="fp8"`
    keeps a block-FP8 checkpoint's linear weights as FP8 (see docs/quantization.md).

    A local folder is checked before any model is built, as the converter checks it: config.json must exist, every
    tensor's name, shape and dtype must match it, FP8 scales must be valid. Missing weights are an error unless
    `allow_missing_weights=True` (they are then newly initialized); missing trailing MTP modules are initialized with
    a note (starting MTP training from a base model), a missing router bias starts at zero."""
    try:
        quantization = package_module("quantization")
    except ImportError:  # running as remote code, without moe_mtp: transformers' own loading
        with expert_checkpoint_mapping(_builds_expert_list(kwargs, _saved_config(path, kwargs))):
            return load(path, *model_args, **kwargs)
    allow_missing = kwargs.pop("allow_missing_weights", False)
    family = _checked_local_family(path, allow_missing, kwargs)
    saved = _saved_config(path, kwargs)
    if family is None:  # not a local folder: route by the config's model_type
        family = (saved or {}).get("model_type")
    keep_fp8 = quantization.check_quantized_load(kwargs, saved)
    lazily = _loads_lazily(path, family, saved, kwargs, keep_fp8)
    if lazily:  # notes dropped MTP modules itself
        subfolder = kwargs.pop("subfolder", None)
        folder = os.path.join(path, subfolder) if subfolder else path
        loaded = _from_folder_lazily(
            load, folder, *model_args, keep_fp8=keep_fp8, allow_missing_weights=allow_missing, **kwargs
        )
    else:
        with expert_checkpoint_mapping(_builds_expert_list(kwargs, saved)):
            loaded = load(path, *model_args, **kwargs)
    model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info)
    saved_depth = (saved or {}).get("num_nextn_predict_layers")
    if not lazily and isinstance(saved_depth, int) and saved_depth > model.config.num_nextn_predict_layers:
        _note_dropped_mtp(saved_depth, model.config.num_nextn_predict_layers)
    quantization.after_bnb_load(model)
    return loaded


def save_model(model, save, save_directory, **kwargs):
    """`model.save_pretrained`; `save` is transformers' own, which writes the folder as remote code does."""
    try:
        hub = package_module("hub")
    except ImportError:  # running as remote code: transformers' own save copies the modeling files
        return save(save_directory, **kwargs)
    return hub.save_pretrained(model, save, save_directory, **kwargs)


def push_model(model, push, repo_id: str, **kwargs):
    """`model.push_to_hub`; `push` is transformers' own, used as remote code."""
    try:
        hub = package_module("hub")
    except ImportError:
        return push(repo_id, **kwargs)
    return hub.push_to_hub(model, repo_id, **kwargs)


def _from_folder_lazily(
    load, path, *model_args, config: MoeMtpConfig | None = None, keep_fp8=False, allow_missing_weights=False, **kwargs
):
    from transformers import GenerationConfig

    conversion, quantization = package_module("conversion"), package_module("quantization")
    if not os.path.isdir(path):
        raise OSError(f"{path}: released DeepSeek checkpoints load from a local folder; download it first.")
    saved = conversion.read_config_dict(path, mtp_from_weights=False)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if keep_fp8:
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = dtype = "auto"  # what is not FP8 keeps the checkpoint's dtype
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    dtype = dtype if isinstance(dtype, torch.dtype) else None  # "auto"/None: the checkpoint's own dtype
    config_fields = set(MoeMtpConfig.__dataclass_fields__) - {"dtype", "torch_dtype"}
    config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in config_fields}
    if config is None:
        config = MoeMtpConfig.from_dict({**saved, **config_kwargs})
    elif not isinstance(config, MoeMtpConfig):
        raise TypeError(f"config must be a MoeMtpConfig to load {path}, got {type(config)}")
    state_dict = package_module("conversion.lazy").lazy_state_dict(
        path, MoeMtpConfig.from_dict(saved), dtype=dtype, keep_fp8=keep_fp8, allow_missing=allow_missing_weights
    )
    try:
        saved_depth, kept_depth = saved.get("num_nextn_predict_layers", 0), config.num_nextn_predict_layers
        if saved_depth > kept_depth:
            dropped = tuple(f"model.mtp_layers.{k}." for k in range(kept_depth, saved_depth))
            for key in [k for k in state_dict if k.startswith(dropped)]:
                del state_dict[key]
            _note_dropped_mtp(saved_depth, kept_depth)
        if keep_fp8:
            if not state_dict.is_fp8:
                raise quantization.QuantizationSetupError(
                    f"dtype='fp8' keeps a checkpoint's block-FP8 weights, but {path} has none; load it without "
                    "dtype='fp8' (or with a bitsandbytes quantization_config), or make an FP8 copy first: "
                    f"python -m moe_mtp.conversion {path} DST --to deepseek --dtype fp8"
                )
            fmt = state_dict.fp8_format
            kwargs["quantization_config"] = quantization.BlockFp8Config(
                fmt.block, fmt.scale_fmt, quantization.fp8_modules(state_dict)
            )
        with expert_checkpoint_mapping(_builds_expert_list(kwargs, None, config)):
            loaded = load(None, *model_args, config=config, state_dict=state_dict, **kwargs)
    finally:
        state_dict.close()
    model = loaded[0] if kwargs.get("output_loading_info") else loaded
    # Loading from a state dict leaves the string 'None' here, which later lookups would take for a hub repo.
    model.config._name_or_path = model.name_or_path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return loaded
