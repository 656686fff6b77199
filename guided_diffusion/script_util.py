"""
Defaults dictionaries, model/diffusion factories and the argparse + config-file flow.

Public names and keyword sets follow OpenAI's guided-diffusion ``script_util`` so that its
scripts and checkpoints work unchanged; ``improved_diffusion.script_util`` wraps these with
Improved-Diffusion's defaults.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from . import dist_util
from . import fdm as _fdm
from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000  # ImageNet; the default of the `num_classes` flag

# Channel multipliers upstream picks from the image size (resolution in pixels).
_GUIDED_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),  # Improved-Diffusion's CIFAR-10 multipliers (guided-diffusion has none for 32)
}
_SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def diffusion_defaults() -> Dict[str, Any]:
    """Defaults for image and classifier training (guided-diffusion)."""
    return dict(
        learn_sigma=False,
        sigma_small=False,  # Improved-Diffusion's flag (guided-diffusion's factory has it but no flag)
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def fdm_defaults() -> Dict[str, Any]:
    """
    FDM's flags (Fast Diffusion Model, Wu et al. 2023; ``guided_diffusion.fdm``), part of the
    model-and-diffusion flags: they change what the model is fed, so a checkpoint samples only
    with them (config.yaml records them) and a resume may not change them. Off by default.
    The warm-up's ``fdm_warmup_steps`` is a training flag (``options.training_defaults``).
    """
    return dict(
        fdm=False,
        fdm_multiplier=_fdm.DEFAULT_MULTIPLIER,  # sail-sg/FDM train.py --fdm_multiplier default
        fdm_sigma_range=_fdm.DEFAULT_SIGMA_RANGE,  # vp | schedule: sigma_min/sigma_max of s(sigma)
    )


def classifier_defaults() -> Dict[str, Any]:
    """Defaults for the noisy-image classifier."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for image training (guided-diffusion), plus ``num_classes``."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        num_classes=NUM_CLASSES,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    res.update(fdm_defaults())
    return res


def classifier_and_diffusion_defaults() -> Dict[str, Any]:
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def channel_mult_for(image_size: int, channel_mult: str, table: Dict[int, tuple], flag: str = "image_size"):
    """``--channel_mult`` parsed, else upstream's multipliers for ``image_size`` from ``table``."""
    if channel_mult:
        try:
            return tuple(float(m) if "." in m else int(m) for m in str(channel_mult).split(","))
        except ValueError:
            raise ValueError(f"--channel_mult: expected comma-separated numbers, got {channel_mult!r}") from None
    if image_size not in table:
        raise ValueError(
            f"--{flag} {image_size}: no default channel multipliers for this size "
            f"(known: {sorted(table)}); give --channel_mult explicitly"
        )
    return table[image_size]


def attention_downsample_rates(image_size: int, attention_resolutions: str, flag: str = "attention_resolutions"):
    """Upstream gives attention resolutions in pixels; the UNet wants downsample rates."""
    text = str(attention_resolutions).strip()
    if not text:
        return ()
    try:
        resolutions = [int(r) for r in text.split(",")]
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated resolutions, got {attention_resolutions!r}") from None
    for r in resolutions:
        if r <= 0 or image_size % r:
            raise ValueError(f"--{flag}: resolution {r} does not divide the image size {image_size}")
    return tuple(image_size // r for r in resolutions)


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
    sigma_small=False,
    fdm=False,
    fdm_multiplier=_fdm.DEFAULT_MULTIPLIER,
    fdm_sigma_range=_fdm.DEFAULT_SIGMA_RANGE,
):
    """
    Build a UNet and its (possibly re-spaced) Gaussian diffusion, as upstream
    (``fdm*``: FDM's input preconditioning, see ``fdm_defaults``).

    :return: a tuple ``(model, diffusion)``.
    """
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        fdm=fdm,
        fdm_multiplier=fdm_multiplier,
        fdm_sigma_range=fdm_sigma_range,
    )
    return model, diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
):
    """
    Build a ``UNetModel`` from upstream's flags.

    :param image_size: side length in pixels.
    :param attention_resolutions: comma-separated feature-map sizes (pixels) that get attention.
    :param num_classes: number of class labels when ``class_cond`` (1000 for ImageNet).
    """
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(image_size, attention_resolutions),
        dropout=dropout,
        channel_mult=channel_mult_for(image_size, channel_mult, _GUIDED_CHANNEL_MULT),
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    sigma_small=False,
):
    """Build the noisy-image classifier and its diffusion, as upstream."""
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
):
    """Build an ``EncoderUNetModel`` classifier (upstream: 1000 classes, 64 channels per head)."""
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_downsample_rates(
            image_size, classifier_attention_resolutions, "classifier_attention_resolutions"
        ),
        channel_mult=channel_mult_for(image_size, "", _GUIDED_CHANNEL_MULT),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for super-resolution training: the image defaults with large/small sizes."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion)[0]
    for k in list(res):
        if k not in arg_names:
            del res[k]
    return res


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    sigma_small=False,
    fdm=False,
    fdm_multiplier=_fdm.DEFAULT_MULTIPLIER,
    fdm_sigma_range=_fdm.DEFAULT_SIGMA_RANGE,
):
    """Build a ``SuperResModel`` and its diffusion, as upstream (``fdm*``: see ``fdm_defaults``)."""
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        fdm=fdm,
        fdm_multiplier=fdm_multiplier,
        fdm_sigma_range=fdm_sigma_range,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
    channel_mult="",
):
    """
    Build a ``SuperResModel`` (``small_size`` only documents the low-resolution input).

    :param channel_mult: comma-separated multipliers; "" takes upstream's for ``large_size``.
    """
    del small_size  # the low-resolution input is upsampled to large_size inside the model
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(6 if learn_sigma else 3),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(large_size, attention_resolutions),
        dropout=dropout,
        channel_mult=channel_mult_for(large_size, channel_mult, _SR_CHANNEL_MULT, "large_size"),
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    fdm=False,
    fdm_multiplier=_fdm.DEFAULT_MULTIPLIER,
    fdm_sigma_range=_fdm.DEFAULT_SIGMA_RANGE,
):
    """
    Build a (re-spaced) ``GaussianDiffusion`` from upstream's flags.

    :param steps: number of diffusion steps T.
    :param timestep_respacing: "" for all T steps, "ddimN" or comma-separated section counts.
    :param fdm: FDM's input preconditioning (``fdm_multiplier``, ``fdm_sigma_range``), for
                every step of the base process and, re-spaced, at the kept steps.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON),
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        fdm=fdm,
        fdm_multiplier=fdm_multiplier,
        fdm_sigma_range=fdm_sigma_range,
    )


# --------------------------------------------------------------------------------------
# argparse and configuration files
# --------------------------------------------------------------------------------------


def str2bool(v) -> bool:
    """Parse a boolean flag value (https://stackoverflow.com/questions/15008758 style)."""
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("yes", "true", "t", "y", "1"):
        return True
    if str(v).lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def _flag_type(default):
    if default is None:
        return str
    if isinstance(default, bool):
        return str2bool
    return type(default)


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict[str, Any]) -> None:
    """Add one ``--key`` flag per entry, typed like its default (bools via ``str2bool``)."""
    for k, v in default_dict.items():
        parser.add_argument(f"--{k}", default=v, type=_flag_type(v))


def args_to_dict(args, keys: Iterable[str]) -> Dict[str, Any]:
    """Pick ``keys`` out of an argparse namespace (or a dict) into a plain dict."""
    if isinstance(args, dict):
        return {k: args[k] for k in keys}
    return {k: getattr(args, k) for k in keys}


# --flavor: which upstream codebase's defaults a script starts from. Guided-Diffusion's are this
# module's; Improved-Diffusion's differ in these keys (its script_util and image_datasets):
# the network sees t rescaled to 0..1000, the learned-sigma VB term is rescaled, and its loader
# does not flip images. Values given by a config file or the command line still win.
FLAVORS: Dict[str, Dict[str, Any]] = {
    "guided": {},
    "improved": {"rescale_timesteps": True, "rescale_learned_sigmas": True, "sigma_small": False,
                 "random_flip": False},
}
DEFAULT_FLAVOR = "guided"
# a defaults dict with these keys builds a diffusion model, so its script takes --flavor
_MODEL_KEYS = ("rescale_timesteps", "rescale_learned_sigmas")


def check_flavor(flavor: Any, source: str = "--flavor") -> str:
    """Validate a flavour name; the message names ``source`` and the choices."""
    name = str(flavor).strip().lower()
    if name not in FLAVORS:
        raise ValueError(f"{source}: expected one of {', '.join(FLAVORS)}, got {flavor!r}")
    return name


def apply_flavor(defaults: Dict[str, Any], flavor: str) -> Dict[str, Any]:
    """
    ``defaults`` with the upstream codebase's own defaults for the keys it has.

    :param flavor: "guided" (unchanged) or "improved" (Improved-Diffusion's defaults).
    """
    out = dict(defaults)
    out.update({k: v for k, v in FLAVORS[check_flavor(flavor)].items() if k in out})
    if "flavor" in out:
        out["flavor"] = check_flavor(flavor)
    return out


def _preparse_flavor(argv: Sequence[str], config_values: Dict[str, Any]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--flavor", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.flavor is not None:
        return check_flavor(known.flavor)
    if "flavor" in config_values:
        return check_flavor(config_values["flavor"], "--config: flavor")
    return DEFAULT_FLAVOR


CONFIG_BASE_KEY = "base"


def load_config(path, _seen: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    """
    Read a YAML (or JSON) configuration file into a flat dict of flag values.

    A file may extend another with ``base: other.yaml`` (a path relative to the file): the base's
    values are read first (recursively) and the file's own keys override them, so a method's
    config states only the method's keys.

    :param path: the ``--config`` file.
    :raises FileNotFoundError / ValueError: naming the file and what was wrong.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        where = f" (the {CONFIG_BASE_KEY}: of {_seen[-1]})" if _seen else ""
        raise FileNotFoundError(f"--config: file not found: {path}{where}")
    seen = (_seen or ()) + (str(path.resolve()),)
    if len(set(seen)) < len(seen):
        raise ValueError(f"--config {path}: '{CONFIG_BASE_KEY}:' files form a cycle: {' -> '.join(seen)}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag: value, got {type(data).__name__}")
    base = data.pop(CONFIG_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"--config {path}: '{CONFIG_BASE_KEY}:' must be a file name, got {base!r}")
    merged = load_config(path.parent / base, seen)
    merged.update(data)
    return merged


def coerce_config(values: Dict[str, Any], defaults: Dict[str, Any], source: str) -> Dict[str, Any]:
    """
    Check a config's keys against ``defaults`` and convert each value to its flag's type.

    :param source: what to name in error messages (e.g. the config file).
    :raises ValueError: for unknown keys (listing the valid ones) or values of the wrong type.
    """
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(defaults))}"
        )
    out = {}
    for k, v in values.items():
        d = defaults[k]
        try:
            if v is None or d is None:
                out[k] = v
            elif isinstance(d, bool):
                out[k] = str2bool(v)
            elif isinstance(d, str):
                out[k] = "" if v is None else (",".join(str(x) for x in v) if isinstance(v, list) else str(v))
            elif isinstance(d, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
            elif isinstance(d, int) and isinstance(v, float) and v.is_integer():
                out[k] = int(v)
            else:
                out[k] = type(d)(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(
                f"{source}: key {k!r} expects a {type(d).__name__} (default {d!r}), got {v!r}"
            ) from None
    return out


def parse_args_with_config(
    defaults: Dict[str, Any],
    argv: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
    parser: Optional[argparse.ArgumentParser] = None,
) -> argparse.Namespace:
    """
    Upstream's defaults-dict -> argparse flow, plus ``--config FILE.yaml``.

    Precedence: command-line flags > config file > ``defaults``. The namespace gets
    ``args.config`` (the file, or "").

    :param defaults: flag name -> default value (its type types the flag).
    :param argv: arguments to parse (``sys.argv[1:]`` when None).
    :param parser: an existing parser to extend (for scripts with positional arguments).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    config_values = load_config(known.config) if known.config else {}
    if any(k in defaults for k in _MODEL_KEYS):
        # --flavor selects the upstream codebase's defaults; the config and the command line win over them
        defaults = apply_flavor(dict({"flavor": DEFAULT_FLAVOR}, **defaults),
                                _preparse_flavor(sys.argv[1:] if argv is None else argv, config_values))
    parser = with_flag_suggestions(parser or argparse.ArgumentParser(description=description))
    parser.add_argument("--config", default="", help="YAML file of flag values; command-line flags override it")
    add_dict_to_argparser(parser, defaults)
    if known.config:
        parser.set_defaults(**coerce_config(config_values, defaults, f"--config {known.config}"))
    args = parser.parse_args(argv)
    if "flavor" in defaults:
        args.flavor = check_flavor(args.flavor)
    # which flags the command line itself gave (a config file's values are defaults here)
    given = sys.argv[1:] if argv is None else list(argv)
    args.command_line_flags = sorted({a[2:].split("=", 1)[0] for a in given if a.startswith("--")} & set(defaults))
    return args


# --------------------------------------------------------------------------------------
# short argparse errors: an unknown flag names the closest valid ones
# --------------------------------------------------------------------------------------

_ARGPARSE_PARSE_ARGS = argparse.ArgumentParser.parse_args
_ARGPARSE_ERROR = argparse.ArgumentParser.error


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def suggest_flags(flag: str, valid: Iterable[str], n: int = 3) -> list:
    """
    The valid flags closest to an unknown one: near spellings (difflib), the initials of its
    words (``--learning_rate`` -> ``--lr``, first) and, for names of four letters or more, containment.

    :param flag: the unknown flag as typed (``--lerning_rate``, ``-lr``, ``--save-interval``).
    :param valid: the parser's option strings; only ``--long`` ones other than ``--help`` are offered.
    :return: at most ``n`` flags, closest first.
    """
    import difflib

    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    names = {v[2:]: v for v in valid if v.startswith("--") and v != "--help"}
    if name in names:  # "-lr" for "--lr"
        return [names[name]]
    out = [c for c in sorted(names)
           if ("_" in name and _initials(name) == c) or ("_" in c and _initials(c) == name)]
    out += difflib.get_close_matches(name, list(names), n=n, cutoff=0.7)
    if len(name) >= 4:
        out += [c for c in sorted(names, key=len) if len(c) >= 4 and (name in c or c in name)]
    return [names[c] for c in dict.fromkeys(out)][:n]


def _help_hint(parser: argparse.ArgumentParser) -> str:
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if parser.prog == "__main__.py":  # python -m something
        return "--help lists all"
    if script.endswith(".py") and Path(script).name == parser.prog:
        import os

        rel = os.path.relpath(script) if os.path.isabs(script) else script
        return f"python {script if rel.startswith('..') else rel} --help lists all"
    return f"{parser.prog} --help lists all"


def _short_error(parser: argparse.ArgumentParser, message: str) -> None:
    if not getattr(parser, "exit_on_error", True):
        _ARGPARSE_ERROR(parser, message)
    parser.exit(2, f"{parser.prog}: error: {message} ({_help_hint(parser)})\n")


def _unknown_flags_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    flags = [a for a in extras if a.startswith("-") and a not in ("-", "--") and not is_number(a)]
    if not flags:
        return f"unrecognized arguments: {' '.join(extras)}"
    valid = list(parser._option_string_actions)
    named = []
    for a in flags:
        name = a.split("=", 1)[0]
        close = suggest_flags(name, valid)
        named.append((name, f"did you mean {' or '.join(close)}?" if close else ""))
    if len(named) == 1:
        name, hint = named[0]
        return f"{name}: unknown flag" + (f"; {hint}" if hint else "")
    return "unknown flags " + ", ".join(f"{name} ({hint})" if hint else name for name, hint in named)


def is_number(text: str) -> bool:
    """True when ``text`` parses as a float (``"1e-4"``, ``"-3"``, ``"nan"``)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_args_suggesting(self, args=None, namespace=None):
    if not getattr(self, "exit_on_error", True):
        return _ARGPARSE_PARSE_ARGS(self, args, namespace)
    namespace, extras = self.parse_known_args(args, namespace)
    if extras:
        _short_error(self, _unknown_flags_message(self, extras))
    return namespace


class FlagSuggestingParser(argparse.ArgumentParser):
    """
    An ``ArgumentParser`` whose errors are one line, without the usage: an unknown flag is named
    with the closest valid flags (``--lerning_rate: unknown flag; did you mean --lr?``), other
    errors keep argparse's message; both point at ``--help`` and exit with status 2.
    """

    parse_args = _parse_args_suggesting

    def error(self, message):
        _short_error(self, message)


def with_flag_suggestions(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``, made a FlagSuggestingParser when it is a plain ArgumentParser (a subclass is left as it is)."""
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = FlagSuggestingParser
    return parser


def _suggesting_error(self, message):
    _short_error(self, message)


class _FlagSuggestions:
    """While active, every ArgumentParser behaves like a FlagSuggestingParser (see ``run_script``)."""

    def __enter__(self):
        self.saved = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error)
        argparse.ArgumentParser.parse_args = _parse_args_suggesting
        argparse.ArgumentParser.error = _suggesting_error
        return self

    def __exit__(self, *exc):
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.error = self.saved
        return False


def run_script(
    main: Callable[[], Any],
    errors: Tuple[type, ...] = (ValueError, FileNotFoundError, FileExistsError),
    failures: Tuple[type, ...] = (),
) -> None:
    """
    Run a script's ``main()`` so that a bad flag, file or value ends it with its message instead
    of a traceback. While it runs, every argparse parser reports a bad flag in one line, naming
    an unknown flag's closest valid flags (``FlagSuggestingParser``), instead of printing the usage.

    Whatever ends it (success, a message, an interruption, an unexpected error with its
    traceback, argparse's exit), the process group is destroyed afterwards on every rank
    (``dist_util.teardown_dist``: a two-process run must not abort at exit). Under a launcher with
    several processes, the messages of errors every rank raises alike (flags, files, agreed stops)
    are printed by rank 0 alone instead of once per rank, interleaved; a traceback is printed by
    every rank that hits it.

    :param main: the script's entry point.
    :param errors: bad input: the message and exit status 2.
    :param failures: a run that went wrong (e.g. a diverged loss): the message and exit status 1.
    """
    import os
    import sys
    import traceback

    from .train_util import CheckpointWriteError, TrainingInterrupted

    name = os.path.basename(sys.argv[0])
    message, code, exits = None, 0, False
    # the exception is handled inside the except clauses and dropped there: its traceback holds the
    # frames of the training (the DDP wrapper and with it the process group) until then
    try:
        with _FlagSuggestions():
            main()
    except TrainingInterrupted as e:  # Ctrl-C / SIGTERM after a step: where to resume from, no traceback
        message, code = f"{name}: {e}", 128 + e.signum
    except KeyboardInterrupt:
        message, code = (f"{name}: interrupted (Ctrl-C); rerun the same command to resume from the last complete "
                         "checkpoint"), 130
    except CheckpointWriteError as e:
        message, code = f"{name}: error: {e}", 1
    except errors + failures as e:
        message, code = f"{name}: error: {e}", (1 if failures and isinstance(e, failures) else 2)
    except SystemExit as e:  # argparse's --help and one-line errors (already printed), an explicit sys.exit
        code, exits = e.code, True
    except BaseException:  # noqa: BLE001 - an unexpected error: its traceback, as Python prints it, then the same exit
        traceback.print_exc()
        code = 1
    if message is not None and (dist_util.launched_rank() == 0 or dist_util.launched_world_size() == 1):
        print(message, file=sys.stderr, flush=True)
    dist_util.teardown_dist()
    if code or exits:  # exits: a SystemExit goes on as it came, also with status 0 (--help)
        sys.exit(code)
