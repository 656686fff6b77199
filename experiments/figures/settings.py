"""
The figures' models and settings: the arms (``BASELINE``, ``DEEP``, ``X0_PRED``), the runs
(``RUNS``), Table 1's groups and rows, the presets (``SETTINGS``: ``cpu`` and ``test``), each
run's training flags, and the check that a run folder made elsewhere was trained with them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments.study.arms import Arm, Scale, arm_flags, preset, run_name
from guided_diffusion.config import load_config

# the package is experiments/figures/: the repository root is three levels up from this file
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

# the CPU study's baseline arm, flag for flag (experiments/study/arms.py: ARMS[0])
BASELINE = Arm("baseline", {"schedule_sampler": "uniform", "momentum_decay": False},
               "epsilon-prediction, uniform timesteps, AdamW beta1 = 0.9 (the CPU study's baseline)")
DEEP = Arm("deep", {**BASELINE.flags, "num_res_blocks": 2},
           "epsilon-prediction, 2 res blocks per level (another architecture)")
X0_PRED = Arm("x0_pred", {**BASELINE.flags, "predict_xstart": True},
              "x0-prediction, otherwise the baseline (the counter-example)")


@dataclass(frozen=True)
class RunSpec:
    """One model the figures need."""

    name: str               # run folder name, <arm>-s<seed>
    kind: str               # "diffusion" or "gan"
    seed: int
    arm: Optional[Arm]      # diffusion runs: the arm; GANs: None
    from_study: bool        # the CPU study trains this run too: reuse its folder when it matches
    label: str              # how tables and figures name it


RUNS: Tuple[RunSpec, ...] = (
    RunSpec(run_name(BASELINE.name, 1), "diffusion", 1, BASELINE, True, "eps s1"),
    RunSpec(run_name(BASELINE.name, 2), "diffusion", 2, BASELINE, True, "eps s2"),
    RunSpec(run_name(DEEP.name, 3), "diffusion", 3, DEEP, False, "eps deep s3"),
    RunSpec(run_name(X0_PRED.name, 1), "diffusion", 1, X0_PRED, False, "x0 s1"),
    RunSpec(run_name(X0_PRED.name, 2), "diffusion", 2, X0_PRED, False, "x0 s2"),
    RunSpec(run_name("dcgan", 1), "gan", 1, None, False, "DCGAN s1"),
    RunSpec(run_name("dcgan", 2), "gan", 2, None, False, "DCGAN s2"),
)
RUN_BY_NAME = {r.name: r for r in RUNS}

# Table 1's groups: every pair within a group is compared (one consistency.py call per checkpoint)
GROUPS: Dict[str, Tuple[str, ...]] = {
    "eps": ("baseline-s1", "baseline-s2", "deep-s3"),
    "x0": ("x0_pred-s1", "x0_pred-s2"),
    "dcgan": ("dcgan-s1", "dcgan-s2"),
}
# Table 1's rows: (key, label, group, pairs, paper value / statement)
TABLE1_ROWS: Tuple[Tuple[str, str, str, Tuple[Tuple[str, str], ...], str], ...] = (
    ("eps_init", "eps-prediction, two initialisations", "eps", (("baseline-s1", "baseline-s2"),),
     "20.14 dB (Improved-Diffusion, CIFAR-10 32x32)"),
    ("eps_arch", "eps-prediction, another architecture (2 res blocks)", "eps",
     (("baseline-s1", "deep-s3"), ("baseline-s2", "deep-s3")),
     "20.14 dB (\"different initialisations or architectures\")"),
    ("x0_init", "x0-prediction, two initialisations", "x0", (("x0_pred-s1", "x0_pred-s2"),),
     "loses the consistency: much lower than eps (no number in the text we read)"),
    ("dcgan_init", "DCGAN, two initialisations", "dcgan", (("dcgan-s1", "dcgan-s2"),), "10.48 dB (CIFAR-10)"),
)


@dataclass(frozen=True)
class GanScale:
    """The DCGAN's architecture and training run (scripts/baselines/dcgan_train.py flags)."""

    image_size: int
    nz: int
    ngf: int
    ndf: int
    batch_size: int
    lr: float
    total_steps: int
    save_every: int


# the fields of the study's Scale that the figures' models depend on
_SCALE_KEYS = ("name", "image_size", "num_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
               "total_steps", "batch_size", "lr", "ema_rate", "eval_every", "diffusion_steps", "noise_schedule",
               "dropout")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the figures' numbers (recorded in the ledger and checked on rerun)."""

    name: str
    diffusion: Scale                     # the CPU study's preset (model, run length, checkpoints)
    gan: GanScale
    num_samples: int                     # Table 1: images per model (seeds 0 .. N-1)
    respacing: str                       # Table 1 / Fig. 2 sampler: DDPM ancestral, respaced to this
    ddim: str                            # the check: DDIM (eta = 0) respacing, final checkpoint only
    fractions: Tuple[float, ...]         # Table 1's checkpoints, fractions of each run
    fig2_seeds: int                      # Fig. 2: chains per model (PSNR over these)
    fig2_show: int                       # ... of which the picture shows the first
    fig2_columns: int                    # ... at this many t
    structure_db: float                  # Fig. 2: "structure formed" = predicted x0 this close to the final
    hessian: Dict[str, int]              # scripts/hessian_spectrum.py flags
    landscape_alphas: str                # scripts/loss_landscape.py --alphas
    landscape_batch: int
    fig4_fractions: Tuple[float, float]  # Fig. 4: the short and the long stretch, fractions of the run
    gan_batchnorm: str = "batch"         # Figs. 3-4: the DCGAN losses' BatchNorm (objectives.GAN_BATCHNORM)
    train_inprocess: bool = False        # tests: train in this process (no interpreter start-up per run)

    def steps(self, kind: str, fractions: Optional[Sequence[float]] = None) -> List[int]:
        """The checkpoint steps at ``fractions`` (default Table 1's) of a diffusion or GAN run."""
        total, every = ((self.diffusion.total_steps, self.diffusion.eval_every) if kind == "diffusion"
                        else (self.gan.total_steps, self.gan.save_every))
        out = []
        for f in self.fractions if fractions is None else fractions:
            s = min(total, max(every, int(round(f * total / every)) * every))
            if s not in out:
                out.append(s)
        return out

    @property
    def ema_rate(self) -> str:
        return self.diffusion.ema_rate.split(",")[0]

    def fingerprint(self) -> Dict[str, Any]:
        """
        The settings that change a number, as JSON-able data: the diffusion preset's model and
        training fields (not its FID, job or thread fields), and every figure setting.
        """
        d = asdict(self)
        d.pop("train_inprocess")
        d["diffusion"] = {k: getattr(self.diffusion, k) for k in _SCALE_KEYS}
        return json.loads(json.dumps(d))


SETTINGS: Dict[str, Settings] = {
    # ~70 min on 2 CPU cores when the CPU study's baseline-s1/-s2 are there, ~100 min without
    # (docs/figures.md: the measured per-stage costs)
    "cpu": Settings(
        "cpu", preset("cpu"),
        GanScale(image_size=16, nz=100, ngf=64, ndf=64, batch_size=128, lr=2e-4, total_steps=2000, save_every=400),
        num_samples=64, respacing="100", ddim="ddim50", fractions=(0.2, 0.6, 1.0),
        fig2_seeds=16, fig2_show=3, fig2_columns=9, structure_db=20.0,
        hessian=dict(batch_size=64, top_k=5, power_iters=0, lanczos_steps=60, trace_samples=30, slq_probes=2,
                     slq_steps=60),
        landscape_alphas="-0.5:1.5:41", landscape_batch=128, fig4_fractions=(0.2, 1.0)),
    # seconds, for tests: the study's test preset with a checkpoint every step
    "test": Settings(
        "test", preset("test", eval_every=1),
        GanScale(image_size=8, nz=8, ngf=8, ndf=8, batch_size=4, lr=2e-4, total_steps=5, save_every=1),
        num_samples=4, respacing="4", ddim="ddim2", fractions=(0.2, 0.6, 1.0),
        fig2_seeds=3, fig2_show=2, fig2_columns=3, structure_db=20.0,
        hessian=dict(batch_size=4, top_k=2, power_iters=0, lanczos_steps=4, trace_samples=2, slq_probes=1,
                     slq_steps=4),
        landscape_alphas="-0.5:1.5:5", landscape_batch=4, fig4_fractions=(0.2, 1.0), train_inprocess=True),
}


def settings_for(name: str, **overrides: Any) -> Settings:
    """A preset by name (``--scale``), with fields replaced by ``overrides``."""
    if name not in SETTINGS:
        raise ValueError(f"--scale must be one of {', '.join(SETTINGS)}, got {name!r}")
    return replace(SETTINGS[name], **overrides) if overrides else SETTINGS[name]


def diffusion_flags(spec: RunSpec, settings: Settings, data: str, run_dir: str) -> Dict[str, Any]:
    """The ``scripts/image_train.py`` flags of a diffusion run: the study's, for the spec's arm and seed."""
    return arm_flags(spec.arm, settings.diffusion, spec.seed, data, run_dir)


def gan_flags(spec: RunSpec, settings: Settings, data: str, run_dir: str, device: str = "auto") -> Dict[str, Any]:
    """The ``scripts/baselines/dcgan_train.py`` flags of a DCGAN run."""
    g = settings.gan
    return dict(data_dir=data, image_size=g.image_size, nz=g.nz, ngf=g.ngf, ndf=g.ndf, batch_size=g.batch_size,
                lr=g.lr, total_steps=g.total_steps, save_interval=g.save_every,
                log_interval=max(1, g.total_steps // 20), seed=spec.seed, log_dir=run_dir, device=device)


# flags whose values must agree for a run folder made elsewhere (the study's) to be reused
_REUSE_KEYS = ("image_size", "num_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
               "dropout", "learn_sigma", "use_scale_shift_norm", "class_cond", "diffusion_steps", "noise_schedule",
               "predict_xstart", "lr", "batch_size", "ema_rate", "weight_decay", "total_steps", "save_interval", "seed",
               "schedule_sampler", "momentum_decay", "beta1")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or str(a).lower() in ("true", "false"):
        return str(a).lower() == str(b).lower()
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return str(a) == str(b)


def config_mismatches(run_dir: str, flags: Dict[str, Any], keys: Sequence[str] = _REUSE_KEYS,
                      config_name: str = "config.yaml") -> List[str]:
    """``key: have X, want Y`` for each of ``keys`` where the run's saved config differs from ``flags``."""
    path = os.path.join(run_dir, config_name)
    if not os.path.isfile(path):
        return [f"no {config_name}"]
    cfg = load_config(path)
    defaults = {"predict_xstart": False}
    out = []
    for k in keys:
        if k not in flags:
            continue
        have = cfg.get(k, defaults.get(k))
        if not _same(have, flags[k]):
            out.append(f"{k}: has {have!r}, wants {flags[k]!r}")
    return out


def gan_finished(run_dir: str, total_steps: int) -> bool:
    return all(os.path.isfile(os.path.join(run_dir, f"{n}_{total_steps:06d}.pt"))
               for n in ("generator", "discriminator"))
