"""Puts the mixins that `make test-transformers` fetched from transformers' sdist on the import path."""

import os
import sys
from pathlib import Path

import pytest

MIXINS = os.environ.get("MOE_MTP_TRANSFORMERS_TESTS")


# Markers the mixins use (transformers registers them in its own repository's conftest).
MARKERS = ("torch_compile_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "is_training_test",
           "is_tensor_parallel_test", "is_expert_parallel_test", "is_fsdp_test", "generate", "torch_export_test",
           "accelerate_tests", "slow")  # fmt: skip


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line("markers", f"{marker}: a marker of transformers' own test suite")


def pytest_ignore_collect(collection_path, config):
    # Plain `pytest` (make test) has no mixins: this folder is then `make test-transformers`' alone.
    if not MIXINS:
        return collection_path.name.startswith("test_")
    return None


if MIXINS:
    if not (Path(MIXINS) / "transformers_tests" / "test_modeling_common.py").exists():
        raise pytest.UsageError(
            f"MOE_MTP_TRANSFORMERS_TESTS={MIXINS} holds no transformers_tests/: run `make test-transformers`"
        )
    sys.path.insert(0, MIXINS)
