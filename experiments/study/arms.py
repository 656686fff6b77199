"""
The study's arms and scales: what each run trains (``ARMS``, ``GROUPS``, ``HEADLINE``), the presets
(``SCALES``: model, run length, evaluation settings) and the ``scripts/image_train.py`` flags of a run
(``arm_flags``). No I/O: the bottom of the study package.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

# the repository (experiments/study/ -> ../..) and its scripts
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")


@dataclass(frozen=True)
class Arm:
    """One arm of the study: a name and the training flags that differ from the baseline."""

    name: str
    flags: Dict[str, Any]
    description: str


def clts_arm(std: float, mean: float = 0.3, target_steps: Optional[int] = None, mdlrc: bool = False,
             floor: float = 0.0, release: float = 1.0, weighting: str = "") -> Arm:
    """
    A CLTS arm: ``clts_s<std>`` [``_mu<mean>``] [``_tgt<steps>``] [``_floor<f>``] [``_release<s>``]
    [``_mdlrc``] [``_<weighting>``].
    """
    name = f"clts_s{std:g}" if std != 1.0 else "clts_s1.0"
    flags: Dict[str, Any] = {"schedule_sampler": "clts", "clts_std": std, "clts_mean": mean, "momentum_decay": False}
    what = f"CLTS, mu = {mean:g}, sigma = {std:g} (fractions of T)"
    if mean != 0.3:
        name += f"_mu{mean:g}"
    if target_steps is not None:
        name += f"_tgt{target_steps}"
        flags["clts_target_steps"] = target_steps
        what += f", target iteration {target_steps}"
    if floor:
        name += f"_floor{floor:g}"
        flags["clts_floor"] = floor
        what += f", uniform floor {floor:g}"
    if release < 1.0:
        name += f"_release{release:g}"
        flags["clts_release_start"] = release
        what += f", released to uniform from {release:g} of the run"
    if mdlrc:
        name += "_mdlrc"
        flags.update(momentum_decay=True, lr_compensation=True)
        what += " + MDLRC"
    if weighting == "min_snr":
        name += "_minsnr"
        flags.update(loss_weighting="min_snr", min_snr_gamma=5.0)
        what += " + Min-SNR (gamma 5)"
    elif weighting:
        raise ValueError(f"clts_arm: no arm name for weighting {weighting!r}")
    return Arm(name, flags, what)


# The sigma the mu / target-iteration ablations and the headline arms use: the best of the committed
# sigma grid (tests/test_study.py checks it against the ledger). 0.1 beat 0.2 and 0.05 in both seeds
# (2026-12-02); study 1's 0.2 was the best until then.
BEST_SIGMA = 0.1
ARMS: Tuple[Arm, ...] = (
    Arm("baseline", {"schedule_sampler": "uniform", "momentum_decay": False},
        "uniform timesteps, AdamW beta1 = 0.9, constant lr"),
    # the sigma grid (mu 0.3, target 1/5 of the run)
    clts_arm(0.05), clts_arm(0.1), clts_arm(0.2), clts_arm(0.3), clts_arm(0.5), clts_arm(1.0),
    # Fig. 6(b): mu at the best sigma; Fig. 6(c): the target iteration at the best sigma
    clts_arm(BEST_SIGMA, mean=0.1), clts_arm(BEST_SIGMA, mean=0.5), clts_arm(BEST_SIGMA, mean=0.7),
    clts_arm(BEST_SIGMA, target_steps=1), clts_arm(BEST_SIGMA, target_steps=1000),
    clts_arm(BEST_SIGMA, target_steps=2000),
    # Fig. 6(a): the modules
    Arm("md_only", {"schedule_sampler": "uniform", "momentum_decay": True, "lr_compensation": False},
        "momentum decay beta1 0.9 -> 0.5, no lr compensation"),
    Arm("mdlrc", {"schedule_sampler": "uniform", "momentum_decay": True, "lr_compensation": True},
        "MDLRC: beta1 0.9 -> 0.5, lr compensated"),
    Arm("lr_only", {"schedule_sampler": "uniform", "momentum_decay": True, "lr_compensation": True,
                    "decay_beta1": False},
        "control: MDLRC's lr schedule, beta1 fixed at 0.9"),
    clts_arm(BEST_SIGMA, mdlrc=True),
    Arm("clts_mdlrc", {"schedule_sampler": "clts", "clts_std": 1.0, "momentum_decay": True,
                       "lr_compensation": True},
        "CLTS (sigma = 1.0) + MDLRC"),
    # Tables 2-3: the comparisons (their authors' settings, as configs/cifar10/*.yaml)
    Arm("min_snr", {"loss_weighting": "min_snr", "min_snr_gamma": 5.0}, "Min-SNR-gamma weighting, gamma 5"),
    Arm("p2", {"loss_weighting": "p2", "p2_k": 1.0, "p2_gamma": 1.0}, "P2 weighting, k = gamma = 1"),
    Arm("speed", {"schedule_sampler": "speed", "loss_weighting": "speed", "speed_tau": 0.7, "speed_k": 5.0,
                  "speed_lambda": 0.6, "speed_threshold": 0.1}, "SpeeD: asymmetric + dual sampling and weighting"),
    Arm("lsm", {"schedule_sampler": "loss-second-moment"}, "loss-aware (loss-second-moment) timestep sampling"),
    Arm("fdm", {"fdm": True, "fdm_multiplier": 2.0, "fdm_sigma_range": "vp", "fdm_warmup_steps": 400},
        "FDM: critically damped input scaling, loss-weight warm-up over 400 steps"),
    # issue 32: a curriculum that keeps the high-noise steps trained, and the modern noise-level anchors
    clts_arm(BEST_SIGMA, floor=0.5), clts_arm(BEST_SIGMA, release=0.5),
    clts_arm(BEST_SIGMA, floor=0.5, weighting="min_snr"),
    Arm("laplace", {"schedule_sampler": "laplace", "laplace_mu": 0.0, "laplace_b": 0.5},
        "Laplace(0, 0.5) over log-SNR (Hang et al. 2024), unweighted epsilon loss"),
    Arm("edm", {"schedule_sampler": "edm_lognormal", "edm_p_mean": -1.2, "edm_p_std": 1.2,
                "loss_weighting": "edm", "edm_sigma_data": 0.5},
        "EDM: log-normal noise levels (P_mean -1.2, P_std 1.2) and EDM's loss weight (sigma_data 0.5)"),
    Arm("logit_normal", {"schedule_sampler": "logit_normal", "logit_normal_m": 0.0, "logit_normal_s": 1.0,
                         "loss_weighting": "flow"},
        "SD3: logit-normal(0, 1) timesteps and the flow-matching loss weight"),
    # the same two anchors with the weight folded into the sampler (--fold_weighting: t drawn in proportion to
    # p(t) w(t), weights 1): the same objective. Queued after the weighted runs trained with gradient norms ~10x the
    # baseline's and far more spread (docs/study.md, "the long horizon's second round"; guided_diffusion/folded.py)
    Arm("edm_folded", {"schedule_sampler": "edm_lognormal", "edm_p_mean": -1.2, "edm_p_std": 1.2,
                       "loss_weighting": "edm", "edm_sigma_data": 0.5, "fold_weighting": True},
        "EDM's density times its weight as the sampler (folded), unit loss weights"),
    Arm("logit_normal_folded", {"schedule_sampler": "logit_normal", "logit_normal_m": 0.0, "logit_normal_s": 1.0,
                                "loss_weighting": "flow", "fold_weighting": True},
        "SD3's logit-normal density times the flow weight as the sampler (folded), unit loss weights"),
)
ARM_NAMES = tuple(a.name for a in ARMS)
# the CLTS arm at BEST_SIGMA (mu 0.3, the scale's target): the headline's and the ablations' centre
BEST_ARM = f"clts_s{BEST_SIGMA:g}"
# the gpu_short preset's third arm: the long horizon's best new arm so far, the lowest seed-1 final FID at
# cpu_long among the committed "long_new" runs (tests/test_study.py checks it against the ledger)
GPU_SHORT_ARM = "speed"
# named sets of arms for ``--arms`` (the order: the sigma grid first)
GROUPS: Dict[str, Tuple[str, ...]] = {
    "first": ("baseline", "clts_s1.0", "clts_s0.2", "mdlrc", "lr_only", "clts_mdlrc"),  # the first CPU study
    "sigma": ("baseline", "clts_s0.05", "clts_s0.1", "clts_s0.2", "clts_s0.3", "clts_s0.5", "clts_s1.0"),
    "mu": (BEST_ARM, f"{BEST_ARM}_mu0.1", f"{BEST_ARM}_mu0.5", f"{BEST_ARM}_mu0.7"),
    "target": (f"{BEST_ARM}_tgt1", BEST_ARM, f"{BEST_ARM}_tgt1000", f"{BEST_ARM}_tgt2000"),
    "modules": ("md_only", "mdlrc", "lr_only", BEST_ARM, f"{BEST_ARM}_mdlrc"),
    "comparisons": ("min_snr", "p2", "speed", "lsm", "fdm"),
    "long": ("baseline", BEST_ARM, f"{BEST_ARM}_mdlrc", "min_snr"),  # with --scale cpu_long
    # issue 32's new long-horizon arms, in the order the queue runs them (with --scale cpu_long)
    "long_new": (f"{BEST_ARM}_floor0.5", "laplace", f"{BEST_ARM}_release0.5", f"{BEST_ARM}_floor0.5_minsnr", "edm",
                 "logit_normal", "p2", "speed", "edm_folded", "logit_normal_folded"),
    "headline": ("baseline", BEST_ARM, f"{BEST_ARM}_mdlrc"),  # 3 seeds
    # the first GPU's one-command study (--scale gpu_short): the baseline, sigma 0.1 CLTS and GPU_SHORT_ARM
    "gpu_short": ("baseline", BEST_ARM, GPU_SHORT_ARM),
}
# what each of the long horizon's new arms claims, from its source (the claims table's rows, once measured)
ARM_CLAIMS: Dict[str, str] = {
    f"{BEST_ARM}_floor0.5": "this repository's proposal: CLTS's early gain without starving t > 0.6T (no paper)",
    f"{BEST_ARM}_release0.5": "this repository's proposal: back to uniform over the second half (no paper)",
    f"{BEST_ARM}_floor0.5_minsnr": "this repository's proposal: the floored curriculum with Min-SNR's weight",
    "laplace": "Hang et al. 2024: -26.6% FID vs cosine at equal budget, ahead of Min-SNR (ImageNet-256, DiT-B)",
    "edm": "Karras et al. 2022: EDM's training distribution and weight (state of the art on CIFAR-10 at 32px)",
    "logit_normal": "Esser et al. 2024: rf/lognorm(0, 1) ranks first of their timestep samplers (SD3)",
    "p2": "Choi et al. 2022: better FID at the same iterations (perceptually rich levels weighted up)",
    "speed": "Wang et al. 2024: about 3x faster training (asymmetric + dual sampling, change-aware weight)",
    "edm_folded": "issue 32's fallback: EDM's objective drawn as p w with weights of 1",
    "logit_normal_folded": "issue 32's fallback: SD3's objective drawn as p w with weights of 1",
}
# the headline arms: 3 seeds, and a second sampler at the final checkpoint
HEADLINE = GROUPS["headline"]
# the groups drawn one figure each (curves_<group>.png), the baseline in every one
GROUP_FIGURES = ("sigma", "mu", "target", "modules", "comparisons")


def arms_named(spec: str) -> List[Arm]:
    """``--arms``: comma-separated arm names and/or group names (``GROUPS``), in order, no repeats."""
    names: List[str] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        for n in GROUPS.get(item, (item,)):
            if n not in ARM_NAMES:
                raise ValueError(f"--arms: unknown arm or group {n!r}; arms: {', '.join(ARM_NAMES)}; "
                                 f"groups: {', '.join(GROUPS)}")
            if n not in names:
                names.append(n)
    return [next(a for a in ARMS if a.name == n) for n in names]


@dataclass(frozen=True)
class Scale:
    """Model, run length and evaluation settings of one study preset."""

    name: str
    image_size: int
    num_channels: int
    channel_mult: str
    num_res_blocks: int
    attention_resolutions: str
    total_steps: int          # also MDLRC's horizon
    batch_size: int
    lr: float
    ema_rate: str
    eval_every: int           # checkpoint (and FID point) interval
    num_samples: int          # samples per FID/KID point
    ref_images: int           # CIFAR-10 training images in the reference set
    sampling: str             # timestep respacing of the DDIM sampler
    seeds: Tuple[int, ...]
    jobs: int                 # runs trained/evaluated at once
    threads: int              # torch threads per job
    clts_target_fraction: float = 0.2  # CLTS target step = this x total_steps (paper: 100k of 500k)
    diffusion_steps: int = 1000
    noise_schedule: str = "cosine"
    dropout: float = 0.1
    second_sampler_all: bool = False  # every arm (not only HEADLINE) also gets the ancestral sampler at the end
    ablation_figures: bool = True  # ablation.png and curves_<group>.png (a scale that runs the ablations)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def clts_target_steps(self) -> int:
        return max(1, int(round(self.clts_target_fraction * self.total_steps)))

    def eval_steps(self) -> List[int]:
        return list(range(self.eval_every, self.total_steps + 1, self.eval_every))


SCALES: Dict[str, Scale] = {
    # ~1.2M parameters at 16x16; on 2 CPU cores one pair of runs takes ~25 min with its evaluation (docs/study.md)
    "cpu": Scale("cpu", image_size=16, num_channels=32, channel_mult="1,2,2", num_res_blocks=1,
                 attention_resolutions="4", total_steps=2000, batch_size=64, lr=3e-4, ema_rate="0.995",
                 eval_every=400, num_samples=300, ref_images=2000, sampling="ddim25", seeds=(1, 2),
                 jobs=2, threads=1),
    # the long horizon (issue 17, 5.): the cpu model for 5x the steps, CLTS target and MDLRC horizon alike
    "cpu_long": Scale("cpu_long", image_size=16, num_channels=32, channel_mult="1,2,2", num_res_blocks=1,
                      attention_resolutions="4", total_steps=10000, batch_size=64, lr=3e-4, ema_rate="0.995",
                      eval_every=1000, num_samples=300, ref_images=2000, sampling="ddim25", seeds=(1, 2),
                      jobs=2, threads=1, second_sampler_all=True, ablation_figures=False),
    # one GPU (documented, not run here): the mini_* configs' model at 32x32, 40k steps
    "gpu": Scale("gpu", image_size=32, num_channels=64, channel_mult="1,2,2,2", num_res_blocks=2,
                 attention_resolutions="16,8", total_steps=40000, batch_size=128, lr=1e-4, ema_rate="0.9999",
                 eval_every=4000, num_samples=10000, ref_images=50000, sampling="ddim50", seeds=(1, 2, 3),
                 jobs=1, threads=0),
    # the first GPU's one command (issue 32, item 8): the gpu preset's model (the mini_* configs' U-Net at 32x32,
    # 9.75 GFLOP per image forward + backward), 3 arms x 1 seed at once on one GPU, FID of 5,000 samples at every
    # 1,000 steps; sized from its FLOPs to train and evaluate within 9 minutes on one H100 (not yet run on one)
    "gpu_short": Scale("gpu_short", image_size=32, num_channels=64, channel_mult="1,2,2,2", num_res_blocks=2,
                       attention_resolutions="16,8", total_steps=4000, batch_size=128, lr=2e-4, ema_rate="0.999",
                       eval_every=1000, num_samples=5000, ref_images=10000, sampling="ddim50", seeds=(1,),
                       jobs=3, threads=4, ablation_figures=False, extra={"precision": "auto"}),
    # seconds, for tests
    "test": Scale("test", image_size=8, num_channels=32, channel_mult="1,2", num_res_blocks=1,
                  attention_resolutions="", total_steps=4, batch_size=4, lr=1e-4, ema_rate="0.9",
                  eval_every=2, num_samples=4, ref_images=16, sampling="ddim2", seeds=(1,),
                  jobs=1, threads=1, diffusion_steps=20),
}


def preset(name: str, **overrides: Any) -> Scale:
    """A preset by name (``--scale``), with fields replaced by ``overrides``."""
    if name not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {name!r}")
    return replace(SCALES[name], **overrides) if overrides else SCALES[name]


def run_name(arm: str, seed: int) -> str:
    """The run folder's name, ``<arm>-s<seed>``."""
    return f"{arm}-s{seed}"


def arm_flags(arm: Arm, scale: Scale, seed: int, data_dir: str, log_dir: str) -> Dict[str, Any]:
    """
    Every ``scripts/image_train.py`` flag that the study sets for one run.

    :return: flag name -> value (the arm's own flags last, so they win).
    """
    flags: Dict[str, Any] = dict(
        data_dir=data_dir, log_dir=log_dir, seed=seed, resume="auto",
        image_size=scale.image_size, num_channels=scale.num_channels, channel_mult=scale.channel_mult,
        num_res_blocks=scale.num_res_blocks, attention_resolutions=scale.attention_resolutions, num_heads=2,
        dropout=scale.dropout, learn_sigma=False, use_scale_shift_norm=True, class_cond=False,
        diffusion_steps=scale.diffusion_steps, noise_schedule=scale.noise_schedule,
        lr=scale.lr, batch_size=scale.batch_size, ema_rate=scale.ema_rate, weight_decay=0.0,
        total_steps=scale.total_steps, save_interval=scale.eval_every, log_interval=max(1, scale.eval_every // 8),
        sample_interval=0, precision="fp32", compile=False,
        clts_mean=0.3, clts_std=1.0, clts_target_steps=scale.clts_target_steps,
        beta1=0.9, beta1_min=0.5, momentum_decay=False, lr_compensation=True, decay_beta1=True,
        schedule_sampler="uniform",
    )
    flags.update(scale.extra)
    flags.update(arm.flags)
    return flags


def flags_to_argv(flags: Dict[str, Any]) -> List[str]:
    """``{"lr": 1e-4}`` -> ``["--lr", "0.0001"]`` (booleans as True/False, as the scripts parse them)."""
    argv: List[str] = []
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    return argv


def keeps_samples(arm: str, scale: Scale) -> bool:
    """True for the runs that get the second sampler and keep their final samples (the headline arms)."""
    return arm in HEADLINE or scale.second_sampler_all


def ablation_value(name: str, group: str, scale: Scale) -> str:
    """The value an arm of a numeric ablation group varies, as its name spells it: μ (``mu``), the
    target iteration (``target``) or σ (``sigma``); the best-σ arm itself has μ 0.3 and the scale's target."""
    if group == "mu":
        return name.split("_mu")[1] if "_mu" in name else "0.3"
    if group == "target":
        return name.split("_tgt")[1] if "_tgt" in name else str(scale.clts_target_steps)
    if group == "sigma":
        return name[len("clts_s"):]
    raise ValueError(f"ablation_value: {group!r} is not a numeric ablation group (mu, target, sigma)")
