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
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

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
from .fp16_util import INITIAL_LOG_LOSS_SCALE, GradScalerTrainer  # noqa: F401  (upstream's name, re-exported)
from .image_io import grid_scale, write_grid  # noqa: F401  (re-exported)
from .nn import update_ema
from .optim import MomentumDecay, create_optimizer  # noqa: F401  (MomentumDecay re-exported)
from .options import (  # noqa: F401  (re-exported)
    PRECISIONS,
    LoopSettings,
    parse_ema_rates,
    parse_save_steps,
    resolve_batch_size,
    resolve_fast_path,
    train_loop_defaults,
    training_defaults,
    validate_training_args,
)
from .resample import LossAwareSampler, create_named_schedule_sampler
from .resample import loss_weighting as named_loss_weighting  # noqa: F401  (re-exported: an earlier name)
from .schedules import WithMomentumDecay
from .seeding import derive_seed
from .train_guards import (  # noqa: F401  (re-exported: these names lived here)
    SAMPLE_GRID_DDIM_STEPS,
    SAMPLE_GRID_SIZE,
    EmaHorizonWarning,
    NonFiniteGuard,
    NonFiniteLossError,
    SampleGrid,
    StopSignals,
    TrainingInterrupted,
)
from .train_logs import LossMeter, RunClock, log_loss_dict
from .train_setup import (
    autocast_factory,
    checked_lr_schedule,
    configure_backends,
    ema_copies,
    fdm_warmup_table,
    loop_settings,
    loss_weight_table,
    naming_write_errors,
    resolve_point,
    wrap_model,
    write_checkpoint_set,
)
from .train_state import UpstreamTrainHooks, adopt_parameters, restore_run_state, rng_state, samples_seen

__all__ = [
    "TrainLoop",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "ResumeError",
    "ResumePoint",
    "LoopSettings",
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

_STATE_FORMAT = 1
_DEFAULTS = train_loop_defaults()  # every keyword default of TrainLoop (options.py owns them)
# settings kept as attributes under upstream's (and earlier versions') names, with their types
_SCALAR_ATTRIBUTES: Dict[str, Callable[[Any], Any]] = dict(
    batch_size=int, lr=float, log_interval=int, save_interval=int, fp16_scale_growth=float, weight_decay=float,
    lr_anneal_steps=int, total_steps=int, stop_at=int, grad_clip=float, sample_interval=int, seed=int,
    max_nonfinite=int, fdm_warmup_steps=int, beta2=float,
)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


class TrainLoop(UpstreamTrainHooks):
    """
    Train a diffusion model (upstream's ``TrainLoop``: its keyword arguments, attributes and
    hooks). ``run_loop()`` trains until ``total_steps``/``lr_anneal_steps``/``stop_at``.

    Upstream's surface: ``mp_trainer`` (a ``fp16_util.GradScalerTrainer``: upstream's
    ``MixedPrecisionTrainer`` interface over this loop's float32 parameters and loss scaler;
    its master params are the model params), ``opt``, ``ema_params``, ``use_ddp``, ``ddp_model``
    (the DDP wrapper when ``use_ddp``, else the model itself), ``step``/``resume_step``,
    ``global_batch``, the resume hooks ``_load_and_sync_parameters()``, ``_load_optimizer_state()``,
    ``_load_ema_parameters(rate)`` and Improved-Diffusion's fp16 methods (``train_state.UpstreamTrainHooks``:
    ``__init__`` calls the hooks where upstream does), and the per-step hooks ``_anneal_lr()``,
    ``_update_ema()`` and ``log_step()``, which ``optimize()`` calls in this order::

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

    Arguments: upstream's (``model``, ``diffusion``, ``data`` yielding ``(NCHW images in [-1, 1],
    {"y": labels} or {})``, ``batch_size`` per process, ``microbatch`` (-1: off), ``lr``,
    ``ema_rate`` ("0.9999,0.999"), ``log_interval``, ``save_interval``, ``resume_checkpoint``,
    ``use_fp16``, ``fp16_scale_growth``, ``schedule_sampler`` (a sampler or a registered name),
    ``weight_decay``, ``lr_anneal_steps``), then this project's in five groups, as EDM groups its
    options (``options.LOOP_GROUPS`` lists them; each member means what its ``--flag`` means in
    the README's flag table, and its default is the flag's): ``run_kwargs`` (total_steps,
    stop_at, save_steps, log_dir, seed, resume: "auto" | "none" | a path | a checked
    ``ResumePoint``, config), ``optimizer_kwargs`` (beta1, beta2, momentum_decay, beta1_min,
    lr_compensation, decay_beta1, grad_clip, lr_schedule: any object with ``lr_at(step)``, which
    replaces ``lr_anneal_steps``), ``loss_kwargs`` (loss_weighting: a name or a length-T array,
    loss_weighting_options, fdm_warmup_steps), ``speed_kwargs`` (precision, compile,
    compile_mode, channels_last, fused_optimizer, deterministic) and ``guard_kwargs``
    (max_nonfinite, sample_interval). A member may also be given as a keyword of its own
    (``TrainLoop(..., total_steps=8)``), or everything as one checked ``options.LoopSettings``
    (``settings=``, what ``training.train`` passes). Every setting is checked once, where the
    settings are built.
    """

    def __init__(
        self, *, model: torch.nn.Module, diffusion: Any, data: Iterable, batch_size: int, microbatch: int,
        lr: float, ema_rate: Union[str, float, Sequence[float]], log_interval: int, save_interval: int,
        resume_checkpoint: str = _DEFAULTS["resume_checkpoint"], use_fp16: bool = _DEFAULTS["use_fp16"],
        fp16_scale_growth: float = _DEFAULTS["fp16_scale_growth"], schedule_sampler: Any = _DEFAULTS["schedule_sampler"],
        weight_decay: float = _DEFAULTS["weight_decay"], lr_anneal_steps: int = _DEFAULTS["lr_anneal_steps"],
        run_kwargs: Optional[Dict[str, Any]] = None, optimizer_kwargs: Optional[Dict[str, Any]] = None,
        loss_kwargs: Optional[Dict[str, Any]] = None, speed_kwargs: Optional[Dict[str, Any]] = None,
        guard_kwargs: Optional[Dict[str, Any]] = None, settings: Optional[LoopSettings] = None, **kwargs: Any,
    ):
        upstream = dict(batch_size=batch_size, microbatch=microbatch, lr=lr, ema_rate=ema_rate,
                        log_interval=log_interval, save_interval=save_interval, resume_checkpoint=resume_checkpoint,
                        use_fp16=use_fp16, fp16_scale_growth=fp16_scale_growth, weight_decay=weight_decay,
                        lr_anneal_steps=lr_anneal_steps)
        groups = dict(run_kwargs=run_kwargs, optimizer_kwargs=optimizer_kwargs, loss_kwargs=loss_kwargs,
                      speed_kwargs=speed_kwargs, guard_kwargs=guard_kwargs)
        self.settings = s = loop_settings(settings, upstream, groups, kwargs)
        self.model, self.diffusion, self.data = model, diffusion, data
        for name, cast in _SCALAR_ATTRIBUTES.items():
            setattr(self, name, cast(s[name]))
        self.microbatch = int(s["microbatch"]) if s["microbatch"] and s["microbatch"] > 0 else self.batch_size
        self.ema_rate = parse_ema_rates(s["ema_rate"])
        self.save_steps = set(parse_save_steps(s["save_steps"]))
        self.resume_checkpoint = s["resume_checkpoint"] or ""
        self.config = dict(s["config"]) if s["config"] is not None else None
        self.rank, self.world_size, self.device = dist_util.get_rank(), dist_util.get_world_size(), dist_util.dev()
        self.global_batch = self.batch_size * self.world_size
        fast = resolve_fast_path(self.device, s["precision"], bool(s["use_fp16"]), s["compile"], s["channels_last"],
                                 s["fused_optimizer"])
        self.precision, self.use_compile, self.channels_last = fast["precision"], fast["compile"], fast["channels_last"]
        self.use_fp16 = self.precision == "fp16"
        self.compile_mode = None if s["compile_mode"] in (None, "", "default") else str(s["compile_mode"])
        self.log_dir = s["log_dir"] or get_blob_logdir()
        if not self.log_dir:
            raise ValueError("TrainLoop needs a run folder: pass log_dir= or call logger.configure() first")
        configure_backends(self.device, self.precision, bool(s["deterministic"]))
        if schedule_sampler is None or isinstance(schedule_sampler, str):
            # rank 0's stream on every rank: the global batch's timesteps are drawn once, sliced by rank
            schedule_sampler = create_named_schedule_sampler(schedule_sampler or "uniform", diffusion,
                                                             seed=self.seed, rank=0)
        self.schedule_sampler = schedule_sampler
        self.loss_weights = loss_weight_table(s["loss_weighting"], s["loss_weighting_options"], diffusion, self.device)
        self._fdm_sigma2 = fdm_warmup_table(diffusion, self.fdm_warmup_steps, self.device)
        self.momentum = s.momentum
        self.lr_schedule = checked_lr_schedule(s["lr_schedule"], self.lr, self.lr_anneal_steps)
        # the lr and beta1 of every step: the base schedule, with MDLRC multiplying its lr
        self.opt_schedule = WithMomentumDecay(self.lr_schedule, self.momentum)

        self.step = self.resume_step = 0
        point = resolve_point(self.log_dir, s["resume"], self.resume_checkpoint, self.ema_rate, self.config, model)
        self.resume_point: Optional[ResumePoint] = point
        self.model.to(self.device)
        self._load_and_sync_parameters()  # upstream's hooks, called where upstream calls them (train_state)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model_params = list(self.model.parameters())
        self.ema_models = ema_copies(self.model, self.ema_rate, None)  # a resume loads them: _load_ema_parameters
        # "auto" leaves the kernel to create_optimizer (fused when on CUDA)
        fused = {} if str(s["fused_optimizer"]).strip().lower() == "auto" else {"fused": fast["fused_optimizer"]}
        self.opt = create_optimizer(self.model_params, lr=self.lr, weight_decay=self.weight_decay,
                                    beta1=s["beta1"], beta2=self.beta2, **fused)
        self.fused_optimizer = bool(self.opt.defaults.get("fused"))
        self.scaler: Optional[torch.amp.GradScaler] = None
        if self.use_fp16:
            self._setup_fp16()  # the loss scaler
        self._ema_keep: Optional[torch.Tensor] = None  # set by each step: None, or "not skipped" on the device
        self.mp_trainer = GradScalerTrainer(
            model=self.model, model_params=self.model_params, scaler=self.scaler, use_fp16=self.use_fp16,
            fp16_scale_growth=self.fp16_scale_growth, step_fn=self._step_optimizer)
        self._samples_at_resume = 0  # images seen before resume_step (the state file's count)
        nonfinite, hours = self._load_checkpoint(point) if point is not None else (0, 0.0)
        self.nonfinite = NonFiniteGuard(self.max_nonfinite, self.device, self.fused_optimizer, total=nonfinite)
        self.clock = RunClock(self.world_size, hours)
        self.sync_cuda = self.device.type == "cuda"
        self.use_ddp = self.world_size > 1
        self.ddp_model, self.forward_model = wrap_model(self.model, self.use_ddp, self.device, self.use_compile,
                                                        self.compile_mode)
        self._autocast = autocast_factory(self.precision, self.device)
        self.loss_meter = LossMeter(diffusion.num_timesteps, self.device)  # read once per log row
        self._grad_norm = torch.zeros((), dtype=torch.float32, device=self.device)
        self._noise_gen = torch.Generator(device=self.device)
        self.stop_signals = StopSignals()
        self.grid = SampleGrid(self.config, diffusion, self.seed, self.device, self._autocast, self.log_dir, self.rank)
        self._warn_short_ema = EmaHorizonWarning(self.ema_rate, self.rank)
        self._data_iter: Optional[Iterator] = None
        self._cur_lr, self._cur_beta1 = self.lr, float(s["beta1"])
        self._last_saved_step = point.step if point is not None else -1
        self._log_start(point)

    def _log_start(self, point: Optional[ResumePoint]) -> None:
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

    def _load_checkpoint(self, point: ResumePoint) -> Tuple[int, float]:
        """Optimizer and EMAs (upstream's hooks), then loss scaler, sampler, data position, RNG and
        images seen from the state file; returns the non-finite count and GPU hours so far."""
        self.step = self.resume_step = int(point.step)
        self._load_optimizer_state()
        for rate, ema in zip(self.ema_rate, self.ema_models):
            adopt_parameters(ema, self._load_ema_parameters(rate))
        state = point.load_state()
        self._samples_at_resume = samples_seen(state, self.step, self.global_batch)
        if state is None:
            return 0, 0.0
        return restore_run_state(state, scaler=self.scaler, sampler=self.schedule_sampler, data=self.data,
                                 world_size=self.world_size, rank=self.rank, global_batch=self.global_batch)

    def _samples_after(self, index: int) -> int:
        """Images seen over all ranks once step ``index`` is done: those before the resume plus
        this run's global batch for every step since (a resume may change the global batch)."""
        return self._samples_at_resume + (index + 1 - self.resume_step) * self.global_batch

    @property
    def ema_params(self) -> List[List[torch.nn.Parameter]]:
        """One parameter list per EMA rate (upstream's attribute)."""
        return [list(ema.parameters()) for ema in self.ema_models]

    @property
    def _nf_total(self) -> int:
        # the earlier attribute (tests and users read it): the guard's host count
        return self.nonfinite.total

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
        self.clock.begin()
        with self.stop_signals.installed(lambda: self.step):
            while target is None or self.step < target:
                self.run_iteration(target)
                if (self.save_interval and self.step % self.save_interval == 0) or self.step == target \
                        or self.step in self.save_steps:
                    self.save()
                if self.sample_interval and self.step % self.sample_interval == 0:
                    self._warn_short_ema(self.step)
                    if not self.grid.periodic(self.ema_models[0], self.step):
                        self.sample_interval = 0
                if self.stop_signals.requested(self.step, self.log_interval, self.world_size, self.device):
                    self._stop()
        self.nonfinite.check(self.log_dir, self.rank)
        self._warn_short_ema(self.step)

    def _stop(self) -> None:
        """Checkpoint at SIGTERM (schedulers send it before preemption), then raise TrainingInterrupted."""
        if self.stop_signals.wants_checkpoint() and self._last_saved_step != self.step:
            self.save()
        raise self.stop_signals.interrupted(self.step, self.log_dir)

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
        if self.clock.start is None:
            self.clock.begin()
        self._seed_step(self.step)
        batch, cond = next(self._data_iter)
        self.run_step(batch, cond)
        index = self.step
        self.step += 1
        self.clock.steps_since_row += 1
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
        t, w = self.schedule_sampler.sample(local_batch * self.world_size, torch.device("cpu"))
        lo = self.rank * local_batch
        t = self._to_device(t[lo:lo + local_batch].to(torch.int64))
        w = self._to_device(w[lo:lo + local_batch].to(torch.float32))
        return t, w

    def fdm_warmup_weights(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """
        FDM's warm-up factor on the MSE term of step ``self.step`` for timesteps ``t``:
        min(1, clamp(step) * sigma_t^2), clamp(i) = 5 * 100**(i / W) for i < W (then 1; W =
        ``fdm_warmup_steps``, ``fdm.warmup_clamp``), or None when the warm-up is off or over.
        """
        if self._fdm_sigma2 is None:
            return None
        clamp = _fdm.warmup_clamp(self.step, self.fdm_warmup_steps)
        if math.isinf(clamp):
            return None
        return torch.clamp(self._fdm_sigma2[t] * clamp, max=1.0)

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
        noise_all = noise_all[self.rank * B:(self.rank + 1) * B]
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
            noise_all = noise_all.contiguous(memory_format=torch.channels_last)
        for i in range(0, B, self.microbatch):
            j = min(i + self.microbatch, B)
            micro, t, weights = batch[i:j], t_all[i:j], w_all[i:j]
            micro_cond = {k: v[i:j] for k, v in cond.items()}
            sync_ctx = self.ddp_model.no_sync() if (self.use_ddp and j < B) else contextlib.nullcontext()
            with sync_ctx:
                with self._autocast():
                    losses = self.diffusion.training_losses(
                        self.forward_model, micro, t, model_kwargs=micro_cond, noise=noise_all[i:j])
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self._update_loss_aware(t, losses["loss"].detach())
                if self.loss_weights is not None or self._fdm_sigma2 is not None:
                    # the logged mse/vb stay the unweighted terms; "loss" is what is optimised
                    losses = dict(losses, loss=self.weighted_objective(t, losses))
                # sum / B (not upstream's sum of microbatch means): microbatching never changes the step
                loss = (losses["loss"].float() * weights).sum() / B
                self.loss_meter.add(t, weights, losses)
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
            torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        if fused:  # skipped on the device: no host sync
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.found_inf, opt.grad_scale = found_inf.float(), None
                try:
                    opt.step()
                finally:
                    del opt.found_inf, opt.grad_scale
            self._ema_keep = ~found_inf  # the EMAs stay put on a skipped step, decided on the device
            self.nonfinite.count_device(found_inf, self.step)
            return True
        skipped = bool(found_inf)  # host sync: free on the CPU, where this path runs
        if self.scaler is not None:
            self.scaler.step(opt)  # skips by itself on overflow
            self.scaler.update()
        elif not skipped:
            opt.step()
        self._ema_keep = None
        self.nonfinite.count_host(skipped, self.step, self.log_dir, self.rank)
        return not skipped

    def _update_ema(self) -> None:
        """
        Upstream's hook: move every EMA toward the parameters at its rate,
        ema <- rate * ema + (1 - rate) * param. After a step that the fused optimizer skipped on
        the device, the EMAs stay unchanged (decided on the device too).
        """
        keep = self._ema_keep
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

    # ------------------------------------------------------------------ logging

    def log_step(self) -> None:
        """
        Upstream's per-step log keys: ``step`` (the step being done, global) and ``samples``
        (images seen once it is done, over all ranks). Called by ``optimize()`` every step; the
        log row of the step writes the same two values.
        """
        logger.logkv("step", self.step)
        logger.logkv("samples", self._samples_after(self.step))

    def _dump_logs(self, index: int) -> None:
        """Write the log row of step ``index`` (one host sync for everything)."""
        self.nonfinite.sync()
        param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in self.model_params])))
        means = self.loss_meter.read(self.world_size)
        grad_norm, param_norm = float(self._grad_norm), float(param_norm)
        now, its = self.clock.row()
        # the row's own step (log_step wrote the same while the step ran; a subclass may skip it)
        for key, value in (("step", index), ("samples", self._samples_after(index)),
                           ("global_batch", self.global_batch), ("lr", self._cur_lr), ("beta1", self._cur_beta1),
                           *means.items(), ("grad_norm", grad_norm), ("param_norm", param_norm),
                           ("nonfinite_skipped", self.nonfinite.total)):
            logger.logkv(key, value)
        if self.scaler is not None:
            logger.logkv("lg_loss_scale", math.log2(max(self.scaler.get_scale(), 1e-30)))
        logger.logkv("it_per_s", its)
        logger.logkv("img_per_s", its * self.global_batch)
        end = self._end_step()
        if end is not None:
            logger.logkv("time_remaining_s", (end - index - 1) / its if its > 0 else float("nan"))
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else 0.0
        logger.logkv("peak_mem_gib", peak)
        logger.logkv("gpu_hours", self.clock.gpu_hours(now))
        logger.dumpkvs()
        self.clock.reset_row()
        self.nonfinite.check(self.log_dir, self.rank)

    # ------------------------------------------------------------------ checkpoints and grids

    def save(self) -> None:
        """
        Write the checkpoint set of the current step (rank 0; every rank must call this):
        model, one EMA per rate, optimizer, then the state file last.
        """
        self.nonfinite.check(self.log_dir, self.rank)  # never checkpoint a run that has to stop
        step = self.step
        per_rank = {"rng": rng_state(), "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None}
        gathered: List[Any] = [per_rank]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, per_rank)
        if self.rank == 0:
            logger.log(f"saving checkpoint set of step {step} to {self.log_dir}")
            with naming_write_errors(self.log_dir, step):
                write_checkpoint_set(self.log_dir, checkpoint_names(step, self.ema_rate), self.model,
                                     dict(zip(self.ema_rate, self.ema_models)), self.opt, self._state(step, gathered))
        self._last_saved_step = step
        dist_util.barrier()

    def _state(self, step: int, gathered: List[Any]) -> Dict[str, Any]:
        """The state file of ``step``: everything but the weights that resuming needs."""
        m = self.momentum
        return {
            "format": _STATE_FORMAT,
            "step": step,
            "sampler": self.schedule_sampler.state_dict() if hasattr(self.schedule_sampler, "state_dict") else None,
            "momentum_decay": {
                "step": step, "enabled": m.enabled, "beta1": m.beta1, "beta1_min": m.beta1_min,
                "total_steps": m.total_steps, "lr_compensation": m.lr_compensation, "decay_beta1": m.decay_beta1,
                "next_beta1": m.beta1_at(step),
            },
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "samples": self._samples_after(step - 1),  # images seen in steps 0..step-1 (each step's global batch)
            "per_rank": gathered,  # RNG states and data position of every rank
            "config": self.config,
            "ema_rates": list(self.ema_rate),
            "nonfinite": self.nonfinite.state_dict(),
            "gpu_hours": self.clock.gpu_hours(),
            "device_type": self.device.type,  # "cuda" or "cpu": what gpu_hours counted hours of
            "seed": self.seed,
        }

    def sample_grid(self, num: int = SAMPLE_GRID_SIZE) -> Optional[str]:
        """
        Rank 0: sample ``num`` images from the first EMA model with DDIM and write
        ``samples_{step:06d}.png`` to the run folder (``train_guards.SampleGrid``).

        :return: the PNG path (rank 0), else None.
        """
        if self.rank == 0:
            self._warn_short_ema(self.step)  # a grid of noise from an EMA that barely moved yet: say why
        return self.grid.sample(self.ema_models[0], self.step, num)
