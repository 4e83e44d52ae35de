"""The data of a `python -m moe_mtp.train` run: its tokenizer, the training blocks (a memory-mapped token store, or
a stream) and the held-out ones, and which blocks each process reads at each optimizer step (moe_mtp/data.py builds
and reads the token store)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import data as token_data
from ..atomic import atomic_path
from ..data import Corpus


class BlockSampler:
    """Which blocks each process trains on at each optimizer step; a pure function of the step, so the data position
    in a checkpoint is the step itself. Each epoch is a seeded permutation. Process r of W takes the r-th slice of
    every micro-batch, so W processes see exactly the blocks one process would with a W-times larger batch."""

    def __init__(self, num_blocks: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.num_blocks, self.batch_size, self.grad_accum = num_blocks, batch_size, grad_accum
        self.world_size, self.seed = world_size, seed
        self._epoch, self._order = -1, None

    @property
    def blocks_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_blocks, generator=generator)
        return int(self._order[offset])

    def micro_batch(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.blocks_per_step + (micro * self.world_size + rank) * self.batch_size
        return [self._position(start + i) for i in range(self.batch_size)]


def cache_dir(args) -> Path:
    return Path(args.cache_dir) if args.cache_dir else token_data.default_cache_dir()


def load_tokenizer(args, accelerator, corpus: Corpus, output_dir: Path, resume_from: Path | None):
    """Given, the fine-tuned model's, the resumed run's, or a BPE trained once per corpus into the cache (by one
    process per machine) and copied into OUTPUT/tokenizer."""
    from transformers import AutoTokenizer

    if args.tokenizer or args.model:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    run_copy = output_dir / "tokenizer"
    if not (resume_from and run_copy.is_dir()):
        start = time.perf_counter()
        cached, trained = token_data.cached_tokenizer(
            corpus, args.vocab_size, args.tokenizer_sample_bytes, args.eval_fraction, cache_dir(args),
            builder=accelerator.is_local_main_process, streaming=args.streaming,
        )  # fmt: skip
        if accelerator.is_main_process:
            done = f"trained in {time.perf_counter() - start:.1f}s into" if trained else "reused from"
            print(f"tokenizer: {done} {cached}", flush=True)
            with atomic_path(run_copy, folder=True) as partial:
                shutil.copytree(cached, partial, dirs_exist_ok=True)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(run_copy)


def prepare_data(
    args, accelerator, output_dir: Path, resume_from: Path | None, dp_world: int | None = None
) -> SimpleNamespace:
    """The tokenizer, the training blocks (a memory-mapped store, or a stream), the held-out blocks, the data key
    kept in checkpoints, and facts for the summary. `dp_world`: the data-parallel replicas that split each batch
    (the processes, unless tensor-parallel groups share batches)."""
    dp_world = accelerator.num_processes if dp_world is None else dp_world
    start = time.perf_counter()
    corpus = Corpus.from_args(args)
    tokenizer = load_tokenizer(args, accelerator, corpus, output_dir, resume_from)
    key = token_data.data_key(corpus, tokenizer, args.eval_fraction, args.streaming)
    store, info = None, {"mode": "streaming" if args.streaming else "store"}
    if args.streaming:
        train_blocks = token_data.StreamedBlocks(
            corpus, tokenizer, args.seq_len, args.eval_fraction, args.batch_size, args.grad_accum,
            dp_world, args.seed, args.shuffle_buffer,
        )  # fmt: skip
        wanted = args.eval_batches * args.batch_size * dp_world
        eval_blocks = token_data.streamed_eval_blocks(corpus, tokenizer, args.seq_len, args.eval_fraction, wanted)
        eval_tokens = len(eval_blocks) * args.seq_len
    else:
        store, built = token_data.prepare_store(
            corpus, tokenizer, args.eval_fraction, cache_dir(args), builder=accelerator.is_local_main_process,
            progress=not args.no_progress,
        )  # fmt: skip
        train_blocks, eval_blocks = store.blocks("train", args.seq_len), store.blocks("eval", args.seq_len)
        index, eval_tokens = store.index, store.index["eval_tokens"]
        if not len(train_blocks):
            raise SystemExit(
                f"the training documents make {index['train_tokens']} tokens, fewer than one block of --seq-len "
                f"{args.seq_len}; give more data or a shorter --seq-len"
            )
        info.update(store=str(store.folder), store_bytes=store.nbytes, built_store=built)
        info.update({name: index[name] for name in ("documents", "eval_documents", "train_tokens", "eval_tokens")})
        if accelerator.is_main_process:
            done = f"built in {index['build_seconds']:.1f}s:" if built else "reused:"
            print(f"token store {done} {store.folder} ({index['documents']} documents, {index['train_tokens']} "
                  f"training tokens, {index['eval_tokens']} held out)", flush=True)  # fmt: skip
    if not len(eval_blocks):
        raise SystemExit(
            f"the held-out documents make {eval_tokens} tokens, fewer than one block of --seq-len {args.seq_len}: "
            "raise --eval-fraction, give more documents (a .txt file's documents are its paragraphs, between blank "
            "lines) or a shorter --seq-len"
        )
    info.update(train_blocks=len(train_blocks) if store is not None else None, eval_blocks=len(eval_blocks))
    info["prep_seconds"] = round(time.perf_counter() - start, 3)
    return SimpleNamespace(tokenizer=tokenizer, train=train_blocks, eval_blocks=eval_blocks, key=key, info=info,
                           store=store)  # fmt: skip


def batch_source(
    args, data: SimpleNamespace, dp_world: int
) -> tuple[int | None, Callable[[int, int, int], torch.Tensor]]:
    """(training blocks, or None for a stream; `draw(step, micro, dp_rank)`, the micro-batch a data-parallel rank
    reads at a micro-step): a pure function of the step, so that the data position in a checkpoint is the step."""
    if args.streaming:
        return None, data.train.micro_batch
    sampler = BlockSampler(len(data.train), args.batch_size, args.grad_accum, dp_world, args.seed)

    def draw(step: int, micro: int, rank: int) -> torch.Tensor:
        return data.train[sampler.micro_batch(step, micro, rank)]

    return len(data.train), draw
