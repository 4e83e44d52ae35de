"""`from_pretrained` on broken and unusual folders: a named error before any model is built, never a silent
success with random weights; releases are recognized by alias and by `architectures` as the converter does."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conversion_fixtures import INDEX, V2_LITE, edit_shard, tiny_config, write_moe_mtp, write_released
from safetensors.torch import load_file, save_file

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.conversion import ConversionError
from moe_mtp.modeling import modeling_moe_mtp

EXPERT = "model.layers.2.mlp.experts.5.gate_proj.weight"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A released FP8 folder with two MTP modules, and the moe_mtp state dict it was made from."""
    return write_released(tmp_path_factory.mktemp("release") / "src", tiny_config(num_nextn_predict_layers=2))


@pytest.fixture
def src(release, tmp_path):
    return Path(shutil.copytree(release[0], tmp_path / "src"))


@pytest.fixture(scope="module")
def reference(release):
    """The release loaded the ordinary way (model_type deepseek_v3)."""
    return MoeMtpForCausalLM.from_pretrained(release[0], dtype=torch.float32).state_dict()


def edit_config(folder: Path, **fields):
    config = json.loads((folder / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensors(folder: Path, prefix: str):
    """Remove every tensor whose name starts with `prefix`, from the shards and the index."""
    index = json.loads((folder / INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(folder / shard)
        save_file({k: v for k, v in tensors.items() if not k.startswith(prefix)}, folder / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(prefix)}
    (folder / INDEX).write_text(json.dumps(index))


def load(folder, **kwargs):
    return MoeMtpForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a model gets constructed: the error must come first."""

    def refuse(self, config):
        raise AssertionError("a model was built")

    monkeypatch.setattr(modeling_moe_mtp.MoeMtpModel, "__init__", refuse)


@pytest.mark.parametrize(
    "fields",
    [{"model_type": "kimi_k2"}, {"model_type": None}, {"model_type": "deepseek_v3_custom"}],
    ids=["alias kimi_k2", "architectures only", "custom model_type with DeepseekV3 architecture"],
)
def test_releases_are_recognized_as_the_converter_recognizes_them(src, reference, fields):
    edit_config(src, **fields)
    model = load(src)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key  # FP8 dequantized, MTP loaded: nothing random


def test_missing_config_is_an_error_before_any_model_is_built(src, nothing_built):
    (src / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"config\.json: not found.*config="):
        load(src)


@pytest.mark.parametrize("text", ["{not json", "[" * 200_000 + "]" * 200_000, '{"model_type": 3}'])
def test_malformed_config_names_the_file(src, nothing_built, text):
    (src / "config.json").write_text(text)
    with pytest.raises(ConversionError, match=str(src / "config.json")):
        load(src)


@pytest.mark.parametrize("kind", ["release", "moe_mtp"])
def test_malformed_index_names_the_file(src, tmp_path, nothing_built, kind):
    folder = src if kind == "release" else write_moe_mtp(tmp_path / "ours", tiny_config())[0]
    (folder / INDEX).write_text('{"weight_map": ["model-00001-of-00002.safetensors"]}')
    with pytest.raises(ConversionError, match=str(folder / INDEX)):
        load(folder)


def test_a_shard_left_out_of_the_index_is_an_error(src, nothing_built):
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "00002-of" not in v}
    (src / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="does not list model-00002-of-00003.safetensors"):
        load(src)


def test_missing_main_weights_are_an_error_unless_allowed(src, reference, caplog):
    edit_shard(src, EXPERT)
    edit_shard(src, EXPERT + "_scale_inv")
    with pytest.raises(ConversionError, match=rf"'{EXPERT}'.*allow_missing_weights=True"):
        load(src)
    with caplog.at_level(logging.WARNING):
        model = load(src, allow_missing_weights=True)
    assert "1 tensor(s) missing" in caplog.text and EXPERT in caplog.text
    # Only expert 5's gate is new: the layer's other experts (stacked in the same parameter) come from the folder.
    gate_up, want = model.model.layers[2].mlp.experts.gate_up_proj, reference["model.layers.2.mlp.experts.gate_up_proj"]
    width = model.config.moe_intermediate_size
    assert torch.isfinite(gate_up).all() and gate_up[5, :width].std() > 0
    assert not torch.equal(gate_up[5, :width], want[5, :width]) and torch.equal(gate_up[5, width:], want[5, width:])
    assert torch.equal(gate_up[:5], want[:5]) and torch.equal(gate_up[6:], want[6:])


@pytest.mark.parametrize("kind", ["release", "moe_mtp"])
def test_wrong_dtypes_and_scales_are_named_errors(src, tmp_path, nothing_built, kind):
    if kind == "release":
        key = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
        edit_shard(src, key, torch.tensor([[float("nan"), 1.0]]))
        folder = src
    else:
        folder = write_moe_mtp(tmp_path / "ours", tiny_config())[0]
        key = "model.norm.weight"
        edit_shard(folder, key, torch.full((192,), 16256, dtype=torch.int16))
    with pytest.raises(ConversionError, match=key):
        load(folder)


def test_missing_weights_of_a_moe_mtp_folder_are_an_error(tmp_path, nothing_built):
    folder, _ = write_moe_mtp(tmp_path / "ours", tiny_config())
    edit_shard(folder, EXPERT)
    with pytest.raises(ConversionError, match=rf"'{EXPERT}'.*allow_missing_weights"):
        load(folder)


@pytest.mark.parametrize("kind", ["release", "moe_mtp"])
def test_fewer_mtp_modules_than_the_config_asks_load_with_a_note(release, src, tmp_path, caplog, kind):
    """Starting MTP training from a checkpoint that has fewer modules: the missing ones are initialized."""
    ours = release[1]
    if kind == "release":
        folder, prefix = src, "model.layers.4."  # MTP module 1 is released as layer N+1
    else:
        folder, ours = write_moe_mtp(tmp_path / "ours", tiny_config(num_nextn_predict_layers=2))
        prefix = "model.mtp_layers.1."
    drop_tensors(folder, prefix)
    with caplog.at_level(logging.WARNING):
        model = load(folder)
    assert len(model.model.mtp_layers) == 2
    assert "holds 1 of the 2 MTP module(s)" in caplog.text and "newly initialized" in caplog.text
    hnorm = model.model.mtp_layers[0].hnorm.weight
    assert torch.equal(hnorm, ours["model.mtp_layers.0.hnorm.weight"].float())


def test_missing_router_bias_is_a_one_line_note(src, caplog):
    edit_shard(src, "model.layers.1.mlp.gate.e_score_correction_bias")
    with caplog.at_level(logging.WARNING):
        model = load(src)
    notes = [r.getMessage() for r in caplog.records if "router bias" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "start at zero" in notes[0]
    assert not model.model.layers[1].mlp.gate.e_score_correction_bias.any()


def test_v2_releases_store_no_router_bias_and_get_no_note(tmp_path, caplog):
    folder, _ = write_released(tmp_path / "v2", tiny_config(**V2_LITE), fp8=False)
    with caplog.at_level(logging.WARNING):
        load(folder)
    assert "router bias" not in caplog.text


def test_base_model_folders_round_trip_and_stay_strict(tmp_path):
    """`MoeMtpModel.save_pretrained` stores names without the `model.` prefix and no head: such a folder loads back
    into the base model exactly, into the CausalLM with only the head new, and a truly missing tensor still fails."""
    from moe_mtp import MoeMtpModel

    config = tiny_config(num_nextn_predict_layers=1)
    base = MoeMtpModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    input_ids = torch.randint(3, config.vocab_size, (2, 9))
    expected = base(input_ids).last_hidden_state

    reloaded = MoeMtpModel.from_pretrained(tmp_path / "base").eval()
    torch.testing.assert_close(reloaded(input_ids).last_hidden_state, expected, rtol=0, atol=0)
    assert len(reloaded.mtp_layers) == 1

    causal, info = MoeMtpForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"}
    torch.testing.assert_close(causal.model.eval()(input_ids).last_hidden_state, expected, rtol=0, atol=0)

    # A CausalLM folder loads into the base model too.
    causal.save_pretrained(tmp_path / "causal")
    from_causal = MoeMtpModel.from_pretrained(tmp_path / "causal").eval()
    torch.testing.assert_close(from_causal(input_ids).last_hidden_state, expected, rtol=0, atol=0)

    shard = tmp_path / "base" / "model.safetensors"
    tensors = load_file(shard)
    del tensors["layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing from the source \(moe_mtp_base layout\).*experts\.3\.up_proj"):
        MoeMtpModel.from_pretrained(tmp_path / "base")
