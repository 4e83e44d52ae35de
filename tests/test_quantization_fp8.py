"""Native block FP8: a released FP8 checkpoint loaded with dtype="fp8" keeps its linear weights as float8_e4m3fn with
their 128x128 block scales, computes what the dequantized model computes, trains LoRA adapters and saves the release's
own tensors back. Also: released folders load lazily (never as a whole state dict)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conversion_fixtures import load_folder, same_bits, tiny_config, write_moe_mtp, write_released
from transformers import Trainer, TrainingArguments

import moe_mtp.conversion as conversion
from moe_mtp import MoeMtpForCausalLM
from moe_mtp.conversion import convert, dequantize_block_fp8, quantize_block_fp8
from moe_mtp.modeling.modeling_moe_mtp import MoeMtpExperts
from moe_mtp.quantization import Fp8BlockLinear, QuantizationSetupError


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    config = tiny_config()
    folder, _ = write_released(tmp_path_factory.mktemp("fp8") / "release", config)
    return folder


@pytest.fixture(scope="module")
def models(released):
    return MoeMtpForCausalLM.from_pretrained(released), MoeMtpForCausalLM.from_pretrained(released, dtype="fp8")


def test_fp8_linear_multiplies_by_the_converters_dequantized_weight():
    weight = torch.randn(200, 330) * 0.05  # partial blocks both ways
    q, scale = quantize_block_fp8(weight)
    layer = Fp8BlockLinear(330, 200)
    layer.weight.data, layer.weight_scale_inv.data = q, scale
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 330, dtype=dtype)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, dequantize_block_fp8(q, scale, dtype=dtype)))


def test_linear_weights_stay_fp8(models):
    _, model = models
    for block in [*model.model.layers, *model.model.mtp_layers]:
        linears = [block.self_attn.q_a_proj, block.self_attn.kv_b_proj, block.self_attn.o_proj]
        if hasattr(block.mlp, "experts"):
            linears += [p for e in [*block.mlp.experts, block.mlp.shared_experts] for p in e.children()]
            assert block.mlp.gate.weight.dtype == torch.float32
        else:
            linears += [block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj]
        for linear in linears:
            if isinstance(linear, torch.nn.Linear):
                assert isinstance(linear, Fp8BlockLinear) and linear.weight.dtype == torch.float8_e4m3fn
                assert linear.weight_scale_inv.shape == (
                    math.ceil(linear.out_features / 128),
                    math.ceil(linear.in_features / 128),
                )
    assert type(model.model.mtp_layers[0].eh_proj) is torch.nn.Linear  # bf16 in the release
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    experts = model.model.layers[1].mlp.experts
    assert all(isinstance(e.down_proj, Fp8BlockLinear) for e in experts)


def per_expert_path(model, monkeypatch):
    """FP8 experts run one GEMM per expert; dequantized ones would take the grouped path, which sums in another
    order. With the same path on both sides, the only difference left is where the weights are dequantized."""
    for module in model.modules():
        if isinstance(module, MoeMtpExperts):
            monkeypatch.setattr(module, "use_grouped_mm", False)


def test_forward_and_generation_match_the_dequantized_model(models, monkeypatch):
    dequantized, model = models
    per_expert_path(dequantized, monkeypatch)
    assert model.get_memory_footprint() < 0.75 * dequantized.get_memory_footprint()
    ids = torch.randint(3, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dequantized(ids).logits, rtol=0, atol=0)
    for m in models:
        m.generation_config.eos_token_id = None
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 15)
    assert torch.equal(out, dequantized.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_save_writes_the_released_fp8_tensors_back(models, released, tmp_path, monkeypatch):
    _, model = models
    model.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    release_config = json.loads((released / "config.json").read_text())
    assert saved_config["quantization_config"] == release_config["quantization_config"]
    # back to the released layout, tensor for tensor, bit for bit
    convert(tmp_path / "saved", tmp_path / "back", dst_format="deepseek", progress=False)
    ours, theirs = load_folder(tmp_path / "back"), load_folder(released)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        if key.endswith("mlp.gate.weight"):  # the model keeps its router in fp32: the same values, upcast
            assert torch.equal(ours[key], theirs[key].float()), key
        else:
            assert same_bits(ours[key], theirs[key]), key
    assert sum(t.dtype == torch.float8_e4m3fn for t in theirs.values()) > 50
    # and the saved folder loads both ways
    ids = torch.randint(3, 256, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
        for kwargs in ({}, {"dtype": "fp8"}):
            again = MoeMtpForCausalLM.from_pretrained(tmp_path / "saved", **kwargs)
            experts = again.model.layers[1].mlp.experts  # per-expert FP8 modules, or dequantized 3-D ones
            assert isinstance(experts, MoeMtpExperts) != bool(kwargs)
            assert not kwargs or isinstance(experts[0].up_proj, Fp8BlockLinear)
            per_expert_path(again, monkeypatch)
            torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)


def test_lora_trainer_step_on_fp8_changes_only_the_adapters(released, tmp_path):
    peft = pytest.importorskip("peft")
    model = MoeMtpForCausalLM.from_pretrained(released, dtype="fp8")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = ["q_a_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ids = torch.randint(3, 256, (8, 12))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in ids]
    assert math.isfinite(Trainer(model=model, args=args, train_dataset=data).train().training_loss)
    after = model.state_dict()
    # the balancing bias (a buffer) moves after every optimizer step by design, under LoRA too
    changed = {n for n in before if not torch.equal(before[n], after[n]) and not n.endswith("e_score_correction_bias")}
    assert changed and all("lora_" in n for n in changed), sorted(n for n in changed if "lora_" not in n)[:5]
    assert any(".experts." in n for n in changed) and any("shared_experts" in n for n in changed)


def test_fp8_needs_an_fp8_checkpoint(tmp_path):
    folder, _ = write_moe_mtp(tmp_path / "bf16", tiny_config())
    with pytest.raises(QuantizationSetupError, match=r"dtype='fp8' keeps a checkpoint's block-FP8 weights, but"):
        MoeMtpForCausalLM.from_pretrained(folder, dtype="fp8")


def test_released_folders_load_lazily(released, monkeypatch):
    """Loading reads tensor by tensor through the lazy state dict, never the whole-folder reader."""

    def whole_folder(*args, **kwargs):
        raise AssertionError("read the whole folder into memory")

    monkeypatch.setattr(conversion, "load_state_dict_from_folder", whole_folder)
    reads = []
    original = conversion.lazy.LazyTensor.__getitem__

    def counting(self, index):
        reads.append(self.output.entry.key)
        return original(self, index)

    monkeypatch.setattr(conversion.lazy.LazyTensor, "__getitem__", counting)
    model = MoeMtpForCausalLM.from_pretrained(released)
    # each tensor read once: the model's, with the routed experts counted per expert as the folder stores them
    on_disk = conversion.convert_state_dict(model.state_dict(), model.config, "moe_mtp_model", "moe_mtp")
    assert len(reads) == len(set(reads)) == len(on_disk) + model.config.tie_word_embeddings
