"""
Improved-Diffusion's face of the shared implementation.

Same factories as ``guided_diffusion.script_util`` with Improved-Diffusion's defaults and
keyword sets: ``sigma_small``, timestep rescaling, learned-sigma loss rescaling, the legacy
attention order, no up/down-sampling residual blocks, and its channel multipliers.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict

from guided_diffusion import script_util as _gd
from guided_diffusion.config import apply_flavor
from guided_diffusion.script_util import (  # noqa: F401  (upstream names, re-exported)
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    create_gaussian_diffusion,
    load_config,
    parse_args_with_config,
    str2bool,
)
from guided_diffusion.unet import SuperResModel  # noqa: F401  (upstream re-exports it here)

def _improved_defaults(guided: Dict[str, Any], factory) -> Dict[str, Any]:
    """
    Improved-Diffusion's defaults for ``factory``'s keywords, derived, not written again: the
    guided-diffusion defaults of those keywords (``guided_diffusion.script_util``, the one owner of
    the values) with the keys Improved-Diffusion's differ in (``config.FLAVORS["improved"]``).
    """
    params = inspect.signature(factory).parameters
    res = apply_flavor({k: v for k, v in guided.items() if k in params}, "improved")
    missing = [k for k in params if k not in res]
    assert not missing, f"no guided-diffusion default for {missing}"
    return res


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for image training (improved-diffusion): upstream's values, derived as ``_improved_defaults``."""
    return _improved_defaults(_gd.model_and_diffusion_defaults(), create_model_and_diffusion)


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    sigma_small,
    num_channels,
    num_res_blocks,
    num_heads,
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
):
    """Build an Improved-Diffusion UNet and diffusion: ``(model, diffusion)``."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
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
    return model, diffusion


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
):
    """Build an Improved-Diffusion ``UNetModel`` (legacy attention order, no resblock up/down)."""
    mult = _gd.channel_mult_for(image_size, "", _gd.CHANNEL_MULT["improved"])
    return _gd.create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=",".join(map(str, mult)),
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
    )


def sr_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for super-resolution training (improved-diffusion), derived as ``_improved_defaults``."""
    return _improved_defaults(_gd.sr_model_and_diffusion_defaults(), sr_create_model_and_diffusion)


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
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
):
    """Build an Improved-Diffusion ``SuperResModel`` and its diffusion."""
    model = sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma=learn_sigma,
                            class_cond=class_cond, use_checkpoint=use_checkpoint,
                            attention_resolutions=attention_resolutions, num_heads=num_heads,
                            num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
                            dropout=dropout)
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
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
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
):
    """Build an Improved-Diffusion ``SuperResModel`` (upstream's function of this name)."""
    mult = _gd.channel_mult_for(large_size, "", _gd.CHANNEL_MULT["improved"], "large_size")
    return _gd.sr_create_model(
        large_size, small_size, num_channels, num_res_blocks, learn_sigma=learn_sigma, class_cond=class_cond,
        use_checkpoint=use_checkpoint, attention_resolutions=attention_resolutions, num_heads=num_heads,
        num_head_channels=-1, num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout, resblock_updown=False, use_fp16=False, channel_mult=",".join(map(str, mult)))
