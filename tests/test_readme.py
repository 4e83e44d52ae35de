"""The README's Python examples run as written (paths pointed at tiny checkpoints)."""

import re
from pathlib import Path

import torch
from conversion_fixtures import V2_LITE, tiny_config, write_released

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_model_example_runs():
    scope = {}
    exec(PYTHON_BLOCKS[0], scope)
    out = scope["out"]
    assert torch.isfinite(out.loss) and len(out.mtp_losses) == 1


def test_readme_released_checkpoint_example_runs(tmp_path):
    folder, _ = write_released(tmp_path / "DeepSeek-V2-Lite", tiny_config(**V2_LITE), fp8=False)
    block = next(b for b in PYTHON_BLOCKS if "from_pretrained" in b)
    scope = {}
    exec(block.replace("path/to/DeepSeek-V2-Lite", str(folder)), scope)
    assert scope["model"].config.topk_method == "greedy" and scope["model"].dtype == torch.bfloat16
