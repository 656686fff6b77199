"""
A small-scale, rerunnable study of CLTS and MDLRC (Xu et al., 2024) on CIFAR-10.

Six arms, each trained with several seeds from the same data, evaluated by FID and KID against
CIFAR-10 training images at several checkpoints (``scripts/fid_curve.py``, offline Inception):

    baseline     uniform timesteps, AdamW with beta1 = 0.9
    clts_s1.0    CLTS, sigma = 1.0 (the README's reading of the paper's Eq. 7: a fraction of T)
    clts_s0.2    CLTS, sigma = 0.2 (the sigma ablation: a target Gaussian that is not nearly flat)
    mdlrc        MDLRC: beta1 0.9 -> 0.5 over the run, lr compensated (lr ends at 0.2 x lr0)
    lr_only      control: MDLRC's lr schedule with beta1 held at 0.9 (separates the lr decay)
    clts_mdlrc   CLTS (sigma = 1.0) + MDLRC, the paper's full method

Everything goes to one folder (``--out``): ``data/`` (the prepared training and reference
images), ``runs/<arm>-s<seed>/`` (a normal training run folder: config.yaml, progress.csv,
checkpoints, fid_curve.csv), ``cache/`` (reference Inception features), ``timing.json`` and the
summary (``summary.csv``, ``summary.md``, ``curves.png``).

Resumable: a finished run (its last checkpoint set complete) is not trained again, an
interrupted one resumes from its newest complete checkpoint (``--resume auto``), and
``fid_curve.py`` skips checkpoints already in its CSV. Rerunning after completion only
reprints the summary.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

__all__ = ["Arm", "Scale", "ARMS", "SCALES", "arm_flags", "run_name", "prepare_data", "run_study",
           "summarize", "iterations_to_reach", "export_results"]


@dataclass(frozen=True)
class Arm:
    """One arm of the study: a name and the training flags that differ from the baseline."""

    name: str
    flags: Dict[str, Any]
    description: str


ARMS: Tuple[Arm, ...] = (
    Arm("baseline", {"schedule_sampler": "uniform", "momentum_decay": False},
        "uniform timesteps, AdamW beta1 = 0.9, constant lr"),
    Arm("clts_s1.0", {"schedule_sampler": "clts", "clts_std": 1.0, "momentum_decay": False},
        "CLTS, mu = 0.3, sigma = 1.0 (fractions of T)"),
    Arm("clts_s0.2", {"schedule_sampler": "clts", "clts_std": 0.2, "momentum_decay": False},
        "CLTS, mu = 0.3, sigma = 0.2 (sigma ablation)"),
    Arm("mdlrc", {"schedule_sampler": "uniform", "momentum_decay": True, "lr_compensation": True},
        "MDLRC: beta1 0.9 -> 0.5, lr compensated"),
    Arm("lr_only", {"schedule_sampler": "uniform", "momentum_decay": True, "lr_compensation": True,
                    "decay_beta1": False},
        "control: MDLRC's lr schedule, beta1 fixed at 0.9"),
    Arm("clts_mdlrc", {"schedule_sampler": "clts", "clts_std": 1.0, "momentum_decay": True,
                       "lr_compensation": True},
        "CLTS (sigma = 1.0) + MDLRC"),
)
ARM_NAMES = tuple(a.name for a in ARMS)


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
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def clts_target_steps(self) -> int:
        return max(1, int(round(self.clts_target_fraction * self.total_steps)))

    def eval_steps(self) -> List[int]:
        return list(range(self.eval_every, self.total_steps + 1, self.eval_every))


SCALES: Dict[str, Scale] = {
    # measured on 2 CPU cores (docs/study.md): ~1.2M parameters at 16x16, ~80 min for the whole study
    "cpu": Scale("cpu", image_size=16, num_channels=32, channel_mult="1,2,2", num_res_blocks=1,
                 attention_resolutions="4", total_steps=2000, batch_size=64, lr=3e-4, ema_rate="0.995",
                 eval_every=400, num_samples=300, ref_images=2000, sampling="ddim25", seeds=(1, 2),
                 jobs=2, threads=1),
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
    from PIL import Image

    from guided_diffusion.image_datasets import center_crop_arr

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
    from guided_diffusion.image_datasets import write_npz

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
    from guided_diffusion.train_util import list_complete_checkpoints

    return os.path.isdir(run_dir) and total_steps in list_complete_checkpoints(run_dir)


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
    """The ``scripts/fid_curve.py`` flags of every evaluation of the study."""
    return dict(ref=ref, num_samples=scale.num_samples, batch_size=min(scale.num_samples, 250), use_ddim=True,
                timestep_respacing=scale.sampling, seed=0, metrics="fid,kid", extractor="offline",
                cache_dir=cache_dir, progress=False, eval_batch_size=32)


def train_and_evaluate(arm: Arm, seed: int, scale: Scale, out: str, train: str, ref: str,
                       log: Callable[[str], None] = print) -> Dict[str, Any]:
    """
    Train one run (or resume it, or skip it when finished), then measure its FID/KID curve.

    :return: ``{"run", "trained", "train_s", "eval_s"}``.
    """
    run_dir = os.path.join(out, "runs", run_name(arm.name, seed))
    log_path = os.path.join(out, "logs", run_name(arm.name, seed) + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = _env(scale.threads)
    info: Dict[str, Any] = {"run": run_name(arm.name, seed), "trained": False, "train_s": 0.0, "eval_s": 0.0}
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
    _call([sys.executable, os.path.join(SCRIPTS, "fid_curve.py"), run_dir]
          + flags_to_argv(fid_flags(scale, ref, os.path.join(out, "cache"))), log_path, env)
    info["eval_s"] = time.time() - t1
    log(f"study: {info['run']}: done (train {info['train_s']:.0f} s, eval {info['eval_s']:.0f} s)")
    return info


def _warm_reference(scale: Scale, ref: str, cache_dir: str) -> None:
    """Compute the reference's Inception features once, before runs evaluate in parallel."""
    from evaluations.evaluator import evaluate, load_batch

    evaluate(ref, load_batch(ref, max_images=2), metrics=("fid", "kid"), extractor="offline",
             batch_size=32, device="cpu", cache_dir=cache_dir)


def _update_timing(out: str, key: str, seconds: float) -> Dict[str, float]:
    path = os.path.join(out, "timing.json")
    timing: Dict[str, float] = {}
    if os.path.isfile(path):
        with open(path) as f:
            timing = json.load(f)
    timing[key] = timing.get(key, 0.0) + seconds
    with open(path + ".tmp", "w") as f:
        json.dump(timing, f, indent=1)
    os.replace(path + ".tmp", path)
    return timing


def run_study(out: str, scale: Scale, arms: Sequence[Arm] = ARMS, seeds: Optional[Sequence[int]] = None,
              source: str = "", jobs: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """
    Run (or continue) the study and write its summary.

    :param out: the study folder.
    :param scale: the preset.
    :param arms: the arms to run (default all six).
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
    todo = [(a, s) for s in seeds for a in arms]
    pending = [(a, s) for a, s in todo
               if not run_finished(os.path.join(out, "runs", run_name(a.name, s)), scale.total_steps)
               or _missing_points(os.path.join(out, "runs", run_name(a.name, s)), scale)]
    infos: List[Dict[str, Any]] = []
    if pending:
        _warm_reference(scale, ref, cache_dir)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            infos = list(pool.map(lambda job: train_and_evaluate(job[0], job[1], scale, out, train, ref, log),
                                  pending))
        _update_timing(out, "wall_s", time.time() - t0)
    else:
        log(f"study: all {len(todo)} runs finished and measured; nothing to train")
    summary = summarize(out, scale, arms, seeds)
    summary["runs"] = infos
    return summary


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def _curve(run_dir: str, scale: Scale) -> List[Tuple[int, float, float]]:
    """(step, fid, kid) rows of the run's fid_curve.csv measured with the study's settings."""
    path = os.path.join(run_dir, "fid_curve.csv")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if int(r["num_samples"]) != scale.num_samples or not r.get("fid"):
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
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """
    Read every run's FID/KID curve and write ``summary.csv``, ``summary.md`` and ``curves.png``.

    Per arm: final FID and KID (mean and sample standard deviation over seeds, and each seed's
    value), and the iterations each seed needs to reach the baseline's mean final FID.

    :return: ``{"arms": {name: {...}}, "table": markdown text}``.
    """
    seeds = tuple(seeds) if seeds else scale.seeds
    curves = {(a.name, s): _curve(os.path.join(out, "runs", run_name(a.name, s)), scale) for a in arms for s in seeds}
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
                     "iters_per_seed": " ".join(_fmt(reach[s], 0) if reach[s] is not None else "never" for s in seeds),
                     "reached": d["reached"], "n": d["n"]})
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = _markdown_table(rows, scale, target)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    _plot(out, scale, arms, seeds, curves)
    log(table)
    return {"arms": per_arm, "table": table, "target_fid": target}


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _markdown_table(rows: List[Dict[str, Any]], scale: Scale, target: Optional[float]) -> str:
    lines = [f"Final step {scale.total_steps}; FID/KID from {scale.num_samples} samples ({scale.sampling}, EMA "
             f"{scale.ema_rate}) vs {scale.ref_images} CIFAR-10 training images at {scale.image_size}x"
             f"{scale.image_size}; mean ± sample sd over seeds. Iterations to reach the baseline's mean final "
             f"FID ({_fmt(target)}), interpolated between checkpoints every {scale.eval_every} steps.", "",
             "| arm | final FID | per seed | final KID ×1e3 | iters to baseline FID | per seed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kid = (f"{r['final_kid_mean'] * 1e3:.1f} ± {r['final_kid_sd'] * 1e3:.1f}"
               if not math.isnan(r["final_kid_mean"]) else "n/a")
        reached, n = r["reached"], r["n"]
        reach = ("never" if not reached else
                 f"{r['iters_to_baseline_fid_mean']:.0f} ± {r['iters_to_baseline_fid_sd']:.0f}" if reached == n else
                 f"{r['iters_to_baseline_fid_mean']:.0f} ({reached} of {n} seeds)")
        lines.append(f"| {r['arm']} | {_fmt(r['final_fid_mean'])} ± {_fmt(r['final_fid_sd'])} | "
                     f"{r['final_fid_per_seed']} | {kid} | {reach} | {r['iters_per_seed']} |")
    return "\n".join(lines) + "\n"


def _plot(out: str, scale: Scale, arms: Sequence[Arm], seeds: Sequence[int],
          curves: Dict[Tuple[str, int], List[Tuple[int, float, float]]]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for a in arms:
        for ax, col in zip(axes, (1, 2)):
            series = [dict((r[0], r[col]) for r in curves[(a.name, s)]) for s in seeds]
            steps = sorted(set.intersection(*(set(d) for d in series))) if series else []
            if not steps:
                continue
            vals = np.array([[d[st] for st in steps] for d in series]) * (1e3 if col == 2 else 1.0)
            line, = ax.plot(steps, vals.mean(0), marker="o", label=a.name)
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel("FID")
    axes[1].set_ylabel("KID ×1e3")
    for ax in axes:
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 {scale.image_size}px study ({scale.name} preset): mean over seeds "
                 f"{', '.join(map(str, seeds))}, band = min-max", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    import shutil

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
