"""
A small-scale, rerunnable study of CLTS and MDLRC (Xu et al., 2024) on CIFAR-10.

Each arm (``ARMS``: the baseline, the CLTS sigma grid, Fig. 6(a) modules, Fig. 6(b) mu and 6(c)
target-iteration ablations at ``BEST_SIGMA``, and the Table 2-3 comparisons Min-SNR, P2, SpeeD,
loss-second-moment and FDM) is a normal training run that differs from the baseline only by its
flags, trained with several seeds from the same data and evaluated by FID and KID against CIFAR-10
training images at every checkpoint (``scripts/fid_curve.py``, offline Inception), with a
held-out denoising-loss probe at fixed timesteps. ``GROUPS`` names sets of arms for ``--arms``;
``SCALES`` holds the presets (``cpu``: 2,000 steps; ``cpu_long``: 10,000; ``gpu``; ``test``).

Everything goes to one folder (``--out``): ``data/`` (the prepared training, reference and held-out
images), ``runs/<arm>-s<seed>/`` (a normal training run folder: config.yaml, progress.csv,
checkpoints, fid_curve.csv, probe.csv), ``cache/`` (reference Inception features) and
``timing.json``. Finished runs' small files are copied to the committed ledger
(``docs/study/ledger/<scale>/<run>/``), from which the summary, the claims table, docs/study.md's
generated sections (``DOC_PARTS``) and the figures are computed.

Resumable: a run in the ledger is not run again, a finished run in ``--out`` is not trained
again, an interrupted one resumes from its newest complete checkpoint (``--resume auto``), and
``fid_curve.py`` skips checkpoints already in its CSV. Rerunning after completion only reprints the summary.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from scipy.stats import t as student_t

from evaluations.evaluator import compute_statistics, evaluate, get_extractor, load_batch, read_cache, \
    reference_cache_file
from experiments.plotting import pyplot
from guided_diffusion.checkpoint import find_ema_checkpoint, list_complete_checkpoints
from guided_diffusion.files import atomic_write, atomic_write_text
from guided_diffusion.image_datasets import center_crop_arr, write_npz
from guided_diffusion.model_loading import load_diffusion_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

__all__ = ["Arm", "Scale", "ARMS", "SCALES", "arm_flags", "run_name", "prepare_data", "run_study",
           "summarize", "iterations_to_reach", "export_results", "PairedBootstrap", "bootstrap_study",
           "bootstrap_interval", "backfill_samples", "seed_band", "GROUP_FIGURES", "verdict",
           "paired_noise", "paired_lead", "VERDICT_ALPHA"]


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
)
ARM_NAMES = tuple(a.name for a in ARMS)
_BEST = f"clts_s{BEST_SIGMA:g}"
# named sets of arms for ``--arms`` (the order: the sigma grid first)
GROUPS: Dict[str, Tuple[str, ...]] = {
    "first": ("baseline", "clts_s1.0", "clts_s0.2", "mdlrc", "lr_only", "clts_mdlrc"),  # the first CPU study
    "sigma": ("baseline", "clts_s0.05", "clts_s0.1", "clts_s0.2", "clts_s0.3", "clts_s0.5", "clts_s1.0"),
    "mu": (_BEST, f"{_BEST}_mu0.1", f"{_BEST}_mu0.5", f"{_BEST}_mu0.7"),
    "target": (f"{_BEST}_tgt1", _BEST, f"{_BEST}_tgt1000", f"{_BEST}_tgt2000"),
    "modules": ("md_only", "mdlrc", "lr_only", _BEST, f"{_BEST}_mdlrc"),
    "comparisons": ("min_snr", "p2", "speed", "lsm", "fdm"),
    "long": ("baseline", _BEST, f"{_BEST}_mdlrc", "min_snr"),  # with --scale cpu_long
    # issue 32's new long-horizon arms, in the order the queue runs them (with --scale cpu_long)
    "long_new": (f"{_BEST}_floor0.5", "laplace", f"{_BEST}_release0.5", f"{_BEST}_floor0.5_minsnr", "edm",
                 "logit_normal", "p2", "speed"),
    "headline": ("baseline", _BEST, f"{_BEST}_mdlrc"),  # 3 seeds
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
    # seconds, for tests
    "test": Scale("test", image_size=8, num_channels=32, channel_mult="1,2", num_res_blocks=1,
                  attention_resolutions="", total_steps=4, batch_size=4, lr=1e-4, ema_rate="0.9",
                  eval_every=2, num_samples=4, ref_images=16, sampling="ddim2", seeds=(1,),
                  jobs=1, threads=1, diffusion_steps=20),
}


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


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

DEFAULT_SOURCES = (
    os.path.join(ROOT, ".data", "cifar10_train.npz"),
    os.path.join(ROOT, "cifar-10-python.tar.gz"),
    os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpeg", "train.zip"),
)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([center_crop_arr(Image.fromarray(im), size) for im in images])


def prepare_data(out: str, scale: Scale, source: str = "", log: Callable[[str], None] = print) -> Tuple[str, str]:
    """
    Write ``out/data/train_<px>.npz`` (every CIFAR-10 training image at the study's resolution,
    upstream's BOX+BICUBIC resize) and ``out/data/ref_<px>_<n>.npz`` (a fixed random subset of
    them: the FID/KID reference). Existing files are kept.

    :param source: a packed CIFAR-10 .npz, the python tarball or a CIFAR-10 image zip/folder;
                   "" takes the first of ``DEFAULT_SOURCES`` that exists.
    :return: (training npz, reference npz).
    """
    data = os.path.join(out, "data")
    train = os.path.join(data, f"train_{scale.image_size}.npz")
    ref = os.path.join(data, f"ref_{scale.image_size}_{scale.ref_images}.npz")
    if os.path.isfile(train) and os.path.isfile(ref):
        return train, ref
    if not source:
        source = next((s for s in DEFAULT_SOURCES if os.path.exists(s)), "")
        if not source:
            raise FileNotFoundError("--source: no CIFAR-10 found; pass the official cifar-10-python.tar.gz, a "
                                    "CIFAR-10 image zip/folder or a packed .npz (looked for: "
                                    + ", ".join(DEFAULT_SOURCES) + ")")
    if not os.path.exists(source):
        raise FileNotFoundError(f"--source: not found: {source}")
    os.makedirs(data, exist_ok=True)
    if source.endswith(".npz"):
        with np.load(source) as f:
            images = f["arr_0"]
    else:
        packed = os.path.join(data, "cifar10_train_32.npz")
        if not os.path.isfile(packed):
            log(f"study: packing CIFAR-10 from {source}")
            subprocess.run([sys.executable, os.path.join(SCRIPTS, "datasets", "cifar10.py"), "--source", source,
                            "--split", "train", "--out", packed], check=True)
        with np.load(packed) as f:
            images = f["arr_0"]
    log(f"study: {len(images)} training images -> {scale.image_size}x{scale.image_size}")
    small = _resize_all(images, scale.image_size)
    if not os.path.isfile(train):
        write_npz(train, small)
    if not os.path.isfile(ref):
        pick = np.random.default_rng(0).permutation(len(small))[: scale.ref_images]
        write_npz(ref, small[np.sort(pick)])
    return train, ref


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def run_finished(run_dir: str, total_steps: int) -> bool:
    """True when the run's final checkpoint set (step ``total_steps``) is complete."""
    return os.path.isdir(run_dir) and total_steps in list_complete_checkpoints(run_dir)


def training_clock_s(run_dir: str) -> float:
    """
    Process-seconds of training by the run's own clock: the last ``gpu_hours`` of its
    ``progress.csv`` (``TrainLoop`` carries it across resumes in its checkpoints; the steps a
    stopped attempt took after its last checkpoint are not counted, as they were trained again).
    0.0 when the run has no progress rows.
    """
    path = os.path.join(run_dir, "progress.csv")
    last = ""
    if os.path.isfile(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                last = row.get("gpu_hours") or last
    return float(last) * 3600.0 if last else 0.0


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OPENAI_LOGDIR", None)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _call(argv: List[str], log_path: str, env: Dict[str, str]) -> None:
    with open(log_path, "a") as logf:
        logf.write(f"\n$ {' '.join(argv)}\n")
        logf.flush()
        proc = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed (exit {proc.returncode}); see {log_path}")


def fid_flags(scale: Scale, ref: str, cache_dir: str) -> Dict[str, Any]:
    """
    The ``scripts/fid_curve.py`` flags of every evaluation of the study: the scale's evaluation
    steps only, so a checkpoint written when a run was stopped between them (a preemption's
    save) is resumed from but not measured.
    """
    return dict(ref=ref, steps=",".join(str(s) for s in scale.eval_steps()),
                num_samples=scale.num_samples, batch_size=min(scale.num_samples, 250), use_ddim=True,
                timestep_respacing=scale.sampling, seed=0, metrics="fid,kid", extractor="offline",
                cache_dir=cache_dir, progress=False, eval_batch_size=32)


# The held-out denoising-loss probe: the EMA model's epsilon-MSE on a fixed batch of CIFAR-10
# *test* images with fixed noise, at fixed fractions of T (where does each method gain and lose?).
PROBE_FRACTIONS = (0.025, 0.075, 0.175, 0.325, 0.475, 0.625, 0.775, 0.875, 0.925, 0.975)
PROBE_IMAGES = 256
PROBE_SEED = 0
# the second sampler of the headline arms' final checkpoints: ancestral, 100 respaced steps
SECOND_SAMPLER = dict(use_ddim=False, timestep_respacing="100")


def second_sampler(scale: Scale) -> Dict[str, Any]:
    """``SECOND_SAMPLER`` for ``scale`` (at most T steps, for the tiny test preset)."""
    return dict(SECOND_SAMPLER, timestep_respacing=str(min(100, scale.diffusion_steps)))
DEFAULT_LEDGER = os.path.join(ROOT, "docs", "study", "ledger")
LEDGER_FILES = ("config.yaml", "progress.csv", "fid_curve.csv", "probe.csv")
# the headline runs' final DDIM samples (the FID's own images, uint8, ~0.2 MB): anyone can recompute
# that FID, and the paired bootstrap resamples their features
SAMPLES_FILE = "samples_final.npz"
BOOTSTRAP_FILE = "bootstrap.csv"  # per scale: the replicates of each headline arm's paired FID difference
BOOTSTRAP_DRAWS = 500
BOOTSTRAP_SEED = 0


def keeps_samples(arm: str, scale: Scale) -> bool:
    """True for the runs that get the second sampler and keep their final samples (the headline arms)."""
    return arm in HEADLINE or scale.second_sampler_all


def final_samples(run_dir: str, scale: Scale) -> Optional[str]:
    """The final checkpoint's DDIM samples that ``fid_curve.py --keep_samples True`` kept, or None."""
    folder = os.path.join(run_dir, "fid_curve_samples", f"step{scale.total_steps:06d}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npz")) if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def probe_timesteps(num_timesteps: int) -> List[int]:
    """The probe's timesteps for a diffusion of ``num_timesteps`` steps (25, 75, ..., 975 at T = 1000)."""
    return sorted({min(num_timesteps - 1, int(round(f * num_timesteps))) for f in PROBE_FRACTIONS})


def heldout_source(source: str) -> Tuple[str, str]:
    """(source, split) of the held-out probe images for a training ``source``: CIFAR-10's test split."""
    if source.endswith(".zip") and os.path.basename(source).startswith("train"):
        return os.path.join(os.path.dirname(source), "test.zip"), "test"
    if source.endswith(".tar.gz") or os.path.isdir(source):
        return source, "test"
    if source.endswith(".npz") and "train" in os.path.basename(source):
        return os.path.join(os.path.dirname(source), os.path.basename(source).replace("train", "test")), "npz"
    return "", ""


def prepare_heldout(out: str, scale: Scale, source: str = "", log: Callable[[str], None] = print) -> str:
    """
    Write ``out/data/heldout_<px>_<n>.npz``: the first ``PROBE_IMAGES`` CIFAR-10 test images at the
    study's resolution. Without a test split beside ``source`` the probe falls back to the last
    ``PROBE_IMAGES`` training images (the file name then says ``trainheldout``; logged).
    """
    data = os.path.join(out, "data")
    for kind in ("heldout", "trainheldout"):
        path = os.path.join(data, f"{kind}_{scale.image_size}_{PROBE_IMAGES}.npz")
        if os.path.isfile(path):
            return path
    if not source:
        source = next((s for s in DEFAULT_SOURCES if os.path.exists(s)), "")
    test, split = heldout_source(source)
    os.makedirs(data, exist_ok=True)
    if test and os.path.exists(test):
        if split == "npz":
            with np.load(test) as f:
                images = f["arr_0"][:PROBE_IMAGES]
        else:
            packed = os.path.join(data, "cifar10_test_32.npz")
            if not os.path.isfile(packed):
                subprocess.run([sys.executable, os.path.join(SCRIPTS, "datasets", "cifar10.py"), "--source", test,
                                "--split", "test", "--out", packed], check=True)
            with np.load(packed) as f:
                images = f["arr_0"][:PROBE_IMAGES]
        path = os.path.join(data, f"heldout_{scale.image_size}_{PROBE_IMAGES}.npz")
    else:
        train, _ = prepare_data(out, scale, source, log)
        with np.load(train) as f:
            images = f["arr_0"][-PROBE_IMAGES:]
        path = os.path.join(data, f"trainheldout_{scale.image_size}_{PROBE_IMAGES}.npz")
        log(f"study: no CIFAR-10 test split beside {source or 'the source'}; the probe uses training images")
    write_npz(path, _resize_all(np.asarray(images), scale.image_size))
    return path


def probe_checkpoint(checkpoint: str, heldout: str, batch_size: int = 64) -> List[Dict[str, Any]]:
    """
    The epsilon-MSE of ``checkpoint`` on the held-out batch with fixed noise (``PROBE_SEED``) at
    each of ``probe_timesteps``: deterministic for a fixed checkpoint (eval mode, no dropout).

    :return: one ``{"t", "mse"}`` row per probe timestep.
    """
    model, diffusion, _, _ = load_diffusion_model(checkpoint)
    with np.load(heldout) as f:
        x0 = torch.from_numpy(np.asarray(f["arr_0"])).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    noise = torch.randn(tuple(x0.shape), generator=torch.Generator().manual_seed(PROBE_SEED))
    rows = []
    with torch.no_grad():
        for t in probe_timesteps(diffusion.num_timesteps):
            total = 0.0
            for lo in range(0, x0.shape[0], batch_size):
                xb, nb = x0[lo:lo + batch_size], noise[lo:lo + batch_size]
                tt = torch.full((xb.shape[0],), t, dtype=torch.long)
                total += float(diffusion.training_losses(model, xb, tt, noise=nb)["mse"].sum())
            rows.append({"t": t, "mse": total / x0.shape[0]})
    return rows


def probe_run(run_dir: str, scale: Scale, heldout: str) -> str:
    """Append the probe rows of every evaluated EMA checkpoint missing from ``run_dir/probe.csv``."""
    path = os.path.join(run_dir, "probe.csv")
    done = set()
    if os.path.isfile(path):
        with open(path, newline="") as f:
            done = {int(r["step"]) for r in csv.DictReader(f)}
    rate = float(scale.ema_rate.split(",")[0])
    for step in scale.eval_steps():
        if step in done:
            continue
        ckpt = find_ema_checkpoint(os.path.join(run_dir, f"model{step:06d}.pt"), step, rate)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no EMA {rate} checkpoint of step {step} to probe")
        rows = probe_checkpoint(ckpt, heldout)
        new = not os.path.isfile(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "t", "mse", "batch"])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({"step": step, **r, "batch": os.path.basename(heldout).split("_")[0]})
    return path


def ledger_dir(ledger: str, scale: Scale, run: str) -> str:
    """Where a finished run's small files live in the committed ledger: ``<ledger>/<scale>/<run>/``."""
    return os.path.join(ledger, scale.name, run)


def in_ledger(ledger: str, scale: Scale, run: str) -> bool:
    """True when the run's results are committed (its ``done.json`` is there): it is not run again."""
    return os.path.isfile(os.path.join(ledger_dir(ledger, scale, run), "done.json"))


def commit_to_ledger(ledger: str, scale: Scale, run_dir: str, run: str, info: Dict[str, Any]) -> str:
    """
    Copy a finished run's small files (``LEDGER_FILES``, no checkpoints) and ``done.json`` into the
    ledger, all at once (written beside, then renamed), so the ledger never holds half a run.
    """
    dest = ledger_dir(ledger, scale, run)
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in LEDGER_FILES:
        if os.path.isfile(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
    samples = final_samples(run_dir, scale)
    if samples:
        shutil.copyfile(samples, os.path.join(tmp, SAMPLES_FILE))
    with open(os.path.join(tmp, "done.json"), "w") as f:
        json.dump({"run": run, "scale": scale.name, "total_steps": scale.total_steps, "commit": _commit(), **info},
                  f, indent=1)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


class PairedBootstrap:
    """
    Replicates of FID(arm) - FID(baseline) with the samples drawn with replacement, the same
    indices for both runs: sample i of either run starts from the same noise (``fid_curve.py``'s
    seed), so a draw keeps the pairs and the spread is that of the difference, not of two FIDs.

    Each FID is exact (as ``evaluator.fid_from_features``) and costs O(N^2) per draw: with the
    Gram matrices ``X Sigma_ref X^T`` and ``X X^T`` of the N sample features X computed once, the
    centred resample's N x N matrix, trace and mean term are sums over those (N <= D).
    """

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.mu = np.asarray(mu_ref, np.float64)
        self.sigma = np.asarray(sigma_ref, np.float64)

    def _terms(self, feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(feats, np.float64)
        return x @ self.sigma @ x.T, x @ x.T, x @ self.mu

    def _fid(self, terms: Tuple[np.ndarray, np.ndarray, np.ndarray], idx: np.ndarray) -> float:
        g_full, k_full, xm = terms
        n = idx.shape[0]
        g, k = g_full[np.ix_(idx, idx)], k_full[np.ix_(idx, idx)]
        gw = g.sum(axis=1) / n  # x_i^T Sigma mu_b
        m = (g - gw[:, None] - gw[None, :] + gw.sum() / n) / (n - 1)
        eig = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
        mean_sq = k.sum() / n ** 2  # |mu_b|^2
        trace_b = (np.trace(k) - n * mean_sq) / (n - 1)
        diff_sq = mean_sq - 2 * xm[idx].sum() / n + self.mu.dot(self.mu)
        return float(diff_sq + trace_b + np.trace(self.sigma) - 2 * np.sum(np.sqrt(eig)))

    def fid(self, feats: np.ndarray, idx: Optional[np.ndarray] = None) -> float:
        """The FID of ``feats[idx]`` (all rows when ``idx`` is None)."""
        idx = np.arange(len(feats)) if idx is None else np.asarray(idx)
        return self._fid(self._terms(feats), idx)

    def replicates(self, arm_feats: np.ndarray, base_feats: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                   seed: int = BOOTSTRAP_SEED) -> np.ndarray:
        """``draws`` paired replicates of FID(arm) - FID(base) (deterministic for a ``seed``)."""
        if np.shape(arm_feats) != np.shape(base_feats):
            raise ValueError(f"paired bootstrap: the runs' features differ in shape, {np.shape(arm_feats)} vs "
                             f"{np.shape(base_feats)} (were both sampled with the study's settings?)")
        a, b = self._terms(arm_feats), self._terms(base_feats)
        rng = np.random.default_rng(seed)
        n = len(arm_feats)
        out = np.empty(draws)
        for i in range(draws):
            idx = rng.integers(0, n, size=n)
            out[i] = self._fid(a, idx) - self._fid(b, idx)
        return out


def _reference_statistics(scale: Scale, ref: str, cache_dir: str) -> Tuple[np.ndarray, np.ndarray]:
    cfile = reference_cache_file(ref, get_extractor("offline", None, "cpu"), cache_dir)
    if read_cache(cfile) is None:
        _warm_reference(scale, ref, cache_dir)
    stats = read_cache(cfile)
    return stats["mu"], stats["sigma"]


def _sample_features(samples: str, cache_dir: str) -> np.ndarray:
    """Inception pool features of a samples file (offline extractor), cached by the file's content."""
    with open(samples, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"pool-{digest}.npy")
    if os.path.isfile(path):
        return np.load(path)
    feats = compute_statistics(samples, extractor="offline", device="cpu", batch_size=32)["pool"]
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, feats))
    return feats


def _final_fid(run_dir: str, scale: Scale) -> Optional[float]:
    return next((f for st, f, _ in _curve(run_dir, scale) if st == scale.total_steps), None)


def _copy_atomic(src: str, dest: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    atomic_write(dest, lambda out: out.write(data))


def backfill_samples(out: str, scale: Scale, ledger: str, run: str, ref: str,
                     log: Callable[[str], None] = print) -> Optional[str]:
    """
    The committed final samples of a ledger run; for a run committed without them, sample its final
    checkpoint again (``out/runs/<run>``, the same ``fid_curve.py`` settings) and commit them,
    after checking that their FID is the committed one. None when neither exists.
    """
    dest = os.path.join(ledger_dir(ledger, scale, run), SAMPLES_FILE)
    if os.path.isfile(dest):
        return dest
    run_dir = os.path.join(out, "runs", run)
    if not run_finished(run_dir, scale.total_steps):
        log(f"study: {run}: no committed samples and no final checkpoint in {run_dir}; not bootstrapped")
        return None
    redo = os.path.join(out, "backfill", run)
    os.makedirs(redo, exist_ok=True)
    csv_path = os.path.join(redo, "fid_curve.csv")
    _call([sys.executable, os.path.join(SCRIPTS, "fid_curve.py"), run_dir]
          + flags_to_argv({**fid_flags(scale, ref, os.path.join(out, "cache")), "keep_samples": True,
                           "csv": csv_path, "steps": str(scale.total_steps)}),
          os.path.join(out, "logs", run + ".log"), _env(scale.threads))
    with open(csv_path, newline="") as f:
        again = float(next(r for r in csv.DictReader(f) if int(r["step"]) == scale.total_steps)["fid"])
    committed = _final_fid(ledger_dir(ledger, scale, run), scale)
    if committed is None or abs(again - committed) > 1e-3 * max(1.0, abs(committed)):
        raise ValueError(f"study: {run}: sampling the final checkpoint again gave FID {again:.4f}, the ledger says "
                         f"{committed}: the samples would not be the ones measured; not committed")
    _copy_atomic(final_samples(run_dir, scale), dest)
    log(f"study: {run}: final samples committed (FID {again:.3f} again, as measured)")
    return dest


def backfill_second_sampler(out: str, scale: Scale, ledger: str, run: str, ref: str,
                            log: Callable[[str], None] = print) -> bool:
    """
    Give a ledger run that became a headline arm after it was committed its second-sampler FID:
    measure its final checkpoint in ``out/runs/<run>`` as ``train_and_evaluate`` would have, and
    commit the run's ``fid_curve.csv`` again (its committed rows unchanged, the new row added).

    :return: True when the ledger run has the second sampler's final point (now or before).
    """
    committed = ledger_dir(ledger, scale, run)
    if any(st == scale.total_steps for st, _, _ in _curve(committed, scale, second=True)):
        return True
    run_dir = os.path.join(out, "runs", run)
    if not run_finished(run_dir, scale.total_steps):
        log(f"study: {run}: no second-sampler point and no final checkpoint in {run_dir}")
        return False
    with open(os.path.join(committed, "fid_curve.csv")) as f:
        before = f.read().splitlines()
    _call([sys.executable, os.path.join(SCRIPTS, "fid_curve.py"), run_dir]
          + flags_to_argv({**fid_flags(scale, ref, os.path.join(out, "cache")), **second_sampler(scale),
                           "steps": str(scale.total_steps)}), os.path.join(out, "logs", run + ".log"),
          _env(scale.threads))
    with open(os.path.join(run_dir, "fid_curve.csv")) as f:
        after = f.read().splitlines()
    if after[:len(before)] != before:
        raise ValueError(f"study: {run}: {run_dir}/fid_curve.csv does not start with the committed rows; not committed")
    _copy_atomic(os.path.join(run_dir, "fid_curve.csv"), os.path.join(committed, "fid_curve.csv"))
    log(f"study: {run}: second-sampler FID committed")
    return True


def bootstrap_arms(scale: Scale) -> List[str]:
    """The arms whose paired FID difference is bootstrapped: those that keep their samples, not the baseline."""
    return [a.name for a in ARMS if a.name != "baseline" and keeps_samples(a.name, scale)]


def bootstrap_study(out: str, scale: Scale, ledger: str, ref: str, log: Callable[[str], None] = print) -> str:
    """
    Append to ``<ledger>/<scale>/bootstrap.csv`` the ``PairedBootstrap`` replicates of every
    committed (arm, seed) of ``bootstrap_arms`` whose baseline of the same seed is committed too
    and not yet bootstrapped (final samples from the ledger, or sampled again by ``backfill_samples``).

    :return: the file's path.
    """
    path = os.path.join(ledger, scale.name, BOOTSTRAP_FILE)
    done = {(a, s) for a, s, _ in read_bootstrap(path)}
    cache_dir = os.path.join(out, "cache")
    boot: Optional[PairedBootstrap] = None
    for arm in bootstrap_arms(scale):
        for seed in sorted(_committed_seeds(ledger, scale)):
            run, base = run_name(arm, seed), run_name("baseline", seed)
            if (arm, seed) in done or not (in_ledger(ledger, scale, run) and in_ledger(ledger, scale, base)):
                continue
            for r in (run, base):
                backfill_second_sampler(out, scale, ledger, r, ref, log)
            files = [backfill_samples(out, scale, ledger, r, ref, log) for r in (run, base)]
            if None in files:
                continue
            boot = boot or PairedBootstrap(*_reference_statistics(scale, ref, cache_dir))
            reps = boot.replicates(*(_sample_features(f, cache_dir) for f in files))
            new = not os.path.isfile(path)
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["arm", "seed", "draw", "dfid"])
                w.writerows([arm, seed, i, f"{d:.6f}"] for i, d in enumerate(reps))
            log(f"study: {run}: paired bootstrap of FID - baseline's, {len(reps)} draws: "
                f"2.5-97.5% [{np.percentile(reps, 2.5):+.2f}, {np.percentile(reps, 97.5):+.2f}]")
    return path


def _committed_seeds(ledger: str, scale: Scale) -> List[int]:
    folder = os.path.join(ledger, scale.name)
    runs = [d for d in os.listdir(folder) if in_ledger(ledger, scale, d)] if os.path.isdir(folder) else []
    return sorted({int(d.rsplit("-s", 1)[1]) for d in runs})


def read_bootstrap(path: str) -> List[Tuple[str, int, float]]:
    """The (arm, seed, paired FID difference) rows of a ``bootstrap.csv`` ([] when it is missing)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [(r["arm"], int(r["seed"]), float(r["dfid"])) for r in csv.DictReader(f)]


def bootstrap_interval(path: str, arm: str, seeds: Sequence[int]) -> Optional[Tuple[float, float, int]]:
    """
    The 95% interval (2.5 and 97.5 percentiles) of the seed-mean paired FID difference of ``arm``:
    draw i of the mean is the mean over seeds of each seed's draw i (the seeds' draws are independent).

    :return: (low, high, number of seeds), or None when no seed of ``arm`` is bootstrapped.
    """
    per_seed: Dict[int, List[float]] = {}
    for a, s, d in read_bootstrap(path):
        if a == arm and s in seeds:
            per_seed.setdefault(s, []).append(d)
    if not per_seed:
        return None
    draws = min(len(v) for v in per_seed.values())
    mean = np.mean([v[:draws] for v in per_seed.values()], axis=0)
    return float(np.percentile(mean, 2.5)), float(np.percentile(mean, 97.5)), len(per_seed)


def train_and_evaluate(arm: Arm, seed: int, scale: Scale, out: str, train: str, ref: str,
                       log: Callable[[str], None] = print, heldout: str = "",
                       ledger: str = "") -> Dict[str, Any]:
    """
    Train one run (or resume it, or skip it when finished), then measure its FID/KID curve.

    ``train_s`` and ``eval_s`` are this invocation's wall seconds; a run that resumes (``resumed``)
    spent more in the attempts before, so its cost is ``train_clock_s``, the training's own clock.

    :return: ``{"run", "trained", "train_s", "eval_s", "resumed", "train_clock_s"}``.
    """
    run_dir = os.path.join(out, "runs", run_name(arm.name, seed))
    log_path = os.path.join(out, "logs", run_name(arm.name, seed) + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = _env(scale.threads)
    info: Dict[str, Any] = {"run": run_name(arm.name, seed), "trained": False, "train_s": 0.0, "eval_s": 0.0,
                            "resumed": os.path.isdir(run_dir) and bool(list_complete_checkpoints(run_dir))}
    t0 = time.time()
    if run_finished(run_dir, scale.total_steps):
        log(f"study: {info['run']}: finished earlier, not trained again")
    else:
        log(f"study: {info['run']}: training ({arm.description}, seed {seed})")
        _call([sys.executable, os.path.join(SCRIPTS, "image_train.py")]
              + flags_to_argv(arm_flags(arm, scale, seed, train, run_dir)), log_path, env)
        info["trained"] = True
        info["train_s"] = time.time() - t0
    t1 = time.time()
    keep = {"keep_samples": True} if keeps_samples(arm.name, scale) else {}
    _call([sys.executable, os.path.join(SCRIPTS, "fid_curve.py"), run_dir]
          + flags_to_argv({**fid_flags(scale, ref, os.path.join(out, "cache")), **keep}), log_path, env)
    if keeps_samples(arm.name, scale):
        _call([sys.executable, os.path.join(SCRIPTS, "fid_curve.py"), run_dir]
              + flags_to_argv({**fid_flags(scale, ref, os.path.join(out, "cache")), **second_sampler(scale),
                               "steps": str(scale.total_steps)}), log_path, env)
    if heldout:
        probe_run(run_dir, scale, heldout)
    info["eval_s"] = time.time() - t1
    info["train_clock_s"] = training_clock_s(run_dir)
    if ledger:
        commit_to_ledger(ledger, scale, run_dir, info["run"],
                         {k: info[k] for k in ("train_s", "eval_s", "train_clock_s", "resumed")})
    log(f"study: {info['run']}: done (train {info['train_s']:.0f} s, eval {info['eval_s']:.0f} s)")
    return info


def _warm_reference(scale: Scale, ref: str, cache_dir: str) -> None:
    """Compute the reference's Inception features once, before runs evaluate in parallel."""
    evaluate(ref, load_batch(ref, max_images=2), metrics=("fid", "kid"), extractor="offline",
             batch_size=32, device="cpu", cache_dir=cache_dir)


def _update_timing(out: str, key: str, seconds: float) -> Dict[str, float]:
    path = os.path.join(out, "timing.json")
    timing: Dict[str, float] = {}
    if os.path.isfile(path):
        with open(path) as f:
            timing = json.load(f)
    timing[key] = timing.get(key, 0.0) + seconds
    atomic_write(path, lambda f: json.dump(timing, f, indent=1), text=True)
    return timing


def run_study(out: str, scale: Scale, arms: Sequence[Arm] = ARMS, seeds: Optional[Sequence[int]] = None,
              source: str = "", jobs: Optional[int] = None, log: Callable[[str], None] = print,
              ledger: str = "") -> Dict[str, Any]:
    """
    Run (or continue) the study and write its summary.

    With ``ledger`` (the committed results, default ``docs/study/ledger`` from the script), a run
    whose results are in the ledger is neither trained nor evaluated again, a run that finishes is
    copied there at once (``commit_to_ledger``), and the summary is computed from the ledger alone.

    :param out: the study folder.
    :param scale: the preset.
    :param arms: the arms to run (default all of ``ARMS``).
    :param seeds: the seeds (default the preset's).
    :param source: CIFAR-10 source for ``prepare_data``.
    :param jobs: runs at once (default the preset's).
    :return: the summary (see ``summarize``) with ``"runs"``: one info dict per run.
    """
    seeds = tuple(seeds) if seeds else scale.seeds
    jobs = jobs or scale.jobs
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump({"scale": asdict(scale), "arms": [asdict(a) for a in arms], "seeds": list(seeds)}, f, indent=1)
    t0 = time.time()
    train, ref = prepare_data(out, scale, source, log)
    cache_dir = os.path.join(out, "cache")
    # arm-major: an arm's seeds finish together, so its paired differences exist as early as possible
    todo = [(a, s) for a in arms for s in seeds]
    if ledger:
        pending = [(a, s) for a, s in todo if not in_ledger(ledger, scale, run_name(a.name, s))]
    else:
        pending = [(a, s) for a, s in todo
                   if not run_finished(os.path.join(out, "runs", run_name(a.name, s)), scale.total_steps)
                   or _missing_points(os.path.join(out, "runs", run_name(a.name, s)), scale)]
    infos: List[Dict[str, Any]] = []
    if pending:
        _warm_reference(scale, ref, cache_dir)
        heldout = prepare_heldout(out, scale, source, log)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            infos = list(pool.map(lambda job: train_and_evaluate(job[0], job[1], scale, out, train, ref, log,
                                                                 heldout=heldout, ledger=ledger), pending))
        _update_timing(out, "wall_s", time.time() - t0)
    if ledger:
        bootstrap_study(out, scale, ledger, ref, log)
    if not pending:
        log(f"study: all {len(todo)} runs finished and measured; nothing to train")
    summary = summarize(out, scale, arms, seeds, ledger=ledger)
    summary["runs"] = infos
    return summary


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def _sampler_key(use_ddim: bool, respacing: str) -> Tuple[str, int]:
    """The (sampler, sampling_steps) columns fid_curve.py writes for a DDIM/ancestral respacing."""
    digits = respacing[len("ddim"):] if respacing.startswith("ddim") else respacing
    return ("ddim" if use_ddim else "ddpm"), int(digits)


def _curve(run_dir: str, scale: Scale, second: bool = False) -> List[Tuple[int, float, float]]:
    """
    (step, fid, kid) rows of the run's fid_curve.csv measured with the study's settings: its
    DDIM sampler, or with ``second`` the ancestral ``SECOND_SAMPLER``, at the scale's evaluation
    steps (the FDM pair's ledger also holds a point at the step its first try was stopped at,
    measured before ``fid_flags`` named the steps).
    """
    steps = set(scale.eval_steps())
    path = os.path.join(run_dir, "fid_curve.csv")
    if not os.path.isfile(path):
        return []
    second_flags = second_sampler(scale)
    want = (_sampler_key(second_flags["use_ddim"], second_flags["timestep_respacing"]) if second
            else _sampler_key(True, scale.sampling))
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if int(r["num_samples"]) != scale.num_samples or not r.get("fid") or int(r["step"]) not in steps:
                continue
            if r.get("sampler") and (r["sampler"], int(r["sampling_steps"])) != want:
                continue
            rows.append((int(r["step"]), float(r["fid"]), float(r["kid"]) if r.get("kid") else math.nan))
    return sorted(set(rows))


def _missing_points(run_dir: str, scale: Scale) -> List[int]:
    have = {s for s, _, _ in _curve(run_dir, scale)}
    return [s for s in scale.eval_steps() if s not in have]


def iterations_to_reach(curve: Sequence[Tuple[int, float]], target: float) -> Optional[float]:
    """
    The first iteration at which a curve reaches ``target`` (linear interpolation between its
    measured points), or None when it never does. A curve already below ``target`` at its
    first point reaches it there.
    """
    prev: Optional[Tuple[int, float]] = None
    for step, value in curve:
        if value <= target:
            if prev is None:
                return float(step)
            s0, v0 = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        prev = (step, value)
    return None


def _mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(out: str, scale: Scale, arms: Sequence[Arm] = ARMS, seeds: Optional[Sequence[int]] = None,
              log: Callable[[str], None] = print, ledger: str = "") -> Dict[str, Any]:
    """
    Read every run's FID/KID curve and write ``summary.csv``, ``summary.md``, ``curves.png``,
    ``probe.png`` and, where the scale runs the ablations, ``ablation.png`` and one
    ``curves_<group>.png`` per group of ``GROUP_FIGURES`` that has runs.

    Per arm: final FID and KID (mean and sample standard deviation over seeds, and each seed's
    value), and the iterations each seed needs to reach the baseline's mean final FID.

    :return: ``{"arms": {name: {...}}, "table": markdown text}``.
    """
    seeds = tuple(seeds) if seeds else scale.seeds

    def folder(arm: str, seed: int) -> str:
        return (ledger_dir(ledger, scale, run_name(arm, seed)) if ledger
                else os.path.join(out, "runs", run_name(arm, seed)))

    if ledger:  # the committed results decide: every arm and seed committed for this scale, in ARMS' order
        out = os.path.join(ledger, scale.name)
        os.makedirs(out, exist_ok=True)
        done = [d for d in sorted(os.listdir(out)) if not d.endswith(".tmp") and in_ledger(ledger, scale, d)]
        seeds = tuple(sorted({int(d.rsplit("-s", 1)[1]) for d in done}))
        arms = [a for a in ARMS if any(run_name(a.name, s) in done for s in seeds)]
        if not arms:
            log(f"study: no committed results in {out} yet")
            return {"arms": {}, "table": "", "target_fid": None}
    curves = {(a.name, s): _curve(folder(a.name, s), scale) for a in arms for s in seeds}
    final = scale.total_steps
    per_arm: Dict[str, Dict[str, Any]] = {}
    for a in arms:
        fids = {s: next((f for st, f, _ in curves[(a.name, s)] if st == final), None) for s in seeds}
        kids = {s: next((k for st, _, k in curves[(a.name, s)] if st == final), None) for s in seeds}
        per_arm[a.name] = {"final_fid": fids, "final_kid": kids}
    base = [v for v in per_arm.get("baseline", {}).get("final_fid", {}).values() if v is not None]
    target = float(np.mean(base)) if base else None
    rows = []
    for a in arms:
        d = per_arm[a.name]
        reach = {s: (iterations_to_reach([(st, f) for st, f, _ in curves[(a.name, s)]], target)
                     if target is not None else None) for s in seeds}
        d["reach"] = reach
        fm, fs = _mean_sd(list(d["final_fid"].values()))
        km, ks = _mean_sd(list(d["final_kid"].values()))
        reached = [r for r in reach.values() if r is not None]
        rm, rs = _mean_sd(reached)
        d.update(fid_mean=fm, fid_sd=fs, kid_mean=km, kid_sd=ks, reach_mean=rm, reach_sd=rs,
                 reached=len(reached), n=sum(v is not None for v in d["final_fid"].values()))
        rows.append({"arm": a.name, "description": a.description, "seeds": " ".join(map(str, seeds)),
                     "final_fid_mean": fm, "final_fid_sd": fs,
                     "final_fid_per_seed": " ".join(_fmt(d["final_fid"][s]) for s in seeds),
                     "final_kid_mean": km, "final_kid_sd": ks,
                     "iters_to_baseline_fid_mean": rm, "iters_to_baseline_fid_sd": rs,
                     "iters_per_seed": _iters_per_seed({s: reach[s] for s in seeds if d["final_fid"][s] is not None},
                                                       seeds),
                     "reached": d["reached"], "n": d["n"]})
        rows[-1].update(_paired(d["final_fid"], per_arm.get("baseline", {}).get("final_fid", {}), "paired_dfid"))
        # the other way round: where the baseline of the same seed reaches this arm's final FID (the speed-up)
        back = {s: iterations_to_reach([(st, f) for st, f, _ in curves.get(("baseline", s), [])], d["final_fid"][s])
                for s in seeds if d["final_fid"][s] is not None and curves.get(("baseline", s))}
        bm, bsd = _mean_sd([v for v in back.values() if v is not None])
        rows[-1].update(baseline_iters_to_arm_mean=bm, baseline_iters_to_arm_sd=bsd,
                        baseline_iters_to_arm_per_seed=_iters_per_seed(back, seeds))
        second = {s: next((f for st, f, _ in _curve(folder(a.name, s), scale, second=True) if st == final), None)
                  for s in seeds}
        base2 = {s: next((f for st, f, _ in _curve(folder("baseline", s), scale, second=True) if st == final), None)
                 for s in seeds}
        d["second_fid"] = second
        sm, ss = _mean_sd(list(second.values()))
        rows[-1].update(second_fid_mean=sm, second_fid_sd=ss, **_paired(second, base2, "second_paired_dfid"))
        ci = bootstrap_interval(os.path.join(out, BOOTSTRAP_FILE), a.name, seeds) if ledger else None
        rows[-1].update(boot_dfid_lo=ci[0] if ci else math.nan, boot_dfid_hi=ci[1] if ci else math.nan,
                        boot_n=ci[2] if ci else 0)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = _markdown_table(rows, scale, target)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    # with the ablations, the arms are many: curves.png shows the headline arms, curves_<group>.png the rest
    shown = [a for a in arms if a.name in HEADLINE] if scale.ablation_figures else arms
    _plot(out, scale, shown or arms, seeds, curves, title=", headline arms" if scale.ablation_figures else "")
    for group in GROUP_FIGURES if scale.ablation_figures else ():  # one per group that has runs, with the baseline
        members = [a for a in arms if a.name == "baseline" or a.name in GROUPS[group]]
        if any(a.name != "baseline" for a in members):
            _plot(out, scale, members, seeds, curves, name=f"curves_{group}.png", title=f", {group}")
    if scale.ablation_figures:
        _plot_ablations(out, scale, per_arm)
    probes = {(a.name, s): _probe_rows(folder(a.name, s), final) for a in arms for s in seeds}
    _plot_probe(out, scale, arms, seeds, probes)
    claims = (claims_table(scale, per_arm, rows, os.path.join(out, BOOTSTRAP_FILE), seeds,
                           probe=probe_relative(probes, _BEST, seeds), lead=paired_lead(curves, _BEST, seeds))
              if ledger else "")
    if ledger:
        with open(os.path.join(out, "claims.md"), "w") as f:
            f.write(claims)
    log(table)
    return {"arms": per_arm, "table": table, "target_fid": target, "rows": rows, "claims": claims}


# ---------------------------------------------------------------------------------------------
# The paper's claims against the ledger (docs/study.md's generated section)
# ---------------------------------------------------------------------------------------------

# docs/study.md's generated parts, per scale: the per-arm table (``summary.md``) and the claims table
DOC_PARTS = ("summary", "claims")
# the scales docs/study.md shows, each with the arms `make study` reprints for it
PAGE_SCALES = (("cpu", "first"), ("cpu_long", "long"))


def doc_markers(scale: str, part: str = "claims") -> Tuple[str, str]:
    """The lines around a scale's generated ``part`` (one of ``DOC_PARTS``) in docs/study.md."""
    if part not in DOC_PARTS:
        raise ValueError(f"docs/study.md part: expected one of {DOC_PARTS}, got {part!r}")
    return (f"<!-- {part} {scale}: generated by `make study` from the ledger; do not edit -->",
            f"<!-- {part} {scale}: end -->")


def _seed_diffs(per_arm: Dict[str, Dict[str, Any]], arm: str, other: str, key: str = "final_fid") -> List[float]:
    """Final FID of ``arm`` minus that of ``other``, per seed both have (they share the sampling noise);
    ``key="second_fid"``: with the second (ancestral) sampler."""
    a = per_arm.get(arm, {}).get(key, {})
    b = per_arm.get(other, {}).get(key, {})
    return [a[s] - b[s] for s in sorted(a) if a.get(s) is not None and b.get(s) is not None]


#: the two-sided level of the verdicts' paired t-tests
VERDICT_ALPHA = 0.05


def paired_noise(per_arm: Dict[str, Dict[str, Any]], key: str = "final_fid") -> Optional[Tuple[float, int]]:
    """
    The seed-to-seed noise of a paired difference at one scale: the sd of every arm's per-seed
    difference to the baseline around that arm's own mean, pooled over the arms with two or more
    paired seeds (the within-arm mean square of a one-way layout), and its degrees of freedom
    ``sum(n_arm - 1)``. None when no arm has two paired seeds. Two seeds give one degree of freedom
    per arm, far too few to test an arm alone; pooled over the study's arms they give a usable
    estimate, on the reading that training-seed noise is of one size across arms.
    """
    ss, df = 0.0, 0
    for arm in per_arm:
        if arm == "baseline":
            continue
        d = np.asarray(_seed_diffs(per_arm, arm, "baseline", key), dtype=float)
        if len(d) >= 2:
            ss += float(((d - d.mean()) ** 2).sum())
            df += len(d) - 1
    return (math.sqrt(ss / df), df) if df else None


def verdict(diffs: Sequence[float], interval: Optional[Tuple[float, float, int]] = None,
            noise: Optional[Tuple[float, int]] = None) -> str:
    """
    The verdict on "the arm has the lower FID" from paired differences (arm - other, per seed):

    - with a bootstrap interval of the seed mean over two or more seeds: ``supported`` when it
      lies below 0, ``contradicted`` when it lies above 0, ``inconclusive`` when it holds 0 (an
      interval of one seed holds the sampling noise only, not the seed-to-seed noise: it does
      not decide);
    - without one, a two-sided paired t-test at level ``VERDICT_ALPHA``: t = mean / (sd / sqrt(n))
      against Student's t with df degrees of freedom, sd and df from ``noise`` (``paired_noise``,
      pooled over the scale's arms) or else the differences' own (df = n - 1): ``supported``
      when the mean is significantly below 0, ``contradicted`` when significantly above,
      else ``inconclusive``;
    - ``not measured`` with no paired seed, ``inconclusive`` with a single seed and neither an
      interval nor ``noise``.
    """
    if interval is not None and interval[2] >= 2:
        lo, hi, _ = interval
        return "supported" if hi < 0 else "contradicted" if lo > 0 else "inconclusive"
    if not diffs:
        return "not measured"
    m, own_sd = _mean_sd(diffs)
    if noise is not None:
        sd, df = noise
    elif len(diffs) >= 2:
        sd, df = own_sd, len(diffs) - 1
    else:
        return "inconclusive"
    se = sd / math.sqrt(len(diffs))
    crit = float(student_t.ppf(1.0 - VERDICT_ALPHA / 2.0, df))
    if se == 0.0:
        return "supported" if m < 0 else "contradicted" if m > 0 else "inconclusive"
    t = m / se
    return "supported" if t < -crit else "contradicted" if t > crit else "inconclusive"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _diff_text(diffs: Sequence[float], interval: Optional[Tuple[float, float, int]] = None) -> str:
    if not diffs:
        return "no paired runs yet"
    m, sd = _mean_sd(diffs)
    text = f"ΔFID {m:+.2f} ± {sd:.2f} (n={len(diffs)}: {', '.join(f'{d:+.2f}' for d in diffs)})"
    if interval is not None:
        text += f", 95% [{interval[0]:+.2f}, {interval[1]:+.2f}]"
    return text


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


def _best_of(per_arm: Dict[str, Dict[str, Any]], names: Sequence[str], label: Callable[[str], str],
             expected: str, noise: Optional[Tuple[float, int]] = None) -> Tuple[str, str]:
    """(measured, verdict) of "``expected`` is the best of ``names``": the lowest mean final FID, and
    whether each other arm is worse than ``expected`` (paired by seed)."""
    have = [n for n in names if per_arm.get(n, {}).get("final_fid")
            and any(v is not None for v in per_arm[n]["final_fid"].values())]
    if len(have) < 2 or expected not in have:
        return f"{len(have)} of {len(names)} arms measured", "not measured"
    means = {n: _mean_sd(list(per_arm[n]["final_fid"].values()))[0] for n in have}
    best = min(have, key=lambda n: means[n])
    others = [verdict(_seed_diffs(per_arm, expected, n), noise=noise) for n in have if n != expected]
    text = "; ".join(f"{label(n)}: {means[n]:.2f}" for n in have) + f" (best {label(best)})"
    if best == expected and all(v == "supported" for v in others):
        return text, "supported"
    if best != expected and verdict(_seed_diffs(per_arm, best, expected), noise=noise) == "supported":
        return text, "contradicted"
    return text, "inconclusive"


def claims_table(scale: Scale, per_arm: Dict[str, Dict[str, Any]], rows: Sequence[Dict[str, Any]],
                 bootstrap_path: str, seeds: Sequence[int],
                 probe: Optional[Dict[int, Tuple[float, float, int]]] = None,
                 lead: Optional[Dict[int, Tuple[float, int]]] = None) -> str:
    """
    The paper's claims, what it reports, what the ledger measured at ``scale`` and a ``verdict``
    each (markdown): the CLTS/MDLRC speed-up (Fig. 5), the modules (Fig. 6a), mu (Fig. 6b), the
    target iteration (Fig. 6c), the comparisons (Tables 2-3) and the reading of sigma.
    """
    by_arm = {r["arm"]: r for r in rows}
    full = f"{_BEST}_mdlrc"
    noise = paired_noise(per_arm)

    def vs(arm: str, other: str = "baseline") -> Tuple[str, str]:
        ci = bootstrap_interval(bootstrap_path, arm, seeds) if other == "baseline" else None
        d = _seed_diffs(per_arm, arm, other)
        return _diff_text(d, ci), verdict(d, ci, noise)

    def speedup(arm: str) -> str:
        r = by_arm.get(arm)
        if not r or not r["reached"]:
            return "" if not r else f"; never reaches the baseline's final FID in {scale.total_steps} steps"
        return (f"; reaches the baseline's final FID at step {r['iters_to_baseline_fid_mean']:.0f} "
                f"({scale.total_steps / r['iters_to_baseline_fid_mean']:.2f}× fewer iterations, "
                f"{r['reached']} of {r['n']} seeds)")

    lines = [f"Scale `{scale.name}`: final step {scale.total_steps}, FID of {scale.num_samples} samples; ΔFID = the "
             "first arm's final FID minus the second's, per seed (shared sampling noise), mean ± sd; the interval "
             "is the paired bootstrap's, where committed. Verdict: the interval where it spans two or more seeds, else a paired "
             f"t-test at {100 * VERDICT_ALPHA:g}% (two-sided) with the seed noise pooled over the scale's arms"
             + (f" (sd {noise[0]:.2f} FID, {noise[1]} degrees of freedom)" if noise else "")
             + "; rules: `experiments/study.py: verdict`.", "",
             "| claim | the paper | measured here | verdict |", "|---|---|---|---|"]

    def add(claim: str, paper: str, measured: str, v: str) -> None:
        lines.append(f"| {claim} | {paper} | {measured} | {v} |")

    m, v = vs(full)
    add(f"CLTS + MDLRC ({full}) trains faster than the baseline (Fig. 5)",
        "about 2× fewer iterations to the baseline's FID on CIFAR-10 (2.6× on ImageNet-128)", m + speedup(full), v)
    for arm, what in (("md_only", "momentum decay alone"), ("mdlrc", "MDLRC"), (_BEST, "CLTS")):
        m, v = vs(arm)
        add(f"{what} ({arm}) helps on its own (Fig. 6a)", "each module lowers FID; all together lowest",
            m + speedup(arm), v)
    for arm in ("md_only", "mdlrc", _BEST):
        m, v = vs(full, arm)
        add(f"all modules beat {arm} (Fig. 6a)", "all together lowest", m, v)
    m, v = _best_of(per_arm, GROUPS["mu"], lambda n: "μ " + ablation_value(n, "mu", scale), _BEST, noise)
    add("μ of the target Gaussian: best near 0.3 (Fig. 6b)", "best FID at μ ≈ 0.3", m, v)
    m, v = _best_of(per_arm, GROUPS["target"], lambda n: "target " + ablation_value(n, "target", scale), _BEST, noise)
    add(f"target iteration: best near 1/5 of the run ({scale.clts_target_steps}) (Fig. 6c)",
        "best FID near 100k of about 500k iterations", m, v)
    for arm in GROUPS["comparisons"]:
        m, v = vs(full, arm)
        add(f"CLTS + MDLRC beats {arm} (Tables 2-3)", "ahead of Min-SNR and FDM (and of the other baselines)", m, v)
    m, v = _best_of(per_arm, [n for n in GROUPS["sigma"] if n != "baseline"],
                    lambda n: "σ " + ablation_value(n, "sigma", scale), _BEST, noise)
    add(f"σ of the target Gaussian: {BEST_SIGMA} (this repository's study reading)", "Eq. 7: \"standard variance 1\"",
        m, v)
    m, v = vs("clts_s1.0")
    add("CLTS with σ = 1.0 (Eq. 7's literal reading, the default until 2026-12-03) helps",
        "(the paper's legible text)", m, v)
    d2 = _seed_diffs(per_arm, _BEST, "baseline", "second_fid")
    add(f"{_BEST}'s gain holds with the ancestral sampler (100 steps, many at high noise)",
        "(the paper evaluates with its own samplers)", _diff_text(d2), verdict(d2, noise=paired_noise(per_arm, "second_fid")))
    if lead:
        add(f"{_BEST}'s paired ΔFID vs the baseline at every evaluated checkpoint (mean over "
            f"{_seeds(max(n for _, n in lead.values()))})", "Fig. 5: the gap to the baseline along training",
            ", ".join(f"step {st}: {m_:+.2f}" for st, (m_, _) in lead.items()), "a measurement")
    if probe:
        text = ", ".join(f"t {t}: {100 * m_:+.1f}%" for t, (m_, _, _) in sorted(probe.items()))
        add(f"{_BEST}'s held-out ε-MSE vs the baseline's at step {scale.total_steps} (mean over "
            f"{_seeds(max(n for _, _, n in probe.values()))})",
            "Fig. 2: the structure of the output forms at high noise", text, "a measurement")
    return "\n".join(lines) + "\n"


def write_doc_section(doc: str, scale: str, table: str, part: str = "claims") -> bool:
    """Replace the scale's generated ``part`` (between its ``doc_markers``) of ``doc`` by ``table``;
    True when it changed, False also when ``doc`` or the markers are missing."""
    begin, end = doc_markers(scale, part)
    if not os.path.isfile(doc):
        return False
    with open(doc) as f:
        text = f.read()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + begin + "\n" + table + end + tail
    if new != text:
        atomic_write_text(doc, new)
    return new != text


def _paired(arm: Dict[int, Optional[float]], base: Dict[int, Optional[float]], key: str) -> Dict[str, Any]:
    """Per-seed differences arm - baseline of the same seed (the runs share sampling noise): mean, sd, n."""
    diffs = [arm[s] - base[s] for s in arm if arm.get(s) is not None and base.get(s) is not None]
    m, sd = _mean_sd(diffs)
    return {f"{key}_mean": m, f"{key}_sd": sd, f"{key}_n": len(diffs),
            f"{key}_per_seed": " ".join(f"{d:+.2f}" for d in diffs)}


def _probe_rows(run_dir: str, step: int) -> Dict[int, float]:
    """t -> held-out epsilon-MSE of the run's EMA model at ``step`` (its probe.csv), {} when absent."""
    path = os.path.join(run_dir, "probe.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {int(r["t"]): float(r["mse"]) for r in csv.DictReader(f) if int(r["step"]) == step}


def probe_relative(probes: Dict[Tuple[str, int], Dict[int, float]], arm: str,
                   seeds: Sequence[int]) -> Dict[int, Tuple[float, float, int]]:
    """t -> (mean, sd, n) over seeds of arm/baseline - 1 of the held-out loss, paired by seed."""
    out: Dict[int, Tuple[float, float, int]] = {}
    ts = sorted(set().union(*(probes.get((arm, s), {}).keys() for s in seeds)))
    for t in ts:
        rel = [probes[(arm, s)][t] / probes[("baseline", s)][t] - 1.0 for s in seeds
               if t in probes.get((arm, s), {}) and t in probes.get(("baseline", s), {})]
        if rel:
            m, sd = _mean_sd(rel)
            out[t] = (m, sd, len(rel))
    return out


def _plot_probe(out: str, scale: Scale, arms: Sequence[Arm], seeds: Sequence[int],
                probes: Dict[Tuple[str, int], Dict[int, float]]) -> Optional[str]:
    plt = pyplot(required=False)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for a in arms:
        if a.name == "baseline":
            continue
        rel = probe_relative(probes, a.name, seeds)
        if not rel:
            continue
        ts = sorted(rel)
        ax.plot(ts, [100 * rel[t][0] for t in ts], marker="o", label=a.name, **_line_style(drawn))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("held-out eps-MSE vs baseline (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"EMA model at step {scale.total_steps}: denoising loss relative to the baseline of the same seed "
                 f"({PROBE_IMAGES} CIFAR-10 test images, fixed noise)", fontsize=8)
    return _save(fig, os.path.join(out, "probe.png"))


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _iters_per_seed(iters: Dict[int, Optional[float]], seeds: Sequence[int]) -> str:
    """One entry per seed: the iterations, "never" when that seed's run did not get there, "n/a" when
    there is no run of that seed (the seed is not in ``iters``)."""
    return " ".join("n/a" if s not in iters else "never" if iters[s] is None else _fmt(iters[s], 0) for s in seeds)


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _markdown_table(rows: List[Dict[str, Any]], scale: Scale, target: Optional[float]) -> str:
    lines = [f"Final step {scale.total_steps}; FID/KID from {scale.num_samples} samples ({scale.sampling}, EMA "
             f"{scale.ema_rate}) vs {scale.ref_images} CIFAR-10 training images at {scale.image_size}x"
             f"{scale.image_size}; mean ± sample sd over seeds. Iterations to reach the baseline's mean final "
             f"FID ({_fmt(target)}), interpolated between checkpoints every {scale.eval_every} steps. "
             f"Paired ΔFID: arm minus the baseline of the same seed (common sampling noise); its interval: "
             f"{BOOTSTRAP_DRAWS} paired resamples of the final samples per seed, 2.5-97.5% of the seed mean.", "",
             "| arm | final FID | per seed | ΔFID vs baseline, paired | its 95% bootstrap interval | final KID ×1e3 "
             "| iters to baseline FID | per seed | baseline's iters to this FID (per seed) "
             "| ancestral-100 FID | its paired ΔFID |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kid = (f"{r['final_kid_mean'] * 1e3:.1f} ± {r['final_kid_sd'] * 1e3:.1f}"
               if not math.isnan(r["final_kid_mean"]) else "n/a")
        reached, n = r["reached"], r["n"]
        reach = ("never" if not reached else
                 f"{r['iters_to_baseline_fid_mean']:.0f} ± {r['iters_to_baseline_fid_sd']:.0f}" if reached == n else
                 f"{r['iters_to_baseline_fid_mean']:.0f} ({reached} of {n} seeds)")
        paired = (f"{r['paired_dfid_mean']:+.2f} ± {_fmt(r['paired_dfid_sd'])} (n={r['paired_dfid_n']})"
                  if r["paired_dfid_n"] and r["arm"] != "baseline" else "")
        second = (f"{_fmt(r['second_fid_mean'])} ± {_fmt(r['second_fid_sd'])}"
                  if not math.isnan(r["second_fid_mean"]) else "")
        second_d = (f"{r['second_paired_dfid_mean']:+.2f} ± {_fmt(r['second_paired_dfid_sd'])}"
                    if r["second_paired_dfid_n"] and r["arm"] != "baseline" else "")
        boot = (f"[{r['boot_dfid_lo']:+.2f}, {r['boot_dfid_hi']:+.2f}] ({_seeds(r['boot_n'])})"
                if r["boot_n"] else "")
        lines.append(f"| {r['arm']} | {_fmt(r['final_fid_mean'])} ± {_fmt(r['final_fid_sd'])} (n={r['n']}) | "
                     f"{r['final_fid_per_seed']} | {paired} | {boot} | {kid} | {reach} | {r['iters_per_seed']} | "
                     f"{r['baseline_iters_to_arm_per_seed'] if r['arm'] != 'baseline' else ''} | "
                     f"{second} | {second_d} |")
    return "\n".join(lines) + "\n"


# the panels of ablation.png (the paper's Fig. 6 and Tables 2-3): (title, group, x label of an arm at a scale)
ABLATION_PANELS: Tuple[Tuple[str, str, Callable[[str, Scale], str]], ...] = (
    ("modules (Fig. 6a)", "modules", lambda n, sc: n.replace(_BEST, "CLTS").replace("_", " ").strip()),
    ("μ of the target Gaussian (Fig. 6b)", "mu", lambda n, sc: ablation_value(n, "mu", sc)),
    ("target iteration (Fig. 6c)", "target", lambda n, sc: ablation_value(n, "target", sc)),
    ("σ of the target Gaussian", "sigma", lambda n, sc: ablation_value(n, "sigma", sc)),
    ("comparisons (Tables 2-3)", "comparisons", lambda n, sc: n.replace(_BEST, "CLTS").replace("_", " ")),
)


def _plot_ablations(out: str, scale: Scale, per_arm: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """``ablation.png``: each group's final FID per arm (a diamond: the mean over seeds, dots: the
    seeds), the baseline's mean as a dashed line; the comparisons panel also shows CLTS + MDLRC."""
    plt = pyplot(required=False)
    if plt is None:
        return None

    def fids(name: str) -> List[float]:
        return [v for v in per_arm.get(name, {}).get("final_fid", {}).values() if v is not None]

    base = fids("baseline")
    fig, axes = plt.subplots(1, len(ABLATION_PANELS), figsize=(4 * len(ABLATION_PANELS), 4), sharey=True)
    for ax, (title, group, label) in zip(axes, ABLATION_PANELS):
        names = [n for n in GROUPS[group] if n != "baseline"]
        if group == "comparisons":
            names.append(f"{_BEST}_mdlrc")
        names = [n for n in names if fids(n)]
        if group in ("mu", "target", "sigma"):  # a numeric axis: in order of the value
            names.sort(key=lambda n: float(label(n, scale)))
        for i, n in enumerate(names):
            v = fids(n)
            ax.plot(i, float(np.mean(v)), "D", ms=8, color="C1" if n == _BEST else "C0")
            ax.plot([i] * len(v), v, "k.", ms=5)
        ax.set_xticks(range(len(names)))
        ax.set_xlim(-0.5, max(len(names), 1) - 0.5)
        ax.set_xticklabels([label(n, scale) for n in names], rotation=30, ha="right", fontsize=8)
        if base:
            ax.axhline(float(np.mean(base)), color="k", ls="--", lw=1, label="baseline")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if not names:
            ax.text(0.5, 0.5, "not measured yet", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel(f"final FID (step {scale.total_steps})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 {scale.image_size}px study ({scale.name}): final FID per arm; diamond = mean over seeds, "
                 f"dots = seeds, orange = {_BEST} (the best σ, μ 0.3, target 1/5 of the run)", fontsize=9)
    return _save(fig, os.path.join(out, "ablation.png"))


def seed_band(curves: Dict[Tuple[str, int], List[Tuple[int, float, float]]], arm: str, seeds: Sequence[int],
              col: int = 1) -> Tuple[List[int], np.ndarray]:
    """
    An arm's curve over the seeds it has (of ``seeds``; the headline arms have a third seed the
    others lack): the steps every one of those seeds measured, and a (seeds, steps) array of column
    ``col`` of ``curves`` (1: FID, 2: KID). ``([], empty)`` when the arm has no curve.
    """
    series = [dict((r[0], r[col]) for r in curves[(arm, s)]) for s in seeds if curves.get((arm, s))]
    steps = sorted(set.intersection(*(set(d) for d in series))) if series else []
    return steps, np.array([[d[st] for st in steps] for d in series], dtype=float)


def paired_lead(curves: Dict[Tuple[str, int], List[Tuple[int, float, float]]], arm: str,
                seeds: Sequence[int]) -> Dict[int, Tuple[float, int]]:
    """
    step -> (mean over seeds of FID(arm) - FID(baseline) of the same seed, number of seeds), at
    every checkpoint both runs of a seed evaluated: where along training an arm leads or trails.
    """
    per_step: Dict[int, List[float]] = {}
    for s in seeds:
        a = {r[0]: r[1] for r in curves.get((arm, s), [])}
        b = {r[0]: r[1] for r in curves.get(("baseline", s), [])}
        for st in sorted(set(a) & set(b)):
            if a[st] is not None and b[st] is not None:
                per_step.setdefault(st, []).append(a[st] - b[st])
    return {st: (float(np.mean(d)), len(d)) for st, d in sorted(per_step.items())}


def _line_style(i: int) -> Dict[str, Any]:
    """The i-th line's colour and dash: ten colours, then the same ten dashed, then dotted (figures
    with more arms than colours stay readable)."""
    return {"color": f"C{i % 10}", "ls": ("-", "--", ":")[(i // 10) % 3]}


def _plot(out: str, scale: Scale, arms: Sequence[Arm], seeds: Sequence[int],
          curves: Dict[Tuple[str, int], List[Tuple[int, float, float]]], name: str = "curves.png",
          title: str = "") -> Optional[str]:
    plt = pyplot(required=False)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, a in enumerate(arms):
        for ax, col in zip(axes, (1, 2)):
            steps, vals = seed_band(curves, a.name, seeds, col)
            if not steps:
                continue
            vals = vals * (1e3 if col == 2 else 1.0)
            line, = ax.plot(steps, vals.mean(0), marker="o", label=a.name, **_line_style(i))
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel("FID")
    axes[1].set_ylabel("KID ×1e3")
    for ax in axes:
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 {scale.image_size}px study ({scale.name} preset){title}: mean over each arm's seeds "
                 f"(of {', '.join(map(str, seeds))}), band = min-max", fontsize=10)
    return _save(fig, os.path.join(out, name))


def preset(name: str, **overrides: Any) -> Scale:
    """A preset by name (``--scale``), with fields replaced by ``overrides``."""
    if name not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {name!r}")
    return replace(SCALES[name], **overrides) if overrides else SCALES[name]


def export_results(out: str, dest: str) -> List[str]:
    """
    Copy the study's small result files (no checkpoints) to ``dest`` for the docs: the summary,
    the figure, timing, settings, and each run's ``progress.csv``, ``fid_curve.csv`` and
    ``config.yaml`` under ``dest/runs/<run>/``.

    :return: the files written.
    """
    written = []
    os.makedirs(dest, exist_ok=True)
    for name in ("summary.csv", "summary.md", "curves.png", "timing.json", "study.json"):
        src = os.path.join(out, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dest, name))
            written.append(os.path.join(dest, name))
    runs = os.path.join(out, "runs")
    for run in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        for name in ("progress.csv", "fid_curve.csv", "config.yaml"):
            src = os.path.join(runs, run, name)
            if os.path.isfile(src):
                os.makedirs(os.path.join(dest, "runs", run), exist_ok=True)
                shutil.copyfile(src, os.path.join(dest, "runs", run, name))
                written.append(os.path.join(dest, "runs", run, name))
    return written
