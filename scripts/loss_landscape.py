"""
The loss along the straight line between two checkpoints of ONE training run (the paper's
Fig. 4): θ(α) = (1 - α)·θ_a + α·θ_b, the loss evaluated for every α on one fixed input (α = 0 is
checkpoint A, α = 1 checkpoint B; values outside [0, 1] extrapolate). Both checkpoints must have
the same architecture. The paper takes A and B after 10 and 100 epochs of the same run, raw
(non-EMA) weights, for a diffusion model and for a GAN.

- Diffusion (``modelNNNNNN.pt``): the training loss (and its terms mse, vb) on one fixed batch
  with fixed noise and fixed timesteps. An EMA checkpoint (``ema_*.pt``) is accepted with a
  warning: the paper interpolates the raw weights.
- GAN (``generator_NNNNNN.pt`` of scripts/baselines/dcgan_train.py, found by the gan_config.yaml
  beside it): θ is the generator's AND the discriminator's parameters (with BatchNorm running
  statistics), both taken from the same step and interpolated together, both networks in eval
  mode. The loss plotted is the non-saturating generator loss -log σ(D(α)(G(α)(z))) on
  --batch_size fixed latents z (seeds --seed ... --seed + batch_size - 1, as hessian_spectrum.py).

The checkpoints are given as to the sample scripts: ``--run_dir DIR --step A,B`` (two steps of one
run; ``--use_ema False`` for the raw ``modelNNNNNN.pt``, else ``--ema_rate`` picks the EMA file; a
DCGAN run folder gives ``generator_NNNNNN.pt``), or ``--model_path A B`` (two files; ``--a A
--b B`` is the older spelling of the same). CIFAR-10 at batch 128 has 390.6 steps per epoch, so
epochs 10 and 100 end at steps 3906 and 39062:

    python scripts/image_train.py --config configs/cifar10/baseline.yaml --save_steps 3906,39062 \
        --log_dir runs/cifar10-baseline
    python scripts/loss_landscape.py --run_dir runs/cifar10-baseline --step 3906,39062 --use_ema False \
        --alphas=-0.5:1.5:41 --out_dir runs/fig4-diffusion
    python scripts/baselines/dcgan_train.py --data_dir .data/cifar10_train.npz --save_steps 3906,39062 \
        --total_steps 39062 --log_dir runs/cifar10-dcgan
    python scripts/loss_landscape.py --run_dir runs/cifar10-dcgan --step 3906,39062 \
        --alphas=-0.5:1.5:41 --out_dir runs/fig4-gan

Writes to --out_dir (default runs/loss_landscape-<timestamp>): loss_landscape.csv (alpha, loss;
for diffusion also every loss term: mse, vb), loss_landscape.png and loss_landscape.json
(settings, the kind and which loss is plotted).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from experiments import analysis as an
from experiments.gan import discriminator_path_for, gan_latents

DIFFUSION_LOSS = "diffusion training loss (training_losses()['loss'], mean over the fixed batch)"


def create_argparser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    an.add_checkpoint_args(p, "two")
    p.add_argument("--a", type=str, default=None, help="the same as the first --model_path (alpha = 0)")
    p.add_argument("--b", type=str, default=None, help="the same as the second --model_path (alpha = 1)")
    p.add_argument("--kind", type=str, default="auto",
                   help="auto (gan when gan_config.yaml is beside checkpoint A), diffusion or gan")
    p.add_argument("--model_flags", type=str, default=None,
                   help="diffusion only: upstream flags of both checkpoints (default: the config.yaml beside A)")
    p.add_argument("--alphas", type=str, default="-0.5:1.5:41", help="START:STOP:COUNT or a comma list")
    p.add_argument("--data_dir", type=str, default=None,
                   help="diffusion only; default: the data_dir of A's config.yaml")
    p.add_argument("--batch_size", type=int, default=64, help="images in the fixed batch (GAN: latents)")
    an.add_gan_batchnorm_flag(p)
    p.add_argument("--timesteps", type=str, default="stratified",
                   help="diffusion only: stratified or random (seeded)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the batch's noise (and random timesteps); GAN: latent j has seed --seed + j")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--out_dir", type=str, default="", help="default runs/loss_landscape-<timestamp>")
    return p


def plot(rows: List[Dict[str, float]], path: Path, title: str) -> None:
    """Loss (and its terms) against alpha, A and B marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [r["alpha"] for r in rows]
    terms = [k for k in rows[0] if k not in ("alpha", "loss")]
    fig, axes = plt.subplots(1, 1 + len(terms), figsize=(4.2 * (1 + len(terms)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], ["loss"] + terms):
        ax.plot(a, [r[key] for r in rows], marker="o", ms=3)
        for x, name in ((0.0, "A"), (1.0, "B")):
            ax.axvline(x, color="grey", lw=0.8, ls="--")
            ax.text(x, ax.get_ylim()[1], name, ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("alpha  (θ = (1-α)θ_A + αθ_B)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve_checkpoints(args: argparse.Namespace) -> List[str]:
    """
    Checkpoints A and B: ``--model_path A B``, or ``--run_dir DIR --step A,B`` (``--use_ema`` /
    ``--ema_rate`` as for the sample scripts), or the older ``--a A --b B``. Sets ``args.labels``,
    how messages name the two (the flags ``--a``/``--b`` when they were used).
    """
    args.labels = ("A", "B")
    if args.a is None and args.b is None:
        return an.resolve_checkpoint_args(args, "two")
    if args.a is None or args.b is None:
        raise ValueError("--a and --b go together (or give --model_path A B, or --run_dir DIR --step A,B)")
    if args.model_path or args.run_dir:
        raise ValueError("give --a/--b (the older spelling of --model_path A B) or --model_path / --run_dir, not both")
    for flag, path in (("--a", args.a), ("--b", args.b)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: checkpoint not found: {path}")
    args.labels = ("--a", "--b")
    return [args.a, args.b]


def warn_if_ema(paths: Sequence[str], labels: Sequence[str] = ("A", "B"), run_dir: bool = False) -> None:
    """Print a warning for each EMA checkpoint: the paper's Fig. 4 interpolates raw weights."""
    for label, path in zip(labels, paths):
        if Path(path).name.startswith("ema_"):
            print(f"warning: {label} {path} is an EMA checkpoint; the paper's Fig. 4 interpolates the raw "
                  "(non-EMA) weights modelNNNNNN.pt of one run after 10 and 100 epochs"
                  + (" (--use_ema False picks them)" if run_dir else ""), flush=True)


def diffusion_line(args: argparse.Namespace, alphas, device) -> Dict[str, Any]:
    """The diffusion loss along the line; returns the rows and the settings for the JSON."""
    warn_if_ema([args.a, args.b], args.labels, run_dir=bool(args.run_dir))
    # model_flags apply to both; B's own config.yaml must agree on the architecture (checked by shapes)
    model, diffusion, flags, source = an.load_diffusion_model(args.a, args.model_flags, device=device)
    sd_a = an.load_state_dict_file(args.a)  # a copy: the model's own tensors are overwritten below
    sd_b = an.load_state_dict_file(args.b)
    an.load_into(model, sd_b, args.b, source)  # same architecture as A, or a clear error
    data_dir = args.data_dir or an.config_data_dir(args.a)
    batch = an.load_fixed_batch(data_dir, args.batch_size, flags["image_size"], diffusion.num_timesteps,
                                class_cond=flags["class_cond"], seed=args.seed, timesteps=args.timesteps)
    rows = an.loss_along_line(model, diffusion, sd_a, sd_b, alphas, batch, device)
    return {"rows": rows,
            "title": f"loss on a fixed batch ({args.batch_size} images of {data_dir}, {args.timesteps} t, "
                     f"seed {args.seed})",
            "meta": {"loss": DIFFUSION_LOSS, "flags_source": source, "data_dir": data_dir,
                     "timesteps": args.timesteps}}


def gan_line(args: argparse.Namespace, alphas, device) -> Dict[str, Any]:
    """The GAN generator loss along the line (G and D interpolated together)."""
    if args.model_flags:
        raise ValueError("--model_flags applies to diffusion checkpoints; a GAN's flags come from gan_config.yaml")
    if args.data_dir:
        raise ValueError("--data_dir applies to diffusion checkpoints; the GAN's generator loss uses fixed "
                         "latents, no data")
    g, d, flags = an.load_gan_model(args.a, discriminator=True)
    gen_a, disc_a = an.load_state_dict_file(args.a), an.load_state_dict_file(discriminator_path_for(args.a))
    gen_b, disc_b = an.load_state_dict_file(args.b), an.load_state_dict_file(discriminator_path_for(args.b))
    # same architecture as A, or an error naming B's file
    source = f"{args.labels[0]}'s gan_config.yaml ({args.a})"
    an.load_into(g, gen_b, args.b, source)
    an.load_into(d, disc_b, discriminator_path_for(args.b), source)
    seeds = list(range(args.seed, args.seed + args.batch_size))
    z = gan_latents(seeds, flags["nz"])
    rows = an.gan_loss_along_line(g, d, gen_a, gen_b, disc_a, disc_b, alphas, z, device, args.gan_batchnorm)
    return {"rows": rows,
            "title": f"GAN generator loss -log σ(D(G(z))), G and D interpolated, {args.batch_size} fixed latents "
                     f"(seeds {seeds[0]}..{seeds[-1]})",
            "meta": {"loss": an.GAN_LANDSCAPE_LOSS, "gan_batchnorm": args.gan_batchnorm, "gan_flags": flags, "latent_seeds": [seeds[0], seeds[-1]],
                     "discriminator_a": str(discriminator_path_for(args.a)),
                     "discriminator_b": str(discriminator_path_for(args.b))}}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """
    Evaluate the loss along the line.

    :return: the CSV rows (alpha, loss and, for diffusion, mse, vb, ...).
    """
    args = create_argparser().parse_args(argv)
    args.a, args.b = resolve_checkpoints(args)
    alphas = an.parse_alphas(args.alphas)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    kind = an.checkpoint_kind(args.a, args.kind)
    if args.kind == "auto" and an.checkpoint_kind(args.b) != kind:
        raise ValueError(f"{args.labels[0]} {args.a} is a {kind} checkpoint but {args.labels[1]} {args.b} is not "
                         "(a GAN checkpoint has gan_config.yaml beside it): interpolate two checkpoints of one run")
    device = an.pick_device(args.device)
    line = gan_line(args, alphas, device) if kind == "gan" else diffusion_line(args, alphas, device)
    rows = line["rows"]

    out_dir = Path(args.out_dir) if args.out_dir else an.default_out_dir("loss_landscape")
    out_dir.mkdir(parents=True, exist_ok=True)
    an.write_csv(out_dir / "loss_landscape.csv", rows)
    plot(rows, out_dir / "loss_landscape.png", f"{line['title']}\nA = {args.a}\nB = {args.b}")
    (out_dir / "loss_landscape.json").write_text(json.dumps({
        "kind": kind, "a": args.a, "b": args.b, **line["meta"], "batch_size": args.batch_size,
        "seed": args.seed, "alphas": [float(x) for x in alphas],
    }, indent=2))
    print(f"{kind}: {line['meta']['loss']}")
    for r in rows:
        print(f"alpha {r['alpha']:+.3f}  loss {r['loss']:.6f}")
    print(f"wrote {out_dir}/loss_landscape.csv, loss_landscape.png, loss_landscape.json")
    return rows


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
