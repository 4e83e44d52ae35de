"""The routed experts' two paths (modeling/modeling_moe_mtp.py): grouped GEMMs over packed weights, and one GEMM per
expert for bitsandbytes- or PEFT-wrapped experts. Same numbers, and the fast path really runs after the usual
operations."""

import copy

import pytest
import torch
from conftest import randomize_router_bias, tiny_config
from safetensors import safe_open

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.modeling.modeling_moe_mtp import MoeMtpExperts

MOE_LAYERS = 2 + 1  # tiny_config: layers 1 and 2 of 3 are MoE, plus one MTP module


def make_model(**overrides) -> MoeMtpForCausalLM:
    model = MoeMtpForCausalLM(tiny_config("v3", num_nextn_predict_layers=1, **overrides))
    randomize_router_bias(model)
    return model


def batch(batch_size=2, seq_len=12):
    return torch.randint(3, 128, (batch_size, seq_len))


def logits(model, input_ids):
    """A forward that runs every MoE layer, the MTP module's included."""
    return model(input_ids=input_ids, output_mtp_logits=True).logits


def expert_sets(model) -> list[MoeMtpExperts]:
    return [m for m in model.modules() if isinstance(m, MoeMtpExperts)]


def paths(model) -> set:
    return {experts.last_path for experts in expert_sets(model)}


def assert_grouped_and_packed(model):
    """The last forward took the grouped path on packed weights in every MoE layer, MTP modules included."""
    sets = expert_sets(model)
    assert len(sets) == MOE_LAYERS
    assert paths(model) == {"grouped"}
    assert all(experts.is_packed() for experts in sets)


# ---------------------------------------------------------------------------------------------------------- parity


def run_layer(moe, hidden_states, per_expert: bool):
    """Forward + backward of one MoE layer; returns the output and the gradients of the input and every parameter
    (an expert without tokens gets no gradient on the per-expert path and zeros on the grouped one: both count as 0)."""
    moe = copy.deepcopy(moe)
    if per_expert:
        moe.dispatch = moe.per_expert_dispatch
    hidden_states = hidden_states.clone().requires_grad_()
    out = moe(hidden_states)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in moe.named_parameters()}
    return moe.experts.last_path, out, hidden_states.grad, grads


@pytest.mark.parametrize("kind", ["v3", "v2_lite", "group_limited_greedy"])
def test_grouped_path_matches_per_expert_path_in_outputs_and_every_gradient(kind):
    model = MoeMtpForCausalLM(tiny_config(kind))
    randomize_router_bias(model)
    moe = model.model.layers[1].mlp
    hidden_states = torch.randn(1, 3, 64)  # 6 routed slots over 8 experts: some experts get no tokens
    _, _, chosen = moe.gate(hidden_states)
    assert chosen.unique().numel() < moe.gate.num_experts

    grouped_path, out, grad_in, grads = run_layer(moe, hidden_states, per_expert=False)
    loop_path, want_out, want_grad_in, want_grads = run_layer(moe, hidden_states, per_expert=True)
    assert (grouped_path, loop_path) == ("grouped", "per_expert")
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_in, want_grad_in, atol=1e-5, rtol=0)
    assert grads.keys() == want_grads.keys()
    assert any(k.startswith("gate.") for k in grads)  # the router's gradient flows through the gate weights
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=0, msg=name)
    unused = set(range(moe.gate.num_experts)) - set(chosen.flatten().tolist())
    for expert in unused:
        assert grads[f"experts.{expert}.down_proj.weight"].abs().max() == 0


def test_decode_sized_steps_take_the_sliced_path_with_the_same_numbers():
    """Without autograd and with at most a quarter as many slots as experts (decoding), CPU runs each slot on its
    expert's slices of the packed buffers; outputs equal the grouped and per-expert paths'."""
    moe = make_model().model.layers[1].mlp  # 8 experts, top-2: one token is 2 slots
    num_tokens = 1
    hidden_states = torch.randn(1, num_tokens, 64)
    with torch.no_grad():
        out = moe(hidden_states)
        assert moe.experts.last_path == "sliced"
        _, weights, chosen = moe.gate(hidden_states.view(-1, 64))
        grouped = moe.grouped_dispatch(hidden_states.view(-1, 64), chosen, weights, *moe.experts.grouped_weights())
        per_expert = moe.per_expert_dispatch(hidden_states.view(-1, 64), chosen, weights)
    routed = out - moe.shared_experts(hidden_states)
    torch.testing.assert_close(routed.view(-1, 64), grouped, atol=1e-5, rtol=0)
    torch.testing.assert_close(routed.view(-1, 64), per_expert, atol=1e-5, rtol=0)
    with torch.no_grad():  # more slots than a quarter of the experts: back to the grouped GEMMs
        moe(torch.randn(1, 2, 64))
    assert moe.experts.last_path == "grouped"
    moe(hidden_states)  # with autograd: grouped, so every expert weight gets its gradient
    assert moe.experts.last_path == "grouped"


def test_expert_weights_are_views_into_one_buffer_per_projection():
    experts = make_model().model.layers[1].mlp.experts
    gate_up, down = experts.packed["gate_up"], experts.packed["down"]
    assert gate_up.shape == (8, 2 * 32, 64) and down.shape == (8, 64, 32)
    assert experts[3].gate_proj.weight.data_ptr() == gate_up[3, :32].data_ptr()
    assert experts[3].up_proj.weight.data_ptr() == gate_up[3, 32:].data_ptr()
    assert experts[7].down_proj.weight.data_ptr() == down[7].data_ptr()
    with torch.no_grad():  # an in-place update (what optimizers do) is seen by the grouped GEMM
        experts[2].up_proj.weight.add_(1.0)
    assert torch.equal(gate_up[2, 32:], experts[2].up_proj.weight)


def test_packed_experts_are_not_tied(tmp_path):
    """Views into one buffer are not weight tying: accelerate's tie finder sees only the declared head tie, and a
    save writes each expert as its own tensor with its own values."""
    from accelerate.utils import find_tied_parameters

    model = make_model()
    assert find_tied_parameters(model) == []
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for expert in range(8):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.1.mlp.experts.{expert}.{projection}.weight"
                saved = f.get_tensor(key)
                assert torch.equal(saved, getattr(model.model.layers[1].mlp.experts[expert], projection).weight), key


# ------------------------------------------------------------------------------------------ the fast path stays on


def test_grouped_path_after_from_pretrained_save_load_bf16_and_state_dict(tmp_path):
    model = make_model()
    input_ids = batch()
    with torch.no_grad():
        want = logits(model.eval(), input_ids)
    assert_grouped_and_packed(model)

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert (
        "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
        and "model.mtp_layers.0.mlp.experts.0.down_proj.weight" in keys
    )
    assert not any("packed" in k or "gate_up" in k for k in keys)  # the released per-expert keys only

    loaded = MoeMtpForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, input_ids), want, atol=1e-5, rtol=0)
    assert_grouped_and_packed(loaded)

    loaded.to(torch.bfloat16)
    with torch.no_grad():
        logits(loaded, input_ids)
    assert_grouped_and_packed(loaded)
    assert {e.packed["down"].dtype for e in expert_sets(loaded)} == {torch.bfloat16}

    fresh = make_model()
    fresh.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh.eval(), input_ids), want, atol=1e-5, rtol=0)
    assert_grouped_and_packed(fresh)

    mapped = MoeMtpForCausalLM.from_pretrained(tmp_path, device_map="auto")
    with torch.no_grad():
        logits(mapped, input_ids)
    assert_grouped_and_packed(mapped)


def test_grouped_path_through_trainer_steps_and_reload(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_model()
    rows = batch(batch_size=8, seq_len=16)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    before = model.model.layers[1].mlp.experts.packed["gate_up"].clone()
    Trainer(model=model, args=args, train_dataset=data).train()
    assert_grouped_and_packed(model)
    experts = model.model.layers[1].mlp.experts
    assert not torch.equal(experts.packed["gate_up"], before)  # the optimizer updated the packed weights in place

    model.save_pretrained(tmp_path / "trained")
    reloaded = MoeMtpForCausalLM.from_pretrained(tmp_path / "trained").eval()
    input_ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, input_ids), logits(model.eval(), input_ids), atol=1e-5, rtol=0)
    assert_grouped_and_packed(reloaded)


def test_gradient_checkpointing_and_deepcopy_keep_the_grouped_path():
    model = make_model()
    model.activation_checkpointing_enable()
    model.train()
    input_ids = batch()
    model(input_ids, labels=input_ids).loss.backward()
    assert_grouped_and_packed(model)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)
    clone = copy.deepcopy(model)
    clone(input_ids, labels=input_ids)
    assert_grouped_and_packed(clone)


def test_replaced_expert_weights_are_stacked_with_a_warning_until_repacked(caplog):
    model = make_model().eval()
    input_ids = batch()
    expert = model.model.layers[2].mlp.experts[4]
    expert.down_proj.weight = torch.nn.Parameter(expert.down_proj.weight.detach().clone() * 2)
    with torch.no_grad():
        stacked = logits(model, input_ids)
    assert model.model.layers[2].mlp.experts.last_path == "grouped_stacked"
    assert model.pack_experts() == MOE_LAYERS
    with torch.no_grad():
        torch.testing.assert_close(logits(model, input_ids), stacked, atol=1e-5, rtol=0)
    assert_grouped_and_packed(model)


def test_ddp_step_reaches_every_expert_without_find_unused_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = make_model(seq_aux_loss_alpha=0.0).train()
        ddp = DistributedDataParallel(model)
        input_ids = batch()
        ddp(input_ids, labels=input_ids).loss.backward()
        assert_grouped_and_packed(model)
        assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- quantized and adapted experts


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_quantizes_every_routed_expert_and_runs_the_per_expert_path(tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers import BitsAndBytesConfig

    # CPU 4-bit kernels want every input dimension to be at least their block size (64).
    wide = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, q_lora_rank=64, kv_lora_rank=64)
    make_model(**wide).save_pretrained(tmp_path)
    if mode == "int8":
        quantization, layer = BitsAndBytesConfig(load_in_8bit=True), Linear8bitLt
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        layer = Linear4bit
    model = MoeMtpForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    experts = expert_sets(model)
    quantized = [linear for e in experts for mlp in e for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert len(quantized) == MOE_LAYERS * 8 * 3 and all(isinstance(linear, layer) for linear in quantized)
    assert not any(e.is_packed() for e in experts)
    # The MoE layers alone: bitsandbytes' CPU 4-bit kernel refuses some of the tiny attention shapes.
    with torch.no_grad():
        for moe in [block.mlp for block in (*model.model.layers[1:], *model.model.mtp_layers)]:
            assert torch.isfinite(moe(torch.randn(2, 5, 128))).all()
    assert paths(model) == {"per_expert"}


def test_lora_adapts_every_routed_expert_and_runs_the_per_expert_path():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    model = make_model()
    input_ids = batch()
    with torch.no_grad():
        base = logits(model.eval(), input_ids)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    adapted = [
        linear
        for experts in expert_sets(lora)
        for mlp in experts
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    ]
    assert len(adapted) == MOE_LAYERS * 8 * 3 and all(isinstance(linear, LoraLinear) for linear in adapted)
    with torch.no_grad():
        torch.testing.assert_close(logits(lora, input_ids), base, atol=1e-5, rtol=0)  # LoRA starts at 0
    assert paths(lora) == {"per_expert"}

    merged = lora.merge_and_unload()
    merged.pack_experts()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, input_ids), base, atol=1e-5, rtol=0)
    assert_grouped_and_packed(merged)


# ---------------------------------------------------------------------------------------------------- torch.compile


def test_compiled_moe_layer_training_step_has_no_graph_break_and_matches_eager():
    model = make_model().train()
    moe = model.model.layers[1].mlp
    hidden_states = torch.randn(2, 9, 64)
    _, want, want_grad_in, want_grads = run_layer(moe, hidden_states, per_expert=False)

    compiled_moe = copy.deepcopy(moe)
    compiled = torch.compile(compiled_moe, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    inputs = hidden_states.clone().requires_grad_()
    out = compiled(inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(inputs.grad, want_grad_in, atol=1e-5, rtol=0)
    for name, param in compiled_moe.named_parameters():
        grad = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=0, msg=name)
    assert compiled_moe.gate.tokens_per_expert.sum() == 2 * 9 * 2  # the router's load count compiles too


def test_compiled_model_training_step_is_one_graph():
    model = MoeMtpForCausalLM(tiny_config("v3", num_nextn_predict_layers=0, seq_aux_loss_alpha=0.0)).train()
    assert model._can_compile_fullgraph
    input_ids = batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss) and paths(model) == {"grouped"}
