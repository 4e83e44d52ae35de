"""Block-wise FP8 (e4m3) weights as in the DeepSeek-V3/R1/V3.1 releases.

A quantized linear weight `W` (rows x cols) is stored as `float8_e4m3fn` values `q` plus a float32 tensor
`W_scale_inv` with one scale per 128x128 block (`ceil(rows/128) x ceil(cols/128)`; the last row/column of blocks may
be partial). The real weight is `q.float() * scale` of its block. Quantization follows the release: per block
`scale = amax(|W|) / 448` (448 is the largest e4m3 value) and `q = e4m3(W / scale)`, so the largest value of every
block lands on +-448. With `scale_fmt="ue8m0"` (V3.1) the scale is rounded up to a power of two.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConversionError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FORMATS = (None, "ue8m0")
DEFAULT_BLOCK = (128, 128)


def release_quantization_config(block, scale_fmt: str | None = None) -> dict:
    """The `quantization_config` of a released block-FP8 checkpoint (DeepSeek-V3's `config.json`)."""
    config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}
    if scale_fmt:
        config["scale_fmt"] = scale_fmt
    return config


def _block(block) -> tuple[int, int]:
    rows, cols = (block, block) if isinstance(block, int) else block
    if int(rows) <= 0 or int(cols) <= 0:
        raise ConversionError(f"FP8 block size must be positive, got {block!r}")
    return int(rows), int(cols)


def scale_shape(shape, block=DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the `weight_scale_inv` of a 2-D weight: one scale per (possibly partial) block."""
    br, bc = _block(block)
    return math.ceil(shape[0] / br), math.ceil(shape[1] / bc)


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "the weight"


def check_scale(weight_shape, scale_inv: torch.Tensor | None, block=DEFAULT_BLOCK, *, name: str | None = None):
    """Raise ConversionError unless `scale_inv` is present and has one entry per block of `weight_shape`."""
    if scale_inv is None:
        raise ConversionError(f"{_label(name)} is FP8 but has no `weight_scale_inv` to dequantize it with")
    if len(weight_shape) != 2:
        raise ConversionError(f"{_label(name)} is FP8 but has {len(weight_shape)} dims; block FP8 weights are 2-D")
    expected = scale_shape(weight_shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ConversionError(
            f"{_label(name)} of shape {tuple(weight_shape)} needs a weight_scale_inv of shape {expected} "
            f"({_block(block)} blocks), got {tuple(scale_inv.shape)}"
        )


def scale_dtypes(scale_fmt: str | None) -> tuple[torch.dtype, ...]:
    """The dtypes a `weight_scale_inv` may have: float32 as released; also e8m0 for power-of-two (ue8m0) scales."""
    return (torch.float32, torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else (torch.float32,)


def check_scale_values(scale_inv: torch.Tensor, *, name: str | None = None, where: str | None = None):
    """Raise ConversionError unless every scale is finite and positive (a zero scale zeroes its block)."""
    scale = scale_inv.float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        value = scale.reshape(-1)[bad.reshape(-1)][0].item()
        place = f" in {where}" if where else ""
        raise ConversionError(
            f"{_label(name)}{place} has {int(bad.sum())} invalid FP8 scale(s) (e.g. {value}); scales must be "
            "finite and positive"
        )


CHUNK_ELEMENTS = 1 << 20  # dequantize ~1M values at a time on the CPU: the temporaries stay in cache and get reused


def _on_host(weight: torch.Tensor) -> bool:
    """Whether `weight` is a plain CPU tensor, which numpy can read (not a DTensor or a tensor under tracing)."""
    return weight.device.type == "cpu" and type(weight) in (torch.Tensor, torch.nn.Parameter)


def _rows_per_chunk(cols: int, block_rows: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(cols, 1) // block_rows) * block_rows


class _Workspace:
    """Scratch buffers reused across the chunks of one tensor (fresh allocations cost page faults)."""

    def __init__(self, n: int, device: torch.device, host: bool):
        self.bits = np.empty(n, np.int16) if host else None
        self.magnitude = np.empty(n, np.uint8) if host else None
        self.f32 = torch.empty(n, device=device)


def _prepare_scale(scale_inv: torch.Tensor, cols: int, block_cols: int, name, host: bool) -> tuple[torch.Tensor, bool]:
    """Per-(row block, column) scales, premultiplied by 2**8 for the host's fast path when that is exact. The scale
    values are checked on the host only: on an accelerator the check would wait for the device at every call."""
    scale = scale_inv.float()
    if not host:
        return scale.repeat_interleave(block_cols, dim=1)[:, :cols], False
    check_scale_values(scale_inv, name=name)
    fast = scale.numel() == 0 or scale.abs().max().item() < 2.0**100
    if fast:
        scale = scale * 256.0
    return scale.repeat_interleave(block_cols, dim=1)[:, :cols], fast


def _dequantize_rows(q: torch.Tensor, scale_cols: torch.Tensor, block_rows: int, fast: bool, out, ws: _Workspace):
    """Dequantize rows of `q` that start on a block boundary into `out` (same shape), `scale_cols` their scales."""
    rows, cols = q.shape
    n = q.numel()
    values = out if out.dtype == torch.float32 else ws.f32[:n].view(rows, cols)
    if fast:
        # An e4m3 byte `s eeee mmm` becomes the float16 `s 0eeee mmm0000000`: the exponent biases differ by 8, so
        # normal and subnormal values alike read as q * 2**-8, exactly (much faster than torch's own fp8 cast).
        q8 = q.view(torch.int8).numpy().reshape(-1)
        bits = ws.bits[:n]
        np.left_shift(q8, 7, dtype=np.int16, out=bits)  # sign-extended: the sign lands in bits 15 and 14
        np.bitwise_and(bits, np.int16(~0x4000), out=bits)
        values.copy_(torch.from_numpy(bits).view(torch.float16).view(rows, cols))
    else:
        values.copy_(q)
    full = rows // block_rows * block_rows
    if full:
        values[:full].view(-1, block_rows, cols).mul_(scale_cols[: full // block_rows, None, :])
    if full < rows:
        values[full:].mul_(scale_cols[-1])
    if values is not out:
        out.copy_(values)
    if fast:  # e4m3fn has no inf; bytes 0x7F/0xFF are NaN, which the bit trick does not produce
        magnitude = ws.magnitude[:n]
        np.bitwise_and(q8.view(np.uint8), 0x7F, out=magnitude)
        if n and magnitude.max() == 0x7F:
            out.view(-1)[torch.from_numpy(magnitude == 0x7F)] = float("nan")


def _dequantize_chunks(weight, scale_inv, block, name, destination):
    """Dequantizes consecutive row chunks into `destination(r0, r1)`, yielding each chunk: about 1M values each on the
    CPU, the whole weight in one go elsewhere (a few kernels, no wait for the device)."""
    br, bc = _block(block)
    rows, cols = weight.shape
    host = _on_host(weight)
    scale_cols, fast = _prepare_scale(scale_inv.to(weight.device), cols, bc, name, host)
    step = _rows_per_chunk(cols, br) if host else max(rows, 1)
    ws = _Workspace(min(rows, step) * cols, weight.device, host)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out = destination(r0, r1)
        _dequantize_rows(weight[r0:r1].contiguous(), scale_cols[r0 // br : -(-r1 // br)], br, fast, out, ws)
        yield out


def iter_dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block=DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
):
    """Like `dequantize_block_fp8`, but yields the result as consecutive row chunks (of about 1M values on the CPU)."""
    _check_fp8(weight, scale_inv, block, name)  # here, not in the generator: bad input fails at the call
    cols = weight.shape[1]

    def empty(r0, r1):
        return torch.empty(r1 - r0, cols, dtype=dtype, device=weight.device)

    return _dequantize_chunks(weight, scale_inv, block, name, empty)


def _check_fp8(weight, scale_inv, block, name):
    if weight.dtype != FP8_DTYPE:
        raise ConversionError(f"{_label(name)} has dtype {weight.dtype}, expected {FP8_DTYPE} to dequantize")
    check_scale(weight.shape, scale_inv, block, name=name)


def dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block=DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """Dequantize a block-FP8 weight: each value times its block's scale, computed in float32 and rounded once to
    `dtype` (bit-identical to `(weight.float() * expanded_scale).to(dtype)`), on the weight's device.

    The one FP8 dequantizer of the package: the converter and `quantization.Fp8BlockLinear` (at every call) use it.
    On the CPU it reads the FP8 bytes through numpy (faster than torch's cast) in chunks of about 1M values, and checks
    that the scales are finite and positive; elsewhere it runs a few torch ops. `scale_inv` may be float32 or
    float8_e8m0fnu (power-of-two scales). `name` only labels errors.
    """
    _check_fp8(weight, scale_inv, block, name)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for _ in _dequantize_chunks(weight, scale_inv, block, name, lambda r0, r1: out[r0:r1]):
        pass
    return out


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two (the V3.1 `ue8m0` scale format)."""
    mantissa, exponent = torch.frexp(scale)
    return torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))


def quantize_block_fp8(
    weight: torch.Tensor,
    block=DEFAULT_BLOCK,
    scale_fmt: str | None = None,
    *,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (float8_e4m3fn values, float32 weight_scale_inv) exactly as the release does.

    Per block: `scale = amax / 448` (an all-zero block gets scale 1), rounded up to a power of two when
    `scale_fmt == "ue8m0"`; values are `W / scale` in float32, cast to e4m3 (round to nearest even).
    Quantizing a dequantized release weight gives back its FP8 values exactly.
    """
    if scale_fmt not in SCALE_FORMATS:
        raise ConversionError(f"unknown FP8 scale_fmt {scale_fmt!r}; expected one of {SCALE_FORMATS}")
    if weight.dim() != 2:
        raise ConversionError(f"{_label(name)} has {weight.dim()} dims; block FP8 quantization needs a 2-D weight")
    br, bc = _block(block)
    rows, cols = weight.shape
    n_rb, n_cb = scale_shape(weight.shape, (br, bc))
    x = weight.to(torch.float32, copy=True)
    full = rows // br * br
    # amax over each block: first over the rows of a block, then over its (zero-padded) columns.
    # (max and -min rather than abs().amax(): no full-size temporary)
    row_amax = torch.zeros(n_rb, n_cb * bc)
    if full:
        blocks = x[:full].view(-1, br, cols)
        row_amax[: full // br, :cols] = torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1))
    if full < rows:
        row_amax[-1, :cols] = torch.maximum(x[full:].amax(dim=0), -x[full:].amin(dim=0))
    amax = row_amax.view(n_rb, n_cb, bc).amax(dim=-1)
    if not torch.isfinite(amax).all():
        raise ConversionError(f"{_label(name)} has non-finite values and cannot be quantized to FP8")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        scale = round_scale_ue8m0(scale)
    scale_cols = scale.repeat_interleave(bc, dim=1)[:, :cols]
    if full:
        x[:full].view(-1, br, cols).div_(scale_cols[: full // br, None, :])
    if full < rows:
        x[full:].div_(scale_cols[-1])
    x.clamp_(-FP8_MAX, FP8_MAX)  # W / scale can exceed 448 by a rounding error; e4m3fn has no inf
    return x.to(FP8_DTYPE), scale


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "check_scale",
    "check_scale_values",
    "dequantize_block_fp8",
    "iter_dequantize_block_fp8",
    "quantize_block_fp8",
    "round_scale_ue8m0",
    "scale_shape",
]
