"""
A run folder belongs to one run (issue "Run folders you can trust"): re-running a config does
not write into the run it came from, a folder in use is locked, ``--resume none`` does not start
a second run beside a first, and run-defining flags do not change silently on resume. Every
refusal leaves the folder byte-identical.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "smoke" / "tiny.yaml"
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402
from guided_diffusion.run_folder import LOCK_NAME, RunFolderError, RunLock  # noqa: E402
from guided_diffusion.train_util import list_complete_checkpoints  # noqa: E402


def snapshot(folder):
    """relative path -> sha256 of every file under folder."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def train(*flags):
    return image_train.main(["--config", str(TINY), "--ema_rate", "0.9", "--save_interval", "2", *map(str, flags)])


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    run = tmp_path_factory.mktemp("a") / "A"
    train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1)  # an unfinished run at step 2
    return run


def copy_of(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_rerunning_a_runs_config_starts_a_new_folder(run_a, tmp_path, monkeypatch, capsys):
    run = copy_of(run_a, tmp_path)
    before = snapshot(run)
    monkeypatch.chdir(tmp_path)
    new = image_train.main(["--config", str(run / "config.yaml"), "--seed", "3", "--total_steps", "1", "--stop_at", "0"])
    assert Path(new).resolve() != run.resolve() and Path(new).is_dir()
    assert snapshot(run) == before  # the original run was not touched
    assert "names log_dir" in capsys.readouterr().out
    assert yaml.safe_load((Path(new) / "config.yaml").read_text())["seed"] == 3


def test_a_folder_in_use_is_refused(run_a, tmp_path):
    run = copy_of(run_a, tmp_path)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "since": "now"}))
        before = snapshot(run)
        with pytest.raises(RunFolderError, match=f"in use by pid {owner.pid}"):
            train("--log_dir", run, "--total_steps", 4, "--seed", 1)
        assert snapshot(run) == before
    finally:
        owner.kill()
        owner.wait()
    # the same lock left by a killed process does not block a resume
    train("--log_dir", run, "--total_steps", 4, "--seed", 1)
    assert list_complete_checkpoints(str(run))[-1] == 4 and not (run / LOCK_NAME).exists()


def test_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunFolderError, match="host elsewhere"):
        RunLock(str(tmp_path)).acquire()


def test_resume_none_into_a_run_is_refused_unless_overwrite(run_a, tmp_path):
    run = copy_of(run_a, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError, match="--resume none: .* already holds a run .* up to step 2"):
        train("--log_dir", run, "--resume", "none", "--total_steps", 1)
    assert snapshot(run) == before
    train("--log_dir", run, "--resume", "none", "--overwrite", "True", "--total_steps", 1)
    replaced = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(replaced) == 1 and (replaced[0] / "model000002.pt").exists()  # nothing lost
    assert list_complete_checkpoints(str(run)) == [1]  # auto now finds the new run's step, not the old 2


def test_run_defining_flags_cannot_change_on_resume_silently(run_a, tmp_path):
    run = copy_of(run_a, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=r"--total_steps: run 4, now 6.*--allow_change total_steps"):
        train("--log_dir", run, "--total_steps", 6, "--seed", 1)
    assert snapshot(run) == before
    with pytest.raises(RunFolderError, match="--seed: run 1, now 5"):
        train("--log_dir", run, "--total_steps", 4, "--seed", 5)
    assert snapshot(run) == before
    with pytest.raises(RunFolderError, match="not run-defining"):
        train("--log_dir", run, "--total_steps", 6, "--seed", 1, "--allow_change", "log_interval")
    assert snapshot(run) == before
    old_config = (run / "config.yaml").read_text()
    train("--log_dir", run, "--total_steps", 6, "--seed", 1, "--allow_change", "total_steps")
    assert list_complete_checkpoints(str(run))[-1] == 6
    history = sorted((run / "config_history").iterdir())
    assert len(history) == 1 and history[0].read_text() == old_config  # nothing overwritten
    new_config = (run / "config.yaml").read_text()
    assert "--allow_change at step 2: total_steps 4 -> 6" in new_config
    assert yaml.safe_load(new_config)["total_steps"] == 6


def test_plain_resume_keeps_config_byte_identical(tmp_path):
    run = tmp_path / "run"
    train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1)
    config = (run / "config.yaml").read_bytes()
    train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1)  # at its --stop_at: nothing to do
    assert (run / "config.yaml").read_bytes() == config
    assert not (run / "config_history").exists()


def test_read_only_folder_is_named(run_a, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    run = copy_of(run_a, tmp_path)
    os.chmod(run, 0o555)
    try:
        with pytest.raises(RunFolderError, match=f"cannot write into the run folder {run}"):
            train("--log_dir", run, "--total_steps", 4, "--seed", 1)
    finally:
        os.chmod(run, 0o755)


# The training flags run_folder once typed by hand (RUN_DEFINING_TRAINING_FLAGS before it was derived),
# kept literally as the regression reference for the derived list.
HAND_TYPED_RUN_DEFINING_FLAGS = {
    "total_steps", "lr_anneal_steps", "lr", "weight_decay", "beta1", "beta2", "momentum_decay", "beta1_min",
    "lr_compensation", "decay_beta1", "batch_size", "global_batch_size", "seed", "schedule_sampler",
    "clts_mean", "clts_std", "clts_target_steps", "speed_tau", "speed_k", "speed_threshold", "speed_lambda",
    "loss_weighting", "min_snr_gamma", "p2_k", "p2_gamma", "ema_rate", "grad_clip", "random_flip", "flavor",
    "fdm_warmup_steps",
}


def test_run_defining_flags_are_derived_from_the_declarations():
    from guided_diffusion import options
    from guided_diffusion.run_folder import RUN_DEFINING_TRAINING_FLAGS, run_defining_flags

    derived = options.run_defining_training_flags()
    assert len(derived) == len(set(derived)) and tuple(RUN_DEFINING_TRAINING_FLAGS) == derived
    # the only deliberate difference from the hand-typed list: the three sampler options it missed
    # (history_per_term, uniform_prob, speed_dual), which run_defining_flags already added from
    # options.method_options(); the resulting set of run-defining flags is the same as before
    # and the options the noise-level methods added later (issue 32), each declared once by its class, and
    # --fold_weighting (issue 32's fallback form of a weighting), a training flag
    issue32 = {"clts_floor", "clts_release_start", "laplace_mu", "laplace_b", "edm_p_mean", "edm_p_std",
               "logit_normal_m", "logit_normal_s", "edm_sigma_data"}
    assert set(derived) == HAND_TYPED_RUN_DEFINING_FLAGS | {"history_per_term", "uniform_prob", "speed_dual"} | \
        issue32 | {"fold_weighting"}
    assert set(derived) == HAND_TYPED_RUN_DEFINING_FLAGS | set(options.method_options()) | {"fold_weighting"}
    # every option a sampler or weighting declares is run-defining, none may be declared free
    assert set(options.method_options()) <= set(derived)
    assert not set(options.method_options()) & set(options.RESUME_FREE_FLAGS)
    # the two parts cover the training flags: a free flag that is no flag is a typo
    assert set(options.RESUME_FREE_FLAGS) <= set(options.training_defaults())
    assert set(derived) | set(options.RESUME_FREE_FLAGS) == set(options.training_defaults())
    config = {**options.training_defaults()}
    assert set(run_defining_flags(config)) == set(derived)
    assert set(options.method_options()) <= set(run_defining_flags({k: None for k in options.method_options()}))


@pytest.mark.parametrize("flag,value", [("history_per_term", 5), ("uniform_prob", 0.01), ("speed_dual", False)])
def test_a_changed_sampler_option_is_refused_on_resume(run_a, tmp_path, flag, value):
    # these three were missing from a hand-typed list; every method option now comes from its class
    # (that each is run-defining: test_run_defining_flags_are_derived_from_the_declarations)
    run = copy_of(run_a, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=rf"--{flag}: run .*, now {value}"):
        train("--log_dir", run, "--total_steps", 4, "--seed", 1, f"--{flag}", value)
    assert snapshot(run) == before


def test_a_rerun_after_an_allowed_change_does_not_silently_revert_config(run_a, tmp_path, capsys):
    # issue 31 item 5 (3): an allowed --total_steps change that stops before its next checkpoint
    # leaves state000002.pt with the old value (4) and config.yaml with the new one (6); rerunning
    # with the original value (or none) used to pass the check and rewrite config.yaml back silently
    run = copy_of(run_a, tmp_path)
    train("--log_dir", run, "--total_steps", 6, "--stop_at", 2, "--seed", 1, "--allow_change", "total_steps")
    assert yaml.safe_load((run / "config.yaml").read_text())["total_steps"] == 6
    assert list_complete_checkpoints(str(run))[-1] == 2  # no new state file: it still says 4
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=r"--total_steps: run 6, now 4 .*config\.yaml.*written with 4"
                                             r".*--allow_change total_steps"):
        train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1)
    assert snapshot(run) == before
    with pytest.raises(RunFolderError, match=r"--total_steps: run 6, now 0"):  # no value: the default 0
        image_train.main(["--config", str(TINY), "--ema_rate", "0.9", "--save_interval", "2", "--log_dir", str(run),
                          "--total_steps", "0", "--stop_at", "2", "--seed", "1"])
    assert snapshot(run) == before
    # the run's current value (config.yaml's) needs no --allow_change, though the checkpoint says 4;
    # config.yaml records the command's own --allow_change too, and says that this changed
    capsys.readouterr()
    train("--log_dir", run, "--total_steps", 6, "--stop_at", 2, "--seed", 1)
    out = capsys.readouterr().out
    assert "config.yaml: --allow_change changes from 'total_steps' to ''" in out and "total_steps changes" not in out
    assert yaml.safe_load((run / "config.yaml").read_text())["total_steps"] == 6
    # changing it back on purpose is a logged change, the history keeps every earlier file
    train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1, "--allow_change", "total_steps")
    out = capsys.readouterr().out
    assert "--allow_change: total_steps changes from 6 to 4 at step 2" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["total_steps"] == 4
    assert len(list((run / "config_history").iterdir())) == 3


def test_every_config_yaml_change_is_named(tmp_path, capsys):
    # a flag free to change on resume (--log_interval) still changes config.yaml: the rerun says so
    run = tmp_path / "run"
    train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1)
    capsys.readouterr()
    train("--log_dir", run, "--total_steps", 4, "--stop_at", 2, "--seed", 1, "--log_interval", 7)
    out = capsys.readouterr().out
    assert "config.yaml: --log_interval changes from 1 to 7" in out
    assert len(list((run / "config_history").iterdir())) == 1
