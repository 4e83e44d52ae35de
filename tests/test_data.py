"""data.py: the token store (every document once, built once, reused, rebuilt when the corpus changes), the held-out
split, streamed blocks, and one build that other processes wait for."""

import threading
import time

import numpy as np
import pytest
import torch
from conftest import write_corpus

from moe_mtp import data
from moe_mtp.data import Corpus, StreamedBlocks, prepare_store

EVAL = 0.1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = Corpus([str(write_corpus(tmp_path_factory.mktemp("tokenizer") / "corpus.txt"))])
    return data.train_tokenizer(data.tokenizer_sample(corpus, EVAL, 10**6), 300)


def store_of(path, tokenizer, cache):
    return prepare_store(Corpus([str(path)]), tokenizer, EVAL, cache, builder=True, progress=False)


def documents_of(tokens: np.ndarray, tokenizer) -> list[str]:
    """The documents a token stream holds (each ends with EOS), decoded."""
    ends = np.flatnonzero(tokens == tokenizer.eos_token_id)
    return [tokenizer.decode(part.tolist()) for part in np.split(np.asarray(tokens), ends + 1)[:-1]]


def test_the_store_holds_each_document_once_is_reused_and_is_rebuilt_when_the_corpus_changes(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "corpus.txt")
    store, built = store_of(path, tokenizer, tmp_path / "cache")
    assert built and store.index["documents"] == 600
    # Every document, in corpus order, tokenized as the tokenizer does it alone, followed by EOS, on its side.
    expected = {"train": [], "eval": []}
    for texts in Corpus([str(path)]).batches():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            expected["eval" if data.is_held_out(text, EVAL) else "train"] += ids
    for split in ("train", "eval"):
        assert isinstance(store.tokens[split], np.memmap) and store.tokens[split].dtype == np.uint16
        assert store.tokens[split].tolist() == expected[split], split
    assert store.nbytes == 2 * (len(expected["train"]) + len(expected["eval"]))

    written = {p.name: p.stat().st_mtime_ns for p in store.folder.iterdir()}
    again, built = store_of(path, tokenizer, tmp_path / "cache")
    assert not built and again.folder == store.folder
    assert {p.name: p.stat().st_mtime_ns for p in store.folder.iterdir()} == written  # nothing rewritten

    write_corpus(path, documents=601)
    changed, built = store_of(path, tokenizer, tmp_path / "cache")
    assert built and changed.folder != store.folder and changed.index["documents"] == 601
    assert store.folder.is_dir()  # the other corpus's store stays for runs on it

    # Blocks come out of the memmap by number, as int64, without reading the rest.
    blocks = store.blocks("train", 16)
    assert isinstance(blocks.rows, np.memmap) and len(blocks) == len(expected["train"]) // 16
    assert blocks[[3, 1]].tolist() == [expected["train"][48:64], expected["train"][16:32]]


def test_held_out_documents_stay_held_out_when_the_corpus_grows_or_is_reordered(tmp_path, tokenizer):
    first, _ = store_of(write_corpus(tmp_path / "a.txt", documents=600), tokenizer, tmp_path / "cache")
    held_out = set(documents_of(first.tokens["eval"], tokenizer))
    trained_on = set(documents_of(first.tokens["train"], tokenizer))
    assert 0.05 < len(held_out) / first.index["documents"] < 0.2 and not held_out & trained_on

    # The same documents in another order, with 400 more: the held-out ones are still held out, and none of the
    # documents trained on is held out now.
    reordered = tmp_path / "b.txt"
    more = write_corpus(tmp_path / "more.txt", documents=400, skip=600).read_text()
    reordered.write_text(more + "\n\n".join(reversed((tmp_path / "a.txt").read_text().split("\n\n"))))
    second, _ = store_of(reordered, tokenizer, tmp_path / "cache")
    held_out_now = set(documents_of(second.tokens["eval"], tokenizer))
    assert held_out <= held_out_now and not trained_on & held_out_now
    assert held_out_now - held_out  # some of the new documents are held out too


def test_streamed_blocks_are_the_stores_blocks_in_order_and_resume_at_any_step(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "DOCUMENTS_PER_READ", 37)  # many reads, so blocks span the seams between them
    path = write_corpus(tmp_path / "corpus.txt", documents=300)
    corpus = Corpus([str(path)])
    store, _ = store_of(path, tokenizer, tmp_path / "cache")
    blocks = store.blocks("train", 16)

    def stream(batch_size=4, world_size=1, shuffle_buffer=0):
        return StreamedBlocks(corpus, tokenizer, 16, EVAL, batch_size, 2, world_size, 3, shuffle_buffer)

    # In corpus order the stream cuts the store's training tokens into the same blocks.
    ordered = stream()
    assert torch.equal(torch.from_numpy(ordered.take(0, len(blocks)).astype(np.int64)), blocks[range(len(blocks))])
    first = torch.cat([ordered.micro_batch(step, micro, 0) for step in range(3) for micro in range(2)])
    assert torch.equal(first, blocks[range(24)])

    # Shuffled through the buffer: another order, still a function of the position alone, so a fresh stream asked
    # for a later step (a resumed run) gives what a stream that went through the earlier ones gives, across the end
    # of an epoch too; and two processes split each global micro-batch between them.
    steps = len(blocks) // 8 + 2
    shuffled = stream(shuffle_buffer=50)
    sequence = [shuffled.micro_batch(step, micro, 0) for step in range(steps) for micro in range(2)]
    assert not torch.equal(torch.cat(sequence[:6]), first)
    for step in (1, steps - 1):
        assert torch.equal(stream(shuffle_buffer=50).micro_batch(step, 1, 0), sequence[2 * step + 1])
    ranks = [stream(batch_size=2, world_size=2, shuffle_buffer=50) for _ in range(2)]
    for step in range(3):
        for micro in range(2):
            halves = [ranks[rank].micro_batch(step, micro, rank) for rank in range(2)]
            assert torch.equal(torch.cat(halves), sequence[2 * step + micro])

    held_out = data.streamed_eval_blocks(corpus, tokenizer, 16, EVAL, count=5)
    assert torch.equal(held_out[range(5)], store.blocks("eval", 16)[range(5)])


def test_one_process_builds_and_the_others_wait_for_it(tmp_path):
    folder = tmp_path / "cache" / "thing"
    builds = []

    def make(partial):
        builds.append(partial)
        time.sleep(0.3)
        (partial / "done").write_text("yes")

    waited = {}
    waiter = threading.Thread(target=lambda: waited.update(built=data.build_once(folder, make, False, "test")))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not folder.exists()  # it waits and builds nothing
    stale = folder.with_name("thing.partial")
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("")  # left by a build that was killed
    assert data.build_once(folder, make, True, "test")
    waiter.join(10)
    assert waited == {"built": False} and len(builds) == 1
    assert [p.name for p in folder.iterdir()] == ["done"] and not stale.exists()
    assert not data.build_once(folder, make, True, "test") and len(builds) == 1
