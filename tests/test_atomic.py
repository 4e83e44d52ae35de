"""atomic.py: the one atomic-write helper (files and folders renamed into place once complete)."""

from __future__ import annotations

import os

import pytest

from moe_mtp.atomic import atomic_path, partial_of, swap_in, write_text


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # not yet in place
    assert target.read_text() == "new" and listing(tmp_path) == ["summary.json"]


def test_a_failure_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full (simulated)")
    assert target.read_text() == "old" and listing(tmp_path) == ["metrics.csv"]
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.json") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert listing(tmp_path) == ["metrics.csv"]


def test_a_leftover_of_a_killed_write_is_replaced(tmp_path):
    target = tmp_path / "model"
    stale = partial_of(target)
    stale.mkdir()
    (stale / "half-written").write_text("")
    with atomic_path(target, folder=True) as tmp:
        assert tmp == stale and listing(tmp) == []
        (tmp / "weights").write_text("new")
    assert listing(tmp_path) == ["model"] and listing(target) == ["weights"]


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old-shard").write_text("old")
    with atomic_path(target, folder=True) as tmp:
        (tmp / "weights").write_text("new")
        assert listing(target) == ["old-shard"]
    assert listing(target) == ["weights"] and listing(tmp_path) == ["model"]


def test_a_failed_folder_keeps_the_old_one_and_leaves_no_temporary_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, folder=True) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("failed save")
    assert listing(tmp_path) == ["model"] and (target / "weights").read_text() == "old"


def test_unique_names_let_writers_run_side_by_side(tmp_path):
    target = tmp_path / "m"
    with atomic_path(target, folder=True, unique=True) as first, atomic_path(target, folder=True, unique=True) as two:
        assert first != two and first.name.startswith(".m.") and first.name.endswith(".partial")
        (first / "a").write_text("1")
        (two / "b").write_text("2")
    assert listing(target) == ["a"] and listing(tmp_path) == ["m"]  # the last one to finish wins
    with pytest.raises(ValueError), atomic_path(target, unique=True, active=False):
        pass


def test_a_custom_install_that_fails_leaves_no_temporary_folder(tmp_path):
    target = tmp_path / "m"

    def install(tmp, path):
        (tmp / "moved").rename(tmp_path / "moved")  # part of the work done, then a failure
        raise OSError("rename failed (simulated)")

    with pytest.raises(OSError, match="simulated"), atomic_path(target, folder=True, install=install) as tmp:
        (tmp / "moved").write_text("")
        (tmp / "kept").write_text("")
    assert listing(tmp_path) == ["moved"]


def test_inactive_processes_get_the_path_and_touch_nothing(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_path(target, folder=True) as tmp, atomic_path(target, folder=True, active=False) as other:
        assert other == tmp
        (other / "rank1").write_text("")
    assert listing(target) == ["rank1"]


def test_a_swap_that_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    old, new, aside = tmp_path / "dst", tmp_path / "dst.partial", tmp_path / "dst.replaced"
    old.mkdir()
    new.mkdir()
    real = os.rename

    def rename(a, b):
        if a == new:
            raise OSError("cross-device (simulated)")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        swap_in(new, old, aside)
    assert old.is_dir() and not aside.exists()
    monkeypatch.setattr(os, "rename", real)
    assert swap_in(new, old, aside) and aside.is_dir() and not new.exists()


def test_write_text(tmp_path):
    write_text(tmp_path / "info.json", "{}\n")
    assert (tmp_path / "info.json").read_text() == "{}\n" and listing(tmp_path) == ["info.json"]
