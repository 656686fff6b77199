"""
Multi-process training on the CPU (gloo): ``mpiexec -n 2`` and ``torchrun --nproc_per_node 2``.

Two ranks with batch 2 each must compute the gradients of a one-process run with batch 4 on the
same images (timesteps and noise are drawn for the global batch and sliced by rank), keep
identical parameters, and write one checkpoint set. Run as a script, this file is the worker:
``python tests/test_distributed.py OUT TAG STEPS``.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import mpiexec_or_skip, subprocess_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke" / "tiny.yaml"
GLOBAL_BATCH = 4
STEPS = 3


def _global_batches(size=16):
    """The same global batches in every process; each rank keeps its slice."""
    k = 0
    while True:
        g = torch.Generator().manual_seed(1000 + k)
        k += 1
        yield torch.rand(GLOBAL_BATCH, 3, size, size, generator=g) * 2 - 1


def worker(out: str, tag: str, steps: int) -> None:
    """Train the tiny model for ``steps`` steps; save grads of step 0 and final params per rank."""
    sys.path.insert(0, str(REPO))
    from guided_diffusion import dist_util, logger
    from guided_diffusion.script_util import create_model_and_diffusion, load_config, model_and_diffusion_defaults
    from guided_diffusion.train_util import TrainLoop

    torch.set_num_threads(1)
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    local = GLOBAL_BATCH // world
    run = os.path.join(out, f"run_{tag}")
    logger.configure(dir=run, format_strs=["csv", "log"])
    args = model_and_diffusion_defaults()
    args.update({k: v for k, v in load_config(SMOKE).items() if k in args})
    args["dropout"] = 0.0  # dropout masks are per rank by design; everything else is shared
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args)

    def data():
        for x in _global_batches():
            yield x[rank * local:(rank + 1) * local], {}

    loop = TrainLoop(model=model, diffusion=diffusion, data=data(), batch_size=local, microbatch=-1, lr=1e-3,
                     ema_rate="0.99", log_interval=1, save_interval=0, resume_checkpoint="", total_steps=steps,
                     log_dir=run, seed=0, schedule_sampler=None)
    optimize = loop.optimize

    def spy():
        if loop.step == 0:  # the DDP-averaged gradients of the first step
            torch.save({n: p.grad.clone() for n, p in loop.model.named_parameters() if p.grad is not None},
                       os.path.join(out, f"grads_{tag}_rank{rank}.pt"))
        return optimize()

    loop.optimize = spy
    loop.run_loop()
    torch.save({k: v.clone() for k, v in loop.model.state_dict().items()},
               os.path.join(out, f"params_{tag}_rank{rank}.pt"))


_env = subprocess_env
_mpiexec = mpiexec_or_skip


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, env=_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _checkpoint_files(run: Path):
    return sorted(p.name for p in run.iterdir() if p.suffix == ".pt" or p.name.endswith(".tmp"))


def test_mpiexec_two_ranks_match_one_process(tmp_path):
    mpiexec = _mpiexec()
    _run([mpiexec, "-n", "2", sys.executable, str(Path(__file__).resolve()), str(tmp_path), "mpi", str(STEPS)])
    worker(str(tmp_path), "single", STEPS)  # one process, the same global batch of 4

    g0, g1, gs = (torch.load(tmp_path / f"grads_{t}.pt") for t in ("mpi_rank0", "mpi_rank1", "single_rank0"))
    p0, p1, ps = (torch.load(tmp_path / f"params_{t}.pt") for t in ("mpi_rank0", "mpi_rank1", "single_rank0"))
    assert g0.keys() == gs.keys() and p0.keys() == ps.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k  # all-reduced: identical on both ranks
        scale = gs[k].abs().max().item() + 1e-30
        assert (g0[k] - gs[k]).abs().max().item() <= 1e-5 * scale, k  # = the one-process gradient
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k  # identical parameters on both ranks
        # Adam turns rounding differences of gradients ~eps into parts of lr (1e-3); elsewhere equal
        torch.testing.assert_close(p0[k], ps[k], rtol=0, atol=1e-4)
    # only rank 0 wrote: one checkpoint set, no temporary files
    run = tmp_path / "run_mpi"
    assert _checkpoint_files(run) == [f"ema_0.99_{STEPS:06d}.pt", f"model{STEPS:06d}.pt", f"opt{STEPS:06d}.pt",
                                      f"state{STEPS:06d}.pt"]
    with open(run / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    assert all(int(r["global_batch"]) == GLOBAL_BATCH for r in rows)
    state = torch.load(run / f"state{STEPS:06d}.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["per_rank"]) == 2
    saved = torch.load(run / f"model{STEPS:06d}.pt")
    assert all(torch.equal(saved[k], p0[k]) for k in saved)


def test_torchrun_two_processes_image_train(tmp_path):
    run = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(REPO / "scripts" / "image_train.py"), "--config", str(SMOKE), "--log_dir", str(run),
          "--total_steps", "2", "--save_interval", "2", "--batch_size", "2"])
    assert _checkpoint_files(run) == ["ema_0.99_000002.pt", "ema_0.9_000002.pt", "model000002.pt", "opt000002.pt",
                                      "state000002.pt"]
    with open(run / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_batch"]) for r in rows] == [4, 4]
    assert (run / "config.yaml").exists()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
