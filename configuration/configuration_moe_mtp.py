"""Configuration of moe-mtp models: DeepSeek-V3-style MLA + DeepSeekMoE + Multi-Token Prediction.

Field names follow the released DeepSeek `config.json` files, so a released config loads once its `model_type` is
changed to `moe_mtp`. The legacy `rope_scaling`/`rope_theta` keys are folded into `rope_parameters` by
transformers, as for its built-in models.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
HIDDEN_ACTS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# Every type of transformers' rope registry, as for its DeepseekV3 (`dynamic`/`longrope` also rescale at runtime).
ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)
MLA_DECODE_MODES = ("auto", "absorbed", "expanded")
MTP_LOSS_TARGETS = ("labels", "self_kl", "self_greedy")


class MoeMtpConfig(PretrainedConfig):
    r"""
    Configuration of a [`MoeMtpForCausalLM`]. The defaults describe DeepSeek-V3 (671B); tiny models only need the
    sizes changed.

    Example:

    ```python
    >>> from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM
    >>> config = MoeMtpConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    ...                       num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, n_group=2, topk_group=1,
    ...                       num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
    ...                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    >>> model = MoeMtpForCausalLM(config)
    ```
    """

    model_type = "moe_mtp"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    # Parallel plans transformers applies with `from_pretrained(..., distributed_config=DistributedConfig(...))`
    # (docs/distributed.md). Tensor parallelism splits attention by heads (q_b/kv_b column-wise, o_proj row-wise;
    # the rope half of kv_a_proj_with_mqa skips kv_b_proj, so its gradient is summed over ranks) and the dense and
    # shared MLPs by width, in the main layers and the MTP modules alike. Routed experts are split whole, by expert
    # (`base_model_ep_plan`). The router, norms and eh_proj stay replicated; lm_head, which the MTP modules share,
    # is split by vocabulary with its output gathered (`_tp_plan` on the causal LM), and transformers adds
    # `embedding_rowwise` for embed_tokens (also shared) to every plan. The tensor parallel plan is a property: it
    # names only modules this config builds (q_proj or q_b_proj, dense MLPs).
    base_model_ep_plan = {
        f"{stack}.*.mlp.experts{name}": style
        for stack in ("layers", "mtp_layers")
        for name, style in {
            ".gate_up_proj": "grouped_gemm",
            ".down_proj": "grouped_gemm",
            "": "ep_dispatch_experts",
        }.items()
    }

    vocab_size: int = 129280
    """Number of tokens in the vocabulary."""
    hidden_size: int = 7168
    """Width of the residual stream."""
    intermediate_size: int = 18432
    """Width of the dense SwiGLU MLPs (the first `first_k_dense_replace` layers)."""
    moe_intermediate_size: int = 2048
    """Width of each routed expert, and per shared expert."""
    num_hidden_layers: int = 61
    """Number of decoder layers in the main stack (MTP modules come on top)."""
    num_attention_heads: int = 128
    """Number of attention heads."""
    num_key_value_heads: int | None = None
    """Kept for compatibility with released configs; MLA always has one latent shared by all heads."""
    n_shared_experts: int = 1
    """Number of always-on shared experts, fused into one MLP of width `n_shared_experts * moe_intermediate_size`."""
    n_routed_experts: int = 256
    """Number of routed experts per MoE layer."""
    num_experts_per_tok: int = 8
    """Number of routed experts each token is sent to (top-k)."""
    routed_scaling_factor: float = 2.5
    """Multiplier applied to the routed experts' gate weights."""
    scoring_func: str = "sigmoid"
    """Router score function: `sigmoid` (V3) or `softmax` (V2)."""
    topk_method: str = "noaux_tc"
    """Expert selection: `noaux_tc` (V3, group-limited on biased scores), `greedy` or `group_limited_greedy` (V2)."""
    n_group: int = 8
    """Number of expert groups for group-limited (node-limited) routing."""
    topk_group: int = 4
    """Number of groups a token may pick its experts from."""
    norm_topk_prob: bool = True
    """Whether the selected experts' gate weights are renormalized to sum to one."""
    first_k_dense_replace: int = 3
    """Number of leading layers that use a dense MLP instead of MoE."""
    moe_layer_freq: int = 1
    """After the dense layers, every `moe_layer_freq`-th layer is MoE (all released models use 1)."""
    ep_size: int = 1
    """Expert-parallel size of the original training run; accepted from released configs and otherwise unused."""
    q_lora_rank: int | None = 1536
    """Rank of the query compression (`q_a_proj`/`q_b_proj`); `None` uses a full `q_proj`, as in V2-Lite."""
    kv_lora_rank: int = 512
    """Rank of the compressed key/value latent, which is what the cache stores."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dimensions without rotary embedding."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dimensions with (decoupled, shared-key) rotary embedding."""
    v_head_dim: int = 128
    """Per-head value dimension."""
    hidden_act: str = "silu"
    """Activation of the SwiGLU MLPs."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant to handle (YaRN's extended length for released models)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initializer of all weight matrices."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    use_cache: bool = True
    """Whether the model returns the (compressed) KV cache."""
    pad_token_id: int | None = None
    """Padding token id."""
    bos_token_id: int | None = 0
    """Beginning-of-sequence token id."""
    eos_token_id: int | list[int] | None = 1
    """End-of-sequence token id(s)."""
    pretraining_tp: int = 1
    """Tensor-parallel degree of the original training run; accepted from released configs and otherwise unused."""
    tie_word_embeddings: bool = False
    """Whether `lm_head` shares the input embedding matrix."""
    rope_parameters: dict | None = None
    """RoPE settings: `rope_theta`, `rope_type` and the type's own keys, e.g. YaRN's `factor`, `mscale`,
    `mscale_all_dim`, `beta_fast`, `beta_slow`, `original_max_position_embeddings`. Any type transformers knows works:
    `default`, `linear`, `dynamic` (rescales with the sequence length), `yarn`, `longrope`, `llama3`,
    `proportional`. With a scaled type, `mscale_all_dim` also scales the softmax, as in DeepSeek's models. Released
    `rope_scaling` and `rope_theta` keys are folded in here."""
    attention_bias: bool = False
    """Whether the attention projections carry biases."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities during training."""
    num_nextn_predict_layers: int = 1
    """Number of Multi-Token Prediction modules (depth D); 0 makes a plain decoder."""
    mtp_loss_weight: float = 0.3
    """Weight lambda of the mean MTP loss added to the main loss."""
    mtp_loss_targets: str = "labels"
    """What the MTP modules learn to predict: `labels` (the text, DeepSeek-V3's pretraining objective), or the main
    model's own next-token predictions at the same position (self-distillation, which is what raises draft
    acceptance): `self_kl` (KL to its distribution) or `self_greedy` (cross-entropy to its argmax)."""
    bias_update_speed: float = 1e-3
    """Speed gamma of the auxiliary-loss-free balancing bias update; 0 disables it."""
    seq_aux_loss_alpha: float = 1e-4
    """Weight alpha of the sequence-wise balance loss; 0 disables it."""
    output_router_logits: bool = False
    """Whether the model returns the router logits of every MoE layer."""
    mla_decode: str = "auto"
    """How attention runs against the latent cache: `absorbed` (kv_b_proj folded into the query and output, attention
    on the latent itself), `expanded` (the latent expanded into per-head keys and values), or `auto` (absorbed for
    queries short enough that it costs fewer FLOPs). `forward` and `generate` also take it as a keyword argument."""
    num_mtp_draft_tokens: int | str | None = None
    """Tokens drafted per step by `generate(..., use_mtp=True)`; `None` drafts one per MTP module. More than
    `num_nextn_predict_layers` reuses the last module for the extra drafts. `"adaptive"` chooses the count step by
    step, between 1 and max(modules, 5) (max(modules, 3) for batches of several rows), for the most tokens per second
    measured during the call (the best count depends on the batch, the context and the hardware). `generate` also
    takes it as a keyword."""

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        attention = {"self_attn.q_b_proj" if self.q_lora_rank else "self_attn.q_proj": "colwise"}
        attention.update({
            "self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
            "self_attn.kv_b_proj": "colwise",
            "self_attn.o_proj": "rowwise",
        })  # fmt: skip
        if self.n_shared_experts:
            attention.update({
                "mlp.shared_experts.gate_proj": "colwise",
                "mlp.shared_experts.up_proj": "colwise",
                "mlp.shared_experts.down_proj": "rowwise",
            })  # fmt: skip
        plan = {f"{stack}.*.{name}": style for stack in ("layers", "mtp_layers") for name, style in attention.items()}
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):  # the first_k_dense_replace layers
            plan.update({"layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise"})
            plan["layers.*.mlp.down_proj"] = "rowwise"
        return plan

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default"}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self._validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """The rotary dimension, which is what transformers' rope helpers read as `head_dim`."""
        return self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values cached per token per layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` (MTP blocks count on from `num_hidden_layers`) is MoE."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def _validate(self):
        def fail(field, message):
            raise ValueError(f"MoeMtpConfig.{field}: {message}")

        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_group", "topk_group", "moe_layer_freq",
        ]  # fmt: skip
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                fail(field, f"must be a positive integer, got {value!r}")
        for field in ("n_routed_experts", "n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                fail(field, f"must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", f"must be a positive integer or None (full q_proj), got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            fail("hidden_act", f"must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                fail("n_routed_experts", f"({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                fail("topk_group", f"({self.topk_group}) must be <= n_group ({self.n_group})")
            reachable = self.n_routed_experts
            if self.topk_method != "greedy":
                reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            if not 0 < self.num_experts_per_tok <= reachable:
                fail(
                    "num_experts_per_tok",
                    f"({self.num_experts_per_tok}) must be between 1 and the {reachable} experts reachable in "
                    f"topk_group={self.topk_group} of n_group={self.n_group} groups",
                )
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
                fail("n_group", "noaux_tc scores each group by its top-2 experts, so groups need at least 2 experts")
        for field in ("mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                fail(field, f"must be a non-negative number, got {value!r}")
        if self.mtp_loss_targets not in MTP_LOSS_TARGETS:
            fail("mtp_loss_targets", f"must be one of {MTP_LOSS_TARGETS}, got {self.mtp_loss_targets!r}")
        if self.mla_decode not in MLA_DECODE_MODES:
            fail("mla_decode", f"must be one of {MLA_DECODE_MODES}, got {self.mla_decode!r}")
        drafts = self.num_mtp_draft_tokens
        if drafts is not None and drafts != "adaptive" and (not isinstance(drafts, int) or drafts < 1):
            fail("num_mtp_draft_tokens", f"must be a positive integer, 'adaptive' or None, got {drafts!r}")
        check_rope_parameters(self)


def check_rope_parameters(config: MoeMtpConfig):
    """Raises a ValueError naming the problem unless `config.rope_parameters` is a rope the model can run, after
    filling in defaults as transformers does (`rope_theta`, yarn/llama3/longrope's original length). Runs when the
    config is built and again when a model is, because users (and transformers' tests) edit it in between."""

    def fail(message):
        raise ValueError(f"MoeMtpConfig.rope_parameters: {message}")

    params = config.rope_parameters
    if not isinstance(params, dict):
        fail(f"must be a dict with a 'rope_type', got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        fail(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    params.setdefault("rope_theta", config.default_theta)
    config.standardize_rope_params()  # as transformers' rope functions do, e.g. yarn's original length defaults in
    # MLA already splits each head into rotated (qk_rope_head_dim) and unrotated dims.
    if rope_type != "proportional" and params.get("partial_rotary_factor", 1.0) != 1.0:
        fail("partial_rotary_factor is not supported: set qk_rope_head_dim/qk_nope_head_dim instead")
    try:
        config.validate_rope()  # transformers' per-type check of the required keys (e.g. yarn's 'factor')
    except KeyError as error:
        fail(error.args[0] if error.args else str(error))


__all__ = ["MoeMtpConfig"]
