"""Shared test helpers: locate ../shared (beside the repository root) and keep CPU tests small."""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
FIXTURES_DIR = SHARED_DIR / "fixtures" / "upstream"
CIFAR_DIR = SHARED_DIR / "data" / "cifar10-jpeg"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (../shared sits beside the repository only in the "
                    "project's own checkouts and CI; a user's clone does not have it)")
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    """The upstream golden-vector folder, or skip."""
    return _require(FIXTURES_DIR, "upstream golden vectors")


@pytest.fixture
def cifar_dir() -> Path:
    """The CIFAR-10 JPEG zips, or skip."""
    return _require(CIFAR_DIR, "CIFAR-10 JPEG data")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def subprocess_env() -> dict:
    """The environment for a script run in a subprocess: this checkout first on PYTHONPATH, one
    thread, and no launcher or log-dir variables leaking in from the calling shell."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OPENAI_LOGDIR"):
        env.pop(v, None)
    return env


def mpiexec_or_skip() -> str:
    """``mpiexec`` beside the interpreter (the mpich wheel) or on PATH, with mpi4py; else skip."""
    import shutil
    import sys

    exe = Path(sys.executable).parent / "mpiexec"
    if not exe.exists():
        found = shutil.which("mpiexec")
        if not found:
            pytest.skip("no mpiexec beside the Python interpreter or on PATH (pip install mpich)")
        exe = Path(found)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed")
    return str(exe)
