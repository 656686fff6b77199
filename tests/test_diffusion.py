"""
The diffusion mathematics (guided_diffusion.gaussian_diffusion / respace / losses) checked
against closed forms computed independently in float64 numpy / scipy. No shared data needed.
"""
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
    get_named_beta_schedule,
)
from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

LN2 = math.log(2.0)


def make_diffusion(T=50, schedule="cosine", mean=ModelMeanType.EPSILON, var=ModelVarType.FIXED_SMALL,
                   loss=LossType.MSE, rescale=False, respacing=None):
    kw = dict(betas=get_named_beta_schedule(schedule, T), model_mean_type=mean, model_var_type=var,
              loss_type=loss, rescale_timesteps=rescale)
    if respacing is None:
        return GaussianDiffusion(**kw)
    return SpacedDiffusion(space_timesteps(T, respacing), **kw)


def alpha_bars(diffusion):
    return np.cumprod(1.0 - np.asarray(diffusion.betas, dtype=np.float64))


class ConstModel(torch.nn.Module):
    """Outputs a fixed tensor (plus optional variance channels), recording the timesteps seen."""

    def __init__(self, out, var_values=None):
        super().__init__()
        self.out = out
        self.var_values = var_values
        self.seen = []
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the samplers a device

    def forward(self, x, t, **kwargs):
        self.seen.append(t.clone())
        out = self.out.expand_as(x) if self.out.dim() == x.dim() else self.out
        if self.var_values is not None:
            out = torch.cat([out, self.var_values.expand_as(x)], dim=1)
        return out + 0.0 * self.dummy


class TinyNet(torch.nn.Module):
    """A 1x1 convolution whose bias depends on t: enough to train through every loss."""

    def __init__(self, channels=3, learn_sigma=False):
        super().__init__()
        out = channels * (2 if learn_sigma else 1)
        self.conv = torch.nn.Conv2d(channels, out, 1)
        self.temb = torch.nn.Linear(1, out)

    def forward(self, x, t, y=None):
        return self.conv(x) + self.temb(t.float()[:, None] / 1000.0)[:, :, None, None]


# ------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("T", [1000, 4000, 21])
def test_linear_schedule_closed_form(T):
    betas = get_named_beta_schedule("linear", T)
    scale = 1000.0 / T
    assert betas.dtype == np.float64 and betas.shape == (T,)
    expected = scale * (1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1))
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[0] == pytest.approx(scale * 1e-4, rel=1e-14)
    assert betas[-1] == pytest.approx(scale * 0.02, rel=1e-14)


@pytest.mark.parametrize("T", [1000, 4000])
def test_cosine_schedule_closed_form(T):
    betas = get_named_beta_schedule("cosine", T)
    s = 0.008

    def f(t):
        return np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2

    abar = np.cumprod(1.0 - betas)
    closed = f(np.arange(1, T + 1)) / f(0)
    # Exact up to the final step, where the 0.999 cap bites.
    np.testing.assert_allclose(abar[:-1], closed[:-1], rtol=1e-9)
    assert betas[-1] == 0.999
    assert betas.max() == 0.999
    assert (betas[:-1] < 0.999).all()


def test_unknown_schedule_and_bad_length():
    with pytest.raises(ValueError) as err:
        get_named_beta_schedule("sqrt", 1000)
    assert "sqrt" in str(err.value) and "linear" in str(err.value) and "cosine" in str(err.value)
    with pytest.raises(ValueError, match="diffusion_steps must be a positive integer"):
        get_named_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="diffusion_steps must be a positive integer"):
        get_named_beta_schedule("cosine", 10.5)
    with pytest.raises(ValueError, match="'linear' needs diffusion_steps > 20"):
        get_named_beta_schedule("linear", 20)


def test_loss_type_is_vb_and_enum_validation():
    assert LossType.KL.is_vb() and LossType.RESCALED_KL.is_vb()
    assert not LossType.MSE.is_vb() and not LossType.RESCALED_MSE.is_vb()
    with pytest.raises(TypeError, match="model_var_type"):
        GaussianDiffusion(betas=[0.1, 0.2], model_mean_type=ModelMeanType.EPSILON,
                          model_var_type="learned_range", loss_type=LossType.MSE)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
        GaussianDiffusion(betas=[0.0, 0.2], model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)


def test_diffusion_arrays_against_definitions():
    diff = make_diffusion(T=100, schedule="cosine")
    b = diff.betas
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    assert diff.num_timesteps == 100
    for name in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
                 "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]:
        arr = getattr(diff, name)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.shape == (100,), name
    np.testing.assert_allclose(diff.alphas_cumprod, ab, rtol=1e-13)
    np.testing.assert_allclose(diff.alphas_cumprod_prev, ab_prev, rtol=1e-13)
    np.testing.assert_allclose(diff.alphas_cumprod_next, np.concatenate([ab[1:], [0.0]]), rtol=1e-13)
    np.testing.assert_allclose(diff.sqrt_recipm1_alphas_cumprod, np.sqrt((1 - ab) / ab), rtol=1e-10)
    post_var = b * (1 - ab_prev) / (1 - ab)
    np.testing.assert_allclose(diff.posterior_variance, post_var, rtol=1e-12)
    np.testing.assert_allclose(diff.posterior_log_variance_clipped[1:], np.log(post_var[1:]), rtol=1e-12)
    assert diff.posterior_log_variance_clipped[0] == diff.posterior_log_variance_clipped[1]


def test_extract_cached_tables_match_upstream_bits():
    """The cached float32 tables give exactly upstream's gather-float64-then-.float() values."""
    diff = make_diffusion(T=4000, schedule="cosine")
    t = torch.tensor([0, 1, 17, 999, 2500, 3999])
    shape = (6, 3, 2, 2)
    for name in ["sqrt_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "alphas_cumprod_prev", "_log_betas"]:
        ours = diff._extract(name, t, shape)
        ref = _extract_into_tensor(getattr(diff, name), t, shape)
        assert ours.dtype == torch.float32 and ours.shape == shape
        assert torch.equal(ours, ref), name
    # Built once per device, then reused.
    table = diff._table("sqrt_alphas_cumprod", t.device)
    assert diff._table("sqrt_alphas_cumprod", t.device) is table
    # The cache is not pickled (it may hold GPU tensors) and rebuilds after unpickling.
    clone = pickle.loads(pickle.dumps(diff))
    assert clone._tables == {}
    assert torch.equal(clone._extract("posterior_variance", t, shape), diff._extract("posterior_variance", t, shape))


# ------------------------------------------------------------------------ respacing


def test_space_timesteps_cases():
    # 99 / 9 = 11 exactly.
    assert space_timesteps(100, [10]) == set(range(0, 100, 11))
    assert space_timesteps(100, "10") == set(range(0, 100, 11))
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    assert space_timesteps(4000, "ddim10") == set(range(0, 4000, 400))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))  # the smallest integer stride
    assert space_timesteps(50, [50]) == set(range(50))
    # Unequal sections: 10 steps in two sections of 5.
    assert space_timesteps(10, [3, 2]) == {0, 2, 4, 5, 9}
    # The remainder goes to the first sections: 11 -> sizes 6 and 5; one step takes the section start.
    assert space_timesteps(11, [1, 1]) == {0, 6}


def test_space_timesteps_mixed_sections_exact():
    got = space_timesteps(300, "10,15,20")
    assert got == space_timesteps(300, [10, 15, 20])
    expected = set()
    for sec, count in enumerate([10, 15, 20]):
        stride = Fraction(99, count - 1)  # each section has 100 steps
        expected |= {100 * sec + round(k * stride) for k in range(count)}
    # One exact tie: 7 * 99/14 = 49.5. Upstream accumulates the float stride, which lands just
    # below the tie (49.4999...) and rounds down to 149; reproduce that, not Fraction's 150.
    expected = (expected - {150}) | {149}
    assert got == expected and len(got) == 45
    assert max(got) == 299 and min(got) == 0


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="cannot divide section 0 of 5 steps.*into 6"):
        space_timesteps(10, [6, 6])
    with pytest.raises(ValueError, match="cannot take exactly 999 of 1000 steps"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="'ddimN' with an integer N"):
        space_timesteps(1000, "ddimx")
    with pytest.raises(ValueError, match="comma-separated integers"):
        space_timesteps(1000, "10,abc")
    with pytest.raises(ValueError, match="at least one section"):
        space_timesteps(1000, [])
    with pytest.raises(ValueError, match="non-negative"):
        space_timesteps(1000, [-3])


@pytest.mark.parametrize("schedule,T,spacing", [("linear", 1000, "ddim25"), ("cosine", 4000, "10,5,3")])
def test_spaced_diffusion_matches_base(schedule, T, spacing):
    base = make_diffusion(T=T, schedule=schedule)
    kwargs = dict(betas=get_named_beta_schedule(schedule, T), model_mean_type=ModelMeanType.EPSILON,
                  model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)
    kwargs_copy = dict(kwargs)
    use = space_timesteps(T, spacing)
    spaced = SpacedDiffusion(use, **kwargs)
    assert kwargs["betas"] is kwargs_copy["betas"]  # the caller's dict is untouched
    assert spaced.timestep_map.dtype == torch.int64
    assert spaced.timestep_map.tolist() == sorted(use)
    assert spaced.num_timesteps == len(use) and spaced.original_num_steps == T
    # Equal up to float64 rounding (1 - ratio loses a few digits where alphas_cumprod is ~1e-10).
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[sorted(use)], rtol=1e-7, atol=1e-16)


@pytest.mark.parametrize("rescale", [False, True])
def test_spaced_model_sees_original_timesteps(rescale):
    spaced = make_diffusion(T=1000, rescale=rescale, respacing="ddim10")
    model = ConstModel(torch.zeros(1, 3, 4, 4))
    x = torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 4, 9])
    spaced.p_mean_variance(model, x, t)
    spaced.training_losses(model, x, t)
    for seen in model.seen:
        if rescale:
            assert seen.dtype == torch.float32
            assert seen.tolist() == [0.0, 400.0, 900.0]  # original steps on the 0..1000 scale
        else:
            assert seen.dtype == torch.int64 and seen.tolist() == [0, 400, 900]
    # A plain diffusion with rescale_timesteps scales by 1000 / T.
    plain = make_diffusion(T=4000, rescale=True)
    assert plain._scale_timesteps(torch.tensor([0, 2, 3999])).tolist() == [0.0, 0.5, 999.75]
    with pytest.raises(ValueError, match="outside 0..9"):
        SpacedDiffusion([3, 12], betas=get_named_beta_schedule("cosine", 10),
                        model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL,
                        loss_type=LossType.MSE)


# ------------------------------------------------------------------------ losses.py


def _kl_closed(m1, lv1, m2, lv2):
    v1, v2 = np.exp(lv1), np.exp(lv2)
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def test_normal_kl_closed_form_and_quadrature():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(2, 64))
    lv1, lv2 = rng.uniform(-3, 2, size=(2, 64))
    got = normal_kl(*(torch.from_numpy(a) for a in (m1, lv1, m2, lv2)))
    np.testing.assert_allclose(got.numpy(), _kl_closed(m1, lv1, m2, lv2), rtol=1e-10, atol=1e-12)
    # Independent check of the closed form itself: integrate p log(p/q).
    for i in range(3):
        p = stats.norm(m1[i], np.exp(lv1[i] / 2))
        q = stats.norm(m2[i], np.exp(lv2[i] / 2))
        val, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -np.inf, np.inf)
        assert got[i].item() == pytest.approx(val, rel=1e-6, abs=1e-9)
    # KL(p || p) = 0; broadcasting a batch against the standard-normal prior given as floats.
    same = normal_kl(torch.from_numpy(m1), torch.from_numpy(lv1), torch.from_numpy(m1), torch.from_numpy(lv1))
    assert torch.all(same.abs() < 1e-12)
    prior = normal_kl(torch.from_numpy(m1).float()[:, None], torch.from_numpy(lv1).float()[:, None], 0.0, 0.0)
    assert prior.shape == (64, 1) and prior.dtype == torch.float32
    np.testing.assert_allclose(prior[:, 0].numpy(), _kl_closed(m1, lv1, 0.0, 0.0), rtol=1e-5)
    assert normal_kl(0.0, 0.0, 1.0, math.log(4.0)).item() == pytest.approx(_kl_closed(0.0, 0.0, 1.0, math.log(4.0)))


def test_approx_cdf_close_to_scipy():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - torch.from_numpy(stats.norm.cdf(x.numpy()))).abs().max()
    assert err < 2e-4  # the tanh form is accurate to ~1.5e-4


def test_discretized_gaussian_log_likelihood_bins():
    rng = np.random.default_rng(1)
    values = np.arange(256) / 127.5 - 1.0  # every 8-bit value on [-1, 1]
    for mean, log_scale in [(0.1, math.log(0.05)), (-0.97, math.log(0.02)), (0.99, math.log(0.2)),
                            (rng.uniform(-1, 1), math.log(0.5))]:
        x = torch.from_numpy(values)
        ll = discretized_gaussian_log_likelihood(
            x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, log_scale))
        sd = math.exp(log_scale)
        upper = stats.norm.cdf((values + 1 / 255 - mean) / sd)
        lower = stats.norm.cdf((values - 1 / 255 - mean) / sd)
        exact = upper - lower
        exact[0] = upper[0]  # open edge bin (-inf, -1 + 1/255]
        exact[-1] = 1.0 - lower[-1]  # open edge bin [1 - 1/255, inf)
        probs = ll.exp().numpy()
        # Probabilities sum to one over all 256 values because the edge bins are open.
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(probs, exact, atol=3e-4)
        big = exact > 1e-2
        np.testing.assert_allclose(ll.numpy()[big], np.log(exact[big]), atol=0.03)
    # Empty bins are clamped at log(1e-12), not -inf.
    x = torch.tensor([0.0])
    far = discretized_gaussian_log_likelihood(x, means=torch.tensor([0.9]), log_scales=torch.tensor([math.log(0.01)]))
    assert far.item() == pytest.approx(math.log(1e-12), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        discretized_gaussian_log_likelihood(torch.zeros(2), means=torch.zeros(3), log_scales=torch.zeros(2))


# ------------------------------------------------------------------------ q and the posterior


def test_q_posterior_is_bayes_rule():
    diff = make_diffusion(T=200, schedule="cosine")
    ab = alpha_bars(diff)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alphas = 1 - diff.betas
    rng = np.random.default_rng(2)
    t = np.array([1, 5, 50, 120, 199])
    x0 = rng.normal(size=(5, 2, 3))
    xt = rng.normal(size=(5, 2, 3))
    # Product of the Gaussians q(x_{t-1} | x_0) and q(x_t | x_{t-1}) as a function of x_{t-1}.
    prior_var = (1 - ab_prev[t])[:, None, None]
    prior_mean = np.sqrt(ab_prev[t])[:, None, None] * x0
    a = alphas[t][:, None, None]
    lik_var = diff.betas[t][:, None, None]
    precision = 1 / prior_var + a / lik_var
    post_var = 1 / precision
    post_mean = post_var * (prior_mean / prior_var + np.sqrt(a) * xt / lik_var)

    mean, var, logvar = diff.q_posterior_mean_variance(
        torch.from_numpy(x0).float(), torch.from_numpy(xt).float(), torch.from_numpy(t))
    np.testing.assert_allclose(mean.numpy(), post_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(post_var, var.shape), rtol=1e-5)
    np.testing.assert_allclose(logvar.numpy(), np.log(np.broadcast_to(post_var, var.shape)), rtol=1e-5)
    # At t = 0 the posterior collapses onto x_0; the log-variance is clipped to step 1's.
    m0, v0, lv0 = diff.q_posterior_mean_variance(torch.from_numpy(x0).float(), torch.from_numpy(xt).float(),
                                                 torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(m0, torch.from_numpy(x0).float())
    assert torch.all(v0 == 0)
    assert torch.allclose(lv0, torch.tensor(math.log(diff.posterior_variance[1]), dtype=torch.float32))


def test_q_sample_statistics():
    torch.manual_seed(0)
    diff = make_diffusion(T=1000)
    ab = alpha_bars(diff)
    x0 = torch.full((2, 1, 200, 200), 0.5)
    t = torch.tensor([10, 700])
    xt = diff.q_sample(x0, t)
    n = 200 * 200
    for i, ti in enumerate(t.tolist()):
        mean, var = 0.5 * math.sqrt(ab[ti]), 1 - ab[ti]
        sample = xt[i].double()
        assert abs(sample.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(sample.var().item() - var) < 5 * var * math.sqrt(2 / n)
    m, v, lv = diff.q_mean_variance(x0, t)
    assert torch.allclose(m[:, 0, 0, 0], torch.tensor(0.5 * np.sqrt(ab[[10, 700]]), dtype=torch.float32))
    assert torch.allclose(v[:, 0, 0, 0], torch.tensor(1 - ab[[10, 700]], dtype=torch.float32))
    assert torch.allclose(lv.exp(), v)
    noise = torch.randn_like(x0)
    expected = torch.from_numpy(np.sqrt(ab[[10, 700]])).float()[:, None, None, None] * x0 + \
        torch.from_numpy(np.sqrt(1 - ab[[10, 700]])).float()[:, None, None, None] * noise
    torch.testing.assert_close(diff.q_sample(x0, t, noise=noise), expected)
    with pytest.raises(ValueError, match="noise shape"):
        diff.q_sample(x0, t, noise=noise[:, :, :10])


# ------------------------------------------------------------------------ training losses


def test_is_learned_names_the_variances_the_model_predicts():
    # the one place the learned-variance branches (two channels of output, a vb term) and
    # --fold_weighting's refusal ask
    assert {v for v in ModelVarType if v.is_learned} == {ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE}


@pytest.mark.parametrize("loss", list(LossType))
@pytest.mark.parametrize("var", [ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE,
                                 ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE])
@pytest.mark.parametrize("mean", list(ModelMeanType))
def test_training_losses_every_type_on_tiny_model(loss, var, mean):
    torch.manual_seed(0)
    learn_sigma = var in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    diff = make_diffusion(T=20, mean=mean, var=var, loss=loss)
    model = TinyNet(learn_sigma=learn_sigma)
    if var == ModelVarType.LEARNED:  # keep exp(log variance) in a sane range
        torch.nn.init.constant_(model.conv.bias[3:], -4.0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, 10, 19])
    terms = diff.training_losses(model, x0, t)
    expected_keys = {"loss"} if loss.is_vb() else ({"loss", "mse", "vb"} if learn_sigma else {"loss", "mse"})
    assert set(terms) == expected_keys
    for v in terms.values():
        assert v.shape == (4,) and torch.isfinite(v).all()
    if "vb" in terms:
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    terms["loss"].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_kl_loss_matches_direct_computation():
    """A model predicting a known eps: the KL loss equals the closed-form Gaussian KL in bits."""
    torch.manual_seed(3)
    T = 30
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    eps_hat = torch.randn(1, 3, 4, 4)
    t = torch.tensor([1, 12, 29])
    ab = alpha_bars(make_diffusion(T=T))
    for loss_type, scale in [(LossType.KL, 1.0), (LossType.RESCALED_KL, T)]:
        diff = make_diffusion(T=T, var=ModelVarType.FIXED_SMALL, loss=loss_type)
        got = diff.training_losses(ConstModel(eps_hat), x0, t, noise=noise)["loss"]
        a = ab[t.numpy()][:, None, None, None]
        coef1 = diff.posterior_mean_coef1[t.numpy()][:, None, None, None]
        post_var = diff.posterior_variance[t.numpy()][:, None, None, None]
        # x0 - x0_hat = sqrt((1 - abar) / abar) * (eps_hat - noise); the means differ by coef1 times that.
        diff_mean = coef1 * np.sqrt((1 - a) / a) * (eps_hat.double().numpy() - noise.double().numpy())
        kl = diff_mean**2 / (2 * post_var)  # equal variances
        expected = kl.reshape(3, -1).mean(axis=1) / LN2 * scale
        np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=2e-4)


def test_kl_loss_at_t0_is_decoder_nll():
    torch.manual_seed(4)
    diff = make_diffusion(T=30, var=ModelVarType.FIXED_LARGE, loss=LossType.KL)
    x0 = torch.randint(0, 256, (2, 3, 4, 4)).float() / 127.5 - 1
    noise = torch.randn_like(x0)
    eps_hat = torch.zeros(1, 3, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    got = diff.training_losses(ConstModel(eps_hat), x0, t, noise=noise)["loss"]
    # Mean of p(x_0 | x_1) with eps_hat = 0: the posterior mean at x0_hat = x_t / sqrt(abar) is x0_hat.
    ab0 = diff.alphas_cumprod[0]
    x_t = math.sqrt(ab0) * x0.double() + math.sqrt(1 - ab0) * noise.double()
    mean = (x_t / math.sqrt(ab0)).numpy()
    sd = math.sqrt(diff.posterior_variance[1])  # FIXED_LARGE uses step 1's posterior variance at t = 0
    v = x0.double().numpy()
    upper = stats.norm.cdf((v + 1 / 255 - mean) / sd)
    lower = stats.norm.cdf((v - 1 / 255 - mean) / sd)
    p = np.where(v < -0.999, upper, np.where(v > 0.999, 1 - lower, upper - lower))
    expected = -np.log(np.maximum(p, 1e-12)).reshape(2, -1).mean(axis=1) / LN2
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=2e-2)


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_mse_targets(mean_type):
    torch.manual_seed(5)
    diff = make_diffusion(T=30, mean=mean_type)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    out = torch.randn(1, 3, 4, 4)
    t = torch.tensor([3, 17])
    terms = diff.training_losses(ConstModel(out), x0, t, noise=noise)
    x_t = diff.q_sample(x0, t, noise=noise)
    target = {ModelMeanType.EPSILON: noise, ModelMeanType.START_X: x0,
              ModelMeanType.PREVIOUS_X: diff.q_posterior_mean_variance(x0, x_t, t)[0]}[mean_type]
    torch.testing.assert_close(terms["mse"], ((target - out) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"])


def test_hybrid_vb_uses_frozen_mean_and_rescaling():
    torch.manual_seed(6)
    T = 4000
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 3000])
    out = torch.nn.Parameter(torch.randn(1, 6, 4, 4) * 0.1)

    def model(x, ts, **kw):
        return out.expand(x.shape[0], -1, -1, -1)

    plain = make_diffusion(T=T, schedule="cosine", var=ModelVarType.LEARNED_RANGE, loss=LossType.MSE)
    rescaled = make_diffusion(T=T, schedule="cosine", var=ModelVarType.LEARNED_RANGE, loss=LossType.RESCALED_MSE)
    a = plain.training_losses(model, x0, t, noise=noise)
    b = rescaled.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(b["vb"], a["vb"] * (T / 1000.0))
    torch.testing.assert_close(b["mse"], a["mse"])
    # The vb term trains only the variance channels: the mean is frozen (detached).
    a["vb"].sum().backward()
    assert torch.all(out.grad[:, :3] == 0)
    assert out.grad[:, 3:].abs().sum() > 0


def test_learned_variance_shape_error():
    diff = make_diffusion(T=10, var=ModelVarType.LEARNED_RANGE)
    with pytest.raises(ValueError, match=r"must output \(2, 6, 4, 4\)"):
        diff.training_losses(ConstModel(torch.zeros(1, 3, 4, 4)), torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]))


# ------------------------------------------------------------------------ p_mean_variance variances


def test_p_mean_variance_variance_types():
    diff_kw = dict(T=40, schedule="linear")
    x = torch.randn(3, 3, 2, 2)
    t = torch.tensor([0, 7, 39])
    tn = t.numpy()
    small = make_diffusion(var=ModelVarType.FIXED_SMALL, **diff_kw)
    large = make_diffusion(var=ModelVarType.FIXED_LARGE, **diff_kw)
    ranged = make_diffusion(var=ModelVarType.LEARNED_RANGE, **diff_kw)
    eps = torch.zeros(1, 3, 2, 2)
    o_small = small.p_mean_variance(ConstModel(eps), x, t)
    o_large = large.p_mean_variance(ConstModel(eps), x, t)
    np.testing.assert_allclose(o_small["variance"][:, 0, 0, 0].numpy(), small.posterior_variance[tn], rtol=1e-6)
    large_var = np.where(tn == 0, large.posterior_variance[1], large.betas[tn])
    np.testing.assert_allclose(o_large["variance"][:, 0, 0, 0].numpy(), large_var, rtol=1e-6)
    np.testing.assert_allclose(o_large["log_variance"][:, 0, 0, 0].numpy(), np.log(large_var), rtol=1e-6)
    # LEARNED_RANGE interpolates the log variance: v = -1 -> clipped posterior, +1 -> beta.
    for v, expected in [(-1.0, ranged.posterior_log_variance_clipped[tn]), (1.0, np.log(ranged.betas[tn])),
                        (0.0, 0.5 * (ranged.posterior_log_variance_clipped[tn] + np.log(ranged.betas[tn])))]:
        out = ranged.p_mean_variance(ConstModel(eps, torch.full((1, 3, 2, 2), v)), x, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].detach().numpy(), expected, rtol=1e-6)
    # clip_denoised and denoised_fn act on pred_xstart (denoised_fn first).
    big = small.p_mean_variance(ConstModel(torch.full((1, 3, 2, 2), -50.0)), x, t, clip_denoised=True,
                                denoised_fn=lambda z: z * 2)
    assert big["pred_xstart"].abs().max() <= 1.0


# ------------------------------------------------------------------------ guidance


def test_condition_mean_shift_with_constant_gradient():
    torch.manual_seed(7)
    diff = make_diffusion(T=50)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 40])
    model = ConstModel(torch.randn(1, 3, 4, 4))
    g = 0.7
    seen = []

    def cond_fn(x_, t_, y=None):
        seen.append(y)
        return torch.full_like(x_, g)

    out = diff.p_mean_variance(model, x, t)
    new_mean = diff.condition_mean(cond_fn, out, x, t, model_kwargs={"y": "label"})
    torch.testing.assert_close(new_mean, out["mean"] + out["variance"] * g)
    assert seen == ["label"]
    # p_sample with the same noise: the sample shifts by variance * gradient.
    noise = torch.randn_like(x)
    plain = diff.p_sample(model, x, t, noise=noise)["sample"]
    guided = diff.p_sample(model, x, t, cond_fn=cond_fn, noise=noise)["sample"]
    torch.testing.assert_close(guided - plain, out["variance"] * g)
    # condition_score shifts eps by -sqrt(1 - abar) * gradient.
    scored = diff.condition_score(cond_fn, out, x, t)
    ab = torch.from_numpy(diff.alphas_cumprod[t.numpy()]).float()[:, None, None, None]
    eps0 = diff._predict_eps_from_xstart(x, t, out["pred_xstart"])
    eps1 = diff._predict_eps_from_xstart(x, t, scored["pred_xstart"])
    torch.testing.assert_close(eps1 - eps0, -(1 - ab).sqrt() * g * torch.ones_like(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="cond_fn must be callable"):
        diff.p_sample(model, x, t, True, None, {"y": 1})


def test_spaced_cond_fn_sees_original_timesteps():
    spaced = make_diffusion(T=1000, respacing="ddim10")
    seen = []

    def cond_fn(x_, t_):
        seen.append(t_.tolist())
        return torch.zeros_like(x_)

    x = torch.randn(2, 3, 2, 2)
    t = torch.tensor([1, 9])
    out = spaced.p_mean_variance(ConstModel(torch.zeros(1, 3, 2, 2)), x, t)
    spaced.condition_mean(cond_fn, out, x, t, model_kwargs={})
    spaced.condition_score(cond_fn, out, x, t, model_kwargs={})
    assert seen == [[100, 900], [100, 900]]


# ------------------------------------------------------------------------ samplers


def test_p_sample_loop_shapes_and_step_noise():
    diff = make_diffusion(T=8, var=ModelVarType.FIXED_LARGE)
    model = ConstModel(torch.zeros(1, 3, 4, 4))
    shape = (2, 3, 4, 4)
    torch.manual_seed(0)
    steps = list(diff.p_sample_loop_progressive(model, shape))
    assert len(steps) == 8
    assert all(s["sample"].shape == shape and s["pred_xstart"].shape == shape for s in steps)
    assert [m[0].item() for m in model.seen] == list(range(7, -1, -1))
    assert diff.p_sample_loop(model, shape, progress=False).shape == shape

    # The same per-step noise gives the same samples whatever the global RNG state.
    bank = torch.Generator().manual_seed(42)
    table = [torch.randn(shape, generator=bank) for _ in range(8)]
    calls = []

    def step_noise(i, shp, device):
        calls.append(i)
        return table[i]

    start = torch.randn(shape)
    torch.manual_seed(1)
    a = diff.p_sample_loop(model, shape, noise=start, step_noise_fn=step_noise)
    torch.manual_seed(2)
    b = diff.p_sample_loop(model, shape, noise=start, step_noise_fn=step_noise)
    assert torch.equal(a, b)
    assert calls[:8] == list(range(8))  # the sampling step, 0 = the first (t = T-1)
    # The last step (t = 0) adds no noise: it returns the mean.
    x1 = torch.randn(shape)
    t0 = torch.zeros(2, dtype=torch.long)
    out = diff.p_sample(model, x1, t0)
    torch.testing.assert_close(out["sample"], diff.p_mean_variance(model, x1, t0)["mean"])
    with pytest.raises(ValueError, match="noise has shape"):
        diff.p_sample_loop(model, shape, noise=torch.zeros(1, 3, 4, 4))


def test_ddim_eta0_deterministic_and_eta1_uses_step_noise():
    diff = make_diffusion(T=1000, respacing="ddim10")

    def model(x, t):
        return 0.3 * x + 0.01 * t.float()[:, None, None, None] / 1000

    shape = (2, 3, 4, 4)
    start = torch.randn(shape)
    torch.manual_seed(1)
    a = diff.ddim_sample_loop(model, shape, noise=start, eta=0.0)
    torch.manual_seed(2)
    b = diff.ddim_sample_loop(model, shape, noise=start, eta=0.0)
    assert torch.equal(a, b) and a.shape == shape
    steps = list(diff.ddim_sample_loop_progressive(model, shape, noise=start, eta=0.0))
    assert len(steps) == 10 and torch.equal(steps[-1]["sample"], a)
    # eta = 1: random unless the per-step noise is pinned.
    torch.manual_seed(1)
    c = diff.ddim_sample_loop(model, shape, noise=start, eta=1.0)
    torch.manual_seed(2)
    d = diff.ddim_sample_loop(model, shape, noise=start, eta=1.0)
    assert not torch.equal(c, d)
    fixed = torch.randn(shape)
    e = diff.ddim_sample_loop(model, shape, noise=start, eta=1.0, step_noise_fn=lambda i, s, dev: fixed)
    f = diff.ddim_sample_loop(model, shape, noise=start, eta=1.0, step_noise_fn=lambda i, s, dev: fixed)
    assert torch.equal(e, f)


def test_ddim_reverse_inverts_ddim_sample():
    diff = make_diffusion(T=1000, schedule="cosine", respacing="ddim50")
    eps_const = torch.randn(1, 3, 4, 4) * 0.5
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([20, 20])

    def const_eps(x_, t_):
        return eps_const.expand_as(x_)

    # With an x-independent eps the reverse step undoes the forward step exactly.
    prev = diff.ddim_sample(const_eps, x, t, clip_denoised=False)["sample"]
    back = diff.ddim_reverse_sample(const_eps, prev, t - 1, clip_denoised=False)["sample"]
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-5)

    # A smooth x-dependent eps: the full encode/decode round trip is close, and the gap is the
    # ODE discretisation error (first order: halving the step halves it).
    def smooth_eps(x_, t_):
        return 0.2 * torch.tanh(x_) + eps_const

    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    errors = []
    for spacing in ("ddim50", "ddim100"):
        ddim = make_diffusion(T=1000, schedule="linear", respacing=spacing)
        img = x0
        # Reverse steps t = 0..T-2 take x0 to x_{T-1} (the step at T-1 would map to alpha_bar = 0).
        for i in range(ddim.num_timesteps - 1):
            img = ddim.ddim_reverse_sample(smooth_eps, img, torch.tensor([i, i]), clip_denoised=False)["sample"]
        assert (img - x0).abs().max() > 1.0  # it did travel to noise
        recon = ddim.ddim_sample_loop(smooth_eps, tuple(x0.shape), noise=img, clip_denoised=False)
        errors.append((recon - x0).abs().max().item())
    assert errors[1] < 0.08
    assert 1.6 < errors[0] / errors[1] < 2.5
    with pytest.raises(ValueError, match="eta must be 0.0"):
        diff.ddim_reverse_sample(const_eps, x, t, eta=0.5)


# ------------------------------------------------------------------------ bits per dim


def test_calc_bpd_loop_tiny_model():
    torch.manual_seed(8)
    T = 6
    diff = make_diffusion(T=T, var=ModelVarType.LEARNED_RANGE, loss=LossType.RESCALED_MSE)
    model = TinyNet(learn_sigma=True)
    x0 = torch.randint(0, 256, (2, 3, 4, 4)).float() / 127.5 - 1
    out = diff.calc_bpd_loop(model, x0, clip_denoised=True)
    assert set(out) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    assert out["total_bpd"].shape == (2,) and out["prior_bpd"].shape == (2,)
    for k in ("vb", "xstart_mse", "mse"):
        assert out[k].shape == (2, T) and torch.isfinite(out[k]).all()
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    # Prior term: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) in bits per dim.
    ab = alpha_bars(diff)[-1]
    kl = _kl_closed(math.sqrt(ab) * x0.double().numpy(), math.log(1 - ab), 0.0, 0.0)
    # float32 cancellation in a KL of ~1e-5 bits: compare to 1e-3.
    np.testing.assert_allclose(out["prior_bpd"].numpy(), kl.reshape(2, -1).mean(axis=1) / LN2, rtol=1e-3)
