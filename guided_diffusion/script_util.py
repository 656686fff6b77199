"""
Defaults dictionaries and model/diffusion factories (upstream's names). The argparse +
config-file flow lives in ``config``; its names are re-exported here, as upstream has them here.

Public names and keyword sets follow OpenAI's guided-diffusion ``script_util`` so that its
scripts and checkpoints work unchanged; ``improved_diffusion.script_util`` wraps these with
Improved-Diffusion's defaults.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict

from . import fdm as _fdm
from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000  # ImageNet; the default of the `num_classes` flag

# Channel multipliers upstream picks from the image size (resolution in pixels), one table per
# upstream codebase and model kind; every factory (both faces) reads them from here.
CHANNEL_MULT: Dict[str, Dict[int, tuple]] = {
    "guided": {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),  # Improved-Diffusion's CIFAR-10 multipliers (guided-diffusion has none for 32)
    },
    "guided_super_res": {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)},
    # Improved-Diffusion has multipliers for these sizes only, for image and super-resolution models alike
    "improved": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
}


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
        channel_mult=channel_mult_for(image_size, channel_mult, CHANNEL_MULT["guided"]),
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
        channel_mult=channel_mult_for(image_size, "", CHANNEL_MULT["guided"]),
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
        channel_mult=channel_mult_for(large_size, channel_mult, CHANNEL_MULT["guided_super_res"], "large_size"),
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


# upstream's argparse helpers and the configuration flow live in ``config``; their names stay here
from .config import (  # noqa: E402,F401  (re-exported: upstream's names and their old home)
    CONFIG_BASE_KEY,
    DEFAULT_FLAVOR,
    FLAVORS,
    FlagSuggestingParser,
    add_dict_to_argparser,
    apply_flavor,
    args_to_dict,
    check_flavor,
    coerce_config,
    is_number,
    load_config,
    parse_args_with_config,
    run_script,
    str2bool,
    suggest_flags,
    with_flag_suggestions,
)
