"""Every script in examples/ runs as a user would run it: `python examples/X.py --smoke` in a fresh folder, in a
subprocess, with its default output paths; each test checks the files it writes and that its metrics are sane, then
runs the script again in the same folder: it works, or stops with one line saying what to do (never a traceback).

The model the others start from is the one `pretrain_from_scratch.py --smoke` trains, so it is trained once;
push_to_hub.py runs without --model, so the train-one-first path is covered too.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.e2e  # pyproject.toml says what the mark means

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["pretrain_from_scratch", "finetune_trainer_lora", "qlora_8bit", "convert_release", "speculative_generate",
           "push_to_hub"]  # fmt: skip


def run_example(name: str, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs examples/NAME.py --smoke ARGS in cwd; fails with its stderr if it fails and `check`."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 or not check, f"{name} failed:\n{result.stderr[-3000:]}"
    return result


def run_again(name: str, cwd: Path, *args: str) -> bool:
    """A second run in the same folder: it works, or it stops with one line that names the flag to pass (and
    leaves the first run's files alone). Returns whether it worked."""
    result = run_example(name, cwd, *args, check=False)
    assert "Traceback" not in result.stderr, f"{name}, run again:\n{result.stderr[-3000:]}"
    if result.returncode:
        last = result.stderr.strip().splitlines()[-1]
        assert "already" in last and "--overwrite" in last, f"{name}, run again:\n{result.stderr[-3000:]}"
    return result.returncode == 0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The model folder `pretrain_from_scratch.py --smoke` writes under its default output path."""
    cwd = tmp_path_factory.mktemp("pretrain")
    stdout = run_example("pretrain_from_scratch", cwd, "--no-progress").stdout
    run = cwd / "outputs" / "pretrain-smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and 1 < summary["eval"]["eval_ppl"] < 512  # below a uniform guess over the vocab
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert (run / "loss.png").stat().st_size > 0 and (run / "expert_load.png").stat().st_size > 0
    assert f"{run.relative_to(cwd)}/model" in stdout
    before = (run / "model" / "model.safetensors").stat().st_mtime_ns
    assert not run_again("pretrain_from_scratch", cwd, "--no-progress")  # it says: --resume or --overwrite
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == before
    return run / "model"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_smoke(name, capsys):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts only run under __main__
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--smoke" in capsys.readouterr().out


def test_pretrain_from_scratch(pretrained):
    assert (pretrained / "config.json").is_file()


def test_finetune_trainer_lora(pretrained, tmp_path):
    run_example("finetune_trainer_lora", tmp_path, "--model", str(pretrained))
    out = tmp_path / "outputs" / "lora"
    result = json.loads((out / "eval.json").read_text())
    assert result["eval_ppl_after"] < result["eval_ppl_before"] < 1e4
    assert result["train_log"] and "mtp_loss_1" in result["train_log"][0]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    for part in ("self_attn.kv_b_proj", "mlp.shared_experts.up_proj", "mlp.experts.base_layer", "mtp_layers.0"):
        assert any(part in n and "lora_A" in n for n in names), part
    assert not run_again("finetune_trainer_lora", tmp_path, "--model", str(pretrained))


def test_qlora_8bit(pretrained, tmp_path):
    pytest.importorskip("bitsandbytes")
    stdout = run_example("qlora_8bit", tmp_path, "--model", str(pretrained)).stdout
    out = tmp_path / "outputs" / "qlora"
    result = json.loads((out / "eval.json").read_text())
    assert result["bits"] == 8 and "8-bit model:" in stdout
    assert result["eval_loss_after"] < result["eval_loss_before"]
    # merged into fp32 weights, the adapters give (up to the 8-bit rounding) what they gave on the quantized model
    assert abs(result["eval_loss_merged"] - result["eval_loss_after"]) < 0.1
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "merged").iterdir()}
    assert not run_again("qlora_8bit", tmp_path, "--model", str(pretrained))


def test_convert_release(tmp_path):
    stdout = run_example("convert_release", tmp_path).stdout
    out = tmp_path / "outputs" / "convert"
    result = json.loads((out / "roundtrip.json").read_text())
    assert result["tensors_back"] == result["tensors_released"] and result["fp8_tensors"] > 0
    assert result["fp8_tensors_bit_identical"] == result["fp8_tensors"]
    assert result["logits_finite"] and result["mtp_layers"] == 1
    assert stdout.count("deepseek_v3 in the deepseek layout") == 2 and "moe_mtp in the moe_mtp layout" in stdout
    assert json.loads((out / "moe_mtp" / "config.json").read_text())["model_type"] == "moe_mtp"
    assert not run_again("convert_release", tmp_path)  # it used to end in a FileExistsError traceback
    assert run_again("convert_release", tmp_path, "--overwrite")
    assert json.loads((out / "roundtrip.json").read_text()) == result


def test_speculative_generate(pretrained, tmp_path):
    stdout = run_example("speculative_generate", tmp_path, "--model", str(pretrained)).stdout
    result = json.loads((tmp_path / "outputs" / "speculative" / "speculative.json").read_text())
    assert result["identical"] and 0 <= result["acceptance_rate"] <= 1
    assert 1 <= result["tokens_per_step"] <= 2  # one MTP module drafts one token per step
    assert result["plain_tokens_per_s"] > 0 and result["mtp_tokens_per_s"] > 0 and math.isfinite(result["speedup"])
    assert "MTP drafts accepted" in stdout and "speed ratio" in stdout
    assert run_again("speculative_generate", tmp_path, "--model", str(pretrained))  # it writes its result anew


def test_push_to_hub_without_a_token_lists_the_upload(tmp_path, monkeypatch):
    stdout = run_example("push_to_hub", tmp_path).stdout
    out = tmp_path / "outputs" / "hub" / "moe-mtp-tiny"
    files = {p.name for p in out.iterdir()}
    expected = {"model.safetensors", "config.json", "modeling_moe_mtp.py", "configuration_moe_mtp.py", "README.md",
                "tokenizer.json", "loss.png", "expert_load.png"}  # fmt: skip
    assert expected <= files
    assert "not pushed (no --repo-id given)" in stdout and all(name in stdout for name in expected)
    card = (out / "README.md").read_text()
    assert "![loss](loss.png)" in card and "eval_ppl" in card
    assert "auto_map" in json.loads((out / "config.json").read_text())
    assert not run_again("push_to_hub", tmp_path)
    assert run_again("push_to_hub", tmp_path, "--overwrite")  # the model trained the first time is reused
    assert expected <= {p.name for p in out.iterdir()}
