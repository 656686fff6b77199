"""Timestep samplers and loss weightings (guided_diffusion/resample.py) against DESIGN.md section 4."""
import io
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

from guided_diffusion import resample as R


class StandIn:
    """The two attributes the samplers use, with upstream's linear beta schedule."""

    def __init__(self, T=1000, model_mean_type=None):
        scale = 1000 / T
        betas = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.num_timesteps = T
        if model_mean_type is not None:
            self.model_mean_type = model_mean_type


@pytest.fixture(scope="module")
def lin1000():
    return StandIn(1000)


def gaussian(T, mu, sigma):
    t = np.arange(T)
    g = np.exp(-((t - mu * T) ** 2) / (2 * (sigma * T) ** 2))
    return g / g.sum()


def chi2_ok(samples, p, alpha=1e-6):
    """Pearson chi-square goodness of fit of integer samples to p (bins with p>0)."""
    counts = np.bincount(samples, minlength=len(p))
    n = len(samples)
    nz = p > 0
    assert counts[~nz].sum() == 0, "drew a timestep of probability 0"
    expected = n * p[nz]
    chi2 = ((counts[nz] - expected) ** 2 / expected).sum()
    return chi2 < stats.chi2.ppf(1 - alpha, df=nz.sum() - 1), chi2


# ----------------------------------------------------------------------------------- CLTS

def test_clts_uniform_at_step0_exactly(lin1000):
    s = R.create_named_schedule_sampler("clts", lin1000, seed=0)
    s.set_step(0)
    assert np.array_equal(s.weights(), np.full(1000, 1.0 / 1000))
    assert np.array_equal(s.probabilities(), np.full(1000, 1.0 / 1000))


def test_clts_gaussian_at_and_after_target():
    d = StandIn(200)
    s = R.CLTSSampler(d, clts_mean=0.3, clts_std=0.1, clts_target_steps=1000, seed=0)
    g = gaussian(200, 0.3, 0.1)
    for step in (1000, 1001, 50000):
        s.set_step(step)
        np.testing.assert_allclose(s.weights(), g, rtol=1e-12, atol=0)
    assert np.argmax(g) == 60  # centred at mu*T


def test_clts_linear_mixture_between():
    d = StandIn(100)
    s = R.CLTSSampler(d, clts_mean=0.7, clts_std=0.2, clts_target_steps=400, seed=0)
    g = gaussian(100, 0.7, 0.2)
    for step, lam in ((100, 0.25), (200, 0.5), (300, 0.75), (1, 1 / 400)):
        s.set_step(step)
        np.testing.assert_allclose(s.weights(), (1 - lam) / 100 + lam * g, rtol=1e-12)
        np.testing.assert_allclose(s.probabilities_at(step), (1 - lam) / 100 + lam * g, rtol=1e-12)
        assert s.weights().sum() == pytest.approx(1.0, abs=1e-12)
    # probabilities_at does not move the sampler
    assert s.step == 1


def test_clts_defaults_follow_design(lin1000):
    s = R.create_named_schedule_sampler("clts", lin1000)
    # sigma 0.1: the CPU study's reading of Eq. 7 (README, "Readings we made"), not DESIGN.md's 1.0
    assert (s.clts_mean, s.clts_std, s.clts_target_steps) == (0.3, 0.1, 100000)
    assert s.importance_weighting is False


def test_clts_sampled_weights_are_one_and_histogram_matches_p():
    d = StandIn(50)
    s = R.CLTSSampler(d, clts_mean=0.3, clts_std=0.1, clts_target_steps=10, seed=1)
    s.set_step(5)  # a real mixture: lambda = 0.5
    t, w = s.sample(200_000, "cpu")
    assert t.dtype == torch.int64 and w.dtype == torch.float32 and t.shape == w.shape == (200_000,)
    assert torch.all(w == 1.0)
    assert int(t.min()) >= 0 and int(t.max()) < 50
    ok, chi2 = chi2_ok(t.numpy(), s.probabilities())
    assert ok, chi2
    # the same draws do not fit the uniform distribution (the test can fail)
    bad, _ = chi2_ok(t.numpy(), np.full(50, 1 / 50))
    assert not bad


@pytest.mark.parametrize("kw,flag", [
    (dict(clts_mean=1.5), "--clts_mean"), (dict(clts_mean=-0.01), "--clts_mean"),
    (dict(clts_mean=float("nan")), "--clts_mean"),
    (dict(clts_std=0.0), "--clts_std"), (dict(clts_std=-1.0), "--clts_std"),
    (dict(clts_target_steps=0), "--clts_target_steps"), (dict(clts_target_steps=2.5), "--clts_target_steps"),
])
def test_clts_validation_names_flag(lin1000, kw, flag):
    with pytest.raises(ValueError, match=flag):
        R.create_named_schedule_sampler("clts", lin1000, **kw)


def test_set_step_rejects_negative(lin1000):
    s = R.CLTSSampler(lin1000, seed=0)
    with pytest.raises(ValueError, match="step"):
        s.set_step(-1)


# ----------------------------------------------------------------------------------- SpeeD

def test_speed_probabilities(lin1000):
    s = R.create_named_schedule_sampler("speed", lin1000, seed=0)
    p = s.probabilities()
    z = 5 * 700 + 300
    np.testing.assert_allclose(p[:700], 5 / z, rtol=1e-14)
    np.testing.assert_allclose(p[700:], 1 / z, rtol=1e-14)
    s2 = R.SpeeDSampler(StandIn(10), speed_tau=0.35, speed_k=3.0)  # tau*T = 3.5: t = 0..3 up-weighted
    np.testing.assert_allclose(s2.weights(), [3, 3, 3, 3, 1, 1, 1, 1, 1, 1])


def test_speed_m_is_642_for_linear_1000(lin1000):
    s = R.SpeeDSampler(lin1000)
    assert s.m == 642
    # the documented reading: forward difference sqrt(1-a[t+1]) - sqrt(1-a[t]), m = 1 + first t below 1e-4
    r = np.sqrt(1 - lin1000.alphas_cumprod)
    d = r[1:] - r[:-1]
    assert d[640] >= 1e-4 > d[641]
    assert R.speed_convergence_start(lin1000.alphas_cumprod) == 642


def test_speed_dual_pairs(lin1000):
    s = R.SpeeDSampler(lin1000, seed=3)
    t, w = s.sample(4000, "cpu")
    t = t.numpy()
    assert torch.all(w == 1.0)
    first, second = t[0::2], t[1::2]
    expect = np.where(first < 642, 642 - first, first - 642)
    assert np.array_equal(second, expect)
    assert second.min() >= 0 and second.max() <= 999
    # the first of each pair follows p: P(t < 700) = 3500/3800 (binomial, 6 sigma)
    n = len(first)
    frac = (first < 700).mean()
    p = 3500 / 3800
    assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n)
    # odd batch: n steps, the last pair's partner dropped
    t_odd, w_odd = s.sample(7, "cpu")
    assert t_odd.shape == (7,) and w_odd.shape == (7,)
    assert np.array_equal(t_odd.numpy()[1::2], s.pair(t_odd.numpy()[0:6:2]))


def test_speed_without_dual_follows_p():
    d = StandIn(20)
    s = R.SpeeDSampler(d, speed_tau=0.5, speed_k=4.0, speed_dual=False, seed=0)
    t, _ = s.sample(100_000, "cpu")
    ok, chi2 = chi2_ok(t.numpy(), s.probabilities())
    assert ok, chi2


@pytest.mark.parametrize("kw,flag", [(dict(speed_tau=0.0), "--speed_tau"), (dict(speed_tau=1.2), "--speed_tau"),
                                     (dict(speed_k=0), "--speed_k"), (dict(speed_dual="yes"), "--speed_dual")])
def test_speed_validation(lin1000, kw, flag):
    with pytest.raises(ValueError, match=flag):
        R.create_named_schedule_sampler("speed", lin1000, **kw)


def test_speed_weighting_closed_form(lin1000):
    a = lin1000.alphas_cumprod
    w = R.loss_weighting("speed", lin1000)
    assert w.dtype == np.float64 and w.shape == (1000,)
    d = np.append(a[:-1] - a[1:], a[-2] - a[-1])  # d(1 - abar)/dt, forward difference (backward at T-1)
    norm = (d - d.min()) / (d.max() - d.min())  # min-max over the whole schedule, t = 0..T-1
    np.testing.assert_allclose(w[:700], 0.4 + 0.2 * norm[:700], rtol=1e-12)
    assert np.all(w[700:] == 1.0)
    w2 = R.loss_weighting("speed", lin1000, speed_lambda=0.9, speed_tau=0.5)
    np.testing.assert_allclose(w2[:500], 0.1 + 0.8 * norm[:500], rtol=1e-12)
    assert np.all(w2[500:] == 1.0)
    # the min-max over t < tau*T only (the earlier reading) differs by up to ~7e-3 at lambda = 0.6
    dr = d[:700]
    region_only = 0.4 + 0.2 * (dr - dr.min()) / (dr.max() - dr.min())
    assert 5e-3 < np.abs(region_only - w[:700]).max() < 1e-2


# ----------------------------------------------------------------------------------- Min-SNR / P2

def test_min_snr_and_p2_closed_forms(lin1000):
    a = lin1000.alphas_cumprod
    snr = a / (1 - a)
    np.testing.assert_allclose(R.loss_weighting("min_snr", lin1000), np.minimum(snr, 5) / snr, rtol=1e-12)
    np.testing.assert_allclose(R.loss_weighting("min_snr", lin1000, min_snr_gamma=1.0),
                               np.minimum(snr, 1) / snr, rtol=1e-12)
    np.testing.assert_allclose(R.loss_weighting("min_snr", lin1000, predict_xstart=True),
                               np.minimum(snr, 5), rtol=1e-12)
    np.testing.assert_allclose(R.loss_weighting("p2", lin1000), 1 / (1 + snr), rtol=1e-12)
    np.testing.assert_allclose(R.loss_weighting("p2", lin1000, p2_k=2.0, p2_gamma=0.5),
                               1 / np.sqrt(2 + snr), rtol=1e-12)
    assert np.array_equal(R.loss_weighting("none", lin1000), np.ones(1000))
    assert np.array_equal(R.loss_weighting("uniform", lin1000), np.ones(1000))
    # the callable classes behind the names
    np.testing.assert_allclose(R.MinSNRWeighting(5.0)(a), np.minimum(snr, 5) / snr, rtol=1e-12)
    np.testing.assert_allclose(R.P2Weighting(1.0, 1.0)(a), 1 / (1 + snr), rtol=1e-12)


def test_min_snr_reads_predict_xstart_from_diffusion():
    class MeanType:
        name = "START_X"
    d = StandIn(100, model_mean_type=MeanType())
    a = d.alphas_cumprod
    snr = a / (1 - a)
    np.testing.assert_allclose(R.loss_weighting("min_snr", d), np.minimum(snr, 5), rtol=1e-12)
    np.testing.assert_allclose(R.loss_weighting("min_snr", d, predict_xstart=False),
                               np.minimum(snr, 5) / snr, rtol=1e-12)


def test_weighting_extremes_stay_finite():
    a = np.array([1.0, 0.5, 0.0])  # SNR inf, 1, 0
    assert np.array_equal(R.MinSNRWeighting(5.0)(a), [0.0, 1.0, 1.0])
    assert np.array_equal(R.P2Weighting(1.0, 1.0)(a), [0.0, 0.5, 1.0])


def test_weighting_errors(lin1000):
    with pytest.raises(NotImplementedError, match="min_snr"):
        R.loss_weighting("snr_min", lin1000)
    with pytest.raises(ValueError, match="--loss_weighting"):
        R.loss_weighting("bogus", lin1000)
    with pytest.raises(ValueError, match="--min_snr_gamma"):
        R.loss_weighting("min_snr", lin1000, min_snr_gamma=0)
    with pytest.raises(ValueError, match="--p2_k"):
        R.loss_weighting("p2", lin1000, p2_k=-1)
    with pytest.raises(ValueError, match="--speed_lambda"):
        R.loss_weighting("speed", lin1000, speed_lambda=1.5)
    with pytest.raises(ValueError, match="not_a_flag"):
        R.loss_weighting("p2", lin1000, not_a_flag=1)
    # other methods' flags are accepted and ignored
    w = R.loss_weighting("p2", lin1000, clts_mean=0.1, min_snr_gamma=3, speed_k=2, seed=1)
    np.testing.assert_allclose(w, 1 - lin1000.alphas_cumprod, rtol=1e-12)  # 1/(1+SNR) = 1 - abar


# ----------------------------------------------------------------------------------- loss-second-moment

def test_lsm_uniform_before_warmup():
    d = StandIn(20)
    s = R.create_named_schedule_sampler("loss-second-moment", d, history_per_term=3, seed=0)
    s.update_with_all_losses(list(range(19)) * 3, np.linspace(1, 2, 57))  # t = 19 never seen
    assert not s._warmed_up()
    assert np.array_equal(s.weights(), np.ones(20))
    t, w = s.sample(1000, "cpu")
    np.testing.assert_allclose(w.numpy(), 1.0, rtol=1e-7)


def test_lsm_after_warmup_and_unbiased():
    T, H, u = 20, 3, 0.05
    d = StandIn(T)
    s = R.LossSecondMomentResampler(d, history_per_term=H, uniform_prob=u, seed=0)
    rng = np.random.default_rng(0)
    hist = rng.uniform(0.1, 3.0, size=(T, H + 1))
    for k in range(H + 1):  # one extra round: the oldest loss is shifted out
        s.update_with_local_losses(torch.arange(T), torch.tensor(hist[:, k]))
    kept = hist[:, 1:]
    q = np.sqrt((kept**2).mean(axis=1))
    expect = q / q.sum() * (1 - u) + u / T
    np.testing.assert_allclose(s.weights(), expect, rtol=1e-12)
    # unbiased: E_p[w(t) f(t)] = mean_t f(t), exactly from weights()
    p = s.probabilities()
    f = rng.normal(size=T)
    assert np.sum(p * (1.0 / (T * p)) * f) == pytest.approx(f.mean(), rel=1e-12)
    # and the sampled weights are exactly those importance weights
    t, w = s.sample(5000, "cpu")
    np.testing.assert_allclose(w.numpy(), (1.0 / (T * p[t.numpy()])).astype(np.float32), rtol=1e-6)
    ok, chi2 = chi2_ok(t.numpy(), p)
    assert ok, chi2


def test_lsm_validation(lin1000):
    with pytest.raises(ValueError, match="--history_per_term"):
        R.LossSecondMomentResampler(lin1000, history_per_term=0)
    with pytest.raises(ValueError, match="--uniform_prob"):
        R.LossSecondMomentResampler(lin1000, uniform_prob=1.5)


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = R.LossSecondMomentResampler(StandIn(10), history_per_term=2, seed=0, rank=rank)
        n = 3 if rank == 0 else 5  # unequal batch sizes: padding path
        ts = torch.arange(n) + 4 * rank
        losses = torch.arange(n, dtype=torch.float32) + 10 * rank
        s.update_with_local_losses(ts, losses)
        torch.save(s.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_lsm_update_gathers_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    init = tmp_path / "init"
    mp.start_processes(_dist_worker, args=(2, str(init), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ref = R.LossSecondMomentResampler(StandIn(10), history_per_term=2, seed=0)
    ref.update_with_all_losses([0, 1, 2, 4, 5, 6, 7, 8], [0, 1, 2, 10, 11, 12, 13, 14])
    for st in states:
        assert torch.equal(st["loss_history"], torch.from_numpy(ref._loss_history))
        assert torch.equal(st["loss_counts"], torch.from_numpy(ref._loss_counts))
    assert states[0]["rank"] == 0 and states[1]["rank"] == 1


# ----------------------------------------------------------------------------------- factory, seeding, state

def test_factory_names_and_options(lin1000):
    with pytest.raises(NotImplementedError, match="uniform, loss-second-moment, clts, speed"):
        R.create_named_schedule_sampler("gaussian", lin1000)
    with pytest.raises(ValueError, match="--schedule_sampler"):
        R.create_named_schedule_sampler("gaussian", lin1000)
    with pytest.raises(ValueError, match="clts_meen"):
        R.create_named_schedule_sampler("clts", lin1000, clts_meen=0.2)
    # every other sampler's / weighting's flag is ignored, so TrainLoop can pass them all
    s = R.create_named_schedule_sampler("uniform", lin1000, clts_mean=0.1, speed_k=2, history_per_term=4,
                                        min_snr_gamma=5, p2_k=1, speed_lambda=0.6, seed=1, rank=0)
    assert isinstance(s, R.UniformSampler)
    assert isinstance(R.create_named_schedule_sampler("loss-second-moment", lin1000), R.LossSecondMomentResampler)
    assert isinstance(R.create_named_schedule_sampler("loss_second_moment", lin1000), R.LossSecondMomentResampler)
    c = R.create_named_schedule_sampler("clts", lin1000, clts_mean=0.5, clts_std=0.2, clts_target_steps=7,
                                        speed_k=9)
    assert (c.clts_mean, c.clts_std, c.clts_target_steps) == (0.5, 0.2, 7)
    sp = R.create_named_schedule_sampler("speed", lin1000, speed_k=2.0, speed_tau=0.5, clts_mean=0.9)
    assert (sp.speed_k, sp.speed_tau) == (2.0, 0.5)


def test_uniform_sampler_upstream_contract(lin1000):
    s = R.UniformSampler(lin1000, seed=0)
    t, w = s.sample(64, "cpu")
    assert t.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.all(w == 1.0)
    assert np.array_equal(s.weights(), np.ones(1000))


def test_seed_and_rank_streams(lin1000):
    a = R.UniformSampler(lin1000, seed=5).sample(50, "cpu")[0]
    b = R.UniformSampler(lin1000, seed=5).sample(50, "cpu")[0]
    c = R.UniformSampler(lin1000, seed=5, rank=1).sample(50, "cpu")[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    np.random.seed(123)  # seed=None derives from the global numpy state
    x = R.UniformSampler(lin1000).sample(50, "cpu")[0]
    np.random.seed(123)
    y = R.UniformSampler(lin1000).sample(50, "cpu")[0]
    assert torch.equal(x, y)


def _make(name, d):
    s = R.create_named_schedule_sampler(name, d, seed=11, clts_target_steps=100)
    if name == "loss-second-moment":
        s = R.LossSecondMomentResampler(d, history_per_term=2, seed=11)
        for k in range(2):
            s.update_with_all_losses(list(range(d.num_timesteps)), np.arange(d.num_timesteps) + k + 1.0)
    s.set_step(37)
    s.sample(13, "cpu")  # advance the stream
    return s


@pytest.mark.parametrize("name", ["uniform", "loss-second-moment", "clts", "speed"])
def test_state_dict_round_trip_gives_identical_samples(name):
    d = StandIn(50)
    s = _make(name, d)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expect = [s.sample(9, "cpu") for _ in range(3)]
    fresh = R.create_named_schedule_sampler(name, d, seed=999, history_per_term=2, clts_target_steps=100)
    fresh.load_state_dict(state)
    assert fresh.step == 37
    got = [fresh.sample(9, "cpu") for _ in range(3)]
    for (t1, w1), (t2, w2) in zip(expect, got):
        assert torch.equal(t1, t2) and torch.equal(w1, w2)
    np.testing.assert_array_equal(fresh.weights(), s.weights())


def test_load_state_of_other_sampler_is_refused(lin1000):
    st = R.UniformSampler(lin1000, seed=0).state_dict()
    with pytest.raises(ValueError, match="'uniform'.*'clts'"):
        R.CLTSSampler(lin1000, seed=0).load_state_dict(st)
    with pytest.raises(ValueError, match="'uniform'.*'loss-second-moment'"):
        R.LossSecondMomentResampler(lin1000, seed=0).load_state_dict(st)
    lsm = R.LossSecondMomentResampler(lin1000, history_per_term=3).state_dict()
    with pytest.raises(ValueError, match="--history_per_term"):
        R.LossSecondMomentResampler(lin1000, history_per_term=4).load_state_dict(lsm)


def test_with_real_gaussian_diffusion():
    gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
    betas = gd.get_named_beta_schedule("linear", 1000)
    d = gd.GaussianDiffusion(betas=betas, model_mean_type=gd.ModelMeanType.START_X,
                             model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)
    assert R.SpeeDSampler(d).m == 642
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    # x_0-prediction read from the diffusion's model_mean_type
    np.testing.assert_allclose(R.loss_weighting("min_snr", d), np.minimum(snr, 5), rtol=1e-12)
