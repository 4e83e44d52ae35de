"""The data pipeline of `python -m moe_mtp.train`: peak RAM against corpus size, the cache, and block delivery.

    python benchmarks/bench_data.py               # ~100 MB and ~1 GB corpora: 15-20 minutes on 2 CPU cores
    python benchmarks/bench_data.py --scale 0.01  # ~1 MB and ~10 MB: about 4 minutes (the training runs)

In a temporary folder it writes two text corpora from the Python standard library's own source files and the English
of `pydoc_data/topics.py`, shuffled and repeated up to the size (a .txt file's documents are its paragraphs). For each:

1. peak RSS of `python -m moe_mtp.train --data CORPUS --max-steps 2` with an empty cache (so the tokenizer is trained
   and the token store built), read from the kernel when the process ends (`os.wait4`, the process's ru_maxrss);
2. the data preparation time (tokenizer and store; the script's `summary.json`) of that run, and of a second run
   with another output folder, which finds both in the cache;
3. blocks/s out of the store, in the quickstart batch (8 x 256, by the step-indexed sampler), against the blocks/s
   the quickstart model consumes (the tokens/s the second run reports for steps 4-6, / 256), and, for reference,
   blocks/s of `--streaming` (tokenizing as it goes).

Targets (issue 22): the 1 GB peak under 2.5 GB and within 20% of the 100 MB peak; the second preparation at most
10% of the first; delivery at least 20x consumption. `--check` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SIZES_MB = (100, 1000)
BATCH, SEQ = 8, 256  # the quickstart model's (the training script's defaults)


def write_corpus(path: Path, size: int, seed: int) -> int:
    """The stdlib's .py files and pydoc topics, in a new shuffled order each pass, until `size` bytes."""
    from pydoc_data.topics import topics

    library = Path(sysconfig.get_paths()["stdlib"])
    texts = [topics[name] for name in sorted(topics)]
    for source in sorted(library.rglob("*.py")):
        if "site-packages" not in source.parts:
            try:
                texts.append(source.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue  # a few test files are deliberately not UTF-8
    rng, written = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as corpus:
        while written < size:
            rng.shuffle(texts)
            for text in texts:
                piece = text.strip() + "\n\n"
                corpus.write(piece)
                written += len(piece.encode())
                if written >= size:
                    break
    return path.stat().st_size


def train_run(corpus: Path, cache: Path, output: Path, *extra: str) -> dict:
    """Runs the training script; returns its summary, metrics and peak RSS (bytes)."""
    command = [sys.executable, "-m", "moe_mtp.train", "--data", str(corpus), "--max-steps", "2", *extra]
    command += ["--output-dir", str(output), "--cache-dir", str(cache), "--no-progress"]
    log = output.with_suffix(".log")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak, from the kernel
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((output / "summary.json").read_text())
    return {"summary": summary, "records": records, "peak_rss": usage.ru_maxrss * 1024, "command": command}


def store_rate(store_folder: str, seconds: float = 3.0) -> float:
    """Blocks/s drawn from the store as training draws them: a quickstart micro-batch per step, in sampler order."""
    from moe_mtp.data import TokenStore
    from moe_mtp.training.dataloader import BlockSampler

    blocks = TokenStore(Path(store_folder)).blocks("train", SEQ)
    sampler = BlockSampler(len(blocks), BATCH, 1, 1, seed=0)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = blocks[sampler.micro_batch(step, 0, 0)]
        step += 1
    assert batch.shape == (BATCH, SEQ)
    return step * BATCH / (time.perf_counter() - start)


def streaming_rate(corpus: Path, tokenizer_dir: Path, seconds: float = 5.0) -> float:
    """Blocks/s that --streaming delivers (reading, tokenizing and packing as it goes)."""
    from transformers import AutoTokenizer

    from moe_mtp.data import Corpus, StreamedBlocks

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = StreamedBlocks(Corpus([str(corpus)]), tokenizer, SEQ, 0.05, BATCH, 1, 1, 0, 10_000)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        stream.micro_batch(step, 0, 0)
        step += 1
    return step * BATCH / (time.perf_counter() - start)


def consumption_rate(records: list[dict]) -> float:
    """Blocks/s the model trained at, from the script's last tokens/s window (after the first one's warm-up)."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return rates[-1] / SEQ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="Corpus sizes are 100 MB and 1 GB times this.")
    parser.add_argument("--check", action="store_true", help="Exit 1 when a target is missed.")
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        for size_mb in SIZES_MB:
            label = f"{size_mb * args.scale:g} MB"
            corpus = tmp / f"corpus_{size_mb}.txt"
            size = write_corpus(corpus, int(size_mb * args.scale * 1e6), seed=size_mb)
            print(f"== {label} corpus: {size / 1e6:.1f} MB; first run (empty cache) ...", flush=True)
            cache = tmp / f"cache_{size_mb}"
            first = train_run(corpus, cache, tmp / f"first_{size_mb}")
            print("   second run (another output folder, same cache) ...", flush=True)
            # 6 steps, logged every 3: the second window is the consumption rate without the first step's warm-up
            timing = ["--max-steps", "6", "--log-every", "3", "--eval-batches", "1"]
            second = train_run(corpus, cache, tmp / f"second_{size_mb}", *timing)
            data = first["summary"]["data"]
            rows[label] = {
                "corpus_bytes": size, "documents": data["documents"], "train_tokens": data["train_tokens"],
                "store_bytes": data["store_bytes"], "peak_rss": first["peak_rss"], "second_peak_rss": second["peak_rss"],
                "prep_first_s": data["prep_seconds"], "prep_second_s": second["summary"]["data"]["prep_seconds"],
                "second_built_store": second["summary"]["data"]["built_store"],
                "store_blocks_per_s": store_rate(data["store"]),
                "streaming_blocks_per_s": streaming_rate(corpus, tmp / f"first_{size_mb}" / "tokenizer"),
                "model_blocks_per_s": consumption_rate(second["records"]),
                "command": " ".join(first["command"]),
            }  # fmt: skip
            print(json.dumps(rows[label]), flush=True)

    small, large = rows.values()
    print(f"\n{'corpus':<10}{'peak RSS':>10}{'prep 1st':>10}{'prep 2nd':>10}{'2nd/1st':>9}{'store blk/s':>13}"
          f"{'stream blk/s':>14}{'model blk/s':>13}{'store/model':>13}")  # fmt: skip
    for label, row in rows.items():
        print(f"{label:<10}{row['peak_rss'] / 1e9:>8.2f}GB{row['prep_first_s']:>9.1f}s{row['prep_second_s']:>9.2f}s"
              f"{row['prep_second_s'] / row['prep_first_s']:>9.3f}{row['store_blocks_per_s']:>13.0f}"
              f"{row['streaming_blocks_per_s']:>14.0f}{row['model_blocks_per_s']:>13.1f}"
              f"{row['store_blocks_per_s'] / row['model_blocks_per_s']:>12.0f}x")  # fmt: skip
    ratio = large["peak_rss"] / small["peak_rss"]
    checks = {
        "1 GB peak RSS < 2.5 GB": large["peak_rss"] < 2.5e9,
        f"1 GB peak within 20% of the 100 MB peak (ratio {ratio:.3f})": abs(ratio - 1) <= 0.2,
        "second preparation <= 10% of the first": all(r["prep_second_s"] <= 0.1 * r["prep_first_s"] for r in rows.values()),
        "second run built no store": all(r["second_built_store"] == [False] for r in rows.values()),
        "store delivery >= 20x model consumption": all(
            r["store_blocks_per_s"] >= 20 * r["model_blocks_per_s"] for r in rows.values()
        ),
    }  # fmt: skip
    print(f"\npeak RSS ratio, large / small corpus: {ratio:.3f}")
    for name, ok in checks.items():
        print(f"{'yes' if ok else 'NO ':<4} {name}")
    if args.check and not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
