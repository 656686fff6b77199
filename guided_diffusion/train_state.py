"""
What a ``TrainLoop`` checkpoint holds beyond the weights, and how a resumed run gets it back:
the random streams of every generator (torch, CUDA, numpy, Python), the optimizer's moments
(with this run's kernel choice and beta2), and the state file's run state (loss scaler, sampler,
data position, non-finite count, GPU hours).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import logger
from .checkpoint import load_weights

__all__ = ["rng_state", "restore_rng", "load_optimizer_state", "restore_run_state", "cpu_state_dict"]

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
                      rank: int) -> Tuple[int, float]:
    """
    The state file's run state: loss scaler, sampler, and (when the process count is the same)
    this rank's RNG streams and data position; anything that cannot be restored is warned about.

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
        logger.warn(f"the checkpoint was written by {saved_world} process(es), this run has {world_size}: "
                    "the data position and RNG streams start fresh (the run continues, not bit-identically)")
    nf = state.get("nonfinite") or {}
    return int(nf.get("total", 0)), float(state.get("gpu_hours", 0.0))
