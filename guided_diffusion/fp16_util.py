"""
Helpers to train with 16-bit precision, under upstream's ``fp16_util`` names.

Upstream trained fp16 models with float32 "master" copies of the parameters: the model's
convolutions hold float16 weights, the gradients are copied into flat float32 master tensors,
the loss is multiplied by a dynamic loss scale 2**lg_loss_scale (``INITIAL_LOG_LOSS_SCALE`` =
20 at the start, + ``fp16_scale_growth`` after every good step, - 1 and the step skipped when a
gradient overflows) and the optimizer steps the master copies, which are then copied back.
``MixedPrecisionTrainer`` does exactly that and works standalone, as upstream users call it::

    mp = MixedPrecisionTrainer(model=model, use_fp16=True)
    opt = torch.optim.AdamW(mp.master_params, lr=1e-4)
    mp.zero_grad(); mp.backward(loss); took_step = mp.optimize(opt)

This project's ``TrainLoop`` does not need master copies: its parameters stay float32 and the
forward pass runs under autocast, with a ``torch.amp.GradScaler`` for fp16. Its ``mp_trainer``
is a ``GradScalerTrainer``: the same interface, whose master params *are* the model params.

The flat-parameter helpers accept both upstream layouts: guided-diffusion's
``param_groups_and_shapes`` (from ``get_param_groups_and_shapes``: one flat master tensor for
the scalars/vectors, one ``(1, -1)`` matrix for the rest) and improved-diffusion's plain list of
model parameters (one flat 1-D master tensor), so ``improved_diffusion.fp16_util`` is this
module too.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import logger
from .unet_blocks import convert_module_to_f16, convert_module_to_f32  # noqa: F401  (upstream names)

__all__ = [
    "INITIAL_LOG_LOSS_SCALE",
    "unflatten_like",
    "convert_module_to_f16",
    "convert_module_to_f32",
    "make_master_params",
    "model_grads_to_master_grads",
    "master_params_to_model_params",
    "unflatten_master_params",
    "get_param_groups_and_shapes",
    "master_params_to_state_dict",
    "state_dict_to_master_params",
    "zero_master_grads",
    "zero_grad",
    "param_grad_or_zeros",
    "MixedPrecisionTrainer",
    "GradScalerTrainer",
    "check_overflow",
]

# The loss scale starts at 2**20.
INITIAL_LOG_LOSS_SCALE = 20.0


# ---------------------------------------------------------------------------------- flat copies


def _is_grouped(items: Sequence[Any]) -> bool:
    """True for guided's [(param_group, shape), ...]; False for a plain list of tensors."""
    return bool(items) and not torch.is_tensor(items[0])


def _params_of(group: Sequence[Any]) -> List[torch.Tensor]:
    """The tensors of a param group: a list of (name, param) pairs or of params."""
    return [p[1] if isinstance(p, (tuple, list)) else p for p in group]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous float32 1-D tensor holding ``tensors`` one after the other."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def unflatten_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views of the 1-D ``flat`` shaped as the tensors of ``like`` (in order)."""
    flat = flat.reshape(-1)
    out, at = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[at:at + n].view_as(t))
        at += n
    if at != flat.numel():
        raise ValueError(f"unflatten_master_params: the master tensor has {flat.numel()} elements, "
                         f"the parameters {at}")
    return out


def _master_parameter(flat: torch.Tensor, shape: Any) -> nn.Parameter:
    p = nn.Parameter(flat.view(shape))
    p.requires_grad_(True)
    return p


def get_param_groups_and_shapes(named_model_params: Iterable[Tuple[str, torch.Tensor]]) -> List[Tuple[list, Any]]:
    """
    Split named parameters into the two groups upstream keeps one flat master tensor for:
    scalars and vectors (``ndim <= 1``, master shape ``-1``) and matrices/kernels (``ndim > 1``,
    master shape ``(1, -1)``).

    :param named_model_params: ``model.named_parameters()`` (or (name, tensor) pairs).
    :return: ``[(scalar_vector_named_params, -1), (matrix_named_params, (1, -1))]``.
    """
    named = list(named_model_params)
    return [
        ([(n, p) for n, p in named if p.ndim <= 1], -1),
        ([(n, p) for n, p in named if p.ndim > 1], (1, -1)),
    ]


def make_master_params(param_groups_and_shapes: Sequence[Any]) -> List[nn.Parameter]:
    """
    Float32 copies of the model parameters, flattened: one master parameter per group of
    ``get_param_groups_and_shapes`` (shaped as the group's shape), or, given a plain list of
    model parameters (improved-diffusion), a single flat 1-D master parameter.

    :return: the list of master ``nn.Parameter`` (requires_grad, no grad yet).
    """
    items = list(param_groups_and_shapes)
    if not _is_grouped(items):
        return [_master_parameter(_flat(items), -1)]
    return [_master_parameter(_flat(_params_of(group)), shape) for group, shape in items]


def param_grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
    """The parameter's gradient (detached), or zeros shaped as the parameter when it has none."""
    if param.grad is not None:
        return param.grad.detach()
    return torch.zeros_like(param)


def model_grads_to_master_grads(param_groups_and_shapes: Sequence[Any], master_params: Sequence[torch.Tensor]) -> None:
    """
    Copy the model's gradients (zeros where a parameter has none) into the ``.grad`` of the
    master parameters from ``make_master_params``, as float32.

    :param param_groups_and_shapes: the groups the masters were made from, or the plain list of
                                    model parameters (improved-diffusion).
    """
    items = list(param_groups_and_shapes)
    if not _is_grouped(items):
        master_params[0].grad = _flat([param_grad_or_zeros(p) for p in items]).to(master_params[0].device)
        return
    for master, (group, shape) in zip(master_params, items):
        grads = [param_grad_or_zeros(p) for p in _params_of(group)]
        master.grad = _flat(grads).to(master.device).view(shape)


def unflatten_master_params(param_group: Sequence[Any], master_param: Any) -> List[torch.Tensor]:
    """
    Views of a flat master tensor shaped as the parameters of ``param_group``.

    :param param_group: a group's (name, param) pairs, or the plain list of model parameters.
    :param master_param: the group's master tensor, or (improved-diffusion) the master list,
                         whose first tensor is used.
    """
    if isinstance(master_param, (list, tuple)):
        master_param = master_param[0]
    return unflatten_like(master_param.detach(), _params_of(list(param_group)))


def master_params_to_model_params(param_groups_and_shapes: Sequence[Any], master_params: Sequence[torch.Tensor]) -> None:
    """
    Copy the master parameters' values back into the model parameters (cast to their dtype).

    :param param_groups_and_shapes: the groups the masters were made from, or the plain list of
                                    model parameters (improved-diffusion).
    """
    items = list(param_groups_and_shapes)  # a generator would otherwise copy nothing
    if not _is_grouped(items):
        pairs = [(items, master_params[0])]
    else:
        pairs = [(_params_of(group), master) for master, (group, _shape) in zip(master_params, items)]
    with torch.no_grad():
        for params, master in pairs:
            for param, value in zip(params, unflatten_like(master.detach(), params)):
                param.detach().copy_(value)


def master_params_to_state_dict(model: nn.Module, param_groups_and_shapes: Optional[Sequence[Any]],
                                master_params: Sequence[torch.Tensor], use_fp16: bool) -> Dict[str, torch.Tensor]:
    """
    The model's state_dict with its parameters taken from ``master_params`` (float32).

    :param use_fp16: True: ``master_params`` are the flat masters of ``param_groups_and_shapes``;
                     False: one tensor per ``model.named_parameters()``, in that order.
    """
    state_dict = model.state_dict()
    if use_fp16:
        for master, (group, _shape) in zip(master_params, param_groups_and_shapes):
            names = [n for n, _ in group]
            for name, value in zip(names, unflatten_master_params(group, master)):
                if name not in state_dict:
                    raise KeyError(f"master_params_to_state_dict: {name} is not in the model's state_dict")
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            if name not in state_dict:
                raise KeyError(f"master_params_to_state_dict: {name} is not in the model's state_dict")
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model: nn.Module, state_dict: Dict[str, torch.Tensor], use_fp16: bool) -> List[torch.Tensor]:
    """
    Master parameters from a state_dict (the inverse of ``master_params_to_state_dict``): the
    flat float32 masters when ``use_fp16``, else the state_dict's tensors in
    ``model.named_parameters()`` order.
    """
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return [state_dict[name] for name, _ in model.named_parameters()]


def zero_master_grads(master_params: Iterable[torch.Tensor]) -> None:
    """Drop the master parameters' gradients (``grad = None``)."""
    for p in master_params:
        p.grad = None


def zero_grad(model_params: Iterable[torch.Tensor]) -> None:
    """Zero the existing gradients of the model parameters in place (detached from any graph)."""
    for p in model_params:
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()


def check_overflow(value: Any) -> bool:
    """True when ``value`` is +inf, -inf or NaN (an overflowed fp16 gradient norm)."""
    value = float(value)
    return math.isinf(value) or math.isnan(value)


def _norms(params: Sequence[torch.Tensor], grad_scale: float = 1.0) -> Tuple[float, float]:
    """(gradient norm / grad_scale, parameter norm) over ``params``, both L2 over all elements."""
    with torch.no_grad():
        if not params:
            return 0.0, 0.0
        p_sq = sum(torch.linalg.vector_norm(p.detach(), dtype=torch.float32).double() ** 2 for p in params)
        grads = [p.grad for p in params if p.grad is not None]
        g_sq = sum(torch.linalg.vector_norm(g.detach(), dtype=torch.float32).double() ** 2 for g in grads) \
            if grads else torch.zeros((), dtype=torch.float64)
        return math.sqrt(float(g_sq)) / grad_scale, math.sqrt(float(p_sq))


# ------------------------------------------------------------------------------------- trainers


class MixedPrecisionTrainer:
    """
    Upstream's fp16 trainer: float32 master parameters, dynamic loss scaling, steps skipped on
    overflow. With ``use_fp16`` False it is a plain trainer (the master params are the model's).

    :param model: the model; with ``use_fp16`` its ``convert_to_fp16()`` is called (or, when it
                  has none, its convolutions are converted with ``convert_module_to_f16``).
    :param use_fp16: train with float16 model weights and float32 masters.
    :param fp16_scale_growth: added to lg_loss_scale after every good fp16 step.
    :param initial_lg_loss_scale: log2 of the first loss scale.
    """

    def __init__(self, *, model: nn.Module, use_fp16: bool = False, fp16_scale_growth: float = 1e-3,
                 initial_lg_loss_scale: float = INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = bool(use_fp16)
        self.fp16_scale_growth = float(fp16_scale_growth)
        self.model_params = list(self.model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = float(initial_lg_loss_scale)
        if self.use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(self.model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            if callable(getattr(self.model, "convert_to_fp16", None)):
                self.model.convert_to_fp16()
            else:
                self.model.apply(convert_module_to_f16)

    def zero_grad(self) -> None:
        """Zero the model's gradients."""
        zero_grad(self.model_params)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss multiplied by 2**lg_loss_scale under fp16."""
        if self.use_fp16:
            (loss * (2.0 ** self.lg_loss_scale)).backward()
        else:
            loss.backward()

    def optimize(self, opt: torch.optim.Optimizer) -> bool:
        """
        Step ``opt`` (built on ``master_params``). Logs ``grad_norm`` and ``param_norm`` (and
        ``lg_loss_scale`` under fp16) with ``logger.logkv_mean``.

        :return: False when an fp16 gradient overflowed: the step was skipped and the loss scale
                 halved; True otherwise.
        """
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_fp16(self, opt: torch.optim.Optimizer) -> bool:
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        scale = 2.0 ** self.lg_loss_scale
        grad_norm, param_norm = self._compute_norms(grad_scale=scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            p.grad.mul_(1.0 / scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt: torch.optim.Optimizer) -> bool:
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _compute_norms(self, grad_scale: float = 1.0) -> Tuple[float, float]:
        """(gradient norm / grad_scale, parameter norm) of the master params."""
        return _norms(self.master_params, grad_scale)

    def master_params_to_state_dict(self, master_params: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The model's state_dict with its parameters taken from ``master_params``."""
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Master parameters (of this trainer's layout) from a model state_dict."""
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)


class GradScalerTrainer(MixedPrecisionTrainer):
    """
    ``MixedPrecisionTrainer``'s interface over float32 parameters trained with autocast (and,
    for fp16, a ``torch.amp.GradScaler``): the master params *are* the model params, so
    ``master_params_to_state_dict`` / ``state_dict_to_master_params`` map one tensor per
    parameter whatever ``use_fp16`` says. This is ``TrainLoop.mp_trainer``.

    :param model: the model (its parameters are not converted).
    :param model_params: the parameters trained (default ``model.parameters()``).
    :param scaler: the loss scaler, or None (fp32/bf16).
    :param use_fp16: whether the run is fp16 (reported; the parameters stay float32).
    :param fp16_scale_growth: upstream's meaning (the scaler's growth interval is its inverse).
    :param step_fn: ``step_fn(opt) -> bool`` that performs the step (TrainLoop's: unscale, norm,
                    clip, skip non-finite steps, count them); default: unscale, skip the step
                    when a gradient is not finite, step, update the scaler.
    """

    def __init__(self, *, model: nn.Module, model_params: Optional[Iterable[torch.Tensor]] = None,
                 scaler: Optional[Any] = None, use_fp16: bool = False, fp16_scale_growth: float = 1e-3,
                 step_fn: Optional[Callable[[torch.optim.Optimizer], bool]] = None):
        self.model = model
        self.use_fp16 = bool(use_fp16)
        self.fp16_scale_growth = float(fp16_scale_growth)
        self.model_params = list(model_params) if model_params is not None else list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.scaler = scaler
        self._step_fn = step_fn

    @property
    def lg_loss_scale(self) -> float:
        """log2 of the scaler's current loss scale (0 without a scaler)."""
        if self.scaler is None:
            return 0.0
        return math.log2(max(float(self.scaler.get_scale()), 1e-30))

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the GradScaler when there is one."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimize(self, opt: torch.optim.Optimizer) -> bool:
        """
        Unscale, skip the step when a gradient is not finite, else step ``opt`` (and update the
        scaler).

        :return: whether the step was taken (True when a skip is decided on the device and the
                 host does not know it: see ``TrainLoop.optimize``).
        """
        if self._step_fn is not None:
            return bool(self._step_fn(opt))
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grads = [p.grad for p in self.model_params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if self.scaler is not None:
            self.scaler.step(opt)  # skips by itself when it found an inf/NaN
            self.scaler.update()
        elif finite:
            opt.step()
        return finite

    def master_params_to_state_dict(self, master_params: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return master_params_to_state_dict(self.model, None, master_params, use_fp16=False)

    def state_dict_to_master_params(self, state_dict: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return state_dict_to_master_params(self.model, state_dict, use_fp16=False)
