"""
Clean stops and damaged folders (issue "Run folders you can trust", item 5): Ctrl-C and SIGTERM
end the step and say where to resume (SIGTERM also checkpoints), a failed write names the file
and leaves the previous complete set intact, and a corrupt newest set falls back to the newest
complete one that reads.
"""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "smoke" / "tiny.yaml"
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402
from guided_diffusion import train_setup  # noqa: E402
from guided_diffusion.train_util import CheckpointWriteError, list_complete_checkpoints, resolve_resume  # noqa: E402


def _rows(run):
    p = run / "progress.csv"
    return max(0, len(p.read_text().strip().splitlines()) - 1) if p.exists() else 0


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_after_the_step_and_says_where_to_resume(tmp_path, sig, code):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "image_train.py"), "--config", str(TINY), "--log_dir", str(run),
           "--total_steps", "100000", "--save_interval", "2", "--log_interval", "1", "--ema_rate", "0.9"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while _rows(run) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"{name}: stopped after step" in err and "rerun the same command to resume" in err
    stopped = int(err.split("stopped after step ")[1].split(";")[0])
    done = list_complete_checkpoints(str(run))
    assert f"the last complete checkpoint is step {done[-1]}" in err
    if sig == signal.SIGTERM:
        assert done[-1] == stopped  # a checkpoint at SIGTERM, before the scheduler kills the job
    assert not (run / ".lock").exists()  # the folder is free for the resume


def test_disk_full_names_the_file_and_keeps_the_previous_set(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = train_setup.atomic_torch_save

    def failing(obj, path):
        if os.path.basename(path) == "opt000004.pt":
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(obj, path)

    monkeypatch.setattr(train_setup, "atomic_torch_save", failing)  # write_checkpoint_set looks it up there
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*opt000004.pt into .*No space left on device.*"
                                                   r"step 2, is intact"):
        image_train.main(["--config", str(TINY), "--log_dir", str(run), "--total_steps", "4", "--save_interval", "2",
                          "--ema_rate", "0.9"])
    assert list_complete_checkpoints(str(run)) == [2]
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    assert not (run / ".lock").exists()


def test_corrupt_newest_set_falls_back_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    image_train.main(["--config", str(TINY), "--log_dir", str(run), "--total_steps", "4", "--save_interval", "2",
                      "--ema_rate", "0.9", "--stop_at", "4"])
    model = run / "model000004.pt"
    model.write_bytes(model.read_bytes()[:100])  # truncated, e.g. by a full disk outside our writes
    capsys.readouterr()
    point = resolve_resume(str(run), "auto", "", [0.9])
    assert point.step == 2
    out = capsys.readouterr().out
    assert "newest checkpoint set" in out and "(step 4)" in out and "resuming from step 2" in out
