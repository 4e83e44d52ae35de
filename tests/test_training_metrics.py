"""training/metrics.py: the metrics history of a `python -m moe_mtp.train` run (the run itself: test_train.py)."""

import json

import torch

from moe_mtp.training.metrics import append_records, read_history, write_history


def test_the_metrics_log_grows_by_appending_and_is_written_whole_at_checkpoints(tmp_path):
    layers = ["layers.1", "layers.2"]
    history = {"records": [{"step": 1, "loss": 2.0}], "load_steps": [1], "loads": [torch.ones(2, 4)], "layers": layers}
    write_history(tmp_path, history)
    history["written"] = 1  # as the training loop records after its first write
    log, load = tmp_path / "metrics.jsonl", tmp_path / "expert_load.safetensors"
    before = (log.stat().st_ino, load.stat().st_ino, load.stat().st_mtime_ns)
    history["records"] += [{"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    history["load_steps"].append(2)
    history["loads"].append(torch.full((2, 4), 2.0))
    append_records(tmp_path, history)
    # The same file, extended (a rewrite would be a new file renamed into place); the expert load is left alone.
    assert (log.stat().st_ino, load.stat().st_ino, load.stat().st_mtime_ns) == before
    assert [json.loads(line) for line in log.read_text().splitlines()] == history["records"]
    append_records(tmp_path, history)  # nothing new: nothing written
    assert len(log.read_text().splitlines()) == 3
    write_history(tmp_path, history)
    saved = read_history(tmp_path, layers)
    assert saved["records"] == history["records"] and saved["load_steps"] == [1, 2]
    assert torch.equal(torch.stack(saved["loads"]), torch.stack(history["loads"]))
