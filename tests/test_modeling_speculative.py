"""generate(use_mtp=True): exactness against plain greedy, the sampling rule, batching, rollback and the kwargs."""

import math

import pytest
import torch
from conftest import tiny_config
from transformers import TextIteratorStreamer
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from moe_mtp import MoeMtpForCausalLM
from moe_mtp.modeling import speculative
from moe_mtp.modeling.speculative import speculative_sampling

NEAR_TIE = 1e-5


def untrained_model(**overrides) -> MoeMtpForCausalLM:
    return MoeMtpForCausalLM(tiny_config(num_hidden_layers=2, **overrides)).eval()


def agreeing_model(scale: float = 0.05, **overrides) -> MoeMtpForCausalLM:
    """A model whose MTP modules mostly agree with it: the main model's context mixing (attention and MLP outputs)
    is scaled down, so its next token depends mostly on the current one, and each MTP module reads mostly the
    embedding of its input token through `eh_proj` -- so it predicts what the main model will say next."""
    model = untrained_model(**overrides)
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.mul_(scale)
        for layer in model.model.mtp_layers:
            from_hidden = torch.randn(hidden, hidden, generator=generator) * scale / math.sqrt(hidden)
            layer.eh_proj.weight.copy_(torch.cat((torch.eye(hidden), from_hidden), dim=1))
    return model


def random_batch(batch_size: int, generator: torch.Generator, vocab: int = 128):
    """Left-padded prompts of random lengths 1..12 (pad 0; ids avoid pad, bos and eos)."""
    lengths = torch.randint(1, 13, (batch_size,), generator=generator)
    width = int(lengths.max())
    ids = torch.randint(3, vocab, (batch_size, width), generator=generator)
    mask = (torch.arange(width) >= width - lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def first_mismatch_is_near_tie(model, prompt, mask, plain, mtp, **kwargs) -> bool:
    """Verifying several tokens in one forward changes matmul shapes; a mismatch is accepted only where plain
    greedy's top-2 logits were within NEAR_TIE at the first differing position."""
    for row in range(plain.shape[0]):
        differ = (plain[row] != mtp[row]).nonzero()
        if len(differ) == 0:
            continue
        at = int(differ[0])
        prefix = plain[row : row + 1, :at]
        row_mask = torch.cat((mask[row : row + 1], torch.ones(1, at - mask.shape[1], dtype=torch.long)), dim=1)
        with torch.no_grad():
            logits = model(prefix, attention_mask=row_mask, **kwargs).logits[0, -1].float()
        top2 = logits.topk(2).values
        if float(top2[0] - top2[1]) >= NEAR_TIE:
            return False
    return True


def check_greedy_exact(model, batch_size: int, num_prompts: int = 20, **generate_kwargs):
    generator = torch.Generator().manual_seed(batch_size)
    ties = 0
    stats = []
    for _ in range(num_prompts):
        ids, mask = random_batch(batch_size, generator)
        new = int(torch.randint(8, 65, (1,), generator=generator))
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_mtp=True, return_dict_in_generate=True,
            **generate_kwargs,
        )  # fmt: skip
        stats.append(out.mtp_stats)
        if plain.shape == out.sequences.shape and torch.equal(plain, out.sequences):
            continue
        assert plain.shape[0] == out.sequences.shape[0]
        width = min(plain.shape[1], out.sequences.shape[1])
        assert first_mismatch_is_near_tie(model, ids, mask, plain[:, :width], out.sequences[:, :width]), (
            f"use_mtp greedy differs from plain greedy:\n{plain}\n{out.sequences}"
        )
        ties += 1
    assert ties <= 2, f"{ties} near-ties in {num_prompts} prompts is more than floating-point noise explains"
    drafted = sum(s.drafted for s in stats)
    return sum(s.accepted for s in stats) / drafted, stats


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_exact_untrained_model(batch_size):
    model = untrained_model(num_nextn_predict_layers=1)
    acceptance, stats = check_greedy_exact(model, batch_size)
    assert acceptance < 0.3  # random MTP head: nearly every draft is rolled back
    assert sum(s.steps for s in stats) > 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_exact_agreeing_model(batch_size):
    """Two MTP modules drafting three tokens (the third reuses the last module): long accepted runs, per-row
    acceptance differs, and the MTP caches' speculative slots are rolled back every step."""
    model = agreeing_model(num_nextn_predict_layers=2)
    acceptance, stats = check_greedy_exact(model, batch_size, num_mtp_draft_tokens=3)
    assert acceptance > 0.6
    per_position = [sum(s.accepted_per_position[i] for s in stats) for i in range(3)]
    assert per_position[0] >= per_position[1] >= per_position[2] > 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_exact_with_adaptive_draft_counts(batch_size):
    """num_mtp_draft_tokens="adaptive" changes the count between steps, so the caches roll back by different
    amounts from one step to the next; the tokens must still be plain greedy's."""
    model = agreeing_model(num_nextn_predict_layers=1)
    acceptance, stats = check_greedy_exact(model, batch_size, num_prompts=8, num_mtp_draft_tokens="adaptive")
    assert acceptance > 0.5
    most = speculative.ADAPTIVE_MAX_DRAFTS if batch_size == 1 else speculative.ADAPTIVE_MAX_DRAFTS_BATCHED
    used = {}
    for s in stats:
        assert sum(s.steps_by_drafts.values()) == s.steps and len(s.drafted_per_position) == most
        for drafts, steps in s.steps_by_drafts.items():
            used[drafts] = used.get(drafts, 0) + steps
    assert set(used) == set(range(1, most + 1))  # every count is tried before one is preferred


@pytest.mark.parametrize("num_modules", [1, 2])
def test_each_step_drafts_from_the_training_forwards_mtp_state(monkeypatch, num_modules):
    """The decoding loop's MTP caches (catch-up after each verification, rollbacks, holes, the last module's
    cache-only slots) must give the first draft of every step exactly the state the training forward computes: depth
    1's output at the slot combining the last verified position with the pending token."""
    model = agreeing_model(num_nextn_predict_layers=num_modules, scale=0.3)
    with torch.no_grad():  # sharp attention in the MTP modules, so a cache entry at a wrong slot or position shows
        for layer in model.model.mtp_layers:
            layer.self_attn.q_b_proj.weight.mul_(8)
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(8)
    ids, mask = random_batch(3, torch.Generator().manual_seed(2))
    seen = []
    original = speculative._SpeculativeDecoder.draft

    def capture(self):
        seen.append((self.mtp_last[0].clone(), self.next_position.clone(), self.finished.clone()))
        return original(self)

    monkeypatch.setattr(speculative._SpeculativeDecoder, "draft", capture)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_mtp=True, num_mtp_draft_tokens=3,
        eos_token_id=None, return_dict_in_generate=True,
    )  # fmt: skip
    assert 0 < out.mtp_stats.accepted < out.mtp_stats.drafted  # rollbacks and accepted runs
    full_mask = torch.cat((mask, torch.ones_like(out.sequences[:, ids.shape[1] :])), dim=1)
    with torch.no_grad():
        trained = model.model(out.sequences, attention_mask=full_mask, output_mtp_hidden_states=True)
    depth_1 = trained.mtp_hidden_states[0]  # slot i: hidden state i with the embedding of token i + 1
    padding = (mask == 0).sum(dim=1)
    compared = 0
    for state, next_position, finished in seen:
        for row in range(3):
            slot = int(next_position[row] + padding[row]) - 1  # the pending token sits at column slot + 1
            if finished[row] or slot + 1 >= out.sequences.shape[1]:
                continue
            torch.testing.assert_close(state[row], depth_1[row, slot], atol=1e-4, rtol=1e-4)
            compared += 1
    assert compared > 20


def simulate_adaptive(acceptance: list[float], seconds, steps: int = 60, memory=None) -> dict[int, int]:
    """Runs AdaptiveDraftCount against a synthetic decoder: position i's draft is accepted (with every earlier one)
    in a fraction acceptance[i] of row-steps, and a step with d drafts takes seconds(d). Returns steps per count."""
    stats = speculative.MtpDecodingStats(drafted_per_position=[0] * 3, accepted_per_position=[0] * 3)
    chooser = speculative.AdaptiveDraftCount(3, stats, memory)
    used = {}
    for _ in range(steps):
        drafts = chooser.choose()
        used[drafts] = used.get(drafts, 0) + 1
        for i in range(drafts):  # 100 rows' worth of this step, in expectation
            stats.drafted_per_position[i] += 100
            stats.accepted_per_position[i] += round(100 * acceptance[i])
        chooser.observe(drafts, seconds(drafts))
    chooser.remember()
    return used


def test_adaptive_draft_count_follows_the_measured_speed():
    # Cheap extra drafts and high acceptance: 3 drafts give 3.4 tokens a step for 1.2x the time of 1 (1.9 tokens).
    used = simulate_adaptive([0.9, 0.8, 0.7], lambda d: 1.0 + 0.1 * d)
    assert used[3] >= 45, used
    # Each extra draft doubles the step (a verify forward past a faster kernel's reach): 1 draft is the fastest.
    used = simulate_adaptive([0.8, 0.6, 0.4], lambda d: 2.0**d)
    assert used[1] >= 45, used
    # The neighbours are still probed after the exploration, so a count whose time changes can win back.
    assert used[2] >= 4, used


def test_adaptive_draft_count_sees_through_a_drifting_machine():
    """The machine runs in stretches of 5-15 steps at 1.0-1.6x its speed, with 10% jitter per step, as a trace of
    this VM's speculative steps showed (stretches of 35-41 ms steps among 23-25 ms ones). The chooser compares counts
    by back-to-back steps, so it still runs the best count (3: 3.0 tokens for 1.45 s against 2.5 for 1.3 s) most of
    the time; the fastest of each count's last 10 steps, the rule before, ran it 56% of the time in this simulation,
    its best possible share about 82% (every 6th step probes a neighbour)."""
    import random

    def drifting_machine(seed):
        rng = random.Random(seed)
        stretch = {"left": 0, "slowdown": 1.0}

        def seconds(drafts):
            if stretch["left"] == 0:
                stretch["left"], stretch["slowdown"] = rng.randint(5, 15), rng.uniform(1.0, 1.6)
            stretch["left"] -= 1
            return (1.0 + 0.15 * drafts) * stretch["slowdown"] * rng.uniform(0.9, 1.1)

        return seconds

    shares = []
    for seed in range(10):
        used = simulate_adaptive([0.85, 0.65, 0.5], drifting_machine(seed), steps=120)
        shares.append(used.get(3, 0) / 120)
    assert sum(shares) / len(shares) > 0.7, shares


def test_adaptive_draft_count_remembers_what_it_measured():
    """A second call in the same setting starts from the first call's timings and acceptance: no exploration, so
    the slow count (1) never runs again and the best one (3) runs from the first step."""
    memory = {}
    first = simulate_adaptive([0.9, 0.8, 0.7], lambda d: 1.0 + 0.1 * d, steps=30, memory=memory)
    assert first[1] == 1  # explored on the way down and back up (3, 2, 1, 2, 3)
    second = simulate_adaptive([0.9, 0.8, 0.7], lambda d: 1.0 + 0.1 * d, steps=30, memory=memory)
    assert 1 not in second and second[3] >= 25, second
    # the remembered acceptance weighs at most 256 drafts at position 0: a new text shows within a call
    assert memory["acceptance"]["drafted"][0] == 256


def test_adaptive_draft_count_estimates_deep_positions_from_the_trend_until_they_are_seen():
    """The third draft runs only in 3-draft steps, a few per call: 1 acceptance in 4 drafts is mostly chance, so its
    estimate starts near the earlier positions' trend (0.9, then about 0.74: 0.74 x 0.74 / 0.9, about 0.61) and
    moves to what is seen."""

    def estimate(accepted_third: int, drafted_third: int) -> float:
        stats = speculative.MtpDecodingStats(
            drafted_per_position=[100, 100, drafted_third], accepted_per_position=[90, 72, accepted_third]
        )
        chooser = speculative.AdaptiveDraftCount(3, stats)
        return chooser.expected_tokens_per_step(3) - chooser.expected_tokens_per_step(2)

    assert estimate(0, 0) == pytest.approx(0.611, abs=1e-3)
    assert 0.5 < estimate(1, 4) < 0.611
    assert 0.25 <= estimate(100, 400) < 0.28


def test_generate_remembers_adaptive_timings_per_batch_size_and_prompt_length(monkeypatch):
    """generate's adaptive chooser explores on the first call of a setting only; another batch size, prompt length
    (not within a factor of 2) or sampling instead of greedy is a new setting."""
    model = agreeing_model(num_nextn_predict_layers=1)
    explored = []

    class Recording(speculative.AdaptiveDraftCount):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            explored.append(len(self.schedule) > 0)

    monkeypatch.setattr(speculative, "AdaptiveDraftCount", Recording)
    generator = torch.Generator().manual_seed(0)
    for batch_size, prompt_len in [(1, 12), (1, 10), (2, 12), (1, 40), (1, 12)]:
        prompt = torch.randint(3, 128, (batch_size, prompt_len), generator=generator)
        with torch.no_grad():
            # long enough for the exploration (5, 4, 3, 2, 1, 2, 3, 4, 5 drafts at batch 1) to finish
            plain = model.generate(prompt, max_new_tokens=48, do_sample=False, pad_token_id=0)
            mtp = model.generate(prompt, max_new_tokens=48, do_sample=False, pad_token_id=0, use_mtp=True,
                                 num_mtp_draft_tokens="adaptive")  # fmt: skip
        assert torch.equal(plain, mtp)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=16, do_sample=True, pad_token_id=0, use_mtp=True,
                       num_mtp_draft_tokens="adaptive")  # fmt: skip
    assert explored == [True, False, True, True, False, True]


@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_greedy_exact_with_forced_mla_mode(mode):
    model = agreeing_model(num_nextn_predict_layers=1)
    acceptance, _ = check_greedy_exact(model, 3, num_prompts=4, mla_decode=mode, num_mtp_draft_tokens=2)
    assert acceptance > 0.5


def test_absorbed_and_expanded_agree_after_rollbacks():
    """Decode with MTP under both attention modes, then compare the rolled-back caches and the next logits."""
    model = untrained_model(num_nextn_predict_layers=1)
    ids, mask = random_batch(3, torch.Generator().manual_seed(5))
    results = {}
    for mode in ("absorbed", "expanded"):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_mtp=True, mla_decode=mode,
            num_mtp_draft_tokens=2, eos_token_id=None, return_dict_in_generate=True,
        )  # fmt: skip
        assert out.mtp_stats.accepted < out.mtp_stats.drafted  # there were rollbacks
        results[mode] = out
    absorbed, expanded = results["absorbed"], results["expanded"]
    assert torch.equal(absorbed.sequences, expanded.sequences)
    # Real slots hold the same latents; padding and holes are masked and may differ.
    full_mask = hole_mask(model, ids, mask, absorbed.sequences)
    real = full_mask[:, None, : absorbed.cache.get_seq_length(), None].bool()
    assert not real.all()
    for layer_a, layer_e in zip(absorbed.cache.layers, expanded.cache.layers, strict=True):
        torch.testing.assert_close(layer_a.keys * real, layer_e.keys * real, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer_a.values * real, layer_e.values * real, atol=1e-5, rtol=1e-4)
    # The caches (holes included) continue identically under either mode.
    next_token = absorbed.sequences[:, -1:]
    logits = {}
    for mode, out in results.items():
        cache_len = out.cache.get_seq_length()
        step_mask = torch.cat((full_mask[:, :cache_len], torch.ones(3, 1, dtype=torch.long)), dim=1)
        with torch.no_grad():
            logits[mode] = model(next_token, attention_mask=step_mask, cache=out.cache, mla_decode=mode).logits
    torch.testing.assert_close(logits["absorbed"], logits["expanded"], atol=1e-4, rtol=1e-4)


def hole_mask(model, ids, mask, sequences):
    """Re-runs the decode to read the slot mask the loop ended with (holes included)."""
    captured = {}
    original = speculative._SpeculativeDecoder.sequences

    def capture(self):
        captured["mask"] = self.mask.clone()
        return original(self)

    speculative._SpeculativeDecoder.sequences = capture
    try:
        model.generate(
            ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_mtp=True, num_mtp_draft_tokens=2,
            eos_token_id=None,
        )  # fmt: skip
    finally:
        speculative._SpeculativeDecoder.sequences = original
    return captured["mask"]


def test_batch_rows_hold_holes_and_accept_different_counts():
    model = agreeing_model(num_nextn_predict_layers=1, scale=0.3)
    ids, mask = random_batch(3, torch.Generator().manual_seed(2))
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None)
    slot_mask = hole_mask(model, ids, mask, plain)
    generated_slots = slot_mask[:, ids.shape[1] :]
    assert (generated_slots == 0).any(), "expected rows to reject different drafts (holes)"
    assert generated_slots.shape[1] < 2 * 32 + 2  # slots no row accepted were cropped
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=32, do_sample=False, use_mtp=True, num_mtp_draft_tokens=2,
        eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(out, plain)


def test_stopping_eos_max_new_tokens_and_streamer():
    model = agreeing_model(num_nextn_predict_layers=1)
    ids, mask = random_batch(3, torch.Generator().manual_seed(9))
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None)
    # An eos that appears in the middle of row 0's greedy continuation: that row stops there and is padded.
    eos = int(plain[0, ids.shape[1] + 5])
    kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    plain_streamer, mtp_streamer = RecordingStreamer(), RecordingStreamer()
    plain_eos = model.generate(ids, streamer=plain_streamer, **kwargs)
    mtp_eos = model.generate(ids, use_mtp=True, num_mtp_draft_tokens=3, streamer=mtp_streamer, **kwargs)
    assert torch.equal(plain_eos, mtp_eos)
    assert (mtp_eos[0, ids.shape[1] + 6 :] == 0).all()
    assert len(plain_streamer.puts) == len(mtp_streamer.puts)
    for a, b in zip(plain_streamer.puts, mtp_streamer.puts, strict=True):
        assert torch.equal(a, b)
    assert mtp_streamer.ended

    # A custom stopping criterion, and max_new_tokens smaller than one step's drafts.
    criteria = StoppingCriteriaList([StopAfter(ids.shape[1] + 7)])
    plain_custom = model.generate(ids, stopping_criteria=criteria, **{**kwargs, "eos_token_id": None})
    mtp_custom = model.generate(ids, stopping_criteria=criteria, use_mtp=True, **{**kwargs, "eos_token_id": None})
    assert torch.equal(plain_custom, mtp_custom)
    for new in (1, 2, 3):
        short = dict(kwargs, max_new_tokens=new)
        assert torch.equal(model.generate(ids, **short), model.generate(ids, use_mtp=True, **short))


def test_fast_stopping_path_equals_the_general_one(monkeypatch):
    """The vectorized min-length processors and max-length/EOS criteria (`commit_simple`) against the general
    position-by-position path they stand in for: same sequences, same acceptance statistics, with an EOS in the
    middle of a row, a min_new_tokens ban, and without any EOS."""
    model = agreeing_model(num_nextn_predict_layers=1)
    ids, mask = random_batch(4, torch.Generator().manual_seed(11))
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    eos = int(plain[1, ids.shape[1] + 4])
    cases = [
        dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=0),
        dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=0, min_new_tokens=8),
        dict(max_new_tokens=17, eos_token_id=None, pad_token_id=0),
    ]

    def run(case):
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, use_mtp=True, num_mtp_draft_tokens=2,
            return_dict_in_generate=True, **case,
        )  # fmt: skip
        return out.sequences, out.mtp_stats

    fast = [run(case) for case in cases]
    decoder = speculative._SpeculativeDecoder
    monkeypatch.setattr(decoder, "_length_only_processors", lambda self: None)
    monkeypatch.setattr(decoder, "_simple_criteria", lambda self: None)
    general = [run(case) for case in cases]
    for case, (fast_ids, fast_stats), (general_ids, general_stats) in zip(cases, fast, general, strict=True):
        assert torch.equal(fast_ids, general_ids), case
        assert fast_stats == general_stats, case
    assert (fast[0][0][1, ids.shape[1] + 5 :] == 0).all()  # the row that met EOS is padded after it


def test_text_streamer_receives_the_same_text():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    model = agreeing_model(num_nextn_predict_layers=1)
    ids = torch.tensor([[5, 9, 17]])
    texts = []
    for use_mtp in (False, True):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        model.generate(ids, max_new_tokens=12, do_sample=False, streamer=streamer, use_mtp=use_mtp, eos_token_id=None)
        texts.append("".join(streamer))
    assert texts[0] == texts[1] and texts[0].strip()


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


# --- sampling ----------------------------------------------------------------------------------------------------


def chi_square_upper(dof: int, z: float = 4.0) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z (z = 4: p ~ 3e-5)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled into one cell)."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed_cells = torch.cat((counts[big], counts[~big].sum()[None]))
    expected_cells = torch.cat((expected[big], expected[~big].sum()[None]))
    keep = expected_cells > 0
    statistic = ((observed_cells[keep] - expected_cells[keep]) ** 2 / expected_cells[keep]).sum()
    return float(statistic), int(keep.sum()) - 1


def test_speculative_sampling_rule_reproduces_target_distribution():
    """One draft position: whatever q proposes, the emitted token is distributed as p."""
    torch.manual_seed(0)
    vocab, samples = 6, 60000
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    q = torch.tensor([0.05, 0.10, 0.50, 0.05, 0.20, 0.10])
    drafts = torch.multinomial(q.expand(samples, -1), 1)
    target = torch.stack((p, torch.full((vocab,), 1 / vocab)), dim=0).expand(samples, -1, -1)
    accepted, new_tokens = speculative_sampling(drafts, q.expand(samples, 1, -1), target)
    first = torch.where(accepted > 0, drafts[:, 0], new_tokens[:, 0])
    statistic, dof = chi_square(torch.bincount(first, minlength=vocab).float(), p)
    assert statistic < chi_square_upper(dof)
    # The draft itself is distributed as q, far from p: the same test rejects it, so it has power here.
    statistic, dof = chi_square(torch.bincount(drafts[:, 0], minlength=vocab).float(), p)
    assert statistic > chi_square_upper(dof)


def exact_joint(model, prompt, vocab, steps, temperature):
    """P(t1..t_steps | prompt) under plain sampling, by enumerating every prefix."""
    joint = torch.ones(1)
    prefixes = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(prefixes).logits[:, -1].float() / temperature
            joint = (joint[:, None] * logits.softmax(-1)).reshape(-1)
            prefixes = torch.cat(
                (prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(prefixes.shape[0])[:, None]), dim=1
            )
    return joint


@pytest.mark.parametrize("drafts", [1, 2])
def test_mtp_sampling_matches_plain_sampling_distribution(drafts):
    """Three sampled tokens on a 12-token vocabulary: the joint distribution of use_mtp sampling equals the exact
    plain-sampling distribution (chi-square), and a broken rule that accepts every draft is caught."""
    vocab, steps, samples, temperature = 12, 3, 12000, 0.7
    model = agreeing_model(num_nextn_predict_layers=1, scale=0.5, vocab_size=vocab, eos_token_id=None)
    prompt = torch.tensor([[3, 7, 5, 1]])
    probs = exact_joint(model, prompt, vocab, steps, temperature)

    def sampled_joint():
        torch.manual_seed(1)
        out = model.generate(
            prompt.expand(samples, -1), max_new_tokens=steps, do_sample=True, temperature=temperature, top_k=None,
            use_mtp=True, num_mtp_draft_tokens=drafts, return_dict_in_generate=True,
        )  # fmt: skip
        tokens = out.sequences[:, prompt.shape[1] :]
        codes = sum(tokens[:, i] * vocab ** (steps - 1 - i) for i in range(steps))
        return torch.bincount(codes, minlength=vocab**steps).float(), out.mtp_stats

    counts, stats = sampled_joint()
    assert 0.2 < stats.acceptance_rate < 1.0, stats.acceptance_rate  # both branches of the rule ran
    statistic, dof = chi_square(counts, probs)
    assert statistic < chi_square_upper(dof), (statistic, dof)

    def accept_everything(drafts, draft_probs, target_probs):
        accepted = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long)
        bonus = torch.multinomial(target_probs[:, -1], 1)
        return accepted, torch.cat((drafts, bonus), dim=1)

    original = speculative.speculative_sampling
    speculative.speculative_sampling = accept_everything
    try:
        broken, _ = sampled_joint()
    finally:
        speculative.speculative_sampling = original
    statistic, dof = chi_square(broken, probs)
    assert statistic > chi_square_upper(dof)


# --- kwargs, errors, loading -------------------------------------------------------------------------------------


def test_acceptance_stats_on_model_and_output():
    model = agreeing_model(num_nextn_predict_layers=1)
    ids = torch.tensor([[4, 8, 15, 16]])
    out = model.generate(ids, max_new_tokens=16, use_mtp=True, eos_token_id=None, return_dict_in_generate=True)
    stats = out.mtp_stats
    assert stats is model.last_mtp_stats
    assert stats.drafted == stats.drafted_per_position[0] == stats.steps
    assert stats.accepted == stats.accepted_per_position[0]
    # 16 tokens: one from the prefill, then 1 + accepted per verification step (the last step may overshoot).
    assert stats.steps + stats.accepted >= 15
    assert stats.tokens_per_step == pytest.approx(1 + stats.acceptance_rate)


def test_errors_name_the_fix():
    model = untrained_model(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        model.generate(torch.tensor([[4, 5]]), max_new_tokens=3, use_mtp=True)
    model = untrained_model(num_nextn_predict_layers=1)
    with pytest.raises(ValueError, match="output_scores"):
        model.generate(
            torch.tensor([[4, 5]]), max_new_tokens=3, use_mtp=True, output_scores=True, return_dict_in_generate=True
        )
    with pytest.raises(ValueError, match="input_ids"):
        embeds = model.get_input_embeddings()(torch.tensor([[4, 5]]))
        model.generate(inputs_embeds=embeds, max_new_tokens=3, use_mtp=True)
    with pytest.raises(ValueError, match="mla_decode"):
        model.generate(torch.tensor([[4, 5]]), max_new_tokens=3, mla_decode="fast")
    with pytest.raises(ValueError, match="MoeMtpConfig.mla_decode"):
        tiny_config(mla_decode="fast")
    with pytest.raises(ValueError, match="MoeMtpConfig.num_mtp_draft_tokens"):
        tiny_config(num_mtp_draft_tokens=0)
    with pytest.raises(ValueError, match="MoeMtpConfig.num_mtp_draft_tokens"):
        tiny_config(num_mtp_draft_tokens="fast")
    with pytest.raises(ValueError, match="num_mtp_draft_tokens must be a positive integer or 'adaptive'"):
        model.generate(torch.tensor([[4, 5]]), max_new_tokens=3, use_mtp=True, num_mtp_draft_tokens="fast")


def test_use_mtp_after_save_and_reload(tmp_path):
    model = agreeing_model(num_nextn_predict_layers=1, num_mtp_draft_tokens="adaptive")
    model.save_pretrained(tmp_path)
    reloaded = MoeMtpForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_mtp_draft_tokens == "adaptive"
    ids = torch.tensor([[4, 8, 15, 16]])
    expected = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=10, do_sample=False, use_mtp=True), expected)
    # the saved setting was read: adaptive, up to ADAPTIVE_MAX_DRAFTS at batch 1, ADAPTIVE_MAX_DRAFTS_BATCHED at 2
    assert len(reloaded.last_mtp_stats.drafted_per_position) == speculative.ADAPTIVE_MAX_DRAFTS
    reloaded.generate(ids.repeat(2, 1), max_new_tokens=10, do_sample=False, use_mtp=True)
    assert len(reloaded.last_mtp_stats.drafted_per_position) == speculative.ADAPTIVE_MAX_DRAFTS_BATCHED


def test_mla_decode_kwarg_and_config_choose_the_path(monkeypatch):
    from moe_mtp.modeling.modeling_moe_mtp import MoeMtpAttention

    calls = []
    original = MoeMtpAttention._absorbed_attention

    def spy(self, *args):
        calls.append(self.layer_idx)
        return original(self, *args)

    monkeypatch.setattr(MoeMtpAttention, "_absorbed_attention", spy)
    model = untrained_model(num_nextn_predict_layers=1)
    ids = torch.tensor([[4, 8, 15, 16]])
    outputs = {}
    for mode in ("expanded", "absorbed", "auto"):
        calls.clear()
        outputs[mode] = model.generate(ids, max_new_tokens=4, do_sample=False, mla_decode=mode, eos_token_id=None)
        outputs[mode + "_calls"] = len(calls)
    assert outputs["expanded_calls"] == 0
    assert outputs["absorbed_calls"] > outputs["auto_calls"] > 0  # absorbed also runs the prefill
    assert torch.equal(outputs["expanded"], outputs["absorbed"])
    model.config.mla_decode = "expanded"
    calls.clear()
    model(ids)
    model.generate(ids, max_new_tokens=2, eos_token_id=None)
    assert not calls


def test_use_mtp_on_a_released_layout_folder(tmp_path):
    """Released-layout loads go through `from_pretrained(None, state_dict=...)`: the name must still be the folder
    (it was the string 'None', which transformers' MTP loader then tried to fetch from the hub)."""
    from conversion_fixtures import tiny_config as released_tiny_config
    from conversion_fixtures import write_released

    folder, _ = write_released(tmp_path / "release", released_tiny_config(), fp8=False)
    model = MoeMtpForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config._name_or_path == model.name_or_path == str(folder)
    ids = torch.tensor([[4, 8, 15, 16]])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True), expected)
