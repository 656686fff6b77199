"""experiments.analysis / gan: PSNR, shared sampling noise, Hessian spectra, interpolation, flags."""
import copy
import math

import numpy as np
import pytest
import torch

from experiments import analysis as an
from experiments import gan
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            num_heads=1, learn_sigma=True, diffusion_steps=6, noise_schedule="cosine")


def tiny_model_and_diffusion(**kw):
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    flags.update(kw)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    # the output layer starts at zero: give it weights so samples depend on the network
    for p in model.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval(), diffusion


# ------------------------------------------------------------------------------------- PSNR


def test_psnr_matches_direct_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    want = [10 * math.log10(255.0**2 / np.mean((a[i].astype(float) - b[i].astype(float)) ** 2)) for i in range(5)]
    np.testing.assert_allclose(an.psnr(a, b), want, rtol=1e-12)
    # float images in [-1, 1] with data range 2 give the same numbers as the scaled images
    fa, fb = a / 127.5 - 1, b / 127.5 - 1
    np.testing.assert_allclose(an.psnr(fa, fb, data_range=2.0), want, rtol=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        an.psnr(a, b[:4])


def test_identical_images_are_capped_and_flagged():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] ^= 1  # one pixel off by one: MSE = 1/48
    assert np.isinf(an.psnr(a, a, max_db=None)).all()
    assert list(an.psnr(a, a)) == [an.PSNR_CAP_DB] * 3
    res = an.consistency([a, a.copy(), b], ["x", "y", "z"])
    assert [(p.i, p.j) for p in res.pairs] == [(0, 1), (0, 2), (1, 2)]
    assert res.identical_pairs == [("x", "y")]
    p02 = res.pairs[1]
    assert list(p02.identical) == [True, False, True]
    assert p02.per_image[1] == pytest.approx(10 * math.log10(255.0**2 * 48))
    want_mean = np.mean([100.0, np.mean([100.0, 10 * math.log10(255.0**2 * 48), 100.0])] + [p02.mean])
    assert res.mean_db == pytest.approx(want_mean)
    # pooled (Eq. 1): identical batches are capped; one differing pixel in 3 images -> MSE 1/144
    assert res.pairs[0].pooled == an.PSNR_CAP_DB and np.isinf(an.pooled_psnr(a, a, max_db=None))
    assert p02.pooled == pytest.approx(10 * math.log10(255.0**2 * 144))
    assert res.pooled_db == pytest.approx(np.mean([100.0, p02.pooled, p02.pooled]))
    with pytest.raises(ValueError, match="at least two"):
        an.pairwise_psnr([a])


def test_pooled_psnr_is_eq1_not_the_mean_of_per_image_psnrs():
    """Eq. 1 takes one MSE over all images of the pair; it differs from the mean per-image PSNR."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    b, c = a.copy(), a.copy()
    # per-image errors of very different size, so the two statistics differ
    for n, amp in enumerate((2, 20, 90)):
        b[n] = np.clip(a[n].astype(int) + rng.integers(-amp, amp + 1, a[n].shape), 0, 255)
        c[n] = np.clip(a[n].astype(int) + rng.integers(-amp // 2, amp // 2 + 1, a[n].shape), 0, 255)
    images = [a, b, c]
    pooled, per_image_mean = {}, {}
    for i, j in ((0, 1), (0, 2), (1, 2)):
        x, y = images[i].astype(np.float64), images[j].astype(np.float64)
        pooled[i, j] = 10 * math.log10(255.0**2 / np.mean((x - y) ** 2))
        per_image_mean[i, j] = np.mean([10 * math.log10(255.0**2 / np.mean((x[n] - y[n]) ** 2)) for n in range(3)])
        assert pooled[i, j] < per_image_mean[i, j] - 1.0  # really different numbers
        assert an.pooled_psnr(images[i], images[j]) == pytest.approx(pooled[i, j], rel=1e-12)
    res = an.consistency(images, ["a", "b", "c"])
    for p in res.pairs:
        assert p.pooled == pytest.approx(pooled[p.i, p.j], rel=1e-12)
        assert p.mean == pytest.approx(per_image_mean[p.i, p.j], rel=1e-12)
    assert res.pooled_db == pytest.approx(np.mean(list(pooled.values())), rel=1e-12)
    assert res.mean_db == pytest.approx(np.mean(list(per_image_mean.values())), rel=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        an.pooled_psnr(a, b[:2])


def test_to_uint8_matches_upstream_conversion():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3)
    assert an.to_uint8(x).ravel().tolist() == [0, 0, 127, 254, 255, 255]


# ------------------------------------------------------------------- shared sampling noise


def test_shared_noise_depends_on_seed_and_step_only():
    big = an.SharedNoise([5, 7, 9], (2, 3, 3))
    small = an.SharedNoise([7], (2, 3, 3))
    assert torch.equal(big.initial()[1], small.initial()[0])
    assert torch.equal(big.step(4)[1], small.step(4)[0])
    assert not torch.equal(big.step(4)[1], big.step(5)[1])
    assert not torch.equal(big.initial()[0], big.step(0)[0])
    assert not torch.equal(big.step(0)[0], big.step(0)[1])
    with pytest.raises(ValueError, match="shape"):
        big(0, (2, 2, 3, 3), "cpu")


def test_two_copies_of_a_model_give_identical_samples_whatever_the_global_rng():
    model, diffusion = tiny_model_and_diffusion()
    twin = copy.deepcopy(model)
    seeds, shape = [3, 4], (3, 8, 8)
    torch.manual_seed(123)
    a = an.diffusion_sample_images(model, diffusion, seeds, shape)
    torch.manual_seed(456)  # a hidden torch.randn in the loop would now differ
    b = an.diffusion_sample_images(twin, diffusion, seeds, shape)
    assert torch.equal(a, b)
    # another batch split: the same noise (conv rounding may differ with the batch size)
    torch.testing.assert_close(an.diffusion_sample_images(model, diffusion, seeds, shape, batch_size=1), a,
                               rtol=0, atol=1e-4)
    c = an.diffusion_sample_images(model, diffusion, [3, 5], shape)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_library_sampling_uses_the_shared_per_step_noise():
    """The final sample equals a by-hand ancestral loop fed noise.initial() and noise.step(k)."""
    model, diffusion = tiny_model_and_diffusion()
    noise = an.SharedNoise([0, 1], (3, 8, 8))
    got = an.final_sample(an.sample_with_shared_noise(model, diffusion, noise))
    x = noise.initial()
    with torch.no_grad():
        for k, i in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
            t = torch.full((2,), i, dtype=torch.long)
            out = diffusion.p_mean_variance(model, x, t, clip_denoised=True)
            x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * noise.step(k)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
    # DDIM with eta > 0 uses the per-step noise too: another step noise, another image
    d1 = an.final_sample(an.sample_with_shared_noise(model, diffusion, noise, use_ddim=True, eta=1.0))
    d0 = an.final_sample(an.sample_with_shared_noise(model, diffusion, noise, use_ddim=True, eta=0.0))
    assert not torch.equal(d1, d0)


def test_seed_labels_and_gan_latents_depend_on_seed_only():
    assert torch.equal(an.seed_labels([1, 2, 3], 10)[1:], an.seed_labels([2, 3], 10))
    assert int(an.seed_labels(list(range(50)), 10).max()) < 10
    z = gan.gan_latents([4, 5], 6)
    assert z.shape == (2, 6, 1, 1) and torch.equal(z[1], gan.gan_latents([5], 6)[0])


def test_predicted_xstart_trajectory_ends_at_the_final_sample():
    model, diffusion = tiny_model_and_diffusion()
    noise = an.SharedNoise([0, 1], (3, 8, 8))
    keep = an.evenly_spaced_steps(diffusion.num_timesteps, 3)
    assert keep == [0, 2, 5] or keep == [0, 3, 5]
    kept, final, table = an.predicted_xstart_trajectory(model, diffusion, noise, keep)
    assert [k["step"] for k in kept] == keep and table.shape == (diffusion.num_timesteps, 2)
    assert torch.equal(final, an.final_sample(an.sample_with_shared_noise(model, diffusion, noise)))
    np.testing.assert_allclose(table[-1], an.psnr(an.to_uint8(kept[-1]["pred_xstart"]), an.to_uint8(final)))


# ------------------------------------------------------------------------- Hessian spectra


def quadratic(dim=24, seed=0):
    """loss(x) = ½ xᵀAx + bᵀx with known eigenvalues; returns (x, loss_fn, A, eigenvalues)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([9.0, -6.0, 4.0, 3.0]), torch.linspace(-1.0, 1.5, dim - 4)]).double()
    a = q @ torch.diag(lam) @ q.T
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.randn(dim, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, (lambda: 0.5 * x @ a @ x + b @ x), a, np.sort(lam.numpy())[::-1]


def test_power_iteration_and_lanczos_recover_known_eigenvalues():
    x, loss_fn, a, lam = quadratic()
    hvp = an.HessianVectorProduct(loss_fn, [x])
    v = torch.randn(x.numel(), dtype=torch.float64)
    torch.testing.assert_close(hvp(v), a @ v)
    pw = an.power_iteration(hvp, hvp.dim, top_k=3, max_iters=2000, tol=1e-12, dtype=torch.float64)
    np.testing.assert_allclose(pw.eigenvalues, [9.0, -6.0, 4.0], rtol=1e-6)  # largest magnitude first
    assert all(pw.converged)
    top = an.lanczos_top_eigenvalues(hvp, hvp.dim, 3, hvp.dim, dtype=torch.float64)
    np.testing.assert_allclose(top, lam[:3], rtol=1e-9)  # algebraically largest
    res = an.lanczos(hvp, hvp.dim, hvp.dim, dtype=torch.float64)
    np.testing.assert_allclose(np.sort(res.ritz()[0]), np.sort(lam), atol=1e-8)


def test_hutchinson_trace_and_slq_match_the_exact_trace():
    x, loss_fn, a, lam = quadratic(seed=1)
    hvp = an.HessianVectorProduct(loss_fn, [x])
    exact = float(torch.trace(a))
    est = an.hutchinson_trace(hvp, hvp.dim, num_samples=400, dtype=torch.float64)
    assert abs(est.estimate - exact) < 4 * est.stderr + 1e-9
    assert abs(est.estimate - exact) < 0.1 * np.abs(lam).sum()
    dens = an.stochastic_lanczos_quadrature(hvp, hvp.dim, num_probes=30, num_steps=hvp.dim, dtype=torch.float64)
    nodes, weights = dens.all_nodes()
    assert weights.sum() == pytest.approx(1.0)
    assert nodes.max() == pytest.approx(9.0, rel=1e-6) and nodes.min() == pytest.approx(-6.0, rel=1e-6)
    assert hvp.dim * float((nodes * weights).sum()) == pytest.approx(exact, abs=0.15 * np.abs(lam).sum())
    grid, sigma = dens.default_grid()
    assert np.trapezoid(dens.density(grid, sigma), grid) == pytest.approx(1.0, rel=1e-3)


def test_hvp_of_a_nonlinear_loss_matches_the_explicit_hessian():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    c = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)
    data = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def f(w_, c_):
        return torch.tanh(data @ w_ + c_).pow(2).sum()

    hvp = an.HessianVectorProduct(lambda: f(w, c), [w, c])
    h = torch.autograd.functional.hessian(f, (w.detach(), c.detach()))
    full = torch.cat([torch.cat([h[0][0].reshape(12, 12), h[0][1].reshape(12, 4)], 1),
                      torch.cat([h[1][0].reshape(4, 12), h[1][1].reshape(4, 4)], 1)])
    for k in range(3):
        v = torch.randn(16, generator=g, dtype=torch.float64)
        torch.testing.assert_close(hvp(v), full @ v)
    res = an.hessian_analysis(hvp, top_k=2, power_iters=500, power_tol=1e-10, lanczos_steps=16, trace_samples=3,
                              slq_probes=1, slq_steps=16)
    evals = np.linalg.eigvalsh(full.numpy())
    np.testing.assert_allclose(res["lanczos"], np.sort(evals)[::-1][:2], rtol=1e-8)
    assert abs(res["power"].eigenvalues[0]) == pytest.approx(np.abs(evals).max(), rel=1e-5)
    assert res["loss"] == pytest.approx(float(f(w, c).detach()))


def test_gan_generator_loss_hvp_matches_finite_differences():
    torch.manual_seed(0)
    g, d = gan.create_gan(image_size=8, nz=4, ngf=4, ndf=4)
    g.double().eval(), d.double().eval()
    z = gan.gan_latents([0, 1, 2], 4).double()
    params = list(g.parameters())
    hvp = an.HessianVectorProduct(lambda: an.gan_generator_loss(g, d, z), params)
    v = torch.randn(hvp.dim, dtype=torch.float64)
    v /= v.norm()

    def grad_at(shift):
        with torch.no_grad():
            for p, dv in zip(params, an.unflatten(shift, params)):
                p.add_(dv)
        gr = an.flatten(torch.autograd.grad(an.gan_generator_loss(g, d, z), params))
        with torch.no_grad():
            for p, dv in zip(params, an.unflatten(shift, params)):
                p.sub_(dv)
        return gr

    eps = 1e-4
    fd = (grad_at(eps * v) - grad_at(-eps * v)) / (2 * eps)
    torch.testing.assert_close(hvp(v), fd, rtol=1e-4, atol=1e-7)


def test_gan_generator_loss_batchnorm_modes():
    """"batch" is the training loss (train-mode BatchNorm) and touches no running statistic; "running" is eval mode."""
    torch.manual_seed(0)
    g, d = gan.create_gan(image_size=16, nz=4, ngf=4, ndf=4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    z = gan.gan_latents(list(range(8)), 4)
    g.eval(), d.train()  # mixed modes on purpose: neither decides, both are restored
    state = {k: v.clone() for k, v in {**g.state_dict(), **{"d." + k: v for k, v in d.state_dict().items()}}.items()
             if v.is_floating_point()}
    with torch.no_grad():
        batch = float(an.gan_generator_loss(g, d, z))
        running = float(an.gan_generator_loss(g, d, z, batchnorm="running"))
        assert not g.training and d.training
        after = {**g.state_dict(), **{"d." + k: v for k, v in d.state_dict().items()}}
        assert all(torch.equal(after[k], v) for k, v in state.items())  # running statistics unchanged
        g_t, d_t = copy.deepcopy(g).train(), copy.deepcopy(d).train()
        assert batch == pytest.approx(float(torch.nn.functional.softplus(-d_t(g_t(z))).mean()), rel=1e-6)
        g_e, d_e = copy.deepcopy(g).eval(), copy.deepcopy(d).eval()
        assert running == pytest.approx(float(torch.nn.functional.softplus(-d_e(g_e(z))).mean()), rel=1e-6)
    assert batch != pytest.approx(running, rel=1e-6)
    with pytest.raises(ValueError, match="--gan_batchnorm: expected one of batch, running"):
        an.gan_generator_loss(g, d, z, batchnorm="eval")


def test_gan_line_is_defined_beyond_the_ends_with_batch_statistics():
    """Extrapolated running variances go negative: "running" gives NaN there, "batch" (the default) does not."""
    torch.manual_seed(0)
    g, d = gan.create_gan(image_size=8, nz=4, ngf=4, ndf=4)
    gen_a, disc_a = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
    for sd in (gen_a, disc_a):
        for k, v in sd.items():
            if k.endswith("running_var"):
                v.fill_(0.1)
    gen_b, disc_b = copy.deepcopy(gen_a), copy.deepcopy(disc_a)
    for sd in (gen_b, disc_b):
        for k, v in sd.items():
            if k.endswith("running_var"):
                v.fill_(2.0)
            elif v.is_floating_point():
                v.add_(0.01)
    z = gan.gan_latents(list(range(8)), 4)
    alphas = [-0.5, 0.0, 1.0]  # at -0.5 the variance is 1.5 * 0.1 - 0.5 * 2 < 0
    batch = [r["loss"] for r in an.gan_loss_along_line(g, d, gen_a, gen_b, disc_a, disc_b, alphas, z)]
    running = [r["loss"] for r in an.gan_loss_along_line(g, d, gen_a, gen_b, disc_a, disc_b, alphas, z,
                                                          batchnorm="running")]
    assert all(math.isfinite(x) for x in batch)
    assert math.isnan(running[0]) and all(math.isfinite(x) for x in running[1:])


# ---------------------------------------------------------------- interpolation and flags


def test_interpolate_state_dicts():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(3)}
    out = an.interpolate_state_dicts(a, b, 0.25)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 1.0]))
    assert torch.equal(an.interpolate_state_dicts(a, b, 0.0)["w"], a["w"])
    assert torch.equal(an.interpolate_state_dicts(a, b, 1.0)["w"], b["w"])
    with pytest.raises(ValueError, match="only in B: \\['extra'\\]"):
        an.interpolate_state_dicts(a, {**b, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="non-float buffer 'n'"):
        an.interpolate_state_dicts(a, {**b, "n": torch.tensor(4)}, 0.5)
    # int_buffers="a": a step counter (BatchNorm's num_batches_tracked) that differs is taken from A
    out = an.interpolate_state_dicts(a, {**b, "n": torch.tensor(4)}, 0.75, int_buffers="a")
    assert int(out["n"]) == 3 and out["n"].dtype == a["n"].dtype
    torch.testing.assert_close(out["w"], torch.tensor([2.5, -1.0]))
    with pytest.raises(ValueError, match="int_buffers must be 'error' or 'a'"):
        an.interpolate_state_dicts(a, b, 0.5, int_buffers="b")


def test_parse_alphas_and_stratified_timesteps():
    np.testing.assert_allclose(an.parse_alphas("-0.5:1.5:5"), [-0.5, 0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(an.parse_alphas("0, 1"), [0.0, 1.0])
    with pytest.raises(ValueError, match="--alphas"):
        an.parse_alphas("0:1")
    assert an.stratified_timesteps(4, 100).tolist() == [12, 37, 62, 87]


def test_model_flags_precedence_and_errors(tmp_path):
    ckpt = tmp_path / "model000010.pt"
    (tmp_path / "config.yaml").write_text("image_size: 16\nnum_channels: 32\nlr: 0.1\n")
    flags, source = an.resolve_model_flags(ckpt, "--num_channels 64 --learn_sigma True")
    assert flags["image_size"] == 16 and flags["num_channels"] == 64 and flags["learn_sigma"] is True
    assert "config.yaml" in source and "--model_flags" in source
    with pytest.raises(ValueError, match="unknown flag"):
        an.parse_model_flags("--num_chanels 3", model_and_diffusion_defaults())
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        an.load_diffusion_model(ckpt)


def test_gan_architecture():
    for size in (8, 16, 32):
        g, d = gan.create_gan(image_size=size, nz=5, ngf=4, ndf=4)
        x = g(gan.gan_latents([0, 1], 5))
        assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
        assert d(x).shape == (2,)
    with pytest.raises(ValueError, match="--image_size.*power of two"):
        gan.create_gan(image_size=24)
    assert gan.discriminator_path_for("r/generator_000100.pt").name == "discriminator_000100.pt"
