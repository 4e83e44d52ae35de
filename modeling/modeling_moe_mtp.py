"""moe-mtp: DeepSeek-V3-style causal LM (Multi-head Latent Attention, DeepSeekMoE, Multi-Token Prediction).

Read top-down: RMSNorm, rotary embedding, MLA attention, dense MLP, router, MoE, decoder blocks (main and MTP),
then the pretrained base, the model and the causal LM. Tensor names match the released DeepSeek checkpoints, so
the main stack loads them unchanged; the MTP modules live at `model.mtp_layers.{k}` (released: `model.layers.{N+k}`).
"""

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..configuration import MoeMtpConfig
from ..configuration.configuration_moe_mtp import check_rope_parameters
from .balancing import count_routed_tokens, named_routers, track, update_balancing_bias
from .loading import load_model, memory_footprint, push_model, save_model
from .speculative import MTP_GENERATE_KWARGS

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support: no tensor parallelism either
    DTensor = ()


class MoeMtpRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def yarn_softmax_mscale(rope_parameters: dict) -> float:
    """DeepSeek folds `mscale_all_dim` into the softmax scale, squared (once for q, once for k), for any scaled rope
    (as DeepSeek's reference code and transformers' DeepseekV3 do); YaRN is the only type released configs use."""
    factor, mscale_all_dim = rope_parameters.get("factor", 1.0), rope_parameters.get("mscale_all_dim", 0)
    if rope_parameters.get("rope_type", "default") == "default" or not mscale_all_dim or factor <= 1:
        return 1.0
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return mscale * mscale


class MoeMtpRotaryEmbedding(nn.Module):
    """Rotary frequencies for the decoupled rope dims. Every rope type of transformers' registry works (`yarn`,
    `linear`, `dynamic`, `longrope`, `llama3`, ...); `dynamic_rope_update` rescales `dynamic` and `longrope` with the
    sequence length, as in transformers' own models."""

    inv_freq: torch.Tensor
    original_inv_freq: torch.Tensor

    def __init__(self, config: MoeMtpConfig):
        super().__init__()
        # Checked here too: rope_parameters may have been edited since the config was built.
        check_rope_parameters(config)
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: MoeMtpConfig, device: torch.device | None = None, seq_len: int | None = None, **kwargs
    ) -> tuple[torch.Tensor, float]:
        """Plain rope over the `qk_rope_head_dim` dims (also what `_init_weights` recomputes the buffers with)."""
        dim, base = config.qk_rope_head_dim, config.rope_parameters.get("rope_theta", 10000.0)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns cos and sin of shape (batch, seq, rope_dim // 2), one angle per interleaved pair."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
            cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... and returns them de-interleaved.

    The released weights pair adjacent dims. The output order (all even, then all odd) differs from the input's, but
    queries and keys go through the same permutation, so their dot products are unchanged.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    attn_weights = apply_attention_mask(attn_weights, attention_mask)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def apply_attention_mask(
    scores: torch.Tensor, attention_mask: torch.Tensor | None, inplace: bool = False
) -> torch.Tensor:
    """Applies a 4-D boolean (True = attend) or additive mask, or a 2-D padding mask (flash attention's format, 1 =
    real token) combined with the causal mask, or the causal mask alone when none is given; into `scores` itself
    with `inplace`. The queries are the last positions of the keys, so the causal mask only ever hides columns of
    the queries' own block: it is filled there alone."""
    fill = torch.finfo(scores.dtype).min
    if attention_mask is None or attention_mask.dim() == 2:
        q_len, kv_len = scores.shape[-2:]
        if attention_mask is None and q_len == 1:
            return scores
        scores = scores if inplace else scores.clone()
        if attention_mask is not None:
            scores.masked_fill_(~attention_mask[:, None, None, :].bool(), fill)
        if q_len > 1:
            future = torch.ones(q_len, q_len, dtype=torch.bool, device=scores.device).triu(1)
            scores[..., kv_len - q_len :].masked_fill_(future, fill)
        return scores
    if attention_mask.dtype == torch.bool:
        fill_mask = scores.masked_fill_ if inplace else scores.masked_fill
        return fill_mask(~attention_mask, fill)
    if inplace:
        return scores.add_(attention_mask[..., : scores.shape[-1]])
    return scores + attention_mask[..., : scores.shape[-1]]


class MoeMtpAttention(nn.Module):
    """Multi-head Latent Attention. The cache holds only the normalized latent and the rotated shared rope key."""

    def __init__(self, config: MoeMtpConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.attention_dropout = config.attention_dropout
        self.num_key_value_groups = 1  # keys are expanded per head before the attention kernel
        self.is_causal = True
        self.scaling = self.qk_head_dim**-0.5 * yarn_softmax_mscale(config.rope_parameters)

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = MoeMtpRMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = MoeMtpRMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias)
        # Absorbing kv_b_proj into q and the output beats expanding the cache while the query is this short.
        nope_v = self.qk_nope_head_dim + self.v_head_dim
        self.max_absorbed_query_len = self.kv_lora_rank * nope_v // (2 * self.kv_lora_rank + self.qk_rope_head_dim)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, q_len, _ = hidden_states.shape
        if self.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        # -1 heads: tensor parallelism leaves each rank a slice of them (q_b_proj, kv_b_proj column-wise).
        query = query.view(batch_size, q_len, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_rope = self.latent_and_rope_key(hidden_states, position_embeddings)
        q_rope = apply_rotary_interleaved(q_rope, *position_embeddings)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)

        if self._use_absorbed(q_len, latent.shape[2], kwargs.pop("mla_decode", None), kwargs):
            attn_output, attn_weights = self._absorbed_attention(q_nope, q_rope, latent, k_rope, attention_mask), None
        else:
            attn_output, attn_weights = self._expanded_attention(
                q_nope, q_rope, latent, k_rope, attention_mask, **kwargs
            )
        attn_output = attn_output.reshape(batch_size, q_len, -1)
        return self.o_proj(attn_output), attn_weights

    def latent_and_rope_key(
        self, hidden_states: torch.Tensor, position_embeddings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds for these tokens: the normalized latent (batch, 1, seq, kv_lora_rank) and the rotated
        shared rope key (batch, 1, seq, rope_dim)."""
        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(latent).unsqueeze(1), apply_rotary_interleaved(
            k_rope.unsqueeze(1), *position_embeddings
        )

    def _use_absorbed(self, q_len: int, kv_len: int, mla_decode: str | None, kwargs: dict) -> bool:
        """`mla_decode` (kwarg, else config): "expanded", "absorbed" (whenever possible) or "auto" (when cheaper)."""
        mode = mla_decode or self.config.mla_decode
        if mode not in ("auto", "absorbed", "expanded"):
            raise ValueError(f"mla_decode must be 'auto', 'absorbed' or 'expanded', got {mode!r}")
        # Absorption reads kv_b_proj's weight directly, so a quantized or adapted projection takes the expanded path.
        possible = type(self.kv_b_proj) is nn.Linear and not kwargs.get("output_attentions", False)
        if mode == "absorbed" and type(self.kv_b_proj) is not nn.Linear:
            raise ValueError(
                f"mla_decode='absorbed' needs a plain nn.Linear kv_b_proj, but layer {self.layer_idx} has "
                f"{type(self.kv_b_proj).__name__} (quantized or adapted): use mla_decode='auto' or 'expanded'."
            )
        if mode != "auto":
            return mode == "absorbed" and possible
        return possible and q_len < kv_len and q_len <= self.max_absorbed_query_len

    def _expanded_attention(self, q_nope, q_rope, latent, k_rope, attention_mask, **kwargs):
        batch_size, _, kv_len, _ = latent.shape
        nope_v = self.qk_nope_head_dim + self.v_head_dim
        kv = self.kv_b_proj(latent.squeeze(1)).view(batch_size, kv_len, -1, nope_v).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_rope.expand(-1, kv.shape[1], -1, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)
        implementation = self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        # Fused kernels (flash, and sdpa's flash path on CPU) need one head dim for q, k and v: pad v with zeros.
        pad = self.qk_head_dim - self.v_head_dim if implementation not in (None, "eager") else 0
        if pad > 0:
            value = F.pad(value, (0, pad))
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return attn_output[..., : self.v_head_dim], attn_weights

    def _absorbed_attention(self, q_nope, q_rope, latent, k_rope, attention_mask) -> torch.Tensor:
        """Attention in latent space: MQA with one (kv_lora_rank + rope_dim) key and a kv_lora_rank value.

        Heads are folded into the query length so every matmul is a plain bmm with no broadcast copies.
        """
        batch_size, num_heads, q_len, _ = q_nope.shape
        weight = self.kv_b_proj.weight
        if isinstance(weight, DTensor):  # tensor parallel: this rank's heads (rows), as q_nope holds
            weight = weight.to_local()
        weight = weight.view(num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_key, w_value = weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = torch.bmm(q_nope.transpose(0, 1).reshape(num_heads, batch_size * q_len, -1), w_key)
        q_latent = (
            q_latent.view(num_heads, batch_size, q_len, -1).transpose(0, 1).reshape(batch_size, num_heads * q_len, -1)
        )
        latent, k_rope = latent.squeeze(1), k_rope.squeeze(1)  # (batch, kv, dim)
        # The softmax scale goes on the queries, a pass over (heads x q) rows instead of (heads x q) x kv scores.
        scores = torch.bmm(q_latent * self.scaling, latent.transpose(1, 2))
        q_rope = q_rope.reshape(batch_size, num_heads * q_len, -1) * self.scaling
        scores = scores.baddbmm_(q_rope, k_rope.transpose(1, 2)).view(batch_size, num_heads, q_len, -1)
        scores = apply_attention_mask(scores, attention_mask, inplace=True)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        context = torch.bmm(probs.view(batch_size, num_heads * q_len, -1), latent)  # (batch, heads * q, kv_lora_rank)
        context = (
            context.view(batch_size, num_heads, q_len, -1).transpose(0, 1).reshape(num_heads, batch_size * q_len, -1)
        )
        output = torch.bmm(context, w_value.transpose(1, 2))  # (heads, batch * q, v_head_dim)
        return output.view(num_heads, batch_size, q_len, -1).permute(1, 2, 0, 3)


class MoeMtpMLP(nn.Module):
    """SwiGLU MLP: the dense layers, each routed expert and the fused shared experts."""

    def __init__(self, config: MoeMtpConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoeMtpTopkRouter(nn.Module):
    """Scores experts in fp32 and picks the top-k; the correction bias steers the choice, never the gate weights."""

    e_score_correction_bias: torch.Tensor
    tokens_per_expert: torch.Tensor

    def __init__(self, config: MoeMtpConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # Tokens routed to each expert by training-mode forwards since the balancing bias was last updated, kept by
        # balancing.count_routed_tokens. Integers, so `model.to(bfloat16)` cannot round them; a plain tensor rather
        # than a buffer, so DDP's buffer broadcast cannot overwrite one rank's counts with another's.
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router logits (tokens, experts), gate weights (tokens, k) in fp32 and expert indices (tokens, k)."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        device_type = hidden_states.device.type
        # fp32 even under autocast, which would run the linear in bf16/fp16 and move near-tied expert choices.
        autocast = device_type != "meta" and torch.is_autocast_enabled(device_type)
        with torch.autocast(device_type, enabled=False) if autocast else nullcontext():
            router_logits = F.linear(hidden_states.float(), self.weight.float())
        scores = self.scores(router_logits)
        topk_indices = self.select(scores)
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights, topk_indices

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "sigmoid":
            return router_logits.sigmoid()
        return router_logits.softmax(dim=-1, dtype=torch.float32)

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the chosen experts: top-k of the bias-corrected scores within the best `topk_group` groups."""
        choice = scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                # Sum of each group's two best scores; two max passes are several times faster than topk(2) on CPU.
                best, best_index = grouped.max(dim=-1)
                group_scores = best + grouped.scatter(-1, best_index.unsqueeze(-1), float("-inf")).amax(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices


GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(device: torch.device) -> bool:
    """Whether this torch has a grouped GEMM kernel for `device` (CPU from torch 2.9, CUDA on sm80+)."""
    if GROUPED_MM is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


@torch.library.custom_op("moe_mtp::grouped_mm", mutates_args=())
def _grouped_mm_op(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return GROUPED_MM(mat_a, mat_b, offs=offsets)


@_grouped_mm_op.register_fake
def _(mat_a, mat_b, offsets):
    if mat_b.dim() == 3:  # (rows, k) x (groups, k, n) -> (rows, n)
        return mat_a.new_empty(mat_a.shape[0], mat_b.shape[-1])
    return mat_a.new_empty(offsets.shape[0], mat_a.shape[0], mat_b.shape[1])  # (m, rows) x (rows, n) -> (groups, m, n)


def grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM. torch.compile traces it only in bf16, so other dtypes go through an opaque custom op
    that runs the same kernel."""
    if mat_a.dtype == torch.bfloat16 or not torch.compiler.is_compiling():
        return GROUPED_MM(mat_a, mat_b, offs=offsets)
    return _grouped_mm_op(mat_a, mat_b, offsets)


class GroupedExpertLinear(torch.autograd.Function):
    """Rows of expert e times `weight[e].T`, for all experts in one grouped GEMM, forward and backward.

    `weight` is a 3-D (experts, out, in) parameter; its gradient is one grouped GEMM too (zeros for experts without
    rows). `offsets` (int32, on the device) ends each expert's rows. Rows past the last offset (expert-parallel
    routes to another rank's experts) belong to no group: their outputs and gradients are zeroed, not left undefined.
    """

    @staticmethod
    def forward(ctx, rows, offsets, weight, has_stray_rows):
        ctx.save_for_backward(rows, offsets, weight)
        ctx.has_stray_rows = has_stray_rows
        return _zero_stray_rows(grouped_mm(rows, weight.transpose(-2, -1), offsets), offsets, has_stray_rows)

    @staticmethod
    def backward(ctx, grad_output):
        rows, offsets, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = _zero_stray_rows(grouped_mm(grad_output, weight, offsets), offsets, ctx.has_stray_rows)
        if ctx.needs_input_grad[2]:
            grad_weight = grouped_mm(grad_output.t(), rows, offsets)  # (experts, out, in)
        return grad_rows, None, grad_weight, None


def _zero_stray_rows(rows: torch.Tensor, offsets: torch.Tensor, has_stray_rows: bool) -> torch.Tensor:
    if not has_stray_rows:
        return rows
    inside = torch.arange(rows.shape[0], device=rows.device) < offsets[-1]
    return torch.where(inside.unsqueeze(-1), rows, rows.new_zeros(()))


class SlotsOfTokens(torch.autograd.Function):
    """Copies each token to its `top_k` slots in expert order, and back: `gather` (tokens -> sorted slots) and
    `combine` (sorted slots -> the sum over each token's slots) are each other's backward. Both read rows by index
    (a gather, and a bag sum), so neither pass needs a zero-filled scatter (index_add), and the sum is deterministic."""

    @staticmethod
    def forward(ctx, rows, order, slot_position, top_k, to_slots):
        ctx.save_for_backward(order, slot_position)
        ctx.top_k, ctx.to_slots = top_k, to_slots
        return SlotsOfTokens.move(rows, order, slot_position, top_k, to_slots)

    @staticmethod
    def backward(ctx, grad):
        order, slot_position = ctx.saved_tensors
        return SlotsOfTokens.move(grad, order, slot_position, ctx.top_k, not ctx.to_slots), None, None, None, None

    @staticmethod
    def move(rows, order, slot_position, top_k, to_slots):
        if to_slots:
            return rows.index_select(0, order // top_k)
        # Each token's slots as one bag: embedding_bag sums them without first copying every slot row out (on CPU,
        # 7x faster than index_select + sum at 65k slots).
        return F.embedding_bag(slot_position.view(-1, top_k), rows, mode="sum")


def sort_slots(top_k_index: torch.Tensor, num_experts: int):
    """The `tokens x top_k` slots sorted by expert: the order, each slot's position in it, and the int32 end offset of
    each of the `num_experts` groups, all on the device (a fixed-size scatter_add count rather than bincount, so no
    host sync and no graph break under torch.compile). Ids >= num_experts (expert parallelism's routes to another
    rank) sort last, outside every group."""
    expert_of_slot = top_k_index.flatten()
    order = expert_of_slot.argsort(stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=top_k_index.device)
    counts.scatter_add_(0, expert_of_slot.clamp(max=num_experts), torch.ones_like(expert_of_slot))
    offsets = counts[:num_experts].cumsum(0).to(torch.int32)
    slot_position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, slot_position, offsets


class MoeMtpExperts(nn.Module):
    """The routed experts as two 3-D parameters, as transformers' MoE models hold them: `gate_up_proj` (experts,
    2 * width, hidden), each expert's gate rows then its up rows, and `down_proj` (experts, hidden, width). Expert
    parallelism shards dim 0 of both (`base_model_ep_plan`), FSDP2 shards them like any parameter, and the grouped
    GEMMs read them directly. On disk every expert keeps its released keys (`experts.{e}.gate_proj.weight`, ...):
    the conversion mapping registered below stacks them at load and splits them at save.

    `forward(hidden_states, top_k_index, top_k_weights)` is transformers' experts interface, so its expert-parallel
    dispatch can replace it. `last_path` records the path of the last forward: "grouped" (two grouped GEMMs),
    "sliced" (decode-sized CPU steps without autograd, one slot at a time), "dense" (CPU steps without autograd
    that reach every expert of a small layer: all experts on all tokens) or "per_expert" (one GEMM per active
    expert, where the device has no grouped kernel).
    """

    holds_no_routers = True  # the balancing code's router search skips these modules
    # The layout flags transformers' experts modules declare: gate and up fused in `gate_up_proj`, no biases.
    # transformers' tooling finds experts modules by them (its parallelism tests check that the EP plan shards them).
    has_gate = True
    has_bias = False

    def __init__(self, config: MoeMtpConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self._is_expert_parallel = False  # set by transformers' expert-parallel plan, which sets num_experts too
        self.is_transposed = True  # (experts, out, in), as nn.Linear: PEFT's target_parameters reads this
        self.use_grouped_mm = True  # False runs one GEMM per expert (the reference the grouped path is tested on)
        self.last_path: str | None = None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Each token's sum over its `top_k` experts of weight * expert(token); ids >= `num_experts` contribute 0."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.use_grouped_mm and grouped_mm_available(gate_up.device) and gate_up.is_floating_point():
            if (
                gate_up.device.type == "cpu"
                and not torch.is_grad_enabled()
                and not self._is_expert_parallel
                and not isinstance(gate_up, DTensor)
            ):
                if self.dense_pays(top_k_index):
                    self.last_path = "dense"
                    return self.dense(hidden_states, top_k_index, top_k_weights, gate_up, down)
                if top_k_index.numel() <= self.max_sliced_slots():
                    self.last_path = "sliced"
                    return self.sliced(hidden_states, top_k_index, top_k_weights, gate_up, down)
            self.last_path = "grouped"
            return self.grouped(hidden_states, top_k_index, top_k_weights, gate_up, down)
        self.last_path = "per_expert"
        weights = [(gate_up[e], down[e]) for e in range(self.num_experts)]
        return per_expert_forward(self, hidden_states, top_k_index, top_k_weights, weights)

    def max_sliced_slots(self) -> int:
        """The most slots `sliced` takes: a quarter of the experts (measured at 256), or one per expert while the
        experts are so small that the grouped path's fixed cost (sorting and moving the slots) outweighs GEMVs over
        about 3 MB of fp32 weights (measured at 8 experts of 192 x 96: sliced wins up to 12 slots)."""
        small = (3 << 18) // (3 * self.hidden_dim * self.intermediate_dim)
        return max(4, self.num_experts // 4, min(self.num_experts, small))

    def sliced(self, tokens, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
        """Decode-sized CPU steps without autograd (up to `max_sliced_slots`): each slot runs two GEMVs on its
        expert's slices. CPU's grouped GEMM visits every expert, most of them without a row, and gathering the
        experts' weights for a batched matmul copies them; both measured slower (`bench_model.py`'s sweep). The loop's
        cost grows with the slots: at 256 experts it passes the grouped GEMM's between 32 and 128 slots, at 8 small
        experts between 12 and 16. On CUDA the loop would need the expert ids on the host, a sync per layer."""
        num_tokens, top_k = top_k_index.shape
        dtype = gate_up.dtype
        rows = tokens.to(dtype).unbind(0)
        act = self.act_fn.forward  # past nn.Module.__call__: at this size the loop's cost is per-op overhead
        slot_outputs = []
        for slot, expert in enumerate(top_k_index.flatten().tolist()):
            gate, up = torch.mv(gate_up[expert], rows[slot // top_k]).chunk(2)
            slot_outputs.append(torch.mv(down[expert], act(gate) * up))
        outputs = torch.stack(slot_outputs).view(num_tokens, top_k, -1)
        return (outputs * top_k_weights.to(dtype).unsqueeze(-1)).sum(dim=1).to(tokens.dtype)

    def dense_pays(self, top_k_index: torch.Tensor) -> bool:
        """Whether `dense` is the cheapest CPU path: the step has at least as many slots as there are experts (most
        of them get a token anyway), and running every expert on every token stays under 2^23 multiply-adds.
        Measured at 8 and 16 experts of 192 x 96, top-2: dense beats the slot loop once the slots reach the experts'
        count, and the grouped GEMMs up to about twice this budget. At top-2, layers of 16 experts of 256 x 128 or
        larger never take it."""
        num_tokens, top_k = top_k_index.shape
        expert_weights = self.num_experts * 3 * self.hidden_dim * self.intermediate_dim
        return num_tokens * top_k >= self.num_experts and num_tokens * expert_weights <= 1 << 23

    def dense(self, tokens, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
        """Every expert on every token, weighted by a (tokens, experts) gate matrix that is zero off each token's
        chosen experts: one GEMM, one batched GEMM and a sum, whatever the slots (`dense_pays` says when)."""
        num_tokens = tokens.shape[0]
        dtype = gate_up.dtype
        rows = tokens.to(dtype)
        gate_up_rows = F.linear(rows, gate_up.flatten(0, 1)).view(num_tokens, self.num_experts, -1)
        gate, up = gate_up_rows.chunk(2, dim=-1)
        gates = rows.new_zeros(num_tokens, self.num_experts).scatter_add_(1, top_k_index, top_k_weights.to(dtype))
        gates = gates.unsqueeze(-1)
        # Experts a token did not choose contribute exactly 0, even where their output overflows (fp16).
        intermediate = torch.where(gates != 0, self.act_fn(gate) * up * gates, 0.0)  # (tokens, experts, width)
        return torch.bmm(intermediate.transpose(0, 1), down.transpose(1, 2)).sum(0).to(tokens.dtype)

    def grouped(self, tokens, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
        """Slots sorted by expert, gate/up as one grouped GEMM and down as another. Offsets stay on the device."""
        top_k = top_k_index.shape[1]
        order, slot_position, offsets = sort_slots(top_k_index, self.num_experts)
        stray = self._is_expert_parallel  # only expert parallelism routes to ids this module does not hold
        dtype = gate_up.dtype
        sorted_tokens = SlotsOfTokens.apply(tokens.to(dtype), order, slot_position, top_k, True)
        gate, up = GroupedExpertLinear.apply(sorted_tokens, offsets, gate_up, stray).chunk(2, dim=-1)
        # The gate weight scales the narrow intermediate rather than the hidden-size output: same product, less work.
        slot_weights = top_k_weights.flatten().index_select(0, order).unsqueeze(-1).to(dtype)
        intermediate = self.act_fn(gate) * up * slot_weights
        outputs = GroupedExpertLinear.apply(intermediate, offsets, down, stray)
        return SlotsOfTokens.apply(outputs, order, slot_position, top_k, False).to(tokens.dtype)


class MoeMtpExpertList(nn.ModuleList):
    """The routed experts as one `MoeMtpMLP` per expert, built instead of `MoeMtpExperts` when the model is
    created with a `quantization_config` (bitsandbytes, `dtype="fp8"`): the quantizers replace `nn.Linear` modules,
    so every routed expert gets quantized, and PEFT's `target_modules` reach each expert. Same keys as on disk, same
    forward interface; one GEMM per active expert (`last_path` "per_expert")."""

    holds_no_routers = True

    def __init__(self, config: MoeMtpConfig):
        super().__init__(
            MoeMtpMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.num_experts = config.n_routed_experts
        self.last_path: str | None = None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self.last_path = "per_expert"
        return per_expert_forward(self, hidden_states, top_k_index, top_k_weights, list(self))


def per_expert_forward(experts, tokens, top_k_index, top_k_weights, weights) -> torch.Tensor:
    """One GEMM per active expert. `weights[e]` is expert e's module, or its (gate_up, down) weight matrices."""
    top_k = top_k_index.shape[1]
    order, slot_position, _ = sort_slots(top_k_index, experts.num_experts)
    counts = torch.bincount(top_k_index.flatten().clamp(max=experts.num_experts), minlength=experts.num_experts + 1)
    sorted_tokens = SlotsOfTokens.apply(tokens, order, slot_position, top_k, True)
    outputs = []
    for expert, chunk in enumerate(sorted_tokens.split(counts.tolist())):
        if expert == experts.num_experts:  # routes to another rank's experts (expert parallelism)
            outputs.append(chunk.new_zeros(chunk.shape[0], tokens.shape[-1]))
        elif chunk.shape[0]:
            held = weights[expert]
            if isinstance(held, nn.Module):
                outputs.append(held(chunk))
            else:
                gate_up, down = held
                chunk = chunk.to(gate_up.dtype)
                gate, up = (F.linear(chunk, w) for w in gate_up.chunk(2))  # as two nn.Linear layers would
                outputs.append(F.linear(experts.act_fn(gate) * up, down).to(tokens.dtype))
    slot_weights = top_k_weights.flatten().index_select(0, order).unsqueeze(-1).to(tokens.dtype)
    return SlotsOfTokens.apply(torch.cat(outputs) * slot_weights, order, slot_position, top_k, False)


# PEFT LoRA on every routed expert: `LoraConfig(target_parameters=ROUTED_EXPERT_PARAMETERS, ...)` (target_modules
# names reach only per-expert modules, i.e. quantized loads).
ROUTED_EXPERT_PARAMETERS = ["gate_up_proj", "down_proj"]


class MoeMtpMoE(nn.Module):
    """Shared experts plus routed experts; tokens are grouped by expert so each expert runs one GEMM per batch."""

    def __init__(self, config: MoeMtpConfig):
        super().__init__()
        self.gate = MoeMtpTopkRouter(config)
        # Per-expert modules only when a quantizer will replace nn.Linear layers (see MoeMtpExpertList).
        quantized = getattr(config, "quantization_config", None) is not None
        self.experts = MoeMtpExpertList(config) if quantized else MoeMtpExperts(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MoeMtpMLP(
                config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
            )

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, topk_weights, topk_indices = self.gate(flat)
        count_routed_tokens(self.gate, topk_indices, token_mask)
        routed = self.experts(flat, topk_indices, topk_weights).view(shape)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states)
        return routed


class MoeMtpBlock(GradientCheckpointingLayer):
    """Pre-norm attention + MLP block, shared by the main decoder layers and the MTP modules."""

    def __init__(self, config: MoeMtpConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MoeMtpAttention(config, layer_idx)
        self.mlp = MoeMtpMoE(config) if config.is_moe_layer(layer_idx) else MoeMtpMLP(config)
        self.input_layernorm = MoeMtpRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoeMtpRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def block(self, hidden_states, attention_mask, position_embeddings, cache, token_mask=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        return hidden_states + (self.mlp(normed, token_mask) if isinstance(self.mlp, MoeMtpMoE) else self.mlp(normed))


class MoeMtpDecoderLayer(MoeMtpBlock):
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.block(hidden_states, attention_mask, position_embeddings, cache, token_mask, **kwargs)


class MoeMtpSharedHead(nn.Module):
    """The MTP module's own output norm; the projection itself is the main model's `lm_head`."""

    def __init__(self, config: MoeMtpConfig):
        super().__init__()
        self.norm = MoeMtpRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MoeMtpMTPLayer(MoeMtpBlock):
    """MTP module k: combines h^(k-1)_i with the embedding of t_(i+k), runs one block and normalizes the result.

    The released weights were trained with `eh_proj` seeing [embedding; hidden] (as vLLM, SGLang and transformers
    load them), the reverse of the order written in the DeepSeek-V3 paper.
    """

    def __init__(self, config: MoeMtpConfig, depth: int):
        super().__init__(config, layer_idx=config.num_hidden_layers + depth)
        self.enorm = MoeMtpRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = MoeMtpRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = MoeMtpSharedHead(config)

    def forward(
        self,
        previous_hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`cache` holds this module's own latent cache (layer index `num_hidden_layers + k`), used when drafting."""
        hidden_states = self.combine(previous_hidden_states, inputs_embeds)
        hidden_states = self.block(hidden_states, attention_mask, position_embeddings, cache, token_mask, **kwargs)
        return self.shared_head.norm(hidden_states)

    def combine(self, previous_hidden_states: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat((self.enorm(inputs_embeds), self.hnorm(previous_hidden_states)), -1))

    def extend_cache(self, previous_hidden_states, inputs_embeds, position_embeddings, cache: Cache):
        """Appends these slots' cache entries without running the block: drafting needs every slot's entry but only
        the last slot's output."""
        attention_input = self.input_layernorm(self.combine(previous_hidden_states, inputs_embeds))
        cache.update(
            *self.self_attn.latent_and_rope_key(attention_input, position_embeddings), self.self_attn.layer_idx
        )


class MoeMtpPreTrainedModel(PreTrainedModel):
    config: MoeMtpConfig
    config_class = MoeMtpConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeMtpDecoderLayer", "MoeMtpMTPLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Inference and language-model training compile without graph breaks (grouped experts, device-side offsets); the
    # MTP loss skips depths without targets on the host, a graph break outside the layers.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": MoeMtpDecoderLayer,
        "attentions": OutputRecorder(MoeMtpAttention, index=1, layer_name="layers"),  # main layers, not MTP
        "router_logits": OutputRecorder(MoeMtpTopkRouter, index=0),
        # The experts each router chose, so the sequence-wise balance loss need not redo the group-limited top-k.
        "router_indices": OutputRecorder(MoeMtpTopkRouter, index=2),
    }
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    # V2-style checkpoints have no balancing bias; it starts at zero.
    _keys_to_ignore_on_load_missing = [r"e_score_correction_bias"]
    # Extra MTP modules in a checkpoint are dropped with a note (see `from_pretrained`), not reported as errors.
    _keys_to_ignore_on_load_unexpected = [r"^model\.mtp_layers\."]

    def update_balancing_bias(self, gamma: float | None = None) -> dict[str, float]:
        """Moves each MoE layer's balancing bias by `gamma * sign(mean_load - load)` (gamma defaults to
        `config.bias_update_speed`) from the tokens routed since the last update, summed over data-parallel ranks,
        and resets the counts. Returns each layer's MaxVio. Training loops need not call it: an optimizer-step hook
        does it once per optimizer step; calling it yourself hands the update over to you (see balancing.py)."""
        return update_balancing_bias(self, gamma)

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, MoeMtpTopkRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.e_score_correction_bias)
            module.tokens_per_expert = torch.zeros(module.num_experts, dtype=torch.long)
        elif isinstance(module, MoeMtpExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the model, bitsandbytes' quantization state included, each shared storage counted once."""
        return memory_footprint(self, super().get_memory_footprint, return_buffers)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Also loads released DeepSeek and transformers-saved folders (FP8 included), checks local folders first,
        and quantizes while loading; see `loading.load_model`."""
        return load_model(cls, super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
        """Writes a Hub-ready folder atomically, remote code and model card included (see `moe_mtp.hub`)."""
        kwargs.update(is_main_process=is_main_process, state_dict=state_dict)
        return save_model(self, super().save_pretrained, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Uploads the folder `save_pretrained` writes (remote code and generated model card included)."""
        return push_model(self, super().push_to_hub, repo_id, **kwargs)


@dataclass
class MoeMtpModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    mtp_hidden_states (`tuple(torch.Tensor)`, *optional*):
        One tensor per MTP depth k = 1..D, of shape `(batch_size, sequence_length - k, hidden_size)`, already normalized
        by the module's `shared_head.norm`; position i predicts token i + k + 1.

    router_indices (`tuple(torch.Tensor)`, *optional*):
        One tensor per MoE layer (main layers, then the MTP modules that ran), of shape `(tokens, num_experts_per_tok)`:
        the experts each token was sent to. Returned with `output_router_indices=True`.
    """

    mtp_hidden_states: tuple[torch.Tensor, ...] | None = None
    router_indices: tuple[torch.Tensor, ...] | None = None


class MoeMtpModel(MoeMtpPreTrainedModel):
    def __init__(self, config: MoeMtpConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MoeMtpDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoeMtpRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mtp_layers = nn.ModuleList(MoeMtpMTPLayer(config, k) for k in range(config.num_nextn_predict_layers))
        self.rotary_emb = MoeMtpRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()
        track(self)  # the balancing bias then moves after each optimizer step over these weights

    def train(self, mode: bool = True):
        track(self)  # also covers copies made without __init__ (deepcopy)
        return super().train(mode)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_mtp_hidden_states: bool = False,
        mtp_depth: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeMtpModelOutputWithPast:
        r"""
        output_mtp_hidden_states (`bool`, *optional*, defaults to `False`):
            Also run the MTP modules over the sequence and return their normalized hidden states.
        mtp_depth (`int`, *optional*):
            How many MTP depths to run (default: one per module). Depths past the modules run the last module again
            on its own output, as `generate(use_mtp=True)` drafts past them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MoeMtpModel.forward: pass exactly one of `input_ids` or `inputs_embeds`.")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # Only onto a dynamic cache: a static cache's unfilled slots need the full mask, and without a cache packed
        # position_ids need transformers' block-diagonal one.
        if (
            attention_mask is None
            and isinstance(cache, DynamicCache)
            and self._every_layer_absorbs(inputs_embeds, cache, kwargs)
        ):
            causal_mask = None  # latent attention fills the causal mask of short query blocks itself, more cheaply
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :]
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                token_mask=token_mask,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)

        mtp_hidden_states = None
        if output_mtp_hidden_states:
            mtp_hidden_states = self.multi_token_prediction(
                hidden_states, inputs_embeds, attention_mask, position_ids, mtp_depth
            )
        return MoeMtpModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, mtp_hidden_states=mtp_hidden_states
        )

    def _every_layer_absorbs(self, inputs_embeds: torch.Tensor, cache: Cache, kwargs: dict) -> bool:
        """Whether every layer takes the latent path for these queries appended to `cache`."""
        q_len = inputs_embeds.shape[1]
        kv_len = q_len + cache.get_seq_length()
        mla_decode = kwargs.get("mla_decode")
        return all(layer.self_attn._use_absorbed(q_len, kv_len, mla_decode, kwargs) for layer in self.layers)

    def multi_token_prediction(
        self,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        mtp_depth: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Runs MTP depth k = 1..D over the whole sequence: position i sees h^(k-1)_i and the embedding of t_(i+k).
        D is `mtp_depth` (default: the modules' count); depths past the modules reuse the last one."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("Multi-token prediction needs a 2-D padding `attention_mask` (batch, seq) or None.")
        modules = len(self.mtp_layers)
        if mtp_depth is None:
            mtp_depth = modules  # no modules: no depths, as before mtp_depth existed
        elif mtp_depth < 1 or not modules:
            raise ValueError(f"mtp_depth={mtp_depth}: needs at least 1 and a model with MTP modules ({modules})")
        seq_len = inputs_embeds.shape[1]
        position_ids = position_ids.expand(inputs_embeds.shape[0], -1)
        outputs = []
        for depth in range(1, mtp_depth + 1):
            mtp_layer = self.mtp_layers[min(depth, modules) - 1]
            if seq_len - depth < 1:
                break
            embeds, positions = inputs_embeds[:, depth:], position_ids[:, depth:]
            mask = mtp_slot_mask(attention_mask, depth)
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=embeds, attention_mask=mask, cache=None, position_ids=positions
            )
            hidden_states = mtp_layer(
                hidden_states[:, : seq_len - depth],
                embeds,
                attention_mask=causal_mask,
                position_embeddings=self.rotary_emb(embeds, positions),
                token_mask=mask,
            )
            outputs.append(hidden_states)
        return tuple(outputs)


def mtp_slot_mask(attention_mask: torch.Tensor | None, depth: int) -> torch.Tensor | None:
    """Padding mask of MTP depth k: slot i is real only if both its hidden state (position i) and its embedded token
    (position i + k) are, so left padding does not leak in through the hidden state."""
    if attention_mask is None:
        return None
    seq_len = attention_mask.shape[1]
    return attention_mask[:, : seq_len - depth] * attention_mask[:, depth:]


@dataclass
class MoeMtpCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    main_loss (`torch.Tensor`, *optional*):
        Next-token cross-entropy of the main model.
    mtp_losses (`tuple(torch.Tensor)`, *optional*):
        Cross-entropy of MTP depth k = 1..D (predicting token i + k + 1 at position i).
    mtp_logits (`tuple(torch.Tensor)`, *optional*):
        Logits of each MTP depth, of shape `(batch_size, sequence_length - k, vocab_size)`.
    """

    main_loss: torch.Tensor | None = None
    mtp_losses: tuple[torch.Tensor, ...] | None = None
    mtp_logits: tuple[torch.Tensor, ...] | None = None


class MoeMtpForCausalLM(MoeMtpPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # one module, so the MTP logits are gathered too

    def __init__(self, config: MoeMtpConfig):
        super().__init__(config)
        self.model = MoeMtpModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("num_logits_to_keep", "5.40.0", new_name="logits_to_keep")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_mtp_logits: bool = False,
        shift_labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeMtpCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets in transformers' convention (unshifted, -100 ignored). With MTP modules the loss is
            `main_ce + mtp_loss_weight * mean_k(mtp_ce_k)`, plus the sequence-wise balance loss when training with
            `seq_aux_loss_alpha > 0`.
        output_mtp_logits (`bool`, *optional*, defaults to `False`):
            Return the MTP logits even without `labels`.
        shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Already-shifted targets: position i predicts `shift_labels[i]` (MTP depth k: `shift_labels[i + k]`).
            They replace `labels` when given, as under sequence/context parallelism, where shifting a shard locally
            would be wrong.
        """
        config = self.config
        has_targets = labels is not None or shift_labels is not None
        want_mtp = self.runs_mtp(output_mtp_logits or (has_targets and config.mtp_loss_weight > 0), cache)
        want_balance = has_targets and self.training and config.seq_aux_loss_alpha > 0
        if want_balance:
            if want_mtp and (kwargs.get("mtp_depth") or 0) > len(self.model.mtp_layers):
                raise ValueError(
                    f"mtp_depth={kwargs['mtp_depth']} reruns an MTP module, which the sequence-wise balance loss does "
                    "not count: train with seq_aux_loss_alpha=0 or without mtp_depth"
                )
            kwargs["output_router_logits"] = kwargs["output_router_indices"] = True
        outputs: MoeMtpModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_mtp_hidden_states=want_mtp,
            return_dict=True,  # a tuple, if asked for (or set in the config), is made by `can_return_tuple` here
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        mtp_logits = tuple(self.lm_head(h) for h in outputs.mtp_hidden_states) if want_mtp else None

        loss = main_loss = aux_loss = mtp_losses = None
        if has_targets:
            if shift_labels is None:
                shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)
            loss_kwargs = {k: v for k, v in kwargs.items() if k == "num_items_in_batch"}
            loss = main_loss = self.loss_function(
                logits, labels, vocab_size=config.vocab_size, shift_labels=shift_labels, **loss_kwargs
            )
            if mtp_logits:
                mtp_losses, mtp_mean = self.mtp_loss(mtp_logits, logits, shift_labels, attention_mask, loss_kwargs)
                if mtp_mean is not None:
                    loss = loss + config.mtp_loss_weight * mtp_mean
            if want_balance and outputs.router_logits:
                batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
                aux_loss = self.balance_loss(outputs, attention_mask, batch_size, shift_labels, loss_kwargs)
                loss = loss + aux_loss.to(loss.device)

        return MoeMtpCausalLMOutputWithPast(
            loss=loss,
            main_loss=main_loss,
            mtp_losses=mtp_losses,
            aux_loss=aux_loss,
            logits=logits,
            mtp_logits=mtp_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def runs_mtp(self, wanted: bool, cache: Cache | None) -> bool:
        """Whether this forward runs the MTP modules: they exist and are `wanted`, on a whole sequence."""
        if not (wanted and len(self.model.mtp_layers) > 0):
            return False
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "MTP logits are computed over whole sequences and do not use a cache: call the model without "
                "`cache`/`past_key_values` (or with output_mtp_logits=False and no labels). To decode faster with "
                "the MTP modules, use `generate(..., use_mtp=True)`."
            )
        return True

    def mtp_loss(self, mtp_logits, logits, shift_labels, attention_mask, loss_kwargs):
        """Each MTP depth's loss (a zero that keeps the graph where a depth has no targets) and their mean over the
        depths that had targets (None if none had)."""
        if self.config.mtp_loss_targets == "labels":
            per_depth = self.mtp_losses(mtp_logits, shift_labels, attention_mask, loss_kwargs)
        else:
            if logits.shape[1] != shift_labels.shape[1]:  # logits_to_keep cut them
                raise ValueError(
                    f"mtp_loss_targets={self.config.mtp_loss_targets!r} distills the main model's predictions at "
                    "every position: call the model with logits_to_keep=0."
                )
            per_depth = self.mtp_distillation_losses(mtp_logits, logits, shift_labels, attention_mask)
        counted = [depth_loss for depth_loss in per_depth if depth_loss is not None]
        losses = tuple(
            depth_logits.sum() * 0 if depth_loss is None else depth_loss
            for depth_logits, depth_loss in zip(mtp_logits, per_depth, strict=True)
        )
        return losses, torch.stack(counted).mean() if counted else None

    def balance_loss(self, outputs, attention_mask, batch_size, shift_labels, loss_kwargs) -> torch.Tensor:
        """The sequence-wise balance loss, times `seq_aux_loss_alpha`, over the main layers and MTP modules."""
        mtp_depth = len(outputs.mtp_hidden_states or ())
        aux_loss = self.config.seq_aux_loss_alpha * self.sequence_balance_loss(
            outputs.router_logits, outputs.router_indices, attention_mask, batch_size, mtp_depth
        )
        if "num_items_in_batch" in loss_kwargs:
            # The cross-entropies are then sums over the label count of the whole step (Trainer: over its accumulated
            # micro-batches and ranks), which the caller adds up without averaging; weighting this forward's balance
            # loss, a mean, by its share of those labels keeps it a mean overall, instead of counted once per
            # micro-batch and rank.
            items = torch.as_tensor(loss_kwargs["num_items_in_batch"], device=aux_loss.device)
            aux_loss = aux_loss * ((shift_labels != -100).sum().to(aux_loss.device) / items).to(aux_loss.dtype)
        return aux_loss

    def _assisted_decoding(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        inputs_tensor=None,
        assistant_model=None,
        **model_kwargs,
    ):
        """`generate(..., use_mtp=True)` drafts with our own MTP modules (any depth, any batch size; see
        `modeling/speculative.py`); other assisted generation goes to transformers."""
        if generation_config.use_mtp and assistant_model is None:
            from .speculative import mtp_speculative_decoding

            model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("assistant_tokenizer", "tokenizer")}
            return mtp_speculative_decoding(
                self, input_ids, logits_processor, stopping_criteria, generation_config, streamer, **model_kwargs
            )
        for key in MTP_GENERATE_KWARGS:
            model_kwargs.pop(key, None)
        return super()._assisted_decoding(
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            inputs_tensor=inputs_tensor,
            assistant_model=assistant_model,
            **model_kwargs,
        )

    def _validate_model_kwargs(self, model_kwargs: dict):
        # `num_mtp_draft_tokens` and `mla_decode` are generate options that forward reads from **kwargs.
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in MTP_GENERATE_KWARGS})

    def mtp_losses(self, mtp_logits, shift_labels, attention_mask, loss_kwargs) -> list[torch.Tensor | None]:
        """Cross-entropy of each MTP depth k: slot i predicts shift_labels[i + k] (token i + k + 1). Slots whose
        hidden state is padding are ignored; a depth with no target left gives None (instead of a NaN mean)."""
        losses = []
        for depth, depth_logits in enumerate(mtp_logits, start=1):
            targets = shift_labels[:, depth:].contiguous()  # aligned with the S - k slots
            slots = mtp_slot_mask(attention_mask, depth)
            if slots is not None:
                targets = targets.masked_fill(slots.to(targets.device) == 0, -100)
            if not (targets != -100).any():
                losses.append(None)
                continue
            losses.append(
                self.loss_function(
                    depth_logits, None, vocab_size=self.config.vocab_size, shift_labels=targets, **loss_kwargs
                )
            )
        return losses

    def mtp_distillation_losses(self, mtp_logits, main_logits, shift_labels, attention_mask) -> list:
        """Self-distillation losses of each MTP depth k (`config.mtp_loss_targets`): slot i predicts token i + k + 1,
        which the main model predicts at position i + k, so the target is the main model's (detached) output there:
        its distribution (`self_kl`, KL(main || MTP)) or its argmax (`self_greedy`). Slots count where the text has a
        label there (not -100) and the slot is real; a depth with none gives None, as in `mtp_losses`."""
        losses = []
        for depth, depth_logits in enumerate(mtp_logits, start=1):
            valid = shift_labels[:, depth:] != -100
            slots = mtp_slot_mask(attention_mask, depth)
            if slots is not None:
                valid = valid & (slots.to(valid.device) != 0)
            if not valid.any():
                losses.append(None)
                continue
            student = F.log_softmax(depth_logits[valid].float(), dim=-1)
            teacher = main_logits[:, depth:][valid].detach().float()
            if self.config.mtp_loss_targets == "self_greedy":
                losses.append(F.nll_loss(student, teacher.argmax(dim=-1)))
            else:
                teacher = F.log_softmax(teacher, dim=-1)
                losses.append(F.kl_div(student, teacher, log_target=True, reduction="batchmean"))
        return losses

    def moe_routers(self) -> list[MoeMtpTopkRouter]:
        """Routers in execution order: main layers, then MTP modules (`balancing.named_routers` finds them)."""
        return [router for _, router in named_routers(self.model)]

    def sequence_balance_loss(
        self, router_logits, router_indices, attention_mask, batch_size: int, mtp_depths: int
    ) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss, sum_i f_i * P_i per sequence, averaged over sequences and
        summed over MoE layers (the MTP modules that ran included). Padding tokens are left out.

        f_i (expert i's share of the sequence's choices, times experts / top_k) comes from the experts the forward
        chose, `router_indices`; P_i (its mean normalized score) carries the gradient."""
        routed = []  # (router, its tokens' mask) of the MoE layers that ran, in the order of the logits
        for name, router in named_routers(self.model):  # `layers.{i}` in order, then `mtp_layers.{depth - 1}`
            stack, index = name.split(".")
            depth = int(index) + 1 if stack == "mtp_layers" else 0
            if depth <= mtp_depths:
                routed.append((router, mtp_slot_mask(attention_mask, depth) if depth else attention_mask))
        total = None
        for (router, mask), logits, chosen in zip(routed, router_logits, router_indices, strict=True):
            logits = logits.float()  # counts and sums in fp32: half precision stops counting at 256 or overflows
            seq_len = logits.shape[0] // batch_size
            top_k, num_experts = chosen.shape[-1], router.num_experts
            valid = None if mask is None else mask.to(device=logits.device, dtype=logits.dtype)  # (batch, seq)
            tokens = logits.new_full((batch_size, 1), seq_len) if valid is None else valid.sum(1, keepdim=True)
            tokens = tokens.clamp(min=1)
            slot_weight = torch.ones_like(chosen, dtype=logits.dtype) if valid is None else valid.reshape(-1, 1)
            counts = logits.new_zeros(batch_size, num_experts).scatter_add_(
                1,
                chosen.reshape(batch_size, seq_len * top_k),
                slot_weight.expand_as(chosen).reshape(batch_size, seq_len * top_k),
            )
            load = counts * num_experts / (top_k * tokens)  # f_i, (batch, experts)
            scores = router.scores(logits)
            probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch_size, seq_len, num_experts)
            # sum_i f_i * P_i = sum over the sequence's real tokens of (normalized scores . f) / tokens
            per_token = (probs * load.unsqueeze(1)).sum(-1)  # (batch, seq)
            if valid is not None:
                per_token = per_token * valid
            layer_loss = (per_token.sum(dim=1, keepdim=True) / tokens).mean()
            total = layer_loss if total is None else total + layer_loss.to(total.device)
        return total


__all__ = ["MoeMtpPreTrainedModel", "MoeMtpModel", "MoeMtpForCausalLM", "ROUTED_EXPERT_PARAMETERS"]
