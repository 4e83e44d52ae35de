"""balancing.py: the auxiliary-loss-free bias moves once per optimizer step, from the step's loads, with no user code."""

import pytest
import torch
from conftest import tiny_config

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.modeling.balancing import automatic_bias_update, balancing_state, named_routers, take_balance_metrics


def make_model(**overrides) -> MoeMtpForCausalLM:
    return MoeMtpForCausalLM(tiny_config("v3", **overrides))


def biases(model) -> list[torch.Tensor]:
    return [router.e_score_correction_bias.clone() for router in model.moe_routers()]


def tokens(seed: int, batch_size=2, seq_len=12) -> torch.Tensor:
    return torch.randint(3, 128, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


def unbalance(model, hot=(0, 1), offset=0.08):
    """A router made deliberately unbalanced at init: two experts win most choices."""
    with torch.no_grad():
        for router in model.moe_routers():
            router.e_score_correction_bias[list(hot)] += offset


def test_bias_moves_exactly_once_per_optimizer_step_under_accumulation_4():
    gamma = 1e-3
    model = make_model(bias_update_speed=gamma).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    routers = model.moe_routers()
    for step in range(3):
        before = biases(model)
        for micro in range(4):
            model(tokens(10 * step + micro), labels=tokens(10 * step + micro)).loss.backward()
            assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, routers, strict=True)), (
                "moved mid-step"
            )
        expected_load = torch.stack([r.tokens_per_expert for r in routers])  # the four micro-batches together
        assert expected_load.sum(dim=-1).tolist() == [4 * 2 * 12 * 2] * 2 + [4 * 2 * 11 * 2]
        optimizer.step()
        optimizer.zero_grad()
        assert balancing_state(model.model).updates == step + 1
        assert all(int(r.tokens_per_expert.sum()) == 0 for r in routers)  # counts reset for the next step
        # The move is gamma * sign(mean - load) of the four micro-batches' summed load.
        torch.testing.assert_close(balancing_state(model.model).last_load, expected_load.float())
        for b, router, load in zip(before, routers, expected_load.float(), strict=True):
            expected = b + gamma * torch.sign(load.mean() - load)
            torch.testing.assert_close(router.e_score_correction_bias, expected, rtol=0, atol=1e-7)
    assert all(not p is r.e_score_correction_bias for p in model.parameters() for r in routers)  # noqa: E714


def test_a_step_the_grad_scaler_skips_moves_no_bias_even_with_a_fused_optimizer():
    # With a fused optimizer, GradScaler calls step() on overflow too (the kernel then does nothing).
    model = make_model(bias_update_speed=1e-3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(tokens(0), labels=tokens(0)).loss).backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    before = biases(model)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert balancing_state(model.model).updates == 0
    assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, model.moe_routers(), strict=True))
    scaler.scale(model(tokens(1), labels=tokens(1)).loss).backward()
    scaler.step(optimizer)
    assert balancing_state(model.model).updates == 1  # the next, finite step moves it, from both steps' tokens
    assert balancing_state(model.model).last_load.sum() == 2 * (2 * 2 * 12 * 2 + 2 * 11 * 2)
    assert any(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, model.moe_routers(), strict=True))


def test_trainer_with_accumulation_4_updates_once_per_step(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_model()
    rows = torch.randint(3, 128, (24, 12)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=4,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows})).train()
    state = balancing_state(model.model)
    assert state.updates == 3
    # Each update saw 4 micro-batches of 2 x 12 tokens, top-2 (the MTP layer sees 11 positions per row).
    assert state.last_load.sum(dim=-1).tolist() == [4 * 2 * 12 * 2] * 2 + [4 * 2 * 11 * 2]


def test_accelerate_accumulate_loop_updates_only_on_sync_steps():
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for micro in range(8):
        with accelerator.accumulate(model):
            accelerator.backward(model(tokens(micro), labels=tokens(micro)).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert balancing_state(accelerator.unwrap_model(model).model).updates == 2


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_recomputation_is_not_counted_in_the_update(reentrant):
    loads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model(tokens(0), labels=tokens(0)).loss.backward()
        optimizer.step()
        loads.append(balancing_state(model.model).last_load)
    torch.testing.assert_close(loads[0], loads[1])


def test_gamma_zero_freezes_and_the_bias_is_saved_and_never_trained(tmp_path):
    model = make_model(bias_update_speed=0.0).train()
    unbalance(model)
    before = biases(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        model(tokens(step), labels=tokens(step)).loss.backward()
        optimizer.step()
    assert balancing_state(model.model).updates == 2
    assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, model.moe_routers(), strict=True))
    assert not any(name.endswith("e_score_correction_bias") for name, _ in model.named_parameters())

    model.config.bias_update_speed = 1e-2  # schedulable: the config value is read at every update
    model(tokens(5), labels=tokens(5)).loss.backward()
    optimizer.step()
    moved = biases(model)
    assert not torch.equal(moved[0], before[0])
    model.save_pretrained(tmp_path)
    reloaded = MoeMtpForCausalLM.from_pretrained(tmp_path)
    for saved, router in zip(moved, reloaded.moe_routers(), strict=True):
        assert torch.equal(saved, router.e_score_correction_bias)


def test_explicit_call_takes_over_from_the_hook():
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(tokens(0), labels=tokens(0)).loss.backward()
    max_vio = model.update_balancing_bias()  # before the step: the user's call counts, the hook then stays out
    assert set(max_vio) == {"layers.1", "layers.2", "mtp_layers.0"}
    optimizer.step()
    model(tokens(1), labels=tokens(1)).loss.backward()
    optimizer.step()
    state = balancing_state(model.model)
    assert state.updates == 1 and int(model.moe_routers()[0].tokens_per_expert.sum()) > 0
    with automatic_bias_update(True):  # the manual flag, not the switch, keeps the hook away from this model
        optimizer.step()
    assert state.updates == 1


def test_hook_leaves_models_of_other_optimizers_and_eval_mode_alone():
    trained, other = make_model().train(), make_model().train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    for model in (trained, other):
        model(tokens(0), labels=tokens(0)).loss.backward()
    optimizer.step()
    assert balancing_state(trained.model).updates == 1
    assert balancing_state(other.model).updates == 0
    assert int(other.moe_routers()[0].tokens_per_expert.sum()) > 0  # its counts wait for its own optimizer
    with automatic_bias_update(False):
        trained(tokens(1), labels=tokens(1)).loss.backward()
        optimizer.step()
    assert balancing_state(trained.model).updates == 1


def train_max_vio(gamma: float, steps: int = 50) -> float:
    torch.manual_seed(0)
    model = make_model(bias_update_speed=gamma, num_nextn_predict_layers=0, num_hidden_layers=2).train()
    unbalance(model, offset=0.05)
    # DeepSeek-V3's ratio of learning rate to gamma (2.2e-4 vs 1e-3): much faster router learning outruns the bias.
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    data = torch.randint(3, 128, (steps, 8, 16), generator=torch.Generator().manual_seed(1))
    tail = []
    for step in range(steps):
        model(data[step], labels=data[step]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= steps - 10:
            tail.append(sum(take_balance_metrics(model)[0].values()) / len(named_routers(model)))
        else:
            take_balance_metrics(model)
    return sum(tail) / len(tail)


def test_bias_update_cuts_max_vio_of_an_unbalanced_router_by_half():
    frozen, balanced = train_max_vio(0.0), train_max_vio(1e-3)
    assert frozen > 1.2  # the two hot experts take most of the load throughout
    assert balanced <= 0.5 * frozen, (frozen, balanced)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_counts_stay_exact_in_low_precision_models(dtype):
    model = make_model().to(dtype).train()
    assert model.moe_routers()[0].tokens_per_expert.dtype == torch.long
    for seed in range(3):
        model(tokens(seed, batch_size=8, seq_len=64))
    assert int(model.moe_routers()[0].tokens_per_expert.sum()) == 3 * 8 * 64 * 2


def test_routers_restored_without_counts_neither_fail_nor_move_the_bias():
    """A model restored from a sharded (DCP) checkpoint is built on the meta device and its routers' token counts
    stay there until a training forward: an optimizer step before one moves nothing and leaves real zero counts."""
    model = make_model().train()
    before = biases(model)
    for router in model.moe_routers():
        router.tokens_per_expert = torch.empty(router.num_experts, dtype=torch.long, device="meta")
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the automatic post-step update runs here
    assert all(torch.equal(a, b) for a, b in zip(biases(model), before, strict=True))
    assert all(not r.tokens_per_expert.is_meta and r.tokens_per_expert.sum() == 0 for r in model.moe_routers())
    model(tokens(0), labels=tokens(0)).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(biases(model), before, strict=True))


def test_one_router_lookup_finds_the_moe_layers_main_then_mtp():
    """`named_routers` is the package's one lookup: `moe_routers()` and the sequence-wise balance loss use it. With
    `moe_layer_freq=2`, MoE and dense blocks alternate in the main stack and in the MTP modules alike."""
    model = make_model(num_hidden_layers=4, moe_layer_freq=2, num_nextn_predict_layers=3).train()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.model.layers)]
    blocks += [(f"mtp_layers.{k}", b) for k, b in enumerate(model.model.mtp_layers)]
    expected = [(name, block.mlp.gate) for name, block in blocks if hasattr(block.mlp, "gate")]
    assert [name for name, _ in expected] == ["layers.2", "mtp_layers.0", "mtp_layers.2"]  # indices 2, 4 and 6
    assert named_routers(model.model) == expected
    assert model.moe_routers() == [router for _, router in expected]
    ids = tokens(0)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 3 and torch.isfinite(out.aux_loss) and out.aux_loss > 0
