"""
The Hessian of a loss (Fig. 3): Hessian-vector products by double backward, power iteration with
deflation, Lanczos, Hutchinson's trace estimator and stochastic Lanczos quadrature, and
``hessian_analysis``, which runs them all on one loss (the diffusion loss on a fixed batch, or a
GAN generator's loss: ``experiments.objectives``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from guided_diffusion.fp16_util import unflatten_like

__all__ = [
    "HVP", "math_attention", "flatten", "unflatten", "HessianVectorProduct", "PowerIterationResult",
    "power_iteration", "LanczosResult", "lanczos", "lanczos_top_eigenvalues", "TraceEstimate", "hutchinson_trace",
    "SpectralDensity", "stochastic_lanczos_quadrature", "hessian_analysis",
]


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
