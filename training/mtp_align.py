"""`python -m moe_mtp.train --mtp-only` / `--add-mtp N`: re-align (or add) the MTP modules of a finished model.

    python -m moe_mtp.train --mtp-only --model DIR --data PATH --output-dir OUT
    python -m moe_mtp.train --add-mtp 1 --model DIR_WITHOUT_MTP --data PATH --output-dir OUT --max-steps 300

Every main-model weight is frozen. Only the MTP modules train, by self-distillation: at slot i, depth k sees the main
model's hidden state at i and the embedding of token i + k, and learns the main model's own prediction at position
i + k (its distribution, `--mtp-targets self_kl`, or its argmax, `self_greedy`), which is exactly what
`generate(use_mtp=True)` accepts.

The contexts are, by default, the main model's own greedy continuations (`--mtp-data generated`, as Medusa-2, EAGLE
and FastMTP train their draft heads): prompts cut from PATH's training text, `--generate-tokens` generated after
each, and every slot of prompt and continuation distilled. Speculation drafts along the model's own output, which
drifts from human text (a small model repeats itself); a head aligned along that output is accepted more often
(docs/training.md has the numbers). Give `--generate-prompt-lengths` the context lengths you decode at: a head that
never saw position 2048 drafts worse there. `--mtp-data text` aligns along PATH's text instead.

`OUT/model` is a from_pretrained folder: the input folder's main-model tensors unchanged (it is written from a fresh,
unquantized load of the input, and every main tensor is compared with the input's before the folder is renamed into
place) plus the trained MTP modules. Greedy draft acceptance on held-out text is printed before and after: the
blocks of PATH after the first 1 - `--eval-fraction`, never used for alignment.

How many tokens to draft per step is saved too (`num_mtp_draft_tokens`, which `generate(use_mtp=True)` reads): by
default `adaptive`, which lets `generate` choose the count step by step from the speed it measures (the best count
changes with the batch and the context); `--mtp-drafts auto` saves the fastest fixed count of 1 to `--max-mtp-drafts`,
timed on up to 4 held-out prompts against plain decoding (batch 1); `--mtp-drafts N` saves N.
Drafts beyond the number of modules reuse the last module on its own output; when the model is small, a step is
mostly fixed per-operation cost, so drafting several tokens per verification forward can pay even at lower
acceptance per extra draft. `--mtp-train-depth K` distills depths 1..K, the last module rerun on its own output past
the modules, as those drafts use it.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_text
from ..modeling.speculative import ADAPTIVE

MTP_PREFIX = "model.mtp_layers."
ALIGN_SUMMARY = "mtp_align.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MTP alignment (--mtp-only / --add-mtp; see moe_mtp/training/mtp_align.py)")
    group.add_argument(
        "--mtp-only",
        action="store_true",
        help="Freeze the main model of --model and train only its MTP modules on its own predictions.",
    )
    group.add_argument(
        "--add-mtp",
        type=int,
        default=None,
        metavar="N",
        help="Give --model N MTP modules (new ones initialized from its last layer), then train them as --mtp-only.",
    )
    group.add_argument(
        "--mtp-targets",
        choices=["self_kl", "self_greedy"],
        default="self_kl",
        help="Distill the main model's distribution (KL) or its greedy tokens (cross-entropy).",
    )
    group.add_argument(
        "--mtp-init",
        choices=["random", "copy-last"],
        default="random",
        help="--add-mtp: new modules start from the model's initializer, or copy the last decoder layer's attention "
        "and MLP (measured slower to align; docs/training.md).",
    )
    group.add_argument(
        "--mtp-data",
        choices=["generated", "text"],
        default="generated",
        help="Align along the main model's greedy continuations of prompts from --data's text (generated) or along "
        "the text alone.",
    )
    group.add_argument(
        "--generate-tokens",
        type=int,
        default=None,
        metavar="G",
        help="--mtp-data generated: tokens generated after each prompt (default: half of --seq-len).",
    )
    group.add_argument(
        "--generate-prompt-lengths",
        type=int,
        nargs="+",
        default=None,
        metavar="P",
        help="--mtp-data generated: prompt lengths, the context lengths you will decode at; the sequences are spread "
        "evenly over them (default: --seq-len minus G).",
    )
    group.add_argument(
        "--generated-sequences",
        type=int,
        default=None,
        help="--mtp-data generated: how many continuations to generate, once, before training (default 256).",
    )
    group.add_argument("--load-in-8bit", action="store_true", help="Load the frozen main model in bitsandbytes int8.")
    group.add_argument("--load-in-4bit", action="store_true", help="Load the frozen main model in bitsandbytes nf4.")
    group.add_argument(
        "--acceptance-prompts", type=int, default=8, help="Held-out prompts for the decoding acceptance."
    )
    group.add_argument("--acceptance-tokens", type=int, default=64, help="Tokens generated per acceptance prompt.")
    group.add_argument(
        "--mtp-drafts",
        default="adaptive",
        metavar="N|auto|adaptive",
        help="Drafts per speculative step saved as the output's num_mtp_draft_tokens. adaptive (default): generate "
        "chooses 1 to max(modules, 5) (3 at batch > 1) step by step, from the tokens per second it measures. auto: "
        "after training, time greedy decoding of up to 4 acceptance prompts (batch 1) with 1 to --max-mtp-drafts "
        "drafts against plain decoding, and keep the fastest.",
    )
    group.add_argument("--max-mtp-drafts", type=int, default=3, help="Largest draft count --mtp-drafts auto tries.")
    group.add_argument(
        "--mtp-train-depth",
        type=int,
        default=None,
        metavar="K",
        help="Distill depths 1..K (default: one per module). Past the modules the last module runs again on its own "
        "output, as generate(use_mtp=True) drafts beyond the modules: K = the drafts per step trains every draft.",
    )


# ------------------------------------------------------------------------------------------------------------ data


def token_blocks(args, tokenizer) -> tuple:
    """(token store, training blocks, held-out blocks as a tensor) from the corpus's token store, the one `python -m
    moe_mtp.train` builds and caches: the same documents are held out, by a hash of their text, so a model trained
    on this corpus never saw the held-out blocks."""
    from .. import data as token_data
    from .dataloader import cache_dir

    corpus = token_data.Corpus.from_args(args)
    store, _ = token_data.prepare_store(
        corpus, tokenizer, args.eval_fraction, cache_dir(args), builder=True, progress=not args.no_progress
    )
    train, held_out = store.blocks("train", args.seq_len), store.blocks("eval", args.seq_len)
    if len(train) < 1 or len(held_out) < 1:
        raise SystemExit(
            f"--data makes {len(train)} training and {len(held_out)} held-out block(s) of --seq-len {args.seq_len}: "
            "give more text, a shorter --seq-len or a larger --eval-fraction"
        )
    count = len(held_out) if not args.eval_batches else min(len(held_out), args.eval_batches * args.batch_size)
    return store, train, held_out[range(count)]


class Bucket:
    """Training sequences of one length (`sequences[i]` is a (length,) tensor) and how many go in a micro-batch.
    `prompt_len` tokens of each are text, the rest the main model's continuation (0: all text)."""

    def __init__(self, sequences, prompt_len: int, batch_size: int):
        self.sequences, self.prompt_len, self.batch_size = sequences, prompt_len, batch_size

    def __len__(self) -> int:
        return len(self.sequences)


class Batches:
    """Endless batches of input ids: a bucket chosen in proportion to its size, then its next `batch_size`
    sequences of a shuffled order (reshuffled after each pass)."""

    def __init__(self, buckets: list[Bucket], seed: int):
        self.buckets = buckets
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = torch.tensor([float(len(bucket)) for bucket in buckets])
        self.orders = [torch.randperm(len(bucket), generator=self.generator) for bucket in buckets]
        self.cursors = [0] * len(buckets)

    def next(self) -> torch.Tensor:
        i = int(torch.multinomial(self.weights, 1, generator=self.generator)) if len(self.buckets) > 1 else 0
        bucket, size = self.buckets[i], min(self.buckets[i].batch_size, len(self.buckets[i]))
        if self.cursors[i] + size > len(bucket):
            self.orders[i], self.cursors[i] = torch.randperm(len(bucket), generator=self.generator), 0
        indices = self.orders[i][self.cursors[i] : self.cursors[i] + size]
        self.cursors[i] += size
        return bucket.sequences[indices]


# Tokens per generation batch: prompts of 64 + 64 go 32 at a time, of 2048 + 64 three at a time.
GENERATION_BATCH_TOKENS = 8192
DEFAULT_GENERATED_SEQUENCES = 256


def generation_plan(args, depth: int = 1) -> tuple[int, list[int]]:
    """(tokens generated per prompt, prompt lengths) of --mtp-data generated, refused if a sequence is too short for
    `depth` MTP modules (depth k needs k + 2 tokens: a hidden state, the embedded token k later, its target)."""
    new_tokens = args.generate_tokens if args.generate_tokens is not None else max(args.seq_len // 2, 1)
    if new_tokens < 1:
        raise SystemExit(f"--generate-tokens must be at least 1, got {new_tokens}")
    if args.generate_prompt_lengths is None and new_tokens >= args.seq_len:
        raise SystemExit(
            f"--generate-tokens {new_tokens} leaves no prompt in --seq-len {args.seq_len}: generate fewer tokens or "
            "give --generate-prompt-lengths"
        )
    lengths = args.generate_prompt_lengths or [args.seq_len - new_tokens]
    if min(lengths) < 1:
        raise SystemExit(f"--generate-prompt-lengths must be at least 1, got {lengths}")
    if min(lengths) + new_tokens < depth + 2:
        raise SystemExit(
            f"--generate-prompt-lengths {min(lengths)} + --generate-tokens {new_tokens} is too short a sequence for "
            f"{depth} MTP module(s): it needs at least {depth + 2} tokens"
        )
    if generated_sequences(args) < len(lengths):
        raise SystemExit(
            f"--generated-sequences {generated_sequences(args)} is fewer than the {len(lengths)} prompt lengths"
        )
    return new_tokens, lengths


def warn_past_positions(config, new_tokens: int, lengths: list[int]) -> None:
    longest, limit = max(lengths) + new_tokens, config.max_position_embeddings
    if limit and longest > limit:
        warnings.warn(
            f"--generate-prompt-lengths {max(lengths)} + --generate-tokens {new_tokens} make {longest}-token sequences, "
            f"past the model's max_position_embeddings ({limit}): the alignment sees positions the main model was "
            "not trained for",
            stacklevel=2,
        )


def generated_sequences(args) -> int:
    return DEFAULT_GENERATED_SEQUENCES if args.generated_sequences is None else args.generated_sequences


@torch.no_grad()
def generated_buckets(model, store, args, device, new_tokens: int, lengths: list[int]) -> tuple[list[Bucket], float]:
    """The main model's greedy continuations (`new_tokens` each) of prompts cut from the training text, one bucket
    per prompt length of `lengths` (its micro-batch holds about as many tokens as --batch-size blocks of --seq-len);
    returns them and the seconds the generation took. EOS does not stop a continuation: every sequence is prompt +
    `new_tokens` tokens."""
    total = generated_sequences(args)
    stream = store.tokens["train"]
    generator = torch.Generator().manual_seed(args.seed + 1)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    model.eval()
    start, buckets = time.perf_counter(), []
    progress = tqdm(total=total, desc="generating", unit="seq", disable=args.no_progress, dynamic_ncols=True)
    for index, prompt_len in enumerate(lengths):
        count = total // len(lengths) + (index < total % len(lengths))
        if len(stream) < prompt_len:
            raise SystemExit(f"--generate-prompt-lengths {prompt_len}: the training text has only {len(stream)} tokens")
        # windows at random offsets: distinct prompts even where the text holds few blocks of this length
        starts = torch.randint(0, len(stream) - prompt_len + 1, (count,), generator=generator).tolist()
        per_batch = max(1, min(32, GENERATION_BATCH_TOKENS // (prompt_len + new_tokens)))
        sequences = []
        for first in range(0, count, per_batch):
            windows = [stream[start : start + prompt_len] for start in starts[first : first + per_batch]]
            prompts = torch.from_numpy(np.stack(windows).astype(np.int64)).to(device)
            sequences.append(
                model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=pad,
                    use_mtp=False,
                ).cpu()  # fmt: skip
            )
            if sequences[-1].shape[1] != prompt_len + new_tokens:  # generate stopped early: a criterion we missed
                raise RuntimeError(f"generated {sequences[-1].shape[1] - prompt_len} tokens, not {new_tokens}")
            progress.update(len(prompts))
        batch_size = max(1, args.batch_size * args.seq_len // (prompt_len + new_tokens))
        buckets.append(Bucket(torch.cat(sequences), prompt_len, batch_size))
    progress.close()
    return buckets, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------- model


def quantization_config(args):
    if not (args.load_in_8bit or args.load_in_4bit):
        return None
    if args.load_in_8bit and args.load_in_4bit:
        raise SystemExit("--load-in-8bit and --load-in-4bit: pick one")
    from transformers import BitsAndBytesConfig

    # The MTP modules train, so they stay in full precision; the head is shared with them.
    skip = ["lm_head", "model.mtp_layers"]
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )


def saved_mtp_depth(folder) -> int:
    from ..conversion import read_config_dict

    return int(read_config_dict(folder, mtp_from_weights=True).get("num_nextn_predict_layers") or 0)


def load_model(args, depth: int, dtype=torch.float32, quantized: bool = True):
    """The --model folder with `depth` MTP modules (missing ones initialized), quantized as asked."""
    from ..modeling import MoeMtpForCausalLM

    kwargs = {"num_nextn_predict_layers": depth}
    bnb = quantization_config(args) if quantized else None
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    else:
        kwargs["dtype"] = dtype
    return MoeMtpForCausalLM.from_pretrained(args.model, **kwargs)


def init_new_modules(model, folder, first_new: int, how: str) -> None:
    """New MTP modules share the embedding and the head with the main model (as DeepSeek-V3's do: neither is a
    weight of the module). With `copy-last` their attention, MLP and norms start as a copy of the last decoder layer
    (read from the folder, so a quantized load copies full-precision weights), and `eh_proj` passes the main
    model's hidden state through unchanged, so a new module starts by running that layer once more on top of the
    model; `random` keeps the model's initializer."""
    if how == "random" or first_new >= len(model.model.mtp_layers):
        return
    from ..conversion.lazy import lazy_state_dict
    from ..modeling.loading import fuse_expert_keys
    from ..modeling.modeling_moe_mtp import MoeMtpExperts

    last = model.config.num_hidden_layers - 1
    prefix = f"model.layers.{last}."
    state = lazy_state_dict(folder)
    try:
        block = {key[len(prefix) :]: state[key][...] for key in state.keys() if key.startswith(prefix)}
    finally:
        state.close()
    hidden = model.config.hidden_size
    for module in model.model.mtp_layers[first_new:]:
        reference = next(module.parameters())
        if isinstance(getattr(module.mlp, "experts", None), MoeMtpExperts):
            block = fuse_expert_keys(block)  # the folder's per-expert keys, stacked as this module holds them
        own = {k: v for k, v in block.items() if k in module.state_dict()}
        module.load_state_dict(own, strict=False)
        with torch.no_grad():
            eh = torch.zeros(hidden, 2 * hidden, dtype=reference.dtype, device=reference.device)
            eh[:, hidden:] = torch.eye(hidden)  # [embedding; hidden] -> hidden
            module.eh_proj.weight.copy_(eh)


def freeze_main_model(model) -> list[torch.nn.Parameter]:
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(MTP_PREFIX))
        if parameter.requires_grad:
            trainable.append(parameter)
    if not trainable:
        raise SystemExit("--mtp-only: the model has no MTP modules to train; pass --add-mtp N to create them")
    return trainable


# ------------------------------------------------------------------------------------------------------ acceptance


@torch.no_grad()
def teacher_forced_acceptance(model, blocks: torch.Tensor, batch_size: int, device) -> float:
    """Share of held-out positions where depth 1's argmax equals the main model's argmax at the next position: the
    draft acceptance of greedy decoding along the text instead of along the model's own output."""
    hits = total = 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        out = model(input_ids=batch, output_mtp_logits=True)
        main = out.logits.argmax(-1)[:, 1:]
        draft = out.mtp_logits[0].argmax(-1)
        hits += int((main == draft).sum())
        total += main.numel()
    return hits / max(total, 1)


@torch.no_grad()
def decoding_acceptance(model, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Greedy `generate(use_mtp=True)` on held-out prompts, one draft per module: the acceptance speculation
    actually gets."""
    model.generate(
        prompts,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_mtp=True,
        num_mtp_draft_tokens=len(model.model.mtp_layers),
        pad_token_id=model.config.pad_token_id or 0,
    )
    stats = model.last_mtp_stats
    return {"acceptance": stats.acceptance_rate, "drafted": stats.drafted, "tokens_per_step": stats.tokens_per_step}


@torch.no_grad()
def draft_speeds(model, prompts: torch.Tensor, new_tokens: int, max_drafts: int, repeats: int = 2) -> dict:
    """Plain time / speculative time of greedy decoding with 1..max_drafts drafts per step, prompt by prompt at batch
    1, each draft count run right after plain decoding so that a busy machine slows both alike (medians over
    `repeats`). Raises if any speculative output differs from plain greedy decoding."""
    pad = model.config.pad_token_id or 0
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    def timed(prompt, **kwargs):
        start = time.perf_counter()
        out = model.generate(prompt, **common, **kwargs)
        return out, time.perf_counter() - start

    rows = list(prompts.split(1))
    timed(rows[0][:, :8], use_mtp=True), timed(rows[0][:, :8])  # warm-up
    ratios = {drafts: [] for drafts in range(1, max_drafts + 1)}
    for _ in range(repeats):
        totals = dict.fromkeys([0, *ratios], 0.0)
        for prompt in rows:
            plain, seconds = timed(prompt)
            totals[0] += seconds
            for drafts in ratios:
                out, seconds = timed(prompt, use_mtp=True, num_mtp_draft_tokens=drafts)
                if not torch.equal(out, plain):
                    raise RuntimeError(
                        f"speculative greedy decoding with {drafts} drafts differs from plain decoding; this is a bug "
                        "in moe_mtp: please report it"
                    )
                totals[drafts] += seconds
        for drafts in ratios:
            ratios[drafts].append(totals[0] / totals[drafts])
    return {drafts: sorted(values)[len(values) // 2] for drafts, values in ratios.items()}


def fixed_drafts(args) -> int | str | None:
    """`--mtp-drafts` as a count or "adaptive", or None for auto; checked before any training."""
    if args.max_mtp_drafts < 1:
        raise SystemExit(f"--max-mtp-drafts must be at least 1, got {args.max_mtp_drafts}")
    if args.mtp_drafts == "auto":
        return None
    if args.mtp_drafts == ADAPTIVE:
        return ADAPTIVE
    try:
        drafts = int(args.mtp_drafts)
    except ValueError:
        drafts = 0
    if drafts < 1:
        raise SystemExit(f"--mtp-drafts must be a positive integer, 'auto' or 'adaptive', got {args.mtp_drafts!r}")
    return drafts


def choose_drafts(model, prompts, args) -> tuple[int | str, dict]:
    """`--mtp-drafts`: a fixed count or "adaptive", or (auto) the fastest count measured by `draft_speeds`."""
    drafts = fixed_drafts(args)
    if drafts is not None:
        return drafts, {}
    speeds = draft_speeds(model.eval(), prompts[:4], args.acceptance_tokens, args.max_mtp_drafts)
    return max(speeds, key=speeds.get), speeds


def measure(model, eval_blocks, prompts, args, device) -> dict:
    model.eval()
    result = decoding_acceptance(model, prompts, args.acceptance_tokens)
    result["teacher_forced"] = teacher_forced_acceptance(model, eval_blocks, args.batch_size, device)
    return result


# ---------------------------------------------------------------------------------------------------------- output


def compare_main_tensors(source, written) -> int:
    """Checks that every tensor of `source` outside the MTP modules is in `written`, bit for bit. Returns how many."""
    from ..conversion.lazy import lazy_state_dict

    ours, theirs = lazy_state_dict(source), lazy_state_dict(written)
    try:
        names = [name for name in ours.keys() if not name.startswith(MTP_PREFIX)]
        for name in names:
            a = ours[name][...]
            b = theirs[name][...] if name in theirs else None
            if b is None or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                raise RuntimeError(
                    f"{written}: main-model tensor {name} differs from {source}'s; the output is not kept. "
                    "This is a bug in moe_mtp.training.mtp_align: please report it."
                )
        return len(names)
    finally:
        ours.close()
        theirs.close()


def write_model(args, mtp_state: dict, depth: int, tokenizer, output_dir: Path, drafts: int | str) -> int:
    """OUT/model: the input folder reloaded unquantized in its own dtype, with the trained MTP modules and `drafts`
    as its `num_mtp_draft_tokens`, written to `model.partial`, compared with the input, then renamed into place."""
    model = load_model(args, depth, dtype="auto", quantized=False)
    from ..modeling.loading import fuse_expert_keys

    own = model.state_dict()
    mtp_state = fuse_expert_keys(mtp_state)  # a quantized training model holds per-expert modules
    missing = [k for k in own if k.startswith(MTP_PREFIX) and k not in mtp_state]
    if missing:
        raise RuntimeError(f"trained MTP state lacks {missing[:3]}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in mtp_state.items()}, strict=False)
    model.config.use_cache = model.generation_config.use_cache = True
    model.config.num_mtp_draft_tokens = drafts
    with atomic_path(output_dir / "model", folder=True) as partial:  # not renamed into place if the check fails
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        return compare_main_tensors(args.model, partial)


def prepare_output(args) -> Path:
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise SystemExit(
            f"{output_dir} already holds files; pass --overwrite to replace its model, or choose another --output-dir"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


# ------------------------------------------------------------------------------------------------------------ run


def run(args) -> dict:
    """`--mtp-only`/`--add-mtp`: trains the MTP modules of --model on its own predictions, writes OUT/model and
    OUT/mtp_align.json, and returns the summary."""
    from transformers import AutoTokenizer

    saved, depth, plan = check_args(args)
    output_dir = prepare_output(args)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = load_model(args, depth)
    if depth > saved:
        init_new_modules(model, args.model, saved, args.mtp_init)
    if not (args.load_in_8bit or args.load_in_4bit):
        model.to(device)
    trainable = freeze_main_model(model)
    if plan is not None:
        warn_past_positions(model.config, *plan)

    store, train_blocks, eval_blocks = token_blocks(args, tokenizer)
    prompt_len = min(64, args.seq_len // 2)
    prompts = eval_blocks[: args.acceptance_prompts, :prompt_len].to(device)

    before = measure(model, eval_blocks, prompts, args, device)
    print(
        f"MTP greedy acceptance on held-out text before: {before['acceptance']:.3f} decoding "
        f"({len(prompts)} prompts x {args.acceptance_tokens} tokens), {before['teacher_forced']:.3f} teacher-forced",
        flush=True,
    )
    generation_seconds = None
    if plan is not None:
        buckets, generation_seconds = generated_buckets(model, store, args, device, *plan)
        print(
            f"generated {sum(len(b) for b in buckets)} greedy continuations of {plan[0]} tokens "
            f"(prompt lengths {', '.join(str(b.prompt_len) for b in buckets)}) in {generation_seconds:.0f} s",
            flush=True,
        )
    else:
        buckets = [Bucket(train_blocks, 0, args.batch_size)]
    history, seconds = align(model, trainable, Batches(buckets, args.seed), args, device)
    after = measure(model, eval_blocks, prompts, args, device)
    print(
        f"MTP greedy acceptance on held-out text after:  {after['acceptance']:.3f} decoding, "
        f"{after['teacher_forced']:.3f} teacher-forced ({args.max_steps} steps, {seconds:.0f} s)",
        flush=True,
    )
    drafts, speeds = choose_drafts(model, prompts, args)
    if speeds:
        table = ", ".join(f"{count} draft{'s' * (count > 1)} {ratio:.2f}x" for count, ratio in speeds.items())
        print(
            f"MTP decoding speed vs plain on the held-out prompts (batch 1): {table}; saving "
            f"num_mtp_draft_tokens={drafts}",
            flush=True,
        )
    mtp_state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(MTP_PREFIX)}
    del model
    checked = write_model(args, mtp_state, depth, tokenizer, output_dir, drafts)
    print(f"{output_dir / 'model'}: {checked} main-model tensors bit-identical to {args.model}'s", flush=True)

    summary = {
        "model": args.model,
        "data": list(args.data) or ["pydoc_data/topics.py"],
        "mtp_modules": depth,
        "added": depth - saved,
        "init": args.mtp_init if depth > saved else None,
        "targets": args.mtp_targets,
        "quantized": "int8" if args.load_in_8bit else "nf4" if args.load_in_4bit else None,
        "steps": args.max_steps,
        "train_depth": args.mtp_train_depth or depth,
        "seconds": seconds,
        "mtp_data": args.mtp_data,
        "generated": None
        if plan is None
        else {
            "sequences": sum(len(b) for b in buckets),
            "new_tokens": plan[0],
            "prompt_lengths": [b.prompt_len for b in buckets],
            "seconds": generation_seconds,
        },
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "before": before,
        "after": after,
        "num_mtp_draft_tokens": drafts,
        "speed_by_drafts": speeds,
        "main_tensors_identical": checked,
        "history": history,
    }
    write_text(output_dir / ALIGN_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def check_args(args) -> tuple[int, int, tuple[int, list[int]] | None]:
    """Refuses what a re-alignment cannot do, before any loading. Returns (MTP modules --model has, MTP modules the
    output gets, the generation plan of --mtp-data generated: tokens per prompt and prompt lengths, or None)."""
    if not args.model:
        raise SystemExit("--mtp-only/--add-mtp need --model DIR: the finished model whose MTP modules to train")
    if args.resume:
        raise SystemExit("--mtp-only runs are short and write no checkpoints: drop --resume")
    fixed_drafts(args)
    saved, depth = mtp_depths(args)
    if args.mtp_train_depth is not None and args.mtp_train_depth < depth:
        raise SystemExit(
            f"--mtp-train-depth {args.mtp_train_depth} leaves MTP modules untrained: give at least {depth}, the "
            "modules' count"
        )
    depth_trained = args.mtp_train_depth or depth
    if args.mtp_data == "generated":
        return saved, depth, generation_plan(args, depth_trained)
    given = [flag for flag, value in (("--generate-tokens", args.generate_tokens),
             ("--generate-prompt-lengths", args.generate_prompt_lengths),
             ("--generated-sequences", args.generated_sequences)) if value is not None]  # fmt: skip
    if given:
        raise SystemExit(f"{', '.join(given)}: only with --mtp-data generated, not --mtp-data text")
    return saved, depth, None


def mtp_depths(args) -> tuple[int, int]:
    """(MTP modules --model has, MTP modules the output gets)."""
    saved = saved_mtp_depth(args.model)
    if args.add_mtp is None:
        if saved == 0:
            raise SystemExit(f"--mtp-only: {args.model} has no MTP modules; pass --add-mtp N to create and train N")
        return saved, saved
    if args.add_mtp < 1:
        raise SystemExit(f"--add-mtp must be at least 1, got {args.add_mtp}")
    if saved >= args.add_mtp:
        raise SystemExit(
            f"--add-mtp {args.add_mtp}: {args.model} already has {saved} MTP module(s); "
            "re-align them with --mtp-only instead"
        )
    return saved, args.add_mtp


def align(model, trainable: list[torch.nn.Parameter], batches: Batches, args, device) -> tuple[list[dict], float]:
    """Trains the MTP modules on the main model's own predictions (`--mtp-targets`) with AdamW, warmup and cosine
    decay, the main model frozen; returns the logged records and the seconds it took."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    config = model.config
    config.mtp_loss_targets, config.mtp_loss_weight = args.mtp_targets, 1.0
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, args.warmup_steps, args.max_steps, min_lr_rate=args.min_lr_ratio
    )
    # Eval mode throughout: the routers neither count tokens nor move their balancing bias (no main-model buffer
    # changes), and nothing in the model depends on train mode otherwise (no dropout).
    model.eval()
    history, start = [], time.perf_counter()
    progress = tqdm(range(args.max_steps), desc="mtp-only", unit="step", disable=args.no_progress, dynamic_ncols=True)
    for step in progress:
        total = 0.0
        for _ in range(args.grad_accum):
            batch = batches.next().to(device)
            out = model(input_ids=batch, labels=batch, mtp_depth=args.mtp_train_depth)
            loss = torch.stack(list(out.mtp_losses)).mean() / args.grad_accum
            loss.backward()
            total += float(loss.detach())
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            history.append({"step": step + 1, "distill_loss": total, "lr": scheduler.get_last_lr()[0]})
            progress.set_postfix(loss=f"{total:.3f}")
    progress.close()
    config.mtp_loss_targets, config.mtp_loss_weight = "labels", 0.3
    return history, time.perf_counter() - start


__all__ = ["add_arguments", "run", "teacher_forced_acceptance", "decoding_acceptance"]
