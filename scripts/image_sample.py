"""
Generate a large batch of image samples from a model and save them as a large numpy array
(``samples_{N}x{H}x{W}x3.npz``), which the evaluator reads.

Upstream's ``scripts/image_sample.py`` flags, plus ``--seed`` (fixes every draw: the same seed
gives the same images for any batch size or number of ranks), ``--run_dir``/``--step``/
``--ema_rate``/``--use_ema`` to pick a checkpoint of a run, ``--config``, ``--grid``, ``--out_dir``,
``--overwrite``. Model flags not given come from the ``config.yaml`` beside the checkpoint.

The npz goes to ``--out_dir``, else ``$OPENAI_LOGDIR`` (as upstream, whose ``logger.configure()``
logs there), else a folder naming the checkpoint: ``<run>/samples/<checkpoint stem>/``, e.g.
``runs/x/samples/ema_0.9999_100000/samples_64x32x32x3.npz``. An existing samples file is never
replaced unless ``--overwrite True``: the run stops before sampling and names the file.

    python scripts/image_sample.py --model_path runs/x/ema_0.9999_100000.pt --num_samples 64 \
        --use_ddim True --timestep_respacing ddim50 --grid runs/x/grid.png
    mpiexec -n 8 python scripts/image_sample.py --run_dir runs/x --num_samples 50000 --batch_size 256
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence


from guided_diffusion import logger
from guided_diffusion.sample_util import check_samples_file, finish_sampling, generate_samples, sample_defaults, \
    start_sampling
from guided_diffusion.script_util import run_script
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def create_argparser_defaults() -> Dict[str, Any]:
    defaults = sample_defaults()
    defaults.update(model_and_diffusion_defaults())
    return defaults


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """
    Sample as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the npz path (rank 0), else None.
    """
    args, _, checkpoint, model, diffusion, flags = start_sampling(
        create_argparser_defaults(), model_and_diffusion_defaults(), create_model_and_diffusion, argv,
        description=" ".join(__doc__.split("\n\n")[0].split()))
    check_samples_file(args, args.num_samples, flags["image_size"])  # refuse an overwrite before sampling
    logger.log(f"sampling {args.num_samples} images ({'DDIM' if args.use_ddim else 'DDPM'}, "
               f"{diffusion.num_timesteps} steps, seed {args.seed})...")
    images, labels = generate_samples(
        model, diffusion,
        num_samples=args.num_samples, batch_size=args.batch_size, image_size=flags["image_size"],
        class_cond=flags["class_cond"], num_classes=flags["num_classes"], use_ddim=args.use_ddim, eta=args.eta,
        clip_denoised=args.clip_denoised, seed=args.seed, progress=args.progress,
        precision=args.sample_precision,
    )
    return finish_sampling(args, checkpoint, images, labels)


if __name__ == "__main__":
    run_script(main)
