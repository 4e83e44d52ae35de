"""Where a conversion writes: `DST.partial` while it runs, then an atomic swap into DST.

A run writes into `DST.partial`, which holds `.moe_mtp_partial` while it is incomplete. Installing it:

1. the marker is renamed to `.moe_mtp_complete`: from here on the new output is complete (the commit point);
2. an existing DST (only with `force`) is renamed aside to `DST.replaced`;
3. `DST.partial` is renamed to DST;
4. `DST.replaced` is deleted, then the marker in DST.

Every step is a rename within one folder except the deletion, which happens once the new DST is in place (steps 2
and 3 are `moe_mtp.atomic.swap_in`, the package's one atomic-write helper). A kill at any point leaves the old DST or
the new one complete, and `recover` (run first by every conversion into DST) reads which from the markers: before
step 1 the partial output is discarded, after it the swap is finished. Only folders a marker identifies as ours are
ever deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import exists, partial_of, remove, replaced_of, swap_in
from .errors import ConversionError, DestinationExistsError

# In DST.partial while a run writes it: a leftover DST.partial is replaced only if it carries this file,
# so a user's own folder that happens to be named like ours is never deleted.
PARTIAL_MARKER = ".moe_mtp_partial"
# Renamed from PARTIAL_MARKER once the output is complete; stays in DST until the replaced DST is deleted.
COMPLETE_MARKER = ".moe_mtp_complete"


def normalize(dst) -> Path:
    """DST as given, or absolute when its name is empty ('.', '..', 'a/..'), which has no sibling to write to."""
    dst = Path(dst)
    if dst.name in ("", ".", ".."):
        dst = Path(os.path.abspath(dst))
    if dst.name == "":
        raise ConversionError(f"{dst}: the destination must be a folder that has a parent, not a file system root")
    return dst


def _marked(folder: Path, marker: str) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / marker).is_file()


def _empty_folder(path: Path) -> bool:
    # a run killed between creating DST.partial and writing its marker leaves it empty: nothing to lose
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def overlap(a: Path, b: Path) -> bool:
    """Whether a and b are the same folder or one contains the other (replacing one would delete the other)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def recover(dst: Path) -> list[str]:
    """Finish or undo what an interrupted run left, judged by the markers alone; returns one note per action.

    Nothing without a marker is touched: an unexplained `DST.replaced` is reported by `check`.
    """
    partial, replaced = partial_of(dst), replaced_of(dst)
    notes = []
    if _marked(dst, COMPLETE_MARKER):  # killed after the swap, before the cleanup
        if exists(replaced):
            try:
                remove(replaced)
            except OSError as exc:
                raise ConversionError(
                    f"{replaced}: the previous {dst.name}, replaced by an earlier --force run, cannot be deleted "
                    f"({exc}); remove it yourself"
                ) from exc
            notes.append(f"removed {replaced}, the previous {dst.name} that an interrupted --force run had replaced")
        (dst / COMPLETE_MARKER).unlink()
    elif _marked(partial, COMPLETE_MARKER):  # killed after the commit point, before the swap was done
        if exists(dst):
            if exists(replaced):
                raise ConversionError(
                    f"{dst}, {partial} (a complete conversion) and {replaced} all exist, which no interrupted run "
                    "leaves: keep the one you want as DST and remove the others"
                )
            remove(partial)  # the old DST was never touched: keep it
            notes.append(f"removed {partial}, the complete output of an interrupted run that had not replaced {dst}")
        else:  # killed before or after moving the old DST aside: finish the swap
            os.rename(partial, dst)
            notes.append(f"moved {partial}, the complete output of an interrupted run, into place as {dst}")
            notes += recover(dst)
    return notes


def check(src: Path, dst: Path, force: bool, dry_run: bool):
    """Refuse a destination that overlaps SRC, exists without `force`, or whose sibling names hold others' files."""
    partial, replaced = partial_of(dst), replaced_of(dst)
    if any(overlap(path, src) for path in (dst, partial, replaced)):
        raise ConversionError(
            f"{dst}: the destination must not be the source folder, inside it, or a folder that contains it"
        )
    if dry_run:
        return
    if exists(dst) and not force:
        raise DestinationExistsError(dst)
    if exists(partial) and not _marked(partial, PARTIAL_MARKER) and not _empty_folder(partial):
        raise ConversionError(
            f"{partial} exists but was not left by a moe_mtp conversion (it has no {PARTIAL_MARKER} file); "
            "remove it yourself or choose another DST"
        )
    if exists(replaced) and exists(dst):
        raise ConversionError(
            f"{replaced} exists, and replacing {dst} would move it there; no interrupted moe_mtp run accounts for it: "
            "remove or rename it yourself"
        )


def missing_parents(path: Path) -> list[Path]:
    """The parent folders of `path` that do not exist yet, innermost first: what creating it would create."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def make_partial(partial: Path):
    """Create DST.partial with its marker, replacing a marked (or empty) leftover of a killed run."""
    remove(partial)  # checked to be ours, or empty, by `check`
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("an unfinished moe_mtp conversion; safe to delete\n")


def remove_empty(folders: list[Path]):
    """Remove the folders a failed run created, innermost first, stopping at one that is not empty (or gone)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def commit(partial: Path):
    """Mark the finished DST.partial complete: past this rename, an interruption finishes the swap."""
    (partial / PARTIAL_MARKER).rename(partial / COMPLETE_MARKER)


def install(partial: Path, dst: Path) -> list[str]:
    """Swap a committed DST.partial into DST (moving an old DST aside and deleting it last); returns notes.

    If DST.partial cannot take DST's place, the old DST is put back and the error raised. If the old DST cannot be
    deleted completely, the new DST is in place anyway and the note says what is left where.
    """
    replaced = replaced_of(dst)
    had_old = swap_in(partial, dst, replaced)  # if DST existed, `check` made sure that `replaced` did not
    if had_old:
        try:
            remove(replaced)
        except OSError as exc:
            return [
                f"{dst} is complete, but the previous one, moved aside to {replaced}, could not be deleted "
                f"completely ({exc}); remove it yourself (the next conversion into {dst} retries)"
            ]
    (dst / COMPLETE_MARKER).unlink()
    return []
