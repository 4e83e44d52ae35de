"""`make quickstart`, shrunk with --smoke: trains, saves a Hub-ready folder and generates with and without MTP."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pyproject.toml says what the mark means

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_quickstart_smoke(tmp_path):
    out = tmp_path / "quickstart"
    command = [
        "make", "-C", str(REPO), "quickstart", f"PY={sys.executable}", f"QUICKSTART_DIR={out}",
        "QUICKSTART_ARGS=--smoke --no-progress", "GENERATE_ARGS=--smoke", "QUICKSTART_CORPUS_BYTES=400000",
        "QUICKSTART_DATA=--eval-fraction 0.3",  # 20 files: the default 5% would hold none out
        "ALIGN_ARGS=--max-steps 20",
        "-o", ".venv/.moe-mtp-installed",  # the venv running this test is the one to use; never rebuild it here
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("loss.png", "expert_load.png", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    model = out / "model"
    for name in ("config.json", "model.safetensors", "modeling_moe_mtp.py", "tokenizer.json", "README.md"):
        assert (model / name).is_file(), name
    card = (model / "README.md").read_text()
    assert "## Training" in card and "eval_loss" in card and "![loss](loss.png)" in card
    config = json.loads((model / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] and config["use_cache"] is True
    # Plain `generate` reads use_cache from the generation config: without the cache it recomputes every prefix.
    assert json.loads((model / "generation_config.json").read_text()).get("use_cache", True) is True
    text = proc.stdout.lower()
    assert "drafts accepted" in text and "speed ratio" in text and "quickstart:" in text
    assert "acceptance on held-out text before" in text and "bit-identical" in text  # the --mtp-only step
    result = json.loads((out / "speculative.json").read_text())
    assert [r["model"] for r in result["models"]] == [str(model), str(out / "aligned" / "model")]
    assert all(r["identical"] for r in result["models"])

    # A second run reuses the finished run instead of refusing the existing folder.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
