"""The README's Python examples run as written (paths pointed at tiny checkpoints)."""

import re
from pathlib import Path

import pytest
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


BASH_LINES = [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S)
    for line in block.splitlines()
    if line.strip() and not line.startswith("#")
]


def _run(line: str, cwd: Path):
    import shlex
    import subprocess
    import sys

    argv = shlex.split(line)
    assert argv[:2] == ["python", "-m"], line
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_readme_commands_are_known():
    """Every shell line of the README is run below, or is one of the set-up/entry commands tested elsewhere."""
    elsewhere = {"make quickstart", "make test", "pip install -e '.[dev]'"}
    runnable = [
        line for line in BASH_LINES if line.startswith(("python -m moe_mtp.conversion", "python -m moe_mtp.train"))
    ]
    others = [line for line in BASH_LINES if line not in runnable]
    assert all(line in elsewhere or line.startswith("pip install torch") for line in others), others
    assert len(runnable) >= 6


@pytest.mark.e2e
def test_readme_conversion_commands_run(tmp_path):
    """The conversion lines, with the README's placeholder paths pointed at tiny checkpoints."""
    from conversion_fixtures import write_moe_mtp

    write_released(tmp_path / "path/to/DeepSeek-V3", tiny_config(), fp8=True)
    write_moe_mtp(tmp_path / "path/to/finetuned", tiny_config())
    for line in [line for line in BASH_LINES if line.startswith("python -m moe_mtp.conversion")]:
        _run(line, tmp_path)
    assert (tmp_path / "path/to/DeepSeek-V3-moe_mtp/config.json").is_file()
    assert (tmp_path / "path/to/finetuned-fp8/config.json").is_file()


@pytest.mark.e2e
def test_readme_training_commands_run(tmp_path):
    """The training lines, shrunk with --smoke (the README's first line already is), on a small local corpus."""
    from pydoc_data.topics import topics

    (tmp_path / "corpus.txt").write_text("\n\n".join(topics[name] for name in sorted(topics)[:200]))
    for line in [line for line in BASH_LINES if line.startswith("python -m moe_mtp.train")]:
        smoke = line if "--smoke" in line else f"{line} --smoke --no-progress"
        _run(smoke, tmp_path)
    assert (tmp_path / "outputs/run1/model/config.json").is_file()
