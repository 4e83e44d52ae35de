"""Hub-ready folders: remote code that loads without moe_mtp, atomic saves, the model card and a mocked push."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_mtp import MoeMtpForCausalLM, hub

# Runs in a Python where `import moe_mtp` fails, so only the folder's own code can build the model.
REMOTE_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class NoMoeMtp(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "moe_mtp":
                raise ImportError("moe_mtp is hidden from this test")
    sys.meta_path.insert(0, NoMoeMtp())
    try:
        import moe_mtp  # noqa: F401
        sys.exit("moe_mtp is importable: the test would not prove anything")
    except ImportError:
        pass
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    folder, data = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = load_file(data)
    with torch.no_grad():
        logits = model(inputs["input_ids"]).logits
    generated = model.generate(inputs["input_ids"], max_new_tokens=6, do_sample=False)
    save_file({"logits": logits, "generated": generated}, data + ".out")
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__}))
    """
)


@pytest.fixture
def model():
    return MoeMtpForCausalLM(tiny_config(num_nextn_predict_layers=1)).eval()


def _run_without_package(tmp_path: Path, folder: Path, input_ids: torch.Tensor) -> dict:
    data = tmp_path / "inputs.safetensors"
    save_file({"input_ids": input_ids}, str(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(data)],
        cwd=tmp_path,  # not the repository root, which is the package itself
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **load_file(str(data) + ".out")}


def test_folder_loads_with_trust_remote_code_without_the_package(tmp_path, model):
    folder = tmp_path / "hub-model"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == hub.AUTO_MAP
    assert "from .configuration_moe_mtp import" in (folder / "modeling_moe_mtp.py").read_text()

    input_ids = torch.randint(3, 128, (2, 12))
    remote = _run_without_package(tmp_path, folder, input_ids)
    assert remote["class"].startswith("transformers_modules.")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(input_ids).logits, rtol=0, atol=1e-5)
    expected = model.generate(input_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(remote["generated"], expected)


def test_folder_loads_through_registered_classes_with_the_package(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is MoeMtpForCausalLM
    input_ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-5)


def test_register_for_auto_class_then_save(tmp_path, model):
    """transformers' own code copying cannot follow the package's `from ..configuration` import; ours can."""
    MoeMtpForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        MoeMtpForCausalLM._auto_class = None
    assert {"modeling_moe_mtp.py", "configuration_moe_mtp.py", "model.safetensors"} <= set(os.listdir(tmp_path / "m"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_save_leaves_nothing_and_keeps_the_old_folder(tmp_path, model, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    def broken_write(*args, **kwargs):
        raise OSError("disk full (simulated)")

    target = tmp_path / "m"
    model.save_pretrained(target)
    before = _snapshot(target)
    monkeypatch.setattr(modeling_utils, "safe_save_file", broken_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no new folder, no staging folder


def test_resave_replaces_stale_shards_and_keeps_other_files(tmp_path, model):
    target = tmp_path / "m"
    model.save_pretrained(target, max_shard_size="100KB")
    assert (target / "model.safetensors.index.json").is_file()
    (target / "tokenizer.json").write_text("{}")
    model.save_pretrained(target)
    names = set(os.listdir(target))
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")]
    assert type(MoeMtpForCausalLM.from_pretrained(target)) is MoeMtpForCausalLM


def test_model_card_counts_and_training_section(tmp_path, model):
    target = tmp_path / "m"
    target.mkdir()
    (target / "loss.png").write_bytes(b"\x89PNG fake")
    summary = {"name": "tiny-moe", "data": "pydoc topics", "metrics": {"eval_loss": 2.5}, "plots": ["loss.png"]}
    (target / hub.TRAINING_SUMMARY).write_text(json.dumps(summary))
    model.save_pretrained(target)
    card = (target / "README.md").read_text()
    counts = hub.parameter_counts(model)
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    config = model.config
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    assert counts["routed_expert_params"] == 2 * config.n_routed_experts * expert  # two MoE layers in the main model
    assert counts["active_params"] == counts["main_params"] - 2 * (config.n_routed_experts - 2) * expert
    assert f"{counts['total_params']:,}" in card and "# tiny-moe" in card
    assert "eval_loss | 2.5" in card and "![loss](loss.png)" in card


def test_user_readme_is_kept(tmp_path, model):
    target = tmp_path / "m"
    target.mkdir()
    (target / "README.md").write_text("my own card")
    model.save_pretrained(target)
    assert (target / "README.md").read_text() == "my own card"


def test_push_to_hub_uploads_the_bundle(tmp_path, model, monkeypatch):
    from huggingface_hub import HfApi

    captured = {}

    class Repo:
        repo_id = "someone/tiny-moe"

    def create_commit(self, repo_id, operations, **kwargs):
        captured["repo_id"] = repo_id
        captured["files"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model.push_to_hub("someone/tiny-moe", token="not-a-real-token")
    files = captured["files"]
    assert captured["repo_id"] == "someone/tiny-moe"
    assert set(files) == {
        "README.md", "config.json", "generation_config.json", "model.safetensors", *hub.remote_code_files(),
    }  # fmt: skip
    assert {"modeling_moe_mtp.py", "configuration_moe_mtp.py", "speculative.py", "balancing.py"} <= set(files)
    card = files["README.md"].decode()
    assert hub.CARD_MARKER in card and "active per token" in card
    assert json.loads(files["config.json"])["auto_map"] == hub.AUTO_MAP


def test_bundle_refuses_package_imports_it_cannot_carry(monkeypatch, tmp_path):
    modeling = tmp_path / "modeling"
    modeling.mkdir()
    (modeling / "modeling_moe_mtp.py").write_text("from ..conversion import convert\n")
    monkeypatch.setattr(hub, "MODELING_DIR", modeling)
    with pytest.raises(RuntimeError, match="line 1 imports from the moe_mtp package"):
        hub.remote_code_files()
