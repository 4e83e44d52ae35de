"""Same random weights in moe_mtp and in transformers' built-in DeepSeek classes: same numbers (fp32)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_router_bias, tiny_config
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.conversion import convert_state_dict, transformers_config

REFERENCE_CLASS = {
    "v3": DeepseekV3ForCausalLM,
    "v2_lite": DeepseekV2ForCausalLM,
    "group_limited_greedy": DeepseekV2ForCausalLM,
}
ATOL = 1e-4
# transformers has no MTP modules; converting to its layout drops ours, with this warning.
pytestmark = pytest.mark.filterwarnings("ignore:the destination layout has no MTP modules")


def model_pair(kind: str, impl: str):
    ours = MoeMtpForCausalLM(tiny_config(kind, num_nextn_predict_layers=1, attn_implementation=impl)).eval()
    if kind == "v3":
        randomize_router_bias(ours)  # the bias must steer both implementations' choice the same way
    reference = REFERENCE_CLASS[kind](transformers_config(ours.config)).eval()
    reference.set_attn_implementation(impl)
    weights = convert_state_dict(ours.state_dict(), ours.config, "moe_mtp_model", "transformers")
    reference.load_state_dict(weights, strict=True)
    return ours, reference


def left_padded_batch():
    rows = [torch.randint(3, 128, (n,)) for n in (11, 6, 9)]
    width = max(len(r) for r in rows)
    input_ids = torch.stack([F.pad(r, (width - len(r), 0), value=0) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    return input_ids, mask


@pytest.fixture(params=["v3", "v2_lite", "group_limited_greedy"])
def kind(request):
    return request.param


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_full_forward_logits_match(kind, impl):
    ours, reference = model_pair(kind, impl)
    input_ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        diff = (ours(input_ids).logits - reference(input_ids).logits).abs().max()
    assert diff <= ATOL


def test_padded_forward_logits_match(kind):
    ours, reference = model_pair(kind, "sdpa")
    input_ids, mask = left_padded_batch()
    with torch.no_grad():
        got, want = ours(input_ids, attention_mask=mask).logits, reference(input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= ATOL


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefill_then_cached_decode_logits_match(kind, impl):
    ours, reference = model_pair(kind, impl)
    input_ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        a, b = ours(input_ids[:, :7], use_cache=True), reference(input_ids[:, :7], use_cache=True)
        diffs = [(a.logits - b.logits).abs().max()]
        for t in range(7, 16):
            a = ours(input_ids[:, t : t + 1], cache=a.cache, use_cache=True)
            b = reference(input_ids[:, t : t + 1], cache=b.cache, use_cache=True)
            diffs.append((a.logits - b.logits).abs().max())
    assert max(diffs) <= ATOL


def test_greedy_generation_is_identical(kind):
    ours, reference = model_pair(kind, "sdpa")
    input_ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids, **kwargs), reference.generate(input_ids, **kwargs))


# Every rope type transformers' DeepseekV3 runs, past the trained length (32 here) so scaling matters: `dynamic`
# rescales as the sequence grows (prefill and again while decoding), `longrope` switches to its long factors.
MAX_POSITIONS = 32
ROPE_TYPES = {
    "default": {},
    "linear": {"factor": 4.0, "mscale_all_dim": 0.7},  # mscale_all_dim folds into the softmax scale for any type
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "mscale": 0.8, "mscale_all_dim": 0.7, "original_max_position_embeddings": 8},
    "longrope": {"short_factor": [1.0, 1.1, 1.2, 1.5], "long_factor": [1.0, 2.0, 4.0, 8.0],
                 "original_max_position_embeddings": 8},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "proportional": {"factor": 2.0},
}  # fmt: skip


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_every_rope_type_matches_for_long_inputs(rope_type):
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_TYPES[rope_type]}
    config = tiny_config("v3", max_position_embeddings=MAX_POSITIONS, rope_parameters=rope, attn_implementation="sdpa")
    ours = MoeMtpForCausalLM(config).eval()
    reference = DeepseekV3ForCausalLM(transformers_config(ours.config)).eval()
    reference.set_attn_implementation("sdpa")
    reference.load_state_dict(convert_state_dict(ours.state_dict(), ours.config, "moe_mtp_model", "transformers"))
    input_ids = torch.randint(3, 128, (2, 3 * MAX_POSITIONS))
    prefill = 2 * MAX_POSITIONS
    with torch.no_grad():
        a, b = ours(input_ids[:, :prefill], use_cache=True), reference(input_ids[:, :prefill], use_cache=True)
        diffs = [(a.logits - b.logits).abs().max()]
        for t in range(prefill, input_ids.shape[1], 8):
            a = ours(input_ids[:, t : t + 8], cache=a.cache, use_cache=True)
            b = reference(input_ids[:, t : t + 8], cache=b.cache, use_cache=True)
            diffs.append((a.logits - b.logits).abs().max())
    assert max(diffs) <= ATOL
    if rope_type != "default":  # the scaling is live: plain rope gives other logits on the same weights
        plain = MoeMtpForCausalLM(tiny_config("v3", max_position_embeddings=MAX_POSITIONS, rope_parameters=None))
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert not torch.allclose(
                plain.eval()(input_ids).logits, ours(input_ids).logits, atol=1e-5
            )  # same-math reruns agree to ~1e-7
