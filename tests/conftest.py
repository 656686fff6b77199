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
