"""
Issue 20: nothing lost, no crash at exit, every fault a named message. One section per defect
of the issue (1-9). Run as a script, this file is the two-process worker of section 2:
``python tests/test_faults.py ENDING`` (``ok``, ``error`` or ``plain``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "smoke" / "tiny.yaml"


def _train(*argv):
    from guided_diffusion.training import train

    return train(["--config", str(TINY), *map(str, argv)])


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------ 1. upstream-format checkpoints are kept


@pytest.fixture
def upstream_folder(tiny_run, tmp_path):
    """A folder holding only upstream-format files of step 2: model, opt and EMA files, no state."""
    folder = tmp_path / "R"
    folder.mkdir()
    for name in ("model000002.pt", "opt000002.pt", "ema_0.99_000002.pt", "ema_0.9_000002.pt"):
        (folder / name).write_bytes((tiny_run / name).read_bytes())
    return folder


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_upstream_checkpoints_are_not_overwritten(upstream_folder, resume):
    from guided_diffusion.run_folder import RunFolderError

    before = _snapshot(upstream_folder)
    with pytest.raises(RunFolderError) as info:
        _train("--seed", 5, "--log_dir", upstream_folder, "--resume", resume)
    message = str(info.value)
    for name in before:
        assert name in message
    assert f"--resume {upstream_folder / 'model000002.pt'}" in message and "another --log_dir" in message
    assert _snapshot(upstream_folder) == before  # byte-identical, nothing added


def test_upstream_checkpoints_resume_the_way_the_message_says(upstream_folder):
    from guided_diffusion.checkpoint import list_complete_checkpoints

    before = _snapshot(upstream_folder)
    _train("--log_dir", upstream_folder, "--resume", upstream_folder / "model000002.pt", "--total_steps", 3,
           "--save_interval", 3)
    assert list_complete_checkpoints(str(upstream_folder)) == [3]
    assert all((upstream_folder / n).read_bytes() == b for n, b in before.items())


def test_overwrite_moves_upstream_checkpoints_aside(upstream_folder):
    before = _snapshot(upstream_folder)
    _train("--log_dir", upstream_folder, "--overwrite", True, "--total_steps", 1, "--save_interval", 1)
    (aside,) = upstream_folder.glob("replaced-*")
    assert _snapshot(aside) == before


# ------------------------------------------------------------------ 2. a clean exit of every rank


def worker(ending: str) -> None:
    """
    The worst case for an exit: a DDP wrapper kept alive by a reference cycle (as a TrainLoop is)
    and 200 all-reduces of Python-made tensors still queued on gloo's worker threads. Without the
    teardown every such run aborted with ``terminate called without an active exception``.

    :param ending: ``ok`` (``main`` returns), ``error`` (it raises bad input), both through
                   ``run_script``; ``plain``: no run_script, the end of an upstream-style script.
    """
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from guided_diffusion import dist_util
    from guided_diffusion.script_util import run_script

    torch.set_num_threads(1)

    class Loop:  # a reference cycle, as TrainLoop has
        pass

    def main():
        dist_util.setup_dist()
        loop = Loop()
        loop.me = loop
        loop.ddp = DDP(torch.nn.Linear(8, 8))
        loop.ddp(torch.ones(2, 8)).sum().backward()
        for _ in range(200):
            dist.all_reduce(torch.ones(10000), async_op=True)
        if ending == "error":
            raise ValueError("--lr: expected a finite number > 0, got -1")

    if ending == "plain":
        main()
    else:
        run_script(main)


def _two_ranks(ending):
    from conftest import mpiexec_or_skip, subprocess_env

    mpiexec = mpiexec_or_skip()
    return subprocess.run([mpiexec, "-n", "2", sys.executable, str(Path(__file__).resolve()), ending],
                          env=subprocess_env(), capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("ending,code", [("ok", 0), ("error", 2), ("plain", 0)])
def test_two_ranks_exit_cleanly_with_work_in_flight(ending, code):
    proc = _two_ranks(ending)
    out = proc.stdout + proc.stderr
    assert "terminate called" not in out and "Aborted" not in out, out
    assert proc.returncode == code, out
    if ending == "error":  # the message every rank raised alike: once, from rank 0
        assert out.count("--lr: expected a finite number > 0, got -1") == 1, out


def _raise(exc):
    def main():
        raise exc
    return main


def _every_ending():
    import signal

    from guided_diffusion.train_util import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted

    return [
        ("returns", lambda: None, 0),
        ("bad input", _raise(ValueError("--lr: expected a finite number > 0, got -1")), 2),
        ("failure", _raise(NonFiniteLossError("training stopped at step 3")), 1),
        ("write error", _raise(CheckpointWriteError("cannot write model000002.pt")), 1),
        ("SIGTERM", _raise(TrainingInterrupted("SIGTERM: stopped after step 4", signal.SIGTERM)), 143),
        ("Ctrl-C", _raise(KeyboardInterrupt()), 130),
        ("argparse", _raise(SystemExit(2)), 2),
        ("unexpected", _raise(RuntimeError("a bug")), 1),
    ]


def test_run_script_tears_down_on_every_exit_path(monkeypatch, capsys):
    from guided_diffusion import dist_util, script_util
    from guided_diffusion.train_util import NonFiniteLossError

    calls = []
    monkeypatch.setattr(dist_util, "teardown_dist", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["scripts/image_train.py"])
    for what, main, code in _every_ending():
        calls.clear()
        if code:
            with pytest.raises(SystemExit) as info:
                script_util.run_script(main, failures=(NonFiniteLossError,))
            assert info.value.code == code, what
        else:
            script_util.run_script(main)
        assert calls == [1], what  # once, after the message
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err  # the unexpected error keeps its traceback
    assert err.count("Traceback") == 1


def test_other_ranks_leave_the_shared_message_to_rank_0(monkeypatch, capsys):
    from guided_diffusion import dist_util, script_util

    monkeypatch.setattr(dist_util, "teardown_dist", lambda: None)
    monkeypatch.setattr(sys, "argv", ["scripts/image_train.py"])
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("PMI_SIZE", "2")
        monkeypatch.setenv("PMI_RANK", rank)
        with pytest.raises(SystemExit):
            script_util.run_script(_raise(ValueError("--lr: expected a finite number > 0, got -1")))
        assert ("--lr: expected" in capsys.readouterr().err) is shown


def test_teardown_is_a_no_op_in_one_process():
    from guided_diffusion import dist_util

    dist_util.setup_dist()
    dist_util.teardown_dist()
    dist_util.teardown_dist()
    assert dist_util.dev().type in ("cpu", "cuda")  # set up again on demand


if __name__ == "__main__":
    worker(sys.argv[1])
