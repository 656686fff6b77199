"""
The loop every sampler of ``GaussianDiffusion`` runs: x_T (given or drawn), then one step per
timestep from T-1 down to 0, each with its own noise (drawn, or from a ``step_noise_fn`` so that
several models can be sampled with the same per-step noise), yielding each step's output.

The step itself (ancestral ``p_sample``, ``ddim_sample``) belongs to the diffusion; this module
owns what the ancestral and the DDIM loops share: the start, the order, the per-step noise, the
argument checks and the progress bar.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch

__all__ = ["StepNoiseFn", "check_cond_fn", "step_noise", "sampling_loop", "final_sample"]

# callable(step, shape, device) -> noise tensor of `shape` for sampling step `step`
# (0 = the first denoising step, at timestep index num_timesteps - 1).
StepNoiseFn = Callable[[int, Tuple[int, ...], torch.device], torch.Tensor]


def check_cond_fn(cond_fn: Any) -> None:
    """Refuse a ``cond_fn`` that is neither None nor callable."""
    # improved-diffusion's samplers had model_kwargs where guided-diffusion has cond_fn:
    # catch a dict passed positionally there instead of failing deep inside.
    if cond_fn is not None and not callable(cond_fn):
        raise TypeError(
            f"cond_fn must be callable (or None), got {type(cond_fn).__name__}; pass model_kwargs "
            "by keyword (samplers follow guided-diffusion's argument order)"
        )


def step_noise(noise: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The standard normal noise of one sampling step: ``noise`` (checked against x's shape and
    moved to x's device and dtype), or ``torch.randn_like(x)`` when None."""
    if noise is None:
        return torch.randn_like(x)
    if noise.shape != x.shape:
        raise ValueError(f"step noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def sampling_loop(
    step_fn: Callable[..., Dict[str, torch.Tensor]],
    model: Callable[..., torch.Tensor],
    shape: Sequence[int],
    num_timesteps: int,
    *,
    noise: Optional[torch.Tensor] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    step_noise_fn: Optional[StepNoiseFn] = None,
    **step_kwargs: Any,
) -> Iterator[Dict[str, torch.Tensor]]:
    """
    Run ``step_fn(model, x_t, t, noise=..., **step_kwargs)`` from t = num_timesteps - 1 down to 0,
    under ``torch.no_grad()``, feeding each output's 'sample' to the next step; yield each output.

    :param step_fn: one denoising step (``GaussianDiffusion.p_sample`` or ``ddim_sample``).
    :param model: the model, passed to every step.
    :param shape: the samples' shape (N, C, H, W), a tuple or list.
    :param num_timesteps: the chain's length T (the loop runs t = T-1, ..., 0).
    :param noise: x_T (of ``shape``); None: drawn with ``torch.randn`` on ``device``.
    :param device: where the samples live; None: the model's first parameter's device, else
                   ``noise``'s, else the CPU.
    :param progress: show a tqdm progress bar.
    :param step_noise_fn: supplies each step's noise (see ``StepNoiseFn``); None: the step draws it.
    :param step_kwargs: passed to every ``step_fn`` call (clip_denoised, cond_fn, model_kwargs, eta, ...).
    :return: a generator over the steps' outputs (dicts with 'sample' and 'pred_xstart'); the
             argument checks run at its first ``next()``.
    """
    check_cond_fn(step_kwargs.get("cond_fn"))
    device, img = _loop_start(model, shape, noise, device)
    for step, i in enumerate(_loop_indices(num_timesteps, progress)):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        noise_i = None if step_noise_fn is None else step_noise_fn(step, tuple(img.shape), img.device)
        with torch.no_grad():
            out = step_fn(model, img, t, noise=noise_i, **step_kwargs)
            yield out
            img = out["sample"]


def final_sample(outputs: Iterable[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """The 'sample' of the last output of a sampling loop."""
    final = None
    for final in outputs:
        pass
    return final["sample"]


def _loop_start(
    model: Any,
    shape: Sequence[int],
    noise: Optional[torch.Tensor],
    device: Optional[Union[str, torch.device]],
) -> Tuple[torch.device, torch.Tensor]:
    """The device and the starting x_T of a sampling loop."""
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        if first is not None:
            device = first.device
        elif noise is not None:
            device = noise.device
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected shape {tuple(shape)}")
        img = noise
    else:
        img = torch.randn(*shape, device=device)
    return device, img


def _loop_indices(num_timesteps: int, progress: bool) -> Iterable[int]:
    """T-1, ..., 0, wrapped in a tqdm progress bar when ``progress``."""
    indices = list(range(num_timesteps))[::-1]
    if progress:
        # Lazy import so that we don't depend on tqdm.
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    return indices
