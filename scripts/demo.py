"""
A few-minute demonstration on a CPU (``make demo``): train a small diffusion model with the
paper's CLTS timestep curriculum and MDLRC momentum decay, then show where everything went.

    python scripts/demo.py                       # built-in synthetic images
    python scripts/demo.py --data_dir PATH       # CIFAR-10 (packed .npz, image folder or zip)

Settings are in configs/smoke/demo.yaml; any extra flag is passed to scripts/image_train.py
(e.g. ``--total_steps 600``).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from evaluations.evaluator import evaluate
from guided_diffusion import training
from guided_diffusion.image_datasets import load_source, write_npz
from guided_diffusion.image_io import write_grid
from guided_diffusion.model_loading import load_diffusion_model
from guided_diffusion.sample_util import generate_samples

DEMO_CONFIG = os.path.join(ROOT, "configs", "smoke", "demo.yaml")


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Run the demo.

    :param argv: ``[--data_dir PATH] [--log_dir DIR] [image_train.py flags...]``.
    :return: the run folder.
    """
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    parser.add_argument("--data_dir", default="synthetic",
                        help="'synthetic' (default) or CIFAR-10: a packed .npz, an image folder or a zip")
    parser.add_argument("--log_dir", default="", help="run folder (default runs/demo-<timestamp>)")
    parser.add_argument("--num_samples", type=int, default=64, help="samples in the final grid and metric")
    parser.add_argument("--metric_images", type=int, default=200,
                        help="training images the KID of the samples (and of pure noise) is measured against")
    args, extra = parser.parse_known_args(argv)
    print(f"demo: training a small diffusion model with CLTS + MDLRC on "
          f"{'synthetic images' if args.data_dir == 'synthetic' else args.data_dir} (settings: {DEMO_CONFIG})",
          flush=True)
    t0 = time.time()
    flags = ["--config", DEMO_CONFIG, "--data_dir", args.data_dir]
    if args.log_dir:  # else image_train's default, runs/demo-<timestamp>
        flags += ["--log_dir", args.log_dir]
    run = training.train(flags + list(extra))
    train_minutes = (time.time() - t0) / 60
    result = sample_and_measure(run, args.num_samples, args.metric_images)
    _report(run, (time.time() - t0) / 60, train_minutes, result)
    return run


def sample_and_measure(run: str, num_samples: int, metric_images: int) -> Dict[str, Any]:
    """
    Sample ``num_samples`` images from the run's newest EMA checkpoint (DDIM, 25 steps), write
    them as an upscaled grid ``demo_samples.png`` next to a grid of training images, and measure
    the KID of the samples, and of uniform noise images, against ``metric_images`` training
    images (offline Inception).

    :return: ``{"grid", "data_grid", "kid_samples", "kid_noise", "extractor"}``.
    """
    import numpy as np
    import yaml

    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    emas = sorted(glob.glob(os.path.join(run, "ema_*.pt")))
    model, diffusion, flags, _ = load_diffusion_model(emas[-1], overrides={"timestep_respacing": "ddim25"})
    samples, _ = generate_samples(model, diffusion, num_samples=num_samples, batch_size=num_samples,
                                  image_size=flags["image_size"], use_ddim=True, seed=0, device="cpu")
    data = load_source(cfg["data_dir"], flags["image_size"]).images
    pick = np.random.default_rng(0).permutation(len(data))[:metric_images]
    real = np.asarray(data[np.sort(pick)])
    ref = os.path.join(run, "demo_reference.npz")
    write_npz(ref, real)
    noise = np.random.default_rng(1).integers(0, 256, size=samples.shape, dtype=np.uint8)
    kid = {}
    extractor = ""
    for name, images in (("samples", samples), ("noise", noise)):
        res = evaluate(ref, images, metrics=("kid",), extractor="auto", batch_size=64, device="cpu",
                       cache_dir=os.path.join(run, "demo_cache"))
        kid[name], extractor = res.get("kid"), res.get("extractor", "")
    grid = os.path.join(run, "demo_samples.png")
    data_grid = os.path.join(run, "demo_training_images.png")
    _save_grid(samples, grid)
    _save_grid(real[:num_samples], data_grid)
    return {"grid": grid, "data_grid": data_grid, "kid_samples": kid["samples"], "kid_noise": kid["noise"],
            "extractor": extractor}


def _save_grid(images, path: str) -> None:
    """uint8 NHWC images as an enlarged PNG grid (the library's grid writer)."""
    import torch

    write_grid(torch.from_numpy(images).permute(0, 3, 1, 2), path)  # uint8 as sampled


def _report(run: str, minutes: float, train_minutes: float, result: Dict[str, Any]) -> None:
    rows: List[dict] = []
    progress = os.path.join(run, "progress.csv")
    if os.path.exists(progress):
        with open(progress, newline="") as f:
            rows = list(csv.DictReader(f))
    models = sorted(glob.glob(os.path.join(run, "model*.pt")))
    emas = sorted(glob.glob(os.path.join(run, "ema_*.pt")))
    print("\n" + "=" * 72)
    print(f"demo finished in {minutes:.1f} min ({train_minutes:.1f} min training). Everything is in "
          f"{os.path.abspath(run)}:")
    print("  config.yaml    the resolved flags (describe the run: --config it again for a new run)")
    print(f"  progress.csv   one row per log interval ({len(rows)} rows): loss, loss_q0..q3, lr, beta1, it/s, ...")
    print("  log.txt        the human-readable log")
    print(f"  checkpoints    {', '.join(os.path.basename(m) for m in models)} (+ EMA: "
          f"{', '.join(os.path.basename(e) for e in emas)}; opt*/state* for exact resume)")
    print(f"  samples        {result['grid']} (DDIM 25 steps, EMA)")
    print(f"  training data  {result['data_grid']}")
    if rows:
        first, last = rows[0], rows[-1]
        print(f"  loss           {float(first['loss']):.4f} at step {first['step']} -> "
              f"{float(last['loss']):.4f} at step {last['step']}")
        print(f"  MDLRC          beta1 {float(first['beta1']):.3f} -> {float(last['beta1']):.3f}, "
              f"lr {float(first['lr']):.2e} -> {float(last['lr']):.2e} (compensated)")
    ks, kn = result["kid_samples"], result["kid_noise"]
    print(f"  KID vs training images (x1e3, lower is better): samples {ks * 1e3:.1f}, "
          f"pure noise {kn * 1e3:.1f}  [{result['extractor']}]")
    print("=" * 72)


if __name__ == "__main__":
    main()
