"""benchmarks/gpu.sh cannot run here (no GPU), so its dry run executes the same code on CPU at tiny sizes."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pyproject.toml says what the mark means

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_script_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = (tmp_path / "gpu_results_dry_run.txt").read_text()
    assert not (tmp_path / "gpu_results_dry_run.txt.partial").exists()
    for line in (
        "== MoE layer fwd+bwd",
        "moe_mtp speed vs transformers grouped_mm",
        "== decode",
        "ours + MTP",
        "identical to plain greedy: True",
        "transformers DeepseekV3 use_mtp",
        "ratios (target)",
        "== int8/nf4 load + forward",
        "int8   footprint",
    ):
        assert line in results, f"missing {line!r} in:\n{results}"
    assert "TIMED OUT" not in results and "FAILED (exit" not in results
