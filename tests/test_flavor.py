"""
``--flavor improved|guided``: a user of either upstream codebase who passes its README's flags
builds the model and diffusion that codebase builds (issue "Improved-Diffusion users get
Improved-Diffusion").
"""
import shlex
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402
from guided_diffusion import gaussian_diffusion as gd  # noqa: E402
from guided_diffusion.model_loading import resolve_model_flags  # noqa: E402
from guided_diffusion.config import apply_flavor  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

# openai/improved-diffusion improved_diffusion/script_util.py: model_and_diffusion_defaults()
IMPROVED_UPSTREAM = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                         attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
                         class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                         use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
                         use_checkpoint=False, use_scale_shift_norm=True)
# openai/guided-diffusion guided_diffusion/script_util.py: model_and_diffusion_defaults()
GUIDED_UPSTREAM = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                       num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                       class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                       use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
                       noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
                       rescale_timesteps=False, rescale_learned_sigmas=False)
# the flag lines of each upstream README
IMPROVED_CIFAR = ("--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                  "--diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128")
IMPROVED_IN64 = ("--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                 "--diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128")
GUIDED_IN128 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
                "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
                "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")


def _flags_of(line):
    toks = shlex.split(line)
    return {toks[i][2:]: toks[i + 1] for i in range(0, len(toks), 2)}


@pytest.mark.parametrize("flavor,upstream,line", [
    ("improved", IMPROVED_UPSTREAM, IMPROVED_CIFAR),
    ("improved", IMPROVED_UPSTREAM, IMPROVED_IN64),
    ("guided", GUIDED_UPSTREAM, GUIDED_IN128),
])
def test_readme_flag_lines_resolve_to_upstream_values(flavor, upstream, line):
    args = image_train.parse_args(["--flavor", flavor] + shlex.split(line))
    given = _flags_of(line)
    for key, default in upstream.items():
        value = getattr(args, key)
        if key in given:
            assert str(value) == given[key] or value == type(value)(given[key]), (key, value, given[key])
        else:
            assert value == default, (flavor, key, value, default)
    assert args.random_flip is (flavor == "guided")  # improved-diffusion's loader never flips


def test_improved_face_defaults_are_upstreams_and_the_flavors():
    # one owner: improved_diffusion.script_util derives its defaults from guided-diffusion's and
    # config.FLAVORS["improved"]; both faces give upstream improved-diffusion's values
    import improved_diffusion.script_util as isu

    assert isu.model_and_diffusion_defaults() == IMPROVED_UPSTREAM
    flavored = apply_flavor(model_and_diffusion_defaults(), "improved")
    assert {k: flavored[k] for k in IMPROVED_UPSTREAM} == IMPROVED_UPSTREAM
    assert isu.sr_model_and_diffusion_defaults() == dict(
        {k: v for k, v in IMPROVED_UPSTREAM.items() if k not in ("image_size", "sigma_small")},
        large_size=256, small_size=64)


def test_improved_flags_without_the_flavor_differ_silently_as_before():
    # what a user got before --flavor existed: the network saw t in 0..3999
    plain = image_train.parse_args(shlex.split(IMPROVED_CIFAR))
    assert plain.rescale_timesteps is False and plain.flavor == "guided"
    improved = image_train.parse_args(["--flavor", "improved"] + shlex.split(IMPROVED_CIFAR))
    keys = model_and_diffusion_defaults()
    _, diffusion = create_model_and_diffusion(**{k: getattr(improved, k) for k in keys})
    assert diffusion.rescale_timesteps and diffusion.num_timesteps == 4000
    assert diffusion.loss_type == gd.LossType.RESCALED_MSE
    # the network's timestep input is rescaled to 0..1000 as upstream improved-diffusion
    seen = []
    wrapped = diffusion._wrap_model(lambda x, ts, **kw: seen.append(ts) or x)
    wrapped(torch.zeros(1, 3, 2, 2), torch.tensor([3999]))
    assert float(seen[0]) == pytest.approx(3999 * 1000.0 / 4000)


def test_sigma_small_is_accepted():
    args = image_train.parse_args(["--flavor", "improved", "--sigma_small", "True"])
    keys = model_and_diffusion_defaults()
    _, diffusion = create_model_and_diffusion(**{k: getattr(args, k) for k in keys})
    assert diffusion.model_var_type == gd.ModelVarType.FIXED_SMALL


def test_bad_flavor_is_named():
    with pytest.raises(ValueError, match="--flavor: expected one of guided, improved"):
        image_train.parse_args(["--flavor", "improve"])


def test_cifar_configs_are_improved_and_recorded(tmp_path, capsys):
    image_train.main(["--config", str(REPO / "configs/cifar10/clts.yaml"), "--print_config", "True"])
    out = capsys.readouterr().out
    assert "flavor: improved" in out and "rescale_timesteps: true" in out


def test_bare_upstream_checkpoint_takes_the_flavor(tmp_path):
    ckpt = tmp_path / "model.pt"  # no config.yaml beside it, like a downloaded upstream checkpoint
    ckpt.write_bytes(b"")
    flags, source = resolve_model_flags(ckpt, None, flavor="improved")
    assert flags["rescale_timesteps"] and flags["rescale_learned_sigmas"] and "improved" in source
    flags, _ = resolve_model_flags(ckpt, "--flavor improved --diffusion_steps 4000")
    assert flags["rescale_timesteps"] and flags["diffusion_steps"] == 4000
    flags, _ = resolve_model_flags(ckpt, None)
    assert not flags["rescale_timesteps"]
    # a run's config.yaml records its flavour
    (tmp_path / "config.yaml").write_text("flavor: improved\nimage_size: 32\n")
    flags, _ = resolve_model_flags(ckpt, None)
    assert flags["rescale_timesteps"] and flags["image_size"] == 32
