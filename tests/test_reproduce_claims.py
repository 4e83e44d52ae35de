"""benchmarks/reproduce_claims.py --quick end to end: three tiny training runs, quantized evals, MTP decoding."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pyproject.toml says what the mark means

ROOT = Path(__file__).resolve().parents[1]
# One thread: on a shared 2-core machine, torch's 2 threads per process oversubscribe the cores and crawl.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_quick_run_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "claims"
    done = subprocess.run(
        [sys.executable, "benchmarks/reproduce_claims.py", "--quick", "--output-dir", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not out.with_name("claims.partial").exists()
    table = (out / "claims.md").read_text()
    assert table in done.stdout  # the printed table is the written one
    result = json.loads((out / "claims.json").read_text())
    claims = [row["claim"] for row in result["rows"]]
    for expected in ("int8 memory", "nf4 memory", "int8 held-out perplexity", "nf4 held-out perplexity", "vs dense",
                     "MTP loss on vs off", "acceptance", "speedup", "active / total"):  # fmt: skip
        assert any(expected in claim for claim in claims), (expected, claims)
        assert expected in table
    for row in result["rows"]:
        assert isinstance(row["holds"], bool)
        assert row["holds"] or row["why"], row  # a claim that does not hold says why
    numbers = [
        q[key] for q in result["quantization"].values() for key in ("footprint", "loss", "ppl_change", "agreement")
    ]
    numbers += [result["decode"][key] for key in ("plain_tokens_per_s", "mtp_tokens_per_s", "speedup", "acceptance")]
    numbers += [run["summary"]["eval"]["eval_loss"] for run in result["runs"].values()]
    assert all(math.isfinite(x) for x in numbers), numbers
    assert result["quantization"]["int8"]["footprint"] < result["quantization"]["fp32"]["footprint"]
    assert result["decode"]["tokens_per_step"] >= 1
    assert result["decode"]["identical"]  # greedy MTP speculation reproduces plain greedy
    params = result["parameters"]
    assert params["moe"]["active_params"] < params["moe"]["main_params"]
    assert params["dense"]["active_params"] == params["dense"]["main_params"]
    for name in ("moe", "dense", "moe_no_mtp"):
        assert (out / "runs" / name / "model" / "config.json").is_file()
    assert (out / "runs" / "dense" / "model" / "config.json").read_text().count('"n_routed_experts": 0') == 1
    assert (out / "claims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing output is not overwritten unless asked
    again = subprocess.run(
        [sys.executable, "benchmarks/reproduce_claims.py", "--quick", "--output-dir", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode != 0 and "--overwrite" in again.stderr
