"""
The training loop (upstream ``TrainLoop``), with the paper's MDLRC schedule, any timestep
sampler (CLTS, SpeeD, ...), loss weightings, mixed precision, exact resume and multi-process
training.

Conventions used throughout:

- ``step`` counts *completed* optimizer updates (all ranks agree). The update performed while
  ``self.step == i`` uses the schedules at ``i`` (lr, beta1, CLTS mixing weight), and a log row
  for it carries ``step = i`` (as upstream). Checkpoint files ``model{N:06d}.pt`` hold the
  weights after N updates, and resuming from them continues with update N.
- Timesteps and noise are drawn for the *global* batch from streams shared by every rank and
  each rank takes its own slice, so a run does not depend on how its global batch is split over
  processes or microbatches. Dropout draws from the global torch generator, re-seeded from
  (seed, step, rank) at every step, so a resumed run draws exactly what the uninterrupted one did.
- Nothing inside a step waits for the device: losses are summed into device tensors and read
  once per log row; non-finite steps are detected and skipped on the device when the optimizer
  is fused (CUDA) and on the host otherwise (CPU, where a "sync" costs nothing). The one other
  exception is a loss-aware sampler, which gathers its losses every step by design.

The fast path (``resolve_fast_path``; all of it on CUDA by default, none of it on the CPU, where
the fp32 path stays bit-exact): bf16 autocast over float32 parameters (no master copies),
channels_last, fused AdamW, ``torch._foreach`` EMA, ``torch.compile`` of the model, the
U-Net's SDPA attention, and no host sync inside the step. ``scripts/benchmark.py`` times it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import signal
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from . import fdm as _fdm
from .checkpoint import (  # noqa: F401  (re-exported: upstream and earlier users import them from here)
    MODEL_FLAGS_IGNORED_ON_RESUME,
    ResumeError,
    ResumePoint,
    check_resume_compatible,
    checkpoint_names,
    find_ema_checkpoint,
    find_resume_checkpoint,
    get_blob_logdir,
    list_complete_checkpoints,
    load_state_file,
    load_weights,
    parse_resume_step_from_filename,
    resolve_resume,
    saved_config,
    unreadable_checkpoint,
)
from .errors import CheckpointWriteError, TrainingInterrupted  # noqa: F401  (re-exported: their old home)
from .files import atomic_torch_save, atomic_write, atomic_write_text  # noqa: F401  (re-exported)
from .fp16_util import INITIAL_LOG_LOSS_SCALE  # noqa: F401  (upstream's name, re-exported)
from .image_io import grid_scale, write_grid  # noqa: F401  (re-exported)
from .nn import update_ema
from .seeding import derive_seed
from .optim import MomentumDecay, create_optimizer
from .resample import LossAwareSampler, UniformSampler
from .options import (  # noqa: F401  (re-exported)
    PRECISIONS,
    parse_ema_rates,
    parse_save_steps,
    resolve_batch_size,
    resolve_fast_path,
    training_defaults,
    validate_training_args,
)
from .resample import loss_weighting as named_loss_weighting

__all__ = [
    "TrainLoop",
    "NonFiniteLossError",
    "ResumeError",
    "ResumePoint",
    "training_defaults",
    "resolve_fast_path",
    "validate_training_args",
    "resolve_resume",
    "check_resume_compatible",
    "list_complete_checkpoints",
    "find_resume_checkpoint",
    "find_ema_checkpoint",
    "parse_resume_step_from_filename",
    "get_blob_logdir",
    "log_loss_dict",
    "atomic_torch_save",
    "atomic_write_text",
    "parse_ema_rates",
    "MODEL_FLAGS_IGNORED_ON_RESUME",
]

# Periodic EMA sample grid: number of images and DDIM steps.
SAMPLE_GRID_SIZE = 16
SAMPLE_GRID_DDIM_STEPS = 50
# Flags of model_and_diffusion_defaults() that change how, not what, is computed; a resumed run
# may change them freely (params stay float32 whatever use_fp16 says: autocast does the rest).
_STATE_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``--max_nonfinite`` non-finite steps in a row."""




def _cpu_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    # Plain, contiguous CPU tensors: loadable anywhere, keys of the uncompiled module.
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _numpy_rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # a tensor, not an ndarray, so the state file loads with torch.load(weights_only=True)
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(s: Dict[str, Any]) -> None:
    keys = s["keys"].numpy() if isinstance(s["keys"], torch.Tensor) else s["keys"]
    np.random.set_state((s["name"], np.asarray(keys).astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def log_loss_dict(diffusion: Any, ts: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
    """
    Upstream's host-side loss logging: the mean of each term and its mean per quartile of t/T
    (``loss_q0`` .. ``loss_q3``). TrainLoop itself accumulates on the device instead.
    """
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


class TrainLoop:
    """
    Train a diffusion model (upstream's ``TrainLoop``, same keyword arguments, plus the new
    ones below). ``run_loop()`` trains until ``total_steps``/``lr_anneal_steps``/``stop_at``.

    Upstream's surface: ``mp_trainer`` (a ``fp16_util.GradScalerTrainer``: upstream's
    ``MixedPrecisionTrainer`` interface over this loop's float32 parameters and loss scaler;
    its master params are the model params), ``opt``, ``ema_params``, ``use_ddp``, ``ddp_model``
    (the DDP wrapper when ``use_ddp``, else the model itself), ``step``/``resume_step``,
    ``global_batch``, and the per-step hooks ``_anneal_lr()``, ``_update_ema()`` and
    ``log_step()``, which ``optimize()`` calls in this order::

        _anneal_lr()                      # lr (and MDLRC's beta1) of the update of step i
        took_step = mp_trainer.optimize(opt)
        if took_step: _update_ema()
        log_step()

    ``step`` is the *global* step (upstream's ``step + resume_step``). Unlike upstream, which
    anneals after the update (so its update i used lr(i - 1)), ``_anneal_lr()`` runs before the
    update and sets the lr of that very update, lr(i). It is the only thing that sets the
    optimizer's lr and betas each step: the lr schedule (``lr_schedule``, default from ``lr``
    and ``lr_anneal_steps``) with MDLRC on top (``schedules.WithMomentumDecay``). A subclass
    that overrides ``_anneal_lr`` therefore decides the lr of the step (it wins); one that calls
    ``super()._anneal_lr()`` first and then changes ``param_group["lr"]`` composes with the
    schedule and MDLRC. The logged ``lr``/``beta1`` are read back from the optimizer after it.

    :param model: the model (float32 parameters; mixed precision is autocast).
    :param diffusion: the (possibly respaced) GaussianDiffusion.
    :param data: an iterable of ``(images NCHW in [-1, 1], {"y": labels} or {})``; with
                 ``state_dict()``/``load_state_dict()`` its position is part of the checkpoints.
    :param batch_size: images per step and process.
    :param microbatch: images per forward/backward (-1/0: the whole batch).
    :param lr: base learning rate.
    :param ema_rate: EMA rate(s), "0.9999,0.999" or a float.
    :param log_interval: steps between log rows.
    :param save_interval: steps between checkpoints (0: only at the end/``stop_at``).
    :param save_steps: extra steps at which a checkpoint set is saved (e.g. "3906,39062", the ends of
                       epochs 10 and 100 of CIFAR-10 at batch 128: the paper's Fig. 4 endpoints).
    :param resume_checkpoint: upstream's explicit ``modelNNNNNN.pt`` to resume from.
    :param use_fp16: upstream's flag; the same as ``precision="fp16"``.
    :param fp16_scale_growth: log2 loss-scale growth per good fp16 step (upstream's meaning).
    :param schedule_sampler: timestep sampler (default: uniform, seeded with ``seed``).
    :param weight_decay: AdamW's decoupled weight decay.
    :param lr_anneal_steps: anneal the lr linearly to 0 over this many steps; the run ends there
                            (``schedules.LinearDecayLR``).
    :param total_steps: the run's length I (ends there; MDLRC's horizon). 0: no end.
    :param stop_at: end this process at this step after a checkpoint (0: off).
    :param loss_weighting: per-timestep loss weights: a name ("none", "min_snr", "p2",
                           "speed") or a length-T array.
    :param loss_weighting_options: options of a named ``loss_weighting``, named as the flags
                                   (``min_snr_gamma``, ``predict_xstart``, ``p2_k``, ``p2_gamma``,
                                   ``speed_lambda``, ``speed_tau``); None: the weighting's defaults.
    :param fdm_warmup_steps: FDM's loss-weight warm-up, used when ``diffusion.fdm``: the MSE
                             term of step i is multiplied by min(1, clamp(i) * sigma_t^2),
                             clamp(i) = 5 * 100**(i / W) for i < W (then 1), a function of the
                             global step (``fdm.warmup_clamp``); 0: off.
    :param beta1: Adam's beta1 (beta1_init of MDLRC).
    :param beta2: Adam's beta2.
    :param momentum_decay: MDLRC momentum decay on.
    :param beta1_min: MDLRC's floor of beta1.
    :param lr_compensation: MDLRC's learning-rate compensation.
    :param decay_beta1: False: the lr-only control (MDLRC's lr, beta1 held at ``beta1``).
    :param precision: "auto" | "fp32" | "bf16" | "fp16" (auto: bf16 on CUDA, fp32 on CPU).
    :param compile: torch.compile the model's forward (auto: on CUDA).
    :param compile_mode: ``torch.compile`` mode (None/"default", "reduce-overhead" for CUDA
                         graphs, "max-autotune", ...).
    :param channels_last: channels_last memory format (auto: on CUDA).
    :param fused_optimizer: fused AdamW kernel, which also skips non-finite steps on the device
                            (auto: when every parameter is on CUDA).
    :param grad_clip: clip the global gradient norm to this (0: off).
    :param sample_interval: steps between EMA sample grids written to the run folder (0: off).
    :param log_dir: the run folder (default: the logger's folder).
    :param seed: seeds timesteps, noise and dropout (the caller seeds model init and data).
    :param resume: "auto" | "none" | a checkpoint path, or the ``ResumePoint`` a caller already
                   resolved and checked (``run_folder.prepare_resume``), so it is not looked up again.
    :param max_nonfinite: stop after this many non-finite steps in a row (0: never).
    :param deterministic: torch deterministic algorithms (cuDNN benchmark off).
    :param config: the run's resolved configuration (saved in the state file; used to refuse
                   resuming with other model flags and to build the sample-grid diffusion).
    :param lr_schedule: the base-lr schedule, any object with ``lr_at(step)`` (e.g. a
                        ``schedules.LRSchedule`` subclass such as a warm-up); MDLRC multiplies
                        it. Default: ``LinearDecayLR(lr, lr_anneal_steps)`` or ``ConstantLR(lr)``.
                        It replaces ``lr_anneal_steps`` (set ``total_steps`` for the run's end)
                        and its ``lr`` attribute, when it has one, must equal ``lr``.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: Any,
        data: Iterable,
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate: Union[str, float, Sequence[float]],
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str = "",
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        schedule_sampler: Any = None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        total_steps: int = 0,
        stop_at: int = 0,
        loss_weighting: Union[str, np.ndarray, Sequence[float], None] = None,
        loss_weighting_options: Optional[Dict[str, Any]] = None,
        fdm_warmup_steps: int = _fdm.DEFAULT_WARMUP_STEPS,
        beta1: float = 0.9,
        beta2: float = 0.999,
        momentum_decay: bool = False,
        beta1_min: float = 0.5,
        lr_compensation: bool = True,
        decay_beta1: bool = True,
        precision: str = "auto",
        compile: Union[bool, str] = "auto",
        channels_last: Union[bool, str] = "auto",
        fused_optimizer: Union[bool, str] = "auto",
        compile_mode: Optional[str] = None,
        grad_clip: float = 0.0,
        sample_interval: int = 0,
        save_steps: Union[str, Sequence[int], None] = "",
        log_dir: Optional[str] = None,
        seed: int = 0,
        resume: Union[str, ResumePoint] = "auto",
        max_nonfinite: int = 20,
        deterministic: bool = False,
        config: Optional[Dict[str, Any]] = None,
        lr_schedule: Any = None,
    ):
        validate_training_args(dict(
            batch_size=batch_size, microbatch=microbatch, lr=lr, ema_rate=ema_rate, log_interval=log_interval,
            save_interval=save_interval, fp16_scale_growth=fp16_scale_growth, weight_decay=weight_decay,
            lr_anneal_steps=lr_anneal_steps, total_steps=total_steps, stop_at=stop_at, beta1=beta1, beta2=beta2,
            momentum_decay=momentum_decay, beta1_min=beta1_min, grad_clip=grad_clip, sample_interval=sample_interval,
            seed=seed, max_nonfinite=max_nonfinite, compile=compile, channels_last=channels_last,
            precision=precision, use_fp16=use_fp16, resume=resume,
        ))
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = int(batch_size)
        self.microbatch = int(microbatch) if microbatch and microbatch > 0 else self.batch_size
        self.lr = float(lr)
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = int(log_interval)
        self.save_interval = int(save_interval)
        self.save_steps = set(parse_save_steps(save_steps))
        self.resume_checkpoint = resume_checkpoint or ""
        self.fp16_scale_growth = float(fp16_scale_growth)
        self.weight_decay = float(weight_decay)
        self.lr_anneal_steps = int(lr_anneal_steps)
        self.total_steps = int(total_steps)
        self.stop_at = int(stop_at)
        self.grad_clip = float(grad_clip)
        self.sample_interval = int(sample_interval)
        self.seed = int(seed)
        self.max_nonfinite = int(max_nonfinite)
        self.config = dict(config) if config is not None else None

        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.device = dist_util.dev()
        self.global_batch = self.batch_size * self.world_size
        on_cuda = self.device.type == "cuda"
        fast = resolve_fast_path(self.device, precision, bool(use_fp16), compile, channels_last, fused_optimizer)
        self.precision = fast["precision"]
        self.use_fp16 = self.precision == "fp16"
        self.use_compile = fast["compile"]
        self.compile_mode = None if compile_mode in (None, "", "default") else str(compile_mode)
        self.channels_last = fast["channels_last"]
        self.log_dir = log_dir or get_blob_logdir()
        if not self.log_dir:
            raise ValueError("TrainLoop needs a run folder: pass log_dir= or call logger.configure() first")
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif on_cuda:
            torch.backends.cudnn.benchmark = True
        if on_cuda and self.precision == "fp32":
            # fp32 means float32 arithmetic: cuDNN would otherwise run convolutions in TF32
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

        if schedule_sampler is None:
            # rank 0's stream on every rank: the global batch's timesteps are drawn once, sliced by rank
            schedule_sampler = UniformSampler(diffusion, seed=self.seed, rank=0)
        self.schedule_sampler = schedule_sampler
        self.loss_weights = self._loss_weight_table(loss_weighting, loss_weighting_options)
        self.fdm_warmup_steps = int(fdm_warmup_steps)
        self._fdm_sigma2 = self._fdm_warmup_table()
        self.momentum = MomentumDecay(
            beta1=beta1, beta1_min=beta1_min, total_steps=(self.total_steps or None),
            lr_compensation=lr_compensation, enabled=bool(momentum_decay), decay_beta1=bool(decay_beta1),
        )
        from .schedules import WithMomentumDecay, lr_schedule_from_flags

        if lr_schedule is None:
            lr_schedule = lr_schedule_from_flags(self.lr, self.lr_anneal_steps)
        else:
            if not callable(getattr(lr_schedule, "lr_at", None)):
                raise TypeError(f"lr_schedule needs an lr_at(step) method, got {lr_schedule!r}")
            if self.lr_anneal_steps:
                raise ValueError("lr_schedule replaces --lr_anneal_steps' linear decay: pass one or the other "
                                 "(set total_steps to end the run at a given step)")
            own_lr = getattr(lr_schedule, "lr", None)
            if own_lr is not None and float(own_lr) != self.lr:
                raise ValueError(f"lr_schedule's lr ({float(own_lr):g}) differs from lr ({self.lr:g})")
        self.lr_schedule = lr_schedule
        # the lr and beta1 of every step: the base schedule, with MDLRC multiplying its lr
        self.opt_schedule = WithMomentumDecay(self.lr_schedule, self.momentum)
        self.beta2 = float(beta2)

        self.step = 0
        self.resume_step = 0
        self._nf_total = 0  # non-finite steps skipped, whole run (host copy, refreshed at checks)
        self._gpu_hours_before = 0.0
        point = resolve_resume(self.log_dir, resume, self.resume_checkpoint, self.ema_rate)
        if point is not None:
            check_resume_compatible(point, self.config, self.model)
            newer = [s for s in list_complete_checkpoints(self.log_dir) if s > point.step]
            if point.how != "auto" and newer:
                logger.warn(f"{point.how} resumes from step {point.step} although {self.log_dir} has a newer "
                            f"complete checkpoint set (step {newer[-1]}); later checkpoints will be overwritten")
        elif list_complete_checkpoints(self.log_dir):
            logger.warn(f"--resume {resume}: starting from step 0 in {self.log_dir}, which has checkpoints up to step "
                        f"{list_complete_checkpoints(self.log_dir)[-1]}; they are overwritten as the run reaches them")
        self.model.to(self.device)
        if point is not None:
            self.model.load_state_dict(load_weights(point.model_path))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model_params = list(self.model.parameters())

        self.ema_models: List[torch.nn.Module] = []
        for rate in self.ema_rate:
            ema = copy.deepcopy(self.model)
            if point is not None and rate in point.ema_paths:
                ema.load_state_dict(load_weights(point.ema_paths[rate]))
            elif point is not None:
                logger.warn(f"no EMA checkpoint for rate {rate} at step {point.step}: starting it from the model")
            ema.eval().requires_grad_(False)
            self.ema_models.append(ema)

        opt_kwargs: Dict[str, Any] = {}
        if str(fused_optimizer).strip().lower() != "auto":
            # only when asked: "auto" leaves the choice to create_optimizer (fused when on CUDA)
            opt_kwargs["fused"] = fast["fused_optimizer"]
        self.opt = create_optimizer(self.model_params, lr=self.lr, weight_decay=self.weight_decay,
                                    beta1=beta1, beta2=self.beta2, **opt_kwargs)
        self.fused_optimizer = bool(self.opt.defaults.get("fused"))
        self.scaler = None
        if self.use_fp16:
            self.scaler = torch.amp.GradScaler(
                self.device.type, init_scale=2.0 ** INITIAL_LOG_LOSS_SCALE, growth_factor=2.0, backoff_factor=0.5,
                growth_interval=max(1, int(round(1.0 / self.fp16_scale_growth))),
            )
        if point is not None:
            self._load_checkpoint(point)
        from .fp16_util import GradScalerTrainer

        self._ema_keep: Optional[torch.Tensor] = None  # set by each step: None, or "not skipped" on the device
        self.mp_trainer = GradScalerTrainer(
            model=self.model, model_params=self.model_params, scaler=self.scaler, use_fp16=self.use_fp16,
            fp16_scale_growth=self.fp16_scale_growth, step_fn=self._step_optimizer,
        )
        self.sync_cuda = on_cuda

        # upstream: ddp_model is the DDP wrapper when distributed, else the model itself
        self.use_ddp = self.world_size > 1
        self.ddp_model: torch.nn.Module = self.model
        forward_model: torch.nn.Module = self.model
        if self.use_ddp:
            dist_util.sync_params(self.model.parameters())
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if on_cuda else None,
                output_device=self.device if on_cuda else None,
                broadcast_buffers=False,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
            forward_model = self.ddp_model
        if self.use_compile:
            # The raw module stays self.model (checkpoints keep its keys, EMA copies it). Under DDP
            # the wrapper is compiled, as PyTorch recommends: DDP's hooks run eagerly and the
            # module's graph is split at the gradient buckets.
            forward_model = torch.compile(forward_model, mode=self.compile_mode)
        self.forward_model = forward_model

        if self.precision == "fp32":
            self._autocast = contextlib.nullcontext
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self._autocast = functools.partial(torch.autocast, device_type=self.device.type, dtype=dtype)

        # device-side accumulators, read once per log row
        self._loss_keys: Optional[List[str]] = None
        self._loss_sums: Optional[torch.Tensor] = None  # [keys, 4] sums per quartile of t/T
        self._loss_counts = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._grad_norm = torch.zeros((), dtype=torch.float32, device=self.device)
        self._nf_consec_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._nf_total_t = torch.full((), self._nf_total, dtype=torch.int64, device=self.device)
        self._nf_trigger_t = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._nf_consec = 0
        self._nf_trigger = -1
        self._noise_gen = torch.Generator(device=self.device)
        self._grid_diffusion = None
        self._data_iter = None
        self._cur_lr = self.lr
        self._cur_beta1 = float(beta1)
        self._t_start = None
        self._t_last = None
        self._steps_since_log = 0
        self._last_saved_step = point.step if point is not None else -1
        if point is not None:
            logger.log(f"resumed from step {point.step} ({point.describe()})")
            # rows an interrupted run logged after this checkpoint are logged again from here on
            dropped = logger.drop_rows_from(point.step, key="step")
            if dropped:
                logger.log(f"dropped {dropped} progress row(s) of steps >= {point.step}, logged after the "
                           "checkpoint by the interrupted run (they are logged again)")
            if point.state_path is None:
                logger.warn("the checkpoint has no state file: the sampler, data position and RNG streams "
                            "start fresh (the weights and optimizer continue)")
        if self._end_step() is None and not self.stop_at:
            logger.warn("no --total_steps, --lr_anneal_steps or --stop_at: training runs until it is stopped "
                        "(as upstream)")

    # ------------------------------------------------------------------ setup helpers

    def _loss_weight_table(self, weighting: Any, options: Optional[Dict[str, Any]] = None) -> Optional[torch.Tensor]:
        if weighting is None or (isinstance(weighting, str) and weighting.strip().lower() in ("", "none", "uniform")):
            return None
        loss_type = getattr(getattr(self.diffusion, "loss_type", None), "name", "MSE")
        if loss_type in ("KL", "RESCALED_KL"):
            raise ValueError("--loss_weighting weights the MSE term of the loss, and --use_kl True trains on the "
                             "variational bound alone (no MSE term); use one or the other")
        if isinstance(weighting, str):
            arr = named_loss_weighting(weighting, self.diffusion, **dict(options or {}))
        else:
            if options:
                raise ValueError("loss_weighting_options only apply to a named loss_weighting; the weights "
                                 "were given as an array")
            arr = np.asarray(weighting, dtype=np.float64)
        T = int(self.diffusion.num_timesteps)
        if arr.shape != (T,):
            raise ValueError(f"--loss_weighting: expected one weight per diffusion step ({T}), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("--loss_weighting: the weights must be finite")
        return torch.as_tensor(arr, dtype=torch.float32, device=self.device)

    def _fdm_warmup_table(self) -> Optional[torch.Tensor]:
        """sigma_t^2 = (1 - abar_t) / abar_t on the device when FDM's warm-up is on, else None."""
        _fdm.check_fdm_options(warmup_steps=self.fdm_warmup_steps)
        if not getattr(self.diffusion, "fdm", False) or self.fdm_warmup_steps <= 0:
            return None
        loss_type = getattr(getattr(self.diffusion, "loss_type", None), "name", "MSE")
        if loss_type in ("KL", "RESCALED_KL"):
            raise ValueError("--fdm_warmup_steps weights the MSE term of the loss, and --use_kl True trains on the "
                             "variational bound alone (no MSE term); set --fdm_warmup_steps 0 or --use_kl False")
        abar = np.asarray(self.diffusion.alphas_cumprod, dtype=np.float64)
        return torch.as_tensor((1.0 - abar) / abar, dtype=torch.float32, device=self.device)

    def fdm_warmup_weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """
        FDM's warm-up factor on the MSE term of step ``self.step`` for timesteps ``t``:
        min(1, clamp(step) * sigma_t^2), or None when the warm-up is off or over.
        """
        if self._fdm_sigma2 is None:
            return None
        clamp = _fdm.warmup_clamp(self.step, self.fdm_warmup_steps)
        if math.isinf(clamp):
            return None
        return torch.clamp(self._fdm_sigma2[t] * clamp, max=1.0)

    def _load_checkpoint(self, point: ResumePoint) -> None:
        """Optimizer, loss scaler, sampler, data position, RNG and counters from a checkpoint set."""
        self.step = self.resume_step = int(point.step)
        if point.opt_path:
            fresh = [dict(g) for g in self.opt.param_groups]
            self.opt.load_state_dict(load_weights(point.opt_path))
            for group, new in zip(self.opt.param_groups, fresh):
                # the flags of this run win (MDLRC sets lr/beta1 every step); keep this run's kernel choice
                for key in ("fused", "foreach", "capturable", "differentiable", "weight_decay"):
                    if key in new:
                        group[key] = new[key]
                group["betas"] = (group["betas"][0], self.beta2)
            self._match_opt_state_layout()
        else:
            logger.warn(f"no optimizer checkpoint for step {point.step}: the AdamW moments start from zero")
        state = point.load_state()
        if state is None:
            return
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if state.get("sampler") is not None and hasattr(self.schedule_sampler, "load_state_dict"):
            try:
                self.schedule_sampler.load_state_dict(state["sampler"])
            except (ValueError, KeyError) as e:
                logger.warn(f"schedule sampler state not restored ({e}); its random stream starts fresh")
        saved_world = int(state.get("world_size", 1))
        per_rank = state.get("per_rank") or []
        if saved_world == self.world_size and self.rank < len(per_rank):
            mine = per_rank[self.rank]
            self._restore_rng(mine.get("rng"))
            if mine.get("data") is not None:
                if hasattr(self.data, "load_state_dict"):
                    self.data.load_state_dict(mine["data"])
                else:
                    logger.warn("the data loader has no load_state_dict(): its position starts fresh")
        else:
            logger.warn(f"the checkpoint was written by {saved_world} process(es), this run has {self.world_size}: "
                        "the data position and RNG streams start fresh (the run continues, not bit-identically)")
        nf = state.get("nonfinite") or {}
        self._nf_total = int(nf.get("total", 0))
        self._gpu_hours_before = float(state.get("gpu_hours", 0.0))

    def _match_opt_state_layout(self) -> None:
        # Moments saved by a run with another --channels_last have the other memory format; give
        # them the parameter's (same values) so the fused/foreach kernels see matching strides.
        for p in self.model_params:
            state = self.opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    def _restore_rng(self, rng: Optional[Dict[str, Any]]) -> None:
        if not rng:
            return
        if rng.get("torch_cpu") is not None:
            torch.set_rng_state(rng["torch_cpu"])
        if rng.get("torch_cuda") is not None and torch.cuda.is_available():
            states = rng["torch_cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        if rng.get("numpy") is not None:
            _set_numpy_rng_state(rng["numpy"])
        if rng.get("python") is not None:
            random.setstate(rng["python"])

    def _rng_state(self) -> Dict[str, Any]:
        return {
            "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": _numpy_rng_state(),
            "python": random.getstate(),
        }

    @property
    def ema_params(self) -> List[List[torch.nn.Parameter]]:
        """One parameter list per EMA rate (upstream's attribute)."""
        return [list(ema.parameters()) for ema in self.ema_models]

    def _end_step(self) -> Optional[int]:
        ends = [s for s in (self.total_steps, self.lr_anneal_steps) if s]
        return min(ends) if ends else None

    # ------------------------------------------------------------------ the loop

    def run_loop(self) -> None:
        """Train until total_steps / lr_anneal_steps / stop_at (whichever comes first)."""
        end = self._end_step()
        target = min([s for s in (end, self.stop_at or None) if s is not None], default=None)
        if target is not None and self.step >= target:
            logger.log(f"nothing to do: the run is at step {self.step}, which reaches "
                       + ("--stop_at" if target == self.stop_at else "its end") + f" ({target})")
            return
        if self._data_iter is None:
            self._data_iter = iter(self.data)  # before the clock starts: a loader may take a while to set up
        self._t_start = self._t_last = time.perf_counter()
        with self._stop_on_signals():
            while target is None or self.step < target:
                self.run_iteration(target)
                if (self.save_interval and self.step % self.save_interval == 0) or self.step == target \
                        or self.step in self.save_steps:
                    self.save()
                if self.sample_interval and self.step % self.sample_interval == 0:
                    self._periodic_grid()
                if self._stop_requested():
                    self._stop()
        self._check_nonfinite()
        self._warn_short_ema()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """
        Ctrl-C (SIGINT) and SIGTERM end the run after the current step instead of mid-step (a
        second Ctrl-C stops at once). Only the main thread can install handlers; elsewhere the
        default behaviour stays.
        """
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            self._signal = signum
            logger.log(f"{signal.Signals(signum).name}: stopping after step {self.step}"
                       + (" (with a checkpoint)" if signum == signal.SIGTERM else "")
                       + "; Ctrl-C again stops at once")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _warn_short_ema(self) -> None:
        """
        Say (once, rank 0) when an EMA has not had time to move off the initial weights: after N
        steps at rate r the initial weights still make up r^N of it, and N < 1/(1-r) (the EMA's
        horizon) leaves more than a third: its checkpoints and sample grids then look like an
        untrained model's (noise), which a short run with upstream's 0.9999 shows.
        """
        if self.rank != 0 or getattr(self, "_warned_short_ema", False):
            return
        short = [r for r in self.ema_rate if r < 1 and 1.0 / (1.0 - r) > self.step]
        if not short:
            return
        self._warned_short_ema = True
        parts = [f"{r:g} (horizon 1/(1-rate) = {1.0 / (1.0 - r):,.0f} steps; the initial weights are still "
                 f"{100 * r ** self.step:.0f}% of it)" for r in short]
        logger.warn(f"after {self.step} steps, EMA rate(s) {'; '.join(parts)} have averaged mostly the initial "
                    "weights: their ema_*.pt files and sample grids still look untrained (noise). For a short run "
                    "use a smaller --ema_rate (e.g. 0.999 for thousands of steps, 0.99 for hundreds), or sample "
                    "the raw weights (--use_ema False)")

    def _stop_requested(self) -> bool:
        """A stop signal reached this process (one process) or any rank (several: agreed at log rows,
        so every rank stops after the same step without a sync on the others)."""
        if self.world_size == 1:
            return self._signal is not None
        if self.step % self.log_interval:
            return False
        flag = torch.tensor([0 if self._signal is None else int(self._signal)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum:
            self._signal = signum
        return bool(signum)

    def _stop(self) -> None:
        """Checkpoint at SIGTERM (schedulers send it before preemption), then raise TrainingInterrupted."""
        signum = int(self._signal)
        if signum == signal.SIGTERM and self._last_saved_step != self.step:
            self.save()
        done = list_complete_checkpoints(self.log_dir)
        where = (f"the last complete checkpoint is step {done[-1]} ({os.path.join(self.log_dir, f'state{done[-1]:06d}.pt')})"
                 if done else f"there is no complete checkpoint in {self.log_dir} yet (the run restarts from step 0)")
        raise TrainingInterrupted(f"{signal.Signals(signum).name}: stopped after step {self.step}; {where}; "
                                  "rerun the same command to resume", signum)

    def run_iteration(self, target: Optional[int] = None) -> int:
        """
        One iteration of ``run_loop`` without its checkpoints and sample grids: seed the step's
        random streams, take the next batch, ``run_step`` it and write the log row when one is
        due (every ``log_interval`` steps and at ``target``). With the fused optimizer the log
        row is the only host sync (``scripts/benchmark.py`` times this).

        :param target: the step the run ends at (its last step gets a log row), or None.
        :return: the index of the step just done.
        """
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        if self._t_start is None:
            self._t_start = self._t_last = time.perf_counter()
        self._seed_step(self.step)
        batch, cond = next(self._data_iter)
        self.run_step(batch, cond)
        index = self.step
        self.step += 1
        self._steps_since_log += 1
        if index % self.log_interval == 0 or self.step == target:
            self._dump_logs(index)
        return index

    def _seed_step(self, step: int) -> None:
        # Dropout (and anything else on the global generators) becomes a function of
        # (seed, step, rank): exact resume without per-rank generator bookkeeping.
        torch.manual_seed(derive_seed(self.seed, step, 1, self.rank))
        # Noise is shared by all ranks (each takes its slice of the global batch's noise).
        self._noise_gen.manual_seed(derive_seed(self.seed, step, 2))

    def run_step(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """One optimizer step on ``batch`` (this process's share of the global batch)."""
        self.forward_backward(batch, cond)
        self.optimize()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.device == self.device:
            return x
        if self.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def _draw_timesteps(self, local_batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch's (t, weights), on the device."""
        if hasattr(self.schedule_sampler, "set_step"):
            self.schedule_sampler.set_step(self.step)
        n = local_batch * self.world_size
        t, w = self.schedule_sampler.sample(n, torch.device("cpu"))
        lo = self.rank * local_batch
        t = self._to_device(t[lo:lo + local_batch].to(torch.int64))
        w = self._to_device(w[lo:lo + local_batch].to(torch.float32))
        return t, w

    def weighted_objective(self, t: torch.Tensor, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        The per-sample loss that is optimised: ``w(t) * mse + vb`` under a loss weighting (the
        variational-bound term of a learned-sigma model is left unweighted, as in the Min-SNR,
        P2 and SpeeD authors' code), else upstream's ``losses["loss"]``.

        With FDM's warm-up (``fdm_warmup_weights``) its factor multiplies the MSE term too.

        :param t: the samples' timesteps.
        :param losses: ``diffusion.training_losses`` output (``"mse"``, optional ``"vb"``).
        """
        warmup = self.fdm_warmup_weights(t)
        if self.loss_weights is None and warmup is None:
            return losses["loss"]
        objective = losses["mse"]
        if self.loss_weights is not None:
            objective = self.loss_weights[t] * objective
        if warmup is not None:
            objective = warmup * objective
        if "vb" in losses:
            objective = objective + losses["vb"]
        return objective

    def forward_backward(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """Gradients of the (weighted) mean loss over ``batch``, accumulated over microbatches."""
        self.opt.zero_grad(set_to_none=True)
        batch = self._to_device(batch)
        cond = {k: self._to_device(v) for k, v in (cond or {}).items()}
        B = batch.shape[0]
        t_all, w_all = self._draw_timesteps(B)
        noise_shape = (B * self.world_size,) + tuple(batch.shape[1:])
        noise_all = torch.randn(noise_shape, generator=self._noise_gen, device=self.device, dtype=batch.dtype)
        lo = self.rank * B
        noise_all = noise_all[lo:lo + B]
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
            noise_all = noise_all.contiguous(memory_format=torch.channels_last)
        for i in range(0, B, self.microbatch):
            j = min(i + self.microbatch, B)
            micro, t, weights = batch[i:j], t_all[i:j], w_all[i:j]
            micro_cond = {k: v[i:j] for k, v in cond.items()}
            last = j >= B
            sync_ctx = self.ddp_model.no_sync() if (self.use_ddp and not last) else contextlib.nullcontext()
            with sync_ctx:
                with self._autocast():
                    losses = self.diffusion.training_losses(
                        self.forward_model, micro, t, model_kwargs=micro_cond, noise=noise_all[i:j]
                    )
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self._update_loss_aware(t, losses["loss"].detach())
                # sum / B (not upstream's sum of microbatch means): microbatching never changes the step
                if self.loss_weights is not None or self._fdm_sigma2 is not None:
                    # the logged mse/vb stay the unweighted terms; "loss" is what is optimised
                    losses = dict(losses, loss=self.weighted_objective(t, losses))
                loss = (losses["loss"].float() * weights).sum() / B
                self._accumulate(t, weights, losses)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()

    def _update_loss_aware(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        # the sampler syncs anyway (it gathers losses); keep NaN/inf out of its history
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            t, losses = t[finite], losses[finite]
        self.schedule_sampler.update_with_local_losses(t, losses)

    def _accumulate(self, t: torch.Tensor, weights: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
        if self._loss_keys is None:
            self._loss_keys = [k for k, v in losses.items() if torch.is_tensor(v) and v.shape == t.shape]
            self._loss_sums = torch.zeros(len(self._loss_keys), 4, dtype=torch.float64, device=self.device)
        T = int(self.diffusion.num_timesteps)
        quartile = torch.clamp(t * 4 // T, max=3)
        for row, key in enumerate(self._loss_keys):
            value = (losses[key].detach().double() * weights.double())
            self._loss_sums[row].index_add_(0, quartile, value)
        self._loss_counts.index_add_(0, quartile, torch.ones_like(t, dtype=torch.float64))

    def optimize(self) -> bool:
        """
        The update of step ``self.step``: ``_anneal_lr()`` (lr and beta1 of this step), then
        ``mp_trainer.optimize(opt)`` (unscale, clip, skip a step whose gradients are not finite,
        step AdamW), ``_update_ema()`` when the step was taken, and ``log_step()``.

        :return: False when the step was skipped and the host knows it (CPU / unfused optimizer);
                 True otherwise (a device-side skip is counted and reported at the next log row).
        """
        self._anneal_lr()
        self._read_back_hparams()
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
        self.log_step()
        return took_step

    def _anneal_lr(self) -> None:
        """
        Set the optimizer's lr and beta1 for the update of step ``self.step`` (upstream's hook):
        ``opt_schedule.apply`` = the base lr schedule with MDLRC on top,
        lr(i) = momentum.lr_at(i, lr_schedule.lr_at(i)), beta1(i) = momentum.beta1_at(i).

        Runs at the start of ``optimize()``, before the update, and nothing after it sets the lr
        or betas: an override decides them (call ``super()._anneal_lr()`` first to adjust the
        scheduled values instead). ``self.step`` is the global step (upstream's
        ``step + resume_step``).
        """
        self._cur_lr, self._cur_beta1 = self.opt_schedule.apply(self.opt, self.step)

    def _read_back_hparams(self) -> None:
        """Log the lr and beta1 the optimizer will really use (whatever ``_anneal_lr`` did).
        Tensor-valued hyperparameters (capturable optimizers) are not read: that would sync."""
        group = self.opt.param_groups[0]
        lr = group.get("lr")
        if lr is not None and not torch.is_tensor(lr):
            self._cur_lr = float(lr)
        betas = group.get("betas")
        if betas is not None and not torch.is_tensor(betas[0]):
            self._cur_beta1 = float(betas[0])

    def _step_optimizer(self, opt: torch.optim.Optimizer) -> bool:
        """
        ``mp_trainer.optimize(opt)``: unscale the gradients, record their norm, clip them, and
        step ``opt`` unless a gradient is not finite (decided on the device with a fused
        optimizer, on the host otherwise); count skipped steps. Sets ``_ema_keep`` for
        ``_update_ema()``.

        :return: False when the step was skipped and the host knows it; True otherwise.
        """
        fused = self.fused_optimizer if opt is self.opt else bool(getattr(opt, "defaults", {}).get("fused"))
        grads = [p.grad for p in self.model_params if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        else:
            norm = torch.zeros((), device=self.device)
        self._grad_norm = norm.detach()
        found_inf = ~torch.isfinite(norm)
        if self.grad_clip > 0 and grads:
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)

        if fused:
            # skipped on the device: no host sync
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.found_inf = found_inf.float()
                opt.grad_scale = None
                try:
                    opt.step()
                finally:
                    del opt.found_inf, opt.grad_scale
            self._ema_keep = ~found_inf  # the EMAs stay put on a skipped step, decided on the device
            self._count_nonfinite_device(found_inf)
            return True

        skipped = bool(found_inf)  # host sync: free on the CPU, where this path runs
        if self.scaler is not None:
            self.scaler.step(opt)  # skips by itself on overflow
            self.scaler.update()
        elif not skipped:
            opt.step()
        self._ema_keep = None
        self._count_nonfinite_host(skipped)
        return not skipped

    def _update_ema(self) -> None:
        """
        Upstream's hook: move every EMA toward the parameters at its rate,
        ema <- rate * ema + (1 - rate) * param. After a step that the fused optimizer skipped on
        the device, the EMAs stay unchanged (decided on the device too).
        """
        self._ema_update(keep=self._ema_keep)

    def _ema_update(self, keep: Optional[torch.Tensor]) -> None:
        for rate, ema in zip(self.ema_rate, self.ema_models):
            targets = list(ema.parameters())
            if keep is None:
                update_ema(targets, self.model_params, rate=rate)
            else:
                # rate 1 (no change) on a skipped step, decided on the device. (Not
                # torch._foreach_lerp_: with a tensor weight it reads the weight on the host.)
                r = torch.where(keep, rate, 1.0)
                one_minus = torch.where(keep, 1.0 - rate, 0.0)
                torch._foreach_mul_(targets, r)
                torch._foreach_add_(targets, torch._foreach_mul([p.detach() for p in self.model_params], one_minus))

    def _count_nonfinite_host(self, skipped: bool) -> None:
        if skipped:
            self._nf_total += 1
            self._nf_consec += 1
            logger.log(f"step {self.step}: non-finite loss or gradient, update skipped "
                       f"({self._nf_consec} in a row)")
            if self.max_nonfinite and self._nf_consec >= self.max_nonfinite and self._nf_trigger < 0:
                self._nf_trigger = self.step
                self._check_nonfinite()
        else:
            self._nf_consec = 0

    def _count_nonfinite_device(self, found_inf: torch.Tensor) -> None:
        f = found_inf.to(torch.int64)
        self._nf_consec_t = (self._nf_consec_t + f) * f
        self._nf_total_t = self._nf_total_t + f
        if self.max_nonfinite:
            hit = (self._nf_trigger_t < 0) & (self._nf_consec_t >= self.max_nonfinite)
            self._nf_trigger_t = torch.where(hit, self.step, self._nf_trigger_t)

    def _sync_nonfinite(self) -> None:
        """Bring the device-side counters to the host (one sync; at log rows and checkpoints)."""
        if self.fused_optimizer:
            total, consec, trigger = torch.stack([self._nf_total_t, self._nf_consec_t, self._nf_trigger_t]).tolist()
            self._nf_total, self._nf_consec = int(total), int(consec)
            if self._nf_trigger < 0 and trigger >= 0:
                self._nf_trigger = int(trigger)

    def _check_nonfinite(self) -> None:
        self._sync_nonfinite()
        if self._nf_trigger < 0:
            return
        good = list_complete_checkpoints(self.log_dir) if self.rank == 0 or os.path.isdir(self.log_dir) else []
        if good:
            last = os.path.join(self.log_dir, f"model{good[-1]:06d}.pt")
            where = f"the last good checkpoint is {last} (step {good[-1]}; resume from it with --resume {last})"
        else:
            where = f"no checkpoint was written to {self.log_dir} yet"
        raise NonFiniteLossError(
            f"training stopped at step {self._nf_trigger}: {self.max_nonfinite} non-finite steps in a row "
            f"(NaN/inf loss or gradients; those updates were skipped, --max_nonfinite {self.max_nonfinite}); "
            f"{where}. Try a lower --lr, --grad_clip, or another --precision."
        )

    # ------------------------------------------------------------------ logging

    def log_step(self) -> None:
        """
        Upstream's per-step log keys: ``step`` (the step being done, global) and ``samples``
        (images seen once it is done, over all ranks). Called by ``optimize()`` every step; the
        log row of the step writes the same two values.
        """
        logger.logkv("step", self.step)
        logger.logkv("samples", (self.step + 1) * self.global_batch)

    def _dump_logs(self, index: int) -> None:
        """Write the log row of step ``index`` (one host sync for everything)."""
        self._sync_nonfinite()
        parts = [self._loss_counts]
        if self._loss_sums is not None:
            parts.insert(0, self._loss_sums.flatten())
        summed = torch.cat(parts)
        if self.world_size > 1:
            dist.all_reduce(summed)
        param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in self.model_params])))
        host = summed.cpu().numpy()
        grad_norm, param_norm = float(self._grad_norm), float(param_norm)
        counts = host[-4:]
        now = time.perf_counter()
        elapsed = max(now - (self._t_last or now), 1e-9)
        its = self._steps_since_log / elapsed

        # the row's own step (log_step wrote the same while the step ran; a subclass may skip it)
        logger.logkv("step", index)
        logger.logkv("samples", (index + 1) * self.global_batch)
        logger.logkv("global_batch", self.global_batch)
        logger.logkv("lr", self._cur_lr)
        logger.logkv("beta1", self._cur_beta1)
        if self._loss_keys:
            sums = host[:-4].reshape(len(self._loss_keys), 4)
            n = counts.sum()
            for row, key in enumerate(self._loss_keys):
                if n > 0:
                    logger.logkv(key, float(sums[row].sum() / n))
                for q in range(4):
                    if counts[q] > 0:
                        logger.logkv(f"{key}_q{q}", float(sums[row, q] / counts[q]))
        logger.logkv("grad_norm", grad_norm)
        logger.logkv("param_norm", param_norm)
        logger.logkv("nonfinite_skipped", self._nf_total)
        if self.scaler is not None:
            logger.logkv("lg_loss_scale", math.log2(max(self.scaler.get_scale(), 1e-30)))
        logger.logkv("it_per_s", its)
        logger.logkv("img_per_s", its * self.global_batch)
        end = self._end_step()
        if end is not None:
            logger.logkv("time_remaining_s", (end - index - 1) / its if its > 0 else float("nan"))
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else 0.0
        logger.logkv("peak_mem_gib", peak)
        logger.logkv("gpu_hours", self._gpu_hours(now))
        logger.dumpkvs()

        self._loss_counts.zero_()
        if self._loss_sums is not None:
            self._loss_sums.zero_()
        self._t_last = time.perf_counter()
        self._steps_since_log = 0
        self._check_nonfinite()

    def _gpu_hours(self, now: Optional[float] = None) -> float:
        now = time.perf_counter() if now is None else now
        ran = (now - self._t_start) if self._t_start is not None else 0.0
        return self._gpu_hours_before + ran * self.world_size / 3600.0

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """
        Write the checkpoint set of the current step (rank 0; every rank must call this):
        model, one EMA per rate, optimizer, then the state file last.
        """
        self._check_nonfinite()  # never checkpoint a run that has to stop
        step = self.step
        per_rank = {"rng": self._rng_state(),
                    "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None}
        if self.world_size > 1:
            gathered: List[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, per_rank)
        else:
            gathered = [per_rank]
        if self.rank == 0:
            names = checkpoint_names(step, self.ema_rate)
            d = self.log_dir
            logger.log(f"saving checkpoint set of step {step} to {d}")
            with self._naming_write_errors(step):
                self._write_checkpoint_files(step, names, gathered)
        self._last_saved_step = step
        dist_util.barrier()

    @contextlib.contextmanager
    def _naming_write_errors(self, step: int):
        """Turn a failed write (disk full, read-only folder) into a message naming the file and the
        newest complete set, which the atomic writes leave intact."""
        try:
            yield
        except OSError as e:
            done = [s for s in list_complete_checkpoints(self.log_dir) if s != step]
            last = (f"the newest complete set, step {done[-1]}, is intact" if done
                    else "there is no complete checkpoint set yet")
            raise CheckpointWriteError(
                f"cannot write {e.filename or 'a checkpoint file'} into {self.log_dir} "
                f"({e.strerror or e}) while saving the checkpoint set of step {step}; {last}. Free space or "
                "fix the folder's permissions, then rerun the same command to resume") from e

    def _write_checkpoint_files(self, step: int, names: Dict[str, Any], gathered: List[Any]) -> None:
        """Model, one EMA per rate, optimizer, then the state file (last: it marks the set complete)."""
        d = self.log_dir
        atomic_torch_save(_cpu_state_dict(self.model), os.path.join(d, names["model"]))
        for rate, ema in zip(self.ema_rate, self.ema_models):
            atomic_torch_save(_cpu_state_dict(ema), os.path.join(d, names["ema"][rate]))
        atomic_torch_save(self.opt.state_dict(), os.path.join(d, names["opt"]))
        state = {
            "format": _STATE_FORMAT,
            "step": step,
            "sampler": self.schedule_sampler.state_dict() if hasattr(self.schedule_sampler, "state_dict") else None,
            "momentum_decay": {
                "step": step, "enabled": self.momentum.enabled, "beta1": self.momentum.beta1,
                "beta1_min": self.momentum.beta1_min, "total_steps": self.momentum.total_steps,
                "lr_compensation": self.momentum.lr_compensation,
                "decay_beta1": self.momentum.decay_beta1,
                "next_beta1": self.momentum.beta1_at(step),
            },
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "per_rank": gathered,  # RNG states and data position of every rank
            "config": self.config,
            "ema_rates": list(self.ema_rate),
            "nonfinite": {"total": self._nf_total, "consecutive": self._nf_consec},
            "gpu_hours": self._gpu_hours(),
            "device_type": self.device.type,  # "cuda" or "cpu": what gpu_hours counted hours of
            "seed": self.seed,
        }
        atomic_torch_save(state, os.path.join(d, names["state"]))  # last: marks the set complete

    # ------------------------------------------------------------------ sample grids

    def _make_grid_diffusion(self):
        if self._grid_diffusion is not None:
            return self._grid_diffusion
        from .script_util import create_gaussian_diffusion, diffusion_defaults, fdm_defaults

        cfg = self.config or {}
        keys = diffusion_defaults()
        if not all(k in cfg for k in ("diffusion_steps", "noise_schedule")):
            logger.warn("--sample_interval: no diffusion flags in the run's config; sample grids are skipped")
            self._grid_diffusion = False
            return False
        args = {k: cfg.get(k, v) for k, v in keys.items()}
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

    def _periodic_grid(self) -> None:
        # a picture must never end a training run: a model that cannot sample unconditionally
        # (e.g. super-resolution, which needs low-res inputs) just gets no grids
        try:
            self.sample_grid()
        except Exception as e:  # noqa: BLE001
            logger.warn(f"--sample_interval: sampling a grid failed ({type(e).__name__}: {e}); grids are off")
            self.sample_interval = 0

    def sample_grid(self, num: int = SAMPLE_GRID_SIZE) -> Optional[str]:
        """
        Rank 0: sample ``num`` images from the first EMA model with DDIM and write
        ``samples_{step:06d}.png`` to the run folder (the same noise every time, so grids of
        one run are comparable). Other ranks return at once.

        :return: the PNG path (rank 0), else None.
        """
        if self.rank != 0:
            return None
        self._warn_short_ema()  # a grid of noise from an EMA that barely moved yet: say why
        diffusion = self._make_grid_diffusion()
        if not diffusion:
            return None
        ema = self.ema_models[0]
        size = int(getattr(ema, "image_size", 0) or (self.config or {}).get("image_size", 0))
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
        with torch.no_grad(), self._autocast():
            images = diffusion.ddim_sample_loop(ema, noise.shape, noise=noise, clip_denoised=True,
                                                model_kwargs=model_kwargs, device=self.device)
        path = os.path.join(self.log_dir, f"samples_{self.step:06d}.png")
        write_grid(images.float().cpu(), path)
        logger.log(f"wrote sample grid {path}")
        return path
