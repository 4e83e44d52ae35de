"""Tiny in-memory configs and the reference configs shared by the tests."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from moe_mtp import MoeMtpConfig
from moe_mtp.configuration import preset

# The routing variants of the `tiny` preset (moe_mtp.configuration.presets), as overrides.
ROUTING = {
    # DeepSeek-V3 (the preset's own): sigmoid scores, bias-corrected group-limited choice, query compression.
    "v3": {},
    # DeepSeek-V2-Lite: softmax, greedy top-k, full q_proj.
    "v2_lite": dict(
        q_lora_rank=None, n_group=1, topk_group=1, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0,
    ),
    # DeepSeek-V2: softmax with device-limited (group) routing.
    "group_limited_greedy": dict(
        q_lora_rank=None, n_group=4, topk_group=2, scoring_func="softmax", topk_method="group_limited_greedy",
        norm_topk_prob=False, routed_scaling_factor=1.5,
    ),
}  # fmt: skip


# Public facts: the released config.json values of DeepSeek-V3 and V2-Lite (also in the shared/ reference folder).
REFERENCE = Path(__file__).resolve().parent / "data"


def reference_config(name: str) -> dict:
    """A released config.json shipped under tests/data."""
    return json.loads((REFERENCE / name).read_text())


def tiny_config(kind: str = "v3", **overrides) -> MoeMtpConfig:
    """The `tiny` preset with routing `kind` (ROUTING) and `overrides`."""
    return preset("tiny", **{**ROUTING[kind], **overrides})


def randomize_router_bias(model, scale: float = 0.05):
    """Non-zero balancing biases, so tests see them steer the expert choice."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_((torch.rand(buffer.shape, generator=generator) - 0.5) * 2 * scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small released (FP8) checkpoint, built once per test module; tests mutate copies (`src`)."""
    from conversion_fixtures import tiny_config as released_config
    from conversion_fixtures import write_released

    folder, _ = write_released(tmp_path_factory.mktemp("pristine") / "src", released_config())
    return folder


@pytest.fixture
def src(pristine, tmp_path):
    """A fresh copy of `pristine` that a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


# Trained tokenizers and token stores go to a folder of this test session, not ~/.cache/moe_mtp. Set when conftest is
# imported: test modules copy os.environ for their subprocesses when they are imported, before any fixture runs.
# Removed at exit rather than by a fixture, which `--collect-only` never runs.
TOKEN_CACHE = tempfile.mkdtemp(prefix="moe_mtp_cache_")
os.environ["MOE_MTP_CACHE"] = TOKEN_CACHE
atexit.register(shutil.rmtree, TOKEN_CACHE, ignore_errors=True)


def write_corpus(path: Path, documents: int = 600, skip: int = 0) -> Path:
    """A .txt corpus of paragraphs of the stdlib's pydoc topics: one document per paragraph (blank lines between)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    paragraphs = [p for p in text.split("\n\n") if p.strip()][skip : skip + documents]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


# The longest files first (measured with --durations, 2026-12-07): `make test` runs two xdist workers, one file each at
# a time, and a long file started last would leave the other worker idle at the end.
LONGEST_FILES = (
    "test_train.py",
    "test_examples.py",
    "test_quickstart.py",
    "test_distributed.py",
    "test_benchmarks_gpu_script.py",
    "test_readme.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
