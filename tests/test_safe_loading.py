"""
Files users exchange are read without running code: state files, model/EMA/optimizer files and
the CIFAR-10 python batches (issue "Run folders you can trust", safe loading).
"""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "datasets"))

import cifar10  # noqa: E402  (scripts/datasets/cifar10.py)
from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.checkpoint import load_state_dict_file  # noqa: E402
from guided_diffusion.train_util import ResumeError, load_state_file  # noqa: E402


class Evil:
    """Unpickling this creates a folder: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_plain_pickle_would_run_the_code(tmp_path):
    # what an unrestricted load does (the failure the safe loaders prevent)
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


def test_crafted_state_file_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "state000010.pt"
    torch.save({"step": 10, "payload": Evil(marker)}, path)
    with pytest.raises(ResumeError, match="refused to load the state file .*state000010.pt"):
        load_state_file(str(path))
    assert not marker.exists()


def test_new_state_files_load_with_weights_only(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import image_train

    run = tmp_path / "run"
    image_train.main(["--config", str(REPO / "configs/smoke/tiny.yaml"), "--log_dir", str(run), "--total_steps", "1",
                      "--save_interval", "1"])
    state = torch.load(run / "state000001.pt", weights_only=True)  # no allowlist needed
    assert state["step"] == 1


def test_legacy_state_file_with_numpy_rng_still_loads(tmp_path):
    path = tmp_path / "state000001.pt"
    torch.save({"step": 1, "per_rank": [{"rng": {"numpy": {"keys": np.arange(624, dtype=np.uint32)}}}]}, path)
    state = load_state_file(str(path))
    assert np.array_equal(state["per_rank"][0]["rng"]["numpy"]["keys"], np.arange(624))


@pytest.mark.parametrize("loader", ["analysis", "dist_util"])
def test_crafted_model_file_is_refused(tmp_path, loader):
    marker = tmp_path / "ran"
    path = tmp_path / "model000010.pt"
    torch.save({"weight": torch.zeros(2), "x": Evil(marker)}, path)
    with pytest.raises(Exception) as info:
        if loader == "analysis":
            load_state_dict_file(path)
        else:
            dist_util.load_state_dict(str(path))
    assert not marker.exists()
    assert "weights" in str(info.value).lower() or "refused" in str(info.value).lower() or "unpickl" in str(info.value).lower()


def test_crafted_cifar_batch_is_refused(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps({b"data": Evil(marker), b"labels": [0]})
    with pytest.raises(ValueError, match="refused"):
        cifar10._unpickle_batch(data, "data_batch_1")
    assert not marker.exists()


def test_real_cifar_batch_layout_still_reads():
    raw = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    data = pickle.dumps({b"data": raw, b"labels": [3, 7], b"batch_label": b"x"}, protocol=2)
    images, labels = cifar10._unpickle_batch(data, "data_batch_1")
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 7]
