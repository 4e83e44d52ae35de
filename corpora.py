"""Real text that ships with Python, for `make quickstart` and the benchmarks: no download needed.

    python -m moe_mtp.corpora stdlib-code outputs/quickstart/corpus        # train.jsonl, heldout.jsonl, info.json

`stdlib-code` is the source of the standard library's own modules (tests, site-packages and vendored copies left
out): about 13 MB of real Python code in CPython 3.11, so a small model trained for minutes sees each token about
once and its eval loss is still falling at the end, unlike the 107k-token `pydoc_data/topics.py` it replaced.
Files are split by a hash of their path, so the held-out files (the speculative-decoding prompts) are never in any
training data, whatever --max-bytes keeps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
from pathlib import Path

from .atomic import atomic_path, write_text

# Test suites repeat one pattern thousands of times, and `site-packages` is not the stdlib.
SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "ensurepip"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_code_files() -> list[Path]:
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIPPED_PARTS.intersection(parts) or parts[0].startswith("test"):
            continue
        files.append(path)
    if not files:
        raise SystemExit(f"no stdlib .py files under {root}: this Python ships its stdlib compiled or zipped")
    return files


def is_heldout(relative: str, heldout_fraction: float) -> bool:
    """A stable split: the same file is held out on every machine and run."""
    bucket = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:4], "big") / 2**32
    return bucket < heldout_fraction


def stdlib_code(max_bytes: int | None = None, heldout_fraction: float = 0.03) -> tuple[list[dict], list[dict]]:
    """(train, heldout) documents `{"path", "text"}`, one per stdlib module. `max_bytes` caps the train split
    (whole files, in path order)."""
    root = stdlib_root()
    train, heldout, size = [], [], 0
    for path in stdlib_code_files():
        relative = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few modules are Latin-1 test fixtures; nothing is lost by skipping them
        if not text.strip():
            continue
        document = {"path": relative, "text": text}
        if is_heldout(relative, heldout_fraction):
            heldout.append(document)
        elif max_bytes is None or size + len(text) <= max_bytes:
            train.append(document)
            size += len(text)
    return train, heldout


def write_jsonl(path: Path, documents: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for document in documents:
            f.write(json.dumps(document) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_mtp.corpora", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["stdlib-code"])
    parser.add_argument("output_dir", type=Path, help="Gets train.jsonl, heldout.jsonl and info.json.")
    parser.add_argument("--max-bytes", type=int, default=None, help="Cap on the train split's text (whole files).")
    parser.add_argument("--heldout-fraction", type=float, default=0.03, help="Share of files held out.")
    args = parser.parse_args(argv)
    train, heldout = stdlib_code(args.max_bytes, args.heldout_fraction)
    info = {
        "corpus": "stdlib-code",
        "source": str(stdlib_root()),
        "max_bytes": args.max_bytes,
        "train_files": len(train),
        "train_bytes": sum(len(d["text"]) for d in train),
        "heldout_files": len(heldout),
        "heldout_bytes": sum(len(d["text"]) for d in heldout),
    }
    info_path = args.output_dir / "info.json"
    if info_path.is_file() and json.loads(info_path.read_text()) == info:
        print(f"{args.output_dir}: corpus already written ({info['train_bytes'] / 1e6:.1f} MB train)")
        return
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output_dir / "train.jsonl", train)
    write_jsonl(args.output_dir / "heldout.jsonl", heldout)
    write_text(info_path, json.dumps(info, indent=2) + "\n")
    print(
        f"{args.output_dir}: {info['train_files']} files ({info['train_bytes'] / 1e6:.1f} MB) to train on, "
        f"{info['heldout_files']} held out ({info['heldout_bytes'] / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main()
