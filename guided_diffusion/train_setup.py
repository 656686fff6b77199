"""
The pieces a ``TrainLoop`` is made of, built and persisted: its settings (``loop_settings``), the
loss's per-timestep tables (``loss_weight_table``, ``fdm_warmup_table``), the checked lr schedule,
the torch backends and the autocast context, where a run resumes from (``resolve_point``), the EMA
copies, the DDP/compiled model (``wrap_model``), and writing one checkpoint set
(``write_checkpoint_set``, with ``naming_write_errors`` turning a failed write into a message that
names the file). ``TrainLoop`` in ``train_util`` builds itself from these; this module does not
import ``train_util``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist_util, logger
from .checkpoint import ResumePoint, check_resume_compatible, list_complete_checkpoints, load_weights, resolve_resume
from .errors import CheckpointWriteError
from .files import atomic_torch_save
from .options import LoopSettings, train_loop_defaults
from .schedules import lr_schedule_from_flags
from .train_state import cpu_state_dict
from .weighting import loss_weight_table as weighting_table

__all__ = [
    "loop_settings",
    "loss_weight_table",
    "fdm_warmup_table",
    "checked_lr_schedule",
    "configure_backends",
    "autocast_factory",
    "resolve_point",
    "ema_copies",
    "wrap_model",
    "naming_write_errors",
    "write_checkpoint_set",
]

_DEFAULTS = train_loop_defaults()  # every keyword default of TrainLoop (options.py owns them)


def loop_settings(settings: Optional[LoopSettings], upstream: Dict[str, Any],
                  groups: Dict[str, Optional[Dict[str, Any]]], flat: Dict[str, Any]) -> LoopSettings:
    """
    ``TrainLoop``'s settings: ``settings`` as given (checked when it was built; upstream's
    keywords must then agree with it, or be left at their defaults, and no group or new keyword
    may be given), else built and checked from the arguments.
    """
    if settings is None:
        return LoopSettings.from_groups(upstream, groups, flat)
    if flat or any(groups.values()):
        raise TypeError("TrainLoop(settings=...) takes every new setting from settings: pass no *_kwargs group "
                        f"or new keyword besides it (got {', '.join(sorted(flat) + [g for g in groups if groups[g]])})")
    for k, v in upstream.items():
        if v != settings[k] and (k not in _DEFAULTS or v != _DEFAULTS[k]):
            raise ValueError(f"TrainLoop got {k}={v!r} and settings with {k}={settings[k]!r}; pass one of them")
    return settings


def loss_weight_table(weighting: Any, options: Optional[Dict[str, Any]], diffusion: Any,
                      device: torch.device) -> Optional[torch.Tensor]:
    """The per-timestep weights of the MSE term (a name or a length-T array), on the device; None: off.
    The weighting owns the table and its refusals (``weighting.loss_weight_table``)."""
    weights = weighting_table(weighting, diffusion, options)
    return None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)


def fdm_warmup_table(diffusion: Any, warmup_steps: int, device: torch.device) -> Optional[torch.Tensor]:
    """sigma_t^2 = (1 - abar_t) / abar_t on the device when FDM's warm-up is on, else None."""
    if not getattr(diffusion, "fdm", False) or warmup_steps <= 0:
        return None
    loss_type = getattr(getattr(diffusion, "loss_type", None), "name", "MSE")
    if loss_type in ("KL", "RESCALED_KL"):
        raise ValueError("--fdm_warmup_steps weights the MSE term of the loss, and --use_kl True trains on the "
                         "variational bound alone (no MSE term); set --fdm_warmup_steps 0 or --use_kl False")
    abar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    return torch.as_tensor((1.0 - abar) / abar, dtype=torch.float32, device=device)


def checked_lr_schedule(lr_schedule: Any, lr: float, lr_anneal_steps: int) -> Any:
    """The base-lr schedule: the given one (checked against ``lr``/``lr_anneal_steps``) or the flags'."""
    if lr_schedule is None:
        return lr_schedule_from_flags(lr, lr_anneal_steps)
    if not callable(getattr(lr_schedule, "lr_at", None)):
        raise TypeError(f"lr_schedule needs an lr_at(step) method, got {lr_schedule!r}")
    if lr_anneal_steps:
        raise ValueError("lr_schedule replaces --lr_anneal_steps' linear decay: pass one or the other "
                         "(set total_steps to end the run at a given step)")
    own_lr = getattr(lr_schedule, "lr", None)
    if own_lr is not None and float(own_lr) != lr:
        raise ValueError(f"lr_schedule's lr ({float(own_lr):g}) differs from lr ({lr:g})")
    return lr_schedule


def configure_backends(device: torch.device, precision: str, deterministic: bool) -> None:
    """Deterministic algorithms when asked; cuDNN autotuning otherwise; no TF32 under fp32."""
    on_cuda = device.type == "cuda"
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif on_cuda:
        torch.backends.cudnn.benchmark = True
    if on_cuda and precision == "fp32":
        # fp32 means float32 arithmetic: cuDNN would otherwise run convolutions in TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The context the forward passes run in: nothing for fp32, autocast to bf16/fp16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def resolve_point(log_dir: str, resume: Any, resume_checkpoint: str, ema_rate: Sequence[float],
                  config: Optional[Dict[str, Any]], model: torch.nn.Module) -> Optional[ResumePoint]:
    """
    Where the run continues from (None: step 0). A ``ResumePoint`` the caller passes was checked by
    it (``run_folder.prepare_resume``); one looked up here is checked against ``config`` and
    ``model``. Warns when checkpoints of later steps will be overwritten.
    """
    checked = isinstance(resume, ResumePoint)
    point = resolve_resume(log_dir, resume, resume_checkpoint, ema_rate)
    done = list_complete_checkpoints(log_dir)
    if point is not None:
        if not checked:
            check_resume_compatible(point, config, model)
        newer = [s for s in done if s > point.step]
        if point.how != "auto" and newer:
            logger.warn(f"{point.how} resumes from step {point.step} although {log_dir} has a newer "
                        f"complete checkpoint set (step {newer[-1]}); later checkpoints will be overwritten")
    elif done:
        logger.warn(f"--resume {resume}: starting from step 0 in {log_dir}, which has checkpoints up to step "
                    f"{done[-1]}; they are overwritten as the run reaches them")
    return point


def ema_copies(model: torch.nn.Module, rates: Sequence[float], point: Optional[ResumePoint]) -> List[torch.nn.Module]:
    """One frozen copy of ``model`` per EMA rate, with the checkpoint's EMA weights when resuming."""
    out = []
    for rate in rates:
        ema = copy.deepcopy(model)
        if point is not None and rate in point.ema_paths:
            ema.load_state_dict(load_weights(point.ema_paths[rate]))
        elif point is not None:
            logger.warn(f"no EMA checkpoint for rate {rate} at step {point.step}: starting it from the model")
        ema.eval().requires_grad_(False)
        out.append(ema)
    return out


def wrap_model(model: torch.nn.Module, use_ddp: bool, device: torch.device, use_compile: bool,
               compile_mode: Optional[str]) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """
    ``(ddp_model, forward_model)``: upstream's ``ddp_model`` (the DDP wrapper when distributed,
    else the model itself) and what the forward passes call (it, compiled when asked). The raw
    module stays the model: checkpoints keep its keys and the EMAs copy it.
    """
    ddp_model = forward = model
    if use_ddp:
        on_cuda = device.type == "cuda"
        dist_util.sync_params(model.parameters())
        ddp_model = forward = DDP(model, device_ids=[device] if on_cuda else None,
                                  output_device=device if on_cuda else None, broadcast_buffers=False,
                                  bucket_cap_mb=128, find_unused_parameters=False)
    if use_compile:
        # under DDP the wrapper is compiled, as PyTorch recommends: DDP's hooks run eagerly and the
        # module's graph is split at the gradient buckets
        forward = torch.compile(forward, mode=compile_mode)
    return ddp_model, forward


@contextlib.contextmanager
def naming_write_errors(log_dir: str, step: int) -> Iterator[None]:
    """Turn a failed write (disk full, read-only folder) into a message naming the file and the
    newest complete set, which the atomic writes leave intact."""
    try:
        yield
    except OSError as e:
        done = [s for s in list_complete_checkpoints(log_dir) if s != step]
        last = (f"the newest complete set, step {done[-1]}, is intact" if done
                else "there is no complete checkpoint set yet")
        raise CheckpointWriteError(
            f"cannot write {e.filename or 'a checkpoint file'} into {log_dir} "
            f"({e.strerror or e}) while saving the checkpoint set of step {step}; {last}. Free space or "
            "fix the folder's permissions, then rerun the same command to resume") from e


def write_checkpoint_set(log_dir: str, names: Dict[str, Any], model: torch.nn.Module, emas: Dict[float, torch.nn.Module],
                         opt: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Model, one EMA per rate, optimizer, then the state file (last: it marks the set complete)."""
    atomic_torch_save(cpu_state_dict(model), os.path.join(log_dir, names["model"]))
    for rate, ema in emas.items():
        atomic_torch_save(cpu_state_dict(ema), os.path.join(log_dir, names["ema"][rate]))
    atomic_torch_save(opt.state_dict(), os.path.join(log_dir, names["opt"]))
    atomic_torch_save(state, os.path.join(log_dir, names["state"]))
