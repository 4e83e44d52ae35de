"""training/callback.py: the Trainer callback's metrics, and LoRA over every projection (Trainer, save/load, merge)."""

import pytest
import torch
from conftest import randomize_router_bias, tiny_config

from moe_mtp import ROUTED_EXPERT_PARAMETERS, MoeMtpForCausalLM
from moe_mtp.modeling.balancing import balancing_state
from moe_mtp.training import MoeMtpCallback

ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def expected_lora_count(config) -> int:
    """Every attention projection, dense MLP, shared expert and routed expert, main layers and MTP modules."""
    count = 0
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        count += len(ATTENTION)
        if config.is_moe_layer(layer):  # one LoRA per 3-D expert parameter, nested, plus the shared experts
            count += len(ROUTED_EXPERT_PARAMETERS) + len(MLP) * (1 if config.n_shared_experts else 0)
        else:
            count += len(MLP)
    return count


def lora_model(model, r=4):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=ATTENTION + MLP, target_parameters=ROUTED_EXPERT_PARAMETERS
    )
    return get_peft_model(model, config)


def adapted_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def test_lora_reaches_attention_dense_shared_and_routed_experts_and_round_trips(tmp_path):
    from peft import PeftModel

    config = tiny_config("v3", num_nextn_predict_layers=1)
    base = MoeMtpForCausalLM(config)
    randomize_router_bias(base)
    reference = MoeMtpForCausalLM(config)
    reference.load_state_dict(base.state_dict())
    lora = lora_model(base)
    names = adapted_names(lora)
    assert len(names) == expected_lora_count(config) == 38
    for part in (".layers.0.mlp.gate_proj", ".layers.1.mlp.shared_experts.up_proj", ".layers.2.mlp.experts",
                 ".mtp_layers.0.mlp.experts.base_layer", ".mtp_layers.0.self_attn.kv_b_proj", ".layers.0.self_attn.q_a_proj"):  # fmt: skip
        assert any(name.endswith(part) for name in names), part

    with torch.no_grad():  # trained-looking adapters
        for module in lora.modules():
            if hasattr(module, "lora_B"):
                for layer in module.lora_B.values():
                    layer.weight.normal_(std=0.05)
    lora.eval()
    input_ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        adapted = lora(input_ids=input_ids).logits
    lora.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    assert len(adapted_names(reloaded)) == 38
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, adapted, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        assert not adapted_names(merged) and type(merged.model.layers[1].self_attn.kv_b_proj) is torch.nn.Linear
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_trainer_lora_on_experts_logs_the_loss_parts_and_moves_the_bias(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = MoeMtpForCausalLM(tiny_config("v3", num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-2))
    lora = lora_model(model, r=8)
    rows = torch.randint(3, 128, (8, 16)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    callback = MoeMtpCallback(mtp_loss_weight="0.3,0.1@0.5")
    trainer = Trainer(
        model=lora,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
        callbacks=[callback],
    )
    before = [router.e_score_correction_bias.clone() for router in model.moe_routers()]
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 10 and logs[-1]["loss"] < logs[0]["loss"]
    for key in (
        "main_loss",
        "mtp_loss_1",
        "balance_loss",
        "max_vio/layers.1",
        "max_vio/layers.2",
        "max_vio/mtp_layers.0",
    ):
        assert all(key in entry for entry in logs), key
    assert logs[-1]["main_loss"] < logs[0]["main_loss"]
    # loss = main + weight * mtp + balance, the weight following the schedule (0.3, then 0.1 from step 5).
    assert [entry["mtp_loss_weight"] for entry in logs] == [0.3] * 5 + [0.1] * 5
    for entry in logs:
        total = entry["main_loss"] + entry["mtp_loss_weight"] * entry["mtp_loss_1"] + entry["balance_loss"]
        assert entry["loss"] == pytest.approx(total, rel=1e-3)
    assert balancing_state(model.model).updates == 10
    assert any(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, model.moe_routers(), strict=True))


@pytest.mark.parametrize("added_after_init", [False, True])
def test_callback_metrics_reach_tensorboard(tmp_path, added_after_init):
    """Trainer runs the reporting callbacks before the user's; the callback's metrics must still reach them."""
    from datasets import Dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    model = MoeMtpForCausalLM(tiny_config("v3", num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-2))
    rows = torch.randint(3, 128, (4, 16)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        report_to=["tensorboard"], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    if added_after_init:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.add_callback(MoeMtpCallback())
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MoeMtpCallback()])
    trainer.train()

    (events,) = {path.parent for path in tmp_path.rglob("events.out.tfevents.*")}
    scalars = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    for tag in ("train/loss", "train/main_loss", "train/mtp_loss_1", "train/balance_loss"):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(tag.startswith("train/max_vio/") for tag in scalars), sorted(scalars)


def test_callback_logs_means_under_gradient_accumulation(tmp_path):
    """Trainer normalizes each micro-batch's loss by the label count of the whole step (`num_items_in_batch`); the
    logged parts must still be means, adding up to the logged loss (not a half of it with 2 micro-batches)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = MoeMtpForCausalLM(tiny_config("v3", num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-2))
    rows = torch.randint(3, 128, (8, 16)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MoeMtpCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        total = entry["main_loss"] + entry["mtp_loss_weight"] * entry["mtp_loss_1"] + entry["balance_loss"]
        assert entry["loss"] == pytest.approx(total, rel=1e-3)
        assert entry["main_loss"] > 4.0  # about ln(128) at the start; half of it was logged before
