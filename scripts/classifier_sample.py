"""
Like image_sample.py, but use a noisy image classifier to guide the sampling process towards
more realistic images (classifier guidance, Dhariwal & Nichol 2021).

Upstream's ``scripts/classifier_sample.py`` flags (``--classifier_path``, ``--classifier_scale``,
model and classifier flags) plus image_sample.py's ``--seed``, ``--run_dir``/``--step``/
``--ema_rate``, ``--config``, ``--grid``, ``--out_dir``, ``--overwrite``. The guidance gradient is
``classifier_scale * grad_x log p(y | x_t)``; labels are drawn from the seed (class-conditional
models also get them as ``y``). Model and classifier flags not given come from the
``config.yaml`` beside each checkpoint. Outputs follow image_sample.py's rule, in a folder of their
own by default (``<run>/guided_samples/<checkpoint stem>/``, so that guided and unguided samples of a
checkpoint never collide).

    python scripts/classifier_sample.py --model_path runs/x/ema_0.9999_100000.pt \
        --classifier_path runs/clf/model050000.pt --classifier_scale 1.0 --num_samples 64
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence


import torch
import torch.nn.functional as F

from guided_diffusion import dist_util, logger
from guided_diffusion.sample_util import (
    check_samples_file,
    finish_sampling,
    generate_samples,
    load_checkpoint_model,
    sample_defaults,
    start_sampling,
)
from guided_diffusion.script_util import (
    classifier_and_diffusion_defaults,
    classifier_defaults,
    create_classifier_and_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def create_argparser_defaults() -> Dict[str, Any]:
    defaults = sample_defaults()
    defaults.update(classifier_path="", classifier_scale=1.0)
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    return defaults


def make_cond_fn(classifier: torch.nn.Module, scale: float) -> Callable[..., torch.Tensor]:
    """
    Upstream's guidance gradient: ``scale * d/dx log softmax(classifier(x, t))[y]``.

    :param classifier: the noisy-image classifier (eval mode).
    :param scale: ``--classifier_scale``.
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels y (they are drawn from --seed)")
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=x.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """
    Sample with classifier guidance as the flags say.

    :return: the npz path (rank 0), else None.
    """
    def validate(args):
        if not args.classifier_path:
            raise ValueError("--classifier_path is required (a classifier_train.py modelNNNNNN.pt)")

    args, given, checkpoint, model, diffusion, flags = start_sampling(
        create_argparser_defaults(), model_and_diffusion_defaults(), create_model_and_diffusion, argv,
        description=" ".join(__doc__.split("\n\n")[0].split()), validate=validate, kind="guided_samples")
    check_samples_file(args, args.num_samples, flags["image_size"])  # refuse an overwrite before sampling
    logger.log(f"loading classifier from {args.classifier_path}...")
    classifier, _, _ = load_checkpoint_model(
        args.classifier_path, args, given, classifier_and_diffusion_defaults(), create_classifier_and_diffusion)
    num_classes = flags["num_classes"]
    out_features = getattr(classifier, "out_channels", None)
    if not flags["class_cond"] and out_features:
        num_classes = int(out_features)  # labels only steer the classifier: use all its classes
    logger.log(f"sampling {args.num_samples} images with classifier scale {args.classifier_scale}...")
    class_cond = flags["class_cond"]

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        # y always reaches cond_fn through model_kwargs; the model sees it only if class-conditional
        return model(x, t, y if class_cond else None)

    images, labels = generate_samples(
        model_fn, diffusion,
        num_samples=args.num_samples, batch_size=args.batch_size, image_size=flags["image_size"],
        class_cond=True, num_classes=num_classes, use_ddim=args.use_ddim, eta=args.eta,
        clip_denoised=args.clip_denoised, seed=args.seed, progress=args.progress,
        precision=args.sample_precision,
        cond_fn=make_cond_fn(classifier, args.classifier_scale), device=dist_util.dev(),
    )
    return finish_sampling(args, checkpoint, images, labels)


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
