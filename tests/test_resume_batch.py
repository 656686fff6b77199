"""
A resume over another number of processes keeps the run's global batch (issue 31 item 4): the
per-process batch follows when the global batch divides by the new world size (with a note
naming both world sizes and the per-process batch); otherwise it is refused with the numbers,
unless ``--allow_change global_batch_size`` takes the flags' global batch. ``samples`` counts the
images actually seen: the sum of every step's global batch, also across a resume that changed it.

The rule is tested on ``run_folder.resume_batch`` directly, a changed world size end to end in
one process on a checkpoint whose state file says it was written by two, and once for real
with ``mpiexec -n 2``.
"""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import mpiexec_or_skip, subprocess_env

from guided_diffusion.run_folder import RunFolderError, resume_batch, run_global_batch
from guided_diffusion.train_state import samples_seen

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "smoke" / "tiny.yaml"
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402


def state(world, global_batch, per_rank=None):
    return {"world_size": world, "global_batch": global_batch,
            "config": {"batch_size": per_rank or global_batch // world, "global_batch_size": 0}}


def flags(batch_size, global_batch_size=0):
    return {"batch_size": batch_size, "global_batch_size": global_batch_size}


# ------------------------------------------------------------------------------ the decision


def test_another_world_size_keeps_a_global_batch_that_divides():
    # one process with --batch_size 4 (global 4), resumed by two with the same flags: not 8
    b = resume_batch(state(1, 4), flags(4), world_size=2)
    assert (b.per_rank, b.global_batch, b.change) == (2, 4, {})
    assert "2 process(es) (the checkpoint was written by 1)" in b.note
    assert "global batch 4 is kept, 2 per process (was 4" in b.note and "would have made it 8" in b.note
    # and back: two processes of 2 resumed by one
    b = resume_batch(state(2, 4), flags(2), world_size=1)
    assert (b.per_rank, b.global_batch) == (4, 4) and "written by 2" in b.note
    # flags that already ask for the run's global batch: kept, the note still says so
    b = resume_batch(state(1, 4), flags(2, global_batch_size=4), world_size=2)
    assert (b.per_rank, b.global_batch) == (2, 4) and "kept, 2 per process" in b.note


def test_same_world_size_and_batch_says_nothing():
    b = resume_batch(state(2, 8), flags(4), world_size=2)
    assert b == (4, 8, "", {})
    assert resume_batch(None, flags(4), world_size=2) is None  # no state file: upstream's format
    assert resume_batch({"config": {"batch_size": 4}}, flags(4), world_size=2) is None  # no world size recorded


def test_a_global_batch_that_does_not_divide_is_refused_with_the_numbers():
    with pytest.raises(RunFolderError) as info:
        resume_batch(state(1, 6), flags(6), world_size=4)
    msg = str(info.value)
    assert "written by 1 process(es) with a global batch of 6 (6 per process)" in msg
    assert "--batch_size 6 x 4 process(es) asks for 24 with 4 process(es) now" in msg
    assert "6 does not divide over 4 processes" in msg
    assert "a number of processes that divides it (1, 2, 3, 6)" in msg
    assert "--allow_change global_batch_size" in msg and "--global_batch_size, a multiple of 4: e.g. 4 or 8" in msg


def test_allow_change_global_batch_size_takes_the_flags_batch():
    b = resume_batch(state(1, 6), flags(6), world_size=4, allow_change=["global_batch_size"])
    assert (b.per_rank, b.global_batch, b.change) == (6, 24, {"global_batch_size": (6, 24)})
    assert "changes from 6 (1 process(es) x 6) to 24 (4 process(es) x 6)" in b.note
    b = resume_batch(state(1, 4), flags(4), world_size=2, allow_change=["global_batch_size"])
    assert (b.per_rank, b.global_batch) == (4, 8)  # divisible too: the flags' batch, on purpose
    b = resume_batch(state(2, 8), flags(8), world_size=2, allow_change=["batch_size"])
    assert b.change == {"batch_size": (4, 8)} and b.global_batch == 16  # the per-process flag, same world


def test_another_batch_on_the_same_world_or_another_explicit_global_batch_is_refused():
    with pytest.raises(RunFolderError, match=r"global batch of 8 \(4 per process\), and --batch_size 8 x 2 "
                                             r"process\(es\) asks for 16.*--global_batch_size 8 \(or --batch_size 4\)"):
        resume_batch(state(2, 8), flags(8), world_size=2)
    with pytest.raises(RunFolderError, match=r"--global_batch_size 16 asks for 16 with 4 process\(es\)"):
        resume_batch(state(2, 8), flags(4, global_batch_size=16), world_size=4)


def test_run_global_batch_of_older_state_files():
    assert run_global_batch(state(2, 8)) == (8, 2)
    assert run_global_batch({"world_size": 2, "config": {"batch_size": 3}}) == (6, 2)  # no global_batch key
    assert run_global_batch({"config": {"batch_size": 3}}) is None


def test_samples_seen():
    assert samples_seen({"samples": 20, "global_batch": 8}, 3, 4) == 20  # the count wins
    assert samples_seen({"global_batch": 4}, 3, 8) == 12  # before the count: the checkpoint's batch
    assert samples_seen(None, 3, 8) == 24  # no state file: this run's batch


# ------------------------------------------------------------------------- end to end, one process


def train(run, *extra):
    return image_train.main(["--config", str(TINY), "--log_dir", str(run), "--total_steps", "5",
                             "--save_interval", "3", *map(str, extra)])


def rows(run):
    with open(Path(run) / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def as_if_two_processes(run, step=3):
    """Make the state file say that two processes of 2 wrote it (global batch 4, 12 images seen)."""
    path = Path(run) / f"state{step:06d}.pt"
    s = torch.load(path, weights_only=False)
    s.update(world_size=2, global_batch=4, samples=12, per_rank=[s["per_rank"][0]] * 2)
    s["config"]["batch_size"] = 2
    torch.save(s, path)


@pytest.fixture(scope="module")
def two_process_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("batch") / "run"
    train(run, "--batch_size", 2, "--stop_at", 3)
    as_if_two_processes(run)
    return run


def test_one_process_resume_keeps_the_two_process_global_batch(two_process_checkpoint, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_process_checkpoint, run)
    train(run, "--batch_size", 2)  # the command line of the two-process run, now one process
    out = capsys.readouterr().out
    assert "resuming with 1 process(es) (the checkpoint was written by 2): the run's global batch 4 is kept, " \
           "4 per process (was 2" in out
    done = rows(run)
    assert [(int(r["step"]), int(r["global_batch"]), int(r["samples"])) for r in done[-2:]] == [(3, 4, 16), (4, 4, 20)]
    final = torch.load(run / "state000005.pt", weights_only=False)
    assert final["samples"] == 20 and final["global_batch"] == 4 and final["config"]["batch_size"] == 4
    assert "the global batch stays 4 (4 per process)" in (run / "log.txt").read_text()


def test_allow_change_global_batch_size_counts_the_images_seen(two_process_checkpoint, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_process_checkpoint, run)
    train(run, "--batch_size", 8, "--allow_change", "global_batch_size")
    done = rows(run)
    # 12 images before the resume, then 8 per step: 12 + 8 = 20, 28 (not (step + 1) x 8)
    assert [(int(r["step"]), int(r["global_batch"]), int(r["samples"])) for r in done[-2:]] == [(3, 8, 20), (4, 8, 28)]
    assert torch.load(run / "state000005.pt", weights_only=False)["samples"] == 28
    assert "--allow_change at step 3: global_batch_size 4 -> 8" in (run / "config.yaml").read_text()


# --------------------------------------------------------------------------- for real: mpiexec -n 2


def test_mpiexec_resume_of_a_one_process_run_keeps_its_global_batch(tmp_path):
    mpiexec = mpiexec_or_skip()
    run = tmp_path / "run"
    base = ["--config", str(TINY), "--log_dir", str(run), "--total_steps", "4", "--save_interval", "3",
            "--batch_size", "4"]
    train_py = str(REPO / "scripts" / "image_train.py")
    one = subprocess.run([sys.executable, train_py, *base, "--stop_at", "3"],
                         env=subprocess_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    # the same command line under mpiexec -n 2: global batch 4 kept (2 per process), not 8
    two = subprocess.run([mpiexec, "-n", "2", sys.executable, train_py, *base], env=subprocess_env(), cwd=str(REPO),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("resuming with 2 process(es) (the checkpoint was written by 1): the run's global "
                            "batch 4 is kept, 2 per process (was 4") == 1  # printed once, by rank 0
    last = rows(run)[-1]
    assert (int(last["step"]), int(last["global_batch"]), int(last["samples"])) == (3, 4, 16)  # 12 + 4
    s = torch.load(run / "state000004.pt", weights_only=False)
    assert (s["world_size"], s["global_batch"], s["samples"], s["config"]["batch_size"]) == (2, 4, 16, 2)
