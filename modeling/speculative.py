"""Self-speculative decoding with the MTP modules: `model.generate(..., use_mtp=True)`.

Each step the MTP modules draft `num_mtp_draft_tokens` tokens, the main model verifies them (plus the pending token)
in one forward, and every row keeps the longest verified prefix plus one token of the main model's own. Greedy
decoding is therefore token-for-token plain greedy decoding; sampling uses the speculative rejection rule
(Leviathan et al., 2023), so its output distribution is plain sampling's.

Cache layout. The main latent cache and the MTP modules' own latent caches (layer index `num_hidden_layers + k`, in
a separate `DynamicCache`) share one slot layout: every step appends `1 + drafts` slots to every row. The slots no
row accepted are cropped off (the rollback); slots that only some rows rejected stay as masked holes, since rows
accept different numbers of tokens. Rope is applied before caching, so holes never shift any position. With batch 1
there are no holes at all.

MTP slots. Slot j of every MTP cache embeds token t_(j+1): depth d at slot j combines the depth d-1 output of the
previous real slot (the main model's hidden state for d = 1) with the embedding of t_(j+1), and predicts t_(j+2),
exactly as in training (`MoeMtpModel.multi_token_prediction`). Those entries need only verified tokens, so they are
computed once, right after verification ("catch-up"). Drafts beyond the first need entries that embed drafts; they
are appended as speculative slots and cropped at the next step.

Drafts per step. `num_mtp_draft_tokens="adaptive"` picks the count step by step (`AdaptiveDraftCount`): the best
count depends on the batch, the context and the hardware (one draft per step can beat three at batch 4 and lose to
them at batch 1), and any count gives the same tokens. What it measured carries over to the model's next call at the
same batch size and about the same prompt length (`draft_memory`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

# Keyword arguments of `generate` consumed here rather than by the model's forward.
MTP_GENERATE_KWARGS = ("num_mtp_draft_tokens", "mla_decode")
# `num_mtp_draft_tokens="adaptive"` chooses between 1 and max(MTP modules, ADAPTIVE_MAX_DRAFTS) drafts per step,
# ADAPTIVE_MAX_DRAFTS_BATCHED for batches of several rows. Measured on bench_decode.py's model (docs/benchmarks.md):
# at batch 1, 5 drafts beat 3 by 5-8%; at batch 4, 5 lost to 3, since the call lasts until its slowest row is done
# and deep drafts that only some rows accept shorten it less than the rows' mean tokens per step says.
ADAPTIVE = "adaptive"
ADAPTIVE_MAX_DRAFTS = 5
ADAPTIVE_MAX_DRAFTS_BATCHED = 3


@dataclass
class MtpDecodingStats:
    """Acceptance statistics of one `generate(..., use_mtp=True)` call (rows still generating at each step)."""

    steps: int = 0
    """Verification forwards of the main model (the prefill not included)."""
    drafted: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens the main model accepted."""
    drafted_per_position: list[int] = field(default_factory=list)
    """Drafts proposed at position k = 0, 1, ... of a step."""
    accepted_per_position: list[int] = field(default_factory=list)
    """Drafts accepted at position k (a draft counts only if every earlier draft of its step was accepted too)."""
    steps_rows: int = 0
    """Row-steps counted (a step counts once per row still generating)."""
    steps_by_drafts: dict[int, int] = field(default_factory=dict)
    """Steps run with each draft count (one key unless `num_mtp_draft_tokens="adaptive"`)."""

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted, over all positions."""
        return self.accepted / max(self.drafted, 1)

    @property
    def acceptance_per_position(self) -> list[float]:
        """Accepted / drafted at each position; position 0 is DeepSeek-V3's "second token" acceptance."""
        return [a / max(d, 1) for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)]

    @property
    def tokens_per_step(self) -> float:
        """Tokens produced per verification forward (1 + accepted drafts, on average)."""
        return (self.accepted + self.steps_rows) / max(self.steps_rows, 1)


@dataclass
class MtpGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    mtp_stats (`MtpDecodingStats`):
        Drafted and accepted token counts, in total and per draft position.
    """

    mtp_stats: MtpDecodingStats | None = None


def mtp_speculative_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    streamer=None,
    **model_kwargs,
):
    """Runs the decoding loop described in the module docstring; `generate` has prepared every argument."""
    config = model.config
    num_modules = len(model.model.mtp_layers)
    if num_modules == 0:
        raise ValueError(
            "generate(use_mtp=True) drafts with the MTP modules, but this model has num_nextn_predict_layers=0. "
            "Load or build it with num_nextn_predict_layers >= 1, or call generate without use_mtp."
        )
    unsupported = [
        name
        for name in ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
        if getattr(generation_config, name, False)
    ]
    if unsupported:
        raise ValueError(
            f"generate(use_mtp=True) does not return {', '.join(unsupported)}: rows advance by different numbers of "
            "tokens per step. Drop these flags, or generate without use_mtp."
        )
    num_drafts = model_kwargs.pop("num_mtp_draft_tokens", None) or config.num_mtp_draft_tokens or num_modules
    if num_drafts != ADAPTIVE and (not isinstance(num_drafts, int) or num_drafts < 1):
        raise ValueError(f"num_mtp_draft_tokens must be a positive integer or {ADAPTIVE!r}, got {num_drafts!r}")
    if model_kwargs.get("inputs_embeds") is not None or input_ids.shape[1] == 0:
        raise ValueError("generate(use_mtp=True) needs the prompt as `input_ids` (the drafts embed token ids).")
    forward_kwargs = {"mla_decode": model_kwargs.pop("mla_decode", None)}
    cache = model_kwargs.pop("cache", None)
    if cache is None:
        cache = DynamicCache(config=config)
    if cache.get_seq_length() > 0:
        raise ValueError("generate(use_mtp=True) starts from an empty cache; pass the whole prompt without `cache`.")
    attention_mask = model_kwargs.pop("attention_mask", None)
    for handled in ("position_ids", "use_cache", "logits_to_keep", "inputs_tensor"):
        model_kwargs.pop(handled, None)
    forward_kwargs.update({k: v for k, v in model_kwargs.items() if v is not None})

    adaptive = num_drafts == ADAPTIVE
    if adaptive:
        most = ADAPTIVE_MAX_DRAFTS if input_ids.shape[0] == 1 else ADAPTIVE_MAX_DRAFTS_BATCHED
        max_drafts = max(num_modules, most)
    else:
        max_drafts = num_drafts
    decoder = _SpeculativeDecoder(
        model, cache, adaptive, max_drafts, logits_processor, stopping_criteria, generation_config,
        streamer, forward_kwargs,
    )  # fmt: skip
    sequences = decoder.run(input_ids, attention_mask)
    model.last_mtp_stats = decoder.stats
    if generation_config.return_dict_in_generate:
        return MtpGenerateOutput(sequences=sequences, cache=cache, mtp_stats=decoder.stats)
    return sequences


class _SpeculativeDecoder:
    """State of one batched speculative decoding call. Row b's tokens live in `self.ids[b, : self.lengths[b]]`."""

    def __init__(
        self,
        model,
        cache,
        adaptive: bool,
        max_drafts: int,
        logits_processor,
        stopping_criteria,
        generation_config,
        streamer,
        forward_kwargs,
    ):
        self.model, self.cache = model, cache
        # the most drafts any step may take (the fixed count, unless adaptive); `num_drafts` is this step's count
        self.max_drafts = max_drafts
        self.num_drafts = self.max_drafts
        self.logits_processor, self.stopping_criteria = logits_processor, stopping_criteria
        self.do_sample = generation_config.do_sample
        self.max_length = generation_config.max_length
        self.streamer, self.forward_kwargs = streamer, forward_kwargs
        pad = generation_config._pad_token_tensor
        self.pad_token_id = int(pad) if pad is not None else 0
        # As in plain generate: with an eos criterion, finished rows are padded; without, they keep generating.
        self.pad_finished = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        self.num_layers = model.config.num_hidden_layers
        # Drafting uses min(modules, drafts) modules; extra drafts reuse the last one.
        self.num_modules = min(len(model.model.mtp_layers), self.max_drafts)
        self.mtp_cache = DynamicCache()
        self.stats = MtpDecodingStats(
            drafted_per_position=[0] * self.max_drafts, accepted_per_position=[0] * self.max_drafts
        )
        self.adaptive = adaptive
        self.draft_count = None  # the chooser of `adaptive`, made in `run` once the batch and prompt are known
        # Fast paths for what `generate` adds by default. Per step, a plain step calls the processors and criteria
        # once; called position by position here they cost a fifth of a small model's step (measured), so the
        # length-only processors and the max-length / EOS criteria are applied to every position at once. Anything
        # else goes through the general position-by-position path.
        self.eos_ban = self._length_only_processors()
        self.fast_stop = self._simple_criteria()

    def _length_only_processors(self):
        """[(eos ids, minimum prefix length)] when every logits processor only bans EOS below a length, else None."""
        bans = []
        for processor in self.logits_processor:
            if type(processor) is MinLengthLogitsProcessor:
                bans.append((processor.eos_token_id, processor.min_length))
            elif type(processor) is MinNewTokensLengthLogitsProcessor:
                bans.append((processor.eos_token_id, processor.prompt_length_to_skip + processor.min_new_tokens))
            else:
                return None
        return [(torch.as_tensor(ids).flatten(), length) for ids, length in bans] or None

    def _simple_criteria(self):
        """(max_length, the set of eos ids) when the criteria are only max-length and EOS ones, else None."""
        max_length, eos = None, set()
        for criteria in self.stopping_criteria:
            if type(criteria) is MaxLengthCriteria:
                max_length = criteria.max_length if max_length is None else min(max_length, criteria.max_length)
            elif type(criteria) is EosTokenCriteria:
                eos.update(torch.as_tensor(criteria.eos_token_id).flatten().tolist())
            else:
                return None
        return max_length, eos

    # --- model calls -------------------------------------------------------------------------------------------

    def main_forward(self, tokens, positions) -> torch.Tensor:
        mask = None if bool(self.mask.all()) else self.mask
        outputs = self.model.model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
            **self.forward_kwargs,
        )  # fmt: skip
        return outputs.last_hidden_state

    def mtp_forward(self, module: int, hidden, tokens, positions, mask) -> torch.Tensor:
        """Runs MTP module `module` on new slots at the end of its cache; `mask` (batch, all slots) marks real ones."""
        inner = self.model.model
        layer = inner.mtp_layers[module]
        embeds = inner.embed_tokens(tokens)
        q_len, kv_len = tokens.shape[1], mask.shape[1]
        mla_decode = self.forward_kwargs.get("mla_decode")
        if bool(mask.all()) and (q_len == 1 or layer.self_attn._use_absorbed(q_len, kv_len, mla_decode, {})):
            allowed = None  # no holes: causal only, which one query or latent attention needs no mask tensor for
        else:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
            allowed = causal & mask[:, None, None, :].bool()
            # Every query also sees itself, so a query in a masked slot (whose output is never used) stays finite.
            queries = torch.arange(q_len, device=mask.device)
            allowed[:, :, queries, kv_len - q_len + queries] = True
        return layer(
            hidden,
            embeds,
            attention_mask=allowed,
            position_embeddings=inner.rotary_emb(embeds, positions),
            cache=self.mtp_cache,
            mla_decode=mla_decode,
        )

    def mtp_extend(self, module: int, hidden, tokens, positions):
        """Appends the cache entries of new slots of MTP module `module` without running its block."""
        inner = self.model.model
        embeds = inner.embed_tokens(tokens)
        inner.mtp_layers[module].extend_cache(hidden, embeds, inner.rotary_emb(embeds, positions), self.mtp_cache)

    def logits(self, hidden) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def process(self, logits, drafts: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """Applies the logits processors to logits (batch, n, vocab): position i sees each row's tokens plus the
        first offset + i drafts, exactly the prefix plain generate would pass. Rows hold different numbers of
        tokens, so rows of equal length are processed together."""
        if len(self.logits_processor) == 0:
            return logits
        if self.eos_ban is not None:
            # the prefix that position i sees is lengths + offset + i tokens long
            prefix = (
                self.lengths[:, None].to(logits.device) + offset + torch.arange(logits.shape[1], device=logits.device)
            )
            processed = logits
            for eos, min_length in self.eos_ban:
                banned = prefix < min_length
                if bool(banned.any()):
                    processed = processed.clone() if processed is logits else processed
                    eos = eos.to(logits.device)
                    processed[..., eos] = torch.where(banned[..., None], float("-inf"), processed[..., eos])
            return processed
        processed = logits.clone()
        if drafts is not None:
            columns = self.lengths[:, None] + torch.arange(drafts.shape[1])
            self.ids.scatter_(1, columns.to(self.ids.device), drafts.to(self.ids.device))
        for length in self.lengths.unique().tolist():
            rows = (self.lengths == length).nonzero().squeeze(1).to(logits.device)
            for i in range(logits.shape[1]):
                prefix = self.ids[rows.to(self.ids.device), : length + offset + i]
                processed[rows, i] = self.logits_processor(prefix, logits[rows, i])
        if drafts is not None:  # the drafts were only lent to the processors: rows' tails stay padding
            self.ids.scatter_(1, columns.to(self.ids.device), self.pad_token_id)
        return processed

    def choose(self, scores) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next tokens from processed scores (batch, vocab), and their distribution when sampling."""
        if not self.do_sample:
            return scores.argmax(dim=-1), None
        probs = F.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1), probs

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self, input_ids, attention_mask) -> torch.LongTensor:
        batch_size, prompt_len = input_ids.shape
        device = input_ids.device
        self.prompt_len = prompt_len
        capacity = max(self.max_length, prompt_len + 1) + self.max_drafts + 1
        self.ids = torch.full((batch_size, capacity), self.pad_token_id, dtype=torch.long, device=device)
        self.ids[:, :prompt_len] = input_ids
        self.lengths = torch.full((batch_size,), prompt_len, dtype=torch.long)
        self.finished = torch.zeros(batch_size, dtype=torch.bool)
        self.finish_length = torch.zeros(batch_size, dtype=torch.long)
        self.streamed = 0

        # Prefill: the prompt into the main cache, then the MTP caches up to its last token.
        self.mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long().clone()
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.main_forward(input_ids, positions)
        first, _ = self.choose(self.process(self.logits(hidden[:, -1:]))[:, 0])
        self.commit(first[:, None], torch.zeros(batch_size, dtype=torch.long))
        self.pending, self.next_position = first, positions[:, -1] + 1
        self.mtp_masks = [torch.zeros(batch_size, 0, dtype=torch.long, device=device)] * self.num_modules
        self.mtp_last: list[torch.Tensor | None] = [None] * self.num_modules
        last_slot = torch.full((batch_size,), prompt_len - 1, dtype=torch.long, device=device)
        next_tokens = torch.cat((input_ids[:, 1:], first[:, None]), dim=1)
        self.catch_up(hidden, next_tokens, positions, self.mask.bool(), last_slot)
        # The first token streams once the MTP caches hold the prompt too: a streamer timestamping tokens then sees
        # the whole prefill before it, as with plain generate.
        self.stream()

        if self.adaptive:
            memory = draft_memory(self.model, self.max_drafts, batch_size, prompt_len, self.do_sample)
            self.draft_count = AdaptiveDraftCount(self.max_drafts, self.stats, memory)
        while not self.done():
            if self.draft_count is not None:
                self.num_drafts = self.draft_count.choose()
                start = time.perf_counter()
            drafts, draft_probs = self.draft()
            self.verify(drafts, draft_probs)
            if self.draft_count is not None:
                self.draft_count.observe(self.num_drafts, time.perf_counter() - start)
        if self.draft_count is not None:
            self.draft_count.remember()
        self.stream(final=True)
        return self.sequences()

    def done(self) -> bool:
        if self.pad_finished:
            return bool(self.finished.all())
        # Without an eos criterion plain generate stops for everyone at once, when the last row is finished.
        return bool(self.finished.all() and (self.lengths >= self.finish_length.max()).all())

    def catch_up(self, hidden, next_tokens, positions, valid, last_slot):
        """Appends the MTP entries of newly verified slots: slot j at depth d embeds t_(j+1) (`next_tokens`) and
        sees depth d-1's output at the previous real slot; it is real only if its hidden position (j - d + 1) is."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        embed_positions = positions + 1
        carry = self.mtp_last
        for module in range(self.num_modules):
            if module > 0:
                previous = carry[module - 1] if carry[module - 1] is not None else torch.zeros_like(hidden[:, 0])
                hidden = torch.cat((previous[:, None], hidden[:, :-1]), dim=1)
            slot_mask = (valid & (positions >= module)).long()
            self.mtp_masks[module] = torch.cat((self.mtp_masks[module], slot_mask), dim=1)
            slots = hidden.shape[1]
            if module == self.num_modules - 1 and slots > 1 and bool((last_slot == slots - 1).all()):
                # No later module reads this one's outputs and every row drafts from the last slot: the earlier
                # slots need only their cache entries (projections and norms), not the block.
                self.mtp_extend(module, hidden[:, :-1], next_tokens[:, :-1], embed_positions[:, :-1])
                last = self.mtp_forward(
                    module, hidden[:, -1:], next_tokens[:, -1:], embed_positions[:, -1:], self.mtp_masks[module]
                )[:, 0]
            else:
                hidden = self.mtp_forward(module, hidden, next_tokens, embed_positions, self.mtp_masks[module])
                last = hidden[rows, last_slot]
            self.mtp_last = [*self.mtp_last[:module], last, *self.mtp_last[module + 1 :]]

    def draft(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts `num_drafts` tokens per row. Draft 1 comes from depth 1's latest verified slot; draft i > 1 runs
        module i (or the last module, reused) on speculative slots that embed the earlier drafts."""
        batch_size = self.pending.shape[0]
        last_module = self.num_modules - 1
        self.speculative_slots = [0] * self.num_modules
        speculative_out: list[list[torch.Tensor]] = [[] for _ in range(self.num_modules)]
        hidden = self.mtp_last[0]
        drafts, probs = [], []
        for i in range(self.num_drafts):
            if i > 0:
                module = min(i, last_module)
                if i <= last_module:  # module i's own slots for drafts 1..i
                    count = i
                    inputs = torch.stack([self.mtp_last[module - 1], *speculative_out[module - 1][: i - 1]], dim=1)
                    tokens = torch.stack(drafts, dim=1)
                else:  # reuse: one more slot, fed with the module's own last output
                    count = 1
                    own = speculative_out[module][-1] if speculative_out[module] else self.mtp_last[module]
                    inputs, tokens = own[:, None], drafts[-1][:, None]
                first = i - count + 1
                positions = self.next_position[:, None] + torch.arange(first, i + 1, device=tokens.device)
                mask = torch.cat((self.mtp_masks[module], tokens.new_ones(batch_size, count)), dim=1)
                self.mtp_masks[module] = mask
                out = self.mtp_forward(module, inputs, tokens, positions, mask)
                speculative_out[module].extend(out.unbind(1))
                self.speculative_slots[module] += count
                hidden = out[:, -1]
            earlier = torch.stack(drafts, dim=1) if drafts and len(self.logits_processor) else None
            token, prob = self.choose(self.process(self.logits(hidden[:, None]), earlier, offset=i)[:, 0])
            drafts.append(token)
            probs.append(prob)
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if self.do_sample else None)

    def verify(self, drafts, draft_probs):
        batch_size, num_drafts = drafts.shape
        device = drafts.device
        # Roll the MTP caches back to their verified slots.
        for module, count in enumerate(self.speculative_slots):
            if count:
                self.mtp_cache.layers[self.num_layers + module].crop(-count)
                self.mtp_masks[module] = self.mtp_masks[module][:, :-count]

        steps = torch.arange(num_drafts + 1, device=device)
        tokens = torch.cat((self.pending[:, None], drafts), dim=1)
        positions = self.next_position[:, None] + steps
        self.mask = torch.cat((self.mask, self.mask.new_ones(batch_size, num_drafts + 1)), dim=1)
        hidden = self.main_forward(tokens, positions)
        scores = self.process(self.logits(hidden), drafts)

        if not self.do_sample:
            target = scores.argmax(dim=-1)
            accepted = (drafts == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
            new_tokens = target  # equals the drafts up to the first mismatch
        else:
            accepted, new_tokens = speculative_sampling(drafts, draft_probs, F.softmax(scores, dim=-1))

        # Rows still generating (without an eos criterion, finished rows keep generating, as in plain generate).
        finished = self.finished.tolist()
        active = [n for n, done in zip(accepted.tolist(), finished, strict=True) if not (done and self.pad_finished)]
        self.record(active, num_drafts)
        self.commit(new_tokens, accepted.cpu())
        self.stream()

        # Rollback: crop the slots no row accepted; the others' rejected slots become holes.
        keep = max(active) + 1 if active else 1
        accepted = accepted.clamp(max=keep - 1)  # finished rows' slots are all holes from here on
        if keep < num_drafts + 1:
            self.cache.crop(-(num_drafts + 1 - keep))
        valid = steps[:keep] <= accepted[:, None]
        self.mask = self.mask[:, : self.mask.shape[1] - (num_drafts + 1 - keep)]
        self.mask[:, -keep:] = valid.long()
        self.catch_up(hidden[:, :keep], new_tokens[:, :keep], positions[:, :keep], valid, accepted)
        rows = torch.arange(batch_size, device=device)
        self.pending = new_tokens[rows, accepted]
        self.next_position = self.next_position + accepted + 1

    def record(self, accepted: list[int], num_drafts):
        self.stats.steps += 1
        self.stats.steps_by_drafts[num_drafts] = self.stats.steps_by_drafts.get(num_drafts, 0) + 1
        self.stats.steps_rows += len(accepted)
        self.stats.drafted += len(accepted) * num_drafts
        self.stats.accepted += sum(accepted)
        for i in range(num_drafts):
            self.stats.drafted_per_position[i] += len(accepted)
            self.stats.accepted_per_position[i] += sum(count > i for count in accepted)

    def commit(self, new_tokens, accepted):
        """Appends row b's first accepted[b] + 1 new tokens (the caller streams them), one position at a time through
        the stopping criteria, as plain generate would; a finished row takes no more tokens (its tail stays padding).
        Rows of equal length go through the criteria together."""
        new_tokens = new_tokens.to(self.ids.device)
        if self.fast_stop is not None:
            self.commit_simple(new_tokens, accepted)
            return
        taking = ~self.finished if self.pad_finished else torch.ones_like(self.finished)
        for i in range(int(accepted.max()) + 1):
            taking &= (accepted >= i) & (self.lengths < self.ids.shape[1])
            if not taking.any():
                break
            rows = taking.nonzero().squeeze(1)
            self.ids[rows.to(self.ids.device), self.lengths[rows].to(self.ids.device)] = new_tokens[rows, i]
            self.lengths[rows] += 1
            for length in self.lengths[rows].unique().tolist():
                group = rows[self.lengths[rows] == length]
                group = group[~self.finished[group]]
                if len(group) == 0:
                    continue
                stop = self.stopping_criteria(self.ids[group.to(self.ids.device), :length], None).cpu()
                self.finished[group[stop]] = True
                self.finish_length[group[stop]] = length
            halted = self.finished & (self.lengths >= self.finish_length.max())
            taking &= ~(self.finished if self.pad_finished else halted)

    def commit_simple(self, new_tokens, accepted):
        """`commit` when the criteria are only max-length and EOS: each row takes its tokens up to and including
        the first that stops it (the same result as appending them one by one). The few tokens of a step are
        walked on the host, where each check costs nanoseconds rather than a tensor op's microseconds."""
        max_length, eos_ids = self.fast_stop
        capacity = self.ids.shape[1]
        lengths, finished = self.lengths.tolist(), self.finished.tolist()
        rows, columns, values = [], [], []
        for row, (tokens, count) in enumerate(zip(new_tokens.tolist(), accepted.tolist(), strict=True)):
            if finished[row]:  # a finished row takes nothing (see `commit`)
                continue
            for token in tokens[: count + 1]:
                if lengths[row] >= capacity:
                    break
                rows.append(row)
                columns.append(lengths[row])
                values.append(token)
                lengths[row] += 1
                if token in eos_ids or (max_length is not None and lengths[row] >= max_length):
                    finished[row] = True
                    self.finish_length[row] = lengths[row]
                    break
        if rows:
            self.ids[torch.tensor(rows), torch.tensor(columns)] = torch.tensor(values, device=self.ids.device)
            self.lengths = torch.tensor(lengths)
            self.finished = torch.tensor(finished)

    def stream(self, final: bool = False):
        """Streams generated columns once every row has them, one `put` per column, as plain generate does."""
        if self.streamer is None:
            return
        final_length = int(self.sequences_length()) if final else None
        available = self.lengths.clone()
        available[self.finished & torch.tensor(self.pad_finished)] = self.ids.shape[1]
        ready = final_length if final else min(int(available.min()), int(self.lengths.max()))
        while self.prompt_len + self.streamed < ready:
            self.streamer.put(self.ids[:, self.prompt_len + self.streamed].cpu())
            self.streamed += 1
        if final:
            self.streamer.end()

    def sequences_length(self) -> int:
        if self.pad_finished:
            return int(self.lengths.max())
        return int(self.finish_length.max())

    def sequences(self) -> torch.LongTensor:
        return self.ids[:, : self.sequences_length()]


def draft_memory(model, max_drafts: int, batch_size: int, prompt_len: int, do_sample: bool) -> dict:
    """What `adaptive` drafting learned in this model's earlier generate calls in the same setting (batch size,
    prompt length within the same power of two, greedy or sampling, device and dtype): the time ratios of
    back-to-back steps and the acceptance.
    A later call starts from them instead of exploring every count again, which takes about half the steps of a
    64-token call."""
    memory = model.__dict__.setdefault("_mtp_draft_memory", {})
    setting = (max_drafts, batch_size, prompt_len.bit_length(), do_sample, str(model.device), str(model.dtype))
    return memory.setdefault(setting, {})


class AdaptiveDraftCount:
    """Chooses each step's draft count (1 to `max_drafts`) for the most tokens per second: the expected tokens per
    row and step come from the acceptance seen so far, the relative cost of the counts from steps that ran back to
    back. A machine whose speed drifts (this VM's, by 10-25% over seconds) slows steps timed far apart by different
    amounts, so comparing their times compares the machine, not the counts; two neighbouring steps see the same
    machine. Each switch between neighbouring counts d and d + 1 gives one sample of t(d + 1) / t(d); a count's cost
    is the product of the median samples of the pairs below it.

    The exploration runs the counts from `max_drafts` down to 1 and back up (5, 4, 3, 2, 1, 2, 3, 4, 5): two samples of
    each pair. After that the best count runs, and every `probe_every` steps a neighbour of it runs once, which takes
    two more samples (into the probe and back out) and keeps the deeper positions' acceptance current, so a neighbour
    that got cheaper wins back. Pairs further from the best count keep their last samples until the best count moves
    nearer.

    `memory` (`draft_memory`) carries the samples and the acceptance over to the model's next call in the same
    setting, which then skips the exploration; its acceptance weighs at most `remembered_drafts` drafts per position
    against the new call's, so a change of text shows within a call."""

    def __init__(
        self,
        max_drafts: int,
        stats: MtpDecodingStats,
        memory: dict | None = None,
        probe_every: int = 6,
        window: int = 24,
        remembered_drafts: int = 256,
        trend_drafts: int = 32,
    ):
        self.max_drafts, self.stats, self.probe_every, self.window = max_drafts, stats, probe_every, window
        memory = {} if memory is None else memory
        # log(t(d + 1) / t(d)) of back-to-back steps, keyed by d
        self.log_ratios: dict[int, list[float]] = memory.setdefault("log_ratios", {})
        self.prior = memory.setdefault("acceptance", {"accepted": [0.0] * max_drafts, "drafted": [0.0] * max_drafts})
        self.remembered_drafts, self.trend_drafts = remembered_drafts, trend_drafts
        sampled = all(len(self.log_ratios.get(drafts, ())) >= 2 for drafts in range(1, max_drafts))
        down_and_up = list(range(max_drafts, 0, -1)) + list(range(2, max_drafts + 1))
        self.schedule = [] if sampled else down_and_up  # the exploration steps still to run
        self.last: tuple[int, float] | None = None  # the previous step's count and seconds
        self.since_probe = 0
        self.probe_up = True

    def expected_tokens_per_step(self, drafts: int) -> float:
        """1 plus, for each position, the share of drafts there accepted with every earlier one (this call's counts
        added to the remembered ones). Deep positions are drafted in few steps, the ones that ran the most drafts, so
        from position 2 on the share starts from the earlier positions' trend (the previous position's acceptance,
        given the one before it, kept), worth `trend_drafts` drafts, and moves to what is seen."""
        accepted, drafted = self.counts()
        total, previous, before = 1.0, 1.0, 1.0  # the shares at positions i - 1 and i - 2
        for i in range(drafts):
            weight = self.trend_drafts if i > 0 else 0
            trend = previous * previous / before if before > 0 else 0.0
            share = (accepted[i] + weight * trend) / max(drafted[i] + weight, 1)
            total += share
            before, previous = previous, share
        return total

    def relative_cost(self, drafts: int) -> float:
        """A step's cost with `drafts` drafts, relative to one with 1 draft."""
        log_cost = sum(statistics.median(self.log_ratios[d]) for d in range(1, drafts))
        return math.exp(log_cost)

    def rate(self, drafts: int) -> float:
        return self.expected_tokens_per_step(drafts) / self.relative_cost(drafts)

    def best(self) -> int:
        return max(range(1, self.max_drafts + 1), key=self.rate)

    def choose(self) -> int:
        if self.schedule:
            return self.schedule.pop(0)
        best = self.best()
        self.since_probe += 1
        if self.since_probe < self.probe_every:
            return best
        self.since_probe = 0
        self.probe_up = not self.probe_up
        neighbours = [d for d in (best + 1, best - 1) if 1 <= d <= self.max_drafts]
        if len(neighbours) < 2:
            return neighbours[0] if neighbours else best
        return neighbours[0] if self.probe_up else neighbours[1]

    def observe(self, drafts: int, seconds: float):
        seconds = max(seconds, 1e-9)
        if self.last is not None and abs(self.last[0] - drafts) == 1:
            (low, low_seconds), (_, high_seconds) = sorted([self.last, (drafts, seconds)])
            ratios = self.log_ratios.setdefault(low, [])
            ratios.append(math.log(high_seconds / low_seconds))
            del ratios[: -self.window]
        self.last = (drafts, seconds)

    def counts(self) -> tuple[list[float], list[float]]:
        """Accepted and drafted per position: the remembered counts plus this call's."""
        stats = self.stats
        accepted = [a + b for a, b in zip(self.prior["accepted"], stats.accepted_per_position, strict=True)]
        drafted = [a + b for a, b in zip(self.prior["drafted"], stats.drafted_per_position, strict=True)]
        return accepted, drafted

    def remember(self):
        """Adds this call's acceptance to the memory, scaled down to `remembered_drafts` drafts at position 0."""
        accepted, drafted = self.counts()
        scale = min(1.0, self.remembered_drafts / max(drafted[0], 1))
        self.prior["accepted"] = [a * scale for a in accepted]
        self.prior["drafted"] = [d * scale for d in drafted]


def speculative_sampling(drafts, draft_probs, target_probs) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative rejection rule. Draft i is accepted with probability min(1, p_i(d) / q_i(d)); at the first
    rejection the token is resampled from normalize(max(p_i - q_i, 0)), and when every draft is accepted one more
    token comes from p. Returns the accepted counts (batch,) and the new tokens (batch, drafts + 1), of which the
    first accepted + 1 are valid."""
    num_drafts = drafts.shape[1]
    p = target_probs[:, :num_drafts].gather(-1, drafts[..., None]).squeeze(-1)
    q = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    accept = torch.rand_like(p) * q < p  # u < p / q without dividing by a zero q
    accepted = accept.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    # Distribution of the token after the accepted drafts: the residual at a rejection, p itself after all drafts.
    padded_q = F.pad(draft_probs, (0, 0, 0, 1))  # q = 0 at the extra position makes the residual p itself
    residual = (target_probs[rows, accepted] - padded_q[rows, accepted]).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), target_probs[rows, accepted])
    final = torch.multinomial(residual, num_samples=1).squeeze(1)
    new_tokens = torch.cat((drafts, drafts[:, :1]), dim=1)
    new_tokens[rows, accepted] = final
    return accepted, new_tokens
