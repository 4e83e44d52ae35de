"""Named model configurations ("presets", as torchtitan's model "flavors"), from the released DeepSeek models down to
the toy sizes the tests, the training script's smoke run, the quickstart and the benchmarks use.

    >>> from moe_mtp.configuration import preset, preset_kwargs
    >>> config = preset("tiny", num_hidden_layers=2)  # a MoeMtpConfig; keyword arguments override the preset
    >>> preset_kwargs("deepseek-v3")["n_routed_experts"]
    256

A preset holds the `MoeMtpConfig` keyword arguments of a model. The ones `python -m moe_mtp.train` runs (`smoke`,
`quickstart`) also carry the training settings they come with; `train_flags` gives both as the script's argument
names. This module is not part of the Hub bundle (`hub.remote_code_files`), which ships `configuration_moe_mtp.py`
alone: a pushed folder's `config.json` holds the values themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .configuration_moe_mtp import MoeMtpConfig


@dataclass(frozen=True)
class Preset:
    doc: str
    """What the model is and who uses it."""
    config: dict
    """`MoeMtpConfig` keyword arguments."""
    training: dict = field(default_factory=dict)
    """Settings of `python -m moe_mtp.train` beyond the model (its argument names), for the presets it runs."""


# The released architectures, as their config.json files give them (tests/data holds copies).
_DEEPSEEK_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
    norm_topk_prob=True, first_k_dense_replace=3, moe_layer_freq=1, ep_size=1, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu", max_position_embeddings=163840,
    initializer_range=0.02, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    attention_bias=False, attention_dropout=0.0, num_nextn_predict_layers=1,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096},
)  # fmt: skip
_DEEPSEEK_V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
    routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
    norm_topk_prob=False, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu", max_position_embeddings=163840,
    initializer_range=0.02, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False,
    attention_bias=False, attention_dropout=0.0, num_nextn_predict_layers=0,
    # the release's `seq_aux: true` with `aux_loss_alpha: 0.001` (conversion.moe_mtp_config_dict translates them)
    seq_aux_loss_alpha=0.001,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096},
)  # fmt: skip

# `python -m moe_mtp.train`'s model when no flag changes it (its argument defaults; --seq-len 256, --vocab-size 4096),
# with the token ids of the BPE it trains (special tokens <pad>, <bos>, <eos> first).
_TRAIN_DEFAULT = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, num_nextn_predict_layers=1, max_position_embeddings=256, seq_aux_loss_alpha=1e-4, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# benchmarks/bench_model.py: a scaled-down DeepSeek-V3 (sigmoid/noaux_tc routing over groups, q compression,
# fine-grained experts), without MTP or balance loss, to compare like with like against transformers' class.
_BENCH_MODEL = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
    n_shared_experts=1, max_position_embeddings=1024, num_nextn_predict_layers=0, seq_aux_loss_alpha=0.0,
)  # fmt: skip

# benchmarks/bench_train.py: what both of its models share (the training recipe's MTP and balancing on).
_BENCH_TRAIN = dict(
    vocab_size=4096, intermediate_size=512, first_k_dense_replace=1, num_attention_heads=4, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1, max_position_embeddings=512, num_nextn_predict_layers=1,
    mtp_loss_weight=0.3, seq_aux_loss_alpha=1e-4, bias_update_speed=1e-3,
)  # fmt: skip

# benchmarks/bench_decode.py: a code model deep enough (8 layers) that one MTP module is a small share of a step.
_BENCH_DECODE = dict(
    vocab_size=2048, hidden_size=192, intermediate_size=512, moe_intermediate_size=96, num_hidden_layers=8,
    first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    n_shared_experts=1, max_position_embeddings=4096, num_nextn_predict_layers=1, mtp_loss_weight=0.5,
    seq_aux_loss_alpha=0.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# fmt: off
PRESETS: dict[str, Preset] = {
    "deepseek-v3": Preset(
        "DeepSeek-V3 (671B total, 37B active): the released config.json, also DeepSeek-R1's and V3.1's. MLA with "
        "query compression, 256 routed experts (top-8 by sigmoid scores, group-limited to 4 of 8 groups) plus 1 "
        "shared, 3 dense layers, 1 MTP module, YaRN to 160K positions.",
        _DEEPSEEK_V3,
    ),
    "deepseek-v2-lite": Preset(
        "DeepSeek-V2-Lite (16B total, 2.4B active): the released config.json. Full q_proj, 64 routed experts "
        "(greedy top-6 by softmax scores, weights not renormalized) plus 2 shared, 1 dense layer, no MTP module.",
        _DEEPSEEK_V2_LITE,
    ),
    "tiny": Preset(
        "The tests' model (tests/conftest.py): 3 layers of width 64 (1 dense), 8 routed experts top-2 over 4 groups, "
        "V3 routing, YaRN with both mscales (so the rope scaling and softmax-scale folding run), 128 tokens.",
        dict(
            vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.8,
                             "mscale_all_dim": 0.7, "beta_fast": 32, "beta_slow": 1,
                             "original_max_position_embeddings": 64},
            q_lora_rank=32, n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc",
            norm_topk_prob=True, routed_scaling_factor=2.5,
        ),  # fmt: skip
    ),
    "tiny-release": Preset(
        "A DeepSeek-V3-shaped checkpoint at toy size for the conversion examples and tests: hidden 192 = 128 + 64 and "
        "intermediate 200 = 128 + 72, so block-FP8 edge blocks are partial in both directions; 3 layers, 8 experts.",
        dict(
            vocab_size=256, hidden_size=192, intermediate_size=200, moe_intermediate_size=72, num_hidden_layers=3,
            num_attention_heads=4, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=16, num_nextn_predict_layers=1,
        ),  # fmt: skip
    ),
    "smoke": Preset(
        "`python -m moe_mtp.train --smoke`: 2 layers of width 48, 8 experts, a 512-token BPE and 32-token blocks; "
        "12 steps on 300 documents, which finish in seconds.",
        dict(
            _TRAIN_DEFAULT, vocab_size=512, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
            topk_group=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            max_position_embeddings=32,
        ),  # fmt: skip
        dict(max_documents=300, seq_len=32, batch_size=4, max_steps=12, warmup_steps=2, log_every=1, eval_every=6,
             save_every=6, eval_batches=2, lr=3e-3),  # fmt: skip
    ),
    "quickstart": Preset(
        "`make quickstart`'s code model: the training script's default model made deeper and thinner (8 layers of "
        "width 192, 16 experts top-2), so that the MTP module is a small share of a decoding step; 320 steps.",
        dict(
            _TRAIN_DEFAULT, hidden_size=192, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=8,
            q_lora_rank=96, kv_lora_rank=64,
        ),  # fmt: skip
        dict(lr=2e-3, max_steps=320, eval_every=80, eval_batches=8, save_every=160),
    ),
    "bench-model": Preset(
        "benchmarks/bench_model.py's main model: a scaled-down DeepSeek-V3 (4 layers of width 512, 32 routed experts "
        "top-4 over 4 groups), without MTP or balance loss, as transformers' class has neither.",
        _BENCH_MODEL,
    ),
    "bench-model-v3": Preset(
        "benchmarks/bench_model.py's DeepSeek-V3 proportions at a CPU-sized width: 256 routed experts, top-8, 8 groups "
        "with top-4, 1 shared; hidden 256, expert width 64.",
        dict(
            _BENCH_MODEL, hidden_size=256, intermediate_size=1024, moe_intermediate_size=64, q_lora_rank=96,
            kv_lora_rank=64, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        ),  # fmt: skip
    ),
    "bench-train": Preset(
        "benchmarks/bench_train.py's model sized as the training script's default (4 layers of width 256, 16 experts "
        "top-2 over 4 groups), with MTP and both balancing terms on.",
        dict(
            _BENCH_TRAIN, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4, n_routed_experts=16,
            num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=128, kv_lora_rank=64,
        ),  # fmt: skip
    ),
    "bench-train-v3": Preset(
        "benchmarks/bench_train.py's model with DeepSeek-V3's routing proportions: 256 routed experts, top-8, 8 groups "
        "of which 4 are eligible (width 128).",
        dict(
            _BENCH_TRAIN, hidden_size=128, moe_intermediate_size=32, num_hidden_layers=4, n_routed_experts=256,
            num_experts_per_tok=8, n_group=8, topk_group=4, q_lora_rank=64, kv_lora_rank=32,
        ),  # fmt: skip
    ),
    "bench-quality": Preset(
        "benchmarks/bench_quality.py's model, the one quantized to int8 and nf4 (reproduce_claims.py's too): 3 layers "
        "of width 256, 16 experts top-2 over 4 groups, 1 MTP module, plain rope, 256 positions; its vocabulary is "
        "the trained BPE's size (2048 asked for).",
        dict(
            vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=2, n_group=4,
            topk_group=2, n_shared_experts=1, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),  # fmt: skip
    ),
    "bench-decode": Preset(
        "benchmarks/bench_decode.py's model (and reproduce_claims.py's): 8 layers of width 192, 8 experts top-2, 1 MTP "
        "module; its vocabulary is the trained BPE's size (2048 asked for).",
        _BENCH_DECODE,
    ),
    "bench-decode-quick": Preset(
        "benchmarks/bench_decode.py --quick: its model at half the width.",
        dict(
            _BENCH_DECODE, hidden_size=96, intermediate_size=256, moe_intermediate_size=48, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        ),  # fmt: skip
    ),
}
# fmt: on

# MoeMtpConfig field -> `python -m moe_mtp.train` argument, for the fields the script takes.
TRAIN_FLAGS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "first_k_dense_replace": "first_k_dense", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "num_experts_per_tok": "top_k", "n_group": "n_group",
    "topk_group": "topk_group", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "num_nextn_predict_layers": "mtp_depth", "seq_aux_loss_alpha": "seq_aux_loss_alpha",
}  # fmt: skip


def preset_names() -> list[str]:
    return list(PRESETS)


def _get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}") from None


def preset_kwargs(name: str, **overrides) -> dict:
    """The `MoeMtpConfig` keyword arguments of preset `name`, updated with `overrides` (a fresh copy each call).

    MLA has one key/value head per query head, so overriding `num_attention_heads` alone sets `num_key_value_heads`
    to match."""
    kwargs = {**copy.deepcopy(_get(name).config), **overrides}
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        kwargs.pop("num_key_value_heads", None)  # MoeMtpConfig sets it to num_attention_heads
    return kwargs


def preset(name: str, **overrides) -> MoeMtpConfig:
    """A `MoeMtpConfig` of preset `name` (see `PRESETS` for what each is), with `overrides` on top.

    Raises ValueError listing the known names for an unknown one."""
    return MoeMtpConfig(**preset_kwargs(name, **overrides))


def preset_doc(name: str) -> str:
    return _get(name).doc


def train_flags(name: str) -> dict:
    """Preset `name` as `python -m moe_mtp.train` argument values (`parser.set_defaults(**train_flags("smoke"))`): its
    model fields under the script's names, then its training settings. `max_position_embeddings` is not a flag (the
    script uses `seq_len`); the training settings give `seq_len` where the preset's differs from the default."""
    chosen = _get(name)
    flags = {flag: chosen.config[field] for field, flag in TRAIN_FLAGS.items() if field in chosen.config}
    return {**flags, **copy.deepcopy(chosen.training)}


__all__ = ["PRESETS", "Preset", "preset", "preset_doc", "preset_kwargs", "preset_names", "train_flags"]
