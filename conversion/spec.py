"""The tensors a config implies, in moe_mtp ("canonical") key names, with their shapes.

Every conversion goes through this list: source tensors are checked against it (names and shapes), and the
destination layout is derived from it. MTP module k is `model.mtp_layers.{k}.*`; its block is MoE or dense by the
rule for global layer index `num_hidden_layers + k`.
"""

from __future__ import annotations

import re

ROUTER_BIAS = "e_score_correction_bias"
EXPERT_RE = re.compile(r"\.mlp\.experts\.\d+\.")
MTP_RE = re.compile(r"^model\.mtp_layers\.(\d+)\.")
# The linear projection weights of the decoder blocks (attention, MLPs, experts) and of the MTP modules: the only
# tensors a block-FP8 checkpoint may store as FP8 (never norms, embeddings, heads or the router).
PROJECTION_RE = re.compile(r"^model\.(layers|mtp_layers)\.\d+\.(.+\.)?[a-z_]+_proj(_with_mqa)?\.weight$")


def _attention(config, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden, heads = config.hidden_size, config.num_attention_heads
    qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    a = f"{prefix}.self_attn"
    if config.q_lora_rank is None:
        shapes[f"{a}.q_proj.weight"] = (heads * qk_head, hidden)
    else:
        shapes[f"{a}.q_a_proj.weight"] = (config.q_lora_rank, hidden)
        if config.attention_bias:
            shapes[f"{a}.q_a_proj.bias"] = (config.q_lora_rank,)
        shapes[f"{a}.q_a_layernorm.weight"] = (config.q_lora_rank,)
        shapes[f"{a}.q_b_proj.weight"] = (heads * qk_head, config.q_lora_rank)
    shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (config.kv_lora_rank + config.qk_rope_head_dim, hidden)
    if config.attention_bias:
        shapes[f"{a}.kv_a_proj_with_mqa.bias"] = (config.kv_lora_rank + config.qk_rope_head_dim,)
    shapes[f"{a}.kv_a_layernorm.weight"] = (config.kv_lora_rank,)
    shapes[f"{a}.kv_b_proj.weight"] = (heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
    shapes[f"{a}.o_proj.weight"] = (hidden, heads * config.v_head_dim)
    if config.attention_bias:
        shapes[f"{a}.o_proj.bias"] = (hidden,)
    return shapes


def _mlp(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.gate_proj.weight": (inner, hidden),
        f"{prefix}.up_proj.weight": (inner, hidden),
        f"{prefix}.down_proj.weight": (hidden, inner),
    }


def decoder_layer_shapes(config, prefix: str, layer_idx: int) -> dict[str, tuple[int, ...]]:
    """One decoder block (attention + dense or MoE MLP + its two norms) under `prefix`."""
    hidden = config.hidden_size
    shapes = {f"{prefix}.input_layernorm.weight": (hidden,)}
    shapes.update(_attention(config, prefix))
    shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    m = f"{prefix}.mlp"
    if config.is_moe_layer(layer_idx):
        experts, inner = config.n_routed_experts, config.moe_intermediate_size
        shapes[f"{m}.gate.weight"] = (experts, hidden)
        shapes[f"{m}.gate.{ROUTER_BIAS}"] = (experts,)
        for e in range(experts):
            shapes.update(_mlp(f"{m}.experts.{e}", hidden, inner))
        if config.n_shared_experts:
            shapes.update(_mlp(f"{m}.shared_experts", hidden, inner * config.n_shared_experts))
    else:
        shapes.update(_mlp(m, hidden, config.intermediate_size))
    return shapes


def canonical_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a moe_mtp checkpoint for `config`, in storage order, with its shape."""
    hidden, vocab = config.hidden_size, config.vocab_size
    n = config.num_hidden_layers
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(n):
        shapes.update(decoder_layer_shapes(config, f"model.layers.{i}", i))
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for k in range(config.num_nextn_predict_layers):
        p = f"model.mtp_layers.{k}"
        shapes[f"{p}.enorm.weight"] = (hidden,)
        shapes[f"{p}.hnorm.weight"] = (hidden,)
        shapes[f"{p}.eh_proj.weight"] = (hidden, 2 * hidden)
        shapes.update(decoder_layer_shapes(config, p, n + k))
        shapes[f"{p}.shared_head.norm.weight"] = (hidden,)
    return shapes


def is_router_bias(key: str) -> bool:
    return key.endswith(f".gate.{ROUTER_BIAS}")


def is_routed_expert(key: str) -> bool:
    return EXPERT_RE.search(key) is not None or ".mlp.experts.gate_up_proj" in key or ".mlp.experts.down_proj" in key


def mtp_index(key: str) -> int | None:
    m = MTP_RE.match(key)
    return int(m.group(1)) if m else None


def is_projection_weight(key: str) -> bool:
    return PROJECTION_RE.match(key) is not None
