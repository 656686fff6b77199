"""
Golden vectors from the upstream OpenAI code (../shared/fixtures/upstream, see its README):
the model, schedules, losses, p_mean_variance and a DDIM sample must match to float32 rounding.

id_tiny.pt is built through improved_diffusion.script_util (Improved-Diffusion defaults),
gd_tiny.pt through guided_diffusion.script_util (Guided-Diffusion defaults).
"""
import importlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch

CASES = [("id_tiny", "improved_diffusion"), ("gd_tiny", "guided_diffusion")]
MODEL_RTOL = 1e-5  # model, schedules, losses, p_mean_variance
SAMPLE_RTOL = 1e-4  # the DDIM sample (ten network evaluations)


@lru_cache(maxsize=None)
def _build(path: str, package: str):
    """Load a fixture and build its model (eval mode, strict weights) and diffusion once per file."""
    fx = torch.load(path, weights_only=True)
    script_util = importlib.import_module(f"{package}.script_util")
    model, diffusion = script_util.create_model_and_diffusion(**fx["args"])
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    return fx, model, diffusion, script_util


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request, fixtures_dir: Path):
    name, package = request.param
    path = fixtures_dir / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return _build(str(path), package)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """|a - b| <= rtol * max|b| elementwise (relative to the tensor's scale), same shape and dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max abs error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def test_betas(case):
    fx, _, diffusion, _ = case
    assert_rel_close(torch.from_numpy(diffusion.betas), fx["betas"], MODEL_RTOL, "betas")
    assert diffusion.num_timesteps == fx["args"]["diffusion_steps"]


def test_q_sample(case):
    fx, _, diffusion, _ = case
    x_t = diffusion.q_sample(fx["x0"], fx["t"], noise=fx["noise"])
    assert_rel_close(x_t, fx["x_t"], MODEL_RTOL, "x_t")


def test_model_output(case):
    fx, model, diffusion, _ = case
    with torch.no_grad():
        out = model(fx["x_t"], diffusion._scale_timesteps(fx["t"]), **fx["model_kwargs"])
    assert_rel_close(out, fx["model_output"], MODEL_RTOL, "model_output")


def test_training_losses(case):
    fx, model, diffusion, _ = case
    with torch.no_grad():
        terms = diffusion.training_losses(model, fx["x0"], fx["t"], fx["model_kwargs"], noise=fx["noise"])
    assert set(terms) == set(fx["training_losses"])
    for key, expected in fx["training_losses"].items():
        assert_rel_close(terms[key], expected, MODEL_RTOL, f"training_losses[{key!r}]")


def test_p_mean_variance(case):
    fx, model, diffusion, _ = case
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, fx["x_t"], fx["t"], clip_denoised=True,
                                        model_kwargs=fx["model_kwargs"])
    assert set(fx["p_mean_variance"]) <= set(out)
    for key, expected in fx["p_mean_variance"].items():
        assert_rel_close(out[key], expected, MODEL_RTOL, f"p_mean_variance[{key!r}]")


def _respaced(fx, script_util):
    args = dict(fx["args"], timestep_respacing=fx["ddim_respacing"])
    return script_util.create_gaussian_diffusion(
        steps=args["diffusion_steps"],
        learn_sigma=args["learn_sigma"],
        sigma_small=args.get("sigma_small", False),
        noise_schedule=args["noise_schedule"],
        use_kl=args["use_kl"],
        predict_xstart=args["predict_xstart"],
        rescale_timesteps=args["rescale_timesteps"],
        rescale_learned_sigmas=args["rescale_learned_sigmas"],
        timestep_respacing=args["timestep_respacing"],
    )


def test_spaced_timestep_map(case):
    fx, _, _, script_util = case
    spaced = _respaced(fx, script_util)
    assert spaced.timestep_map.dtype == torch.int64
    assert torch.equal(spaced.timestep_map, fx["spaced_timestep_map"])


def test_ddim_sample(case):
    fx, model, _, script_util = case
    spaced = _respaced(fx, script_util)
    torch.manual_seed(0)  # eta = 0 draws (unused) noise; seed anyway so the run is repeatable
    with torch.no_grad():
        sample = spaced.ddim_sample_loop(model, tuple(fx["ddim_noise"].shape), noise=fx["ddim_noise"],
                                         clip_denoised=True, model_kwargs=fx["model_kwargs"], eta=0.0)
    assert_rel_close(sample, fx["ddim_sample"], SAMPLE_RTOL, "ddim_sample")
