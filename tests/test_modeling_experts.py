"""The routed experts (modeling/modeling_moe_mtp.py): two 3-D parameters read by grouped GEMMs, per-expert keys on
disk, per-expert modules for quantized loads, and PEFT LoRA on the 3-D parameters. Same numbers as one GEMM per
expert, and the fast path really runs after the usual operations."""

import copy
import gc

import pytest
import torch
from conftest import randomize_router_bias, tiny_config
from safetensors import safe_open

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.modeling.loading import fuse_expert_keys
from moe_mtp.modeling.modeling_moe_mtp import MoeMtpExpertList, MoeMtpExperts, per_expert_forward

MOE_LAYERS = 2 + 1  # tiny_config: layers 1 and 2 of 3 are MoE, plus one MTP module
EXPERTS, WIDTH, HIDDEN = 8, 32, 64


def make_model(**overrides) -> MoeMtpForCausalLM:
    model = MoeMtpForCausalLM(tiny_config("v3", num_nextn_predict_layers=1, **overrides))
    randomize_router_bias(model)
    return model


def batch(batch_size=2, seq_len=90):
    """2 x 90 tokens: past `dense_pays`' budget at this size (170 tokens, MTP module's 178 included), so forwards
    without autograd take the grouped GEMMs too."""
    return torch.randint(3, 128, (batch_size, seq_len))


def logits(model, input_ids):
    """A forward that runs every MoE layer, the MTP module's included."""
    return model(input_ids=input_ids, output_mtp_logits=True).logits


def expert_sets(model, kind=MoeMtpExperts) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


def paths(model, kind=MoeMtpExperts) -> set:
    return {experts.last_path for experts in expert_sets(model, kind)}


def assert_grouped(model):
    """The last forward took the grouped path on the 3-D parameters in every MoE layer, MTP modules included."""
    sets = expert_sets(model)
    assert len(sets) == MOE_LAYERS
    assert paths(model) == {"grouped"}
    assert all(e.gate_up_proj.shape == (EXPERTS, 2 * WIDTH, HIDDEN) for e in sets)


# ---------------------------------------------------------------------------------------------------------- parity


def run_layer(moe, hidden_states, per_expert: bool):
    """Forward + backward of one MoE layer; returns the output and the gradients of the input and every parameter
    (an expert without tokens gets zeros on the grouped path and no rows on the per-expert one: both count as 0)."""
    moe = copy.deepcopy(moe)
    moe.experts.use_grouped_mm = not per_expert
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
        assert grads["experts.down_proj"][expert].abs().max() == 0


def reference_outputs(experts, tokens, index, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """The same routing through one GEMM per expert and through the grouped GEMMs."""
    per_expert_weights = [(experts.gate_up_proj[e], experts.down_proj[e]) for e in range(experts.num_experts)]
    per_expert = per_expert_forward(experts, tokens, index, weights, per_expert_weights)
    return per_expert, experts.grouped(tokens, index, weights, experts.gate_up_proj, experts.down_proj)


def assert_same_as_reference_paths(output, experts, tokens, index, weights):
    for reference in reference_outputs(experts, tokens, index, weights):
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=0)


def test_decode_sized_steps_take_the_sliced_path_with_the_same_numbers():
    """Without autograd and with few slots (decoding, verify steps; `max_sliced_slots`), CPU runs each slot on its
    expert's slices; outputs equal the grouped and per-expert paths'."""
    experts = make_model().model.layers[1].mlp.experts  # 8 experts, top-2: one token is 2 slots
    tokens, index, weights = torch.randn(1, 64), torch.tensor([[5, 2]]), torch.rand(1, 2)
    with torch.no_grad():
        sliced = experts(tokens, index, weights)
        assert experts.last_path == "sliced"
        assert_same_as_reference_paths(sliced, experts, tokens, index, weights)
        experts(torch.randn(2, 64), torch.tensor([[5, 2], [1, 2]]), torch.rand(2, 2))
        assert experts.last_path == "sliced"  # 4 slots: a verify step of one draft
        experts(torch.randn(3, 64), torch.tensor([[5, 2], [1, 2], [0, 7]]), torch.rand(3, 2))
        assert experts.last_path == "sliced"  # 6 slots, fewer than the 8 experts
    experts(tokens, index, weights)  # with autograd: grouped, so every expert weight gets its gradient
    assert experts.last_path == "grouped"


def test_steps_that_reach_every_small_expert_take_the_dense_path_with_the_same_numbers():
    """Without autograd, a step with at least as many slots as experts (a verify step, a small batch's decode) runs
    every expert of a small layer on every token and weights the chosen ones (`dense_pays`); the outputs equal the
    per-expert and grouped paths', and a step past the 2^23 multiply-add budget goes back to grouped."""
    experts = make_model().model.layers[1].mlp.experts  # 8 experts of 64 x 32: 49k weights
    generator = torch.Generator().manual_seed(0)
    for num_tokens in (4, 9, 170):
        tokens = torch.randn(num_tokens, 64, generator=generator)
        index = torch.rand(num_tokens, EXPERTS, generator=generator).topk(2).indices
        weights = torch.rand(num_tokens, 2, generator=generator)
        with torch.no_grad():
            dense = experts(tokens, index, weights)
            assert experts.last_path == "dense"
            assert_same_as_reference_paths(dense, experts, tokens, index, weights)
    with torch.no_grad():
        experts(torch.randn(171, 64), torch.randint(0, EXPERTS, (171, 2)), torch.rand(171, 2))
    assert experts.last_path == "grouped"  # 171 x 49,152 multiply-adds > 2^23


def test_dense_path_in_bf16_and_with_an_overflowing_expert_no_token_chose():
    """The dense path also runs the experts no token chose: in bf16 it still matches the per-expert path, and an
    unchosen expert whose output overflows to inf adds exactly 0, as on the paths that never run it."""
    experts = make_model().model.layers[1].mlp.experts
    tokens, weights = torch.randn(4, 64), torch.rand(4, 2)
    index = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 0]])  # expert 7 gets nothing
    with torch.no_grad():
        bf16 = copy.deepcopy(experts).to(torch.bfloat16)
        got = bf16(tokens.bfloat16(), index, weights)
        assert bf16.last_path == "dense"
        want, _ = reference_outputs(experts, tokens, index, weights)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        experts.gate_up_proj[7] = 1e30
        gate, up = torch.nn.functional.linear(tokens, experts.gate_up_proj[7]).chunk(2, dim=-1)
        assert not (experts.act_fn(gate) * up).isfinite().all()  # expert 7's own output overflows
        got = experts(tokens, index, weights)
        assert experts.last_path == "dense" and got.isfinite().all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_expert", [False, True])
def test_routes_to_another_ranks_experts_contribute_nothing(per_expert):
    """Expert parallelism keeps a slice of the experts and marks routes to the others with id `num_experts`: those
    slots add nothing and get no gradient, on either path, even where the grouped GEMM leaves rows undefined."""
    full = make_model().model.layers[1].mlp.experts
    full.use_grouped_mm = not per_expert
    local = copy.deepcopy(full)
    with torch.no_grad():
        local.gate_up_proj = torch.nn.Parameter(full.gate_up_proj[4:].clone())
        local.down_proj = torch.nn.Parameter(full.down_proj[4:].clone())
    local.num_experts, local._is_expert_parallel = 4, True
    tokens = torch.randn(10, 64)
    index = torch.randint(0, EXPERTS, (10, 2))
    weights = torch.rand(10, 2)
    off_rank = index < 4
    local_index = torch.where(off_rank, 4, index - 4)

    x_full, x_local = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    want = full(x_full, index, weights.masked_fill(off_rank, 0))
    got = local(x_local, local_index, weights.masked_fill(off_rank, 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    grad = torch.randn(got.shape)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x_local.grad, x_full.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(local.down_proj.grad, full.down_proj.grad[4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(local.gate_up_proj.grad, full.gate_up_proj.grad[4:], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ storage and checkpoints


def test_experts_are_two_3d_parameters_saved_under_per_expert_keys(tmp_path):
    """In memory two 3-D parameters per layer, sharing storage with nothing (no tie to declare); on disk the
    released per-expert keys, each with its own expert's values."""
    model = make_model()
    experts = model.model.layers[1].mlp.experts
    assert experts.down_proj.shape == (EXPERTS, HIDDEN, WIDTH)
    storages = {}
    for name, tensor in model.state_dict().items():
        storages.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    shared = [names for names in storages.values() if len(names) > 1]
    assert all(set(names) <= {"lm_head.weight", "model.embed_tokens.weight"} for names in shared), shared

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for expert in range(EXPERTS):
            gate = f.get_tensor(f"model.layers.1.mlp.experts.{expert}.gate_proj.weight")
            up = f.get_tensor(f"model.layers.1.mlp.experts.{expert}.up_proj.weight")
            down = f.get_tensor(f"model.layers.1.mlp.experts.{expert}.down_proj.weight")
            assert torch.equal(gate, experts.gate_up_proj[expert, :WIDTH])
            assert torch.equal(up, experts.gate_up_proj[expert, WIDTH:])
            assert torch.equal(down, experts.down_proj[expert])
    assert "model.mtp_layers.0.mlp.experts.7.up_proj.weight" in keys
    assert not any("gate_up" in k or k.endswith("experts.down_proj") for k in keys)


def test_experts_declare_transformers_layout_and_the_expert_parallel_plan_shards_them():
    """transformers finds experts modules by the layout flags its own declare (`has_gate`, as
    `_get_expert_weight_names` in its parallelism tests does); every 3-D expert parameter, the MTP module's included,
    must be named by the expert-parallel plan, or each rank would keep every expert without any output changing."""
    from transformers.distributed.parallel_utils import _get_parameter_plan

    model = make_model()
    params = dict(model.named_parameters())
    names = [
        f"{name}.{part}"
        for name, module in model.named_modules()
        if getattr(module, "has_gate", False) and not module.has_bias
        for part in ("gate_up_proj", "down_proj")
        if f"{name}.{part}" in params
    ]
    assert len(names) == 2 * MOE_LAYERS and any(n.startswith("model.mtp_layers.") for n in names), names
    assert all(_get_parameter_plan(n, model.ep_plan, is_weight=True) == "grouped_gemm" for n in names), model.ep_plan


def test_fuse_expert_keys_stacks_what_the_model_holds():
    model = make_model()
    from moe_mtp.conversion import convert_state_dict

    per_expert = convert_state_dict(model.state_dict(), model.config, "moe_mtp_model", "moe_mtp")
    assert "model.layers.2.mlp.experts.3.gate_proj.weight" in per_expert
    fused = fuse_expert_keys(per_expert)
    for key, value in model.state_dict().items():
        if key != "lm_head.weight" or not model.config.tie_word_embeddings:
            assert torch.equal(fused[key], value), key
    with pytest.raises(KeyError, match="model.layers.2.mlp.experts"):
        fuse_expert_keys({k: v for k, v in per_expert.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"})


# ------------------------------------------------------------------------------------------ the fast path stays on


def test_grouped_path_after_from_pretrained_save_load_bf16_and_state_dict(tmp_path):
    model = make_model()
    input_ids = batch()
    with torch.no_grad():
        want = logits(model.eval(), input_ids)
    assert_grouped(model)

    model.save_pretrained(tmp_path)
    loaded = MoeMtpForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, input_ids), want, atol=1e-5, rtol=0)
    assert_grouped(loaded)

    loaded.to(torch.bfloat16)
    with torch.no_grad():
        logits(loaded, input_ids)
    assert_grouped(loaded)
    assert {e.down_proj.dtype for e in expert_sets(loaded)} == {torch.bfloat16}

    fresh = make_model()
    fresh.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh.eval(), input_ids), want, atol=1e-5, rtol=0)
    assert_grouped(fresh)

    mapped = MoeMtpForCausalLM.from_pretrained(tmp_path, device_map="auto")
    with torch.no_grad():
        logits(mapped, input_ids)
    assert_grouped(mapped)


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
    before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    Trainer(model=model, args=args, train_dataset=data).train()
    assert_grouped(model)
    assert not torch.equal(model.model.layers[1].mlp.experts.gate_up_proj, before)

    model.save_pretrained(tmp_path / "trained")
    reloaded = MoeMtpForCausalLM.from_pretrained(tmp_path / "trained").eval()
    input_ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, input_ids), logits(model.eval(), input_ids), atol=1e-5, rtol=0)
    assert_grouped(reloaded)


def test_gradient_checkpointing_and_deepcopy_keep_the_grouped_path():
    model = make_model()
    model.activation_checkpointing_enable()
    model.train()
    input_ids = batch()
    model(input_ids, labels=input_ids).loss.backward()
    assert_grouped(model)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)
    clone = copy.deepcopy(model)
    clone(input_ids, labels=input_ids)
    assert_grouped(clone)


def test_ddp_step_reaches_every_expert_without_find_unused_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = make_model(seq_aux_loss_alpha=0.0).train()
        ddp = DistributedDataParallel(model)
        input_ids = batch()
        ddp(input_ids, labels=input_ids).loss.backward()
        assert_grouped(model)
        assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)
        # Freed, and the gloo thread idle, before the group goes: a group freed later with the DDP reducer, while its
        # thread still released the last allreduce, deadlocked on the GIL (torch 2.13).
        del ddp
        gc.collect()
        dist.barrier()
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
    assert expert_sets(model) == []  # per-expert modules, so that every one of them is quantized
    experts = expert_sets(model, MoeMtpExpertList)
    quantized = [linear for e in experts for mlp in e for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert len(quantized) == MOE_LAYERS * 8 * 3 and all(isinstance(linear, layer) for linear in quantized)
    # The MoE layers alone: bitsandbytes' CPU 4-bit kernel refuses some of the tiny attention shapes.
    with torch.no_grad():
        for moe in [block.mlp for block in (*model.model.layers[1:], *model.model.mtp_layers)]:
            assert torch.isfinite(moe(torch.randn(2, 5, 128))).all()
    assert paths(model, MoeMtpExpertList) == {"per_expert"}


def test_lora_adapts_every_routed_expert_through_target_parameters_on_the_grouped_path(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = make_model(bias_update_speed=0.0)  # the reloaded adapter's base keeps the original balancing bias
    input_ids = batch()
    with torch.no_grad():
        base = logits(model.eval(), input_ids)
    pristine = copy.deepcopy(model)
    config = LoraConfig(
        r=4, target_modules=["gate_proj", "up_proj", "down_proj"], target_parameters=["gate_up_proj", "down_proj"]
    )
    lora = get_peft_model(model, config)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    for experts in ("model.layers.1.mlp.experts", "model.layers.2.mlp.experts", "model.mtp_layers.0.mlp.experts"):
        assert sum(experts in n and "lora_A" in n for n in names) == 2, experts  # gate_up_proj and down_proj
    assert any("shared_experts.down_proj.lora_A" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(logits(lora, input_ids), base, atol=1e-5, rtol=0)  # LoRA starts at 0
    assert paths(lora) == {"grouped"}

    # Trained adapters change every expert, through the grouped path's weight gradient.
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        lora.train()
        lora(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora.eval()
    with torch.no_grad():
        adapted = logits(lora, input_ids)
    assert (adapted - base).abs().max() > 1e-4
    lora.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(pristine, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(again, input_ids), adapted, atol=1e-5, rtol=0)

    merged = lora.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-4, rtol=0)
    assert_grouped(merged)


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


@pytest.mark.parametrize("base", [False, True])
def test_folders_saved_with_stacked_experts_load(tmp_path, base):
    """`save_pretrained(save_original_format=False)` writes the model's own stacked names; such a folder passes the
    folder check (the moe_mtp_model layouts) and loads exactly, for the causal LM and the base model."""
    from moe_mtp import MoeMtpModel

    model = make_model().eval()
    model = model.model if base else model
    model.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    prefix = "" if base else "model."
    assert (
        f"{prefix}layers.1.mlp.experts.gate_up_proj" in keys and f"{prefix}mtp_layers.0.mlp.experts.down_proj" in keys
    )
    loaded = (MoeMtpModel if base else MoeMtpForCausalLM).from_pretrained(tmp_path).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
