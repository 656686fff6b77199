"""
The noise-level methods of issue 32: the log-SNR density samplers (laplace, edm_lognormal,
logit_normal), the EDM and flow-matching weightings, and CLTS's floor and release.

The densities are checked against independent computations: a numerical integration of each pdf
between the chain's level boundaries, and Monte Carlo draws made the way each paper draws its
noise level (ln sigma for EDM, sigmoid of a normal for SD3, numpy's Laplace), pushed through the
paper's own SNR map. The weightings are checked against each paper's objective computed from
(x_0, eps, eps_hat) directly.
"""
import math

import numpy as np
import pytest
from scipy import integrate

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.log_snr import LaplaceDensity, NormalDensity, discretize_density, level_boundaries, log_snr
from guided_diffusion.method_registry import method_option_defaults
from guided_diffusion.options import validate_training_args
from guided_diffusion.resample import CLTSSampler, create_named_schedule_sampler, loss_weighting
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.run_folder import run_defining_flags


class Chain:
    """The two attributes the samplers read, for a named beta schedule."""

    def __init__(self, schedule: str, T: int):
        self.alphas_cumprod = np.cumprod(1.0 - gd.get_named_beta_schedule(schedule, T))
        self.num_timesteps = T


CHAINS = {"cosine1000": Chain("cosine", 1000), "linear4000": Chain("linear", 4000)}
DENSITY_SAMPLERS = {
    "laplace": (dict(laplace_mu=0.0, laplace_b=0.5), LaplaceDensity(0.0, 0.5)),
    "edm_lognormal": (dict(edm_p_mean=-1.2, edm_p_std=1.2), NormalDensity(2.4, 2.4)),
    "logit_normal": (dict(logit_normal_m=0.0, logit_normal_s=1.0), NormalDensity(0.0, 2.0)),
}


def integrated_masses(density, alphas_cumprod):
    """p(t) by quadrature of the pdf between the level boundaries (the tails to the end steps)."""
    b = level_boundaries(alphas_cumprod)
    out = np.empty(len(b) - 1)
    for t in range(len(out)):
        hi, lo = b[t], b[t + 1]
        out[t] = integrate.quad(density.pdf, lo, hi, epsabs=1e-13, limit=200)[0]
    return out


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("name", sorted(DENSITY_SAMPLERS))
def test_density_sampler_matches_numerical_integration(name, chain):
    options, density = DENSITY_SAMPLERS[name]
    diffusion = CHAINS[chain]
    p = create_named_schedule_sampler(name, diffusion, seed=0, **options).probabilities()
    assert p.shape == (diffusion.num_timesteps,) and abs(p.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(p, integrated_masses(density, diffusion.alphas_cumprod), rtol=0, atol=1e-9)


def _histogram_by_level(lam, alphas_cumprod):
    """Monte Carlo p(t): each drawn lambda goes to the step whose level is nearest (midpoint cuts)."""
    b = level_boundaries(alphas_cumprod)  # decreasing from +inf to -inf
    t = np.searchsorted(-b[1:-1], -lam, side="left")
    return np.bincount(t, minlength=len(alphas_cumprod)) / len(lam)


def _paper_draws(name, n, rng):
    """Each paper's own draw of the noise level, mapped to log-SNR by that paper's definitions."""
    if name == "edm_lognormal":  # EDM: ln sigma ~ N(P_mean, P_std^2), sigma^2 = 1 / SNR
        sigma = np.exp(rng.normal(-1.2, 1.2, n))
        return np.log(1.0 / sigma ** 2)
    if name == "logit_normal":  # SD3: t = sigmoid(z), z_t = (1 - t) x0 + t eps, SNR = ((1 - t) / t)^2
        t = 1.0 / (1.0 + np.exp(-rng.normal(0.0, 1.0, n)))
        return np.log(((1.0 - t) / t) ** 2)
    return rng.laplace(0.0, 0.5, n)  # Hang et al.: log-SNR ~ Laplace(mu, b)


@pytest.mark.parametrize("name", sorted(DENSITY_SAMPLERS))
def test_density_sampler_matches_each_papers_own_draws(name):
    diffusion = CHAINS["cosine1000"]
    options, _ = DENSITY_SAMPLERS[name]
    p = create_named_schedule_sampler(name, diffusion, seed=0, **options).probabilities()
    n = 400_000
    mc = _histogram_by_level(_paper_draws(name, n, np.random.default_rng(1)), diffusion.alphas_cumprod)
    # a binomial standard error per step, 6 of them: a wrong parameter map moves far more mass
    se = np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
    assert np.all(np.abs(mc - p) < 6 * se + 1e-5)
    # and the mass in the high-noise half agrees to a fraction of a percent
    assert abs(mc[500:].sum() - p[500:].sum()) < 0.005


def test_density_follows_the_schedule():
    """The same density gives other p(t) on other chains; on a respaced chain it uses the respaced levels."""
    base = Chain("cosine", 1000)
    p_cos = create_named_schedule_sampler("laplace", base, seed=0).probabilities()
    p_lin = create_named_schedule_sampler("laplace", Chain("linear", 1000), seed=0).probabilities()
    assert np.abs(p_cos - p_lin).sum() > 0.5
    # lambda = 0 is where the density peaks: at abar = 1/2 on either chain
    for d, p in ((base, p_cos), (Chain("linear", 1000), p_lin)):
        assert abs(int(np.argmax(p)) - int(np.argmin(np.abs(log_snr(d.alphas_cumprod))))) <= 1
    spaced = SpacedDiffusion(space_timesteps(1000, "50"), betas=gd.get_named_beta_schedule("cosine", 1000),
                             model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
                             loss_type=gd.LossType.MSE)
    p = create_named_schedule_sampler("laplace", spaced, seed=0).probabilities()
    assert p.shape == (50,)
    np.testing.assert_allclose(p, discretize_density(LaplaceDensity(0.0, 0.5), spaced.alphas_cumprod))


def test_density_sampler_state_resumes_the_same_draws():
    d = CHAINS["cosine1000"]
    a = create_named_schedule_sampler("edm_lognormal", d, seed=5)
    a.sample(7, "cpu")
    state = a.state_dict()
    want = a.sample(64, "cpu")[0]
    b = create_named_schedule_sampler("edm_lognormal", d, seed=99)
    b.load_state_dict(state)
    got, weights = b.sample(64, "cpu")
    assert got.tolist() == want.tolist()
    assert weights.tolist() == [1.0] * 64  # the noise levels to train, not an importance sampler
    with pytest.raises(ValueError, match="edm_lognormal"):
        create_named_schedule_sampler("laplace", d, seed=0).load_state_dict(state)


@pytest.mark.parametrize("flag, value", [("laplace_b", 0.0), ("edm_p_std", -1.0), ("logit_normal_s", 0),
                                         ("laplace_mu", float("nan"))])
def test_density_options_are_checked_naming_the_flag(flag, value):
    sampler = {"laplace_b": "laplace", "laplace_mu": "laplace", "edm_p_std": "edm_lognormal",
               "logit_normal_s": "logit_normal"}[flag]
    with pytest.raises(ValueError, match=f"--{flag}"):
        validate_training_args({"schedule_sampler": sampler, flag: value})


def test_new_options_are_flags_and_run_defining():
    defaults = method_option_defaults()
    for flag, value in (("laplace_mu", 0.0), ("laplace_b", 0.5), ("edm_p_mean", -1.2), ("edm_p_std", 1.2),
                        ("logit_normal_m", 0.0), ("logit_normal_s", 1.0), ("edm_sigma_data", 0.5),
                        ("clts_floor", 0.0), ("clts_release_start", 1.0)):
        assert defaults[flag] == value
    assert "total_steps" not in defaults  # the training flag, handed to the samplers that need it
    assert set(defaults) <= set(run_defining_flags(dict(defaults)))


# ------------------------------------------------------------------ the weightings


def _vp_point(abar, rng, shape=(3, 8, 8)):
    x0, eps, eps_hat = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    return x0, eps, eps_hat, x_t


@pytest.mark.parametrize("t", [10, 300, 500, 800, 950])
def test_edm_weight_is_edms_objective_in_epsilon_units(t):
    """lambda(sigma) ||D - x0||^2 (EDMLoss, sigma_data 0.5) == w_edm(t) ||eps_hat - eps||^2."""
    d = CHAINS["cosine1000"]
    abar = d.alphas_cumprod[t]
    x0, eps, eps_hat, x_t = _vp_point(abar, np.random.default_rng(t))
    sigma, sd = math.sqrt((1 - abar) / abar), 0.5
    x = x_t / math.sqrt(abar)  # EDM's x = x0 + sigma n
    denoised = x - sigma * eps_hat  # D from the epsilon prediction
    edm = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2 * np.sum((denoised - x0) ** 2)
    w = loss_weighting("edm", d, edm_sigma_data=sd)[t]
    assert w * np.sum((eps_hat - eps) ** 2) == pytest.approx(edm, rel=1e-9)


@pytest.mark.parametrize("t", [10, 300, 500, 800, 950])
def test_flow_weight_is_the_velocity_loss_in_epsilon_units(t):
    """Rectified flow z = (1 - s) x0 + s eps, v = eps - x0: ||v_hat - v||^2 == w_flow(t) ||eps_hat - eps||^2."""
    d = CHAINS["cosine1000"]
    abar = d.alphas_cumprod[t]
    x0, eps, eps_hat, _ = _vp_point(abar, np.random.default_rng(t))
    snr = abar / (1 - abar)
    s = 1.0 / (1.0 + math.sqrt(snr))  # ((1 - s) / s)^2 = SNR: the same noise level
    z = (1 - s) * x0 + s * eps
    x0_hat = (z - s * eps_hat) / (1 - s)
    v_err = (eps_hat - x0_hat) - (eps - x0)
    w = loss_weighting("flow", d)[t]
    assert w * np.sum((eps_hat - eps) ** 2) == pytest.approx(np.sum(v_err ** 2), rel=1e-9)


def test_anchor_effort_p_times_w():
    """Where each anchor spends its objective: EDM and SD3 sample few high-noise steps but weight them."""
    d = CHAINS["cosine1000"]
    share = {}
    for sampler, weighting in (("edm_lognormal", "edm"), ("logit_normal", "flow")):
        p = create_named_schedule_sampler(sampler, d, seed=0).probabilities()
        pw = p * loss_weighting(weighting, d)
        share[sampler] = (p[800:].sum(), pw[800:].sum() / pw.sum())
        assert share[sampler][1] > 3 * share[sampler][0]
    # and the p*w of EDM at a few steps is its density times its weight, as defined
    p = create_named_schedule_sampler("edm_lognormal", d, seed=0).probabilities()
    w = 1 + (1 - d.alphas_cumprod) / d.alphas_cumprod / 0.25
    np.testing.assert_allclose((p * loss_weighting("edm", d))[[100, 400, 700]], (p * w)[[100, 400, 700]], rtol=1e-12)


def test_edm_weight_refused_where_infinite():
    class Pure:
        alphas_cumprod = np.array([0.9, 0.5, 0.0])
        num_timesteps = 3

    with pytest.raises(ValueError, match="--loss_weighting"):
        loss_weighting("edm", Pure())


# ------------------------------------------------------------------ CLTS: floor and release


def _paper_clts(T, i, target, mu=0.3, sigma=0.1):
    t = np.arange(T)
    g = np.exp(-((t - mu * T) ** 2) / (2 * (sigma * T) ** 2))
    lam = min(i / target, 1.0)
    return (1 - lam) / T + lam * g / g.sum()


def test_clts_defaults_are_the_papers_schedule_exactly():
    d = CHAINS["cosine1000"]
    s = create_named_schedule_sampler("clts", d, seed=0, clts_target_steps=100, total_steps=1000)
    for i in (0, 1, 50, 100, 999, 5000):
        np.testing.assert_allclose(s.probabilities_at(i), _paper_clts(1000, i, 100), rtol=1e-13, atol=0)
    assert s.mixing_weight(50) == 0.5 and s.mixing_weight(100) == 1.0  # no floor, no release


@pytest.mark.parametrize("floor", [0.1, 0.5, 0.9])
def test_clts_floor_keeps_every_step_trained(floor):
    d = CHAINS["cosine1000"]
    s = create_named_schedule_sampler("clts", d, seed=0, clts_target_steps=100, clts_floor=floor)
    for i in (0, 50, 100, 10_000):
        p = s.probabilities_at(i)
        assert p.min() >= floor / 1000 * (1 - 1e-12) and abs(p.sum() - 1) < 1e-12
    lam = 1 - floor  # after the target: (1 - lam) / T + lam g
    np.testing.assert_allclose(s.probabilities_at(500), (1 - lam) / 1000 + lam * s.gaussian, rtol=1e-12)
    assert s.mixing_weight(50) == pytest.approx(0.5 * (1 - floor))


def test_clts_release_returns_to_uniform_by_the_end():
    d = CHAINS["cosine1000"]
    s = create_named_schedule_sampler("clts", d, seed=0, clts_target_steps=2000, clts_release_start=0.5,
                                      total_steps=10_000)
    assert [s.mixing_weight(i) for i in (1000, 2000, 5000, 7500, 10_000, 12_000)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    np.testing.assert_array_equal(s.probabilities_at(10_000), np.full(1000, 1 / 1000))
    # with a floor, the two compose: the floor caps, the release scales the cap down
    f = create_named_schedule_sampler("clts", d, seed=0, clts_target_steps=2000, clts_release_start=0.5,
                                      clts_floor=0.5, total_steps=10_000)
    assert f.mixing_weight(7500) == pytest.approx(0.25)


def test_clts_release_needs_the_runs_length():
    with pytest.raises(ValueError, match="--total_steps"):
        create_named_schedule_sampler("clts", CHAINS["cosine1000"], seed=0, clts_release_start=0.5)
    with pytest.raises(ValueError, match="--total_steps"):
        validate_training_args({"schedule_sampler": "clts", "clts_release_start": 0.5, "total_steps": 0})
    validate_training_args({"schedule_sampler": "clts", "clts_release_start": 0.5, "total_steps": 100,
                            "clts_target_steps": 20})


def test_clts_release_that_starts_before_the_target_is_refused():
    """The release undoes a completed curriculum: a start on the ramp is refused, naming both flags."""
    flags = {"schedule_sampler": "clts", "clts_release_start": 0.1, "total_steps": 10_000, "clts_target_steps": 2000}
    with pytest.raises(ValueError, match=r"--clts_release_start 0.1 starts the release at step 1000 .*"
                                         r"--clts_target_steps 2000.*--clts_release_start >= 0.2"):
        validate_training_args(flags)
    validate_training_args({**flags, "clts_release_start": 0.2})  # at the target itself: fine
    # without --total_steps among the flags the check waits for the run's length
    validate_training_args({k: v for k, v in flags.items() if k != "total_steps"})


@pytest.mark.parametrize("flag, value", [("clts_floor", 1.0), ("clts_floor", -0.1), ("clts_release_start", 0.0),
                                         ("clts_release_start", 1.5)])
def test_clts_new_options_are_checked(flag, value):
    with pytest.raises(ValueError, match=f"--{flag}"):
        validate_training_args({"schedule_sampler": "clts", flag: value, "total_steps": 100})


def test_clts_floor_composes_with_min_snr():
    """The floored CLTS + Min-SNR arm: the sampler's draws are weighted by Min-SNR's table."""
    d = CHAINS["cosine1000"]
    s = create_named_schedule_sampler("clts", d, seed=0, clts_target_steps=10, clts_floor=0.5)
    assert isinstance(s, CLTSSampler)
    s.set_step(20)
    t, w = s.sample(256, "cpu")
    assert w.tolist() == [1.0] * 256
    table = loss_weighting("min_snr", d, min_snr_gamma=5.0)
    assert (t >= 600).float().mean() > 0.1  # the floor: uniform's 40% halved, not the Gaussian's ~0%
    assert np.all(table[t.numpy()] <= 1.0)


@pytest.mark.parametrize("bad", [[0.9, 1.2, 0.5], [0.9, float("nan"), 0.1], [0.9, -0.1, 0.0]])
def test_a_schedule_outside_0_1_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"alphas_cumprod in \[0, 1\]"):
        level_boundaries(np.array(bad))
