"""Atomic writes: a file or folder is written under a temporary sibling name and renamed into place once complete.

    with atomic_path(output_dir / "summary.json") as tmp:
        tmp.write_text(text)
    with atomic_path(output_dir / "model", folder=True) as tmp:
        model.save_pretrained(tmp)

Inside the block the caller writes `tmp`, a sibling of the target (the same folder, so the final rename stays on one
file system). When the block ends, `tmp` takes the target's place; when it raises (Ctrl-C included), `tmp` is removed
and the target is left as it was. A reader sees the old target or the new one, never a half-written one, and a killed
process leaves at most the temporary sibling, `NAME.partial`, which the next write to the same target removes.

A file replaces the old one in one rename. A folder that exists is first renamed aside (`NAME.replaced`), the new one
renamed in, and the old one deleted only then; if the new one cannot take its place, the old one is put back
(`swap_in`). The converter runs the same swap inside its marker protocol (conversion/destination.py), which also
finishes a swap that a kill interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

PARTIAL = ".partial"
REPLACED = ".replaced"


def partial_of(path: Path) -> Path:
    """The temporary sibling `atomic_path` writes `path` under."""
    return path.with_name(path.name + PARTIAL)


def replaced_of(path: Path) -> Path:
    """Where a folder `replace` swaps out waits until the new one is in place."""
    return path.with_name(path.name + REPLACED)


def exists(path: Path) -> bool:
    """Whether anything is at `path`, a dangling symlink included."""
    return path.exists() or path.is_symlink()


def remove(path: Path) -> None:
    """Deletes a folder with its contents, or a file or symlink; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif exists(path):
        path.unlink()


def swap_in(new: Path, target: Path, aside: Path) -> bool:
    """Renames `new` to `target`. An existing `target` is first renamed to `aside` (which must not exist) and renamed
    back if `new` cannot take its place, the error then raised. Returns whether `aside` holds the old target, for the
    caller to delete."""
    had_old = exists(target)
    try:
        if had_old:
            os.rename(target, aside)
        os.rename(new, target)
    except BaseException:  # Ctrl-C included: put the old target back, whichever rename was interrupted
        if had_old and exists(aside) and not exists(target):
            os.rename(aside, target)
        raise
    return had_old


def replace(new: Path, target: Path) -> None:
    """Puts `new` at `target`: a file in one rename over the old one, a folder through `swap_in` (the old one is
    deleted once the new one is in place, and a leftover `NAME.replaced` of a killed swap first)."""
    if new.is_dir() and not new.is_symlink():
        aside = replaced_of(target)
        remove(aside)
        if swap_in(new, target, aside):
            remove(aside)
    else:
        os.replace(new, target)


@contextlib.contextmanager
def atomic_path(
    path,
    *,
    folder: bool = False,
    unique: bool = False,
    install: Callable[[Path, Path], None] = replace,
    active: bool = True,
) -> Iterator[Path]:
    """Yields the temporary sibling to write `path` under; it takes `path`'s place (`install(tmp, path)`) when the
    block ends, and is removed when the block or the install raises.

    folder: the temporary path is an empty folder, created here; else nothing is created and the caller writes a
    file there (give writers that pick a format by the file's extension their format explicitly).
    unique: a fresh hidden name per call (`.NAME.XXXXXXXX.partial`), for writers that may run side by side; else
    `NAME.partial`, a leftover of which (from a killed process) is removed first.
    install: how the finished temporary path takes `path`'s place; `replace` by default.
    active: False in the processes of a collective save that only write into the folder one process manages: they
    get the same `NAME.partial` path and touch nothing else (the caller synchronizes them).
    """
    path = Path(path)
    if not active:
        if unique:
            raise ValueError("atomic_path(active=False) needs the fixed NAME.partial path: drop unique=True")
        yield partial_of(path)
        return
    if unique:
        prefix, parent = f".{path.name}.", path.parent
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL, dir=parent))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL, dir=parent)
            os.close(handle)
            tmp = Path(name)
    else:
        tmp = partial_of(path)
        remove(tmp)
        if folder:
            tmp.mkdir(parents=True)
    try:
        yield tmp
        install(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(tmp)
        raise


def write_text(path, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


__all__ = ["atomic_path", "exists", "partial_of", "remove", "replace", "replaced_of", "swap_in", "write_text"]
