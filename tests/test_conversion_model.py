"""Converted checkpoints in the models: ours against transformers' DeepseekV3/V2 classes, and the MTP module of a
released-layout FP8 checkpoint against a direct computation from its tensors."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conversion_fixtures import V2_LITE, tiny_config, write_released
from transformers import DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

from moe_mtp import MoeMtpConfig, MoeMtpForCausalLM
from moe_mtp.conversion import (
    canonical_shapes,
    convert,
    convert_state_dict,
    load_state_dict_from_folder,
    read_config_dict,
    transformers_config,
)

KINDS = {
    "v3": {},
    "v3_no_q_lora_tied": {"q_lora_rank": None, "tie_word_embeddings": True},
    "v2_lite": V2_LITE,
    "v2_grouped": {**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
}


def hf_model(config):
    tc = transformers_config(config)
    cls = DeepseekV3ForCausalLM if isinstance(tc, DeepseekV3Config) else DeepseekV2ForCausalLM
    return cls(tc).eval()


def randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_our_state_dict_has_the_canonical_names_and_shapes(kind):
    for depth in (0, 1, 2):
        config = tiny_config(**{**KINDS[kind], "num_nextn_predict_layers": depth})
        # In memory the routed experts are stacked; the canonical (on-disk) names have one key per expert.
        state = convert_state_dict(MoeMtpForCausalLM(config).state_dict(), config, "moe_mtp_model", "moe_mtp")
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        assert {k: tuple(v.shape) for k, v in state.items()} == canonical_shapes(config)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_after_conversion(kind):
    config = tiny_config(**{**KINDS[kind], "num_nextn_predict_layers": 0})
    ids = torch.randint(0, config.vocab_size, (2, 11))
    ours = randomized(MoeMtpForCausalLM(config))
    if kind.startswith("v2"):  # V2 routing has no bias; the transformers layout cannot hold one
        ours.model.layers[1].mlp.gate.e_score_correction_bias.zero_()
        ours.model.layers[2].mlp.gate.e_score_correction_bias.zero_()
    theirs = hf_model(config)
    theirs.load_state_dict(convert_state_dict(ours.state_dict(), config, "moe_mtp_model", "transformers"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)
    # and the other way: transformers' random weights into ours
    theirs = randomized(hf_model(config))
    ours = MoeMtpForCausalLM(config).eval()
    result = ours.load_state_dict(
        convert_state_dict(theirs.state_dict(), config, "transformers", "moe_mtp_model"), strict=False
    )
    assert not result.unexpected_keys  # a tied lm_head is the embedding, so the moe_mtp layout leaves it out
    assert result.missing_keys == (["lm_head.weight"] if config.tie_word_embeddings else [])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)


def test_released_fp8_checkpoint_logits_and_mtp_draft(tmp_path):
    config = tiny_config()
    src, _ = write_released(tmp_path / "release", config)
    convert(src, tmp_path / "ours", dtype="fp32", progress=False)
    ours = MoeMtpForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    weights = load_state_dict_from_folder(src, config, dtype=torch.float32)
    theirs = hf_model(config)
    with pytest.warns(UserWarning, match="no MTP modules"):
        hf_weights = convert_state_dict(weights, config, "moe_mtp", "transformers")
    theirs.load_state_dict(hf_weights, strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        out = ours(ids, output_mtp_logits=True)
        torch.testing.assert_close(out.logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)
        h = theirs.model(ids).last_hidden_state  # h^(0): the main model's final normalized hidden state
        assert torch.allclose(out.logits, ours.lm_head(h), atol=1e-5)
        # The MTP module straight from the release's tensors (layer N), run with transformers' own decoder layer.
        n = config.num_hidden_layers
        released = {k.removeprefix(f"model.layers.{n}."): v for k, v in _release_tensors(src, config).items()
                    if k.startswith(f"model.layers.{n}.")}  # fmt: skip
        tc = transformers_config(config)
        block = DeepseekV3DecoderLayer(tc, layer_idx=n).eval()
        state = {k: v for k, v in released.items() if k.startswith(("self_attn", "mlp", "input_", "post_"))}
        experts = range(config.n_routed_experts)
        gate_up = [torch.cat([state.pop(f"mlp.experts.{e}.{p}_proj.weight") for p in ("gate", "up")]) for e in experts]
        state["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state["mlp.experts.down_proj"] = torch.stack([state.pop(f"mlp.experts.{e}.down_proj.weight") for e in experts])
        block.load_state_dict(state, strict=True)
        rms = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))  # noqa: E731
        emb = released["embed_tokens.weight"][ids[:, 1:]]  # the module's own copy of the embedding
        x = torch.cat([rms(emb, released["enorm.weight"]), rms(h[:, :-1], released["hnorm.weight"])], dim=-1)
        x = x @ released["eh_proj.weight"].T
        positions = torch.arange(1, ids.shape[1]).expand(2, -1)
        cos_sin = DeepseekV3RotaryEmbedding(tc)(x, positions)
        causal = torch.full((ids.shape[1] - 1,) * 2, float("-inf")).triu(1)[None, None]
        x = block(x, attention_mask=causal, position_embeddings=cos_sin, position_ids=positions)
        x = x[0] if isinstance(x, tuple) else x
        draft = rms(x, released["shared_head.norm.weight"]) @ released["shared_head.head.weight"].T
        torch.testing.assert_close(out.mtp_logits[0], draft, rtol=1e-4, atol=1e-5)


def _release_tensors(folder, config) -> dict[str, torch.Tensor]:
    """The released files' tensors, FP8 weights dequantized to float32 by hand."""
    from conversion_fixtures import load_folder

    raw = load_folder(folder)
    out = {}
    for key, tensor in raw.items():
        if key.endswith("_scale_inv"):
            continue
        if key + "_scale_inv" in raw:
            scale = raw[key + "_scale_inv"]
            rows, cols = tensor.shape
            full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            tensor = tensor.float() * full
        out[key] = tensor.float()
    return out


def test_released_folder_loads_through_the_from_pretrained_helpers(tmp_path):
    config = tiny_config(num_nextn_predict_layers=2)
    src, ours = write_released(tmp_path / "release", config)
    loaded_config = MoeMtpConfig(**read_config_dict(src))
    assert loaded_config.num_nextn_predict_layers == 2
    model = MoeMtpForCausalLM(loaded_config)
    weights = load_state_dict_from_folder(src, loaded_config, dtype=torch.float32, layout="moe_mtp_model")
    model.load_state_dict(weights, strict=True)
    assert torch.equal(model.model.mtp_layers[1].hnorm.weight, ours["model.mtp_layers.1.hnorm.weight"].float())


@pytest.mark.parametrize("kind, fp8", [("v3", True), ("v2_lite", False)])
def test_from_pretrained_loads_a_released_folder_directly(kind, fp8, tmp_path):
    config = tiny_config(**KINDS[kind])
    src, _ = write_released(tmp_path / "release", config, fp8=fp8)
    direct = MoeMtpForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert direct.config.model_type == "moe_mtp" and not hasattr(direct.config, "quantization_config")
    assert direct.config.num_nextn_predict_layers == config.num_nextn_predict_layers
    convert(src, tmp_path / "converted", dtype="fp32", progress=False)
    converted = MoeMtpForCausalLM.from_pretrained(tmp_path / "converted").eval()
    for key, value in converted.state_dict().items():
        assert torch.equal(direct.state_dict()[key], value), key

    theirs = hf_model(config)
    weights = load_state_dict_from_folder(src, config, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' layout has no MTP modules
        theirs.load_state_dict(convert_state_dict(weights, config, "moe_mtp", "transformers"), strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (direct(ids).logits - theirs(ids).logits).abs().max() <= 1e-4
        if config.num_nextn_predict_layers:
            torch.testing.assert_close(
                direct(ids, output_mtp_logits=True).mtp_logits[0], converted(ids, output_mtp_logits=True).mtp_logits[0]
            )


def test_from_pretrained_of_a_release_can_drop_its_mtp_layer(tmp_path, caplog):
    src, _ = write_released(tmp_path / "release", tiny_config())
    with caplog.at_level(logging.WARNING):
        model = MoeMtpForCausalLM.from_pretrained(src, num_nextn_predict_layers=0, dtype=torch.bfloat16)
    assert len(model.model.mtp_layers) == 0 and model.dtype == torch.bfloat16
    assert "dropped because num_nextn_predict_layers=0" in caplog.text
