"""``--fold_weighting``: a loss weighting folded into a fixed timestep sampler (guided_diffusion/folded.py)."""
import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.folded import FoldedSampler, effective_batch_fraction
from guided_diffusion.options import training_defaults, validate_training_args
from guided_diffusion.resample import create_named_schedule_sampler, loss_weighting
from guided_diffusion.run_folder import run_defining_flags
from guided_diffusion.training import train

COSINE = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("cosine", 1000),
                              model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
                              loss_type=gd.LossType.MSE)
ANCHORS = {"edm": ("edm_lognormal", "edm"), "sd3": ("logit_normal", "flow")}


@pytest.mark.parametrize("anchor", sorted(ANCHORS))
def test_folded_sampler_draws_p_times_w_with_unit_weights(anchor):
    """q = p w / Z, weights 1: the same objective as the weighted form up to the constant Z."""
    name, weighting = ANCHORS[anchor]
    inner = create_named_schedule_sampler(name, COSINE, seed=0)
    w = loss_weighting(weighting, COSINE)
    folded = FoldedSampler(inner, w, weighting, seed=3)
    p = inner.probabilities()
    z = float(p @ w)
    np.testing.assert_allclose(folded.probabilities(), p * w / z, rtol=1e-12)
    losses = np.random.default_rng(1).random(1000)  # any per-step loss
    assert folded.probabilities() @ losses == pytest.approx((p * w) @ losses / z, rel=1e-12)
    t, weights = folded.sample(20000, "cpu")
    assert weights.tolist() == [1.0] * 20000
    # the draws follow q: the share above 0.6T, against q's
    assert (t >= 600).float().mean().item() == pytest.approx(folded.probabilities()[600:].sum(), abs=0.015)


def test_effective_batch_fraction_of_the_anchors_on_the_study_schedule():
    """The module docstring's numbers: about 360 (EDM) and 25 (SD3) draws per effective one."""
    inv = {}
    for anchor, (name, weighting) in ANCHORS.items():
        p = create_named_schedule_sampler(name, COSINE, seed=0).probabilities()
        inv[anchor] = 1.0 / effective_batch_fraction(p, loss_weighting(weighting, COSINE))
    assert 330 < inv["edm"] < 390 and 22 < inv["sd3"] < 28, inv
    assert effective_batch_fraction(np.full(1000, 1e-3), np.full(1000, 7.0)) == pytest.approx(1.0)


def test_folded_state_resumes_the_same_draws_and_refuses_the_unfolded_state():
    w = loss_weighting("edm", COSINE)
    a = FoldedSampler(create_named_schedule_sampler("edm_lognormal", COSINE, seed=0), w, "edm", seed=5)
    a.sample(7, "cpu")
    state = a.state_dict()
    assert state["sampler"] == "folded:edm_lognormal"
    want = a.sample(64, "cpu")[0]
    b = FoldedSampler(create_named_schedule_sampler("edm_lognormal", COSINE, seed=0), w, "edm", seed=99)
    b.load_state_dict(state)
    assert b.sample(64, "cpu")[0].tolist() == want.tolist()
    with pytest.raises(ValueError, match="'folded:edm_lognormal'.*'edm_lognormal'"):
        create_named_schedule_sampler("edm_lognormal", COSINE, seed=0).load_state_dict(state)


@pytest.mark.parametrize("flags, match", [
    ({"schedule_sampler": "clts", "loss_weighting": "min_snr"}, "--fold_weighting True needs a fixed .*clts"),
    ({"schedule_sampler": "edm_lognormal", "loss_weighting": "none"}, "--loss_weighting is 'none'"),
    ({"schedule_sampler": "edm_lognormal", "loss_weighting": "edm", "learn_sigma": True},
     "--fold_weighting True with --learn_sigma True would weight the variational-bound term"),
])
def test_fold_is_refused_where_it_is_not_defined(flags, match):
    with pytest.raises(ValueError, match=match):
        validate_training_args({**flags, "fold_weighting": True})
    validate_training_args({**flags, "fold_weighting": False})  # the same flags unfolded are fine


def test_fold_weighting_is_a_run_defining_flag_off_by_default():
    assert training_defaults()["fold_weighting"] is False
    assert "fold_weighting" in run_defining_flags(training_defaults())


def test_a_folded_run_trains_resumes_and_records_its_sampler(tmp_path, repo_root):
    """Through image_train's flags: 3 steps, stopped after 2, resumed: the same weights as 3 in a row."""
    flags = ["--config", str(repo_root / "configs" / "smoke" / "tiny.yaml"), "--schedule_sampler", "logit_normal",
             "--loss_weighting", "flow", "--fold_weighting", "True", "--learn_sigma", "False", "--dropout", "0",
             "--total_steps", "3", "--save_interval", "1"]
    train(flags + ["--log_dir", str(tmp_path / "straight")])
    train(flags + ["--log_dir", str(tmp_path / "stopped"), "--stop_at", "2"])
    train(flags + ["--log_dir", str(tmp_path / "stopped")])
    state = torch.load(tmp_path / "stopped" / "state000003.pt", weights_only=True)
    assert state["sampler"]["sampler"] == "folded:logit_normal"
    a = torch.load(tmp_path / "straight" / "model000003.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "model000003.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fold_of_a_learned_variance_diffusion_is_refused_by_the_sampler_too():
    """Built directly (not through the flags), the fold still sees the diffusion's vb term and refuses."""
    learned = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("cosine", 1000),
                                   model_mean_type=gd.ModelMeanType.EPSILON,
                                   model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)
    with pytest.raises(ValueError, match="--learn_sigma True"):
        FoldedSampler(create_named_schedule_sampler("edm_lognormal", learned, seed=0),
                      loss_weighting("edm", learned), "edm")
