"""The three checkpoint layouts, as tables of rules over moe_mtp ("canonical") key names.

A layout is described by how each canonical tensor is stored in it:

- `Rename(canonical_regex, layout_template)`: one tensor under another name (`re` expand syntax).
- `Stack(canonical_regex, layout_template, parts)`: the routed experts of a layer stacked into one 3-D tensor,
  expert-major, and within an expert the `parts` in order (transformers' `gate_up_proj` = [gate_e; up_e] per e).
- `Omit(canonical_regex)`: not stored; reading supplies a default where one exists (zero router bias).
- `Copy(layout_key, canonical_key)`: a layout-only duplicate of a canonical tensor, written on the way out and
  dropped (after a shape check) on the way in, like the released MTP module's own embedding and head.
- `Ignore(layout_regex)`: tolerated on the way in and dropped, never written (a tied `lm_head`).

Rules are tried in order, first match wins; every table ends with a catch-all. `mtp` rules are instantiated for
each MTP module k with `{k}` and `{mtp_layer}` = num_hidden_layers + k (never a fixed 61). A rule's `when` names a
condition on the config (see CONDITIONS). `fp8` is the pattern of layout keys the release stores as block FP8
(what `dtype="fp8"` quantizes; a tensor that arrives as FP8 is dequantized or kept whatever its name).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .configs import has_router_bias


@dataclass(frozen=True)
class Rename:
    canonical: str
    layout: str
    when: str | None = None


@dataclass(frozen=True)
class Stack:
    canonical: str  # named groups: layer, expert, part
    layout: str  # formatted with the `layer` group
    parts: tuple[str, ...]
    when: str | None = None


@dataclass(frozen=True)
class Omit:
    canonical: str
    when: str | None = None


@dataclass(frozen=True)
class Copy:
    layout: str
    canonical: str
    when: str | None = None


@dataclass(frozen=True)
class Ignore:
    layout: str
    when: str | None = None


@dataclass(frozen=True)
class Layout:
    name: str
    rules: tuple
    mtp: tuple = ()
    fp8: str | None = None


CONDITIONS = {
    "tied": lambda config: bool(config.tie_word_embeddings),
    "no_router_bias": lambda config: not has_router_bias(config),
}

# Block FP8 in the DeepSeek-V3 release: the linear weights of attention (kv_a_proj_with_mqa included) and of the
# MLPs (dense, routed and shared experts), in the main layers and the MTP layers N+k alike. Not the MTP module's
# eh_proj, which the release stores in bf16 (engines load it into a plain nn.Linear), nor the router
# `mlp.gate.weight`, norms, embeddings or heads.
RELEASE_FP8 = r"model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?[a-z_]+_proj(_with_mqa)?\.weight"
ROUTER_BIAS = r"model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias"
CATCH_ALL = Rename(r"(.+)", r"\1")

MOE_MTP = Layout(
    name="moe_mtp",
    rules=(Ignore(r"lm_head\.weight", when="tied"), CATCH_ALL),
)

# What a moe_mtp model holds in memory (`model.state_dict()`): the routed experts of every MoE layer, the MTP
# modules' included, stacked into two 3-D parameters per layer (MoeMtpExperts); on disk they are per expert.
EXPERT = r"(?P<layer>model\.(?:layers|mtp_layers)\.\d+)\.mlp\.experts\.(?P<expert>\d+)\."
MOE_MTP_MODEL = Layout(
    name="moe_mtp_model",
    rules=(
        Ignore(r"lm_head\.weight", when="tied"),
        Stack(EXPERT + r"(?P<part>gate|up)_proj\.weight", "{layer}.mlp.experts.gate_up_proj", parts=("gate", "up")),
        Stack(EXPERT + r"(?P<part>down)_proj\.weight", "{layer}.mlp.experts.down_proj", parts=("down",)),
        CATCH_ALL,
    ),
)

# The same as the base model (`MoeMtpModel`) holds it: no `model.` prefix, no head.
BASE_EXPERT = r"model\.(?P<layer>(?:layers|mtp_layers)\.\d+)\.mlp\.experts\.(?P<expert>\d+)\."
MOE_MTP_MODEL_BASE = Layout(
    name="moe_mtp_model_base",
    rules=(
        Omit(r"lm_head\.weight"),
        Stack(BASE_EXPERT + r"(?P<part>gate|up)_proj\.weight", "{layer}.mlp.experts.gate_up_proj", ("gate", "up")),
        Stack(BASE_EXPERT + r"(?P<part>down)_proj\.weight", "{layer}.mlp.experts.down_proj", ("down",)),
        Rename(r"model\.(.+)", r"\1"),
    ),
)

# What the base model (`MoeMtpModel`) saves: the same names without the `model.` prefix, and no head.
MOE_MTP_BASE = Layout(
    name="moe_mtp_base",
    rules=(Omit(r"lm_head\.weight"), Rename(r"model\.(.+)", r"\1")),
)

# The released layout: the main stack as in moe_mtp; MTP module k is decoder layer N+k plus its own copies of the
# embedding and the output head. V2-style (softmax) routing stores no router bias.
DEEPSEEK = Layout(
    name="deepseek",
    mtp=(
        Rename(r"model\.mtp_layers\.{k}\.(.+)", r"model.layers.{mtp_layer}.\1"),
        Copy("model.layers.{mtp_layer}.embed_tokens.weight", "model.embed_tokens.weight"),
        Copy("model.layers.{mtp_layer}.shared_head.head.weight", "lm_head.weight"),
    ),
    rules=(
        Omit(ROUTER_BIAS, when="no_router_bias"),
        Ignore(r"lm_head\.weight", when="tied"),
        CATCH_ALL,
    ),
    fp8=RELEASE_FP8,
)

# transformers' DeepseekV3/V2ForCausalLM state_dict: routed experts stacked per layer, no MTP modules.
# Its state_dict lists a tied lm_head too, so it is written as a copy of the embedding.
TRANSFORMERS = Layout(
    name="transformers",
    mtp=(Omit(r"model\.mtp_layers\.{k}\..+"),),
    rules=(
        Omit(ROUTER_BIAS, when="no_router_bias"),
        Stack(
            r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<part>gate|up)_proj\.weight",
            "model.layers.{layer}.mlp.experts.gate_up_proj",
            parts=("gate", "up"),
        ),
        Stack(
            r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<part>down)_proj\.weight",
            "model.layers.{layer}.mlp.experts.down_proj",
            parts=("down",),
        ),
        Copy("lm_head.weight", "model.embed_tokens.weight", when="tied"),
        CATCH_ALL,
    ),
)

LAYOUTS = {
    layout.name: layout for layout in (MOE_MTP, MOE_MTP_MODEL, MOE_MTP_MODEL_BASE, MOE_MTP_BASE, DEEPSEEK, TRANSFORMERS)
}


def _instantiate(rule, k: int, mtp_layer: int):
    fields = {}
    for name in ("canonical", "layout"):
        value = getattr(rule, name, None)
        if isinstance(value, str):
            fields[name] = value.replace("{k}", str(k)).replace("{mtp_layer}", str(mtp_layer))
    return replace(rule, **fields)


def concrete_rules(layout: Layout, config) -> list:
    """The layout's rules for this config: MTP rules instantiated per module, `when` conditions applied."""
    n = config.num_hidden_layers
    rules = [_instantiate(r, k, n + k) for k in range(config.num_nextn_predict_layers) for r in layout.mtp]
    rules += list(layout.rules)
    return [r for r in rules if r.when is None or CONDITIONS[r.when](config)]
