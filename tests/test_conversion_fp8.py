"""Block FP8 (e4m3, 128x128 scales) dequantization and quantization, as in the DeepSeek-V3/R1/V3.1 releases."""

from __future__ import annotations

import pytest
import torch

from moe_mtp.conversion import ConversionError, dequantize_block_fp8, iter_dequantize_block_fp8, quantize_block_fp8
from moe_mtp.conversion import fp8 as fp8_module
from moe_mtp.conversion.fp8 import round_scale_ue8m0, scale_shape

SHAPES = [(200, 192), (256, 384), (130, 129), (1, 1), (128, 128), (300, 64), (576, 200)]


def expand(scale, shape, block=128):
    """The per-element scale, written the obvious way."""
    rows, cols = shape
    return scale.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def all_fp8_values(shape, seed=0):
    """Random FP8 bytes that include every one of the 256 codes (NaN, subnormals, +-0, +-448)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    flat = raw.view(-1)
    flat[: min(256, flat.numel())] = torch.arange(min(256, flat.numel()), dtype=torch.int32).to(torch.uint8)
    return raw.view(torch.float8_e4m3fn)


def equal_with_nan(a, b):
    return (
        a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("host", [True, False], ids=["cpu-numpy", "torch-ops"])
def test_dequantize_is_bit_exact_with_fp32_math(shape, dtype, host, monkeypatch):
    # The CPU reads the FP8 bytes through numpy; other devices (and tensor subclasses) take the plain torch ops, which
    # `quantization.Fp8BlockLinear` runs on a GPU at every call: both give the same bits.
    monkeypatch.setattr(fp8_module, "_on_host", lambda weight: host)
    q = all_fp8_values(shape)
    scale = torch.rand(scale_shape(shape)) * 1e-2 + 1e-5  # partial edge blocks get their own scale
    by_hand = (q.float() * expand(scale, shape)).to(dtype)  # fp32 product, rounded once
    assert equal_with_nan(dequantize_block_fp8(q, scale, dtype=dtype), by_hand)
    chunks = list(iter_dequantize_block_fp8(q, scale, dtype=dtype))
    assert equal_with_nan(torch.cat(chunks), by_hand)


def test_dequantize_large_tensor_spans_several_chunks():
    shape = (1200, 1000)  # > 1M values: several internal chunks, last one partial
    q = all_fp8_values(shape, seed=3)
    scale = torch.rand(scale_shape(shape)) + 0.5
    chunks = list(iter_dequantize_block_fp8(q, scale, dtype=torch.bfloat16))
    assert len(chunks) > 1 and all(c.shape[0] % 128 == 0 for c in chunks[:-1])
    assert equal_with_nan(torch.cat(chunks), (q.float() * expand(scale, shape)).bfloat16())


def test_dequantize_stays_on_the_weights_device():
    q, scale = quantize_block_fp8(torch.randn(200, 330))
    out = dequantize_block_fp8(q.to("meta"), scale, dtype=torch.bfloat16)  # the torch-ops path, no value read
    assert out.device.type == "meta" and out.shape == (200, 330) and out.dtype == torch.bfloat16


def test_dequantize_huge_scales_take_the_exact_slow_path():
    q = all_fp8_values((130, 130))
    scale = torch.full(scale_shape((130, 130)), 2.0**110)
    assert equal_with_nan(dequantize_block_fp8(q, scale, dtype=torch.float32), q.float() * expand(scale, (130, 130)))


def test_dequantize_accepts_e8m0_scales():
    q = all_fp8_values((200, 192))
    scale = 2.0 ** torch.randint(-20, 0, scale_shape((200, 192))).float()
    as_e8m0 = scale.to(torch.float8_e8m0fnu)
    assert torch.equal(as_e8m0.float(), scale)
    assert equal_with_nan(dequantize_block_fp8(q, as_e8m0), dequantize_block_fp8(q, scale))


def test_quantize_follows_the_release_recipe():
    w = torch.randn(200, 192) * torch.rand(200, 1)
    q, scale = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            s = block.abs().max() / 448.0
            assert scale[i, j] == s
            expected = (block / s).to(torch.float8_e4m3fn)
            got = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
            assert got.float().abs().max() == 448.0  # the largest value of every block lands on 448


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_quantize_of_dequantize_gives_back_the_fp8_values(shape, scale_fmt):
    w = torch.randn(shape) * (torch.rand(shape[0], 1) * 10) ** 2
    q, scale = quantize_block_fp8(w, scale_fmt=scale_fmt)
    q2, scale2 = quantize_block_fp8(dequantize_block_fp8(q, scale, dtype=torch.float32), scale_fmt=scale_fmt)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(scale2, scale, rtol=2.0**-23, atol=0)  # equal up to float32 rounding


def test_ue8m0_scales_are_powers_of_two_rounded_up():
    w = torch.randn(300, 260) * 3
    q, scale = quantize_block_fp8(w, scale_fmt="ue8m0")
    plain = quantize_block_fp8(w)[1]
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())
    assert (scale >= plain).all() and (scale < 2 * plain).all()
    assert torch.equal(round_scale_ue8m0(torch.tensor([0.25, 0.3, 1.0, 3.0])), torch.tensor([0.25, 0.5, 1.0, 4.0]))
    assert (q.float().abs().amax() <= 448).all()


def test_zero_blocks_get_unit_scale():
    w = torch.zeros(130, 140)
    w[:128, :128] = torch.randn(128, 128)
    q, scale = quantize_block_fp8(w)
    assert scale[1, 1] == 1.0 and scale[0, 1] == 1.0 and scale[0, 0] != 1.0
    assert torch.equal(dequantize_block_fp8(q, scale, dtype=torch.float32)[128:], torch.zeros(2, 140))


def test_quantization_error_is_within_fp8_precision():
    w = torch.randn(256, 256, dtype=torch.float64).float()
    q, scale = quantize_block_fp8(w)
    back = dequantize_block_fp8(q, scale, dtype=torch.float32)
    bound = w.abs() * 2.0**-4 + expand(scale, w.shape) * 2.0**-10  # half an e4m3 ulp, subnormals included
    assert ((back - w).abs() <= bound).all()


def test_missing_or_misshapen_scale_names_the_tensor():
    q = torch.zeros(200, 192).to(torch.float8_e4m3fn)
    with pytest.raises(ConversionError, match=r"'model.layers.1.mlp.up_proj.weight'.*no `weight_scale_inv`"):
        dequantize_block_fp8(q, None, name="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConversionError, match=r"'w'.*\(200, 192\).*\(2, 2\).*got \(1, 2\)"):
        dequantize_block_fp8(q, torch.ones(1, 2), name="w")
    with pytest.raises(ConversionError, match="expected torch.float8_e4m3fn"):
        dequantize_block_fp8(torch.zeros(4, 4), torch.ones(1, 1), name="w")
    with pytest.raises(ConversionError, match="non-finite"):
        quantize_block_fp8(torch.full((4, 4), float("inf")), name="w")
    with pytest.raises(ConversionError, match="scale_fmt"):
        quantize_block_fp8(torch.ones(4, 4), scale_fmt="e5m2")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_scales_and_block_sizes_are_named_errors(bad):
    q = torch.zeros(200, 192).to(torch.float8_e4m3fn)
    scale = torch.ones(2, 2)
    scale[1, 0] = bad
    with pytest.raises(ConversionError, match=r"'w'.*1 invalid FP8 scale.*finite and positive"):
        dequantize_block_fp8(q, scale, name="w")
    with pytest.raises(ConversionError, match="block size must be positive"):
        dequantize_block_fp8(q, torch.ones(2, 2), block=(0, 0), name="w")
