"""Behaviour of modeling/modeling_moe_mtp.py on tiny in-memory models."""

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_router_bias, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from moe_mtp import ROUTED_EXPERT_PARAMETERS, MoeMtpForCausalLM, MoeMtpModel
from moe_mtp.modeling.modeling_moe_mtp import MoeMtpMoE


def make_model(kind="v3", **overrides) -> MoeMtpForCausalLM:
    model = MoeMtpForCausalLM(tiny_config(kind, **overrides))
    randomize_router_bias(model)
    return model


def batch(batch_size=2, seq_len=12, vocab=128):
    return torch.randint(3, vocab, (batch_size, seq_len))


# ---------------------------------------------------------------------------------------------------------------- MTP


def ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def mtp_by_definition(model, input_ids):
    """Recomputes every MTP depth from the definitions, using only the model's weights and sub-layers."""
    inner = model.model
    h = inner(input_ids).last_hidden_state  # h^(0): final normalized hidden state of the main model
    batch_size, seq_len = input_ids.shape
    positions = torch.arange(seq_len).expand(batch_size, -1)
    logits = []
    for k, mtp in enumerate(inner.mtp_layers, start=1):
        n = seq_len - k
        emb = inner.embed_tokens(input_ids[:, k:])  # embedding of t_(i+k) for i = 0..n-1
        x = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h[:, :n])], dim=-1))  # [embedding; hidden]
        cos_sin = inner.rotary_emb(emb, positions[:, k:])  # rope positions of the embedded tokens
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        attn, _ = mtp.self_attn(mtp.input_layernorm(x), position_embeddings=cos_sin, attention_mask=causal)
        x = x + attn
        x = x + mtp.mlp(mtp.post_attention_layernorm(x))
        h = mtp.shared_head.norm(x)
        logits.append(model.lm_head(h))
    return logits


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_logits_and_loss_match_the_definition(depth):
    model = make_model(num_nextn_predict_layers=depth, attn_implementation="eager").eval()
    input_ids = batch(seq_len=10)
    labels = input_ids.clone()
    labels[0, 3] = -100  # ignored at every depth
    out = model(input_ids, labels=labels)
    expected = mtp_by_definition(model, input_ids)
    assert len(out.mtp_logits) == depth
    for k, (got, want) in enumerate(zip(out.mtp_logits, expected, strict=True), start=1):
        assert got.shape == (2, 10 - k, 128)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    main = ce(out.logits[:, :-1], labels[:, 1:])
    mtp = [ce(lg[:, :-1], labels[:, k + 1 :]) for k, lg in enumerate(expected, start=1)]
    torch.testing.assert_close(out.main_loss, main, atol=1e-5, rtol=1e-5)
    for got, want in zip(out.mtp_losses, mtp, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert out.aux_loss is None  # eval mode: no balance loss
    torch.testing.assert_close(out.loss, main + 0.3 * torch.stack(mtp).mean(), atol=1e-5, rtol=1e-5)


def test_mtp_depth_past_the_modules_reuses_the_last_module_on_its_own_output():
    """`mtp_depth=3` on one module is three modules that are copies of it; its loss trains the module at every depth,
    the way drafting past the modules uses it."""
    model = make_model(num_nextn_predict_layers=1, seq_aux_loss_alpha=0.0).eval()
    copies = make_model(num_nextn_predict_layers=3).eval()
    state = model.state_dict()
    for k in (1, 2):
        state.update({key.replace("mtp_layers.0.", f"mtp_layers.{k}."): value
                      for key, value in model.state_dict().items() if key.startswith("model.mtp_layers.0.")})  # fmt: skip
    copies.load_state_dict(state)
    input_ids = batch(seq_len=10)
    reused = model(input_ids, labels=input_ids, mtp_depth=3)
    reference = copies(input_ids, labels=input_ids)
    assert len(reused.mtp_logits) == 3
    for got, want in zip(reused.mtp_logits, reference.mtp_logits, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(reused.loss, reference.loss)
    assert len(model(input_ids, labels=input_ids).mtp_logits) == 1  # the default: one depth per module

    model.train()
    model(input_ids, labels=input_ids, mtp_depth=3).mtp_losses[2].backward()  # depth 3 alone reaches the module
    assert model.model.mtp_layers[0].eh_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mtp_depth=0"):
        model(input_ids, labels=input_ids, mtp_depth=0)
    balanced = make_model(num_nextn_predict_layers=1, seq_aux_loss_alpha=0.01).train()
    with pytest.raises(ValueError, match="seq_aux_loss_alpha"):
        balanced(input_ids, labels=input_ids, mtp_depth=2)


def test_loss_decomposition_with_balance_loss_in_training():
    model = make_model(num_nextn_predict_layers=1, seq_aux_loss_alpha=0.01).train()
    input_ids = batch(seq_len=16)
    out = model(input_ids, labels=input_ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    total = out.main_loss + model.config.mtp_loss_weight * torch.stack(out.mtp_losses).mean() + out.aux_loss
    torch.testing.assert_close(out.loss, total)
    # Balanced routing gives sum_i f_i P_i = 1 per layer at best; the loss is alpha times the layer count at most a
    # few multiples of that.
    moe_layers = len(model.moe_routers())
    assert 0.5 * moe_layers * 0.01 < out.aux_loss.item() < 8 * moe_layers * 0.01


def test_sequence_balance_loss_matches_its_definition():
    """alpha * sum over MoE layers (MTP included) of mean_b sum_i f_bi * P_bi, with f_bi = experts / (top_k * T) times
    the tokens of sequence b sent to expert i (after the bias-corrected group top-k), and P_bi its mean normalized
    score."""
    model = make_model(num_nextn_predict_layers=1, seq_aux_loss_alpha=0.01).train()
    input_ids = batch(batch_size=3, seq_len=16)
    out = model(input_ids, labels=input_ids)
    routers = model.moe_routers()
    assert len(out.router_logits) == len(routers)
    expected = 0.0
    for router, logits in zip(routers, out.router_logits, strict=True):
        scores = router.scores(logits.detach()).view(3, -1, router.num_experts)
        for sequence in scores:
            tokens = sequence.shape[0]
            chosen = router.select(sequence)
            f = (
                torch.bincount(chosen.flatten(), minlength=router.num_experts)
                * router.num_experts
                / (router.top_k * tokens)
            )
            p = (sequence / sequence.sum(-1, keepdim=True)).mean(0)
            expected += float((f * p).sum()) / 3
    torch.testing.assert_close(out.aux_loss.item(), 0.01 * expected, atol=1e-7, rtol=1e-5)
    # Its gradient reaches the router weights
    model.zero_grad()
    out.aux_loss.backward()
    assert all(router.weight.grad is not None and router.weight.grad.abs().sum() > 0 for router in routers)


def test_router_and_balance_loss_stay_fp32_under_autocast_and_half_precision_logits():
    model = make_model(num_nextn_predict_layers=0, seq_aux_loss_alpha=0.01).train()
    input_ids = batch(batch_size=2, seq_len=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    # Half-precision logits (from another caller) must not make the loss count in half precision: fp16 overflows
    # tokens**2 and bf16 stops counting at 256 tokens. One 300-token sequence:
    routers = model.moe_routers()
    logits = [torch.randn(300, router.num_experts) * 2 for router in routers]
    chosen = [router.select(router.scores(layer)) for router, layer in zip(routers, logits, strict=True)]
    reference = model.sequence_balance_loss(logits, chosen, None, batch_size=1, mtp_depths=0)
    for dtype in (torch.float16, torch.bfloat16):
        half = [layer.to(dtype) for layer in logits]
        got = model.sequence_balance_loss(half, chosen, None, batch_size=1, mtp_depths=0)
        torch.testing.assert_close(got, reference, rtol=1e-2, atol=0)


def test_sequence_balance_loss_ignores_padding():
    model = make_model(num_nextn_predict_layers=0, seq_aux_loss_alpha=0.01).train()
    input_ids = batch(batch_size=1, seq_len=8)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = model(input_ids, labels=input_ids).aux_loss
    left_padded = model(padded, attention_mask=mask, position_ids=positions, labels=padded.masked_fill(mask == 0, -100))
    torch.testing.assert_close(left_padded.aux_loss, plain, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_mtp_parameter_and_eh_proj_halves_differ():
    model = make_model(num_nextn_predict_layers=1).train()
    input_ids = batch(batch_size=4, seq_len=32)
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.model.mtp_layers.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    grad = model.model.mtp_layers[0].eh_proj.weight.grad
    hidden = model.config.hidden_size
    embed_half, hidden_half = grad[:, :hidden], grad[:, hidden:]
    assert not torch.allclose(embed_half, hidden_half)
    assert embed_half.abs().sum() > 0 and hidden_half.abs().sum() > 0


def test_zero_mtp_depth_is_a_plain_decoder():
    model = make_model(num_nextn_predict_layers=0)
    assert len(model.model.mtp_layers) == 0
    assert not any("mtp" in name for name in model.state_dict())
    input_ids = batch()
    out = model(input_ids, labels=input_ids)
    assert out.mtp_logits is None and out.mtp_losses is None
    torch.testing.assert_close(out.loss, out.main_loss + (out.aux_loss if out.aux_loss is not None else 0))
    assert model.model(input_ids, output_mtp_hidden_states=True).mtp_hidden_states == ()
    with pytest.raises(ValueError, match="mtp_depth=2: needs at least 1 and a model with MTP modules"):
        model.model(input_ids, output_mtp_hidden_states=True, mtp_depth=2)


def test_mtp_weight_zero_skips_the_mtp_forward():
    model = make_model(num_nextn_predict_layers=1, mtp_loss_weight=0.0).eval()
    out = model(batch(), labels=batch())
    assert out.mtp_losses is None and out.loss is out.main_loss
    assert model(batch(), output_mtp_logits=True).mtp_logits[0].shape == (2, 11, 128)


# ---------------------------------------------------------------------------------------------------------------- MoE


def dispatch_by_loop(moe: MoeMtpMoE, tokens, indices, weights):
    experts = moe.experts
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for slot in range(indices.shape[1]):
            e = int(indices[t, slot])
            gate, up = (experts.gate_up_proj[e] @ tokens[t]).chunk(2)
            out[t] += weights[t, slot] * (experts.down_proj[e] @ (experts.act_fn(gate) * up))
    return out


@pytest.mark.parametrize("kind", ["v3", "v2_lite", "group_limited_greedy"])
def test_grouped_dispatch_matches_a_per_token_loop(kind):
    model = make_model(kind)
    moe = model.model.layers[1].mlp
    tokens = torch.randn(40, 64)
    _, weights, indices = moe.gate(tokens)
    torch.testing.assert_close(
        moe.experts(tokens, indices, weights), dispatch_by_loop(moe, tokens, indices, weights), atol=1e-5, rtol=1e-5
    )


def test_router_bias_changes_choice_but_not_gate_weights():
    model = make_model("v3")
    router = model.model.layers[1].mlp.gate
    tokens = torch.randn(64, 64)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        _, _, before = router(tokens)
        router.e_score_correction_bias[3] = 10.0  # force expert 3 into every choice
        logits, weights, after = router(tokens)
    assert (after == 3).any(dim=1).all() and not (before == 3).any(dim=1).all()
    # Gate weights come from the unbiased scores of the chosen experts.
    scores = logits.sigmoid().gather(1, after)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True) * 2.5)


def test_group_limited_routing_stays_within_topk_groups():
    model = make_model("v3")
    router = model.model.layers[1].mlp.gate
    _, _, indices = router(torch.randn(200, 64))
    experts_per_group = 8 // 4
    groups = [set(row.tolist()) for row in indices // experts_per_group]
    assert all(len(g) <= 2 for g in groups)  # topk_group = 2
    assert len(set().union(*groups)) == 4  # yet every group is used by some token


def test_training_forward_records_expert_load_once_per_token_even_with_checkpointing():
    model = make_model(num_nextn_predict_layers=1).train()
    input_ids = batch(batch_size=2, seq_len=10)
    routers = model.moe_routers()
    model(input_ids, labels=input_ids).loss.backward()
    plain = [r.tokens_per_expert.clone() for r in routers]
    main_tokens, mtp_tokens = 2 * 10, 2 * 9
    assert [int(c.sum()) for c in plain] == [main_tokens * 2] * 2 + [mtp_tokens * 2]
    for r in routers:
        r.tokens_per_expert.zero_()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(input_ids, labels=input_ids).loss.backward()
    for before, router in zip(plain, routers, strict=True):
        torch.testing.assert_close(router.tokens_per_expert, before)
    model.eval()
    model(input_ids)
    for before, router in zip(plain, routers, strict=True):
        torch.testing.assert_close(router.tokens_per_expert, before)  # eval forwards are not counted


# ------------------------------------------------------------------------------------------------ attention and cache


def test_cache_holds_only_the_latent_and_rope_key():
    config = tiny_config("v3")
    model = MoeMtpForCausalLM(config).eval()
    out = model(batch(batch_size=3, seq_len=7), use_cache=True)
    assert len(out.cache.layers) == config.num_hidden_layers
    for layer in out.cache.layers:
        assert layer.keys.shape == (3, 1, 7, config.kv_lora_rank)
        assert layer.values.shape == (3, 1, 7, config.qk_rope_head_dim)
        assert layer.keys.shape[-1] + layer.values.shape[-1] == config.cache_dim == 16 + 8


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_absorbed_decode_matches_expanded_full_forward(impl):
    model = make_model(attn_implementation=impl).eval()
    input_ids = batch(seq_len=14)
    with torch.no_grad():
        full = model(input_ids).logits
        step = model(input_ids[:, :5], use_cache=True)
        logits, cache = [step.logits], step.cache
        for t in range(5, 14):
            step = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            logits.append(step.logits)
            cache = step.cache
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    model = make_model().eval()
    input_ids = batch()
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    with torch.no_grad():
        eager = model.set_attn_implementation("eager") or model(input_ids, attention_mask=mask).logits
        sdpa = model.set_attn_implementation("sdpa") or model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(eager[0], sdpa[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager[1, 3:], sdpa[1, 3:], atol=1e-5, rtol=1e-5)


def test_left_padded_batched_generation_equals_per_row_generation():
    model = make_model(num_nextn_predict_layers=1).eval()
    rows = [torch.randint(3, 128, (n,)) for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    input_ids = torch.stack([F.pad(r, (width - len(r), 0), value=0) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    batched = model.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        single = model.generate(row[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, width:], single[0, len(row) :]), i


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(num_nextn_predict_layers=1, seq_aux_loss_alpha=1e-3).train()
    input_ids = batch(batch_size=2, seq_len=12)

    def grads():
        model.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# -------------------------------------------------------------------------------------------------- HF integration


def test_auto_classes_resolve_to_ours(tmp_path):
    config = tiny_config()
    assert isinstance(AutoModelForCausalLM.from_config(config), MoeMtpForCausalLM)
    assert isinstance(AutoModel.from_config(config), MoeMtpModel)
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "MoeMtpConfig"


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    model = make_model(num_nextn_predict_layers=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MoeMtpForCausalLM)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert any(k.endswith("e_score_correction_bias") for k in original)
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert reloaded["model.mtp_layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_loading_with_fewer_mtp_modules_drops_them_with_a_note(tmp_path, caplog):
    make_model(num_nextn_predict_layers=1).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = MoeMtpForCausalLM.from_pretrained(tmp_path, num_nextn_predict_layers=0)
    assert len(loaded.model.mtp_layers) == 0
    assert "dropped because num_nextn_predict_layers=0" in caplog.text


def test_dtype_and_fp32_router(tmp_path):
    make_model().save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        model = MoeMtpForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        router = model.model.layers[1].mlp.gate
        assert model.lm_head.weight.dtype == dtype
        assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
        out = model(batch(), labels=batch())
        assert out.logits.dtype == dtype and torch.isfinite(out.loss)


def test_device_map_auto_loads(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = MoeMtpForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert next(model.parameters()).device.type == "cpu"
    assert model(batch()).logits.shape == (2, 12, 128)


def test_tied_embeddings_and_resize_reach_the_mtp_head():
    model = make_model(tie_word_embeddings=True, num_nextn_predict_layers=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.resize_token_embeddings(160)
    assert model.lm_head.weight.shape[0] == 160 and model.config.vocab_size == 160
    out = model(batch(vocab=160), output_mtp_logits=True)
    assert out.logits.shape[-1] == 160 and out.mtp_logits[0].shape[-1] == 160


def test_untied_resize_keeps_mtp_sharing_the_new_head():
    model = make_model(num_nextn_predict_layers=1)
    model.resize_token_embeddings(150)
    out = model(batch(vocab=150), labels=batch(vocab=150))
    assert out.mtp_logits[0].shape[-1] == 150 and torch.isfinite(out.loss)


def test_logits_to_keep_and_legacy_name():
    model = make_model().eval()
    input_ids = batch()
    full = model(input_ids).logits
    torch.testing.assert_close(model(input_ids, logits_to_keep=1).logits, full[:, -1:])
    with pytest.warns(FutureWarning, match="num_logits_to_keep"):  # transformers' own deprecation of the old name
        torch.testing.assert_close(model(input_ids, num_logits_to_keep=3).logits, full[:, -3:])


def test_hidden_states_attentions_and_router_logits():
    model = make_model(attn_implementation="eager", num_nextn_predict_layers=1).eval()
    out = model(batch(), output_hidden_states=True, output_attentions=True, output_router_logits=True)
    config = model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape == (2, config.num_attention_heads, 12, 12)
    assert len(out.router_logits) == config.num_hidden_layers - config.first_k_dense_replace
    assert out.router_logits[0].shape == (24, config.n_routed_experts)


def test_tuple_output_and_inputs_embeds():
    model = make_model().eval()
    input_ids = batch()
    logits = model(input_ids).logits
    embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, logits)
    assert isinstance(model(input_ids, return_dict=False), tuple)
    with pytest.raises(ValueError, match="exactly one of"):
        model(input_ids, inputs_embeds=embeds)


def test_peft_lora_targets_the_experts_and_keeps_decode_exact():
    from peft import LoraConfig, get_peft_model

    model = make_model(num_nextn_predict_layers=1)
    targets = ["gate_proj", "up_proj", "down_proj", "kv_b_proj"]
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=targets, target_parameters=ROUTED_EXPERT_PARAMETERS))
    input_ids = batch(batch_size=4, seq_len=16)
    lora(input_ids=input_ids, labels=input_ids).loss.backward()
    trained = {n for n, p in lora.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".layers.1.mlp.experts." in n and "lora_B" in n for n in trained)
    assert any("mtp_layers.0.mlp.experts." in n and "lora_B" in n for n in trained)
    # A LoRA-wrapped kv_b_proj makes decode take the expanded path, which must still match the full forward.
    lora.eval()
    with torch.no_grad():
        for module in lora.modules():
            if hasattr(module, "lora_B"):
                for weight in module.lora_B.values():
                    weight.weight.normal_(std=0.05)
        full = lora(input_ids=input_ids).logits
        step = lora(input_ids=input_ids[:, :15], use_cache=True)
        last = lora(input_ids=input_ids[:, 15:], cache=step.cache, use_cache=True).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ padding and edges


def left_pad(row: torch.Tensor, pad: int):
    input_ids = F.pad(row, (pad, 0), value=0)[None]
    mask = F.pad(torch.ones_like(row), (pad, 0))[None]
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mtp_ignores_left_padding(impl):
    model = make_model(num_nextn_predict_layers=2, attn_implementation=impl).eval()
    row = torch.randint(3, 128, (9,))
    plain = model(row[None], labels=row[None])
    input_ids, mask, positions = left_pad(row, 4)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 4] = -100  # the unpadded row never predicts its first token either
    padded = model(input_ids, attention_mask=mask, position_ids=positions, labels=labels)
    for k, (got, want) in enumerate(zip(padded.mtp_logits, plain.mtp_logits, strict=True), start=1):
        torch.testing.assert_close(got[:, 4:], want, atol=1e-5, rtol=1e-5, msg=f"depth {k}")
    for got, want in zip(padded.mtp_losses, plain.mtp_losses, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.loss, plain.loss, atol=1e-5, rtol=1e-5)


def test_expert_load_leaves_padding_out():
    model = make_model(num_nextn_predict_layers=1).train()
    row = torch.randint(3, 128, (8,))
    model(row[None], labels=row[None])
    plain = [r.tokens_per_expert.clone() for r in model.moe_routers()]
    for router in model.moe_routers():
        router.tokens_per_expert.zero_()
    input_ids, mask, positions = left_pad(row, 5)
    model(input_ids, attention_mask=mask, position_ids=positions, labels=input_ids.masked_fill(mask == 0, -100))
    for before, router in zip(plain, model.moe_routers(), strict=True):
        torch.testing.assert_close(router.tokens_per_expert, before)


def test_balance_loss_is_per_sequence_without_a_mask():
    model = make_model(num_nextn_predict_layers=1, seq_aux_loss_alpha=0.01).train()
    input_ids = batch(batch_size=3, seq_len=10)
    no_mask = model(input_ids, labels=input_ids).aux_loss
    ones = model(input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids).aux_loss
    rows = torch.stack([model(r[None], labels=r[None]).aux_loss for r in input_ids]).mean()
    torch.testing.assert_close(no_mask, ones)
    torch.testing.assert_close(no_mask, rows)


def test_balance_loss_without_the_mtp_loss():
    model = make_model(num_nextn_predict_layers=1, mtp_loss_weight=0.0, seq_aux_loss_alpha=0.01).train()
    out = model(batch(), labels=batch())
    assert out.mtp_losses is None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.main_loss + out.aux_loss)


def test_mtp_depth_without_targets_does_not_make_the_loss_nan():
    model = make_model(num_nextn_predict_layers=2).eval()
    input_ids = batch(seq_len=3)  # depth 2 has one slot and nothing left to predict
    out = model(input_ids, labels=input_ids)
    assert torch.isfinite(out.loss) and out.mtp_losses[1].item() == 0
    torch.testing.assert_close(out.loss, out.main_loss + 0.3 * out.mtp_losses[0])


def test_mtp_with_a_filled_cache_is_refused_clearly():
    model = make_model(num_nextn_predict_layers=1).eval()
    cache = model(batch(), use_cache=True).cache
    with pytest.raises(ValueError, match="do not use a cache"):
        model(batch(seq_len=1), cache=cache, output_mtp_logits=True)


def test_attentions_are_the_main_layers_even_when_mtp_runs():
    model = make_model(num_nextn_predict_layers=1, attn_implementation="eager").eval()
    out = model(batch(), labels=batch(), output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers


def test_absorbed_attention_accepts_a_two_dimensional_padding_mask():
    """Flash attention hands layers a (batch, kv) padding mask; the latent-space decode path must honour it."""
    attn = make_model().eval().model.layers[0].self_attn
    q_nope, q_rope = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 8)
    latent, k_rope = torch.randn(2, 1, 7, 16), torch.randn(2, 1, 7, 8)
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, :2] = 0
    causal = torch.ones(3, 7, dtype=torch.bool).tril(4)
    four_d = causal[None, None] & padding[:, None, None, :].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            attn._absorbed_attention(q_nope, q_rope, latent, k_rope, padding),
            attn._absorbed_attention(q_nope, q_rope, latent, k_rope, four_d),
        )
        # No mask: the queries are the keys' last 3 positions, masked causally.
        torch.testing.assert_close(
            attn._absorbed_attention(q_nope, q_rope, latent, k_rope, None),
            attn._absorbed_attention(q_nope, q_rope, latent, k_rope, causal[None, None].expand(2, 1, 3, 7)),
        )


@pytest.mark.parametrize("mla_decode", ["absorbed", "expanded"])
def test_packed_sequences_stay_apart_on_every_attention_path(mla_decode):
    """Packed position_ids (padding-free batches) need transformers' block-diagonal mask, latent path included."""
    model = make_model(attn_implementation="eager").eval()
    first, second = batch(batch_size=1, seq_len=5), batch(batch_size=1, seq_len=4)
    packed = torch.cat((first, second), dim=1)
    positions = torch.cat((torch.arange(5), torch.arange(4)))[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions, mla_decode=mla_decode, use_cache=False).logits
        apart = torch.cat([model(ids, mla_decode=mla_decode, use_cache=False).logits for ids in (first, second)], dim=1)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mla_decode", ["auto", "expanded"])
def test_multi_token_steps_on_a_cache_match_the_full_forward(monkeypatch, mla_decode):
    """Speculative verification feeds a few tokens at once onto a cache. Without padding, latent attention masks
    that block itself and the model builds no mask tensor; the expanded path still gets transformers' mask."""
    import moe_mtp.modeling.modeling_moe_mtp as modeling

    model = make_model(attn_implementation="sdpa").eval()
    input_ids = batch(seq_len=14)
    masks_built = []
    original = modeling.create_causal_mask
    monkeypatch.setattr(modeling, "create_causal_mask", lambda **kw: masks_built.append(1) or original(**kw))
    with torch.no_grad():
        full = model(input_ids).logits
        step = model(input_ids[:, :5], use_cache=True)
        logits, cache = [step.logits], step.cache
        masks_built.clear()
        for t in range(5, 14, 3):
            step = model(input_ids[:, t : t + 3], cache=cache, use_cache=True, mla_decode=mla_decode)
            logits.append(step.logits)
            cache = step.cache
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(masks_built) == (0 if mla_decode == "auto" else 3)


def test_from_pretrained_of_a_release_honours_string_dtype_and_given_config(tmp_path):
    from conversion_fixtures import tiny_config as release_config
    from conversion_fixtures import write_released

    src, _ = write_released(tmp_path / "release", release_config())
    by_name = MoeMtpForCausalLM.from_pretrained(src, dtype="float32")
    by_dtype = MoeMtpForCausalLM.from_pretrained(src, dtype=torch.float32)
    for key, value in by_dtype.state_dict().items():
        assert torch.equal(by_name.state_dict()[key], value), key
    config = release_config(num_nextn_predict_layers=0)
    given = MoeMtpForCausalLM.from_pretrained(src, config=config, dtype=torch.float32)
    assert len(given.model.mtp_layers) == 0
    torch.testing.assert_close(given.model.embed_tokens.weight, by_dtype.model.embed_tokens.weight)


def test_trainer_trains_the_model_with_its_mtp_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_model(num_nextn_predict_layers=1)
    rows = batch(batch_size=16, seq_len=16)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    before = model.model.mtp_layers[0].eh_proj.weight.detach().clone()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not torch.equal(model.model.mtp_layers[0].eh_proj.weight, before)  # the MTP loss reaches MTP weights
    # The loads were counted, moved the balancing bias after each step and were reset (tests/test_modeling_balancing.py).
    assert model.model._balancing_state.updates == 6
    assert sum(int(r.tokens_per_expert.sum()) for r in model.moe_routers()) == 0
