"""config.json translation between the released DeepSeek style, moe_mtp and transformers' built-in classes.

Field names are the released ones in all three. What changes: `model_type`/`architectures`, RoPE (released:
`rope_scaling` with `type` plus `rope_theta`; moe_mtp and transformers: one `rope_parameters` dict with
`rope_type`), `quantization_config` (FP8 checkpoints only), and a few fields only one side has.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

from .errors import ConversionError

MOE_MTP_ARCHITECTURE = "MoeMtpForCausalLM"
V3_TYPES = ("deepseek_v3", "kimi_k2")  # Kimi-K2 and Moonlight ship the DeepSeek-V3 architecture
V2_TYPES = ("deepseek_v2",)

# Fields a released config must spell out: the class defaults of the three sides disagree on them.
REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
    "n_routed_experts",
)  # fmt: skip
REQUIRED_MOE_FIELDS = ("moe_intermediate_size", "num_experts_per_tok", "n_shared_experts")

# Derived or implementation-specific fields of the other sides that moe_mtp does not take.
FOREIGN_FIELDS = ("quantization_config", "auto_map", "head_dim", "qk_head_dim", "rope_interleave", "num_mtp_layers",
                  "torch_dtype", "dtype", "architectures", "model_type")  # fmt: skip
# Training-only fields of moe_mtp that released configs do not have.
MOE_MTP_ONLY_FIELDS = ("mtp_loss_weight", "mtp_loss_targets", "bias_update_speed", "seq_aux_loss_alpha")

# DeepSeek-V2 defaults that differ from moe_mtp's (V3) defaults, used when a V2 config leaves them out.
V2_DEFAULTS = {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
               "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 0}  # fmt: skip

DTYPE_STRINGS = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "fp8": "bfloat16"}


def read_json(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found (a checkpoint folder needs its config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ConversionError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


# Fields whose type is checked before anything reads them (MoeMtpConfig checks the values further).
INT_FIELDS = (*REQUIRED_FIELDS, *REQUIRED_MOE_FIELDS, "num_nextn_predict_layers", "n_group", "topk_group",
              "moe_layer_freq", "max_position_embeddings", "num_key_value_heads")  # fmt: skip
NUMBER_FIELDS = ("rms_norm_eps", "routed_scaling_factor", "rope_theta", "initializer_range", "aux_loss_alpha")
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "norm_topk_prob", "seq_aux", "mlp_bias")
DICT_FIELDS = ("rope_scaling", "rope_parameters", "quantization_config")
ROPE_NUMBER_FIELDS = ("rope_theta", "factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                      "original_max_position_embeddings")  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config_types(config: dict, source: str = "config.json"):
    """Raise ConversionError naming `source` and the field for a value of the wrong JSON type (a string
    `rope_scaling`, a list `architectures`, ...), before any translation reads it. None means "not set"."""

    def fail(field, expected):
        raise ConversionError(f"{source}: {field} must be {expected}, got {config[field]!r}")

    for field in ("model_type",):
        if config.get(field) is not None and not isinstance(config[field], str):
            fail(field, "a string")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        fail("architectures", "a list of class names")
    for field in INT_FIELDS:
        value = config.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            fail(field, "a non-negative integer")
    for field in NUMBER_FIELDS:
        if config.get(field) is not None and not _is_number(config[field]):
            fail(field, "a number")
    for field in BOOL_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], bool):
            fail(field, "true or false")
    for field in DICT_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], dict):
            fail(field, "an object (or null)")
    for field in ("rope_scaling", "rope_parameters"):
        rope = config.get(field) or {}
        for key in ("type", "rope_type"):
            if rope.get(key) is not None and not isinstance(rope[key], str):
                raise ConversionError(f"{source}: {field}.{key} must be a string, got {rope[key]!r}")
        for key in ROPE_NUMBER_FIELDS:
            if rope.get(key) is not None and not _is_number(rope[key]):
                raise ConversionError(f"{source}: {field}.{key} must be a number, got {rope[key]!r}")


def config_family(config: dict, source: str = "config.json") -> str:
    """'moe_mtp', 'deepseek_v3' or 'deepseek_v2', from `model_type` (or `architectures`); the field types are
    checked first (`check_config_types`)."""
    check_config_types(config, source)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "moe_mtp":
        return "moe_mtp"
    if model_type in V3_TYPES or "DeepseekV3ForCausalLM" in architectures:
        return "deepseek_v3"
    if model_type in V2_TYPES or "DeepseekV2ForCausalLM" in architectures:
        return "deepseek_v2"
    raise ConversionError(
        f"{source}: unsupported model_type {model_type!r}; expected moe_mtp, deepseek_v3 (also kimi_k2) or deepseek_v2"
    )


def _rope_parameters(config: dict) -> dict:
    """Released `rope_scaling` + `rope_theta` (or an existing `rope_parameters`) as one `rope_parameters` dict."""
    if config.get("rope_parameters") is not None:
        params = dict(config["rope_parameters"])
    else:
        params = dict(config.get("rope_scaling") or {})
        if "rope_theta" in config:
            params["rope_theta"] = config["rope_theta"]
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.setdefault("rope_theta", 10000.0)
    return {"rope_type": rope_type, **params}


def moe_mtp_config_dict(released: dict) -> dict:
    """Translate a deepseek_v3 / deepseek_v2 / kimi_k2 / transformers config.json dict into a moe_mtp one.

    Drops `quantization_config` (weights are dequantized) and fields moe_mtp derives itself, sets `model_type`
    and `architectures`, folds RoPE into `rope_parameters`, takes V2's sequence-wise `aux_loss_alpha` (with
    `seq_aux: true`) as `seq_aux_loss_alpha`, and keeps every other field as it is.
    """
    family = config_family(released)
    out = copy.deepcopy(released)
    if family != "moe_mtp":
        missing = [f for f in REQUIRED_FIELDS if f not in out]
        if out.get("n_routed_experts"):
            missing += [f for f in REQUIRED_MOE_FIELDS if f not in out]
        if missing:
            raise ConversionError(f"config.json ({family}) lacks required fields: {', '.join(missing)}")
    if out.pop("mlp_bias", False):
        raise ConversionError("config.json: mlp_bias=true is not supported by moe_mtp")
    dtype = out.get("dtype") or out.get("torch_dtype")
    rope = _rope_parameters(out)
    for field in (*FOREIGN_FIELDS, "rope_scaling", "rope_theta"):
        out.pop(field, None)
    if family == "deepseek_v2":
        for field, value in V2_DEFAULTS.items():
            out.setdefault(field, value)
    if family != "moe_mtp" and out.get("seq_aux") and out.get("aux_loss_alpha") is not None:
        # DeepSeek-V2's `seq_aux: true` makes `aux_loss_alpha` a sequence-wise balance loss, which is moe_mtp's.
        # Without it, V2's loss is batch-wise, which moe_mtp has not: seq_aux_loss_alpha keeps its default.
        # Both keys stay, so that converting back restores them.
        out["seq_aux_loss_alpha"] = out["aux_loss_alpha"]
    if family != "moe_mtp":
        out.setdefault("num_nextn_predict_layers", 0)
        if out.get("n_routed_experts") is None:
            out["n_routed_experts"] = 0
        # transformers' V2 config saves n_group/topk_group as null for ungrouped (greedy) routing
        if out.get("n_group") is None:
            out["n_group"] = 1
        if out.get("topk_group") is None:
            out["topk_group"] = out["n_group"]
    out["rope_parameters"] = rope
    out["model_type"] = "moe_mtp"
    out["architectures"] = [MOE_MTP_ARCHITECTURE]
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    out["transformers_version"] = transformers_version()  # the release's is the one it was written with
    return out


def transformers_version() -> str:
    """The installed transformers version, written into converted configs as `save_pretrained` does."""
    return importlib.metadata.version("transformers")


def is_v3_routing(config) -> bool:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return get("scoring_func", "sigmoid") == "sigmoid" and get("topk_method", "noaux_tc") == "noaux_tc"


def has_router_bias(config) -> bool:
    """Whether released checkpoints of this routing store `e_score_correction_bias` (V3's noaux_tc does)."""
    return is_v3_routing(config)


def _as_dict(config) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    return config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(vars(config))


def deepseek_config_dict(config, quantization_config: dict | None = None, dtype: str = "bfloat16") -> dict:
    """The released-style config.json of a moe_mtp config (dict or MoeMtpConfig).

    `model_type` deepseek_v3 for sigmoid/noaux_tc routing, else deepseek_v2; RoPE as `rope_scaling` (with `type`)
    and `rope_theta`; `quantization_config` for FP8 weights.
    """
    ours = _as_dict(config)
    rope = dict(ours.get("rope_parameters") or {"rope_type": "default"})
    theta = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", "default")
    rope.pop("type", None)
    v3 = is_v3_routing(ours)
    for field in (*FOREIGN_FIELDS, *MOE_MTP_ONLY_FIELDS, "rope_parameters", "transformers_version"):
        ours.pop(field, None)
    out = {"architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
           "model_type": "deepseek_v3" if v3 else "deepseek_v2"}  # fmt: skip
    out.update(ours)
    out["rope_scaling"] = None if rope_type == "default" else {**rope, "type": rope_type}
    out["rope_theta"] = theta
    if not v3 and not out.get("num_nextn_predict_layers"):
        out.pop("num_nextn_predict_layers", None)
    if quantization_config:
        out["quantization_config"] = quantization_config
    out["torch_dtype"] = dtype
    out["transformers_version"] = transformers_version()
    return dict(sorted(out.items()))


def transformers_config(config):
    """transformers' own `DeepseekV3Config` (sigmoid/noaux_tc routing) or `DeepseekV2Config` (softmax with greedy or
    group_limited_greedy) describing the same architecture as a MoeMtpConfig.

    transformers has no MTP modules and no `moe_layer_freq`; other combinations raise ConversionError.
    """
    from transformers import DeepseekV2Config, DeepseekV3Config

    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    scoring, method = get("scoring_func", "sigmoid"), get("topk_method", "noaux_tc")
    if get("moe_layer_freq", 1) != 1:
        raise ConversionError(f"transformers' DeepSeek classes have no moe_layer_freq (got {get('moe_layer_freq')})")
    common = {
        name: get(name)
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
            "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
            "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act",
            "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
            "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout",
        )
    }  # fmt: skip
    # MLA has one latent for all heads; transformers' repeat_kv must see as many kv heads as heads.
    common["num_key_value_heads"] = common["num_attention_heads"]
    common["rope_parameters"] = copy.deepcopy(get("rope_parameters") or {"rope_type": "default"})
    try:
        if scoring == "sigmoid" and method == "noaux_tc":
            return DeepseekV3Config(**common, rope_interleave=True, num_mtp_layers=get("num_nextn_predict_layers", 0))
        if scoring == "softmax" and method in ("greedy", "group_limited_greedy"):
            return DeepseekV2Config(**common, topk_method=method)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"transformers cannot represent this config: {exc}") from exc
    raise ConversionError(
        f"transformers has no class for scoring_func={scoring!r} with topk_method={method!r} "
        "(DeepseekV3: sigmoid + noaux_tc; DeepseekV2: softmax + greedy/group_limited_greedy)"
    )


def transformers_config_dict(config, dtype: str = "bfloat16") -> dict:
    """config.json for a folder in transformers' layout (its MTP weights are not stored, so no MTP layers)."""
    tc = transformers_config(config)
    out = tc.to_dict()
    for field in ("transformers_version", "_name_or_path", "id2label", "label2id", "problem_type",
                  "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
                  "is_encoder_decoder", "torch_dtype"):  # fmt: skip
        out.pop(field, None)
    if "num_mtp_layers" in out or tc.model_type == "deepseek_v3":
        out.pop("num_mtp_layers", None)
        out["num_nextn_predict_layers"] = 0
    out["architectures"] = ["DeepseekV3ForCausalLM" if tc.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    out["model_type"] = tc.model_type
    out["dtype"] = dtype
    return dict(sorted(out.items()))


def build_moe_mtp_config(ours: dict, source: str = "config.json"):
    """A MoeMtpConfig from a moe_mtp config dict; invalid values raise ConversionError naming `source`."""
    from ..configuration import MoeMtpConfig

    kwargs = {k: v for k, v in ours.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        config = MoeMtpConfig(**kwargs)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{source}: {exc}") from exc
    config.architectures = ours.get("architectures") or [MOE_MTP_ARCHITECTURE]
    return config
