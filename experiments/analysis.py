"""
The paper's analyses (Xu et al. 2024, section 3), one module each, re-exported here under the
names the scripts and earlier users import (``from experiments import analysis as an``):

- ``experiments.consistency``: PSNR (per image, pooled: Eq. 1), the consistency table, samples of
  several models from the same noise, the predicted x_0 along the reverse process (Fig. 9);
  ``experiments.shared_noise``: the noise those samples share.
- ``experiments.hessian``: Hessian-vector products, power iteration, Lanczos, Hutchinson, SLQ (Fig. 3).
- ``experiments.landscape``: the loss along the line between two checkpoints (Fig. 4);
  ``experiments.objectives``: the losses both measure (fixed batch, GAN generator loss).
- ``experiments.common``: what the analysis scripts share (device, output folder, checkpoint
  selection with DCGAN runs, CSV rows).
- The library's checkpoint loaders (``guided_diffusion.model_loading``), as the scripts use them.

New code imports the module of its analysis; this module adds nothing of its own.
"""
from __future__ import annotations

# ruff: noqa: F401 - every name below is a re-export
from experiments.common import (
    checkpoint_kind,
    config_data_dir,
    default_out_dir,
    load_gan_model,
    pick_device,
    resolve_checkpoint,
    resolve_checkpoint_args,
    write_csv,
)
from experiments.consistency import (
    PSNR_CAP_DB,
    ConsistencyResult,
    PairPSNR,
    consistency,
    diffusion_sample_images,
    evenly_spaced_steps,
    gan_sample_images,
    has_zero_output_layer,
    image_grid,
    pairwise_psnr,
    pooled_psnr,
    predicted_xstart_trajectory,
    psnr,
    save_grid_png,
    to_uint8,
)
from experiments.hessian import (
    HVP,
    HessianVectorProduct,
    LanczosResult,
    PowerIterationResult,
    SpectralDensity,
    TraceEstimate,
    flatten,
    hessian_analysis,
    hutchinson_trace,
    lanczos,
    lanczos_top_eigenvalues,
    math_attention,
    power_iteration,
    stochastic_lanczos_quadrature,
    unflatten,
)
from experiments.landscape import GAN_LANDSCAPE_LOSS, gan_loss_along_line, loss_along_line, parse_alphas
from experiments.objectives import (
    FixedBatch,
    add_gan_batchnorm_flag,
    diffusion_loss,
    gan_generator_loss,
    interpolate_state_dicts,
    load_fixed_batch,
    make_fixed_batch,
    stratified_timesteps,
)
from experiments.shared_noise import SharedNoise, final_sample, sample_with_shared_noise, seed_labels
from guided_diffusion.checkpoint import load_into, load_state_dict_file
from guided_diffusion.model_loading import (
    ANALYSIS_OVERRIDES,
    CHECKPOINT_COUNTS,
    add_checkpoint_args,
    load_diffusion_model,
    parse_model_flags,
    parse_step_list,
    resolve_model_flags,
)
