"""The metrics of a `python -m moe_mtp.train` run: the history of logged records and expert loads, kept as
metrics.jsonl (+ expert_load.safetensors) in the output folder and in every checkpoint, and metrics.csv and
summary.json at the end. Every file is written atomically (moe_mtp/atomic.py), except the appends to metrics.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..atomic import atomic_path, write_text


def new_history(layers: list[str]) -> dict:
    """An empty history: logged records, and the per-layer expert load at each log step (`layers`: the MoE layers)."""
    return {"records": [], "load_steps": [], "loads": [], "layers": layers}


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2))


def write_csv(path: Path, records: list[dict]) -> None:
    columns = list(dict.fromkeys(key for record in records for key in record))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def write_history(folder: Path, history: dict) -> None:
    """metrics.jsonl (one line per log step, eval lines included) and the expert-load record, written whole: into
    checkpoints, on resume and at the end. During the run, `append_records` extends metrics.jsonl instead."""
    from safetensors.torch import save_file

    write_text(folder / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history["records"]))
    if history["load_steps"]:
        tensors = {"steps": torch.tensor(history["load_steps"]), "load": torch.stack(history["loads"])}
        with atomic_path(folder / "expert_load.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"layers": ",".join(history["layers"])})


def append_records(folder: Path, history: dict) -> None:
    """Appends the records logged since the last write to metrics.jsonl, in one write: rewriting the whole log
    (and the expert load, layers x experts per log step) at every log step grew quadratically over a long run."""
    new = history["records"][history["written"] :]
    with open(folder / "metrics.jsonl", "a") as log:
        log.write("".join(json.dumps(record) + "\n" for record in new))
    history["written"] = len(history["records"])


def read_history(folder: Path, layers: list[str]) -> dict:
    from safetensors.torch import load_file

    history = new_history(layers)
    if (folder / "metrics.jsonl").exists():
        history["records"] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    if (folder / "expert_load.safetensors").exists():
        tensors = load_file(str(folder / "expert_load.safetensors"))
        history["load_steps"], history["loads"] = tensors["steps"].tolist(), list(tensors["load"])
    return history
