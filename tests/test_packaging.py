"""The built wheel installs `moe_mtp` (and only it) and works outside the repository.

The repository root *is* the `moe_mtp` package, so a packaging slip would put generic top-level modules such as
`modeling` into site-packages, or make imports only work from the checkout. These tests build a wheel from a copy of
the working tree, install it into a fresh venv and import it from an unrelated directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("configuration", "modeling", "conversion", "training")
# Not part of the source a wheel is built from; `shared` would only be large reference data.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "outputs",
    "*.partial", "shared",
)  # fmt: skip

CHECK_SCRIPT = """
import importlib.util, json
import moe_mtp
from moe_mtp.configuration import MoeMtpConfig
from transformers import AutoConfig

config = AutoConfig.for_model("moe_mtp")
result = {
    "file": moe_mtp.__file__,
    "training_modules": [m for m in ("moe_mtp.train", "moe_mtp.training", "moe_mtp.training.loop",
                                     "moe_mtp.training.mtp_align", "moe_mtp.modeling.balancing")
                         if importlib.util.find_spec(m)],
    "config_is_moe_mtp": isinstance(config, MoeMtpConfig),
    "stray": [name for name in ("modeling", "configuration", "conversion", "training") if importlib.util.find_spec(name)],
}
try:
    import modeling  # noqa: F401
    result["import_modeling"] = "succeeded"
except ImportError:
    result["import_modeling"] = "failed"
print(json.dumps(result))
"""


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    # Tails only: transformers' errors can list every known model type.
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_env() -> dict[str, str]:
    # PYTHONPATH & co. could put the checkout on sys.path and hide a broken install.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, source copy). Built from a copy so no stale `build/` of the checkout can leak into the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE, symlinks=True)
    out = root / "dist"
    # No isolation: the build backend is already in the dev venv, and building must not need the network.
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, src],
        env=_clean_env(),
    )
    (wheel,) = out.glob("moe_mtp-*.whl")
    return wheel, src


def test_wheel_holds_only_moe_mtp(built):
    wheel, src = built
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    stray = sorted(t for t in top_level if t != "moe_mtp" and not re.fullmatch(r"moe_mtp-[^/]+\.dist-info", t))
    assert not stray, f"wheel has top-level entries besides moe_mtp/: {stray}"

    # Every source module of the package must have made it in, under moe_mtp/.
    expected = {f"moe_mtp/{p.name}" for p in src.glob("*.py")}
    for sub in SUBPACKAGES:
        expected |= {f"moe_mtp/{p.relative_to(src).as_posix()}" for p in (src / sub).glob("*.py")}
    missing = sorted(expected - set(names))
    assert not missing, f"wheel lacks source modules: {missing}"
    assert "moe_mtp/__init__.py" in names

    # Tests, examples and benchmarks are repository content, not package content.
    leaked = sorted(n for n in names if re.match(r"moe_mtp/(tests|examples|benchmarks|docs)/", n))
    assert not leaked, f"wheel packages non-library files: {leaked}"


def test_wheel_installs_into_fresh_venv(built, tmp_path):
    wheel, _ = built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"

    # Install first, while the fresh venv sees nothing else: otherwise pip would find the dev venv's editable
    # moe-mtp through the .pth below and try to uninstall it.
    env = _clean_env()
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], env=env)

    # Reuse the dev venv's dependencies (torch, transformers) instead of downloading them. A path listed in a .pth
    # goes on sys.path but its own .pth files are not processed, so the dev venv's `__editable__*.pth` finder for
    # moe_mtp stays inactive; and the fresh site-packages comes first on sys.path anyway.
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    dep_dirs = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (purelib / "zz_dev_venv_deps.pth").write_text("".join(f"{d}\n" for d in dep_dirs))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run([python, "-c", CHECK_SCRIPT], cwd=elsewhere, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    module_file = Path(result["file"]).resolve()
    assert module_file.is_relative_to(venv.resolve()), f"moe_mtp imported from {module_file}, not the fresh venv"
    assert not module_file.is_relative_to(REPO), "moe_mtp was imported from the checkout"
    assert result["config_is_moe_mtp"], "AutoConfig.for_model('moe_mtp') did not build a MoeMtpConfig"
    assert result["stray"] == [], f"generic top-level modules importable: {result['stray']}"
    assert result["import_modeling"] == "failed"
    assert result["training_modules"] == [
        "moe_mtp.train", "moe_mtp.training", "moe_mtp.training.loop", "moe_mtp.training.mtp_align",
        "moe_mtp.modeling.balancing",
    ]  # fmt: skip
    assert (venv / "bin" / "moe-mtp-convert").exists(), "console script moe-mtp-convert was not installed"


def test_oldest_pins_are_the_lower_bounds_of_pyproject():
    """`make test-oldest` tests the lowest versions pyproject.toml allows, so the two lists must not drift apart."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lower_bounds = {}
    for line in dependencies:
        requirement = Requirement(line)
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                lower_bounds[requirement.name] = specifier.version
    pins = {}
    for line in (REPO / ".ci" / "oldest-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            pins[requirement.name] = specifier.version
    assert set(pins) == {"transformers", "peft", "accelerate"}
    for name, version in pins.items():
        assert name in lower_bounds, (
            f"pyproject.toml gives {name} no lower bound; .ci/oldest-versions.txt pins {version}"
        )
        assert Version(lower_bounds[name]) == Version(version), (name, lower_bounds[name], version)
