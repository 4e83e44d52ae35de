"""Checkpoint conversion between the released deepseek layout, transformers' classes and moe_mtp."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import reference_config
from conversion_fixtures import (
    V2_LITE,
    load_folder,
    released_as_fp8,
    released_state_dict,
    same_bits,
    tiny_config,
    write_checkpoint,
    write_moe_mtp,
    write_released,
)
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from moe_mtp.configuration import MoeMtpConfig
from moe_mtp.conversion import (
    canonical_shapes,
    convert,
    convert_state_dict,
    deepseek_config_dict,
    dequantize_block_fp8,
    inspect,
    load_state_dict_from_folder,
    moe_mtp_config_dict,
    quantize_block_fp8,
    read_config_dict,
    transformers_config,
)
from moe_mtp.conversion.cli import main
from moe_mtp.conversion.fp8 import scale_shape
from moe_mtp.conversion.layouts import layout_groups
from moe_mtp.conversion.rules import DEEPSEEK


def dequantized(folder_tensors: dict, key: str, dtype=torch.bfloat16):
    return dequantize_block_fp8(folder_tensors[key], folder_tensors[key + "_scale_inv"], dtype=dtype)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-style FP8 checkpoint (3 shards) and the moe_mtp state dict it was made from."""
    config = tiny_config()
    folder, ours = write_released(tmp_path_factory.mktemp("released") / "v3", config)
    return config, folder, ours


# ------------------------------------------------------------------------------------------------- round trips


def test_fp8_release_to_fp32_and_back_gives_the_same_fp8_bytes(released, tmp_path):
    config, src, _ = released
    convert(src, tmp_path / "ours", dtype="fp32", progress=False)
    convert(tmp_path / "ours", tmp_path / "back", dst_format="deepseek", dtype="fp8", progress=False)
    before, after = load_folder(src), load_folder(tmp_path / "back")
    assert set(before) == set(after)
    for key, tensor in before.items():
        if key.endswith("_scale_inv"):
            torch.testing.assert_close(after[key], tensor, rtol=2.0**-23, atol=0)  # float32 rounding at most
        else:
            assert same_bits(after[key], tensor), key
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_fp8_release_to_moe_mtp_dequantizes_exactly(released, tmp_path):
    config, src, _ = released
    summary = convert(src, tmp_path / "ours", progress=False)
    out, raw = load_folder(tmp_path / "ours"), load_folder(src)
    n = config.num_hidden_layers
    assert set(out) == set(canonical_shapes(config))
    for key, tensor in out.items():
        stored = re.sub(r"model\.mtp_layers\.(\d+)\.", lambda m: f"model.layers.{n + int(m[1])}.", key)
        if stored + "_scale_inv" in raw:
            assert same_bits(tensor, dequantized(raw, stored)), key  # default: the release's bf16
        else:
            assert same_bits(tensor, raw[stored]), key
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "moe_mtp" and "quantization_config" not in written
    assert written["rope_parameters"]["rope_type"] == "yarn" and "rope_scaling" not in written
    assert MoeMtpConfig(**written).num_nextn_predict_layers == 1
    assert summary["num_tensors"] == len(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_text() == (src / name).read_text()


def test_moe_mtp_to_deepseek_bf16_and_back_is_bit_exact(tmp_path):
    config = tiny_config(num_nextn_predict_layers=2)
    src, ours = write_moe_mtp(tmp_path / "src", config)
    convert(src, tmp_path / "ds", dst_format="deepseek", shard_size="100KB", progress=False)
    stored = load_folder(tmp_path / "ds")
    assert all(t.dtype != torch.float8_e4m3fn for t in stored.values())
    assert len(list((tmp_path / "ds").glob("*.safetensors"))) > 3  # sharded at 100KB
    convert(tmp_path / "ds", tmp_path / "back", progress=False)
    back = load_folder(tmp_path / "back")
    assert set(back) == set(ours) and all(same_bits(back[k], ours[k]) for k in ours)
    before = json.loads((src / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    for field in (
        "mtp_loss_weight",
        "mtp_loss_targets",
        "bias_update_speed",
        "seq_aux_loss_alpha",
        "dtype",
        "transformers_version",
    ):
        before.pop(field, None), after.pop(field, None)
    assert after == before


def test_moe_mtp_to_deepseek_fp8_and_back_is_within_fp8_error(tmp_path):
    config = tiny_config()
    src, ours = write_moe_mtp(tmp_path / "src", config, dtype=torch.float32)
    convert(src, tmp_path / "fp8", dst_format="deepseek", dtype="fp8", progress=False)
    stored = load_folder(tmp_path / "fp8")
    quantized = {k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    # exactly the release's choice: attention and MLP projections of every layer, MTP's included, not eh_proj
    by_hand = released_state_dict(ours, config)
    expected = {k for k in by_hand if k + "_scale_inv" in by_hand}
    assert quantized == expected
    assert {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.3.mlp.experts.7.down_proj.weight", "model.layers.3.mlp.shared_experts.up_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.3.self_attn.q_b_proj.weight"} <= quantized  # fmt: skip
    assert stored["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.3.eh_proj.weight_scale_inv" not in stored
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert stored["model.layers.3.shared_head.head.weight"].dtype == torch.bfloat16
    convert(tmp_path / "fp8", tmp_path / "back", dtype="fp32", progress=False)
    back = load_folder(tmp_path / "back")
    for key, tensor in ours.items():
        err = (back[key] - tensor).abs()
        if key.endswith("e_score_correction_bias"):
            assert err.max() == 0
        elif tensor.dim() == 2 and "proj" in key:
            assert (err <= tensor.abs() * 2.0**-4 + 1e-6).all(), key  # half an e4m3 ulp
        else:
            assert (err <= tensor.abs() * 2.0**-8).all(), key  # bf16 rounding


def test_fp8_to_fp8_with_ue8m0_scales(released, tmp_path):
    config, src, _ = released
    convert(src, tmp_path / "ue8m0", dst_format="deepseek", dtype="fp8", scale_fmt="ue8m0", progress=False)
    stored = load_folder(tmp_path / "ue8m0")
    scales = [t for k, t in stored.items() if k.endswith("_scale_inv")]
    assert scales and all(torch.equal(torch.log2(s), torch.log2(s).round()) for s in scales)
    quantization = json.loads((tmp_path / "ue8m0" / "config.json").read_text())["quantization_config"]
    assert quantization["scale_fmt"] == "ue8m0"
    # an FP8 source keeps its scale format by default, and e8m0-typed scales load too
    convert(tmp_path / "ue8m0", tmp_path / "again", dst_format="deepseek", progress=False)
    assert all(same_bits(t, stored[k]) for k, t in load_folder(tmp_path / "again").items())


def test_fp8_that_the_release_would_not_quantize_stays_fp8_into_deepseek(released, tmp_path):
    """A checkpoint that differs from the release (here an FP8 eh_proj): kept as FP8 bytes and scale, and read
    dequantized like any FP8 weight."""
    config, src, _ = released
    tensors = load_folder(src)
    key = "model.layers.3.eh_proj.weight"
    tensors[key], tensors[key + "_scale_inv"] = quantize_block_fp8(tensors[key].float())
    write_checkpoint(tmp_path / "src", tensors, json.loads((src / "config.json").read_text()))
    convert(tmp_path / "src", tmp_path / "same", dst_format="deepseek", progress=False)
    same = load_folder(tmp_path / "same")
    assert set(same) == set(tensors) and all(same_bits(same[k], tensors[k]) for k in tensors)
    ours = load_folder(convert(tmp_path / "src", tmp_path / "ours", progress=False)["dst"])
    assert same_bits(ours["model.mtp_layers.0.eh_proj.weight"], dequantized(tensors, key))


def test_mtp_modules_sit_at_layer_n_plus_k(tmp_path):
    # moe_layer_freq=2: layer 2 is MoE; MTP k=0 (layer 3) dense, k=1 (layer 4) MoE
    config = tiny_config(num_nextn_predict_layers=2, moe_layer_freq=2)
    src, ours = write_moe_mtp(tmp_path / "src", config)
    convert(src, tmp_path / "ds", dst_format="deepseek", progress=False)
    stored = load_folder(tmp_path / "ds")
    layers = {int(m[1]) for k in stored if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layers == {0, 1, 2, 3, 4}
    assert "model.layers.3.mlp.gate_proj.weight" in stored and "model.layers.4.mlp.experts.7.up_proj.weight" in stored
    for k in (3, 4):
        assert same_bits(stored[f"model.layers.{k}.embed_tokens.weight"], ours["model.embed_tokens.weight"])
        assert same_bits(stored[f"model.layers.{k}.shared_head.head.weight"], ours["lm_head.weight"])
        assert same_bits(stored[f"model.layers.{k}.eh_proj.weight"], ours[f"model.mtp_layers.{k - 3}.eh_proj.weight"])
    assert not any(k.startswith("model.mtp_layers") for k in stored)
    assert read_config_dict(tmp_path / "ds")["num_nextn_predict_layers"] == 2
    assert inspect(tmp_path / "ds")["mtp_modules"] == 2


def test_tied_embeddings_write_no_lm_head(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    src, ours = write_moe_mtp(tmp_path / "src", config)
    assert "lm_head.weight" not in ours
    convert(src, tmp_path / "ds", dst_format="deepseek", progress=False)
    stored = load_folder(tmp_path / "ds")
    assert "lm_head.weight" not in stored
    assert same_bits(stored["model.layers.3.shared_head.head.weight"], ours["model.embed_tokens.weight"])
    convert(tmp_path / "ds", tmp_path / "back", progress=False)
    assert set(load_folder(tmp_path / "back")) == set(ours)


# ----------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("kind", ["v3", "v2_lite", "v2_grouped", "v3_tied"])
def test_transformers_layout_matches_transformers_own_classes(kind):
    overrides = {
        "v3": {},
        "v2_lite": V2_LITE,
        "v2_grouped": {**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
        "v3_tied": {"tie_word_embeddings": True, "q_lora_rank": None},
    }[kind]
    config = tiny_config(**overrides)
    tc = transformers_config(config)
    model_class = DeepseekV3ForCausalLM if isinstance(tc, DeepseekV3Config) else DeepseekV2ForCausalLM
    assert isinstance(tc, DeepseekV2Config) == kind.startswith("v2")
    model = model_class(tc)
    reference = model.state_dict()
    ours = convert_state_dict(reference, config, "transformers", "moe_mtp")
    mtp_free = {k: v for k, v in canonical_shapes(config).items() if not k.startswith("model.mtp_layers")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == mtp_free
    if kind.startswith("v2"):  # V2 routing has no bias: it reads as zeros
        assert not ours["model.layers.1.mlp.gate.e_score_correction_bias"].any()
    back = convert_state_dict(ours, config, "moe_mtp", "transformers")
    assert set(back) == set(reference) and all(torch.equal(back[k], reference[k]) for k in reference)
    model.load_state_dict(back, strict=True)
    expert = model.model.layers[1].mlp.experts
    gate_e3 = ours["model.layers.1.mlp.experts.3.gate_proj.weight"]
    up_e3 = ours["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert torch.equal(expert.gate_up_proj[3], torch.cat([gate_e3, up_e3]))
    assert torch.equal(expert.down_proj[3], ours["model.layers.1.mlp.experts.3.down_proj.weight"])


def test_moe_mtp_to_transformers_and_back_is_bit_exact(tmp_path):
    config = tiny_config()
    src, ours = write_moe_mtp(tmp_path / "src", config)
    with pytest.warns(UserWarning, match="no MTP modules"):
        in_memory = convert_state_dict(ours, config, "moe_mtp", "transformers")
    assert "model.layers.1.mlp.experts.gate_up_proj" in in_memory
    convert(src, tmp_path / "hf", dst_format="transformers", progress=False)
    stored = load_folder(tmp_path / "hf")
    assert set(stored) == set(in_memory) and all(same_bits(stored[k], in_memory[k]) for k in stored)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "deepseek_v3" and hf_config["num_nextn_predict_layers"] == 0
    model = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")  # transformers loads it as is
    assert torch.equal(
        model.model.layers[2].mlp.experts.down_proj.data, in_memory["model.layers.2.mlp.experts.down_proj"]
    )
    convert(tmp_path / "hf", tmp_path / "back", progress=False)
    back = load_folder(tmp_path / "back")
    main = {k: v for k, v in ours.items() if not k.startswith("model.mtp_layers")}
    assert set(back) == set(main) and all(same_bits(back[k], main[k]) for k in main)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_folder_saved_by_transformers_reads_as_deepseek_layout(tmp_path):
    config = tiny_config(**V2_LITE)
    model = DeepseekV2ForCausalLM(transformers_config(config))
    model.save_pretrained(tmp_path / "hf")  # transformers 5 writes per-expert keys again
    convert(tmp_path / "hf", tmp_path / "ours", progress=False)
    out = load_folder(tmp_path / "ours")
    expected = convert_state_dict(model.state_dict(), config, "transformers", "moe_mtp")
    assert set(out) == set(expected) and all(torch.equal(out[k], expected[k]) for k in out)
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["scoring_func"], written["topk_method"], written["n_group"]) == ("softmax", "greedy", 1)
    assert "head_dim" not in written and "qk_head_dim" not in written


# ----------------------------------------------------------------------------------------------- from_pretrained


def test_load_state_dict_from_folder(released):
    config, src, ours = released
    assert read_config_dict(src)["model_type"] == "moe_mtp"
    loaded = load_state_dict_from_folder(src, config, dtype=torch.float32)
    raw = load_folder(src)
    assert set(loaded) == set(canonical_shapes(config))
    key = "model.mtp_layers.0.mlp.experts.5.down_proj.weight"
    assert same_bits(loaded[key], dequantized(raw, "model.layers.3.mlp.experts.5.down_proj.weight", torch.float32))
    assert same_bits(loaded["model.norm.weight"], ours["model.norm.weight"].float())
    assert loaded["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------------ configs


def test_released_v3_config_translates_and_back():
    released = reference_config("deepseek_v3_config.json")
    ours = moe_mtp_config_dict(released)
    assert ours["model_type"] == "moe_mtp" and ours["architectures"] == ["MoeMtpForCausalLM"]
    assert "quantization_config" not in ours and "auto_map" not in ours and "rope_scaling" not in ours
    assert ours["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 10000, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096,
    }  # fmt: skip
    config = MoeMtpConfig(**ours)
    assert config.num_nextn_predict_layers == 1 and config.is_moe_layer(61)
    back = deepseek_config_dict(ours, released["quantization_config"])
    # the release's "4.33.1" is replaced by the transformers that wrote the conversion
    assert ours["transformers_version"] == back.pop("transformers_version") == transformers.__version__
    dropped = {"auto_map", "transformers_version"}
    assert back == {k: v for k, v in released.items() if k not in dropped}


def test_released_v2_lite_config_translates():
    released = reference_config("deepseek_v2_lite_config.json")
    config = MoeMtpConfig(**moe_mtp_config_dict(released))
    assert (config.scoring_func, config.topk_method, config.q_lora_rank) == ("softmax", "greedy", None)
    assert config.num_nextn_predict_layers == 0 and config.n_shared_experts == 2
    assert deepseek_config_dict(moe_mtp_config_dict(released))["model_type"] == "deepseek_v2"


def test_v2_sequence_wise_aux_loss_maps_to_seq_aux_loss_alpha():
    released = reference_config("deepseek_v2_lite_config.json")
    assert (released["aux_loss_alpha"], released["seq_aux"]) == (0.001, True)
    ours = moe_mtp_config_dict(released)
    assert (ours["seq_aux_loss_alpha"], ours["aux_loss_alpha"], ours["seq_aux"]) == (0.001, 0.001, True)
    assert MoeMtpConfig(**ours).seq_aux_loss_alpha == 0.001
    back = deepseek_config_dict(ours)
    # V2's own keys restored, ours not written; the version is the transformers that wrote it
    assert back == {**released, "transformers_version": transformers.__version__} and "seq_aux_loss_alpha" not in back
    # seq_aux false: V2's batch-wise loss, which moe_mtp has not: the default stays, nothing is dropped
    batch_wise = moe_mtp_config_dict({**released, "seq_aux": False})
    assert "seq_aux_loss_alpha" not in batch_wise and batch_wise["aux_loss_alpha"] == 0.001
    assert MoeMtpConfig(**batch_wise).seq_aux_loss_alpha == MoeMtpConfig().seq_aux_loss_alpha
    assert deepseek_config_dict(batch_wise) == {
        **released,
        "seq_aux": False,
        "transformers_version": transformers.__version__,
    }


def test_transformers_config_copies_the_architecture():
    config = tiny_config()
    tc = transformers_config(config)
    assert tc.rope_interleave and tc.num_key_value_heads == config.num_attention_heads
    assert tc.rope_parameters == config.rope_parameters
    mine = MoeMtpConfig(**moe_mtp_config_dict(tc.to_dict()))
    for field in ("hidden_size", "n_routed_experts", "q_lora_rank", "first_k_dense_replace", "rope_parameters"):
        assert getattr(mine, field) == getattr(config, field)


def test_v3_parameter_counts_from_the_reference_config():
    """671B main-model parameters and 37B active per token (the V3 report), from the shapes alone."""
    config = MoeMtpConfig(**moe_mtp_config_dict(reference_config("deepseek_v3_config.json")))
    shapes = canonical_shapes(config)
    numel = {k: torch.Size(s).numel() for k, s in shapes.items()}
    main = sum(v for k, v in numel.items() if not k.startswith("model.mtp_layers"))
    routed = sum(v for k, v in numel.items() if ".experts." in k and not k.startswith("model.mtp_layers"))
    active = main - routed + routed * 8 // 256
    assert abs(main / 1e9 - 671) < 1 and abs(active / 1e9 - 37) < 1
    mtp_with_copies = sum(v for k, v in numel.items() if k.startswith("model.mtp_layers")) + 2 * 129280 * 7168
    assert abs((main + mtp_with_copies) / 1e9 - 685) < 1  # the size the release reports


def test_release_fp8_rule_over_every_v3_tensor():
    """The converter's FP8 rule picks, among all DeepSeek-V3 tensors, exactly what the release stores as FP8."""
    config = MoeMtpConfig(**moe_mtp_config_dict(reference_config("deepseek_v3_config.json")))
    shapes = canonical_shapes(config)
    groups, _ = layout_groups(DEEPSEEK, config, shapes)
    names = {g.key: g.shape for g in groups}
    fp8 = {k for k in names if re.fullmatch(DEEPSEEK.fp8, k)}
    assert fp8 == {k for k in names if released_as_fp8(k)}
    assert "model.layers.61.eh_proj.weight" in names and "model.layers.61.eh_proj.weight" not in fp8
    for layer in (0, 3, 61):  # dense, MoE, MTP
        assert f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight" in fp8
        assert f"model.layers.{layer}.mlp.gate.weight" not in fp8
    assert "model.layers.61.mlp.experts.255.down_proj.weight" in fp8
    assert "model.layers.0.mlp.gate_proj.weight" in fp8 and "model.layers.5.mlp.shared_experts.up_proj.weight" in fp8
    kv_a = names["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a == (576, 7168) and scale_shape(kv_a) == (5, 56)  # the release's scale shape
    # every FP8 weight is 2-D, and nothing else in the release is FP8 (norms, embeddings, heads, router, eh_proj)
    assert all(len(names[k]) == 2 for k in fp8)
    assert not any(re.search(r"norm|embed_tokens|head|e_score_correction_bias|eh_proj", k) for k in fp8)


@pytest.mark.parametrize(
    "name, fp8",
    [
        ("model.layers.0.self_attn.q_a_proj.weight", True),
        ("model.layers.0.self_attn.q_b_proj.weight", True),
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
        ("model.layers.0.self_attn.kv_b_proj.weight", True),
        ("model.layers.0.self_attn.o_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", True),
        ("model.layers.7.mlp.experts.12.gate_proj.weight", True),
        ("model.layers.7.mlp.shared_experts.up_proj.weight", True),
        ("model.layers.62.self_attn.kv_a_proj_with_mqa.weight", True),  # MTP module k=1 of a 61-layer model
        ("model.layers.62.mlp.experts.0.down_proj.weight", True),
        ("model.layers.61.eh_proj.weight", False),
        ("model.layers.7.mlp.gate.weight", False),
        ("model.layers.7.mlp.gate.e_score_correction_bias", False),
        ("model.layers.0.self_attn.kv_a_layernorm.weight", False),
        ("model.layers.0.input_layernorm.weight", False),
        ("model.layers.61.enorm.weight", False),
        ("model.layers.61.embed_tokens.weight", False),
        ("model.layers.61.shared_head.head.weight", False),
        ("model.embed_tokens.weight", False),
        ("lm_head.weight", False),
        ("model.norm.weight", False),
    ],
)
def test_release_fp8_rule(name, fp8):
    assert (re.fullmatch(DEEPSEEK.fp8, name) is not None) == fp8 == released_as_fp8(name)


# ----------------------------------------------------------------------------------------------- inspect, CLI


def test_inspect_counts_by_hand(released):
    config, src, _ = released
    summary = inspect(src)
    h, v, i, mi, e = 192, 256, 200, 72, 8
    attention = 32 * h + 32 + 4 * 32 * 32 + (32 + 16) * h + 32 + 4 * 32 * 32 + h * 4 * 16
    norms = 2 * h
    dense = 3 * h * i
    router = e * h + e
    expert = 3 * h * mi
    shared = 3 * h * mi
    moe_layer = attention + norms + router + e * expert + shared
    dense_layer = attention + norms + dense
    main = v * h + dense_layer + 2 * moe_layer + h + v * h
    mtp = 3 * h + h * 2 * h + moe_layer + 2 * v * h  # enorm, hnorm, shared_head.norm, eh_proj, block, copies
    assert summary["main_params"] == main
    assert summary["mtp_params"] == mtp
    assert summary["total_params"] == main + mtp
    assert summary["active_params"] == main - 2 * e * expert + 2 * 2 * expert
    assert summary["layout"] == "deepseek" and summary["fp8"] and summary["num_files"] == 3
    fp8_values = summary["dtypes"]["float8_e4m3fn"]["elements"]
    assert summary["dtypes"]["float8_e4m3fn"]["bytes"] == fp8_values
    n_scales = summary["dtypes"]["float8_e4m3fn"]["tensors"]
    assert summary["dtypes"]["float32"]["tensors"] == n_scales + 3  # the scales plus 3 router biases (one MTP)
    assert sum(d["tensors"] for d in summary["dtypes"].values()) == summary["num_tensors"]


def test_dry_run_writes_nothing_and_prints_the_summary(released, tmp_path, capsys):
    config, src, _ = released
    summary = convert(src, tmp_path / "out", dry_run=True)
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert f"would write {summary['num_tensors']} tensors" in printed
    assert '~ model_type: "deepseek_v3" -> "moe_mtp"' in printed and "- quantization_config" in printed
    assert "active per token" in printed and "float8_e4m3fn" in printed
    assert summary["num_tensors"] == len(canonical_shapes(config))


def test_existing_destination_needs_force(released, tmp_path):
    _, src, _ = released
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(src), str(dst), "--no-progress"]) == 2
    assert (dst / "keep.txt").read_text() == "mine" and not (tmp_path / "dst.partial").exists()
    assert main([str(src), str(dst), "--no-progress", "--force", "--dtype", "bf16"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()


def test_cli_in_process(released, tmp_path, capsys):
    _, src, _ = released
    assert main([str(src), str(tmp_path / "a"), "--to", "deepseek", "--dtype", "fp8", "--shard-size", "200KB",
                 "--no-progress"]) == 0  # fmt: skip
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    assert main(["--inspect", str(src), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["layout"] == "deepseek"
    assert main([str(src), str(tmp_path / "b"), "--to", "moe_mtp", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "FP8 output needs the deepseek layout" in err and "Traceback" not in err
    assert main([str(src)]) == 2 and main(["--bogus"]) == 2
    assert not (tmp_path / "b").exists()


def test_cli_subprocess_help():
    result = subprocess.run([sys.executable, "-m", "moe_mtp.conversion", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: moe-mtp-convert" in result.stdout and "--dtype" in result.stdout
    assert "path/to/DeepSeek-V3" in result.stdout and "deepseek-ai/" not in result.stdout  # local folders only


def test_cli_source_must_be_a_local_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["deepseek-ai/DeepSeek-V3", "out", "--no-progress"], ["--inspect", "deepseek-ai/DeepSeek-V3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "deepseek-ai/DeepSeek-V3 does not exist" in err and "local checkpoint folder" in err
        assert "download" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_source_without_needed_config_fields(tmp_path, released):
    _, src, _ = released
    ours = tmp_path / "src"
    tensors = load_folder(src)
    config = json.loads((src / "config.json").read_text())
    del config["hidden_size"], config["kv_lora_rank"]
    write_checkpoint(ours, tensors, config, shards=1)
    with pytest.raises(Exception, match="lacks required fields: hidden_size, kv_lora_rank"):
        convert(ours, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_v2_lite_style_checkpoint(tmp_path):
    config = tiny_config(**V2_LITE)
    src, ours = write_released(tmp_path / "v2", config, fp8=False)
    assert not any(k.endswith("e_score_correction_bias") for k in load_folder(src))
    convert(src, tmp_path / "ours", progress=False)
    out = load_folder(tmp_path / "ours")
    assert not out["model.layers.1.mlp.gate.e_score_correction_bias"].any()
    assert "model.layers.0.self_attn.q_proj.weight" in out and "model.layers.0.self_attn.q_a_proj.weight" not in out
    convert(tmp_path / "ours", tmp_path / "back", dst_format="deepseek", progress=False)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "deepseek_v2"


@pytest.mark.parametrize("with_mtp", [True, False])
def test_config_without_mtp_count_takes_it_from_the_weights(tmp_path, with_mtp):
    """Moonlight/Kimi-K2-style configs (model_type kimi_k2 is the V3 architecture) may not give the MTP count."""
    config = tiny_config(num_nextn_predict_layers=1 if with_mtp else 0, q_lora_rank=None)
    src, ours = write_released(tmp_path / "src", config, fp8=False)
    released = json.loads((src / "config.json").read_text())
    del released["num_nextn_predict_layers"]
    released["model_type"] = "kimi_k2"
    (src / "config.json").write_text(json.dumps(released))
    assert read_config_dict(src)["num_nextn_predict_layers"] == (1 if with_mtp else 0)
    convert(src, tmp_path / "ours", progress=False)
    assert set(load_folder(tmp_path / "ours")) == set(ours)


def test_converted_config_carries_the_installed_transformers_version(tmp_path):
    """Not the release's "4.33.1": the config was written by this transformers, in both directions."""
    config = tiny_config()
    src, _ = write_released(tmp_path / "src", config, fp8=False, shards=1)
    released = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**released, "transformers_version": "4.33.1"}))
    convert(src, tmp_path / "ours", progress=False)
    convert(tmp_path / "ours", tmp_path / "back", dst_format="deepseek", progress=False)
    for folder in ("ours", "back"):
        written = json.loads((tmp_path / folder / "config.json").read_text())
        assert written["transformers_version"] == transformers.__version__, folder
