"""Files and folders that appear whole or not at all, and stay whole after a power cut.

    with atomic_path(final) as tmp:      # a hidden sibling; renamed to `final` when the block succeeds
        write(tmp)
    atomic_write_text(path, text)

The content is written under a hidden temporary name beside the target (same filesystem: the rename is
atomic), fsynced, renamed over the target, and the parent folder is fsynced so the rename itself is
durable. A failed block removes its temporary file or folder. Temporary names carry the writer's pid;
`stale_temporaries` finds those of writers that are gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in a folder tree, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
    for root, dirs, _ in os.walk(folder, topdown=False):
        for name in dirs:
            fsync_path(Path(root) / name)
    fsync_path(folder)


def temporary_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove(path: Path) -> None:
    """Remove a file or a folder tree; nothing when it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish(tmp: Path, final: Path, *, replace: bool = True) -> bool:
    """Make a written temporary durable and rename it to `final` (the commit half of `atomic_path`, for
    writers that outlive one block, such as a parquet writer fed row group by row group). An existing
    folder `final` is moved aside first and removed only once the new one is in place; with `replace`
    False an existing `final` is kept (and `tmp` removed). Returns whether `tmp` was published."""
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync_path(tmp)
    if final.exists() and not replace:
        remove(tmp)
        return False
    if tmp.is_dir() and final.exists():
        aside = final.with_name(f".{final.name}.old{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, aside)
        os.replace(tmp, final)
        fsync_path(final.parent)
        remove(aside)
    else:
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final.is_dir() and not replace):
                raise
            remove(tmp)
            return False  # another writer's folder appeared meanwhile: keep theirs
        fsync_path(final.parent)
    return True


@contextlib.contextmanager
def atomic_path(final: str | Path, *, folder: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path (a new empty folder when `folder`) to write; on success it is made durable
    and renamed to `final` (`publish`). An existing `final` is replaced unless `replace` is False, in which
    case the one already there is kept. On failure the temporary is removed and the error propagates."""
    final, tmp = _begin(final, folder)
    try:
        yield tmp
        _commit(tmp, final, folder=folder, replace=replace)
    finally:
        remove(tmp)


def build_atomically(final: str | Path, build, *, folder: bool = False, replace: bool = True) -> bool:
    """`build(tmp)` then publish it as `final`, as `atomic_path` does. Returns whether this call's result
    was published (False: `replace` is False and another writer's `final` was there first)."""
    final, tmp = _begin(final, folder)
    try:
        build(tmp)
        return _commit(tmp, final, folder=folder, replace=replace)
    finally:
        remove(tmp)


def _begin(final: str | Path, folder: bool) -> tuple[Path, Path]:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    if folder:
        tmp.mkdir()
    return final, tmp


def _commit(tmp: Path, final: Path, *, folder: bool, replace: bool) -> bool:
    if folder and final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty folder (made by hand, or as a parent path) holds nothing to keep
    return publish(tmp, final, replace=replace)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def stale_temporaries(folder: Path, prefix: str = "") -> list[Path]:
    """Temporary files and folders under `folder` (starting with `.{prefix}`) whose writer is no longer
    running on this machine: left by a killed run, safe to remove."""
    stale = []
    for path in folder.glob(f".{prefix}*{TMP_MARK}*"):
        pid = path.name.rsplit(TMP_MARK, 1)[-1].split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
