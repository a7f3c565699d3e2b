"""Writing a folder whole or not at all.

Every command and function that writes a folder (``surgery.io.save``, ``surgery prune``)
writes into a fresh temporary folder beside the target and renames it into place at the end,
so a crash, an error or Ctrl-C never leaves a half-written folder, and a folder a reader is
using is replaced in one rename, never edited file by file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from surgery.errors import StorageError


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new empty folder beside ``out``. When the block succeeds, its files are
    flushed to disk, given the permissions a plain ``mkdir``/``open`` would (the umask), and
    the folder is renamed to ``out``; an existing ``out`` (only with ``overwrite``) is moved
    aside first and removed once the new one is in place. On any failure the temporary folder
    and the parents this call created are removed and an existing ``out`` is left as it was."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise StorageError(f"{out} exists and is not a folder.")
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; pass overwrite=True (--overwrite) to "
                           "replace it, or write somewhere else.")
    created = [p for p in out.parents if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        _finish(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _finish(tmp: Path) -> None:
    """Flush every file to disk and set the permissions the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, put back if the
    rename fails, and removed only once the new folder is in place."""
    old = None
    if out.exists():
        old = tmp.with_name(tmp.name.removesuffix(".partial") + ".old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, flushed,
    then renamed over it (readers see the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
