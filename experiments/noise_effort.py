"""
What each training method spends where across noise levels (issue 32, item 4).

Every method of the study is a pair (timestep density p(t), loss weight w(t)); in epsilon-MSE units
the objective it optimises is sum_t p(t) w(t) L_t, so the normalised p(t) w(t) says where its
training effort goes. EDM and SD3 draw few high-noise steps but weight them heavily; CLTS draws them
rarely and does not weight them. The same objective can be trained with the weight folded into the
sampler (``--fold_weighting``: the ``*_folded`` arms), which keeps p w and gives every draw weight 1.

The methods are the study's arms (``experiments.study``: one declaration of each arm's flags), built
with the library's own samplers and weightings for the scale's diffusion. A method whose p(t)
changes during training (CLTS, its floor and release) is averaged over the scale's run
(``total_steps``, its CLTS target); SpeeD's dual sampling is included as the marginal of its pairs.
"""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments.plotting import pyplot
from experiments.study import DEFAULT_LEDGER, Scale, arm_flags, arms_named, ledger_dir, probe_rows, run_name
from guided_diffusion.files import atomic_write, atomic_write_text
from guided_diffusion.folded import effective_batch_fraction
from guided_diffusion.method_registry import known_method_options
from guided_diffusion.resample import create_named_schedule_sampler, loss_weighting
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.weighting import is_unweighted

__all__ = ["EFFORT_ARMS", "HIGH_NOISE", "arm_effort", "effort_table", "probe_loss", "write_effort"]

#: the arms drawn, in the figure's order: the long horizon's committed arms, then issue 32's
EFFORT_ARMS = ("baseline", "clts_s0.1", "min_snr", "p2", "speed", "clts_s0.1_floor0.5", "clts_s0.1_release0.5",
               "clts_s0.1_floor0.5_minsnr", "laplace", "edm", "logit_normal", "edm_folded", "logit_normal_folded")
#: the high-noise regions whose shares are reported, as fractions of T
HIGH_NOISE = (0.6, 0.8)
_STEP_STRIDE = 10  # the run average of a changing p(t): every 10th training step (p is piecewise linear in i)


def arm_effort(arm: str, scale: Scale) -> Dict[str, np.ndarray]:
    """
    The arm's p(t) (averaged over the scale's run), w(t) and normalised p(t) w(t) on the scale's
    diffusion.

    :return: ``{"p", "w", "pw"}``: float64 arrays of length T; p and pw sum to 1.
    """
    (spec,) = arms_named(arm)
    flags = arm_flags(spec, scale, seed=0, data_dir="", log_dir="")
    diffusion = create_gaussian_diffusion(steps=scale.diffusion_steps, noise_schedule=scale.noise_schedule)
    options = {k: v for k, v in flags.items() if k in known_method_options() and k not in ("seed", "rank")}
    sampler = create_named_schedule_sampler(flags["schedule_sampler"], diffusion, seed=0,
                                            total_steps=scale.total_steps, **options)
    if hasattr(sampler, "probabilities_at"):
        steps = range(0, scale.total_steps, _STEP_STRIDE)
        p = np.mean([sampler.probabilities_at(i) for i in steps], axis=0)
    else:
        p = sampler.probabilities()
    if hasattr(sampler, "pair") and getattr(sampler, "speed_dual", False):
        # half the batch is drawn from p, the other half is each draw's partner
        partner = np.bincount(sampler.pair(np.arange(len(p))), weights=p, minlength=len(p))
        p = 0.5 * p + 0.5 * partner
    name = flags.get("loss_weighting")
    w = np.ones_like(p) if is_unweighted(name) else loss_weighting(name, diffusion, **options)
    pw = p * w
    if flags.get("fold_weighting"):
        # the weight folded into the sampler: it draws p w, and every draw weighs 1
        p, w = pw, np.ones_like(p)
    return {"p": p / p.sum(), "w": w, "pw": pw / pw.sum()}


def probe_loss(scale: Scale, ledger: str = DEFAULT_LEDGER) -> Optional[np.ndarray]:
    """
    L(t) for every t: the committed baseline's (seed 1) held-out epsilon-MSE at its final step, the
    probe's points joined log-linearly (held flat beyond its first and last t). None without that
    probe in ``ledger``.
    """
    rows = probe_rows(ledger_dir(ledger, scale, run_name("baseline", 1)), scale.total_steps)
    if not rows:
        return None
    ts = np.array(sorted(rows), dtype=np.float64)
    return np.exp(np.interp(np.arange(scale.diffusion_steps), ts, np.log([rows[int(t)] for t in ts])))


def effort_table(scale: Scale, arms: Sequence[str] = EFFORT_ARMS,
                 loss: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
    """
    Per arm: the share of draws and of the objective p w at t > f T for each f of ``HIGH_NOISE``, and
    the effective batch as a fraction of the batch (``folded.effective_batch_fraction``): of the
    weights alone, and, given ``loss`` (``probe_loss``), of what each draw contributes, w(t) L(t).
    """
    rows = []
    for arm in arms:
        e = arm_effort(arm, scale)
        T = len(e["p"])
        row: Dict[str, Any] = {"arm": arm}
        for f in HIGH_NOISE:
            cut = int(np.floor(f * T)) + 1  # t > f T
            row[f"draws_t>{f:g}T"] = float(e["p"][cut:].sum())
            row[f"effort_t>{f:g}T"] = float(e["pw"][cut:].sum())
        row["effective batch, w"] = effective_batch_fraction(e["p"], e["w"])
        if loss is not None:
            row["effective batch, w·L"] = effective_batch_fraction(e["p"], e["w"], loss)
        rows.append(row)
    return rows


def _markdown(rows: List[Dict[str, Any]], scale: Scale, with_loss: bool) -> str:
    cols = [k for k in rows[0] if k != "arm"]
    head = ("| arm | " + " | ".join(c.replace("draws_", "share of draws, ").replace("effort_", "share of p·w, ")
                                  for c in cols) + " |")
    lines = [f"Schedule: {scale.noise_schedule}, T = {scale.diffusion_steps}; p(t) averaged over a "
             f"{scale.total_steps}-step run (CLTS target {scale.clts_target_steps}). "
             "Shares in percent. Effective batch (Kish, percent of the batch): E[c]² / E[c²] under p of what "
             "one draw contributes, c = w (the weights alone)"
             + (" or c = w·L with L the committed baseline's held-out ε-MSE at its final step (seed 1)"
                if with_loss else "") + ".", "", head, "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_effort(out: str, scale: Scale, arms: Sequence[str] = EFFORT_ARMS,
                 ledger: str = DEFAULT_LEDGER) -> Dict[str, str]:
    """
    Write ``effort.csv`` (t, then p, w and normalised p w of every arm), ``effort.md`` (the shares
    table, with the effective batch of w·L where ``ledger`` holds the baseline's probe) and
    ``effort.png`` (three panels: p, w, p w) into ``out``.

    :return: ``{"csv", "md", "png", "table"}``: the paths and the table's text.
    """
    os.makedirs(out, exist_ok=True)
    curves = {a: arm_effort(a, scale) for a in arms}
    T = scale.diffusion_steps
    paths = {k: os.path.join(out, f"effort.{k}") for k in ("csv", "md", "png")}
    header = ["t"] + [f"{a}:{k}" for a in arms for k in ("p", "w", "pw")]

    def write_csv(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(header)
        for t in range(T):
            w.writerow([t] + [f"{curves[a][k][t]:.4e}" for a in arms for k in ("p", "w", "pw")])

    atomic_write(paths["csv"], write_csv, text=True, newline="")
    loss = probe_loss(scale, ledger) if ledger else None
    table = _markdown(effort_table(scale, arms, loss), scale, loss is not None)
    atomic_write_text(paths["md"], table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    t = np.arange(T)
    cmap = plt.get_cmap("tab20")
    for i, a in enumerate(arms):
        style = dict(color=cmap(i % 20), lw=1.6, ls="-" if i < 5 else "--", label=a)
        axes[0].plot(t, curves[a]["p"] * T, **style)
        axes[1].plot(t, curves[a]["w"], **style)
        axes[2].plot(t, curves[a]["pw"] * T, **style)
    axes[0].set(title="timestep density T·p(t) (run average)", xlabel="t", yscale="log", ylim=(1e-3, None))
    axes[1].set(title="loss weight w(t) (ε-MSE units)", xlabel="t", yscale="log")
    axes[2].set(title="where the objective goes: T·p(t)w(t) / Σ p w", xlabel="t")
    for ax in axes:
        for f in HIGH_NOISE:
            ax.axvline(f * T, color="0.7", lw=0.8, ls=":")
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"What each method spends where ({scale.noise_schedule}, T = {T}, {scale.total_steps}-step run)")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return {**paths, "table": table}
