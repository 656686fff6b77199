"""
Small building blocks shared by the diffusion networks.

Names and behaviour follow upstream guided-diffusion's ``nn.py`` (state_dict keys of the
models built from them are identical); the implementations are written for modern PyTorch:
``update_ema`` uses ``torch._foreach`` kernels and ``checkpoint`` is the non-reentrant
``torch.utils.checkpoint`` (autocast-safe, no custom autograd function). Upstream's autograd
function, ``CheckpointFunction``, is kept for code that calls it directly.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

# Upstream improved-diffusion defined its own SiLU class; nn.SiLU is the same function.
SiLU = nn.SiLU


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm that normalises in float32 and returns the input's dtype.

    Half-precision statistics over large groups lose accuracy, hence the float32 compute
    (a no-op cast when the input already is float32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """
    Create a 1D, 2D, or 3D convolution module.

    :param dims: the number of spatial dimensions (1, 2 or 3).
    :param args: positional arguments of the torch Conv module (in, out, kernel_size, ...).
    :param kwargs: keyword arguments of the torch Conv module (stride, padding, ...).
    """
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: dims={dims!r} (expected 1, 2 or 3)")


def linear(*args, **kwargs) -> nn.Linear:
    """
    Create a linear module (``nn.Linear(*args, **kwargs)``).
    """
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """
    Create a 1D, 2D, or 3D average pooling module.

    :param dims: the number of spatial dimensions (1, 2 or 3).
    """
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: dims={dims!r} (expected 1, 2 or 3)")


@torch.no_grad()
def update_ema(
    target_params: Iterable[torch.Tensor],
    source_params: Iterable[torch.Tensor],
    rate: float = 0.99,
) -> None:
    """
    Update target parameters to be closer to those of source parameters using
    an exponential moving average: ``targ = targ * rate + src * (1 - rate)``.

    Runs as two fused ``torch._foreach`` kernels over all tensors (no Python loop per tensor,
    no host sync).

    :param target_params: the target parameter sequence (updated in place).
    :param source_params: the source parameter sequence.
    :param rate: the EMA rate (closer to 1 means slower).
    """
    targets = [p.detach() for p in target_params]
    sources = [p.detach() for p in source_params]
    if len(targets) != len(sources):
        raise ValueError(
            f"update_ema: target_params has {len(targets)} tensors but source_params has "
            f"{len(sources)}; they must be the parameters of the same architecture"
        )
    if not targets:
        return
    torch._foreach_mul_(targets, rate)
    torch._foreach_add_(targets, sources, alpha=1.0 - rate)


def zero_module(module: nn.Module) -> nn.Module:
    """
    Zero out the parameters of a module and return it.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """
    Scale the parameters of a module and return it.
    """
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """
    Take the mean over all non-batch dimensions.
    """
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels: int) -> nn.Module:
    """
    Make a standard normalization layer: ``GroupNorm32(32, channels)``.

    :param channels: number of input channels (a multiple of 32).
    :return: an nn.Module for normalization.
    """
    if channels % 32 != 0:
        raise ValueError(
            f"normalization: {channels} channels cannot be split into 32 groups; model channel "
            "counts (num_channels x channel_mult) must be multiples of 32"
        )
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """
    Create sinusoidal timestep embeddings, computed in float32 (also under autocast).

    ``emb[:, i] = cos(t * f_i)`` and ``emb[:, half + i] = sin(t * f_i)`` with
    ``f_i = max_period ** (-i / half)``, ``half = dim // 2``; an odd ``dim`` gets a zero column.

    :param timesteps: a 1-D Tensor of N indices, one per batch element (may be fractional).
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an [N x dim] float32 Tensor of positional embeddings.
    """
    if timesteps.ndim != 1:
        raise ValueError(
            f"timestep_embedding: timesteps must be a 1-D tensor of N values, got shape "
            f"{tuple(timesteps.shape)}"
        )
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(
    func: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Iterable[torch.Tensor],
    flag: bool,
) -> torch.Tensor:
    """
    Evaluate a function without caching intermediate activations, recomputing them in
    the backward pass (upstream's signature; implemented with the non-reentrant
    ``torch.utils.checkpoint``, which is autocast-safe and tracks parameters itself).

    :param func: the function to evaluate.
    :param inputs: the argument sequence to pass to `func`.
    :param params: the parameters `func` depends on (unused: kept for upstream's signature).
    :param flag: if False, disable gradient checkpointing.
    """
    del params  # non-reentrant checkpointing finds the parameters through autograd itself
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


class CheckpointFunction(torch.autograd.Function):
    """
    Upstream's gradient checkpointing as an autograd function (what its ``checkpoint`` called):
    ``CheckpointFunction.apply(run_function, len(inputs), *inputs, *params)`` runs
    ``run_function(*inputs)`` without keeping its activations; the backward pass runs it again on
    detached copies of the inputs, with gradients on, and returns the gradients of the inputs and
    of ``params`` (None for a tensor that does not require one).

    Unlike upstream's, the recomputation runs under the autocast state and from the random streams
    of the forward pass (so it computes in the same dtypes and draws the same dropout masks), and
    tensors that need no gradient are skipped, not an error.
    """

    @staticmethod
    def forward(ctx, run_function: Callable[..., torch.Tensor], length: int, *args: torch.Tensor):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        ctx.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads: torch.Tensor):
        inputs = [x.detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in ctx.input_tensors]
        cpu_rng, cuda_rng = ctx.rng
        with torch.random.fork_rng(devices=range(len(cuda_rng or []))), torch.enable_grad(), \
                contextlib.ExitStack() as stack:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            for device, (enabled, dtype) in ctx.autocast.items():
                if enabled:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
            # views, so that an in-place op of run_function cannot modify the detached leaves
            outputs = ctx.run_function(*[x.view_as(x) if torch.is_tensor(x) else x for x in inputs])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wanted = [t for t in inputs + ctx.input_params if torch.is_tensor(t) and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outputs, output_grads) if torch.is_tensor(o) and o.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if wanted and pairs else [None] * len(wanted))
        result = [next(grads) if torch.is_tensor(t) and t.requires_grad else None for t in inputs + ctx.input_params]
        del ctx.input_tensors, ctx.input_params
        return (None, None) + tuple(result)
