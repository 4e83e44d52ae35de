"""Lazy state dicts of checkpoint folders, for `from_pretrained`: every tensor is read (and converted) when loaded.

transformers' loader takes a state dict whose values it materializes one parameter at a time (`value[...]`), and
when it quantizes on the fly (bitsandbytes) it quantizes each one before reading the next. Handing it a
`LazyStateDict` of a folder therefore never holds more than one full-precision tensor: the released layout
(MTP at `model.layers.{N+k}`, FP8 weights, transformers' stacked experts) is mapped to moe_mtp names by the
conversion plan, and each tensor is read with `pread` into memory of our own, so no memory map of the whole
checkpoint stays resident either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import replace

import torch

from .convert import open_source
from .layouts import Output, plan_outputs, resolve_dtype
from .rules import MOE_MTP
from .spec import EXPERT_RE, canonical_shapes

# The moe_mtp layout, but keeping what arrives as block FP8 as FP8 (weight plus `weight_scale_inv`).
MOE_MTP_KEEP_FP8 = replace(MOE_MTP, fp8=r".+")


# glibc keeps freed heap memory, and quantizing while loading frees a full-precision tensor after each parameter:
# without handing that memory back, the resident set grows to a few times the quantized model (measured 3x for int8;
# trimming every MiB read keeps the peak within a few percent of the final RSS).
TRIM_EVERY_BYTES = 1 << 20


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


class _HeapTrimmer:
    """Calls glibc's malloc_trim after every TRIM_EVERY_BYTES read, returning freed pages to the system."""

    def __init__(self):
        self.trim = _malloc_trim()
        self.pending = 0

    def add(self, nbytes: int):
        self.pending += nbytes
        if self.trim is not None and self.pending >= TRIM_EVERY_BYTES:
            self.trim(0)
            self.pending = 0


class LazyTensor:
    """One planned tensor: dtype and shape without reading; `[...]` reads and converts it."""

    def __init__(self, output: Output, trimmer: _HeapTrimmer | None = None):
        self.output = output
        self.trimmer = trimmer

    @property
    def dtype(self) -> torch.dtype:
        return self.output.entry.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.output.entry.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, index) -> torch.Tensor:
        if self.trimmer is not None:  # before reading: the previous tensor's full-precision copy is freed by now
            self.trimmer.add(self.output.entry.nbytes)
        chunks = list(self.output.produce())
        shape = self.output.entry.shape
        tensor = (
            chunks[0].reshape(shape) if len(chunks) == 1 else torch.cat([c.reshape(-1) for c in chunks]).view(shape)
        )
        return tensor[index]


class FreshExpertTensor:
    """A routed expert weight missing from a folder loaded with `allow_missing`: newly initialized as the model
    initializes experts. The model stacks each layer's experts into one parameter, so without it one missing
    expert would leave the whole layer's experts uninitialized instead of just that one."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, std: float):
        self.shape, self.dtype, self.std = torch.Size(shape), dtype, std

    def is_floating_point(self) -> bool:
        return True

    def __getitem__(self, index) -> torch.Tensor:
        return torch.randn(self.shape).mul_(self.std).to(self.dtype)[index]


class LazyStateDict(dict):
    """moe_mtp names -> LazyTensor for a folder; `close()` releases its file descriptors."""

    def __init__(self, outputs, store, config, fp8_format, is_fp8: bool):
        trimmer = _HeapTrimmer()
        super().__init__((o.entry.key, LazyTensor(o, trimmer)) for o in outputs)
        self.store = store
        self.config = config  # the effective MoeMtpConfig (no MTP modules when the folder holds none)
        self.fp8_format = fp8_format
        self.is_fp8 = is_fp8

    def close(self):
        self.store.close()


def lazy_state_dict(
    folder, config=None, dtype=None, keep_fp8: bool = False, allow_missing: bool = False
) -> LazyStateDict:
    """A lazy state dict in moe_mtp names of a deepseek / transformers / moe_mtp folder, checked against `config`.

    FP8 weights are dequantized when read (to `dtype`, else to the folder's unquantized dtype), or with `keep_fp8`
    kept as float8_e4m3fn beside their `weight_scale_inv`. `dtype` casts the other floating tensors, except the
    float32 router bias. Nothing is read until a value is indexed. Missing tensors are an error unless
    `allow_missing` (they are then absent, and the model initializes them).
    """
    _, source = open_source(folder, config=config, allow_missing=allow_missing)
    try:
        dtype = resolve_dtype(dtype)
        layout = MOE_MTP_KEEP_FP8 if keep_fp8 else MOE_MTP
        plan = plan_outputs(source, layout, None if keep_fp8 else dtype, allow_raw=False)
    except BaseException:
        source.store.close()
        raise
    state = LazyStateDict(plan.outputs, source.store, source.config, source.fp8, source.is_fp8)
    if allow_missing:
        _fill_missing_experts(state, source.config)
    return state


def _fill_missing_experts(state: LazyStateDict, config) -> None:
    """Initializes the missing experts of layers that have some experts (see FreshExpertTensor)."""
    present = {EXPERT_RE.split(key)[0] for key in state if EXPERT_RE.search(key)}
    for key, shape in canonical_shapes(config).items():
        if key not in state and EXPERT_RE.search(key) and EXPERT_RE.split(key)[0] in present:
            sibling = next(v for k, v in state.items() if EXPERT_RE.split(k)[0] == EXPERT_RE.split(key)[0])
            dtype = sibling.dtype if sibling.dtype.is_floating_point else torch.float32
            state[key] = FreshExpertTensor(shape, dtype, getattr(config, "initializer_range", 0.02))
