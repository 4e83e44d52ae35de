"""transformers conventions that Trainer, TRL, PEFT and evaluation harnesses rely on: loading info, pre-shifted
labels, offline loading, readable signatures and edited rope settings. Rope parity with transformers' DeepseekV3
for every rope type is in test_modeling_parity.py."""

import inspect
import typing
from unittest import mock

import httpx2
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoModelForCausalLM
from transformers.utils import TransformersKwargs

from moe_mtp import MoeMtpForCausalLM, MoeMtpModel
from moe_mtp.modeling.modeling_moe_mtp import MoeMtpCausalLMOutputWithPast, MoeMtpModelOutputWithPast


def ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


# --------------------------------------------------------------------------------------------------- from_pretrained


@pytest.mark.parametrize("loader", [MoeMtpForCausalLM, AutoModelForCausalLM], ids=["ours", "auto"])
def test_output_loading_info_returns_the_model_and_the_info(tmp_path, loader):
    MoeMtpForCausalLM(tiny_config(num_nextn_predict_layers=2)).save_pretrained(tmp_path)
    model, info = loader.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, MoeMtpForCausalLM)
    assert {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"} <= set(info)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # Loading fewer MTP modules than saved (dropped with a note, see test_modeling_moe_mtp.py) keeps the tuple.
    model, info = loader.from_pretrained(tmp_path, num_nextn_predict_layers=1, output_loading_info=True)
    assert len(model.model.mtp_layers) == 1 and not info["missing_keys"]


def test_loading_from_a_state_dict_makes_no_hub_request():
    source = MoeMtpForCausalLM(tiny_config())
    offline = httpx2.ConnectError("no network in this test")
    with (
        mock.patch.object(httpx2.Client, "send", side_effect=offline) as send,
        mock.patch("transformers.utils.hub.hf_hub_download", side_effect=offline) as download,
    ):
        model = MoeMtpForCausalLM.from_pretrained(None, config=source.config, state_dict=source.state_dict())
    assert send.call_count == 0 and download.call_count == 0
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# ------------------------------------------------------------------------------------------------------ shift_labels


def test_shift_labels_drive_the_main_and_every_mtp_loss():
    model = MoeMtpForCausalLM(tiny_config(num_nextn_predict_layers=2)).eval()
    input_ids = torch.randint(3, 128, (2, 10))
    labels = input_ids.clone()
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        from_labels = model(input_ids, labels=labels)
        from_shifted = model(input_ids, shift_labels=shifted)
    torch.testing.assert_close(from_shifted.loss, from_labels.loss)

    # Other targets (as a sequence-parallel shard would get): shift_labels win over labels, at every depth.
    targets = torch.randint(3, 128, (2, 10))
    targets[1, 4] = -100
    with torch.no_grad():
        out = model(input_ids, labels=labels, shift_labels=targets)
    torch.testing.assert_close(out.main_loss, ce(out.logits, targets))
    for depth, (depth_logits, depth_loss) in enumerate(zip(out.mtp_logits, out.mtp_losses, strict=True), start=1):
        torch.testing.assert_close(depth_loss, ce(depth_logits, targets[:, depth:]))  # slot i predicts targets[i+k]
    expected = out.main_loss + model.config.mtp_loss_weight * torch.stack(out.mtp_losses).mean()
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, from_labels.loss)


def test_shift_labels_do_not_reach_the_layers():
    model = MoeMtpForCausalLM(tiny_config(num_nextn_predict_layers=0))
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    model(torch.randint(3, 128, (1, 6)), shift_labels=torch.randint(3, 128, (1, 6)))
    assert seen and "shift_labels" not in seen[0]


# -------------------------------------------------------------------------------------------------------- signatures


@pytest.mark.parametrize(
    ("model_class", "output_class"),
    [(MoeMtpForCausalLM, MoeMtpCausalLMOutputWithPast), (MoeMtpModel, MoeMtpModelOutputWithPast)],
)
def test_forward_signatures_are_introspectable(model_class, output_class):
    """Tools read these: transformers' tests look up output fields in the return annotation, and the accepted
    output flags in the `Unpack[TransformersKwargs]` of `**kwargs`."""
    model = model_class(tiny_config())
    assert typing.get_type_hints(model_class.forward)["return"] is output_class
    assert "router_logits" in output_class.__dataclass_fields__
    kwargs = inspect.signature(model.forward).parameters["kwargs"]
    assert kwargs.annotation == typing.Unpack[TransformersKwargs]
    assert {"output_attentions", "output_router_logits"} <= set(kwargs.annotation.__args__[0].__annotations__)


def test_config_return_dict_false_gives_tuples():
    config = tiny_config(num_nextn_predict_layers=0, return_dict=False)
    model = MoeMtpForCausalLM(config).eval()
    input_ids = torch.randint(3, 128, (1, 6))
    loss, logits, *_ = model(input_ids, labels=input_ids)
    assert loss.dim() == 0 and logits.shape == (1, 6, 128)
    assert isinstance(model(input_ids, return_dict=True), MoeMtpCausalLMOutputWithPast)


# ------------------------------------------------------------------------------------------------------------- rope


def test_rope_parameters_edited_after_the_config_are_checked_when_the_model_is_built():
    config = tiny_config()
    config.rope_parameters = {"rope_type": "ntk_by_parts", "factor": 2.0}
    with pytest.raises(ValueError, match=r"MoeMtpConfig\.rope_parameters: rope_type must be one of"):
        MoeMtpModel(config)
    config.rope_parameters = {"rope_type": "linear"}
    with pytest.raises(ValueError, match=r"MoeMtpConfig\.rope_parameters: .*'factor'"):
        MoeMtpModel(config)
    # Defaults fill in as in transformers: yarn's original length is max_position_embeddings.
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0}
    assert MoeMtpModel(config).rotary_emb.rope_type == "yarn"
    assert config.rope_parameters["original_max_position_embeddings"] == config.max_position_embeddings


def test_dynamic_rope_set_after_the_config_rescales_only_past_the_trained_length():
    """As transformers' own rope test does: same weights, plain vs dynamic rope set on the config afterwards."""
    config = tiny_config(max_position_embeddings=16, rope_parameters=None)
    plain = MoeMtpModel(config).eval()
    config.rope_parameters = {"rope_type": "dynamic", "factor": 10.0}  # no rope_theta: the default fills in
    dynamic = MoeMtpModel(config).eval()
    dynamic.load_state_dict(plain.state_dict())
    short, long = torch.randint(3, 128, (1, 10)), torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(short).last_hidden_state, plain(short).last_hidden_state)
        assert not torch.allclose(dynamic(long).last_hidden_state, plain(long).last_hidden_state, atol=1e-5)
        # Back to a short input, the original frequencies are restored.
        torch.testing.assert_close(dynamic(short).last_hidden_state, plain(short).last_hidden_state)


@pytest.mark.parametrize("layout", ["moe_mtp", "released"])
def test_subfolder_is_honoured_for_both_layouts(tmp_path, layout):
    from conversion_fixtures import tiny_config as release_config
    from conversion_fixtures import write_released

    if layout == "moe_mtp":
        MoeMtpForCausalLM(tiny_config()).save_pretrained(tmp_path / "repo" / "sub")
    else:
        write_released(tmp_path / "repo" / "sub", release_config())
    model, info = MoeMtpForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub", output_loading_info=True)
    assert isinstance(model, MoeMtpForCausalLM) and not info["missing_keys"]


# ------------------------------------------------------------------------------------------------------ deprecations

# Run with every FutureWarning and DeprecationWarning turned into an error, as `python -W error::...` does.
WARNING_PATHS = r"""
import subprocess, sys, tempfile, warnings
sys.path.insert(0, "tests")
import torch
from conftest import tiny_config
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from moe_mtp import MoeMtpForCausalLM, MoeMtpModel
from moe_mtp.training import MoeMtpCallback

# Not ours: peft (0.21) reads the deprecated `is_gradient_checkpointing` of every model it wraps.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

folder = tempfile.mkdtemp()
config = tiny_config(num_nextn_predict_layers=1)
model = MoeMtpForCausalLM(config)
input_ids = torch.randint(3, 100, (2, 12))
model(input_ids, labels=input_ids).loss.backward()
model.eval()
model.generate(input_ids, max_new_tokens=4, do_sample=False)
model.generate(input_ids, max_new_tokens=4, do_sample=False, use_mtp=True)
model.save_pretrained(folder + "/causal")
MoeMtpForCausalLM.from_pretrained(folder + "/causal")
MoeMtpModel(config).save_pretrained(folder + "/base")
MoeMtpModel.from_pretrained(folder + "/base")
lora = get_peft_model(MoeMtpForCausalLM(config), LoraConfig(r=4, target_modules=["q_b_proj", "gate_proj"]))
args = TrainingArguments(folder + "/trainer", max_steps=1, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True)
rows = input_ids.tolist()
data = Dataset.from_dict({"input_ids": rows, "labels": rows})
Trainer(model=lora, args=args, train_dataset=data, callbacks=[MoeMtpCallback()]).train()
flags = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]
subprocess.run([sys.executable, *flags, "-m", "moe_mtp.conversion", folder + "/causal", folder + "/released",
                "--to", "deepseek", "--dtype", "fp8"], check=True)
print("no warning")
"""


def test_main_paths_raise_no_deprecation_warning():
    """Forward with labels, generate with and without MTP, save/load of both classes, a LoRA Trainer step and the
    conversion CLI, under `-W error::FutureWarning -W error::DeprecationWarning`."""
    import subprocess
    import sys

    flags = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]
    result = subprocess.run([sys.executable, *flags, "-c", WARNING_PATHS], capture_output=True, text=True)
    assert result.returncode == 0 and "no warning" in result.stdout, result.stderr[-4000:]
