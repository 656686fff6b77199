"""
What a ``TrainLoop`` checkpoint holds beyond the weights, and how a resumed run gets it back:
the random streams of every generator (torch, CUDA, numpy, Python), the optimizer's moments
(with this run's kernel choice and beta2), and the state file's run state (loss scaler, sampler,
data position, non-finite count, GPU hours), and the images seen so far (``samples_seen``).

``UpstreamTrainHooks`` holds the bodies of upstream ``TrainLoop``'s resume and fp16 hooks
(``_load_and_sync_parameters``, ``_load_ema_parameters``, ``_load_optimizer_state``,
Improved-Diffusion's ``_setup_fp16``, ``optimize_fp16``, ``optimize_normal``, ``_log_grad_norm``,
``_master_params_to_state_dict``, ``_state_dict_to_master_params``); ``TrainLoop`` inherits them
and calls the load hooks where upstream's ``__init__`` does, so a subclass may override any of them.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dist_util, logger
from .checkpoint import load_weights
from .fp16_util import INITIAL_LOG_LOSS_SCALE

__all__ = ["rng_state", "restore_rng", "load_optimizer_state", "restore_run_state", "cpu_state_dict",
           "samples_seen", "adopt_parameters", "UpstreamTrainHooks"]

# optimizer param-group keys that stay this run's when the moments are loaded (kernel choice, flags)
_RUN_OWNED_OPT_KEYS = ("fused", "foreach", "capturable", "differentiable", "weight_decay")


def cpu_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Plain, contiguous CPU tensors: loadable anywhere, keys of the uncompiled module."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _numpy_rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # a tensor, not an ndarray, so the state file loads with torch.load(weights_only=True)
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(s: Dict[str, Any]) -> None:
    keys = s["keys"].numpy() if isinstance(s["keys"], torch.Tensor) else s["keys"]
    np.random.set_state((s["name"], np.asarray(keys).astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def rng_state() -> Dict[str, Any]:
    """This process's global random streams (torch CPU and CUDA, numpy, Python)."""
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": _numpy_rng_state(),
        "python": random.getstate(),
    }


def restore_rng(rng: Optional[Dict[str, Any]]) -> None:
    """Set the streams ``rng_state()`` recorded (CUDA only when the device count matches)."""
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


def load_optimizer_state(opt: torch.optim.Optimizer, path: str, beta2: float,
                         params: Sequence[torch.nn.Parameter]) -> None:
    """
    The moments of a checkpoint into ``opt``. The flags of this run win (MDLRC sets lr/beta1 every
    step; beta2 and weight decay are this run's), and so does its kernel choice (fused/foreach).
    Moments saved by a run with another ``--channels_last`` get the parameter's memory format
    (same values) so the fused/foreach kernels see matching strides.
    """
    fresh = [dict(g) for g in opt.param_groups]
    opt.load_state_dict(load_weights(path))
    for group, new in zip(opt.param_groups, fresh):
        for key in _RUN_OWNED_OPT_KEYS:
            if key in new:
                group[key] = new[key]
        group["betas"] = (group["betas"][0], beta2)
    for p in params:
        state = opt.state.get(p, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def restore_run_state(state: Dict[str, Any], *, scaler: Any, sampler: Any, data: Any, world_size: int,
                      rank: int, global_batch: Optional[int] = None) -> Tuple[int, float]:
    """
    The state file's run state: loss scaler, sampler, and (when the process count is the same)
    this rank's RNG streams and data position; anything that cannot be restored is warned about
    (another process count: with the global batch it had and has, ``global_batch``).

    :return: ``(non-finite steps skipped so far, GPU hours so far)``.
    """
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    if state.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
        try:
            sampler.load_state_dict(state["sampler"])
        except (ValueError, KeyError) as e:
            logger.warn(f"schedule sampler state not restored ({e}); its random stream starts fresh")
    saved_world = int(state.get("world_size", 1))
    per_rank: List[Any] = state.get("per_rank") or []
    if saved_world == world_size and rank < len(per_rank):
        mine = per_rank[rank]
        restore_rng(mine.get("rng"))
        if mine.get("data") is not None:
            if hasattr(data, "load_state_dict"):
                data.load_state_dict(mine["data"])
            else:
                logger.warn("the data loader has no load_state_dict(): its position starts fresh")
    else:
        batch, old = "", state.get("global_batch")
        if global_batch is not None and old is not None:
            batch = (f"the global batch stays {old}" if int(old) == global_batch else
                     f"the global batch changes from {old} to {global_batch}") + \
                f" ({global_batch // max(world_size, 1)} per process); "
        logger.warn(f"the checkpoint was written by {saved_world} process(es), this run has {world_size}: {batch}"
                    "the data position and RNG streams start fresh (the run continues, not bit-identically)")
    nf = state.get("nonfinite") or {}
    return int(nf.get("total", 0)), float(state.get("gpu_hours", 0.0))


def samples_seen(state: Optional[Dict[str, Any]], step: int, global_batch: int) -> int:
    """
    The images a run saw in its first ``step`` steps, over all processes: the state file's
    ``samples`` (the sum of each step's global batch, which a resume with another batch changes),
    else ``step`` x the global batch it records (state files written before the count), else
    ``step`` x ``global_batch`` (no state file: upstream's checkpoints).
    """
    if state is not None and state.get("samples") is not None:
        return int(state["samples"])
    batch = state.get("global_batch") if state is not None else None
    return int(step) * int(global_batch if batch is None else batch)


def adopt_parameters(module: torch.nn.Module, params: Sequence[torch.Tensor]) -> None:
    """
    Copy ``params`` into ``module``'s parameters, in order (nothing where they are the same tensors).

    :raises ValueError: ``params`` is not one tensor per parameter (e.g. an overridden
        ``_load_ema_parameters`` that returned another model's list).
    """
    targets = list(module.parameters())
    params = list(params)
    if len(params) != len(targets):
        raise ValueError(f"expected one tensor per model parameter ({len(targets)}), got {len(params)} "
                         "(the list an _load_ema_parameters returned?)")
    with torch.no_grad():
        for dst, src in zip(targets, params):
            if dst is not src:
                dst.copy_(src)


class UpstreamTrainHooks:
    """
    Upstream ``TrainLoop``'s resume and fp16 hooks, inherited by ``train_util.TrainLoop``, which
    sets what they use (``model``, ``model_params``, ``opt``, ``ema_rate``, ``ema_models``,
    ``resume_point``, ``beta2``, ``device``, ``fp16_scale_growth``, ``mp_trainer``,
    ``_grad_norm``) and calls the load hooks where upstream's ``__init__`` does:
    ``_load_and_sync_parameters()`` always, ``_setup_fp16()`` when fp16, then on a resume
    ``_load_optimizer_state()`` and ``_load_ema_parameters(rate)`` for every rate (whose returned
    parameters become that EMA's). An override in a subclass is what runs.
    """

    def _load_and_sync_parameters(self) -> None:
        """
        Upstream's hook: the checkpoint's weights into the model (``resume_step`` = its step),
        then rank 0's parameters broadcast to every rank. The checkpoint is the resume point
        decided before (``resume_point``; upstream: ``find_resume_checkpoint()`` or
        ``resume_checkpoint``).
        """
        point = self.resume_point
        if point is not None:
            self.resume_step = int(point.step)
            self.model.load_state_dict(load_weights(point.model_path))
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate: float) -> List[torch.nn.Parameter]:
        """
        Upstream's hook: the parameters of the EMA at ``rate`` from the checkpoint's
        ``ema_{rate}_{step}.pt`` (loaded into that EMA model, buffers included), or the model's
        (the EMA starts from the model, warned) when the file is missing.
        """
        ema = self.ema_models[list(self.ema_rate).index(rate)]
        point = self.resume_point
        path = point.ema_paths.get(rate) if point is not None else None
        if path is not None:
            ema.load_state_dict(load_weights(path))
        elif point is not None:
            logger.warn(f"no EMA checkpoint for rate {rate} at step {point.step}: starting it from the model")
        return list(ema.parameters())

    def _load_optimizer_state(self) -> None:
        """
        Upstream's hook: the optimizer state of the checkpoint's ``opt{step}.pt`` into ``opt``
        (``load_optimizer_state``: this run's beta2, weight decay and kernel choice win); warned
        and left at zero moments when the file is missing.
        """
        point = self.resume_point
        if point is None:
            return
        if point.opt_path:
            load_optimizer_state(self.opt, point.opt_path, self.beta2, self.model_params)
        else:
            logger.warn(f"no optimizer checkpoint for step {point.step}: the AdamW moments start from zero")

    def _setup_fp16(self) -> None:
        """
        Improved-Diffusion's hook, called when training in fp16. Upstream converted the model to
        float16 and kept float32 master copies; here fp16 is autocast over float32 parameters (the
        masters are the parameters), so the setup is upstream's dynamic loss scale: a GradScaler
        starting at 2**``INITIAL_LOG_LOSS_SCALE``, halved on an overflow (the step skipped) and
        doubled after 1/``fp16_scale_growth`` good steps (upstream: lg_loss_scale += growth per step).
        """
        self.scaler = torch.amp.GradScaler(
            self.device.type, init_scale=2.0 ** INITIAL_LOG_LOSS_SCALE, growth_factor=2.0, backoff_factor=0.5,
            growth_interval=max(1, int(round(1.0 / self.fp16_scale_growth))))

    def optimize_normal(self) -> bool:
        """
        Improved-Diffusion's update (its ``run_step`` called it after ``forward_backward`` when not
        in fp16): the lr of the step, the optimizer step and the EMAs (``optimize()``, which also
        sets ``log_step()``'s keys), then ``_log_grad_norm()``.

        :return: whether the step was taken (see ``optimize``).
        """
        took_step = self.optimize()
        self._log_grad_norm()
        return took_step

    def optimize_fp16(self) -> bool:
        """
        Improved-Diffusion's fp16 update: ``optimize_normal``'s, with the loss scaler doing
        upstream's part (an overflowing step is skipped and the scale halved; the scale grows).

        :return: whether the step was taken.
        """
        return self.optimize_normal()

    def _log_grad_norm(self) -> None:
        """Improved-Diffusion's hook: ``logkv_mean("grad_norm", ...)``, the global L2 norm of the
        last update's (unscaled) gradients (read from the device: one host sync)."""
        logger.logkv_mean("grad_norm", float(self._grad_norm))

    def _master_params_to_state_dict(self, master_params: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Improved-Diffusion's hook: the model's state_dict with ``master_params`` (one per
        parameter, as ``mp_trainer.master_params``) in place of its parameters."""
        return self.mp_trainer.master_params_to_state_dict(master_params)

    def _state_dict_to_master_params(self, state_dict: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Improved-Diffusion's hook: a state_dict's tensors of the model's parameters, in order (the
        master params' layout: one per parameter)."""
        return self.mp_trainer.state_dict_to_master_params(state_dict)
