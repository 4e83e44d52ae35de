"""Training data for `python -m moe_mtp.train`: the corpus, its tokenizer, the token store and streamed blocks.

The corpus is tokenized once into a *token store*: a folder with `train.bin` and `eval.bin` (the token ids of the
training and the held-out documents, each document followed by EOS, as uint16, or uint32 for vocabularies over
65536) and `index.json`. Training reads fixed-length blocks out of them through `np.memmap`, so RAM does not grow
with the corpus, and every process of a data-parallel run maps the same files (the OS keeps one copy in its page
cache). Stores live in a cache folder (`--cache-dir`), under a key from the corpus (paths, sizes and modification
times, or the Hub dataset's fingerprint), the tokenizer (a hash of its `tokenizer.json`) and the held-out share: a
later run, a `--resume` or another output folder on the same data reuses the store. The sequence length is not
part of the key: a store is a token stream, and `--seq-len` only decides how it is cut.

A document is held out when a hash of its text falls under `--eval-fraction`: the split does not depend on the
order, the size or the other documents of the corpus, so a held-out document stays held out in every run on the
same data, in streaming mode too, and so do its exact duplicates.

Why a flat token file rather than `datasets`' Arrow cache: a block is then one contiguous slice of one file, found
without an index; the file holds 2 bytes per token (Arrow's list column would hold 4, plus offsets); and the bytes
each process maps are exactly the store. nanoGPT and Megatron's indexed datasets do the same. `datasets` still
reads the corpus (local .txt/.jsonl/.json/.parquet files, or the Hub), as a stream, and drives `--streaming`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
STORE_FORMAT = 1
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Text per `encode_batch` call: thousands of documents for tokenizers' threads, a few MB of encodings in RAM.
CHUNK_CHARS = 1 << 20
DOCUMENTS_PER_READ = 1000


def default_cache_dir() -> Path:
    """$MOE_MTP_CACHE, else $XDG_CACHE_HOME/moe_mtp, else ~/.cache/moe_mtp."""
    if os.environ.get("MOE_MTP_CACHE"):
        return Path(os.environ["MOE_MTP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe_mtp"


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def is_held_out(text: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a function of its text alone."""
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return value < eval_fraction * 2**64


# ----------------------------------------------------------------------------------------------------------- corpus


class Corpus:
    """The documents `--data` names, read as a stream, and a fingerprint that changes when they do."""

    def __init__(self, data=(), data_config=None, text_column="text", max_documents=None):
        self.data, self.data_config, self.max_documents = list(data), data_config, max_documents
        self.text_column = text_column if self.data else "text"
        self._hub = None
        if not self.data:
            self.kind = "default"
        elif all(os.path.exists(path) for path in self.data):
            suffixes = {Path(path).suffix for path in self.data}
            if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
                raise SystemExit(f"--data: give files of one kind among {sorted(BUILDERS)}, got {self.data}")
            self.kind = "files"
        elif len(self.data) == 1 and not Path(self.data[0]).suffix:
            self.kind = "hub"
        else:
            missing = [path for path in self.data if not os.path.exists(path)]
            raise SystemExit(f"--data: no such file(s): {missing}")

    @classmethod
    def from_args(cls, args) -> Corpus:
        return cls(args.data, args.data_config, args.text_column, args.max_documents)

    def fingerprint(self, streaming: bool = False) -> dict:
        """What the documents depend on. Local files: path, size and modification time (as make and `datasets`
        judge them); a Hub dataset: its fingerprint from `datasets`, or in streaming mode only its name."""
        base = {"text_column": self.text_column, "max_documents": self.max_documents}
        if self.kind == "default":
            import pydoc_data.topics

            return {**base, "default": file_stamp(pydoc_data.topics.__file__)}
        if self.kind == "files":
            return {**base, "files": [file_stamp(path) for path in self.data]}
        if streaming:
            return {**base, "hub": self.data[0], "config": self.data_config}
        return {
            **base,
            "hub": self.data[0],
            "config": self.data_config,
            "fingerprint": self._hub_dataset()._fingerprint,
        }

    def total_bytes(self) -> int | None:
        """The corpus size, for progress bars (the files' bytes; None for a Hub dataset)."""
        if self.kind == "files":
            return sum(os.path.getsize(path) for path in self.data)
        if self.kind == "default":
            return sum(len(text.encode()) for text in default_documents())
        return None

    def _hub_dataset(self):
        import datasets

        if self._hub is None:
            self._hub = datasets.load_dataset(self.data[0], self.data_config, split="train")
        return self._hub

    def dataset(self, streaming: bool):
        """A `datasets` view of the corpus: an IterableDataset when streaming (or for local files, which are
        always read as a stream: nothing is copied into an Arrow cache first)."""
        import datasets

        if self.kind == "default":
            dataset = datasets.Dataset.from_dict({"text": default_documents()})
            return dataset.to_iterable_dataset() if streaming else dataset
        if self.kind == "files":
            builder = BUILDERS[Path(self.data[0]).suffix]
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=list(self.data), split="train", streaming=True, **extra)
        if streaming:
            return datasets.load_dataset(self.data[0], self.data_config, split="train", streaming=True)
        return self._hub_dataset()

    def batches(self, streaming: bool = False, seed: int = 0, shuffle_buffer: int = 0, epoch: int = 0):
        """Lists of non-empty documents, in corpus order (or through a seeded shuffle buffer), up to
        --max-documents in all."""
        dataset = self.dataset(streaming)
        if shuffle_buffer:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
            dataset.set_epoch(epoch)
        left = self.max_documents or float("inf")
        for batch in dataset.iter(batch_size=DOCUMENTS_PER_READ):
            if self.text_column not in batch:
                raise SystemExit(
                    f"--data: no column {self.text_column!r} (columns: {sorted(batch)}); pick one with --text-column"
                )
            texts = [text for text in batch[self.text_column] if isinstance(text, str) and text.strip()]
            texts = texts[: int(min(left, len(texts)))]
            left -= len(texts)
            if texts:
                yield texts
            if left <= 0:
                return


def file_stamp(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def default_documents() -> list[str]:
    """The stdlib's pydoc topics: a few MB of real English prose about Python, one document per topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


# -------------------------------------------------------------------------------------------- building things once


def build_once(folder: Path, make: Callable[[Path], None], builder: bool, what: str) -> bool:
    """Makes `folder` once for every process and every run. The builder takes a file lock (other runs sharing the
    cache wait on it), writes into `FOLDER.partial` and renames it into place when complete; other processes wait
    for the folder to appear (polling, so a build longer than torch.distributed's timeout does not time them out).
    Returns whether this call built it."""
    if folder.is_dir():
        return False
    if not builder:
        announced, start = False, time.monotonic()
        while not folder.is_dir():
            if not announced and time.monotonic() - start > 30:
                print(f"waiting for the {what} {folder}, which another process is building", flush=True)
                announced = True
            time.sleep(0.2)
        return False
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.is_dir():  # another run built it while this one waited for the lock
            return False
        with atomic_path(folder, folder=True) as partial:  # a FOLDER.partial left by a killed build goes first
            make(partial)
    return True


# -------------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on the texts, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tokenizer_sample(corpus: Corpus, eval_fraction: float, sample_bytes: int, streaming: bool = False) -> Iterator[str]:
    """The first `sample_bytes` of the training documents (held-out ones are left out)."""
    taken = 0
    for texts in corpus.batches(streaming):
        for text in texts:
            if taken >= sample_bytes:
                return
            if not is_held_out(text, eval_fraction):
                taken += len(text.encode())
                yield text


def cached_tokenizer(corpus: Corpus, vocab_size: int, sample_bytes: int, eval_fraction: float, cache_dir: Path,
                     builder: bool, streaming: bool = False) -> tuple[Path, bool]:  # fmt: skip
    """A BPE trained once per corpus, vocabulary and sample size, in CACHE/tokenizers/KEY; (its folder, whether
    this call trained it)."""
    key = digest({
        "format": STORE_FORMAT, "corpus": corpus.fingerprint(streaming), "vocab_size": vocab_size,
        "sample_bytes": sample_bytes, "eval_fraction": eval_fraction, "special_tokens": SPECIAL_TOKENS,
    })  # fmt: skip
    folder = Path(cache_dir) / "tokenizers" / key

    def make(partial: Path) -> None:
        print(f"tokenizer: training a {vocab_size}-token BPE on the first {sample_bytes / 1e6:g} MB of the training "
              "documents", flush=True)  # fmt: skip
        sample = tokenizer_sample(corpus, eval_fraction, sample_bytes, streaming)  # a Hub dataset is not downloaded
        train_tokenizer(sample, vocab_size).save_pretrained(partial)

    return folder, build_once(folder, make, builder, "tokenizer")


def tokenizer_digest(tokenizer) -> str:
    """A hash of everything that decides the token ids: the fast tokenizer's serialized form and its EOS."""
    if not getattr(tokenizer, "is_fast", False):
        raise SystemExit(
            f"the tokenizer {tokenizer.name_or_path!r} is a slow (Python) one; the token store needs a fast one: "
            "save it with AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR) and pass --tokenizer DIR"
        )
    if tokenizer.eos_token_id is None:
        raise SystemExit(
            f"the tokenizer {tokenizer.name_or_path!r} has no EOS token, which separates documents; "
            "give one with an eos_token, or pick another --tokenizer"
        )
    text = tokenizer.backend_tokenizer.to_str() + f"\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)


def encode(tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The documents' token ids, each followed by EOS, as one array (tokenizers spreads the batch over all cores)."""
    if not texts:
        return np.zeros(0, dtype=dtype)
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    parts = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        parts += [np.asarray(encoding.ids, dtype=dtype), eos]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------------ token store


def data_key(corpus: Corpus, tokenizer, eval_fraction: float, streaming: bool = False) -> str:
    """What the training data depends on (the store's name; kept in checkpoints so a resume can check it)."""
    return digest({
        "format": STORE_FORMAT, "corpus": corpus.fingerprint(streaming), "tokenizer": tokenizer_digest(tokenizer),
        "eval_fraction": eval_fraction,
    })  # fmt: skip


class Blocks:
    """Fixed-length blocks cut from a token stream (a memmap or an array): block i is tokens [i*L, (i+1)*L). Indexing
    with block numbers copies only those blocks out, as int64."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        count = len(tokens) // seq_len
        self.rows = tokens[: count * seq_len].reshape(count, seq_len)  # a view: nothing is read yet

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.rows[np.asarray(indices, dtype=np.int64)].astype(np.int64))


class TokenStore:
    """A store folder, memory-mapped: `tokens["train"]` and `tokens["eval"]` are the two token streams."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        if self.index.get("format") != STORE_FORMAT:
            raise SystemExit(f"{self.folder} is a token store of another format; delete it and it is rebuilt")
        dtype = np.dtype(self.index["dtype"])
        self.tokens = {
            split: np.memmap(self.folder / f"{split}.bin", dtype=dtype, mode="r")
            if self.index[f"{split}_tokens"] else np.zeros(0, dtype=dtype)  # an empty file cannot be mapped
            for split in ("train", "eval")
        }  # fmt: skip

    def blocks(self, split: str, seq_len: int) -> Blocks:
        return Blocks(self.tokens[split], seq_len)

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f"{split}.bin").stat().st_size for split in ("train", "eval"))

    def mapped_bytes(self) -> int | None:
        """Bytes of the store this process has mapped, from /proc/self/maps (None where there is none): the
        kernel maps whole pages, so a file of N bytes shows as N rounded up to the page size."""
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return None
        files = {str((self.folder / f"{split}.bin").resolve()) for split in ("train", "eval")}
        total = 0
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] in files:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                total += end - start
        return total


def prepare_store(corpus: Corpus, tokenizer, eval_fraction: float, cache_dir: Path, builder: bool,
                  progress: bool = True) -> tuple[TokenStore, bool]:  # fmt: skip
    """The corpus's token store in CACHE/tokens/KEY, built by this process if it is the builder and nobody has built
    it yet; (the store, whether this call built it)."""
    folder = Path(cache_dir) / "tokens" / data_key(corpus, tokenizer, eval_fraction)

    def make(partial: Path) -> None:
        write_store(partial, corpus, tokenizer, eval_fraction, progress)

    built = build_once(folder, make, builder, "token store")
    return TokenStore(folder), built


def write_store(folder: Path, corpus: Corpus, tokenizer, eval_fraction: float, progress: bool) -> dict:
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer)
    start, cpu_start = time.perf_counter(), time.process_time()
    counts = {"documents": 0, "eval_documents": 0, "text_bytes": 0, "train_tokens": 0, "eval_tokens": 0}
    chunk = {"train": [], "eval": []}

    def flush(files):
        for split, texts in chunk.items():
            ids = encode(tokenizer, texts, dtype)
            ids.tofile(files[split])
            counts[f"{split}_tokens"] += len(ids)
            texts.clear()

    bar = tqdm(total=corpus.total_bytes(), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    with open(folder / "train.bin", "wb") as train_file, open(folder / "eval.bin", "wb") as eval_file, bar:
        files, pending = {"train": train_file, "eval": eval_file}, 0
        for texts in corpus.batches():
            for text in texts:
                held_out = is_held_out(text, eval_fraction)
                chunk["eval" if held_out else "train"].append(text)
                counts["documents"] += 1
                counts["eval_documents"] += held_out
                size = len(text.encode())
                counts["text_bytes"] += size
                pending += size
                bar.update(size)
            if pending >= CHUNK_CHARS:
                flush(files)
                pending = 0
        flush(files)
        for file in files.values():
            file.flush()
            os.fsync(file.fileno())
    if not counts["documents"]:
        raise SystemExit("--data: no text found")
    index = {
        "format": STORE_FORMAT, "dtype": dtype.name, "eos_token_id": tokenizer.eos_token_id, **counts,
        "eval_fraction": eval_fraction, "corpus": corpus.fingerprint(), "tokenizer": tokenizer_digest(tokenizer),
        "build_seconds": round(time.perf_counter() - start, 3),
        "build_cpu_seconds": round(time.process_time() - cpu_start, 3),  # over build_seconds: the cores used
    }  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    return index


# -------------------------------------------------------------------------------------------------------- streaming


class StreamedBlocks:
    """Training blocks packed on the fly for --streaming: the training documents in stream order (through a seeded
    shuffle buffer), tokenized a read at a time, joined with EOS and cut into blocks; when the stream ends the next
    epoch starts, reshuffled. Block k of the stream is a function of k alone, so the data position is still the
    step: global micro-batch (step, micro) is the next batch_size * world_size blocks, and process r takes the r-th
    slice, as with BlockSampler. Asked for a later position (a resumed run), it replays the stream up to it."""

    def __init__(self, corpus: Corpus, tokenizer, seq_len: int, eval_fraction: float, batch_size: int,
                 grad_accum: int, world_size: int, seed: int, shuffle_buffer: int):  # fmt: skip
        self.corpus, self.tokenizer, self.seq_len, self.eval_fraction = corpus, tokenizer, seq_len, eval_fraction
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.dtype = token_dtype(tokenizer)
        self.position, self._stream = 0, None  # blocks of the stream handed out so far

    @property
    def blocks_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _blocks(self) -> Iterator[np.ndarray]:
        leftover, epoch = np.zeros(0, dtype=self.dtype), 0
        while True:
            cut = 0
            batches = self.corpus.batches(True, self.seed, self.shuffle_buffer, epoch)
            for texts in batches:
                train_texts = [text for text in texts if not is_held_out(text, self.eval_fraction)]
                tokens = np.concatenate([leftover, encode(self.tokenizer, train_texts, self.dtype)])
                count = len(tokens) // self.seq_len
                yield from tokens[: count * self.seq_len].reshape(count, self.seq_len)
                leftover, cut = tokens[count * self.seq_len :], cut + count
            if epoch == 0 and not cut:
                raise SystemExit(
                    f"--streaming: a pass over the corpus gives no training block of --seq-len {self.seq_len}; "
                    "give more data or a shorter --seq-len"
                )
            epoch += 1

    def take(self, start: int, count: int) -> np.ndarray:
        """Blocks [start, start + count) of the stream."""
        if self._stream is None or start < self.position:
            self._stream, self.position = self._blocks(), 0
        for _ in range(start - self.position):
            next(self._stream)
        self.position = start + count
        return np.stack([next(self._stream) for _ in range(count)])

    def micro_batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        width = self.batch_size * self.world_size
        rows = self.take(step * self.blocks_per_step + micro * width, width)
        return torch.from_numpy(rows[rank * self.batch_size : (rank + 1) * self.batch_size].astype(np.int64))


def streamed_eval_blocks(corpus: Corpus, tokenizer, seq_len: int, eval_fraction: float, count: int) -> Blocks:
    """The first `count` blocks of the held-out documents, read from the head of the stream (fewer if the whole
    corpus has fewer)."""
    dtype, parts, tokens = token_dtype(tokenizer), [], 0
    for texts in corpus.batches(streaming=True):
        ids = encode(tokenizer, [text for text in texts if is_held_out(text, eval_fraction)], dtype)
        parts.append(ids)
        tokens += len(ids)
        if tokens >= count * seq_len:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return Blocks(stream[: count * seq_len], seq_len)
