"""Fetch the test mixins of the installed transformers release, for `make test-transformers`.

transformers publishes its common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`, the
parallelism mixins) only in its source distribution. This script downloads the sdist of exactly the installed
version with pip, extracts its top-level `tests/*.py` into DEST/transformers_tests/ (a package, so the mixins'
relative imports work), and writes the modules those files import but the sdist does not ship: stand-ins for three
of them, and our own launcher for the parallelism mixins:

- `generation/test_utils.py`: `GenerationTesterMixin`, an empty class. The generation tests need model tests from
  transformers' repository that the sdist leaves out; moe-mtp's own suite covers `generate`
  (tests/test_modeling_speculative.py, tests/test_modeling_moe_mtp.py).
- `exporters/test_export.py`: `ExportTesterMixin`, an empty class (torch.export tests, likewise not shipped).
- `utils/test_configuration_utils.py`: `config_common_kwargs`, non-default values for `PreTrainedConfig`'s common
  arguments, which `ConfigTester.check_config_arguments_init` sets and reads back.
- `distributed_testing_utils.py`: a copy of distributed_testing_utils.py next to this script, the process launcher
  (`run_distributed`, `_start_rank_processes` and device helpers) that the tensor-, expert- and FSDP-parallel mixins
  import.

Usage: python tests/transformers_common/prepare.py DEST   (prints DEST; downloads nothing when DEST is already
complete, but always rewrites the files above, so that edits to them reach an existing DEST)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
COMPLETE = ".complete"
# Imported by the parallelism mixins as `.distributed_testing_utils`; not in the sdist.
LAUNCHER = Path(__file__).with_name("distributed_testing_utils.py")

STUBS = {
    "generation/test_utils.py": '''"""Stand-in written by moe-mtp: the sdist does not ship transformers' generation tests."""


class GenerationTesterMixin:
    """Empty: generation is tested by moe-mtp's own suite."""
''',
    "exporters/test_export.py": '''"""Stand-in written by moe-mtp: the sdist does not ship transformers' export tests."""


class ExportTesterMixin:
    """Empty: torch.export is not part of moe-mtp's promises."""
''',
    "utils/test_configuration_utils.py": '''"""Stand-in written by moe-mtp: the sdist does not ship this module.

Non-default values of PreTrainedConfig's common arguments; ConfigTester sets them and checks they read back.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": True,
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "bos_token_id": 7,
    "eos_token_id": 8,
    "pad_token_id": 9,
    "sep_token_id": 10,
}
''',
}


def write_own_files(package: Path) -> None:
    """The modules moe-mtp supplies to the extracted package (stand-ins and the distributed launcher)."""
    files = dict(STUBS)
    files[LAUNCHER.name] = LAUNCHER.read_text()
    for relative, text in files.items():
        path = package / relative
        if path.parent != package:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").write_text("")
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def prepare(dest: Path) -> Path:
    package = dest / PACKAGE
    if (dest / COMPLETE).exists():
        write_own_files(package)
        return dest
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"transformers=={version}", "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        staging = Path(tmp) / PACKAGE
        staging.mkdir()
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                # Only the top-level mixin files: tests/<name>.py
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (staging / parts[2]).write_bytes(archive.extractfile(member).read())
        if not (staging / "test_modeling_common.py").exists():
            raise SystemExit(f"prepare.py: {sdist.name} has no tests/test_modeling_common.py; cannot run the mixins")
        (staging / "__init__.py").write_text("")
        write_own_files(staging)
        if package.exists():
            shutil.rmtree(package)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), package)
    (dest / COMPLETE).write_text(version + "\n")
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(prepare(Path(sys.argv[1])))
