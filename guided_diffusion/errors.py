"""
The project's errors, at the bottom of the package: every error a script reports as a message
(instead of a traceback) derives from ``ProjectError``, which says its own exit status, so
``config.run_script`` catches one base class.

- ``ProjectError``: the base (``exit_status`` 1: the run went wrong; 2: bad input).
- ``CheckpointWriteError``: a checkpoint file could not be written (status 1).
- ``TrainingInterrupted``: Ctrl-C / SIGTERM ended a training cleanly after a step (status 128 + signal).

Errors that are also bad input keep their standard base (``ValueError``), so callers that catch
``ValueError`` still catch them.
"""
from __future__ import annotations

__all__ = ["ProjectError", "CheckpointWriteError", "TrainingInterrupted"]


class ProjectError(Exception):
    """
    An error a script ends with as a one-line message and ``exit_status`` (no traceback).

    Subclasses set ``exit_status`` (1: a run that went wrong, 2: bad input, as argparse) and
    ``label`` (the word after the script's name: ``error:``, or nothing for a clean stop).
    """

    exit_status: int = 1
    label: str = "error: "

    def script_message(self, prog: str) -> str:
        """The line ``run_script`` prints: ``<prog>: error: <message>``."""
        return f"{prog}: {self.label}{self}"


class CheckpointWriteError(ProjectError, RuntimeError):
    """A checkpoint file could not be written (disk full, read-only folder); names the file and
    the newest complete set, which is left intact."""


class TrainingInterrupted(ProjectError, RuntimeError):
    """Ctrl-C or SIGTERM ended the run cleanly after a step; the message says how to resume."""

    label = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:  # type: ignore[override]
        # the shell's convention for a process ended by a signal
        return 128 + self.signum
