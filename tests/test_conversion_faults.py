"""Fault injection: a small valid release, mutated one way per case, run through the CLI.

Every case must exit 2 with one line naming the culprit and no traceback, leave no DST (nor DST.partial), and leave
SRC byte-identical. The `--force` tests check that replacing a DST never loses it: not when the new conversion fails,
not when a deletion or rename fails, and not when the process is killed at any step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from conversion_fixtures import INDEX, edit_shard, snapshot
from safetensors.torch import load_file, save_file

from moe_mtp.conversion import ConversionError, convert, destination
from moe_mtp.conversion.cli import main

SCALE = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"  # a (1, 2) float32 scale
NORM = "model.layers.2.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
EXPERT = "model.layers.2.mlp.experts.5.gate_proj.weight"
DEEP = 200_000  # nesting depth that overflows Python's recursion limit in json


# ---------------------------------------------------------------------------------------------------------------------
# Mutations: each breaks `src` in one way; CASES pairs each with what the error message must name.


def edit_config(src: Path, **fields):
    config = json.loads((src / "config.json").read_text())
    config.update(fields)
    (src / "config.json").write_text(json.dumps(config))


def write_index(src: Path, text: str):
    (src / INDEX).write_text(text)


def edit_index(src: Path, edit):
    index = json.loads((src / INDEX).read_text())
    edit(index["weight_map"])
    write_index(src, json.dumps(index))


def put_tensors(src: Path, key: str, tensors: dict[str, torch.Tensor]):
    """Replace tensor `key` by `tensors` (in the same shard), keeping the index right."""
    path = edit_shard(src, key)
    stored = load_file(path)
    stored.update(tensors)
    save_file(stored, path)
    edit_index(src, lambda weight_map: weight_map.update(dict.fromkeys(tensors, path.name)))


def set_tensor(key: str, value, scale=None):
    extra = {} if scale is None else {key + "_scale_inv": scale}
    return lambda src: put_tensors(src, key, {key: value, **extra})


def set_scale(value):
    return set_tensor(SCALE, value)


def deep_header(src: Path):
    """A shard whose JSON header nests 200k lists deep."""
    header = b'{"x":' + b"[" * DEEP + b"]" * DEEP + b"}"
    header += b" " * (-len(header) % 8)
    (src / "model-00002-of-00003.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


def drop_shard_from_index(src: Path):
    def drop(weight_map):
        for key in [k for k, name in weight_map.items() if name == "model-00002-of-00003.safetensors"]:
            del weight_map[key]

    edit_index(src, drop)


def fp8_e4m3(shape):
    return torch.zeros(shape).to(torch.float8_e4m3fn)


BLOCK_ZERO = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [0, 0]}
CASES = {
    # the index file
    "index empty": (lambda s: write_index(s, ""), INDEX),
    "index weight_map is a list": (lambda s: write_index(s, '{"weight_map": []}'), INDEX),
    "index value not a string": (lambda s: edit_index(s, lambda m: m.update({NORM: 7})), INDEX),
    "index value leaves the folder": (lambda s: edit_index(s, lambda m: m.update({NORM: "../x.safetensors"})), INDEX),
    "index nested too deep": (lambda s: write_index(s, "[" * DEEP + "]" * DEEP), INDEX),
    "index leaves out a shard": (drop_shard_from_index, "does not list model-00002-of-00003.safetensors"),
    # config.json
    "config nested too deep": (lambda s: (s / "config.json").write_text("[" * DEEP + "]" * DEEP), "config.json"),
    "rope_scaling a string": (lambda s: edit_config(s, rope_scaling="yarn"), "rope_scaling"),
    "rope_scaling a number": (lambda s: edit_config(s, rope_scaling=4.0), "rope_scaling"),
    "rope factor a string": (
        lambda s: edit_config(s, rope_scaling={"type": "yarn", "factor": "4"}),
        "rope_scaling.factor",
    ),
    "quantization_config a string": (lambda s: edit_config(s, quantization_config="fp8"), "quantization_config"),
    "weight_block_size zero": (lambda s: edit_config(s, quantization_config=BLOCK_ZERO), "weight_block_size"),
    "architectures a string": (lambda s: edit_config(s, architectures="DeepseekV3ForCausalLM"), "architectures"),
    "num_hidden_layers a string": (lambda s: edit_config(s, num_hidden_layers="3"), "num_hidden_layers"),
    "unknown model_type": (lambda s: edit_config(s, model_type="llama", architectures=["LlamaForCausalLM"]), "llama"),
    # FP8 scales: checked on every path, --dry-run and passthrough into deepseek included
    "scale NaN": (set_scale(torch.tensor([[1.0, float("nan")]])), SCALE),
    "scale Inf": (set_scale(torch.tensor([[float("inf"), 1.0]])), SCALE),
    "scale zero": (set_scale(torch.tensor([[0.0, 1.0]])), SCALE),
    "scale negative": (set_scale(torch.tensor([[1.0, -1.0]])), SCALE),
    "scale integer": (set_scale(torch.ones(1, 2, dtype=torch.int32)), SCALE),
    "scale bf16": (set_scale(torch.ones(1, 2, dtype=torch.bfloat16)), SCALE),
    # tensor dtypes
    "norm stored as I16": (set_tensor(NORM, torch.full((192,), 16256, dtype=torch.int16)), NORM),
    "1-D norm stored as FP8 with a scale": (set_tensor(NORM, fp8_e4m3(192), torch.ones(2)), NORM),
    "embedding stored as FP8": (set_tensor(EMBED, fp8_e4m3((256, 192)), torch.ones(2, 2)), EMBED),
    "projection stored as F8_E5M2": (set_tensor(DOWN, torch.zeros(192, 200).to(torch.float8_e5m2)), DOWN),
    "router bias stored as I64": (set_tensor(BIAS, torch.zeros(8, dtype=torch.int64)), BIAS),
    # structure
    "missing expert": (lambda s: edit_shard(s, EXPERT), EXPERT),
    "header nested too deep": (deep_header, "model-00002-of-00003.safetensors"),
}


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([*map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, culprit: str):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert culprit in lines[0], f"{culprit!r} not named in {lines[0]!r}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", [["--to", "deepseek"], ["--dry-run"]], ids=["to-deepseek", "dry-run"])
def test_every_bad_input_is_a_named_error(src, tmp_path, capsys, case, mode):
    mutate, culprit = CASES[case]
    mutate(src)
    before = snapshot(src)
    dst = tmp_path / "out" / "dst"
    code, err = run_cli([src, dst, *mode], capsys)
    assert_one_line_error(code, err, culprit)
    assert not (tmp_path / "out").exists()  # no DST, no DST.partial, not even the parent the run would create
    assert snapshot(src) == before


def test_bad_scales_fail_into_moe_mtp_and_from_python_too(src, tmp_path):
    set_scale(torch.tensor([[0.0, 1.0]]))(src)
    with pytest.raises(ConversionError, match=rf"'{SCALE}'.*finite and positive"):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("dst", [".", "..", "sub/.."])
def test_dst_without_a_name_is_the_folder_it_names(src, tmp_path, capsys, monkeypatch, dst):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path / "work")
    code, err = run_cli([src, dst], capsys)
    assert_one_line_error(code, err, "already exists")
    assert snapshot(tmp_path / "work") == before


def test_inspect_reports_a_broken_index_by_name(src, capsys):
    write_index(src, '{"weight_map": []}')
    code, err = run_cli(["--inspect", src], capsys)
    assert_one_line_error(code, err, INDEX)


# ---------------------------------------------------------------------------------------------------------------------
# --force never loses the old DST


def strip_markers(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if not Path(name).name.startswith(".moe_mtp_")}


@pytest.fixture(scope="module")
def versions(pristine, tmp_path_factory):
    """Two complete conversions of the same source: A (bf16, the old DST) and B (fp32, what --force writes)."""
    root = tmp_path_factory.mktemp("versions")
    convert(pristine, root / "a", dtype="bf16", progress=False)
    force(pristine, root / "b")
    return snapshot(root / "a"), snapshot(root / "b")


@pytest.fixture(scope="module")
def force_seconds(pristine, tmp_path_factory):
    """How long a forced conversion takes here: random kill times fall inside it."""
    start = time.perf_counter()
    force(pristine, tmp_path_factory.mktemp("timing") / "dst")
    return time.perf_counter() - start


def make_old(src, dst, versions):
    convert(src, dst, dtype="bf16", progress=False)
    assert snapshot(dst) == versions[0]


def force(src, dst, **kwargs):
    return convert(src, dst, dtype="fp32", shard_size="100KB", force=True, progress=False, **kwargs)


def test_failed_force_run_on_a_corrupt_source_keeps_the_old_dst(src, tmp_path, capsys, versions):
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    set_scale(torch.tensor([[float("nan"), 1.0]]))(src)
    code, err = run_cli([src, dst, "--force", "--to", "deepseek"], capsys)
    assert_one_line_error(code, err, SCALE)
    assert snapshot(dst) == versions[0]
    assert not destination.partial_of(dst).exists() and not destination.replaced_of(dst).exists()


def test_failed_move_aside_keeps_the_old_dst(src, tmp_path, monkeypatch, versions):
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    real = os.rename

    def rename(a, b):
        if Path(b) == destination.replaced_of(dst):
            raise PermissionError(13, "Permission denied", str(a))
        real(a, b)

    monkeypatch.setattr(destination.os, "rename", rename)
    with pytest.raises(ConversionError, match="Permission denied"):
        force(src, dst)
    assert snapshot(dst) == versions[0]
    assert not destination.partial_of(dst).exists() and not destination.replaced_of(dst).exists()


def test_failed_swap_puts_the_old_dst_back(src, tmp_path, monkeypatch, versions):
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    real = os.rename

    def rename(a, b):
        if Path(a) == destination.partial_of(dst):
            raise OSError(5, "Input/output error", str(a))
        real(a, b)

    monkeypatch.setattr(destination.os, "rename", rename)
    with pytest.raises(ConversionError, match="Input/output error"):
        force(src, dst)
    assert snapshot(dst) == versions[0]
    assert not destination.partial_of(dst).exists() and not destination.replaced_of(dst).exists()


def test_deletion_that_fails_partway_happens_after_the_new_dst_is_in_place(
    src, tmp_path, monkeypatch, capsys, versions
):
    """The old DST is deleted only once moved aside and replaced: a deletion that fails half-way (an immutable
    file, say) leaves the new DST complete and the rest of the old one at DST.replaced, named in a note; the next
    run into DST finishes the deletion."""
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        files[0].unlink()  # deleted some, then fails on the next one
        raise PermissionError(1, "Operation not permitted", str(files[1]))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    summary = force(src, dst)
    replaced = destination.replaced_of(dst)
    assert strip_markers(snapshot(dst)) == versions[1] and replaced.is_dir()
    assert any(str(replaced) in note and "remove it yourself" in note for note in summary["notes"])
    assert str(replaced) in capsys.readouterr().err
    monkeypatch.setattr(shutil, "rmtree", real)
    force(src, dst)  # the next run cleans up what was left
    assert snapshot(dst) == versions[1] and not replaced.exists()


def test_a_partial_folder_without_the_marker_is_never_deleted(src, tmp_path, versions):
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    mine = destination.partial_of(dst)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"dst\.partial exists but was not left by a moe_mtp conversion"):
        force(src, dst)
    assert snapshot(mine) == {"notes.txt": b"mine"} and snapshot(dst) == versions[0]


def test_an_unexplained_replaced_folder_is_never_deleted(src, tmp_path, versions):
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    mine = destination.replaced_of(dst)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="remove or rename it yourself"):
        force(src, dst)
    assert snapshot(mine) == {"notes.txt": b"mine"} and snapshot(dst) == versions[0]


def test_a_complete_partial_output_of_an_interrupted_run_is_installed(src, tmp_path, capsys, versions):
    """Killed after the commit point, before the rename: the next run moves the finished output into place."""
    dst = tmp_path / "dst"
    force(src, dst)
    partial = destination.partial_of(dst)
    dst.rename(partial)
    (partial / destination.COMPLETE_MARKER).write_text("")
    code, err = run_cli([src, dst], capsys)
    assert code == 2 and f"moved {partial}" in err and "already exists" in err  # recovered, then not forced
    assert snapshot(dst) == versions[1] and not partial.exists()


# Steps of a forced replacement to kill the converter at (see conversion/destination.py), as (function, call):
# SIGKILL right after the n-th call of that function returns (or, for "rmtree", half-way through it).
KILL_POINTS = {
    "between creating DST.partial and marking it": ("marker", 1),
    "writing the 3rd shard": ("write_shard", 3),
    "after the commit": ("rename", 1),
    "after moving the old DST aside": ("rename", 2),
    "after the swap": ("rename", 3),
    "half-way through deleting the old DST": ("rmtree", 1),
    "before the last marker goes": ("unlink", 1),
}


def _kill_child(src: Path, dst: Path, point: tuple[str, int] | None, delay: float | None):
    """In a forked child: run the forced conversion, SIGKILLing itself at `point` or after `delay` seconds."""
    import moe_mtp.conversion.safetensors_io as io

    torch.set_num_threads(1)  # no OpenMP team in the child of a process that may have one
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    calls = {"write_shard": 0, "rename": 0, "rmtree": 0, "unlink": 0}

    def counted(name, real, before=None):
        def wrapper(*args, **kwargs):
            if before is not None and point == (name, calls[name] + 1):
                before(*args)
            result = real(*args, **kwargs)
            calls[name] += 1
            if point == (name, calls[name]):
                die()
            return result

        return wrapper

    def half_delete(path, *args):
        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        for p in files[: len(files) // 2]:
            p.unlink()
        die()

    io.write_shard = counted("write_shard", io.write_shard)
    destination.os.rename = counted("rename", os.rename)
    shutil.rmtree = counted("rmtree", shutil.rmtree, before=half_delete)

    def die_before(method: str, marker: str, at: tuple[str, int]):
        """Path.`method` on the marker file kills the child first, at kill point `at`."""
        real = getattr(Path, method)

        def wrapper(path, *args, **kwargs):
            if path.name == marker and point == at:
                die()
            return real(path, *args, **kwargs)

        setattr(Path, method, wrapper)

    die_before("unlink", destination.COMPLETE_MARKER, ("unlink", 1))
    die_before("write_text", destination.PARTIAL_MARKER, ("marker", 1))
    if delay is not None:
        threading.Timer(delay, die).start()
    force(src, dst)


def run_killed(src: Path, dst: Path, point=None, delay=None) -> bool:
    """Fork a child that converts with --force and is killed; returns whether it was killed (not finished)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            _kill_child(src, dst, point, delay)
        except BaseException:
            code = 3
        os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked converter hung")
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the forked converter failed"
    return False


def complete_checkpoints(dst: Path, versions) -> list[str]:
    """Which complete conversions survive in DST, DST.partial or DST.replaced ('old'/'new' + where)."""
    found = []
    for where in (dst, destination.partial_of(dst), destination.replaced_of(dst)):
        if where.is_dir():
            files = strip_markers(snapshot(where))
            for name, version in zip(("old", "new"), versions, strict=True):
                if files == strip_markers(version):
                    found.append(f"{name} in {where.name}")
    return found


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point", [*KILL_POINTS, "random 1", "random 2", "random 3"])
def test_killed_force_run_always_leaves_one_complete_checkpoint(src, tmp_path, versions, force_seconds, point):
    dst = tmp_path / "dst"
    make_old(src, dst, versions)
    delay = random.Random(point).uniform(0.0, force_seconds) if point.startswith("random") else None
    killed = run_killed(src, dst, KILL_POINTS.get(point), delay)
    assert killed or point.startswith("random")
    found = complete_checkpoints(dst, versions)
    assert found, f"killed {point}: no complete checkpoint left"
    if (dst / destination.COMPLETE_MARKER).exists() or not dst.exists():
        assert any(f.startswith("new") for f in found)  # past the commit point the new one is complete
    else:
        assert strip_markers(snapshot(dst)) in (versions[0], versions[1])
    force(src, dst)  # the next run recovers whatever state it finds, then replaces DST again
    assert snapshot(dst) == versions[1]
    assert not destination.partial_of(dst).exists() and not destination.replaced_of(dst).exists()


def test_existing_dst_error_names_the_callers_spelling(src, tmp_path, capsys):
    """Python callers are told force=True, the command line --force: never both."""
    dst = tmp_path / "dst"
    convert(src, dst, progress=False)
    with pytest.raises(ConversionError, match=r"already exists; pass force=True to replace it$"):
        convert(src, dst, progress=False)
    code, err = run_cli([src, dst], capsys)
    assert_one_line_error(code, err, "already exists; pass --force to replace it")
    assert "force=True" not in err
