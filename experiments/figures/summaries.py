"""
The figures' numbers, computed from the ledger alone: Table 1's PSNRs (recomputed from the uint8
samples) and rows with their verdicts, and the summaries and verdicts of Figs. 2-4.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments import analysis as an
from experiments.figures.settings import GROUPS, RUN_BY_NAME, TABLE1_ROWS, Settings
from experiments.figures.tasks import build_tasks, sampler_tag, table1_key


# ---------------------------------------------------------------------------------------------
# Results from the ledger
# ---------------------------------------------------------------------------------------------


def load_samples(ledger: str, key: str) -> Optional[Tuple[np.ndarray, List[str]]]:
    path = os.path.join(ledger, key + ".npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as f:
        return f["images"], [str(x) for x in f["names"]]


def table1_rows(ledger: str, settings: Settings) -> List[Dict[str, Any]]:
    """
    Every PSNR of Table 1, recomputed from the ledger's uint8 samples (``analysis.consistency``):
    one row per pair, checkpoint and sampler ("pair" rows), and per model the PSNR between its
    own images of seeds 0..N-1 and N..2N-1 ("null" rows: two independent samples of one model).
    """
    rows: List[Dict[str, Any]] = []
    n = settings.num_samples
    for task in build_tasks(settings):
        if task.kind != "table1":
            continue
        loaded = load_samples(ledger, task.key)
        if loaded is None:
            continue
        images, names = loaded
        p = task.params
        kind = RUN_BY_NAME[names[0]].kind
        total = settings.diffusion.total_steps if kind == "diffusion" else settings.gan.total_steps
        res = an.consistency(list(images), names)
        for pr in res.pairs:
            rows.append({"type": "pair", "group": p["group"], "sampler": p["sampler"],
                         "seeds": f"{p['seed0']}-{p['seed0'] + n - 1}", "step": p["step"],
                         "fraction": round(p["step"] / total, 4), "model_a": names[pr.i], "model_b": names[pr.j],
                         "pooled_psnr_db": pr.pooled, "mean_psnr_db": pr.mean,
                         "num_images": len(pr.per_image)})
        if p["seed0"] == n:  # the replicate: against seeds 0..N-1 of the same model, same step and sampler
            base = load_samples(ledger, table1_key(p["group"], p["sampler"], 0, p["step"]))
            if base is None:
                continue
            for m, name in enumerate(names):
                pr = an.pairwise_psnr([base[0][m], images[m]])[0]
                rows.append({"type": "null", "group": p["group"], "sampler": p["sampler"],
                             "seeds": f"0-{n - 1} vs {n}-{2 * n - 1}", "step": p["step"],
                             "fraction": round(p["step"] / total, 4), "model_a": name, "model_b": name,
                             "pooled_psnr_db": pr.pooled, "mean_psnr_db": pr.mean, "num_images": len(pr.per_image)})
    return rows


def _pick(rows: List[Dict[str, Any]], pairs: Sequence[Tuple[str, str]], **match: Any) -> List[Dict[str, Any]]:
    out = []
    for a, b in pairs:
        out += [r for r in rows if r["model_a"] == a and r["model_b"] == b and all(r[k] == v for k, v in match.items())]
    return out


def _mean(rows: List[Dict[str, Any]], key: str) -> Optional[float]:
    return float(np.mean([r[key] for r in rows])) if rows else None

# verdict thresholds (dB): 3 dB = half the MSE; under 1 dB is within the sampling spread we see
CLEAR_DB, NOISE_DB = 3.0, 1.0


def table1_summary(rows: List[Dict[str, Any]], settings: Settings) -> List[Dict[str, Any]]:
    """Table 1's rows with the final, replicate, DDIM and over-training values and a verdict each."""
    n = settings.num_samples
    dsteps, gsteps = settings.steps("diffusion"), settings.steps("gan")
    primary = f"ddpm{settings.respacing}"
    ddim = sampler_tag(settings, True)
    out = []
    nulls: Dict[str, Optional[float]] = {}
    for group, names in GROUPS.items():
        kind = RUN_BY_NAME[names[0]].kind
        final = (dsteps if kind == "diffusion" else gsteps)[-1]
        sampler = primary if kind == "diffusion" else "gan"
        nulls[group] = _mean([r for r in rows if r["type"] == "null" and r["group"] == group and r["step"] == final
                              and r["sampler"] == sampler], "pooled_psnr_db")
    for key, label, group, pairs, paper in TABLE1_ROWS:
        kind = RUN_BY_NAME[GROUPS[group][0]].kind
        steps = dsteps if kind == "diffusion" else gsteps
        sampler = primary if kind == "diffusion" else "gan"
        pr = [r for r in rows if r["type"] == "pair"]
        fin = _pick(pr, pairs, step=steps[-1], sampler=sampler, seeds=f"0-{n - 1}")
        rep = _pick(pr, pairs, step=steps[-1], sampler=sampler, seeds=f"{n}-{2 * n - 1}")
        dd = _pick(pr, pairs, step=steps[-1], sampler=ddim, seeds=f"0-{n - 1}") if kind == "diffusion" else []
        over = [(s, _mean(_pick(pr, pairs, step=s, sampler=sampler, seeds=f"0-{n - 1}"), "pooled_psnr_db"))
                for s in steps]
        out.append({"key": key, "label": label, "group": group, "paper": paper, "pairs": [list(p) for p in pairs],
                    "pooled_db": _mean(fin, "pooled_psnr_db"), "mean_db": _mean(fin, "mean_psnr_db"),
                    "replicate_pooled_db": _mean(rep, "pooled_psnr_db"), "ddim_pooled_db": _mean(dd, "pooled_psnr_db"),
                    "null_pooled_db": nulls[group], "over_training": over,
                    "per_pair_db": [r["pooled_psnr_db"] for r in fin]})
    for r in out:
        r["above_null_db"] = (None if r["pooled_db"] is None or r["null_pooled_db"] is None
                              else r["pooled_db"] - r["null_pooled_db"])
    eps = next(r for r in out if r["key"] == "eps_init")
    for r in out:
        r["verdict"] = _table1_verdict(r, eps)
    return out


def _table1_verdict(r: Dict[str, Any], eps: Dict[str, Any]) -> str:
    """
    The consistency of a pair is how far its PSNR lies above its group's null (one model against
    itself on independent noise), so that blurrier or flatter images, which are closer to each
    other whatever the noise, do not count as consistency.
    """
    gap = r["above_null_db"]
    if r["pooled_db"] is None:
        return "not measured yet"
    if gap is None:
        return "inconclusive (no null measured)"
    if r["key"] in ("eps_init", "eps_arch"):
        word = "reproduced" if gap >= CLEAR_DB else "not reproduced" if gap < NOISE_DB else "inconclusive"
        return f"{word}: {gap:.1f} dB above the null"
    if eps["above_null_db"] is None:
        return "inconclusive (the eps pair is not measured)"
    less = eps["above_null_db"] - gap
    word = "reproduced" if less >= CLEAR_DB else "not reproduced" if less < NOISE_DB else "inconclusive"
    return f"{word}: {gap:.1f} dB above its null, the eps pair {eps['above_null_db']:.1f} dB"


def read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            try:
                d[k] = float(v) if v not in ("", None) else None
            except ValueError:
                d[k] = v
        out.append(d)
    return out


def fig2_summary(ledger: str, settings: Settings) -> Dict[str, Any]:
    """Per pair: where the structure forms (predicted x0 within ``structure_db`` of its final) and the PSNRs between."""
    T = settings.diffusion.diffusion_steps
    out: Dict[str, Any] = {}
    for pair in ("eps", "x0"):
        path = os.path.join(ledger, "fig2", f"{pair}.csv")
        if not os.path.isfile(path):
            continue
        rows = read_csv(path)
        formed = next((r for r in rows if min(r["a_to_final_db"], r["b_to_final_db"]) >= settings.structure_db), None)
        first, last = rows[0], rows[-1]
        mid = min(rows, key=lambda r: abs(r["t_train"] - T / 2))
        with np.load(os.path.join(ledger, "fig2", f"{pair}.npz")) as f:
            final_db = float(f["final_pooled_db"])
        # descriptive, not a verdict rule (added after the first run): from which t on the two models'
        # predictions agree to within 1 dB of how well their final samples agree
        agreed = last
        for r in reversed(rows):
            if abs(r["between_pooled_db"] - last["between_pooled_db"]) > 1.0:
                break
            agreed = r
        out[pair] = {"t_formed": None if formed is None else int(formed["t_train"]),
                     "t_agree_1db": int(agreed["t_train"]),
                     "between_at_formed_db": None if formed is None else formed["between_pooled_db"],
                     "between_first_db": first["between_pooled_db"], "t_first": int(first["t_train"]),
                     "between_mid_db": mid["between_pooled_db"], "t_mid": int(mid["t_train"]),
                     "between_last_db": last["between_pooled_db"], "final_samples_db": final_db,
                     "to_final_first_db": 0.5 * (first["a_to_final_db"] + first["b_to_final_db"]),
                     "to_final_mid_db": 0.5 * (mid["a_to_final_db"] + mid["b_to_final_db"])}
    if "eps" in out:
        tf = out["eps"]["t_formed"]
        if tf is None:
            v = "not reproduced: the eps models' predicted x0 never comes within " \
                f"{settings.structure_db:g} dB of their final samples before the last step"
        elif tf >= T / 2:
            v = f"reproduced: the structure is fixed from t = {tf} of {T} (the noisier half)"
        elif tf < T / 4:
            v = f"not reproduced: the structure is fixed only from t = {tf} of {T}"
        else:
            v = f"inconclusive: the structure is fixed from t = {tf} of {T}"
        out["verdict"] = v
        if "x0" in out:
            e, x = out["eps"]["between_mid_db"], out["x0"]["between_mid_db"]
            gap = e - x
            word = ("reproduced" if gap >= CLEAR_DB else "not reproduced" if gap < NOISE_DB else "inconclusive")
            out["verdict_x0"] = (f"{word}: at t = {out['eps']['t_mid']} the eps models' x0 predictions agree to "
                                 f"{e:.1f} dB, the x0 models' to {x:.1f} dB")
    return out


def fig3_summary(ledger: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for kind in ("diffusion", "gan"):
        d = os.path.join(ledger, "fig3", kind)
        if not os.path.isfile(os.path.join(d, "hessian_summary.json")):
            continue
        with open(os.path.join(d, "hessian_summary.json")) as f:
            s = json.load(f)
        dens = read_csv(os.path.join(d, "hessian_density.csv"))
        grid = np.asarray([r["eigenvalue"] for r in dens])
        # the script's grid is [lo - 5 sigma, hi + 5 sigma] with sigma = 0.01 (hi - lo): recover the Ritz range
        span = (grid[-1] - grid[0]) / 1.1
        lo, hi = grid[0] + 0.05 * span, grid[-1] - 0.05 * span
        top = s.get("top_eigenvalues_lanczos") or s.get("top_eigenvalues_power") or []
        loss = float(s["loss"])
        lam = float(max(top)) if top else hi
        out[kind] = {"loss": loss, "num_parameters": s["num_parameters"], "lambda_max": lam, "top": top,
                     "ritz_min": lo, "ritz_max": hi, "trace": s.get("trace_hutchinson"),
                     "trace_se": s.get("trace_stderr"),
                     "lambda_max_per_loss": lam / loss, "spread_per_loss": (max(hi, lam) - lo) / loss,
                     "trace_per_loss": None if s.get("trace_hutchinson") is None else s["trace_hutchinson"] / loss,
                     "products": s.get("hessian_vector_products"), "checkpoint": s.get("checkpoint")}
    if "diffusion" in out and "gan" in out:
        r1 = out["gan"]["lambda_max_per_loss"] / max(out["diffusion"]["lambda_max_per_loss"], 1e-300)
        r2 = out["gan"]["spread_per_loss"] / max(out["diffusion"]["spread_per_loss"], 1e-300)
        out["ratio_lambda"], out["ratio_spread"] = r1, r2
        if r1 >= 10 and r2 >= 10:
            v = "reproduced"
        elif r1 <= 1 and r2 <= 1:
            v = "not reproduced"
        else:
            v = "inconclusive"
        out["verdict"] = (f"{v}: relative to its loss, the GAN's top eigenvalue is {r1:.3g}x and its spectral spread "
                          f"{r2:.3g}x the diffusion model's")
    return out


def line_metrics(alphas: Sequence[float], loss: Sequence[float]) -> Dict[str, float]:
    """
    The shape of a loss curve on an alpha grid: ``turns`` (changes of the slope's sign, steps
    under 1e-3 of the curve's range ignored), ``roughness`` (sum |second difference| / sum
    |first difference|: 0 for a straight line, about 0.1 for a parabola on 41 points, ~2 for a
    zigzag) and ``barrier`` (the highest loss on [0, 1] above the higher end point, relative to it),
    over the finite points only; ``nonfinite`` counts the others (a loss undefined there).
    """
    a, y = np.asarray(alphas, float), np.asarray(loss, float)
    finite = np.isfinite(y)
    nonfinite = int((~finite).sum())
    a, y = a[finite], y[finite]
    if y.size < 3:
        return {"turns": 0, "roughness": math.nan, "barrier": math.nan, "loss_a": math.nan, "loss_b": math.nan,
                "min": math.nan, "max": math.nan, "nonfinite": nonfinite}
    d = np.diff(y)
    tol = 1e-3 * max(float(y.max() - y.min()), 1e-300)
    signs = [np.sign(x) for x in d if abs(x) > tol]
    turns = int(sum(1 for s0, s1 in zip(signs, signs[1:]) if s0 != s1))
    rough = float(np.abs(np.diff(d)).sum() / max(np.abs(d).sum(), 1e-300))
    inside = (a >= 0) & (a <= 1)
    ends = max(float(np.interp(0.0, a, y)), float(np.interp(1.0, a, y)))
    barrier = (float(y[inside].max()) - ends) / max(abs(ends), 1e-300) if inside.any() else math.nan
    return {"turns": turns, "roughness": rough, "barrier": barrier, "loss_a": float(np.interp(0.0, a, y)),
            "loss_b": float(np.interp(1.0, a, y)), "min": float(y.min()), "max": float(y.max()), "nonfinite": nonfinite}


def fig4_summary(ledger: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for kind in ("diffusion", "gan"):
        path = os.path.join(ledger, "fig4", kind, "loss_landscape.csv")
        if not os.path.isfile(path):
            continue
        rows = read_csv(path)
        with open(os.path.join(ledger, "fig4", kind, "loss_landscape.json")) as f:
            meta = json.load(f)
        out[kind] = {**line_metrics([r["alpha"] for r in rows], [r["loss"] for r in rows]), "a": meta.get("a"),
                     "b": meta.get("b"), "loss_name": meta.get("loss")}

    def smooth(m: Dict[str, Any]) -> bool:
        return m["turns"] <= 1 and m["roughness"] < 0.5

    def rugged(m: Dict[str, Any]) -> bool:
        return m["turns"] >= 3 or m["roughness"] >= 0.5

    if "diffusion" in out and "gan" in out:
        d, g = out["diffusion"], out["gan"]
        if smooth(d) and rugged(g):
            v = "reproduced"
        elif smooth(g) or rugged(d):
            v = "not reproduced"
        else:
            v = "inconclusive"
        undefined = "".join(f" ({m['nonfinite']} alpha(s) of the {k} curve undefined, left out)"
                            for k, m in (("diffusion", d), ("GAN", g)) if m.get("nonfinite"))
        out["verdict"] = (f"{v}: diffusion {d['turns']} turn(s), roughness {d['roughness']:.2f}; GAN {g['turns']} "
                          f"turn(s), roughness {g['roughness']:.2f}{undefined}")
    return out
