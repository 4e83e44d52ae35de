"""MoeMtpConfig: validation rules, released DeepSeek configs, serialization, defaults and derived values."""

from __future__ import annotations

import json
import re

import pytest
from conftest import reference_config

from moe_mtp.configuration import MoeMtpConfig, preset

POSITIVE_INTS = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group",
    "topk_group", "moe_layer_freq",
]  # fmt: skip
NON_NEGATIVE_INTS = ["n_routed_experts", "n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"]
TRAINING_KNOBS = ["mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha"]


def tiny(**overrides) -> MoeMtpConfig:
    """The "tiny" preset: 8 experts in 4 groups of which 2 are eligible per token, so 4 experts are reachable."""
    return preset("tiny", **overrides)


def _case(field, overrides, id):
    return pytest.param(field, overrides, id=id)


INVALID = [
    *[_case(f, {f: 0}, f"{f}-zero") for f in POSITIVE_INTS],
    *[_case(f, {f: 2.0}, f"{f}-float") for f in POSITIVE_INTS],
    *[_case(f, {f: -1}, f"{f}-negative") for f in NON_NEGATIVE_INTS],
    _case("q_lora_rank", {"q_lora_rank": 0}, "q_lora_rank-zero"),
    _case("q_lora_rank", {"q_lora_rank": 16.0}, "q_lora_rank-float"),
    _case("qk_rope_head_dim", {"qk_rope_head_dim": 7}, "qk_rope_head_dim-odd"),
    _case("scoring_func", {"scoring_func": "tanh"}, "scoring_func-unknown"),
    _case("topk_method", {"topk_method": "top_p"}, "topk_method-unknown"),
    _case("hidden_act", {"hidden_act": "tanh"}, "hidden_act-unknown"),
    _case("n_routed_experts", {"n_routed_experts": 9}, "n_routed_experts-not-divisible-by-n_group"),
    _case("topk_group", {"topk_group": 5}, "topk_group-above-n_group"),
    # Group-limited methods reach only topk_group * experts-per-group = 4 of the 8 experts.
    *[
        _case("num_experts_per_tok", {"topk_method": m, "num_experts_per_tok": 5}, f"num_experts_per_tok-{m}")
        for m in ("noaux_tc", "group_limited_greedy")
    ],
    _case("num_experts_per_tok", {"num_experts_per_tok": 0}, "num_experts_per_tok-zero"),
    # Greedy ignores groups, so the bound is all routed experts.
    _case(
        "num_experts_per_tok",
        {"topk_method": "greedy", "scoring_func": "softmax", "num_experts_per_tok": 9},
        "num_experts_per_tok-greedy",
    ),
    # noaux_tc ranks groups by the sum of their top-2 scores: one-expert groups are meaningless.
    _case("n_group", {"n_group": 8, "topk_group": 4, "num_experts_per_tok": 4}, "n_group-noaux_tc-single-expert"),
    *[_case(f, {f: -0.1}, f"{f}-negative") for f in TRAINING_KNOBS],
    _case("rope_parameters", {"rope_parameters": {"rope_type": "ntk_by_parts", "factor": 2.0}}, "rope_type-unknown"),
    _case("rope_parameters", {"rope_parameters": {"rope_type": "yarn"}}, "rope-yarn-without-factor"),
    _case("rope_parameters", {"rope_parameters": {"rope_type": "linear"}}, "rope-linear-without-factor"),
    _case(
        "rope_parameters",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5}},
        "rope-partial-rotary-factor",
    ),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID)
def test_invalid_value_names_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"MoeMtpConfig\.{re.escape(field)}\b"):
        tiny(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="tiny"),
        pytest.param({"q_lora_rank": None}, id="no-query-compression"),
        pytest.param({"n_routed_experts": 0}, id="dense-only"),
        pytest.param({"num_nextn_predict_layers": 0}, id="no-mtp"),
        pytest.param({"num_experts_per_tok": 4}, id="all-reachable-experts"),
        pytest.param({"topk_method": "greedy", "scoring_func": "softmax", "num_experts_per_tok": 8}, id="greedy-all"),
        # The top-2 restriction is specific to noaux_tc.
        pytest.param(
            {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 4},
            id="group_limited_greedy-single-expert-groups",
        ),
        pytest.param({k: 0 for k in TRAINING_KNOBS}, id="training-knobs-off"),
        pytest.param({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, id="yarn"),
        pytest.param({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, id="linear"),
        pytest.param({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, id="dynamic"),
    ],
)
def test_valid_edge_cases(overrides):
    tiny(**overrides)


def _released(name: str) -> dict:
    config = reference_config(name)
    config["model_type"] = "moe_mtp"
    return config


@pytest.mark.parametrize(
    ("name", "mscale", "q_lora_rank"),
    [
        pytest.param("deepseek_v3_config.json", 1.0, 1536, id="deepseek-v3"),
        pytest.param("deepseek_v2_lite_config.json", 0.707, None, id="deepseek-v2-lite"),
    ],
)
def test_released_configs_load(name, mscale, q_lora_rank):
    raw = _released(name)
    config = MoeMtpConfig(**raw)

    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn"
    assert rope["factor"] == 40
    assert rope["mscale"] == mscale
    assert rope["mscale_all_dim"] == mscale
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["rope_theta"] == raw["rope_theta"]
    assert config.q_lora_rank == q_lora_rank
    for field in ("n_routed_experts", "num_experts_per_tok", "topk_method", "scoring_func", "kv_lora_rank"):
        assert getattr(config, field) == raw[field], field
    assert config.cache_dim == 512 + 64


def test_released_v3_layout():
    config = MoeMtpConfig(**_released("deepseek_v3_config.json"))
    assert config.num_mtp_layers == 1
    assert [config.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    # The MTP block is stored as layer 61 and is an MoE layer.
    assert config.is_moe_layer(config.num_hidden_layers)


def test_save_pretrained_round_trip(tmp_path):
    config = tiny(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
        mtp_loss_weight=0.1,
        bias_update_speed=0.0,
        q_lora_rank=None,
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "moe_mtp"

    loaded = MoeMtpConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.q_lora_rank is None
    assert loaded.rope_parameters["rope_type"] == "yarn"
    assert loaded.mtp_loss_weight == 0.1


def test_training_knob_defaults():
    config = MoeMtpConfig()
    # DeepSeek-V3 report: lambda = 0.3 (first 10T tokens), gamma = 0.001, alpha = 0.0001.
    assert config.mtp_loss_weight == 0.3
    assert config.bias_update_speed == 1e-3
    assert config.seq_aux_loss_alpha == 1e-4


def test_num_mtp_layers_alias():
    config = tiny(num_nextn_predict_layers=3)
    assert config.num_mtp_layers == config.num_nextn_predict_layers == 3
    assert tiny(num_mtp_layers=2).num_nextn_predict_layers == 2


def test_cache_dim():
    config = tiny()
    assert config.cache_dim == config.kv_lora_rank + config.qk_rope_head_dim == 24
    assert MoeMtpConfig().cache_dim == 576


def test_is_moe_layer():
    # 3 dense layers, 2 MoE layers, then 2 MTP blocks (indices 5 and 6).
    config = tiny(num_hidden_layers=5, first_k_dense_replace=3, num_nextn_predict_layers=2)
    assert [config.is_moe_layer(i) for i in range(7)] == [False] * 3 + [True] * 4

    dense = tiny(n_routed_experts=0)
    assert not any(dense.is_moe_layer(i) for i in range(3))

    every_other = tiny(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [every_other.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
