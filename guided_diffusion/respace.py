"""
Re-spacing: run a diffusion process on a subset of its timesteps (faster sampling, DDIM),
as in improved-diffusion (Nichol & Dhariwal 2021, section 4).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Sequence, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """
    Create a list of timesteps to use from an original diffusion process, given the number of
    timesteps we want to take from equally-sized portions of the original process.

    For example, if there's 300 timesteps and the section counts are [10,15,20] then the first
    100 timesteps are strided to be 10 timesteps, the second 100 are strided to be 15
    timesteps, and the final 100 are strided to be 20.

    If the stride is a string starting with "ddim", then the fixed striding from the DDIM
    paper is used, and only one section is allowed.

    :param num_timesteps: the number of diffusion steps in the original process to divide up.
    :param section_counts: either a list of numbers, or a string containing comma-separated
                           numbers, indicating the step count per section. As a special case,
                           use "ddimN" where N is a number of steps to use the striding from
                           the DDIM paper.
    :return: a set of diffusion steps from the original process to use.
    """
    if isinstance(section_counts, str):
        spec = section_counts
        if spec.startswith("ddim"):
            try:
                desired_count = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"timestep_respacing {spec!r}: expected 'ddimN' with an integer N, e.g. 'ddim50'"
                ) from None
            # The smallest integer stride that yields exactly desired_count steps.
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {spec!r}: cannot take exactly {desired_count} of "
                f"{num_timesteps} steps with an integer stride"
            )
        try:
            section_counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {spec!r}: expected comma-separated integers (e.g. '250' or "
                "'10,15,20') or 'ddimN'"
            ) from None
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("timestep_respacing: expected at least one section count")
    if any(int(c) != c or c < 0 for c in section_counts):
        raise ValueError(f"timestep_respacing: section counts must be non-negative integers, got {section_counts}")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"timestep_respacing: cannot divide section {i} of {size} steps (of "
                f"{num_timesteps} split into {len(section_counts)} sections) into {section_count} steps"
            )
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process which can skip steps in a base diffusion process.

    The betas are re-derived from the base's alphas_cumprod at the kept steps, so
    ``alphas_cumprod`` here equals the base's at ``timestep_map``. With ``fdm`` the model's
    input scale is the base process's at ``timestep_map`` (the sigma range of the whole
    schedule, not of the kept steps). Models (and classifier
    ``cond_fn``s) are called with the base process's timesteps through a light call-time
    wrapper; nothing is attached to the model itself.

    :param use_timesteps: a collection (sequence or set) of timesteps from the original
                          diffusion process to retain.
    :param kwargs: the kwargs to create the base diffusion process (``betas`` etc.).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any):
        if "betas" not in kwargs:
            raise TypeError("SpacedDiffusion needs the base process's betas= keyword")
        kwargs = dict(kwargs)  # do not rewrite the caller's dict
        self.use_timesteps = set(int(i) for i in use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        outside = sorted(i for i in self.use_timesteps if not 0 <= i < self.original_num_steps)
        if outside:
            raise ValueError(
                f"use_timesteps {outside[:5]} outside 0..{self.original_num_steps - 1} "
                f"(the base process has {self.original_num_steps} steps)"
            )
        if not self.use_timesteps:
            raise ValueError("use_timesteps is empty: keep at least one timestep")

        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        timestep_map = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        # FDM's input scale is not recomputed from the kept steps (their sigma range is not the
        # process's): it is the base process's at the kept steps, set below
        super().__init__(**dict(kwargs, fdm=False))
        # Base-process timestep of each re-spaced step (int64, CPU; copied per device on use).
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.int64)
        self.fdm = base_diffusion.fdm
        self.fdm_multiplier = base_diffusion.fdm_multiplier
        self.fdm_sigma_range = base_diffusion.fdm_sigma_range
        if self.fdm:
            # s(sigma_t) / sqrt(abar_t) of the base at t = timestep_map (the re-spaced abar equals
            # the base's there up to rounding; the base's is used)
            self._fdm_input_scale = base_diffusion._fdm_input_scale[np.asarray(timestep_map, dtype=np.int64)]

    def p_mean_variance(self, model: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:  # pylint: disable=signature-differs
        """As GaussianDiffusion.p_mean_variance, calling the model with base timesteps."""
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:  # pylint: disable=signature-differs
        """As GaussianDiffusion.training_losses, calling the model with base timesteps."""
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """As GaussianDiffusion.condition_mean, calling cond_fn with base timesteps."""
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """As GaussianDiffusion.condition_score, calling cond_fn with base timesteps."""
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model: Callable[..., torch.Tensor]) -> "_WrappedModel":
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # Scaling is done by the wrapped model.
        return t

    def _map_table(self, device: torch.device) -> torch.Tensor:
        """timestep_map on ``device`` (cached like the schedule tables)."""
        key = ("timestep_map", device)
        table = self._tables.get(key)
        if table is None:
            table = self.timestep_map.to(device)
            self._tables[key] = table
        return table


class _WrappedModel:
    """
    Calls ``model`` with the base process's timesteps (scaled to 0..1000 floats when
    rescale_timesteps). Created at call time only, so the model's state_dict, pickling and
    DDP wrapping are untouched.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        diffusion: SpacedDiffusion,
        rescale_timesteps: bool,
        original_num_steps: int,
    ):
        self.model = model
        self.diffusion = diffusion
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new_ts = self.diffusion._map_table(ts.device)[ts.long()]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
