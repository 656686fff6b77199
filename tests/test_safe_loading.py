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


# issue 31 item 5 (4): a file safe loading cannot read is named and called what it is; torch's advice
# to retry with weights_only=False (which runs the file's code) is never passed on
def _load_with(loader, path):
    from guided_diffusion.checkpoint import load_weights

    return {"state_dict_file": load_state_dict_file, "dist_util": dist_util.load_state_dict,
            "weights": load_weights, "state_file": load_state_file}[loader](str(path))


LOADERS = ["state_dict_file", "dist_util", "weights", "state_file"]
NO_UNSAFE_ADVICE = ("weights_only", "safe_globals", "trusted source", "allowlist")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("text", [b"not a checkpoint\n", b'{"a": 1}', b"this is text", b""])
def test_a_text_file_named_pt_is_not_a_checkpoint(tmp_path, loader, text):
    path = tmp_path / "model000010.pt"
    path.write_bytes(text)
    with pytest.raises(ValueError) as info:  # ResumeError for the state file is a ValueError too
        _load_with(loader, path)
    msg = str(info.value)
    assert str(path) in msg and "not a valid" in msg and "torch.save" in msg
    assert not any(a in msg.lower() for a in NO_UNSAFE_ADVICE), msg
    assert info.value.__cause__ is None and info.value.__context__ is None  # torch's text is not chained either


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", ["torch_save", "plain_pickle"])
def test_a_refused_pickle_names_the_file_without_unsafe_advice(tmp_path, loader, kind):
    marker = tmp_path / "ran"
    path = tmp_path / "state000010.pt"
    if kind == "torch_save":
        torch.save({"step": 10, "payload": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"step": 10, "payload": Evil(marker)}, protocol=2))
    with pytest.raises(ValueError) as info:
        _load_with(loader, path)
    msg = str(info.value)
    assert not marker.exists()
    assert str(path) in msg and ("refused" in msg or "not a valid" in msg)
    assert not any(a in msg.lower() for a in NO_UNSAFE_ADVICE), msg
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_sample_script_names_a_text_checkpoint(tmp_path, capsys):
    import subprocess

    path = tmp_path / "model.pt"
    path.write_text("not a checkpoint\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "image_sample.py"), "--model_path", str(path),
                           "--num_samples", "1", "--out_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert f"{path} is not a valid checkpoint" in proc.stderr
    assert "weights_only" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_an_unreadable_state_file_is_a_resume_error_naming_it(tmp_path):
    """An OSError reading a state file (here: a folder in its place) is a ResumeError, so the resume
    scans (checkpoint.saved_config) skip it instead of stopping."""
    from guided_diffusion.checkpoint import ResumeError, load_state_file

    bad = tmp_path / "state000004.pt"
    bad.mkdir()
    with pytest.raises(ResumeError, match="state000004.pt"):
        load_state_file(str(bad))
