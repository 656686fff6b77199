"""script_util: upstream keyword sets, defaults, channel multipliers, config files and the two faces."""
import argparse
import inspect

import pytest

import guided_diffusion.script_util as gsu
import improved_diffusion.script_util as isu


def test_guided_defaults_match_create_signature():
    # Every default is a keyword of the factory and vice versa (upstream's contract).
    params = set(inspect.signature(gsu.create_model_and_diffusion).parameters)
    assert set(gsu.model_and_diffusion_defaults()) == params
    cparams = set(inspect.signature(gsu.create_classifier_and_diffusion).parameters)
    assert set(gsu.classifier_and_diffusion_defaults()) == cparams
    srparams = set(inspect.signature(gsu.sr_create_model_and_diffusion).parameters)
    assert set(gsu.sr_model_and_diffusion_defaults()) == srparams


def test_improved_keyword_set_is_upstreams():
    expected = {
        "image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
        "attention_resolutions", "dropout", "learn_sigma", "sigma_small", "class_cond",
        "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
        "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint", "use_scale_shift_norm",
    }
    d = isu.model_and_diffusion_defaults()
    assert set(d) == expected
    assert set(inspect.signature(isu.create_model_and_diffusion).parameters) == expected
    assert d["rescale_timesteps"] and d["rescale_learned_sigmas"] and d["use_scale_shift_norm"]
    assert d["attention_resolutions"] == "16,8" and d["num_heads"] == 4


def test_shared_modules_are_the_same_objects():
    import guided_diffusion.gaussian_diffusion
    import guided_diffusion.respace
    import improved_diffusion.gaussian_diffusion
    import improved_diffusion.respace
    from improved_diffusion import unet as iunet
    from guided_diffusion import unet as gunet

    assert improved_diffusion.gaussian_diffusion is guided_diffusion.gaussian_diffusion
    assert improved_diffusion.respace is guided_diffusion.respace
    assert iunet is gunet


@pytest.mark.parametrize("size,mult", [(32, (1, 2, 2, 2)), (64, (1, 2, 3, 4)), (128, (1, 1, 2, 3, 4)), (256, (1, 1, 2, 2, 4, 4))])
def test_guided_channel_mult_by_size(size, mult):
    assert gsu.channel_mult_for(size, "", gsu.CHANNEL_MULT["guided"]) == mult


def test_improved_has_no_128_multipliers():
    with pytest.raises(ValueError, match="image_size 128"):
        isu.create_model(128, 32, 1, False, False, False, "16", 1, -1, True, 0.0)


def test_attention_resolutions_to_downsample_rates():
    assert gsu.attention_downsample_rates(128, "32,16,8") == (4, 8, 16)
    assert gsu.attention_downsample_rates(32, "16,8") == (2, 4)
    assert gsu.attention_downsample_rates(32, "") == ()
    with pytest.raises(ValueError, match="attention_resolutions"):
        gsu.attention_downsample_rates(32, "12")
    with pytest.raises(ValueError, match="channel_mult"):
        gsu.channel_mult_for(32, "1,x", gsu.CHANNEL_MULT["guided"])


def test_create_gaussian_diffusion_types():
    from guided_diffusion import gaussian_diffusion as gd

    d = gsu.create_gaussian_diffusion(steps=100, learn_sigma=True, rescale_learned_sigmas=True)
    assert d.model_var_type == gd.ModelVarType.LEARNED_RANGE and d.loss_type == gd.LossType.RESCALED_MSE
    d = gsu.create_gaussian_diffusion(steps=100, sigma_small=True, use_kl=True, predict_xstart=True)
    assert d.model_var_type == gd.ModelVarType.FIXED_SMALL and d.loss_type == gd.LossType.RESCALED_KL
    assert d.model_mean_type == gd.ModelMeanType.START_X
    d = gsu.create_gaussian_diffusion(steps=100, timestep_respacing="10")
    assert d.num_timesteps == 10


def test_tiny_models_build_and_run():
    import torch

    args = gsu.model_and_diffusion_defaults()
    args.update(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                class_cond=True, num_classes=10, learn_sigma=True, diffusion_steps=50)
    model, diffusion = gsu.create_model_and_diffusion(**args)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 5]), y=torch.tensor([0, 9]))
    assert out.shape == (2, 6, 32, 32)
    assert model.label_emb.weight.shape[0] == 10


def test_add_dict_to_argparser_types():
    p = argparse.ArgumentParser()
    gsu.add_dict_to_argparser(p, dict(a=1, b=0.5, c="x", d=False, e=None))
    ns = p.parse_args(["--a", "3", "--b", "2", "--d", "True", "--e", "z"])
    assert (ns.a, ns.b, ns.c, ns.d, ns.e) == (3, 2.0, "x", True, "z")
    assert gsu.args_to_dict(ns, ["a", "d"]) == {"a": 3, "d": True}
    with pytest.raises(SystemExit):
        p.parse_args(["--d", "maybe"])


def test_config_file_precedence_and_types(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.0002\nema_rate: 0.9999\nuse_fp16: true\nbatch_size: 64\nchannel_mult: 1,2,2\n")
    defaults = dict(lr=1e-4, ema_rate="0.9999", use_fp16=False, batch_size=1, channel_mult="")
    ns = gsu.parse_args_with_config(defaults, ["--config", str(cfg), "--batch_size", "8"])
    assert ns.lr == 2e-4 and ns.ema_rate == "0.9999" and ns.use_fp16 is True
    assert ns.batch_size == 8  # the command line wins over the file
    assert ns.channel_mult == "1,2,2" and ns.config == str(cfg)


def test_config_unknown_key_lists_valid_keys(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ValueError) as e:
        gsu.parse_args_with_config(dict(lr=1e-4, batch_size=1), ["--config", str(cfg)])
    msg = str(e.value)
    assert "learning_rate" in msg and "Valid keys: batch_size, lr" in msg and str(cfg) in msg


def test_config_bad_value_and_missing_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batch_size: many\n")
    with pytest.raises(ValueError, match="batch_size.*int"):
        gsu.parse_args_with_config(dict(batch_size=1), ["--config", str(cfg)])
    with pytest.raises(FileNotFoundError, match="--config"):
        gsu.parse_args_with_config(dict(batch_size=1), ["--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        gsu.load_config(tmp_path / "list.yaml")


# issue 31 item 5 (1): a boolean flag also takes the bare form (--flag alone means True)
def test_bare_boolean_flag_means_true():
    p = argparse.ArgumentParser()
    gsu.add_dict_to_argparser(p, dict(a=1, d=False, e=True))
    assert p.parse_args(["--d"]).d is True
    ns = p.parse_args(["--d", "--a", "3"])  # followed by another flag
    assert (ns.d, ns.a, ns.e) == (True, 3, True)
    assert p.parse_args(["--e", "False", "--d"]).e is False  # the explicit form still works
    assert p.parse_args(["--d", "false"]).d is False and p.parse_args(["--d=yes"]).d is True
    assert p.parse_args(["--a", "2"]).d is False  # absent: the default
    with pytest.raises(SystemExit):
        p.parse_args(["--d", "maybe"])


def test_bare_boolean_flag_does_not_swallow_a_positional():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", nargs="?", default=None)
    ns = gsu.parse_args_with_config(dict(keep=False, progress=True, n=1), ["--keep", "runs/x", "--n", "2"],
                                    parser=parser)
    assert (ns.keep, ns.run_dir, ns.n, ns.progress) == (True, "runs/x", 2, True)
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", nargs="?", default=None)
    ns = gsu.parse_args_with_config(dict(keep=False, progress=True), ["--keep", "no", "--progress", "runs/x"],
                                    parser=parser)
    assert (ns.keep, ns.progress, ns.run_dir) == (False, True, "runs/x")
    from guided_diffusion.config import expand_bare_bool_flags

    assert expand_bare_bool_flags(parser, ["--keep", "x", "--", "--progress", "y"]) == \
        ["--keep", "True", "x", "--", "--progress", "y"]


def test_scripts_take_bare_boolean_flags(capsys):
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    import fid_curve
    import image_train

    # fid_curve.py's RUN_DIR positional after a bare flag, and before one
    for argv in (["--keep_samples", "runs/x"], ["runs/x", "--keep_samples"], ["--keep_samples", "--progress", "False",
                                                                               "runs/x"]):
        args = fid_curve.parse_args(argv)
        assert (args.run_dir, args.keep_samples) == ("runs/x", True), argv
    assert fid_curve.parse_args(["--progress", "False", "runs/x"]).progress is False
    # --print_config alone (it used to need a value: "expected one argument")
    capsys.readouterr()
    assert image_train.main(["--print_config", "--batch_size", "2"]) == ""
    assert "batch_size: 2" in capsys.readouterr().out
    # a --model_flags string in upstream syntax takes the bare form too
    from guided_diffusion.model_loading import parse_model_flags

    flags = parse_model_flags("--learn_sigma --num_channels 64 --use_fp16 False", gsu.model_and_diffusion_defaults())
    assert flags == {"learn_sigma": True, "num_channels": 64, "use_fp16": False}
