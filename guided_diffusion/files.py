"""
Writing files atomically, at the bottom of the package: the one writer every checkpoint, state
file, config, CSV, samples npz, grid and cache goes through.

A reader (a resume, an evaluator running beside a training, a crashed process's successor) sees
either the old file or the complete new one, never half a file: the data goes to a temporary
file in the same folder, is flushed and fsynced, and is renamed over the target.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, IO, Optional

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write(path: str, write_fn: Callable[[IO[Any]], Any], *, text: bool = False,
                 newline: Optional[str] = None, keep_mode: bool = False) -> None:
    """
    Write ``path`` through ``write_fn(file)`` atomically: temporary file in the same folder,
    flush + fsync, rename, fsync of the folder.

    :param write_fn: writes the content into the open file it is given.
    :param text: give ``write_fn`` a text file (UTF-8, ``newline`` as ``open``) instead of a binary one.
    :param keep_mode: an existing ``path`` keeps its permission bits (else: those ``open`` would give).
    :raises OSError: when the write fails (disk full, file-size limit, read-only folder), naming
        ``path``; also when ``torch.save``'s zip writer reported the failed write as a
        ``RuntimeError`` ("unexpected pos"): the ``OSError`` it hides is raised instead.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = 0o666 & ~_UMASK  # mkstemp makes 0600; give the permissions open() would
    if keep_mode and os.path.exists(path):
        mode = os.stat(path).st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with (os.fdopen(fd, "w", encoding="utf-8", newline=newline) if text else os.fdopen(fd, "wb")) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error_of(e)
        if cause is not None and (cause is not e or cause.filename is None):
            raise OSError(cause.errno, cause.strerror, path) from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _os_error_of(error: BaseException) -> Optional[OSError]:
    """
    The ``OSError`` behind a failed write: ``error`` itself, or the one a ``RuntimeError`` of
    torch's zip writer holds as its context (torch turns ENOSPC/EFBIG of the file object's write
    into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``); else None.
    """
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        if not isinstance(error, RuntimeError):
            return None
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a half-written ``path`` (``atomic_write``)."""
    import torch  # lazy: the orchestrating processes (experiments.study) write JSON here without torch

    atomic_write(path, lambda f: torch.save(obj, f))
