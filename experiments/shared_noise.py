"""
Sampling several models from the same noise (the paper's consistency phenomenon, Fig. 1, 9):
image j of a batch gets its initial noise and the noise of every sampling step from its own seed
(``SharedNoise``, handed to the diffusion's own sampling loops as ``step_noise_fn``), never from
the model, the batch it is in or the device, so the samples of different models compare.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch

from guided_diffusion.sample_util import SampleNoise
from guided_diffusion.seeding import mix_seed

__all__ = ["SharedNoise", "sample_with_shared_noise", "final_sample", "seed_labels"]


class SharedNoise(SampleNoise):
    """
    Noise that depends only on each image's seed and the sampling step, never on the model,
    the batch it is in or the device: image j (seed ``seeds[j]``) gets the initial noise of
    generator ``mix_seed(seeds[j], 0)`` and at step k (0 = the first denoising step) the noise of
    ``mix_seed(seeds[j], k + 1)``. Drawn on the CPU in float32 (``SampleNoise`` on the CPU, keyed
    by image seed instead of sample index), then moved to the device.

    Instances are callables ``(step_index, shape, device) -> tensor``: the diffusion's
    ``step_noise_fn`` keyword takes them as they are.
    """
    def __init__(self, seeds: Sequence[int], shape: Sequence[int]):
        """
        :param seeds: one integer seed per image of the batch.
        :param shape: the shape of one image, e.g. (3, 32, 32).
        """
        super().__init__(0, seeds, shape, "cpu")
        self.seeds = list(self.indices)

    def item_seed(self, index: int, stream: int) -> int:
        return mix_seed(index, stream)

    def initial(self, device="cpu") -> torch.Tensor:
        """The initial noise x_T, [len(seeds), *shape]."""
        return self.draw(0).to(device)

    def step(self, step_index: int, device="cpu") -> torch.Tensor:
        """The noise added at sampling step ``step_index`` (0-based)."""
        return self.draw(int(step_index) + 1).to(device)

    def __call__(self, step_index: int, shape: Sequence[int], device=None) -> torch.Tensor:
        shape = tuple(shape)
        if shape != (len(self.seeds),) + self.shape:
            raise ValueError(
                f"SharedNoise: asked for noise of shape {shape}, but it serves "
                f"{len(self.seeds)} images of shape {self.shape}"
            )
        return self.step(step_index, "cpu" if device is None else device)


def sample_with_shared_noise(
    model: torch.nn.Module,
    diffusion,
    noise: SharedNoise,
    *,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: Optional[dict] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> Iterator[Dict[str, Any]]:
    """
    Run the diffusion's own reverse process (``p_sample_loop_progressive``, or
    ``ddim_sample_loop_progressive`` with ``use_ddim``) from ``noise.initial()``, with
    ``noise`` as its ``step_noise_fn``: step k adds ``noise.step(k)``, whatever the model.

    :param model: the denoising network (put it in eval mode first).
    :param diffusion: a ``GaussianDiffusion`` / ``SpacedDiffusion``.
    :param noise: the shared noise; its seeds fix the batch size.
    :param use_ddim: DDIM instead of ancestral DDPM sampling.
    :param eta: DDIM's η (0 = deterministic; the per-step noise matters only for η > 0).
    :param model_kwargs: e.g. ``{"y": labels}`` for a class-conditional model.
    :return: an iterator of dicts ``{"step", "t", "t_train", "sample", "pred_xstart"}``:
        ``t`` is the (possibly re-spaced) timestep index the step denoised, ``t_train`` the
        timestep of the training diffusion it stands for.
    """
    device = torch.device(device)
    shape = (len(noise.seeds),) + noise.shape
    kwargs = dict(noise=noise.initial(device), clip_denoised=clip_denoised, model_kwargs=model_kwargs or {},
                  device=device, progress=progress, step_noise_fn=noise)
    if use_ddim:
        loop = diffusion.ddim_sample_loop_progressive(model, shape, eta=eta, **kwargs)
    else:
        loop = diffusion.p_sample_loop_progressive(model, shape, **kwargs)
    num_steps = diffusion.num_timesteps
    tmap = getattr(diffusion, "timestep_map", None)
    for k, out in enumerate(loop):
        t = num_steps - 1 - k
        t_train = int(tmap[t]) if tmap is not None else t
        yield {"step": k, "t": t, "t_train": t_train, "sample": out["sample"], "pred_xstart": out["pred_xstart"]}


def final_sample(steps: Iterator[Dict[str, Any]]) -> torch.Tensor:
    """Run a ``sample_with_shared_noise`` iterator to the end; return the last sample."""
    last = None
    for last in steps:
        pass
    if last is None:
        raise ValueError("final_sample: the sampling loop produced no steps (num_timesteps = 0?)")
    return last["sample"]


def seed_labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """Class labels drawn from each image's seed alone (class-conditional models agree on them)."""
    g = [torch.Generator().manual_seed(mix_seed(s, 999_983)) for s in seeds]
    return torch.stack([torch.randint(0, int(num_classes), (), generator=gi) for gi in g]).long()
