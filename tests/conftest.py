"""Shared test helpers: locate ../shared (beside the repository root) and keep CPU tests small."""
import re
from pathlib import Path
from typing import List

import numpy as np
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


# ----------------------------------------------------------------------------- shared fixtures


from evaluations import evaluator as ev  # noqa: E402
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402

POOL, SPATIAL, LOGITS = ev.POOL, ev.SPATIAL_FEATURE, ev.LOGITS


class TinyFeatures(FeatureExtractorBase):
    """Deterministic 16-d 'pool', 9-d 'spatial' and 10-d 'logits' features of uint8 images."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, list(features_list))
        self.proj = torch.from_numpy(np.random.default_rng(1).normal(size=(16, 10)).astype(np.float32))

    @staticmethod
    def get_provided_features_list():
        return (POOL, SPATIAL, LOGITS)

    def forward(self, x):
        h = x.float() / 255
        pooled = torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)  # 12
        pool = torch.cat([pooled, h.std(dim=(2, 3)), h.mean(dim=(1, 2, 3))[:, None]], dim=1)  # 16
        out = {POOL: pool, SPATIAL: torch.nn.functional.adaptive_avg_pool2d(h[:, :1], 3).flatten(1),
               LOGITS: pool @ self.proj}
        return tuple(out[f] for f in self.features_list)


@pytest.fixture
def fake_extractor(monkeypatch, tmp_path):
    """Replace the Inception network by TinyFeatures for tests of the plumbing; returns it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default cache: never the user's
    feats = (POOL, SPATIAL, LOGITS)
    ext = ev.Extractor("fake-net", "none", TinyFeatures("fake-net", feats), feats, torch.device("cpu"))
    monkeypatch.setattr(ev, "get_extractor", lambda *a, **k: ext)
    return ext


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny run: checkpoints at 1 and 2, EMA rates 0.99 and 0.9."""
    from guided_diffusion.training import train

    run = tmp_path_factory.mktemp("tiny")
    train(["--config", str(REPO_ROOT / "configs" / "smoke" / "tiny.yaml"), "--log_dir", str(run),
           "--total_steps", "2", "--save_interval", "1"])
    return run


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]*\d)")


def quoted_numbers(text: str) -> List[str]:
    """The numbers a text quotes (thousands separators dropped; digits glued to letters, as in 16x16, skipped)."""
    return _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))


def hand_written_block(doc: Path, name: str) -> str:
    """The text between ``<!-- name -->`` and ``<!-- /name -->`` of ``doc`` ("" when there is none)."""
    text = doc.read_text()
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin not in text:
        return ""
    return text[text.index(begin) + len(begin):text.index(end)]


def assert_quotes_only(reading: str, source: str, what: str) -> None:
    """Every number of a hand-written ``reading`` is one of ``source``'s (generated from committed files)."""
    quoted = quoted_numbers(reading)
    assert quoted, "the reading quotes no number"
    have = set(quoted_numbers(source))
    missing = sorted({q for q in quoted if q not in have})
    assert not missing, f"numbers in the reading that {what} does not have: {missing}"
