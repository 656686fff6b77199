"""
The guards beside ``TrainLoop``: small collaborators that watch a run without being its step.

- ``NonFiniteGuard``: counts skipped non-finite steps (on the host, or on the device without a
  sync when the optimizer is fused) and stops the run after ``--max_nonfinite`` in a row.
- ``StopSignals``: Ctrl-C / SIGTERM end the run after the current step (all ranks agree).
- ``SampleGrid``: the periodic EMA sample grid (``--sample_interval``).
- ``EmaHorizonWarning``: says once when an EMA is still mostly the initial weights.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from . import logger
from .checkpoint import list_complete_checkpoints
from .errors import TrainingInterrupted  # noqa: F401  (re-exported: raised here, owned by errors)
from .image_io import write_grid
from .script_util import create_gaussian_diffusion, diffusion_defaults, fdm_defaults
from .seeding import derive_seed

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "NonFiniteGuard", "StopSignals", "SampleGrid",
           "EmaHorizonWarning", "SAMPLE_GRID_SIZE", "SAMPLE_GRID_DDIM_STEPS"]

# Periodic EMA sample grid: number of images and DDIM steps.
SAMPLE_GRID_SIZE = 16
SAMPLE_GRID_DDIM_STEPS = 50


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``--max_nonfinite`` non-finite steps in a row."""


class NonFiniteGuard:
    """
    Skipped non-finite steps: the run's total, the current streak and the step at which the streak
    reached ``max_nonfinite`` (-1: not yet). The host copies are exact on the host path; on the
    device path (fused optimizer) the device tensors count without a sync and ``sync()`` brings
    them over at log rows and checkpoints.
    """

    def __init__(self, max_nonfinite: int, device: torch.device, on_device: bool, total: int = 0):
        """
        :param max_nonfinite: stop after this many in a row (0: never).
        :param device: where the device-side counters live.
        :param on_device: the optimizer skips on the device (fused): count there.
        :param total: the count a resumed run starts from.
        """
        self.max_nonfinite = int(max_nonfinite)
        self.on_device = bool(on_device)
        self.total, self.consecutive, self.trigger = int(total), 0, -1
        self._total_t = torch.full((), self.total, dtype=torch.int64, device=device)
        self._consec_t = torch.zeros((), dtype=torch.int64, device=device)
        self._trigger_t = torch.full((), -1, dtype=torch.int64, device=device)

    def count_host(self, skipped: bool, step: int, log_dir: str, rank: int) -> None:
        """Count one step the host knows about; stop the run at once when the streak is too long."""
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        logger.log(f"step {step}: non-finite loss or gradient, update skipped ({self.consecutive} in a row)")
        if self.max_nonfinite and self.consecutive >= self.max_nonfinite and self.trigger < 0:
            self.trigger = step
            self.check(log_dir, rank)

    def count_device(self, found_inf: torch.Tensor, step: int) -> None:
        """Count one step on the device (no host sync); the stop is noticed at the next ``check``."""
        f = found_inf.to(torch.int64)
        self._consec_t = (self._consec_t + f) * f
        self._total_t = self._total_t + f
        if self.max_nonfinite:
            hit = (self._trigger_t < 0) & (self._consec_t >= self.max_nonfinite)
            self._trigger_t = torch.where(hit, step, self._trigger_t)

    def sync(self) -> None:
        """Bring the device-side counters to the host (one sync; at log rows and checkpoints)."""
        if self.on_device:
            total, consec, trigger = torch.stack([self._total_t, self._consec_t, self._trigger_t]).tolist()
            self.total, self.consecutive = int(total), int(consec)
            if self.trigger < 0 and trigger >= 0:
                self.trigger = int(trigger)

    def check(self, log_dir: str, rank: int) -> None:
        """
        :raises NonFiniteLossError: when the streak reached ``max_nonfinite``, naming the step and
                                    the last good checkpoint to resume from.
        """
        self.sync()
        if self.trigger < 0:
            return
        good = list_complete_checkpoints(log_dir) if rank == 0 or os.path.isdir(log_dir) else []
        if good:
            last = os.path.join(log_dir, f"model{good[-1]:06d}.pt")
            where = f"the last good checkpoint is {last} (step {good[-1]}; resume from it with --resume {last})"
        else:
            where = f"no checkpoint was written to {log_dir} yet"
        raise NonFiniteLossError(
            f"training stopped at step {self.trigger}: {self.max_nonfinite} non-finite steps in a row "
            f"(NaN/inf loss or gradients; those updates were skipped, --max_nonfinite {self.max_nonfinite}); "
            f"{where}. Try a lower --lr, --grad_clip, or another --precision."
        )

    def state_dict(self) -> Dict[str, int]:
        """What the state file records (``nonfinite``)."""
        return {"total": self.total, "consecutive": self.consecutive}


class StopSignals:
    """
    Ctrl-C (SIGINT) and SIGTERM end the run after the current step instead of mid-step (a second
    Ctrl-C stops at once). Only the main thread can install handlers; elsewhere the default
    behaviour stays.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @contextlib.contextmanager
    def installed(self, current_step: Callable[[], int]) -> Iterator[None]:
        """Handle the signals while the block runs; ``current_step()`` names the step in the message."""
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            self.signum = signum
            logger.log(f"{signal.Signals(signum).name}: stopping after step {current_step()}"
                       + (" (with a checkpoint)" if signum == signal.SIGTERM else "")
                       + "; Ctrl-C again stops at once")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def requested(self, step: int, log_interval: int, world_size: int, device: torch.device) -> bool:
        """A signal reached this process (one process) or any rank (several: agreed at log rows,
        so every rank stops after the same step without a sync on the others)."""
        if world_size == 1:
            return self.signum is not None
        if step % log_interval:
            return False
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum:
            self.signum = signum
        return bool(signum)

    def wants_checkpoint(self) -> bool:
        """SIGTERM (what schedulers send before preemption) asks for a checkpoint first."""
        return self.signum == signal.SIGTERM

    def interrupted(self, step: int, log_dir: str) -> TrainingInterrupted:
        """The error that ends the run, naming the checkpoint a rerun resumes from."""
        signum = int(self.signum)
        done = list_complete_checkpoints(log_dir)
        where = (f"the last complete checkpoint is step {done[-1]} ({os.path.join(log_dir, f'state{done[-1]:06d}.pt')})"
                 if done else f"there is no complete checkpoint in {log_dir} yet (the run restarts from step 0)")
        return TrainingInterrupted(f"{signal.Signals(signum).name}: stopped after step {step}; {where}; "
                                   "rerun the same command to resume", signum)


class EmaHorizonWarning:
    """
    Say (once, rank 0) when an EMA has not had time to move off the initial weights: after N
    steps at rate r the initial weights still make up r^N of it, and N < 1/(1-r) (the EMA's
    horizon) leaves more than a third: its checkpoints and sample grids then look like an
    untrained model's (noise), which a short run with upstream's 0.9999 shows.
    """

    def __init__(self, rates: Sequence[float], rank: int):
        self.rates, self.rank, self.warned = list(rates), int(rank), False

    def __call__(self, step: int) -> None:
        """Warn if, after ``step`` steps, an EMA is still mostly the initial weights."""
        if self.rank != 0 or self.warned:
            return
        short = [r for r in self.rates if r < 1 and 1.0 / (1.0 - r) > step]
        if not short:
            return
        self.warned = True
        parts = [f"{r:g} (horizon 1/(1-rate) = {1.0 / (1.0 - r):,.0f} steps; the initial weights are still "
                 f"{100 * r ** step:.0f}% of it)" for r in short]
        logger.warn(f"after {step} steps, EMA rate(s) {'; '.join(parts)} have averaged mostly the initial "
                    "weights: their ema_*.pt files and sample grids still look untrained (noise). For a short run "
                    "use a smaller --ema_rate (e.g. 0.999 for thousands of steps, 0.99 for hundreds), or sample "
                    "the raw weights (--use_ema False)")


class SampleGrid:
    """
    The periodic EMA sample grid: DDIM samples of the first EMA model from the same noise every
    time (grids of one run are comparable), written as ``samples_{step:06d}.png`` by rank 0.
    """

    def __init__(self, config: Optional[Dict[str, Any]], diffusion: Any, seed: int, device: torch.device,
                 autocast: Callable[[], ContextManager], log_dir: str, rank: int):
        """
        :param config: the run's configuration (its diffusion flags build the grid's diffusion).
        :param diffusion: the training diffusion (FDM settings when the config has none).
        :param autocast: the loop's autocast context factory.
        """
        self.config, self.diffusion, self.seed = dict(config or {}), diffusion, int(seed)
        self.device, self.autocast, self.log_dir, self.rank = device, autocast, log_dir, int(rank)
        self._grid_diffusion: Any = None

    def grid_diffusion(self) -> Any:
        """A DDIM respacing of the run's diffusion (at most ``SAMPLE_GRID_DDIM_STEPS``), or False."""
        if self._grid_diffusion is not None:
            return self._grid_diffusion
        cfg = self.config
        if not all(k in cfg for k in ("diffusion_steps", "noise_schedule")):
            logger.warn("--sample_interval: no diffusion flags in the run's config; sample grids are skipped")
            self._grid_diffusion = False
            return False
        args = {k: cfg.get(k, v) for k, v in diffusion_defaults().items()}
        steps = int(args["diffusion_steps"])
        n = min(SAMPLE_GRID_DDIM_STEPS, steps)
        common = dict(
            steps=steps, learn_sigma=args["learn_sigma"], noise_schedule=args["noise_schedule"],
            use_kl=args["use_kl"], predict_xstart=args["predict_xstart"],
            rescale_timesteps=args["rescale_timesteps"], rescale_learned_sigmas=args["rescale_learned_sigmas"],
        )
        # FDM's input scaling: the run's flags (else the training diffusion's own settings)
        common.update({k: cfg.get(k, getattr(self.diffusion, k, v)) for k, v in fdm_defaults().items()})
        try:
            self._grid_diffusion = create_gaussian_diffusion(timestep_respacing=f"ddim{n}", **common)
        except ValueError:  # no stride gives exactly n steps: evenly spaced sections instead
            self._grid_diffusion = create_gaussian_diffusion(timestep_respacing=str(n), **common)
        return self._grid_diffusion

    def sample(self, ema: torch.nn.Module, step: int, num: int = SAMPLE_GRID_SIZE) -> Optional[str]:
        """
        Rank 0: sample ``num`` images from ``ema`` and write the grid of ``step``; other ranks
        return at once.

        :return: the PNG path (rank 0), else None.
        """
        if self.rank != 0:
            return None
        diffusion = self.grid_diffusion()
        if not diffusion:
            return None
        size = int(getattr(ema, "image_size", 0) or self.config.get("image_size", 0))
        channels = int(getattr(ema, "in_channels", 3))
        if not size:
            logger.warn("--sample_interval: unknown image size; sample grid skipped")
            return None
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, 3))
        noise = torch.randn((num, channels, size, size), generator=gen).to(self.device)
        model_kwargs = {}
        num_classes = getattr(ema, "num_classes", None)
        if num_classes:
            model_kwargs["y"] = torch.arange(num, device=self.device) % int(num_classes)
        with torch.no_grad(), self.autocast():
            images = diffusion.ddim_sample_loop(ema, noise.shape, noise=noise, clip_denoised=True,
                                                model_kwargs=model_kwargs, device=self.device)
        path = os.path.join(self.log_dir, f"samples_{step:06d}.png")
        write_grid(images.float().cpu(), path)
        logger.log(f"wrote sample grid {path}")
        return path

    def periodic(self, ema: torch.nn.Module, step: int) -> bool:
        """
        The grid of ``step`` inside ``run_loop``: a picture must never end a training run, so a
        model that cannot sample unconditionally (e.g. super-resolution, which needs low-res
        inputs) just gets no grids.

        :return: False when sampling failed (grids are then off).
        """
        try:
            self.sample(ema, step)
        except Exception as e:  # noqa: BLE001
            logger.warn(f"--sample_interval: sampling a grid failed ({type(e).__name__}: {e}); grids are off")
            return False
        return True
