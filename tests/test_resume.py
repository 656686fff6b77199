"""
Exact resume: a run cut with --stop_at and resumed ("auto") is bit-for-bit the uninterrupted run
(model, every EMA, optimizer tensors, logged losses), with CLTS + MDLRC + dropout on; picking the
newest complete checkpoint set; refusing other model flags / checkpoints of other models with
the differences named and nothing written lost; upstream-style --resume_checkpoint.
"""
import csv
import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402
from guided_diffusion import train_util  # noqa: E402
from guided_diffusion.train_util import ResumeError  # noqa: E402

CONFIG = REPO / "configs" / "smoke" / "clts_mdlrc.yaml"  # 8 steps, checkpoints at 4 and 8, log every step
TOTAL = 8


def train(run, *flags):
    return image_train.main(["--config", str(CONFIG), "--log_dir", str(run), *map(str, flags)])


def rows(run):
    with open(Path(run) / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir() if p.is_file()}


def mdlrc(i, total=TOTAL, beta1=0.9, beta1_min=0.5, lr0=1e-3):
    r = max(1.0 - i / total, 0.0)
    b = max(beta1_min, beta1 * r / ((1.0 - beta1) + beta1 * r))
    return b, lr0 * (1.0 - beta1) / (1.0 - b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    straight, split = root / "straight", root / "split"
    train(straight)
    train(split, "--stop_at", 4)
    first_part = rows(split)
    assert sorted(p.name for p in split.glob("model*.pt")) == ["model000004.pt"]
    train(split)  # --resume auto (the default)
    return straight, split, first_part


def test_resumed_run_is_bit_identical(runs):
    straight, split, first_part = runs
    for name in ["model000008.pt", "ema_0.99_000008.pt", "ema_0.9_000008.pt"]:
        a, b = torch.load(straight / name), torch.load(split / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    a, b = torch.load(straight / "opt000008.pt"), torch.load(split / "opt000008.pt")
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    # the weights really moved between the two checkpoints (the comparison is not vacuous)
    m4, m8 = torch.load(split / "model000004.pt"), torch.load(split / "model000008.pt")
    assert not all(torch.equal(m4[k], m8[k]) for k in m4)


def test_second_process_started_at_the_checkpoint(runs):
    straight, split, first_part = runs
    assert [int(r["step"]) for r in first_part] == [0, 1, 2, 3]
    logged = rows(split)
    assert [int(r["step"]) for r in logged] == list(range(TOTAL))  # 0-3, then 4-7 after resuming
    assert "resumed from step 4" in (split / "log.txt").read_text()
    for a, b in zip(rows(straight), logged):
        assert a["loss"] == b["loss"] and a["mse"] == b["mse"] and a["vb"] == b["vb"]  # same draws, same data
    for r in logged:  # the schedules after resuming follow the formulas of the global step
        beta1, lr = mdlrc(int(r["step"]))
        assert float(r["beta1"]) == pytest.approx(beta1, rel=1e-12)
        assert float(r["lr"]) == pytest.approx(lr, rel=1e-12)
    state = torch.load(split / "state000008.pt", weights_only=False)
    assert state["step"] == 8 and state["sampler"]["sampler"] == "clts" and state["sampler"]["step"] == 7
    assert state["config"]["schedule_sampler"] == "clts" and state["momentum_decay"]["total_steps"] == TOTAL
    assert {"torch_cpu", "numpy", "python"} <= set(state["per_rank"][0]["rng"])


def test_nothing_to_do_when_stop_at_is_reached(runs, tmp_path):
    _, split, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(split, run)
    before = snapshot(run)
    train(run, "--stop_at", 4)  # the run is at step 8 already
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k.endswith(".pt")} == {k: v for k, v in before.items() if k.endswith(".pt")}
    assert "nothing to do" in (run / "log.txt").read_text()


def test_auto_picks_the_newest_complete_set(runs, tmp_path):
    _, split, _ = runs
    run = tmp_path / "partial"
    shutil.copytree(split, run)
    assert train_util.list_complete_checkpoints(str(run)) == [4, 8]
    # a set whose state file never got written (crash while saving) and a leftover temp file
    (run / "state000008.pt").unlink()
    (run / ".model000012.pt.abc.tmp").write_bytes(b"half")
    point = train_util.resolve_resume(str(run), "auto", "", [0.99, 0.9])
    assert point.step == 4 and point.state_path.endswith("state000004.pt")
    assert set(point.ema_paths) == {0.99, 0.9}
    assert train_util.resolve_resume(str(run), "none", "", [0.99]) is None
    explicit = train_util.resolve_resume(str(tmp_path), str(run / "model000008.pt"), "", [0.99])
    assert explicit.step == 8 and explicit.state_path is None and explicit.opt_path.endswith("opt000008.pt")
    with pytest.raises(FileNotFoundError, match="--resume_checkpoint"):
        train_util.resolve_resume(str(run), "auto", str(run / "model000099.pt"), [0.99])


def test_resume_with_changed_model_flag_is_refused(runs):
    _, split, _ = runs
    before = snapshot(split)
    with pytest.raises(ResumeError) as info:
        train(split, "--num_channels", 64, "--dropout", 0.2)
    msg = str(info.value)
    assert "--num_channels: checkpoint 32, now 64" in msg and "--dropout: checkpoint 0.1, now 0.2" in msg
    assert "state000008.pt" in msg
    assert snapshot(split) == before


def test_checkpoint_of_another_model_names_keys_and_shapes(runs, tmp_path):
    _, split, _ = runs
    # an upstream-style checkpoint (weights only, no state/config beside it) of a 32-channel model
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(split / "model000008.pt", foreign / "model000008.pt")
    run = tmp_path / "other"
    train(run, "--total_steps", 2, "--save_interval", 2, "--num_channels", 64, "--resume", "none")
    before = snapshot(run)
    with pytest.raises(ResumeError) as info:
        train(run, "--total_steps", 12, "--num_channels", 64, "--resume_checkpoint", foreign / "model000008.pt")
    msg = str(info.value)
    assert "another model configuration" in msg and "shape mismatch" in msg
    assert "input_blocks.0.0.weight: checkpoint (32, 3, 3, 3) vs model (64, 3, 3, 3)" in msg
    assert snapshot(run) == before


def test_upstream_resume_checkpoint_continues_from_its_step(runs, tmp_path):
    _, split, _ = runs
    old = tmp_path / "upstream"
    old.mkdir()
    shutil.copy(split / "model000004.pt", old / "model000004.pt")
    run = tmp_path / "continued"
    train(run, "--resume_checkpoint", old / "model000004.pt")
    assert [int(r["step"]) for r in rows(run)] == [4, 5, 6, 7]
    log = (run / "log.txt").read_text()
    assert "resumed from step 4" in log and "no state file" in log
    assert sorted(p.name for p in run.glob("model*.pt")) == ["model000008.pt"]
