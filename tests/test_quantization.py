"""bitsandbytes 8-/4-bit loading on CPU: what gets quantized, forward and generation, save/reload, the memory
footprint, QLoRA with Trainer, one warning instead of one per call, and the errors for what cannot work."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from transformers import BitsAndBytesConfig, Trainer, TrainingArguments

import moe_mtp.quantization as quantization
from moe_mtp import MoeMtpForCausalLM

bnb = pytest.importorskip("bitsandbytes")

MODES = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    # FP4 with double quantization and a bf16 compute dtype
    "fp4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(num_nextn_predict_layers=1, hidden_size=128, moe_intermediate_size=64)
    model = MoeMtpForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("bnb") / "model"
    model.save_pretrained(path)
    return path, model


def load(path, mode, **kwargs):
    return MoeMtpForCausalLM.from_pretrained(path, quantization_config=MODES[mode], **kwargs)


def quantized_class(mode):
    return bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit


@pytest.mark.parametrize("mode", MODES)
def test_every_linear_but_the_head_is_quantized(folder, mode):
    path, _ = folder
    model = load(path, mode)
    cls = quantized_class(mode)
    config = model.config
    for block in [*model.model.layers, *model.model.mtp_layers]:
        attention = block.self_attn
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert isinstance(getattr(attention, proj), cls), proj
        mlps = [block.mlp]
        if hasattr(block.mlp, "experts"):
            assert len(block.mlp.experts) == config.n_routed_experts
            mlps = [*block.mlp.experts, block.mlp.shared_experts]
            assert block.mlp.gate.weight.dtype == torch.float32  # the router stays in fp32
        for mlp in mlps:
            for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                assert isinstance(proj, cls)
    assert isinstance(model.model.mtp_layers[0].eh_proj, cls)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    for name, param in model.named_parameters():
        if "norm" in name:
            assert param.dtype.is_floating_point, name
    if mode == "fp4":
        state = model.model.layers[1].mlp.experts[0].up_proj.weight.quant_state
        assert state.quant_type == "fp4" and state.nested  # double quantization
        assert model.model.layers[1].mlp.experts[0].up_proj.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_forward_and_greedy_generation(folder, mode):
    path, reference = folder
    model = load(path, mode)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits.float()
        expected = reference(ids).logits
    assert torch.isfinite(logits).all()
    # quantized random weights still track the full-precision logits closely
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.9
    model.generation_config.eos_token_id = None  # five tokens whatever comes out
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)
    with torch.no_grad():  # greedy: each generated token is the argmax after its prefix
        step = model(out[:, :-1]).logits[0, 11:].argmax(-1)
    assert torch.equal(step, out[0, 12:])


def test_experts_of_a_layer_are_each_quantized_separately(folder):
    path, _ = folder
    model = load(path, "int8")
    weights = [e.down_proj.weight for e in model.model.layers[1].mlp.experts]
    assert all(w.dtype == torch.int8 for w in weights)
    assert len({w.data_ptr() for w in weights}) == len(weights)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_save_and_reload_gives_the_same_weights(folder, mode, tmp_path):
    path, _ = folder
    model = load(path, mode)
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    again = MoeMtpForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(again.model.layers[1].mlp.experts[3].gate_proj, quantized_class(mode))
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, before)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_memory_footprint_counts_the_quantization_state(folder, mode, tmp_path):
    path, reference = folder
    model = load(path, mode)
    footprint = model.get_memory_footprint()
    params_and_buffers = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert footprint > params_and_buffers  # the block / row scales live outside the parameters
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        saved = sum(f.get_tensor(k).nbytes for k in f.keys())
    # what is saved is what is held (4-bit layers also save a copy of the shared 16-value code book each)
    assert 0.93 * saved <= footprint <= saved * 1.001
    assert footprint < (0.45 if mode == "int8" else 0.4) * reference.get_memory_footprint()


def test_bitsandbytes_cast_warning_is_said_once(folder, caplog):
    path, _ = folder
    model = load(path, "int8")
    ids = torch.randint(3, 128, (2, 8))
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            model(ids)
            model(ids)
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_trainer_step_changes_only_the_adapters(folder, mode, tmp_path):
    peft = pytest.importorskip("peft")
    path, _ = folder
    model = load(path, mode)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = ["q_a_proj", "q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    names = [n for n, _ in model.named_modules()]
    for wrapped in ("mlp.experts.5.up_proj.lora_A", "mlp.shared_experts.down_proj.lora_B", "self_attn.o_proj.lora_A"):
        assert any(n.endswith(wrapped) for n in names), wrapped
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ids = torch.randint(3, 128, (16, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", lr_scheduler_type="constant",
    )  # fmt: skip
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert math.isfinite(result.training_loss)
    after = model.state_dict()
    # the balancing bias (a buffer) moves after every optimizer step by design, under LoRA too
    changed = {n for n in before if not torch.equal(before[n], after[n]) and not n.endswith("e_score_correction_bias")}
    assert changed and all("lora_" in n for n in changed), sorted(n for n in changed if "lora_" not in n)[:5]
    assert any(".experts." in n for n in changed) and any("shared_experts" in n for n in changed)


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_bitsandbytes_is_named(folder, monkeypatch):
    monkeypatch.setattr(quantization, "_bnb_version", lambda: None)
    with pytest.raises(ImportError, match=r"needs bitsandbytes, which is not installed: pip install"):
        load(folder[0], "int8")


def test_bitsandbytes_too_old_for_cpu(folder, monkeypatch):
    monkeypatch.setattr(quantization, "_bnb_version", lambda: "0.45.5")
    with pytest.raises(ImportError, match=r"bitsandbytes 0\.45\.5 has no CPU backend .*>=0\.48\.0"):
        load(folder[0], "nf4", device_map="cpu")


def test_fp8_without_float8_in_torch(folder, monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(quantization.QuantizationSetupError, match=r"float8_e4m3fn, which torch .* does not have"):
        MoeMtpForCausalLM.from_pretrained(folder[0], dtype="fp8")


@pytest.mark.parametrize(
    "config,message",
    [
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4"), r"bnb_4bit_quant_type='int4'"),
        # transformers matches whole names, so a bare module name in the middle matches nothing
        (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["shared_experts"]),
            r"'shared_experts' matches no",
        ),
    ],
)
def test_config_bitsandbytes_cannot_apply(folder, config, message):
    with pytest.raises(quantization.QuantizationSetupError, match=message):
        MoeMtpForCausalLM.from_pretrained(folder[0], quantization_config=config)


def test_skip_modules_follow_the_usual_convention(folder):
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", r".*shared_experts"])
    model = MoeMtpForCausalLM.from_pretrained(folder[0], quantization_config=config)
    assert type(model.model.layers[1].mlp.shared_experts.up_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].mlp.experts[0].up_proj, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("layout", ["deepseek_fp8", "transformers"])
def test_released_and_transformers_folders_quantize_while_loading(folder, layout, tmp_path):
    """Every folder type goes through the lazy loader: the released FP8 layout (MTP at layer N+k) and transformers'
    stacked experts alike end up with every routed expert quantized."""
    from moe_mtp.conversion import convert

    path, reference = folder
    options = {"dst_format": "deepseek", "dtype": "fp8"} if layout == "deepseek_fp8" else {"dst_format": "transformers"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' layout drops the MTP module, with a warning
        convert(path, tmp_path / layout, progress=False, **options)
    model = load(tmp_path / layout, "int8")
    experts = [e for block in [*model.model.layers, *model.model.mtp_layers] if hasattr(block.mlp, "experts")
               for e in block.mlp.experts]  # fmt: skip
    assert len(experts) == reference.config.n_routed_experts * (2 if layout == "transformers" else 3)
    assert all(isinstance(p, bnb.nn.Linear8bitLt) for e in experts for p in (e.gate_proj, e.up_proj, e.down_proj))
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(ids).logits.flatten(), reference(ids).logits.flatten(), 0)
    assert cosine > 0.9


def test_the_unused_cpu_4bit_kernel_warning_is_hidden_and_nothing_else(caplog):
    # bitsandbytes logs it on import when it cannot fetch a Hub kernel that moe_mtp never uses (see
    # keep_4bit_cpu_layout); other bitsandbytes warnings still get through.
    import subprocess
    import sys

    source = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=source.name):
        source.warning("%s: No module named 'kernels'. Please install kernels", quantization.UNUSED_KERNEL_WARNING)
        source.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]

    code = "import moe_mtp, transformers.trainer_utils, bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and quantization.UNUSED_KERNEL_WARNING not in result.stderr, result.stderr
