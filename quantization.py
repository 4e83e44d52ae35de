"""Quantized loading of moe_mtp models: bitsandbytes 8-/4-bit checks and fixes, and block FP8 kept as FP8.

bitsandbytes does the quantizing (through transformers' quantizers); this module adds what an MoE needs around it:
clear errors before a long load fails, one warning instead of one per expert call, 4-bit layers kept on the portable
CPU kernel (the packed one crashes on small experts and changes results after a save), and a memory footprint that
counts the quantization state.

Native FP8 (`from_pretrained(..., dtype="fp8")`) keeps a block-FP8 checkpoint's linear weights as
`float8_e4m3fn` with their `weight_scale_inv` (one float32 scale per 128x128 block) in `Fp8BlockLinear` layers,
which dequantize on the fly inside the matmul with `conversion.dequantize_block_fp8`, the converter's own (torch ops
on a GPU, numpy's reading of the FP8 bytes on the CPU; no bitsandbytes, no Triton).
It plugs into `from_pretrained` as a transformers quantizer (`BlockFp8Config`), so device maps, tied weights and
`save_pretrained` work as usual; the saved folder carries the release's `quantization_config`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BitsAndBytesConfig, PretrainedConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .conversion.fp8 import dequantize_block_fp8

# bitsandbytes' CPU backend (int8 and 4-bit matmuls without CUDA) is official from 0.48.
BNB_MIN_CPU_VERSION = "0.48.0"
BNB_4BIT_TYPES = ("nf4", "fp4")
FP8_METHOD = "moe_mtp_fp8"
# bitsandbytes logs these from inside every matmul call: hundreds of lines per forward of an MoE.
PER_CALL_WARNINGS = ("MatMul8bitLt: inputs will be cast", "Input type into Linear4bit is torch.float16")
UNUSED_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class QuantizationSetupError(ValueError):
    """A quantization request that cannot work here; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# bitsandbytes


def as_bnb_config(quantization_config) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig in a `quantization_config` argument (object or dict), else None."""
    if isinstance(quantization_config, BitsAndBytesConfig):
        return quantization_config
    if isinstance(quantization_config, dict) and (
        quantization_config.get("load_in_8bit")
        or quantization_config.get("load_in_4bit")
        or quantization_config.get("quant_method") == "bitsandbytes"
    ):
        return BitsAndBytesConfig.from_dict(quantization_config)
    return None


def _bnb_version() -> str | None:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def _on_cpu(device_map) -> bool:
    if device_map is None or device_map == "auto":
        return not torch.cuda.is_available()
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(v) == "cpu" or (isinstance(v, torch.device) and v.type == "cpu") for v in values)


def check_bitsandbytes(bnb_config: BitsAndBytesConfig, config=None, device_map=None):
    """Fail early, naming the fix, when bitsandbytes is missing, too old for a CPU load, or cannot apply the config
    to this model (an unknown 4-bit type, a non-float compute dtype, a skip entry that names no module)."""
    from packaging import version

    bits = "8-bit" if bnb_config.load_in_8bit else "4-bit"
    installed = _bnb_version()
    if installed is None:
        raise ImportError(
            f"Loading in {bits} needs bitsandbytes, which is not installed: pip install 'bitsandbytes>="
            f"{BNB_MIN_CPU_VERSION}' (or load without quantization_config, or use dtype='fp8' for an FP8 checkpoint)."
        )
    if _on_cpu(device_map) and version.parse(installed) < version.parse(BNB_MIN_CPU_VERSION):
        raise ImportError(
            f"bitsandbytes {installed} has no CPU backend for {bits} layers; CPU loading needs bitsandbytes>="
            f"{BNB_MIN_CPU_VERSION}: pip install -U 'bitsandbytes>={BNB_MIN_CPU_VERSION}' (or load on a CUDA device)."
        )
    if bnb_config.load_in_4bit:
        if bnb_config.bnb_4bit_quant_type not in BNB_4BIT_TYPES:
            raise QuantizationSetupError(
                f"BitsAndBytesConfig.bnb_4bit_quant_type={bnb_config.bnb_4bit_quant_type!r}: bitsandbytes 4-bit "
                f"layers support {BNB_4BIT_TYPES}."
            )
        compute = bnb_config.bnb_4bit_compute_dtype
        if compute is not None and not (isinstance(compute, torch.dtype) and compute.is_floating_point):
            raise QuantizationSetupError(
                f"BitsAndBytesConfig.bnb_4bit_compute_dtype={compute!r} is not a floating dtype; use torch.bfloat16, "
                "torch.float16 or torch.float32."
            )
    skip = bnb_config.llm_int8_skip_modules or []
    if skip and isinstance(config, PretrainedConfig):
        from .conversion.spec import canonical_shapes

        # transformers matches entries against each linear layer's full name (see should_convert_module)
        modules = {name.rsplit(".", 1)[0] for name in canonical_shapes(config)} | {"lm_head"}
        for entry in skip:
            if all(should_convert_module(module, [entry]) for module in modules):
                raise QuantizationSetupError(
                    f"BitsAndBytesConfig.llm_int8_skip_modules entry {entry!r} matches no linear layer of this "
                    "model; an entry matches a layer's full name from its start, as a regex, or as a suffix, e.g. "
                    "'lm_head', 'model.layers.0', 'shared_experts.up_proj' or r'.*shared_experts'."
                )


def check_quantized_load(kwargs: dict, saved: dict | None) -> bool:
    """Checks the quantization a `from_pretrained(**kwargs)` call asks for, against the checkpoint's config.json
    (`saved`, None if unknown); returns whether `dtype="fp8"` asks to keep FP8 weights."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    keep_fp8 = isinstance(dtype, str) and dtype.lower() == "fp8"
    if keep_fp8:
        check_fp8_support()
        if kwargs.get("quantization_config") is not None:
            raise QuantizationSetupError(
                "dtype='fp8' keeps the checkpoint's FP8 weights; do not pass a quantization_config too."
            )
    bnb_config = as_bnb_config(kwargs.get("quantization_config"))
    if bnb_config is not None:
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig) and saved is not None:
            from .configuration import MoeMtpConfig
            from .conversion import moe_mtp_config_dict

            config = MoeMtpConfig.from_dict(moe_mtp_config_dict(saved))
        check_bitsandbytes(bnb_config, config, kwargs.get("device_map"))
    return keep_fp8


class _OncePerMessage(logging.Filter):
    """Lets each per-call bitsandbytes warning through the first time only."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(PER_CALL_WARNINGS):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_ONCE = _OncePerMessage()


def say_bnb_warnings_once():
    """bitsandbytes warns from inside every 8-bit matmul that fp32/bf16 inputs are cast to fp16 (its int8 kernels
    quantize from fp16); the cast is by design and harmless, so say it once rather than once per expert call."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.nn.modules"):
        target = logging.getLogger(name)
        if _ONCE not in target.filters:
            target.addFilter(_ONCE)


class _DropUnusedKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(UNUSED_KERNEL_WARNING)


def hide_unused_kernel_warning():
    """On AVX512-BF16 CPUs, importing bitsandbytes (which `transformers.Trainer` and PEFT do) tries to fetch a packed
    4-bit CPU kernel from the Hub and warns when it cannot. moe_mtp keeps every 4-bit layer on the portable kernel
    (`keep_4bit_cpu_layout`), so the missing kernel changes nothing and the warning only alarms. Called on import."""
    target = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropUnusedKernelWarning) for f in target.filters):
        target.addFilter(_DropUnusedKernelWarning())


def keep_4bit_cpu_layout(model: nn.Module):
    """bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU kernel at the first inference call. That kernel
    computes in bf16 whatever `bnb_4bit_compute_dtype` says, crashes on layers whose rows are not a multiple of 32
    or whose columns are not a multiple of the block size (small experts), and `save_pretrained` unpacks the weights
    again, so the same model would give other logits after a save. Every 4-bit layer keeps the portable kernel."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _quant_state_tensors(module: nn.Module):
    """Tensors bitsandbytes keeps beside a layer's parameters: 4-bit absmax/code (nested too), 8-bit row scales."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:
        yield from (t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t))
        state = getattr(state, "state2", None)
    scb = getattr(weight, "SCB", None)
    if torch.is_tensor(scb):
        yield scb


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes held by the model's tensors: parameters, buffers and the quantization state bitsandbytes keeps outside
    them (4-bit block scales, 8-bit row scales), each storage counted once (a tied head is the embedding)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def count(tensor: torch.Tensor):
        nonlocal total
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()

    for param in model.parameters():
        count(param)
    if return_buffers:
        for buffer in model.buffers():
            count(buffer)
    for module in model.modules():
        for tensor in _quant_state_tensors(module):
            count(tensor)
    return total


def after_bnb_load(model: nn.Module):
    """What a bitsandbytes-quantized model needs once loaded; nothing for other models."""
    if as_bnb_config(getattr(model.config, "quantization_config", None)) is None:
        return
    say_bnb_warnings_once()
    keep_4bit_cpu_layout(model)


# ---------------------------------------------------------------------------------------------------------------------
# Native block FP8


def check_fp8_support():
    if not hasattr(torch, "float8_e4m3fn"):
        raise QuantizationSetupError(
            f"dtype='fp8' keeps weights as torch.float8_e4m3fn, which torch {torch.__version__} does not have; "
            "install torch>=2.1, or load without dtype='fp8' to dequantize the FP8 weights to bf16."
        )


class Fp8BlockLinear(nn.Linear):
    """A linear layer whose weight stays block FP8 (1 byte per value) and is dequantized inside each call.

    An `nn.Linear` subclass, so PEFT wraps it with LoRA like any linear layer; the FP8 weight itself is frozen.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block=(128, 128)):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.block = tuple(block)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), False)
        rows, cols = -(-out_features // self.block[0]), -(-in_features // self.block[1])
        self.weight_scale_inv = nn.Parameter(torch.empty(rows, cols, dtype=torch.float32), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = dequantize_block_fp8(self.weight, self.weight_scale_inv, self.block, input.dtype)
        return F.linear(input, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 blocks={self.block}"


@register_quantization_config(FP8_METHOD)
class BlockFp8Config(QuantizationConfigMixin):
    """Keeps a block-FP8 checkpoint's FP8 linear weights as FP8 (`from_pretrained(..., dtype="fp8")` builds it).

    `modules` lists the linear layers stored as FP8 (found from the checkpoint); it is not saved. The saved config
    is the release's own `quantization_config` (`quant_method: fp8`), so the folder loads like a release.
    """

    def __init__(self, weight_block_size=(128, 128), scale_fmt: str | None = None, modules=(), **kwargs):
        self.quant_method = FP8_METHOD
        self.weight_block_size = list(weight_block_size)
        self.scale_fmt = scale_fmt
        self.modules = list(modules)

    def to_dict(self) -> dict:
        from .conversion.fp8 import release_quantization_config

        return release_quantization_config(self.weight_block_size, self.scale_fmt)

    def to_diff_dict(self) -> dict:
        return self.to_dict()


@register_quantizer(FP8_METHOD)
class BlockFp8Quantizer(HfQuantizer):
    """Swaps the checkpoint's FP8 linear layers for `Fp8BlockLinear` before the weights are loaded as stored."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        check_fp8_support()

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # the weights arrive already quantized

    def _process_model_before_weight_loading(self, model, **kwargs):
        block = tuple(self.quantization_config.weight_block_size)
        for name in self.quantization_config.modules:
            old = model.get_submodule(name)
            model.set_submodule(name, Fp8BlockLinear(old.in_features, old.out_features, old.bias is not None, block))

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    @property
    def quantized_element_size(self) -> float:
        return 1

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters train on top; the FP8 weights stay frozen


def fp8_modules(tensor_names) -> list[str]:
    """Linear layers stored as block FP8: those with a `weight_scale_inv` beside their weight."""
    return sorted({re.sub(r"\.weight_scale_inv$", "", k) for k in tensor_names if k.endswith(".weight_scale_inv")})


__all__ = [
    "BNB_MIN_CPU_VERSION",
    "BlockFp8Config",
    "Fp8BlockLinear",
    "QuantizationSetupError",
    "check_bitsandbytes",
    "memory_footprint",
]
