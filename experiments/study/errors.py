"""
The study's errors: what ``scripts/study.py`` reports as one line (``config.run_script`` catches
``errors.ProjectError``) instead of a traceback, and the guard that turns a full disk or a file-size
limit into one of them, naming the file being written (``writing``), and the one way the study runs a
script (``run_step``: a failure is one line naming the script and its log).
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from typing import Dict, Iterator, List, Optional

from guided_diffusion.errors import ProjectError

__all__ = ["StudyError", "LedgerError", "StudyLocked", "StudyWriteError", "StudyStepFailed", "SPACE_ERRNOS",
           "writing", "run_step"]

#: the errnos of "no room for this file": a full disk, a file-size limit (``ulimit -f``), a quota
SPACE_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None)


class StudyError(ProjectError):
    """The base of the study's one-line errors (exit status 1)."""


class LedgerError(StudyError, ValueError):
    """The committed ledger is incomplete or damaged (names the file, the line of a damaged row, and
    what is missing); nothing was rewritten."""


class StudyLocked(StudyError, RuntimeError):
    """Another study is running on the same ``--out`` (its lock file names its pid and host)."""


class StudyWriteError(StudyError, OSError):
    """A file of the study could not be written for want of space (disk full, file-size limit, quota)."""

    def __init__(self, path: Optional[str], cause: OSError):
        code = cause.errno or 0
        name = errno.errorcode.get(code, str(code))
        where = path or "a file of the study"
        super().__init__(code, os.strerror(code), path)  # OSError's fields, for callers that look at them
        self.path = path
        self.message = (f"cannot write {where}: {os.strerror(code)} ({name}); make room (or raise the limit: "
                        "ulimit -f) and rerun the same command: finished runs and complete checkpoints are kept")

    def __str__(self) -> str:
        return self.message


class StudyStepFailed(StudyError, RuntimeError):
    """A script the study runs (training, evaluation, data packing) failed; names it and its log."""


@contextlib.contextmanager
def writing(path: Optional[str] = None) -> Iterator[None]:
    """
    Around a write of ``path``: an ``OSError`` of ``SPACE_ERRNOS`` becomes a ``StudyWriteError``
    naming ``path`` (or, with none given, the file the error names); other errors pass as they are.
    """
    try:
        yield
    except StudyWriteError:
        raise
    except OSError as e:
        if e.errno not in SPACE_ERRNOS:
            raise
        raise StudyWriteError(path or e.filename, e) from None


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines()[-50:] if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_step(argv: List[str], log_path: Optional[str] = None, env: Optional[Dict[str, str]] = None,
             cwd: Optional[str] = None) -> None:
    """
    Run a script of the study (``argv``), its output appended to ``log_path`` (None: to this
    process's own output).

    :raises StudyStepFailed: when it exits non-zero: the script, its exit status and its last line
        (a script's own one-line message, e.g. the file it could not write) and where its log is.
    :raises StudyWriteError: when the log cannot be written for want of space.
    """
    what = " ".join(os.path.basename(a) for a in argv[1:2]) or argv[0]
    if log_path is None:
        proc = subprocess.run(argv, env=env, cwd=cwd)
        if proc.returncode != 0:
            raise StudyStepFailed(f"{what} failed (exit {proc.returncode}); its message is above")
        return
    with writing(log_path):
        with open(log_path, "a") as logf:
            logf.write(f"\n$ {' '.join(argv)}\n")
            logf.flush()
            proc = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if proc.returncode != 0:
        last = _last_line(log_path)
        raise StudyStepFailed(f"{what} failed (exit {proc.returncode})" + (f": {last}" if last else "")
                              + f"; see {log_path}")
