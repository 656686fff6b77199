"""
The math behind the paper's analyses (Xu et al. 2024, section 3), shared by the scripts
``consistency.py``, ``loss_landscape.py``, ``hessian_spectrum.py`` and ``structure_timesteps.py``.

- PSNR between image batches, per image and pooled over all images (the paper's Eq. 1), and
  their means over every pair of several models (Table 1).
- Sampling several models from the same initial noise *and the same per-step noise*
  (``SharedNoise``, handed to the diffusion's own sampling loops as ``step_noise_fn``), so
  that their samples can be compared; DCGAN generators get the same latent per seed.
- The predicted x_0 along the reverse process (Fig. 9).
- Hessian-vector products by double backward, power iteration with deflation, Lanczos,
  Hutchinson's trace estimator and stochastic Lanczos quadrature (Fig. 3).
- Linear interpolation of parameters and the diffusion loss on a fixed batch, fixed noise
  and fixed timesteps, or a GAN's generator loss on fixed latents (Fig. 4).
- Hessian analysis of the diffusion loss or of a GAN generator's loss.
- Locating a checkpoint's model flags (``--model_flags`` > ``config.yaml`` beside the
  checkpoint > defaults) and building the model from them.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from guided_diffusion.fp16_util import unflatten_like
from guided_diffusion.sample_util import SampleNoise
from guided_diffusion.seeding import mix_seed

PSNR_CAP_DB = 100.0  # what an infinite PSNR (identical images) is reported as, in dB

# ======================================================================================
# PSNR
# ======================================================================================


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """
    Convert model images in [-1, 1] (NCHW) to uint8 NHWC, exactly as upstream's sample scripts
    do (``((x + 1) * 127.5).clamp(0, 255)`` then truncation), so PSNRs match saved samples.

    :param images: a float tensor of shape [N, C, H, W], values nominally in [-1, 1].
    :return: a numpy uint8 array of shape [N, H, W, C].
    """
    x = ((images.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def psnr(
    a: Union[np.ndarray, torch.Tensor],
    b: Union[np.ndarray, torch.Tensor],
    data_range: float = 255.0,
    max_db: Optional[float] = PSNR_CAP_DB,
) -> np.ndarray:
    """
    Per-image peak signal-to-noise ratio, 10·log10(data_range² / MSE), MSE over all of an
    image's pixels and channels.

    :param a: images of shape [N, ...] (uint8 in [0, 255], or floats on the same scale).
    :param b: images of the same shape as ``a``.
    :param data_range: the peak value (255 for uint8 images, 2 for images in [-1, 1]).
    :param max_db: identical images have an infinite PSNR; it is capped at this many dB
        (None keeps ``inf``).
    :return: a float64 array of N PSNRs in dB.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: the two image batches differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 2:
        raise ValueError(f"psnr: expected a batch of images [N, ...], got shape {a.shape}")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(float(data_range) ** 2 / mse)
    if max_db is not None:
        out = np.minimum(out, float(max_db))
    return out


def pooled_psnr(
    a: Union[np.ndarray, torch.Tensor],
    b: Union[np.ndarray, torch.Tensor],
    data_range: float = 255.0,
    max_db: Optional[float] = PSNR_CAP_DB,
) -> float:
    """
    The PSNR of two whole image batches taken as one matrix each (the paper's Eq. 1):
    10·log10(data_range² / MSE), with ONE MSE pooled over every pixel and channel of every
    image. Not the mean of per-image PSNRs: the log of a mean MSE is not the mean of the logs,
    so the two differ whenever the images' errors differ (below the cap, this one is never the
    larger).

    :param a: images of shape [N, ...] (uint8 in [0, 255], or floats on the same scale).
    :param b: images of the same shape as ``a``.
    :param data_range: the peak value (255 for uint8 images, 2 for images in [-1, 1]).
    :param max_db: identical batches have an infinite PSNR; it is capped at this many dB
        (None keeps ``inf``), as in ``psnr``.
    :return: the PSNR in dB.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pooled_psnr: the two image batches differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError(f"pooled_psnr: empty image batches (shape {a.shape})")
    mse = np.float64(((a - b) ** 2).mean())  # numpy scalar: 0 gives inf, not ZeroDivisionError
    with np.errstate(divide="ignore"):
        out = float(10.0 * np.log10(np.float64(data_range) ** 2 / mse))
    return min(out, float(max_db)) if max_db is not None else out


@dataclass
class PairPSNR:
    """The PSNRs of one pair of models' images (per image and pooled, in dB, capped)."""

    i: int  # index of the first model
    j: int  # index of the second model
    per_image: np.ndarray  # [N] dB
    identical: np.ndarray  # [N] bool: the two images were equal pixel for pixel
    pooled: float  # dB: one MSE over all N images (the paper's Eq. 1), see ``pooled_psnr``

    @property
    def mean(self) -> float:
        """The mean of the per-image PSNRs (dB); not the paper's Eq. 1, see ``pooled``."""
        return float(self.per_image.mean())

    @property
    def all_identical(self) -> bool:
        return bool(self.identical.all())


def pairwise_psnr(images: Sequence[np.ndarray], max_db: float = PSNR_CAP_DB) -> List[PairPSNR]:
    """
    PSNR between every pair of models' images, image j of one model against image j of the
    other (the same noise seed): per image, and pooled over all images (Eq. 1).

    :param images: one uint8 array [N, H, W, C] per model, all of the same shape.
    :param max_db: the cap for identical images (dB).
    :return: one ``PairPSNR`` per pair i < j, in order (0,1), (0,2), ..., (1,2), ...
    """
    if len(images) < 2:
        raise ValueError(f"pairwise_psnr: need at least two models' images, got {len(images)}")
    shapes = {tuple(np.shape(x)) for x in images}
    if len(shapes) != 1:
        raise ValueError(f"pairwise_psnr: the models' image batches differ in shape: {sorted(shapes)}")
    out = []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            a, b = np.asarray(images[i]), np.asarray(images[j])
            same = (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)).all(axis=1)
            out.append(PairPSNR(i, j, psnr(a, b, 255.0, max_db), same, pooled_psnr(a, b, 255.0, max_db)))
    return out


# ======================================================================================
# The same initial noise and per-step noise for every model
# ======================================================================================


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


def _batches(seeds: Sequence[int], batch_size: int) -> Iterator[List[int]]:
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    for i in range(0, len(seeds), batch_size):
        yield seeds[i : i + batch_size]


def diffusion_sample_images(
    model: torch.nn.Module,
    diffusion,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    *,
    batch_size: int = 32,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    num_classes: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """
    One sample per seed with ``SharedNoise`` (initial and per-step noise of each image drawn
    from its seed, so the batch split does not matter).

    :param image_shape: (C, H, W).
    :param num_classes: for a class-conditional model: labels come from ``seed_labels``.
    :return: float images [len(seeds), C, H, W] in [-1, 1] on the CPU.
    """
    out = []
    for chunk in _batches(seeds, batch_size):
        kw = {"y": seed_labels(chunk, num_classes).to(device)} if num_classes else {}
        steps = sample_with_shared_noise(model, diffusion, SharedNoise(chunk, image_shape), use_ddim=use_ddim,
                                         eta=eta, clip_denoised=clip_denoised, model_kwargs=kw, device=device,
                                         progress=progress)
        out.append(final_sample(steps).float().cpu())
    return torch.cat(out)


def gan_sample_images(
    generator: torch.nn.Module,
    seeds: Sequence[int],
    *,
    batch_size: int = 32,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """
    One generator image per seed from ``gan.gan_latents`` (the same z for every generator).

    :return: float images [len(seeds), C, H, W] in [-1, 1] on the CPU.
    """
    from experiments.gan import gan_latents

    out = []
    with torch.no_grad():
        for chunk in _batches(seeds, batch_size):
            out.append(generator(gan_latents(chunk, generator.nz).to(device)).float().cpu())
    return torch.cat(out)


def image_grid(rows: Sequence[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """
    Tile images into one picture: row r holds ``rows[r]`` (uint8 [N, H, W, C]) side by side.

    :return: a uint8 array [R·(H+pad)+pad, N·(W+pad)+pad, C].
    """
    rows = [np.asarray(r) for r in rows]
    if not rows or any(r.shape != rows[0].shape for r in rows) or rows[0].ndim != 4:
        raise ValueError(f"image_grid: expected rows of equal shape [N, H, W, C], got {[r.shape for r in rows]}")
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = r[j]
    return grid


@dataclass
class ConsistencyResult:
    """Table 1 for one set of models: every pair's PSNRs and their means over pairs."""

    names: List[str]
    pairs: List[PairPSNR]
    max_db: float

    @property
    def pooled_db(self) -> float:
        """
        The headline (the paper's Eq. 1): the mean over pairs of each pair's pooled PSNR (one
        MSE over all of the pair's images), in dB. With two models, that pair's pooled PSNR.
        """
        return float(np.mean([p.pooled for p in self.pairs]))

    @property
    def mean_db(self) -> float:
        """The mean over pairs of each pair's mean per-image PSNR (dB), reported beside ``pooled_db``."""
        return float(np.mean([p.mean for p in self.pairs]))

    @property
    def identical_pairs(self) -> List[Tuple[str, str]]:
        return [(self.names[p.i], self.names[p.j]) for p in self.pairs if p.all_identical]

    @property
    def any_capped(self) -> bool:
        return any(bool(p.identical.any()) for p in self.pairs)


def has_zero_output_layer(model: torch.nn.Module) -> bool:
    """
    Whether a U-Net's output layer is still all zeros, as upstream initialises it (``zero_module``):
    an untrained model, whose ε-prediction is 0 for every input. Every such model turns the same
    noise into the same samples, so their PSNR is high and says nothing about consistency.
    """
    out = getattr(model, "out", None)
    if not isinstance(out, torch.nn.Module):
        return False
    layers = [m for m in out.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        return False
    return all(not bool(p.detach().any()) for p in layers[-1].parameters())


def consistency(images: Sequence[np.ndarray], names: Sequence[str], max_db: float = PSNR_CAP_DB) -> ConsistencyResult:
    """
    The paper's consistency measure: PSNR between the images that different models make from
    the same noise, for every pair of models, both pooled over all images (Eq. 1, the
    result's ``pooled_db``) and as the mean of per-image PSNRs (``mean_db``).

    :param images: one uint8 array [N, H, W, C] per model, image j from seed j in all of them.
    :param names: one label per model.
    """
    if len(names) != len(images):
        raise ValueError(f"consistency: {len(images)} image batches but {len(names)} names")
    return ConsistencyResult(list(names), pairwise_psnr(images, max_db), float(max_db))


# ======================================================================================
# The predicted x_0 along the reverse process (Fig. 9)
# ======================================================================================


def evenly_spaced_steps(num_steps: int, count: int) -> List[int]:
    """``count`` sampling-step indices spread over 0..num_steps-1, first and last included."""
    if num_steps < 1 or count < 1:
        raise ValueError(f"evenly_spaced_steps: need num_steps >= 1 and count >= 1, got {num_steps}, {count}")
    count = min(count, num_steps)
    if count == 1:
        return [num_steps - 1]
    return sorted({int(round(k * (num_steps - 1) / (count - 1))) for k in range(count)})


def predicted_xstart_trajectory(
    model: torch.nn.Module,
    diffusion,
    noise: SharedNoise,
    keep_steps: Sequence[int],
    *,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: Optional[dict] = None,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[List[Dict[str, Any]], torch.Tensor, np.ndarray]:
    """
    Sample once and measure how close each step's predicted x_0 is to the final sample.

    :param keep_steps: sampling-step indices whose predicted x_0 is kept (for a figure).
    :return: ``(kept, final, psnr_per_step)``: ``kept`` is a list of dicts ``{"step", "t",
        "t_train", "pred_xstart"}`` (CPU tensors) in sampling order; ``final`` the final
        sample [N, C, H, W] (CPU); ``psnr_per_step`` a float64 array [num_steps, N], the PSNR
        in dB (uint8 images, capped) of each step's predicted x_0 against the final sample.
    """
    keep = set(int(k) for k in keep_steps)
    kept, preds, ts = [], [], []
    for out in sample_with_shared_noise(model, diffusion, noise, use_ddim=use_ddim, eta=eta,
                                        clip_denoised=clip_denoised, model_kwargs=model_kwargs, device=device):
        px = out["pred_xstart"].float().cpu()
        preds.append(to_uint8(px))
        ts.append(out["t"])
        if out["step"] in keep:
            kept.append({"step": out["step"], "t": out["t"], "t_train": out["t_train"], "pred_xstart": px})
        final = out["sample"].float().cpu()
    if not preds:
        raise ValueError("predicted_xstart_trajectory: the sampling loop produced no steps")
    final_u8 = to_uint8(final)
    table = np.stack([psnr(p, final_u8) for p in preds])
    return kept, final, table


# ======================================================================================
# Hessian-vector products and spectra
# ======================================================================================

HVP = Callable[[torch.Tensor], torch.Tensor]  # flat vector -> flat vector


@contextlib.contextmanager
def math_attention():
    """
    Route ``scaled_dot_product_attention`` to its plain-math kernel: the fused kernels
    (flash / memory-efficient, CPU or CUDA) have no double backward.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views)."""
    return unflatten_like(vector, like)


class HessianVectorProduct:
    """
    v -> H v for the Hessian H of ``loss_fn()`` with respect to ``params``, by double
    backward. The gradient graph is built once (``create_graph=True``) and reused for every
    product, so each product costs one extra backward pass.
    """

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]):
        """
        :param loss_fn: computes the scalar loss (fixed batch: every call the same function).
        :param params: the tensors to differentiate with respect to (``requires_grad``).
        """
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("HessianVectorProduct: no parameters given")
        for p in self.params:
            if not p.requires_grad:
                raise ValueError("HessianVectorProduct: every parameter must require grad")
        self.loss_fn = loss_fn
        self.dim = sum(p.numel() for p in self.params)
        self.num_products = 0
        self._grads: Optional[Tuple[torch.Tensor, ...]] = None
        self.loss: Optional[float] = None

    def _ensure_grads(self) -> None:
        if self._grads is None:
            loss = self.loss_fn()
            if loss.ndim != 0:
                raise ValueError(f"HessianVectorProduct: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            self.loss = float(loss.detach())
            self._grads = torch.autograd.grad(loss, self.params, create_graph=True)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the loss (detached)."""
        self._ensure_grads()
        return flatten([g.detach() for g in self._grads])

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self._ensure_grads()
        vs = unflatten(v.to(self.params[0].dtype), self.params)
        hv = torch.autograd.grad(self._grads, self.params, grad_outputs=vs, retain_graph=True, allow_unused=True)
        self.num_products += 1
        return flatten([torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)])

    def release(self) -> None:
        """Free the gradient graph."""
        self._grads = None


def _random_vector(dim: int, generator: torch.Generator, dtype, device, kind: str = "gaussian") -> torch.Tensor:
    if kind == "gaussian":
        v = torch.randn(dim, generator=generator, dtype=dtype)
    elif kind == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=generator).to(dtype) * 2 - 1
    else:
        raise ValueError(f"random vector kind: expected 'gaussian' or 'rademacher', got {kind!r}")
    return v.to(device)


@dataclass
class PowerIterationResult:
    eigenvalues: List[float]  # largest in magnitude first
    eigenvectors: List[torch.Tensor]
    iterations: List[int]  # products used for each eigenvalue
    converged: List[bool]


def power_iteration(
    hvp: HVP,
    dim: int,
    top_k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-4,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> PowerIterationResult:
    """
    The ``top_k`` eigenvalues of largest magnitude by power iteration with deflation
    (each found eigenpair is projected out: H' = H - Σ λ_j u_j u_jᵀ), as PyHessian does.

    :param hvp: v -> H v on flat vectors of length ``dim``.
    :param top_k: how many eigenvalues.
    :param max_iters: Hessian-vector products per eigenvalue at most.
    :param tol: stop when the Rayleigh quotient changes by less than tol·|λ|.
    :param generator: for the random start vectors.
    :return: a ``PowerIterationResult``.
    """
    if top_k < 1 or top_k > dim:
        raise ValueError(f"power_iteration: top_k must be in [1, {dim}], got {top_k}")
    if max_iters < 1:
        raise ValueError(f"power_iteration: max_iters must be >= 1, got {max_iters}")
    generator = generator or torch.Generator().manual_seed(0)
    vals: List[float] = []
    vecs: List[torch.Tensor] = []
    iters: List[int] = []
    conv: List[bool] = []
    for _ in range(top_k):
        v = _random_vector(dim, generator, dtype, device)
        v = v / v.norm()
        lam, done, n = None, False, 0
        for n in range(1, max_iters + 1):
            w = hvp(v)
            for lj, uj in zip(vals, vecs):
                w = w - lj * torch.dot(uj, v) * uj
            new = float(torch.dot(v, w))
            norm = w.norm()
            if norm == 0:  # v is in the null space of the deflated operator
                lam, done = 0.0, True
                break
            v = w / norm
            if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
                lam, done = new, True
                break
            lam = new
        vals.append(float(lam))
        vecs.append(v)
        iters.append(n)
        conv.append(done)
    return PowerIterationResult(vals, vecs, iters, conv)


@dataclass
class LanczosResult:
    alphas: np.ndarray  # diagonal of the tridiagonal matrix T (m,)
    betas: np.ndarray  # off-diagonal (m-1,)

    def ritz(self) -> Tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) of T and the first components of its eigenvectors."""
        from scipy.linalg import eigh_tridiagonal

        if len(self.alphas) == 1:
            return self.alphas.copy(), np.ones(1)
        w, q = eigh_tridiagonal(self.alphas, self.betas)
        return w, q[0, :]


def lanczos(
    hvp: HVP,
    dim: int,
    num_steps: int,
    v0: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    reorthogonalize: bool = True,
    basis_device: Optional[Union[str, torch.device]] = None,
) -> LanczosResult:
    """
    ``num_steps`` steps of the Lanczos iteration on the symmetric operator ``hvp``, with full
    re-orthogonalisation (keeps the Ritz values free of spurious copies). Stops early when
    the Krylov space becomes invariant (β ≈ 0).

    :param hvp: v -> H v on flat vectors of length ``dim``.
    :param num_steps: Krylov dimension m (≤ dim).
    :param v0: start vector (random Gaussian when None).
    :param reorthogonalize: keep all basis vectors and orthogonalise against them (memory:
        m vectors of ``dim`` entries on ``basis_device``).
    :param basis_device: where the basis is kept (default: ``device``; "cpu" for big models).
    :return: a ``LanczosResult`` with the tridiagonal matrix.
    """
    if num_steps < 1:
        raise ValueError(f"lanczos: num_steps must be >= 1, got {num_steps}")
    num_steps = min(num_steps, dim)
    generator = generator or torch.Generator().manual_seed(0)
    basis_device = torch.device(basis_device) if basis_device is not None else torch.device(device)
    v = _random_vector(dim, generator, dtype, device) if v0 is None else v0.to(device=device, dtype=dtype).clone()
    v = v / v.norm()
    basis: List[torch.Tensor] = [v.to(basis_device)] if reorthogonalize else []
    alphas: List[float] = []
    betas: List[float] = []
    v_prev, beta = None, 0.0
    for j in range(num_steps):
        w = hvp(v)
        alpha = float(torch.dot(w, v))
        alphas.append(alpha)
        w = w - alpha * v
        if v_prev is not None:
            w = w - beta * v_prev
        if reorthogonalize:
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                for u in basis:
                    u = u.to(device)
                    w = w - torch.dot(u, w) * u
        if j == num_steps - 1:
            break
        beta = float(w.norm())
        if beta <= 1e-10 * max(1.0, max(abs(a) for a in alphas)):
            break  # invariant subspace: T is exact
        betas.append(beta)
        v_prev, v = v, w / beta
        if reorthogonalize:
            basis.append(v.to(basis_device))
    return LanczosResult(np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64))


def lanczos_top_eigenvalues(
    hvp: HVP, dim: int, top_k: int, num_steps: int, **kwargs
) -> np.ndarray:
    """
    The ``top_k`` algebraically largest Ritz values after ``num_steps`` Lanczos steps
    (the extreme eigenvalues converge first), largest first.
    """
    res = lanczos(hvp, dim, num_steps, **kwargs)
    w, _ = res.ritz()
    return w[::-1][:top_k].copy()


@dataclass
class TraceEstimate:
    estimate: float  # mean of the vᵀHv samples
    stderr: float  # standard error of that mean
    samples: np.ndarray


def hutchinson_trace(
    hvp: HVP,
    dim: int,
    num_samples: int = 100,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    distribution: str = "rademacher",
) -> TraceEstimate:
    """
    Hutchinson's estimator tr(H) ≈ (1/m) Σ vᵢᵀ H vᵢ with Rademacher (or Gaussian) vᵢ.

    :param num_samples: m, the number of Hessian-vector products.
    :return: a ``TraceEstimate`` (estimate, standard error, the samples).
    """
    if num_samples < 1:
        raise ValueError(f"hutchinson_trace: num_samples must be >= 1, got {num_samples}")
    generator = generator or torch.Generator().manual_seed(0)
    vals = []
    for _ in range(num_samples):
        v = _random_vector(dim, generator, dtype, device, distribution)
        vals.append(float(torch.dot(v, hvp(v))))
    vals = np.asarray(vals, dtype=np.float64)
    se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return TraceEstimate(float(vals.mean()), se, vals)


@dataclass
class SpectralDensity:
    nodes: List[np.ndarray]  # Ritz values per probe
    weights: List[np.ndarray]  # their quadrature weights per probe (sum to 1)

    def all_nodes(self) -> Tuple[np.ndarray, np.ndarray]:
        """Every probe's nodes and weights, weights divided by the number of probes."""
        n = np.concatenate(self.nodes)
        w = np.concatenate(self.weights) / len(self.nodes)
        return n, w

    def density(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """
        The spectral density smoothed by a Gaussian of width ``sigma``, on ``grid``
        (integrates to 1 when the grid covers the nodes).
        """
        if sigma <= 0:
            raise ValueError(f"density: sigma must be > 0, got {sigma}")
        n, w = self.all_nodes()
        d = (grid[:, None] - n[None, :]) / sigma
        return (w[None, :] * np.exp(-0.5 * d**2)).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))

    def default_grid(self, num_points: int = 1000, sigma_frac: float = 0.01) -> Tuple[np.ndarray, float]:
        """A grid covering the nodes with 5σ margins, and σ = sigma_frac × node range."""
        n, _ = self.all_nodes()
        lo, hi = float(n.min()), float(n.max())
        span = max(hi - lo, 1e-12 * max(1.0, abs(hi)), 1e-30)
        sigma = sigma_frac * span
        return np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points), sigma


def stochastic_lanczos_quadrature(
    hvp: HVP,
    dim: int,
    num_probes: int = 3,
    num_steps: int = 60,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    basis_device: Optional[Union[str, torch.device]] = None,
) -> SpectralDensity:
    """
    Spectral density of H by stochastic Lanczos quadrature (Ghorbani et al. 2019): for each
    Rademacher probe, run Lanczos; the Ritz values λ_k are quadrature nodes with weights
    τ_k = (first component of the k-th eigenvector of T)², so that
    vᵀ f(H) v / |v|² ≈ Σ_k τ_k f(λ_k). The density is the probes' average.

    :param num_probes: number of random start vectors.
    :param num_steps: Lanczos steps per probe.
    :return: a ``SpectralDensity``.
    """
    if num_probes < 1:
        raise ValueError(f"stochastic_lanczos_quadrature: num_probes must be >= 1, got {num_probes}")
    generator = generator or torch.Generator().manual_seed(0)
    nodes, weights = [], []
    for _ in range(num_probes):
        v0 = _random_vector(dim, generator, dtype, device, "rademacher")
        res = lanczos(hvp, dim, num_steps, v0=v0, dtype=dtype, device=device, basis_device=basis_device)
        w, q0 = res.ritz()
        nodes.append(w)
        weights.append(q0**2)
    return SpectralDensity(nodes, weights)


# ======================================================================================
# Parameter interpolation and the loss on a fixed batch
# ======================================================================================


def interpolate_state_dicts(
    sd_a: Dict[str, torch.Tensor],
    sd_b: Dict[str, torch.Tensor],
    alpha: float,
    int_buffers: str = "error",
) -> Dict[str, torch.Tensor]:
    """
    θ(α) = (1 - α)·θ_a + α·θ_b, key by key (α outside [0, 1] extrapolates). Float buffers
    (e.g. BatchNorm running statistics) are interpolated like parameters; non-float buffers
    are taken from ``sd_a``.

    :param int_buffers: what to do when a non-float buffer differs between the two: "error"
        (raise) or "a" (take A's; e.g. BatchNorm's ``num_batches_tracked``, a step counter that
        differs between two steps of one run and plays no part in eval mode).
    :raises ValueError: naming the keys that only one of them has, or whose shapes differ, or
        a differing non-float buffer with ``int_buffers="error"``.
    """
    if int_buffers not in ("error", "a"):
        raise ValueError(f"interpolate_state_dicts: int_buffers must be 'error' or 'a', got {int_buffers!r}")
    only_a = sorted(set(sd_a) - set(sd_b))
    only_b = sorted(set(sd_b) - set(sd_a))
    if only_a or only_b:
        raise ValueError(
            "the two checkpoints have different parameters: "
            f"only in A: {only_a[:10]}{' ...' if len(only_a) > 10 else ''}; "
            f"only in B: {only_b[:10]}{' ...' if len(only_b) > 10 else ''}"
        )
    out = {}
    for k, a in sd_a.items():
        b = sd_b[k]
        if a.shape != b.shape:
            raise ValueError(f"the two checkpoints differ in the shape of {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}")
        if torch.is_floating_point(a):
            out[k] = ((1.0 - alpha) * a.double() + alpha * b.to(a.device).double()).to(a.dtype)
        else:
            if int_buffers == "error" and not torch.equal(a, b.to(a.device)):
                raise ValueError(f"the two checkpoints differ in the non-float buffer {k!r}; cannot interpolate it")
            out[k] = a.clone()
    return out


@dataclass
class FixedBatch:
    """A batch, its noise and its timesteps, fixed so a loss can be compared across models."""

    x_start: torch.Tensor  # [N, C, H, W] in [-1, 1]
    t: torch.Tensor  # [N] long, timesteps of the (unspaced) training diffusion
    noise: torch.Tensor  # [N, C, H, W]
    model_kwargs: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device) -> "FixedBatch":
        return FixedBatch(
            self.x_start.to(device), self.t.to(device), self.noise.to(device),
            {k: v.to(device) for k, v in self.model_kwargs.items()},
        )


def stratified_timesteps(batch_size: int, num_timesteps: int) -> torch.Tensor:
    """
    Timesteps spread evenly over [0, T): t_i = ⌊(i + ½)·T / N⌋, so that every part of the
    schedule weighs in a small fixed batch.
    """
    if batch_size < 1 or num_timesteps < 1:
        raise ValueError(f"stratified_timesteps: need batch_size >= 1 and num_timesteps >= 1, got {batch_size}, {num_timesteps}")
    i = torch.arange(batch_size, dtype=torch.float64)
    return torch.floor((i + 0.5) * num_timesteps / batch_size).long().clamp_(0, num_timesteps - 1)


def make_fixed_batch(
    images: torch.Tensor,
    num_timesteps: int,
    seed: int = 0,
    labels: Optional[torch.Tensor] = None,
    timesteps: str = "stratified",
) -> FixedBatch:
    """
    Fix the noise (seeded Gaussian) and timesteps for a batch of images.

    :param images: [N, C, H, W] in [-1, 1].
    :param num_timesteps: T of the training diffusion.
    :param seed: seeds the noise (and the timesteps when ``timesteps="random"``).
    :param labels: class labels for a class-conditional model, else None.
    :param timesteps: "stratified" (evenly spread, see ``stratified_timesteps``) or "random"
        (uniform, seeded).
    """
    n = images.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(tuple(images.shape), generator=g)
    if timesteps == "stratified":
        t = stratified_timesteps(n, num_timesteps)
    elif timesteps == "random":
        t = torch.randint(0, num_timesteps, (n,), generator=g)
    else:
        raise ValueError(f"--timesteps: expected 'stratified' or 'random', got {timesteps!r}")
    kw = {"y": labels.long().cpu()} if labels is not None else {}
    return FixedBatch(images.float().cpu(), t, noise, kw)


def diffusion_loss(model: torch.nn.Module, diffusion, batch: FixedBatch, terms: bool = False):
    """
    The diffusion training loss of ``model`` on a fixed batch (fixed noise and timesteps):
    the mean over the batch of ``diffusion.training_losses(...)["loss"]``.

    :param terms: also return the mean of every term (``loss``, ``mse``, ``vb``) as floats.
    :return: the scalar loss tensor (differentiable), or ``(loss, {term: float})``.
    """
    out = diffusion.training_losses(model, batch.x_start, batch.t, model_kwargs=batch.model_kwargs, noise=batch.noise)
    loss = out["loss"].mean()
    if not terms:
        return loss
    return loss, {k: float(v.detach().float().mean()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 1}


# ======================================================================================
# Checkpoints: flags and models (the library's loaders; re-exported for the scripts)
# ======================================================================================

from guided_diffusion.checkpoint import (  # noqa: E402,F401
    ANALYSIS_OVERRIDES,
    load_diffusion_model,
    load_into,
    load_state_dict_file,
    parse_model_flags,
    resolve_model_flags,
)


def pick_device(name: str = "auto") -> torch.device:
    """``--device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def default_out_dir(kind: str) -> Path:
    """``runs/<kind>-<timestamp>`` under the working directory (never /tmp)."""
    from guided_diffusion.logger import default_log_dir

    return Path(default_log_dir(kind))


def config_data_dir(checkpoint: Union[str, Path]) -> str:
    """The ``data_dir`` of the run's ``config.yaml`` beside ``checkpoint`` ("" when there is none)."""
    from guided_diffusion.script_util import load_config

    cfg = Path(checkpoint).resolve().parent / "config.yaml"
    return str(load_config(cfg).get("data_dir", "") or "") if cfg.is_file() else ""


# ======================================================================================
# Loss along a line between two checkpoints (Fig. 4)
# ======================================================================================


def parse_alphas(text: str) -> np.ndarray:
    """
    ``--alphas``: "START:STOP:COUNT" (evenly spaced, both ends included) or a comma list.

    :raises ValueError: naming the flag and the expected forms.
    """
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            if int(count) < 1:
                raise ValueError
            out = np.linspace(float(start), float(stop), int(count))
        else:
            out = np.asarray([float(x) for x in text.split(",") if x.strip()], dtype=np.float64)
    except ValueError:
        out = np.empty(0)
    if out.size == 0 or not np.all(np.isfinite(out)):
        raise ValueError(f"--alphas: expected START:STOP:COUNT (e.g. -0.5:1.5:41) or a comma list, got {text!r}")
    return out


def loss_along_line(
    model: torch.nn.Module,
    diffusion,
    sd_a: Dict[str, torch.Tensor],
    sd_b: Dict[str, torch.Tensor],
    alphas: Sequence[float],
    batch: FixedBatch,
    device: Union[str, torch.device] = "cpu",
) -> List[Dict[str, float]]:
    """
    The diffusion loss of θ(α) = (1-α)·θ_a + α·θ_b on one fixed batch (fixed noise and
    timesteps), for each α. ``model`` is overwritten with each θ(α) in turn and left in eval
    mode (dropout off, so the loss is a function of θ alone).

    :return: one dict per α: ``{"alpha", "loss", "mse", "vb", ...}`` (the mean of every
        per-sample term that ``training_losses`` returns).
    """
    device = torch.device(device)
    batch = batch.to(device)
    model.to(device).eval()
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, float(alpha)), strict=True)
        with torch.no_grad():
            _, terms = diffusion_loss(model, diffusion, batch, terms=True)
        rows.append({"alpha": float(alpha), **terms})
    return rows


GAN_LANDSCAPE_LOSS = "non-saturating generator loss -log sigmoid(D(alpha)(G(alpha)(z))) on fixed latents z"


def gan_loss_along_line(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    gen_a: Dict[str, torch.Tensor],
    gen_b: Dict[str, torch.Tensor],
    disc_a: Dict[str, torch.Tensor],
    disc_b: Dict[str, torch.Tensor],
    alphas: Sequence[float],
    z: torch.Tensor,
    device: Union[str, torch.device] = "cpu",
) -> List[Dict[str, float]]:
    """
    The GAN side of Fig. 4: θ(α) = (1-α)·θ_a + α·θ_b where θ is the generator's AND the
    discriminator's parameters and BatchNorm running statistics, and the loss is the
    non-saturating generator loss -log σ(D(α)(G(α)(z))) (``gan_generator_loss``) on the fixed
    latents ``z``. Both networks are overwritten with each θ(α) in turn and left in eval mode
    (BatchNorm uses its interpolated running statistics, so the loss is a function of θ alone).
    Integer buffers (``num_batches_tracked``) are A's: they differ between two steps of a run
    and do nothing in eval mode.

    :param gen_a: the generator state_dict at α = 0; ``gen_b`` at α = 1.
    :param disc_a: the discriminator state_dict saved with ``gen_a``; ``disc_b`` with ``gen_b``.
    :param z: latents [N, nz, 1, 1], the same for every α.
    :return: one dict ``{"alpha", "loss"}`` per α.
    """
    device = torch.device(device)
    z = z.to(device)
    generator.to(device).eval()
    discriminator.to(device).eval()
    rows = []
    for alpha in alphas:
        generator.load_state_dict(interpolate_state_dicts(gen_a, gen_b, float(alpha), int_buffers="a"), strict=True)
        discriminator.load_state_dict(interpolate_state_dicts(disc_a, disc_b, float(alpha), int_buffers="a"),
                                      strict=True)
        with torch.no_grad():
            loss = gan_generator_loss(generator, discriminator, z)
        rows.append({"alpha": float(alpha), "loss": float(loss)})
    return rows


# ======================================================================================
# Hessian analysis of a loss (Fig. 3)
# ======================================================================================


def gan_generator_loss(generator: torch.nn.Module, discriminator: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """
    The (non-saturating) DCGAN generator loss on fixed latents: mean BCE(D(G(z)), real),
    i.e. -log σ(D(G(z))). Put both networks in eval mode so BatchNorm uses its running
    statistics and the loss is a function of the generator's parameters alone.
    """
    logits = discriminator(generator(z))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def hessian_analysis(
    hvp: HessianVectorProduct,
    *,
    top_k: int = 5,
    power_iters: int = 100,
    power_tol: float = 1e-3,
    lanczos_steps: int = 50,
    trace_samples: int = 50,
    slq_probes: int = 3,
    slq_steps: int = 50,
    seed: int = 0,
    basis_device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Any]:
    """
    Everything Fig. 3 shows for one loss: the top-k eigenvalues by power iteration (largest
    magnitude, with deflation) and by Lanczos (algebraically largest Ritz values), the trace
    by Hutchinson, and the spectral density by stochastic Lanczos quadrature. A method with
    0 iterations/samples/probes is skipped.

    :param hvp: a ``HessianVectorProduct`` of the loss.
    :param seed: seeds every random vector.
    :return: dict with ``loss``, ``dim``, ``power`` (PowerIterationResult or None),
        ``lanczos`` (array or None), ``trace`` (TraceEstimate or None), ``density``
        (SpectralDensity or None) and ``num_products``.
    """
    p0 = hvp.params[0]
    common = dict(dtype=p0.dtype, device=p0.device)
    out: Dict[str, Any] = {"dim": hvp.dim, "power": None, "lanczos": None, "trace": None, "density": None}
    with math_attention():
        hvp.gradient()  # builds the graph once; records the loss
        out["loss"] = hvp.loss
        if power_iters > 0 and top_k > 0:
            out["power"] = power_iteration(hvp, hvp.dim, min(top_k, hvp.dim), max_iters=power_iters, tol=power_tol,
                                           generator=torch.Generator().manual_seed(seed), **common)
        if lanczos_steps > 0 and top_k > 0:
            out["lanczos"] = lanczos_top_eigenvalues(hvp, hvp.dim, top_k, lanczos_steps,
                                                     generator=torch.Generator().manual_seed(seed + 1),
                                                     basis_device=basis_device, **common)
        if trace_samples > 0:
            out["trace"] = hutchinson_trace(hvp, hvp.dim, trace_samples,
                                            generator=torch.Generator().manual_seed(seed + 2), **common)
        if slq_probes > 0 and slq_steps > 0:
            out["density"] = stochastic_lanczos_quadrature(hvp, hvp.dim, slq_probes, slq_steps,
                                                           generator=torch.Generator().manual_seed(seed + 3),
                                                           basis_device=basis_device, **common)
    out["num_products"] = hvp.num_products
    hvp.release()
    return out


# ======================================================================================
# GAN checkpoints
# ======================================================================================


def checkpoint_kind(checkpoint: Union[str, Path], kind: str = "auto") -> str:
    """
    ``--kind``: "diffusion" or "gan" as given; "auto": "gan" when the DCGAN training script's
    ``gan_config.yaml`` sits beside the checkpoint, else "diffusion".
    """
    from experiments.gan import find_gan_config

    if kind not in ("auto", "diffusion", "gan"):
        raise ValueError(f"--kind: expected auto, diffusion or gan, got {kind!r}")
    if kind != "auto":
        return kind
    return "gan" if find_gan_config(checkpoint) is not None else "diffusion"


def load_gan_model(
    checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu", discriminator: bool = False
):
    """
    Load a DCGAN generator checkpoint (and, with ``discriminator``, the discriminator saved at
    the same step beside it), in eval mode.

    :return: ``(generator, flags)`` or ``(generator, discriminator, flags)``.
    """
    from experiments.gan import GAN_CONFIG_NAME, create_gan, discriminator_path_for, load_gan_flags

    flags = load_gan_flags(checkpoint)
    g, d = create_gan(**flags)
    source = f"{Path(checkpoint).resolve().parent / GAN_CONFIG_NAME}"
    load_into(g, load_state_dict_file(checkpoint), checkpoint, source)
    g.to(device).eval()
    if not discriminator:
        return g, flags
    d_path = discriminator_path_for(checkpoint)
    load_into(d, load_state_dict_file(d_path), d_path, source)
    d.to(device).eval()
    return g, d, flags


# ======================================================================================
# Script plumbing shared by the analysis scripts
# ======================================================================================


def load_fixed_batch(
    data_dir: str,
    batch_size: int,
    image_size: int,
    num_timesteps: int,
    *,
    class_cond: bool = False,
    seed: int = 0,
    timesteps: str = "stratified",
) -> FixedBatch:
    """
    The first ``batch_size`` images of ``data_dir`` (deterministic order, no flips) with
    seeded noise and fixed timesteps (``make_fixed_batch``).

    :param data_dir: anything ``image_datasets.load_data`` reads ("synthetic" included).
    """
    from guided_diffusion.image_datasets import load_data

    if not data_dir:
        raise ValueError("--data_dir is required (not in the checkpoint's config.yaml): an image folder, "
                         "a packed .npz, a zip, or 'synthetic'")
    data = load_data(data_dir=data_dir, batch_size=batch_size, image_size=image_size, class_cond=class_cond,
                     deterministic=True, random_flip=False, seed=seed, rank=0, world_size=1)
    images, cond = next(iter(data))
    return make_fixed_batch(images, num_timesteps, seed=seed, labels=cond.get("y"), timesteps=timesteps)


def write_csv(path: Union[str, Path], rows: Sequence[Dict[str, Any]]) -> None:
    """Write dict rows (the first row's keys are the header) as CSV, floats with repr precision."""
    import csv

    if not rows:
        raise ValueError(f"write_csv {path}: no rows")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})


def save_grid_png(
    rows: Sequence[np.ndarray],
    path: Union[str, Path],
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    title: str = "",
    cell_inches: float = 0.9,
) -> None:
    """
    Save ``image_grid(rows)`` as a PNG with row/column labels (matplotlib, Agg backend).

    :param rows: uint8 arrays [N, H, W, C], one per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(rows)
    n_rows, (n, h, w, c) = len(rows), np.shape(rows[0])
    fig_w = max(4.0, cell_inches * n + 2.0)
    fig_h = max(2.0, cell_inches * n_rows + 0.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_yticks([2 + i * (h + 2) + h / 2 for i in range(n_rows)])
    ax.set_yticklabels(list(row_labels) if row_labels else [str(i) for i in range(n_rows)], fontsize=8)
    ax.set_xticks([2 + j * (w + 2) + w / 2 for j in range(n)])
    ax.set_xticklabels(list(col_labels) if col_labels else [str(j) for j in range(n)], fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ======================================================================================
# Which checkpoint(s): --model_path FILE, or --run_dir DIR with --step / --ema_rate / --use_ema
# ======================================================================================

CHECKPOINT_COUNTS = ("one", "two", "many")


def add_checkpoint_args(parser: argparse.ArgumentParser, count: str = "one",
                        model_path_aliases: Sequence[str] = (), model_path_help: str = "") -> argparse.ArgumentParser:
    """
    The checkpoint flags of the analysis scripts, spelled as the sample scripts spell them:
    ``--model_path`` (a checkpoint file), or ``--run_dir`` (a training run folder) with ``--step``
    (default: the newest), ``--ema_rate`` (default: the run's first rate) and ``--use_ema``
    (default True; False: the raw ``modelNNNNNN.pt``). A DCGAN run folder (``gan_config.yaml``)
    gives ``generator_NNNNNN.pt``. ``resolve_checkpoint_args`` turns them into files.

    :param count: "one" (``--model_path FILE``, ``--run_dir DIR``, ``--step N``), "two" or
        "many" (``--model_path A B ...``, ``--run_dir D1 [D2 ...]``, ``--step N`` or ``--step A,B,...``).
    :param model_path_aliases: older spellings of ``--model_path`` (``--ckpt``, ``--models``).
    :param model_path_help: what ``--model_path`` takes, for ``--help`` (default: any checkpoint file).
    """
    from guided_diffusion.script_util import str2bool

    one = count == "one"
    if count not in CHECKPOINT_COUNTS:
        raise ValueError(f"add_checkpoint_args: count must be one of {CHECKPOINT_COUNTS}, got {count!r}")
    alias = f" ({', '.join(model_path_aliases)}: the same flag)" if model_path_aliases else ""
    files = "modelNNNNNN.pt, ema_R_NNNNNN.pt or a DCGAN generator_NNNNNN.pt"
    default_help = {"one": f"a checkpoint file: {files}", "two": f"checkpoints A and B (alpha = 0 and 1): {files}",
                    "many": f"checkpoint files: {files}"}[count]
    parser.add_argument("--model_path", *model_path_aliases, dest="model_path", nargs=None if one else "+",
                        default=None, metavar="FILE", help=(model_path_help or default_help) + alias)
    parser.add_argument("--run_dir", nargs=None if one else "+", default=None, metavar="DIR",
                        help="instead of --model_path: " + ("a training run folder, its checkpoint" if one else
                                                            "training run folder(s), the checkpoints")
                        + " picked by --step, --ema_rate and --use_ema")
    parser.add_argument("--step", type=str, default="",
                        help="with --run_dir: the training step (default: the newest)" + (
                            "" if one else "; a comma list (A,B) takes several steps of one run, or one step "
                                           "per --run_dir"))
    parser.add_argument("--ema_rate", type=str, default="",
                        help="with --run_dir: the EMA rate (default: the run's first)")
    parser.add_argument("--use_ema", type=str2bool, default=True,
                        help="with --run_dir: True: the EMA file ema_R_NNNNNN.pt, False: the raw modelNNNNNN.pt")
    return parser


def parse_step_list(text: Union[str, int, None]) -> List[int]:
    """``--step``: "" (the newest), "N" or "A,B,..." -> the steps ([] for the newest)."""
    text = "" if text is None else str(text).strip()
    if not text:
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--step: expected a training step or comma-separated steps, got {text!r}") from None


def resolve_checkpoint(model_path: str = "", run_dir: str = "", step: int = -1, ema_rate: str = "",
                       use_ema: bool = True) -> str:
    """
    ``sample_util.resolve_checkpoint`` (the sample scripts' rule, and its messages), plus DCGAN
    runs: a ``--run_dir`` with a ``gan_config.yaml`` gives ``generator_{step:06d}.pt`` (the
    newest without ``--step``); GANs have no EMA, so ``--use_ema`` is moot and ``--ema_rate`` an error.
    """
    import os
    import re

    from experiments.gan import GAN_CONFIG_NAME
    from guided_diffusion.sample_util import step_list
    from guided_diffusion.sample_util import resolve_checkpoint as resolve_sample_checkpoint

    if model_path or not run_dir or not (Path(run_dir) / GAN_CONFIG_NAME).is_file():
        return resolve_sample_checkpoint(model_path, run_dir, step, ema_rate, use_ema)
    if ema_rate:
        raise ValueError(f"--ema_rate {ema_rate}: --run_dir {run_dir} is a DCGAN run ({GAN_CONFIG_NAME}); it "
                         "saves no EMA weights, drop --ema_rate")
    steps = sorted(int(m.group(1)) for m in (re.match(r"^generator_(\d+)\.pt$", n) for n in os.listdir(run_dir))
                   if m)
    if int(step) < 0:
        if not steps:
            raise FileNotFoundError(f"--run_dir {run_dir}: no generator_NNNNNN.pt checkpoint in it")
        step = steps[-1]
    path = os.path.join(run_dir, f"generator_{int(step):06d}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--run_dir {run_dir} --step {int(step)}: {os.path.basename(path)} not found; "
                                f"steps with a generator file: {step_list(steps, int(step))}")
    return path


def resolve_checkpoint_args(args: argparse.Namespace, count: str = "one") -> List[str]:
    """
    The checkpoint files of ``add_checkpoint_args``'s flags, each as ``resolve_checkpoint`` finds it.

    ``--model_path`` gives the files themselves. ``--run_dir D`` with ``--step A,B`` gives two steps
    of one run; ``--run_dir D1 D2`` with ``--step N`` (or none: each run's newest) the same step of
    each run; ``--run_dir D1 D2 --step A,B`` step A of D1 and B of D2.

    :param count: as given to ``add_checkpoint_args``; "one" and "two" check the number of files.
    :return: the files, in the order given.
    :raises ValueError / FileNotFoundError: naming the flag (and the steps / rates a run has).
    """
    def as_list(v: Any) -> List[str]:
        return [] if v in (None, "") else ([v] if isinstance(v, str) else [str(x) for x in v])

    paths, run_dirs = as_list(args.model_path), as_list(args.run_dir)
    steps = parse_step_list(getattr(args, "step", ""))
    ema_rate, use_ema = getattr(args, "ema_rate", "") or "", getattr(args, "use_ema", True)
    if paths and run_dirs:
        raise ValueError("give either --model_path or --run_dir, not both")
    if paths:
        out = [resolve_checkpoint(p) for p in paths]
    elif not run_dirs:
        out = [resolve_checkpoint()]  # raises: --model_path or --run_dir is required
    else:
        if count == "one" and len(steps) > 1:
            raise ValueError(f"--step: one step, got {args.step!r}")
        if len(run_dirs) == 1:
            pairs = [(run_dirs[0], s) for s in steps] or [(run_dirs[0], -1)]
        elif len(steps) <= 1:
            pairs = [(d, steps[0] if steps else -1) for d in run_dirs]
        elif len(steps) == len(run_dirs):
            pairs = list(zip(run_dirs, steps))
        else:
            raise ValueError(f"--step {args.step}: {len(steps)} steps for {len(run_dirs)} --run_dir folders; give "
                             "one step for all of them, or one per folder")
        out = [resolve_checkpoint("", d, s, ema_rate, use_ema) for d, s in pairs]
    wanted = {"one": 1, "two": 2}.get(count)
    if wanted is not None and len(out) != wanted:
        how = "--model_path A B, or --run_dir DIR --step A,B" if wanted == 2 else "--model_path FILE, or --run_dir DIR"
        raise ValueError(f"expected {wanted} checkpoint{'s' if wanted > 1 else ''} ({how}), got {len(out)}: "
                         f"{', '.join(out)}")
    return out
