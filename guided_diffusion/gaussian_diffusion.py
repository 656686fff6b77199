"""
Gaussian diffusion: the model's reverse process p on top of the forward process q
(``forward_process``), ancestral (DDPM) and DDIM samplers, training losses and the variational
bound in bits/dim.

Follows the public API and numerics of OpenAI's improved-diffusion (Nichol & Dhariwal 2021)
and guided-diffusion (Dhariwal & Nichol 2021) so that checkpoints, scripts and golden
vectors carry over; the samplers take the superset of both codebases' arguments
(guided-diffusion's order, with ``cond_fn`` before ``model_kwargs``). Upstream's schedule names
(``get_named_beta_schedule``, ``betas_for_alpha_bar``) live in ``forward_process`` and are
re-exported here, upstream's import path; the loop the samplers share lives in ``sampling_loops``.

Schedules are held as float64 numpy arrays (as upstream); per-timestep values are read from
float32 torch tables built once per device (see ``ForwardProcess._extract``).
"""
from __future__ import annotations

import enum
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from . import fdm as _fdm
from .forward_process import BETA_SCHEDULES, LOG2, ForwardProcess, betas_for_alpha_bar, get_named_beta_schedule
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .sampling_loops import StepNoiseFn, check_cond_fn, final_sample, sampling_loop, step_noise

__all__ = ["BETA_SCHEDULES", "get_named_beta_schedule", "betas_for_alpha_bar", "ModelMeanType", "ModelVarType",
           "LossType", "GaussianDiffusion", "StepNoiseFn"]


class ModelMeanType(enum.Enum):
    """
    Which type of output the model predicts.
    """

    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts epsilon


class ModelVarType(enum.Enum):
    """
    What is used as the model's output variance.

    The LEARNED_RANGE option has been added to allow the model to predict values between
    FIXED_SMALL and FIXED_LARGE, making its job easier.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()

    @property
    def is_learned(self) -> bool:
        """The model predicts its variance (``--learn_sigma True``): it outputs twice the channels and
        its loss adds the variational-bound term."""
        return self in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


class LossType(enum.Enum):
    """
    The training objective.
    """

    MSE = enum.auto()  # use raw MSE loss (and KL when learning variances)
    RESCALED_MSE = enum.auto()  # use raw MSE loss (with RESCALED_KL when learning variances)
    KL = enum.auto()  # use the variational lower-bound
    RESCALED_KL = enum.auto()  # like KL, but rescale to estimate the full VLB

    def is_vb(self) -> bool:
        """:return: True for the variational-bound losses (KL and RESCALED_KL)."""
        return self == LossType.KL or self == LossType.RESCALED_KL


def _check_enum(value: Any, enum_cls: type, name: str) -> None:
    if not isinstance(value, enum_cls):
        valid = ", ".join(f"{enum_cls.__name__}.{m.name}" for m in enum_cls)
        raise TypeError(f"{name} must be one of {valid}; got {value!r}")


class GaussianDiffusion(ForwardProcess):
    """
    Utilities for training and sampling diffusion models.

    Ported from the original DDPM code; see ``Ho et al. 2020`` and ``Nichol & Dhariwal 2021``.

    :param betas: a 1-D numpy array (or sequence) of betas for each diffusion timestep,
                  starting at T and going to 1 (each in (0, 1]).
    :param model_mean_type: a ModelMeanType determining what the model outputs.
    :param model_var_type: a ModelVarType determining how variance is output.
    :param loss_type: a LossType determining the loss function to use.
    :param rescale_timesteps: if True, pass floating point timesteps into the model so that they
                              are always scaled like in the original paper (0 to 1000).
    :param fdm: (new) FDM's input preconditioning (``guided_diffusion.fdm``): wherever this
                diffusion calls the model (training losses, every sampler, the bpd loop) the
                model sees s(sigma_t) * x_t / sqrt(abar_t) instead of x_t. Off: upstream's numerics.
    :param fdm_multiplier: FDM's m.
    :param fdm_sigma_range: "vp" or "schedule": where sigma_min / sigma_max of s come from.
    """

    def __init__(
        self,
        *,
        betas: Union[np.ndarray, Sequence[float]],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        fdm: bool = False,
        fdm_multiplier: float = _fdm.DEFAULT_MULTIPLIER,
        fdm_sigma_range: str = _fdm.DEFAULT_SIGMA_RANGE,
    ):
        _check_enum(model_mean_type, ModelMeanType, "model_mean_type")
        _check_enum(model_var_type, ModelVarType, "model_var_type")
        _check_enum(loss_type, LossType, "loss_type")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        super().__init__(betas=betas)

        # The model's fixed variances, in float64 (upstream builds them on every call).
        self._log_betas = np.log(self.betas)
        fixed_large = (
            np.append(self.posterior_variance[1], self.betas[1:])
            if self.num_timesteps > 1
            else self.betas
        )
        self._fixed_large_variance = fixed_large
        self._fixed_large_log_variance = np.log(fixed_large)

        # FDM: the factor s(sigma_t) / sqrt(abar_t) on the model's input x_t (float64, length T).
        self.fdm = bool(fdm)
        self.fdm_multiplier = float(fdm_multiplier)
        self.fdm_sigma_range = str(fdm_sigma_range).strip().lower()
        if self.fdm:
            _fdm.check_fdm_options(fdm_multiplier, fdm_sigma_range)
            self._fdm_input_scale = _fdm.input_scale_table(
                self.alphas_cumprod, self.fdm_multiplier, self.fdm_sigma_range)

    # ------------------------------------------------------------------ helpers

    def _model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """
        x_t as the model sees it: x_t itself, or with FDM s(sigma_t) * x_t / sqrt(abar_t).
        Every model call of this class goes through here (not classifier ``cond_fn`` calls).
        """
        if not self.fdm:
            return x
        return self._extract("_fdm_input_scale", t, x.shape) * x

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: floats on a 0..1000 scale when rescale_timesteps."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------------ reverse process p

    def p_mean_variance(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Apply the model to get p(x_{t-1} | x_t), as well as a prediction of
        the initial x, x_0.

        :param model: the model, which takes a signal and a batch of timesteps as input.
        :param x: the [N x C x ...] tensor at time t.
        :param t: a 1-D Tensor of timesteps.
        :param clip_denoised: if True, clip the denoised signal into [-1, 1].
        :param denoised_fn: if not None, a function which applies to the x_start prediction
                            before it is used to sample. Applies before clip_denoised.
        :param model_kwargs: if not None, a dict of extra keyword arguments to pass to the
                             model. This can be used for conditioning.
        :return: a dict with the following keys:
                 - 'mean': the model mean output.
                 - 'variance': the model variance output.
                 - 'log_variance': the log of 'variance'.
                 - 'pred_xstart': the prediction for x_0.
        """
        if model_kwargs is None:
            model_kwargs = {}

        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"p_mean_variance: t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(self._model_input(x, t), self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type.is_learned:
            expected = (B, C * 2, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(
                    f"a learned-variance model must output {expected} (mean and variance "
                    f"channels), got {tuple(model_output.shape)}"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = torch.exp(model_log_variance)
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("_log_betas", t, x.shape)
                # The model_var_values is [-1, 1] for [min_var, max_var].
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # betas, except at t=0 where the posterior variance gives a better decoder likelihood.
            model_variance = self._extract("_fixed_large_variance", t, x.shape)
            model_log_variance = self._extract("_fixed_large_log_variance", t, x.shape)
        else:
            model_variance = self._extract("posterior_variance", t, x.shape)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
                )
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        if not (model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape):
            raise ValueError(
                f"model output shape {tuple(model_mean.shape)} does not match x {tuple(x.shape)}"
            )
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    # ------------------------------------------------------------------ classifier guidance

    def condition_mean(
        self,
        cond_fn: Callable[..., torch.Tensor],
        p_mean_var: Dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """
        Compute the mean for the previous step, given a function cond_fn that computes the
        gradient of a conditional log probability with respect to x. In particular, cond_fn
        computes grad(log(p(y|x))), and we want to condition on y.

        This uses the conditioning strategy from Sohl-Dickstein et al. (2015):
        mean + variance * gradient.

        :return: the conditioned mean (float32).
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self,
        cond_fn: Callable[..., torch.Tensor],
        p_mean_var: Dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Compute what the p_mean_variance output would have been, should the model's score
        function be conditioned by cond_fn.

        See condition_mean() for details on cond_fn. Unlike condition_mean(), this instead
        uses the conditioning strategy from Song et al (2020): eps -= sqrt(1 - alpha_bar) * grad.

        :return: a copy of ``p_mean_var`` with new 'pred_xstart' and 'mean'.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------ ancestral sampling

    def p_sample(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Sample x_{t-1} from the model at the given timestep.

        :param model: the model to sample from.
        :param x: the current tensor at x_{t-1}.
        :param t: the value of t, starting at 0 for the first diffusion step.
        :param clip_denoised: if True, clip the x_start prediction to [-1, 1].
        :param denoised_fn: if not None, a function which applies to the x_start prediction
                            before it is used to sample.
        :param cond_fn: if not None, this is a gradient function that acts similarly to the model.
        :param model_kwargs: if not None, a dict of extra keyword arguments to pass to the model.
        :param noise: (new) if given, the standard normal noise of this step (x's shape) instead
                      of ``torch.randn_like(x)``.
        :return: a dict containing the following keys:
                 - 'sample': a random sample from the model.
                 - 'pred_xstart': a prediction of x_0.
        """
        check_cond_fn(cond_fn)
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = step_noise(noise, x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        step_noise_fn: Optional[StepNoiseFn] = None,
    ) -> torch.Tensor:
        """
        Generate samples from the model.

        :param model: the model module.
        :param shape: the shape of the samples, (N, C, H, W).
        :param noise: if specified, the noise from the encoder to sample. Should be of the same
                      shape as `shape`.
        :param clip_denoised: if True, clip x_start predictions to [-1, 1].
        :param denoised_fn: if not None, a function which applies to the x_start prediction
                            before it is used to sample.
        :param cond_fn: if not None, this is a gradient function that acts similarly to the model.
        :param model_kwargs: if not None, a dict of extra keyword arguments to pass to the model.
        :param device: if specified, the device to create the samples on. If not specified, use
                       a model parameter's device.
        :param progress: if True, show a tqdm progress bar.
        :param step_noise_fn: (new) if given, ``step_noise_fn(step, shape, device)`` supplies
                              the noise of sampling step ``step`` (0 for the first denoising
                              step, i.e. timestep index num_timesteps - 1, up to
                              num_timesteps - 1 for t = 0), so several models can be sampled
                              with the same per-step noise. None: ``torch.randn_like`` as
                              upstream.
        :return: a non-differentiable batch of samples.
        """
        return final_sample(self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, step_noise_fn=step_noise_fn,
        ))

    def p_sample_loop_progressive(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        step_noise_fn: Optional[StepNoiseFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """
        Generate samples from the model and yield intermediate samples from each timestep of
        diffusion.

        Arguments are the same as p_sample_loop(). Returns a generator over dicts, where each
        dict is the return value of p_sample().
        """
        return sampling_loop(
            self.p_sample, model, shape, self.num_timesteps, noise=noise, device=device, progress=progress,
            step_noise_fn=step_noise_fn, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    # ------------------------------------------------------------------ DDIM

    def ddim_sample(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Sample x_{t-1} from the model using DDIM (Song et al. 2020, equation 12).

        Same usage as p_sample(); ``eta`` (>= 0) scales the per-step noise: 0 is the
        deterministic DDIM path, 1 matches the ancestral sampler's variance.
        """
        check_cond_fn(cond_fn)
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Usually our model outputs epsilon, but we re-derive it
        # in case we used x_start or x_prev prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])

        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        # Drawn even when eta == 0, so the RNG stream matches upstream's.
        noise = step_noise(noise, x)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """
        Sample x_{t+1} from the model using the DDIM reverse ODE (deterministic, eta == 0).

        :return: a dict with 'sample' (x_{t+1}) and 'pred_xstart'.
        """
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample: the reverse ODE is deterministic; eta must be 0.0, got {eta}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        # Usually our model outputs epsilon, but we re-derive it
        # in case we used x_start or x_prev prediction.
        eps = (
            self._extract("sqrt_recip_alphas_cumprod", t, x.shape) * x - out["pred_xstart"]
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x.shape)
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        # Equation 12, reversed.
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        eta: float = 0.0,
        step_noise_fn: Optional[StepNoiseFn] = None,
    ) -> torch.Tensor:
        """
        Generate samples from the model using DDIM.

        Same usage as p_sample_loop(), plus ``eta`` (see ddim_sample()).
        """
        return final_sample(self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, step_noise_fn=step_noise_fn,
        ))

    def ddim_sample_loop_progressive(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        eta: float = 0.0,
        step_noise_fn: Optional[StepNoiseFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """
        Use DDIM to sample from the model and yield intermediate samples from each timestep of
        DDIM.

        Same usage as p_sample_loop_progressive().
        """
        return sampling_loop(
            self.ddim_sample, model, shape, self.num_timesteps, noise=noise, device=device, progress=progress,
            step_noise_fn=step_noise_fn, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, eta=eta,
        )

    # ------------------------------------------------------------------ losses and bounds

    def _vb_terms_bpd(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Get a term for the variational lower-bound.

        The resulting units are bits (rather than nats, as one might expect). This allows for
        comparison to other papers.

        :return: a dict with the following keys:
                 - 'output': a shape [N] tensor of NLLs or KLs.
                 - 'pred_xstart': the x_0 predictions.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / LOG2

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / LOG2

        # At the first timestep return the decoder NLL, otherwise KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).
        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Compute training losses for a single timestep.

        No host synchronisation happens here (no ``.item()``, no data-dependent branching).

        :param model: the model to evaluate loss on.
        :param x_start: the [N x C x ...] tensor of inputs.
        :param t: a batch of timestep indices.
        :param model_kwargs: if not None, a dict of extra keyword arguments to pass to the
                             model. This can be used for conditioning.
        :param noise: if specified, the specific Gaussian noise to try to remove.
        :return: a dict with the key "loss" containing a tensor of shape [N]; for the MSE losses
                 also "mse" and, with a learned variance, "vb" (in bits, scaled by
                 num_timesteps/1000 for RESCALED_MSE).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms: Dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(self._model_input(x_t, t), self._scale_timesteps(t), **model_kwargs)

            if self.model_var_type.is_learned:
                B, C = x_t.shape[:2]
                expected = (B, C * 2, *x_t.shape[2:])
                if model_output.shape != expected:
                    raise ValueError(
                        f"a learned-variance model must output {expected} (mean and variance "
                        f"channels), got {tuple(model_output.shape)}"
                    )
                model_output, model_var_values = torch.split(model_output, C, dim=1)
                # Learn the variance using the variational bound, but don't let it affect our
                # mean prediction.
                frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for equivalence with initial implementation.
                    # Without a factor of 1/1000, the VB term hurts the MSE term.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            if not (model_output.shape == target.shape == x_start.shape):
                raise ValueError(
                    f"model output shape {tuple(model_output.shape)} does not match the input "
                    f"{tuple(x_start.shape)} (is learn_sigma set consistently with the model?)"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            if "vb" in terms:
                terms["loss"] = terms["mse"] + terms["vb"]
            else:
                terms["loss"] = terms["mse"]
        else:  # pragma: no cover - every LossType is handled above
            raise NotImplementedError(self.loss_type)

        return terms

    def calc_bpd_loop(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Compute the entire variational lower-bound, measured in bits-per-dim, as well as other
        related quantities.

        :param model: the model to evaluate loss on.
        :param x_start: the [N x C x ...] tensor of inputs.
        :param clip_denoised: if True, clip denoised samples.
        :param model_kwargs: if not None, a dict of extra keyword arguments to pass to the
                             model. This can be used for conditioning.
        :return: a dict containing the following keys:
                 - total_bpd: the total variational lower-bound, per batch element.
                 - prior_bpd: the prior term in the lower-bound.
                 - vb: an [N x T] tensor of terms in the lower-bound (column 0 is t = T-1).
                 - xstart_mse: an [N x T] tensor of x_0 MSEs for each timestep.
                 - mse: an [N x T] tensor of epsilon MSEs for each timestep.
        """
        device = x_start.device
        batch_size = x_start.shape[0]

        vb: List[torch.Tensor] = []
        xstart_mse: List[torch.Tensor] = []
        mse: List[torch.Tensor] = []
        for t in range(self.num_timesteps - 1, -1, -1):
            t_batch = torch.full((batch_size,), t, dtype=torch.long, device=device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            # Calculate VLB term at the current timestep
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb_t = torch.stack(vb, dim=1)
        xstart_mse_t = torch.stack(xstart_mse, dim=1)
        mse_t = torch.stack(mse, dim=1)

        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb_t.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": xstart_mse_t,
            "mse": mse_t,
        }


# ---------------------------------------------------------------------- module helpers


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """
    Extract values from a 1-D numpy array for a batch of indices (upstream helper, kept for
    code that imports it; GaussianDiffusion itself uses cached device tables).

    :param arr: the 1-D numpy array.
    :param timesteps: a tensor of indices into the array to extract.
    :param broadcast_shape: a larger shape of K dimensions with the batch dimension equal to
                            the length of timesteps.
    :return: a float32 tensor of shape [batch_size, 1, ...] expanded to broadcast_shape.
    """
    res = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
