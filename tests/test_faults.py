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


# ------------------------------------------------------------------ 3. a full disk or a file-size limit: the named message


class _FullDisk:
    """A file object whose disk fills up after ``room`` bytes (ENOSPC from write, as a real disk)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        import errno

        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _tiny_argv(run, *extra):
    return ["--config", str(TINY), "--log_dir", str(run), "--total_steps", "4", "--save_interval", "2",
            "--ema_rate", "0.9", *map(str, extra)]


def test_disk_full_inside_torch_save_gives_the_named_message(tmp_path, monkeypatch, capsys):
    import torch

    from guided_diffusion import checkpoint, script_util, train_setup
    from guided_diffusion.checkpoint import list_complete_checkpoints
    from guided_diffusion.train_util import NonFiniteLossError

    sys.path.insert(0, str(REPO / "scripts"))
    import image_train

    run = tmp_path / "run"
    real = train_setup.atomic_torch_save

    def save(obj, path):  # torch's own zip writer meets the full disk (it raises RuntimeError)
        if os.path.basename(path) == "opt000004.pt":
            return checkpoint.atomic_write(path, lambda f: torch.save(obj, _FullDisk(f, 1000)))
        return real(obj, path)

    monkeypatch.setattr(train_setup, "atomic_torch_save", save)  # write_checkpoint_set looks it up there
    monkeypatch.setattr(sys, "argv", ["scripts/image_train.py"])
    with pytest.raises(SystemExit) as info:
        script_util.run_script(lambda: image_train.main(_tiny_argv(run)), failures=(NonFiniteLossError,))
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "Traceback" not in err and "RuntimeError" not in err and "inline_container" not in err, err
    assert f"cannot write {run / 'opt000004.pt'}" in err and "No space left on device" in err
    assert "the newest complete set, step 2, is intact" in err
    assert list_complete_checkpoints(str(run)) == [2]
    assert not any(p.name.endswith(".tmp") for p in run.iterdir()) and not (run / ".lock").exists()


def test_file_size_limit_gives_the_named_message(tmp_path):
    import resource

    from conftest import subprocess_env
    from guided_diffusion.checkpoint import list_complete_checkpoints

    run = tmp_path / "run"
    _train("--log_dir", run, "--total_steps", 4, "--save_interval", 2, "--ema_rate", 0.9, "--stop_at", 2)
    before = _snapshot(run)
    limit = 4_096_000  # `ulimit -f 4000`: the 3 MB model and EMA files fit, the 6 MB optimizer state does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "image_train.py"), *_tiny_argv(run)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr
    assert f"cannot write {run / 'opt000004.pt'}" in proc.stderr and "File too large" in proc.stderr
    assert "the newest complete set, step 2, is intact" in proc.stderr
    assert list_complete_checkpoints(str(run)) == [2]
    assert all((run / n).read_bytes() == b for n, b in before.items() if n.endswith(".pt"))


# ------------------------------------------------------------------ 4. config.yaml missing: the state file has the config


def test_sampling_a_run_without_config_yaml_uses_its_state_file(tiny_run, tmp_path):
    from guided_diffusion.model_loading import resolve_model_flags

    sys.path.insert(0, str(REPO / "scripts"))
    import image_sample

    run = tmp_path / "run"
    run.mkdir()
    for p in tiny_run.iterdir():
        if p.suffix == ".pt":
            (run / p.name).write_bytes(p.read_bytes())
    flags, source = resolve_model_flags(run / "ema_0.99_000001.pt")
    assert flags["num_channels"] == 32 and flags["image_size"] == 16 and flags["learn_sigma"] is True
    assert str(run / "state000001.pt") in source  # the checkpoint's own step
    npz = image_sample.main(["--model_path", str(run / "ema_0.99_000002.pt"), "--num_samples", "2",
                             "--batch_size", "2", "--use_ddim", "True", "--timestep_respacing", "ddim2",
                             "--out_dir", str(tmp_path / "out")])
    import numpy as np

    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)


# ------------------------------------------------------------------ 5. FID of too few images is refused


def test_fid_of_too_few_images_is_refused_naming_both_counts(fake_extractor, tmp_path, capsys):
    import numpy as np

    from evaluations import evaluator as ev
    from guided_diffusion.image_datasets import synthetic_images

    ref3 = tmp_path / "ref3.npz"
    np.savez(ref3, arr_0=synthetic_images(3, 32, seed=1)[0])
    samples = synthetic_images(40, 32, seed=2)[0]
    res = ev.evaluate(ref3, samples, metrics="fid,sfid,kid", cache_dir=str(tmp_path / "c"))
    assert "fid" not in res and "sfid" not in res and "kid" in res
    assert "samples 40, reference 3" in res["skipped"]["fid"] and "--allow_small_sets" in res["skipped"]["fid"]
    assert "fid" in ev.evaluate(ref3, samples, metrics="fid", cache_dir=str(tmp_path / "c"), allow_small_sets=True)
    # too few samples: the same, the other way round
    many = tmp_path / "many.npz"
    np.savez(many, arr_0=samples)
    res = ev.evaluate(many, samples[:3], metrics="fid", cache_dir=str(tmp_path / "c"))
    assert "samples 3, reference 40" in res["skipped"]["fid"]
    # the command line prints no FID and fails when nothing could be computed
    np.savez(tmp_path / "s.npz", arr_0=samples)
    with pytest.raises(SystemExit) as info:
        ev.main([str(ref3), str(tmp_path / "s.npz"), "--metrics", "fid", "--cache_dir", str(tmp_path / "c")])
    out = capsys.readouterr()
    assert info.value.code == 2 and "FID:" not in out.out and "samples 40, reference 3" in out.err


# ------------------------------------------------------------------ 6. fid_curve.py: no duplicate rows, the real error first


def test_two_fid_curves_on_one_run_write_each_row_once(tiny_run, tmp_path, monkeypatch):
    import shutil

    import numpy as np

    import evaluations.evaluator

    sys.path.insert(0, str(REPO / "scripts"))
    import fid_curve

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 16, 16, 3), np.uint8))
    csv_path = run / "fid_curve.csv"
    other = {"sampler": "ddim", "sampling_steps": 3, "num_samples": 4, "ema_rate": "0.99", "seed": 0,
             "protocol": "custom", "fid": 7.0, "extractor": "other"}
    sampled = []

    def generate(model, diffusion, *, num_samples, image_size, **kw):
        if not sampled:  # meanwhile another fid_curve.py measures both checkpoints
            for step in (1, 2):
                assert fid_curve.append_row(str(csv_path), {"step": step, **other})
        sampled.append(num_samples)
        return np.zeros((num_samples, image_size, image_size, 3), np.uint8), None

    monkeypatch.setattr(fid_curve, "generate_samples", generate)
    monkeypatch.setattr(evaluations.evaluator, "evaluate", lambda ref, images, **kw: {"fid": 1.0, "extractor": "x"})
    rows = fid_curve.main([str(run), "--ref", str(ref), "--num_samples", "4", "--batch_size", "4",
                           "--timestep_respacing", "ddim3", "--metrics", "fid", "--progress", "False"])
    assert rows == [] and len(sampled) == 1  # step 1's row not written again, step 2 not even sampled
    table = fid_curve.read_rows(str(csv_path))
    assert [(r["step"], r["fid"]) for r in table] == [("1", "7.0"), ("2", "7.0")]
    assert not fid_curve.append_row(str(csv_path), {"step": 2, **other})  # the same measurement again: refused


def test_plot_curves_plots_one_point_per_step_and_names_a_bad_cell(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot_curves

    header = "step,gpu_hours,fid,sampler,sampling_steps,num_samples,ema_rate,extractor\n"
    path = tmp_path / "fid_curve.csv"
    path.write_text(header + "1,0.1,9,ddim,50,10,0.99,x\n2,0.2,8,ddim,50,10,0.99,x\n2,0.2,7,ddim,50,10,0.99,x\n")
    curve, _ = plot_curves.read_curve(str(path), "fid")
    assert curve["step"] == [1.0, 2.0] and curve["fid"] == [9.0, 7.0]
    assert "1 duplicate row(s) of step(s) 2" in capsys.readouterr().err
    path.write_text(header + "1,0.1,9,ddim,50,10,0.99,x\n2,0.2,n/a,ddim,50,10,0.99,x\n")
    with pytest.raises(ValueError, match=r"fid_curve.csv, line 3 \(step '2'\): column 'fid' holds 'n/a', not a number"):
        plot_curves.read_curve(str(path), "fid")


def test_fid_curve_on_a_folder_without_checkpoints_says_so_first(tmp_path, capsys):
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    import fid_curve

    empty = tmp_path / "empty"
    empty.mkdir()
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 32, 32, 3), np.uint8))
    for extra in ([], ["--use_ema", "False"]):
        with pytest.raises(FileNotFoundError, match="no checkpoints"):
            fid_curve.main([str(empty), "--ref", str(ref), *extra])
    out = capsys.readouterr()
    assert "64x64" not in out.out + out.err and "--use_ema False" not in out.out + out.err


# ------------------------------------------------------------------ 7. rough messages, smoothed


def test_resume_from_another_runs_checkpoint_names_the_way_out_in_this_folder(tiny_run, tmp_path):
    from guided_diffusion.checkpoint import ResumeError
    from guided_diffusion.run_folder import RunFolderError

    new = tmp_path / "new"
    for flags, error in ((["--num_channels", 64], ResumeError), (["--lr", 0.01], RunFolderError)):
        with pytest.raises(error) as info:
            _train("--log_dir", new, "--resume", tiny_run / "model000002.pt", *flags)
        assert f"start {new} as a new run without it (drop --resume)" in str(info.value)
        assert "another --log_dir" not in str(info.value)


def test_allow_change_with_an_unknown_flag_is_refused_on_a_new_run(tmp_path):
    from guided_diffusion.run_folder import RunFolderError

    with pytest.raises(RunFolderError, match=r"--allow_change total_stepz: total_stepz is not run-defining"):
        _train("--log_dir", tmp_path / "run", "--allow_change", "total_stepz")
    assert not (tmp_path / "run").exists()


def test_lr_message_says_what_is_accepted():
    from guided_diffusion.options import validate_training_args

    with pytest.raises(ValueError, match=r"--lr must be a finite number > 0, got inf"):
        validate_training_args({"lr": float("inf")})


def test_evaluator_names_the_file_of_an_object_array(tmp_path):
    import numpy as np

    from evaluations import evaluator as ev

    bad = tmp_path / "objects.npz"
    np.savez(bad, arr_0=np.array([np.zeros((4, 4, 3), np.uint8), None], dtype=object))
    with pytest.raises(ValueError, match=r"objects.npz: its 'arr_0' array cannot be read without unpickling"):
        ev.load_batch(bad)


def test_images_smaller_than_image_size_are_upscaled_with_a_warning(tmp_path):
    import numpy as np
    from PIL import Image

    from guided_diffusion.image_datasets import UpscaledImageWarning, load_source

    for i, side in enumerate((8, 8, 32)):
        Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(tmp_path / f"cat_{i}.png")
    with pytest.warns(UpscaledImageWarning, match=r"2 of 3 image\(s\) are smaller than the 16x16 .*cat_0.png \(8x8\)"):
        src = load_source(str(tmp_path), 16)
    assert src.images.shape == (3, 16, 16, 3)


def test_consistency_warns_about_untrained_models(tiny_run, tmp_path, capsys):
    import torch

    from guided_diffusion.model_loading import resolve_model_flags
    from guided_diffusion.script_util import create_model_and_diffusion

    sys.path.insert(0, str(REPO / "scripts"))
    import consistency

    (tmp_path / "config.yaml").write_bytes((tiny_run / "config.yaml").read_bytes())
    flags, _ = resolve_model_flags(tiny_run / "model000001.pt")
    paths = []
    for seed in (1, 2):  # two fresh models: different weights, the same zero output layer
        torch.manual_seed(seed)
        model, _ = create_model_and_diffusion(**flags)
        paths.append(str(tmp_path / f"model00000{seed}.pt"))
        torch.save(model.state_dict(), paths[-1])
    summary = consistency.main(["--models", *paths, "--names", "a,b", "--num_samples", "2",
                                "--timestep_respacing", "2", "--out_dir", str(tmp_path / "out")])
    assert "warning: 2 of 2 model(s) (a, b) still have the all-zero output layer" in capsys.readouterr().out
    assert summary["untrained_models"] == ["a", "b"]
    summary = consistency.main(["--models", str(tiny_run / "model000001.pt"), str(tiny_run / "model000002.pt"),
                                "--num_samples", "1", "--timestep_respacing", "2", "--out_dir", str(tmp_path / "o2")])
    assert summary["untrained_models"] == [] and "all-zero" not in capsys.readouterr().out


def test_hessian_note_names_every_rank_that_did_not_converge():
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "scripts"))
    import hessian_spectrum

    power = SimpleNamespace(eigenvalues=[10.0, 4.0, 2.0], converged=[True, True, False])
    note = hessian_spectrum.power_iteration_note(power, [10.001, 5.0, 3.0], 100, 1e-3)
    assert "rank(s) 2, 3" in note and "rank 2: 4 < 5" in note and "rank 3: 2 < 3" in note
    assert hessian_spectrum.power_iteration_note(SimpleNamespace(eigenvalues=[10.0], converged=[True]),
                                                 [10.001], 100, 1e-3) == ""


# ------------------------------------------------------------------ 8. what a newcomer needs to be told


def test_log_says_when_an_ema_has_not_left_the_initial_weights(tmp_path):
    short = tmp_path / "short"
    _train("--log_dir", short, "--total_steps", 2, "--save_interval", 2, "--ema_rate", "0.999")
    log = (short / "log.txt").read_text()
    assert "after 2 steps, EMA rate(s) 0.999 (horizon 1/(1-rate) = 1,000 steps; the initial weights are still " \
           "100% of it)" in log and "--ema_rate" in log
    enough = tmp_path / "enough"
    _train("--log_dir", enough, "--total_steps", 2, "--save_interval", 2, "--ema_rate", "0.5")
    assert "EMA rate(s)" not in (enough / "log.txt").read_text()


def test_ref_stats_warns_about_the_cpu_and_names_max_images():
    import torch

    from evaluations.ref_stats import cpu_cost_warning

    warning = cpu_cost_warning(50000, torch.device("cpu"))
    assert "about 5.3 h" in warning and "--max_images" in warning
    assert "--max_images" not in cpu_cost_warning(50000, torch.device("cpu"), max_images=50000)
    assert cpu_cost_warning(50000, torch.device("cuda")) == "" and cpu_cost_warning(500, torch.device("cpu")) == ""


def test_readme_tells_how_to_use_the_venv_and_the_cpu_cost():
    text = (REPO / "README.md").read_text()
    assert ". .venv/bin/activate" in text and ".venv/bin/python" in text
    assert "No module named 'PIL'" in text
    stats = [line for line in text.splitlines() if "ref_stats.py" in line and "--max_images" in line]
    assert stats, "a ref_stats.py command with --max_images"
    assert "1/(1-rate)" in text and "scripts/launch/slurm.sbatch" in text


# ------------------------------------------------------------------ 9. SLURM


SBATCH = REPO / "scripts" / "launch" / "slurm.sbatch"


def _sbatch(*args, **env):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "SLURM_SUBMIT_DIR": str(REPO)}
    return subprocess.run(["bash", str(SBATCH), *map(str, args)], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


def test_slurm_script_syntax_and_resolved_command():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    head = SBATCH.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=TERM@", "#SBATCH --gpus-per-node=", "#SBATCH --open-mode=append"):
        assert line in head
    proc = _sbatch("configs/cifar10/clts_mdlrc.yaml", "runs/x", "--stop_at", "100", DRY_RUN="1", SLURM_JOB_ID="4242",
                   SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", PYTHON="python3")
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s) x 8 GPU(s) = 16 task(s)" in proc.stdout and "MASTER_PORT=24242" in proc.stdout
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --kill-on-bad-exit=1 bash -c ")
    assert "RANK=\\$SLURM_PROCID" in command and "LOCAL_RANK=\\$SLURM_LOCALID" in command
    assert command.endswith("python3 scripts/image_train.py --config configs/cifar10/clts_mdlrc.yaml "
                            "--log_dir runs/x --resume auto --stop_at 100")
    bad = _sbatch("configs/no/such.yaml", "runs/x", DRY_RUN="1")
    assert bad.returncode == 2 and "config file not found: configs/no/such.yaml" in bad.stderr
    assert _sbatch("configs/cifar10/clts_mdlrc.yaml").returncode == 2  # RUN_DIR missing: the usage


_FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: --ntasks=N copies of the command, numbered as SLURM numbers its tasks
n=1
while [[ $# -gt 0 && $1 == -* ]]; do case "$1" in --ntasks=*) n=${1#--ntasks=} ;; esac; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NTASKS=$n SLURM_LOCALID=$i "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || { s=$?; [[ $s -gt $status ]] && status=$s; }; done
exit $status
"""


def test_slurm_script_trains_two_tasks_as_one_run(tmp_path):
    from conftest import subprocess_env

    from guided_diffusion.checkpoint import list_complete_checkpoints

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(_FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = subprocess_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(REPO),
               GPUS_PER_NODE="2")
    run = tmp_path / "run"
    proc = subprocess.run(["bash", str(SBATCH), str(TINY), str(run), "--total_steps", "2", "--save_interval", "2",
                           "--global_batch_size", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list_complete_checkpoints(str(run)) == [2]
    assert "world size 2, device cpu, global batch 4" in (run / "log.txt").read_text()


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
        ("--help", _raise(SystemExit(0)), 0),
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
        if code or what == "--help":  # a SystemExit goes on, also with status 0
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
