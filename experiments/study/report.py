"""
The study's page: ``summarize`` reads the runs (the ledger, checked first by ``ledger.check_ledger``,
or a study folder) and writes the per-arm table (``summary.csv``, ``summary.md``), the claims table
(``claims.md``, ``claims_table``), the speed-up at every horizon (``speedup.md``, ``speedup.png``:
S(k) per arm, and issue 32's decision at ``DECISION_SCALE``) and the figures; ``write_doc_section`` puts the tables into
docs/study.md's generated sections (``DOC_PARTS``, ``PAGE_SCALES``).
"""
from __future__ import annotations

import csv
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.study.arms import ARM_CLAIMS, ARMS, BEST_ARM, BEST_SIGMA, GROUP_FIGURES, GROUPS, HEADLINE, Arm, \
    Scale, ablation_value, arms_named, run_name
from experiments.study.errors import writing
from experiments.study.evaluation import BOOTSTRAP_DRAWS
from experiments.study.ledger import BOOTSTRAP_FILE, check_ledger, final_fid, in_ledger, ledger_dir, probe_rows, \
    read_curve
from experiments.study.plots import plot_ablations, plot_curves, plot_probe, plot_speedup
from experiments.study.stats import VERDICT_ALPHA, bootstrap_interval, iterations_to_reach, mean_sd, mean_speedup, \
    paired_differences, paired_lead, paired_noise, probe_relative, seed_diffs, speedup, verdict
from guided_diffusion.files import atomic_write_text


# docs/study.md's generated parts, per scale: the per-arm table (``summary.md``), the claims table
# (``claims.md``) and the speed-up at every horizon (``speedup.md``)
DOC_PARTS = ("summary", "claims", "speedup")
# the summary's text of each part
_PART_KEYS = {"summary": "table", "claims": "claims", "speedup": "speedup"}
# the decision of issue 32 (item 7): the long horizon, and what "fastest" must show there
DECISION_SCALE = "cpu_long"
DECISION_MIN_SPEEDUP = 1.5
DECISION_FROM_STEP = 2000
# the scales docs/study.md shows, each with the arms `make study` reprints for it
PAGE_SCALES = (("cpu", "first"), ("cpu_long", "long"))
# ``--arms <group>_seed2``: the arms of ``<group>`` that get a second seed once seed 1 of every one is
# committed (issue 32, item 5): the SECOND_SEED_TOP best at the final step, and every arm ahead of the baseline there
SECOND_SEED_SUFFIX = "_seed2"
SECOND_SEED_TOP = 3


def second_seed_arms(group: str, scale: Scale, ledger: str,
                     log: Callable[[str], None] = print) -> List[Arm]:
    """
    The arms of ``GROUPS[group]`` that earn a second seed, chosen from the committed seed-1 runs: the
    ``SECOND_SEED_TOP`` lowest final FIDs, plus every arm whose final FID is below the baseline's
    (seed 1, paired), best first. ``ValueError`` naming what is missing when seed 1 of an arm or of the
    baseline is not in ``ledger`` yet (the choice needs all of them).
    """
    if group not in GROUPS:
        raise ValueError(f"--arms {group}{SECOND_SEED_SUFFIX}: unknown group {group!r}; groups: {', '.join(GROUPS)}")
    if not ledger:
        raise ValueError(f"--arms {group}{SECOND_SEED_SUFFIX} chooses from the ledger's seed-1 runs: give --ledger")
    finals: Dict[str, Optional[float]] = {}
    for name in ("baseline",) + tuple(n for n in GROUPS[group] if n != "baseline"):
        run = run_name(name, 1)
        finals[name] = final_fid(ledger_dir(ledger, scale, run), scale) if in_ledger(ledger, scale, run) else None
    missing = [run_name(n, 1) for n, f in finals.items() if f is None]
    if missing:
        raise ValueError(f"--arms {group}{SECOND_SEED_SUFFIX}: the choice needs seed 1 of every arm at step "
                         f"{scale.total_steps} in {os.path.join(ledger, scale.name)}; missing (or without that FID): "
                         f"{', '.join(missing)}")
    base = finals.pop("baseline")
    ranked = sorted(finals, key=lambda n: (finals[n], n))
    chosen = []
    for i, n in enumerate(ranked):
        why = [f"among the best {SECOND_SEED_TOP}"] * (i < SECOND_SEED_TOP) + ["ahead of the baseline"] * (finals[n] < base)
        if why:
            chosen.append(n)
        log(f"study: {n}: final FID {finals[n]:.2f} (baseline {base:.2f}): "
            + (f"seed 2 ({', '.join(why)})" if why else "no second seed"))
    return arms_named(",".join(chosen))


def resolve_arms(spec: str, scale: Scale, ledger: str, log: Callable[[str], None] = print) -> List[Arm]:
    """``--arms``: ``arms_named``'s names and groups, or ``<group>_seed2`` (``second_seed_arms``)."""
    if spec.strip().endswith(SECOND_SEED_SUFFIX) and "," not in spec:
        return second_seed_arms(spec.strip()[:-len(SECOND_SEED_SUFFIX)], scale, ledger, log)
    return arms_named(spec)


def doc_markers(scale: str, part: str = "claims") -> Tuple[str, str]:
    """The lines around a scale's generated ``part`` (one of ``DOC_PARTS``) in docs/study.md."""
    if part not in DOC_PARTS:
        raise ValueError(f"docs/study.md part: expected one of {DOC_PARTS}, got {part!r}")
    return (f"<!-- {part} {scale}: generated by `make study` from the ledger; do not edit -->",
            f"<!-- {part} {scale}: end -->")


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _iters_per_seed(iters: Dict[int, Optional[float]], seeds: Sequence[int]) -> str:
    """One entry per seed: the iterations, "never" when that seed's run did not get there, "n/a" when
    there is no run of that seed (the seed is not in ``iters``)."""
    return " ".join("n/a" if s not in iters else "never" if iters[s] is None else _fmt(iters[s], 0) for s in seeds)


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
        check_ledger(ledger, scale)  # a damaged or incomplete run stops here, before anything is written
        out = os.path.join(ledger, scale.name)
        os.makedirs(out, exist_ok=True)
        done = [d for d in sorted(os.listdir(out)) if not d.endswith(".tmp") and in_ledger(ledger, scale, d)]
        seeds = tuple(sorted({int(d.rsplit("-s", 1)[1]) for d in done}))
        arms = [a for a in ARMS if any(run_name(a.name, s) in done for s in seeds)]
        if not arms:
            log(f"study: no committed results in {out} yet")
            return {"arms": {}, "table": "", "target_fid": None}
    curves = {(a.name, s): read_curve(folder(a.name, s), scale) for a in arms for s in seeds}
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
        fm, fs = mean_sd(list(d["final_fid"].values()))
        km, ks = mean_sd(list(d["final_kid"].values()))
        reached = [r for r in reach.values() if r is not None]
        rm, rs = mean_sd(reached)
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
        rows[-1].update(paired_differences(d["final_fid"], per_arm.get("baseline", {}).get("final_fid", {}),
                                           "paired_dfid"))
        # the other way round: where the baseline of the same seed reaches this arm's final FID (the speed-up)
        back = {s: iterations_to_reach([(st, f) for st, f, _ in curves.get(("baseline", s), [])], d["final_fid"][s])
                for s in seeds if d["final_fid"][s] is not None and curves.get(("baseline", s))}
        bm, bsd = mean_sd([v for v in back.values() if v is not None])
        rows[-1].update(baseline_iters_to_arm_mean=bm, baseline_iters_to_arm_sd=bsd,
                        baseline_iters_to_arm_per_seed=_iters_per_seed(back, seeds))
        second = {s: next((f for st, f, _ in read_curve(folder(a.name, s), scale, second=True) if st == final), None)
                  for s in seeds}
        base2 = {s: next((f for st, f, _ in read_curve(folder("baseline", s), scale, second=True) if st == final),
                         None) for s in seeds}
        d["second_fid"] = second
        sm, ss = mean_sd(list(second.values()))
        rows[-1].update(second_fid_mean=sm, second_fid_sd=ss,
                        **paired_differences(second, base2, "second_paired_dfid"))
        ci = bootstrap_interval(os.path.join(out, BOOTSTRAP_FILE), a.name, seeds) if ledger else None
        rows[-1].update(boot_dfid_lo=ci[0] if ci else math.nan, boot_dfid_hi=ci[1] if ci else math.nan,
                        boot_n=ci[2] if ci else 0)
    path = os.path.join(out, "summary.csv")
    with writing(path), open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = _markdown_table(rows, scale, target)
    path = os.path.join(out, "summary.md")
    with writing(path), open(path, "w") as f:
        f.write(table)
    # with the ablations, the arms are many: curves.png shows the headline arms, curves_<group>.png the rest
    shown = [a for a in arms if a.name in HEADLINE] if scale.ablation_figures else arms
    plot_curves(out, scale, shown or arms, seeds, curves, title=", headline arms" if scale.ablation_figures else "")
    for group in GROUP_FIGURES if scale.ablation_figures else ():  # one per group that has runs, with the baseline
        members = [a for a in arms if a.name == "baseline" or a.name in GROUPS[group]]
        if any(a.name != "baseline" for a in members):
            plot_curves(out, scale, members, seeds, curves, name=f"curves_{group}.png", title=f", {group}")
    if scale.ablation_figures:
        plot_ablations(out, scale, per_arm)
    probes = {(a.name, s): probe_rows(folder(a.name, s), final) for a in arms for s in seeds}
    plot_probe(out, scale, arms, seeds, probes)
    claims = (claims_table(scale, per_arm, rows, os.path.join(out, BOOTSTRAP_FILE), seeds,
                           probe=probe_relative(probes, BEST_ARM, seeds), lead=paired_lead(curves, BEST_ARM, seeds))
              if ledger else "")
    if ledger:
        path = os.path.join(out, "claims.md")
        with writing(path), open(path, "w") as f:
            f.write(claims)
    speedups = speedup_table(scale, arms, seeds, curves)
    plot_speedup(out, scale, speedups)
    fastest = decide_fastest(scale, speedups, per_arm)
    speed_text = speedup_markdown(scale, speedups, fastest)
    path = os.path.join(out, "speedup.md")
    with writing(path), open(path, "w") as f:
        f.write(speed_text)
    log(table)
    return {"arms": per_arm, "table": table, "target_fid": target, "rows": rows, "claims": claims,
            "speedup": speed_text, "speedups": speedups, "fastest": fastest}


def doc_sections(summary: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(part, text) of every generated part of docs/study.md that ``summary`` holds, in ``DOC_PARTS`` order."""
    return [(part, summary[_PART_KEYS[part]]) for part in DOC_PARTS if summary.get(_PART_KEYS[part])]


def speedup_table(scale: Scale, arms: Sequence[Arm], seeds: Sequence[int],
                  curves: Dict[Tuple[str, int], List[Tuple[int, float, float]]]
                  ) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """
    S(k) of every arm but the baseline at each evaluated step k: per seed against the baseline of
    the same seed (``stats.speedup``), and their mean (``stats.mean_speedup``).

    :return: ``{arm: {k: {"seeds": {seed: (S, bound) or None}, "mean": (S, bound) or None}}}``.
    """
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for a in arms:
        if a.name == "baseline":
            continue
        per_k: Dict[int, Dict[str, Any]] = {}
        for k in scale.eval_steps():
            per_seed = {s: speedup([(st, f) for st, f, _ in curves.get((a.name, s), [])],
                                   [(st, f) for st, f, _ in curves.get(("baseline", s), [])], k)
                        for s in seeds if curves.get((a.name, s))}
            per_k[k] = {"seeds": per_seed, "mean": mean_speedup(per_seed)}
        if any(v["mean"] is not None for v in per_k.values()):
            out[a.name] = per_k
    return out


def _speedup_cell(value: Optional[Tuple[float, str]], truncate: bool = False) -> str:
    """An S(k) cell; ``truncate`` cuts to 3 places instead of rounding to 2, so that a failing 1.4996 never
    reads 1.50 (the decision rule's reasons); an upper bound ("<") is cut upwards, so it stays a bound."""
    if value is None:
        return "n/a"
    cut = math.ceil if value[1] == "<" else math.floor
    number = f"{cut(value[0] * 1000) / 1000:.3f}" if truncate else f"{value[0]:.2f}"
    return {"": "", ">=": "≥", "<": "<", "mixed": "~"}[value[1]] + number


def decide_fastest(scale: Scale, speedups: Dict[str, Dict[int, Dict[str, Any]]],
                   per_arm: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """
    Issue 32's rule, at ``DECISION_SCALE`` only (None elsewhere): an arm is "fastest" when its mean
    S(k) >= ``DECISION_MIN_SPEEDUP`` at every evaluated k >= ``DECISION_FROM_STEP`` (a "<" or
    "mixed" mean fails; a ">=" bound counts as its value) and it ends ahead of the baseline and of Min-SNR (mean
    paired final-FID difference below 0, over the seeds both have).

    :return: ``{"qualified": [arms], "checked": {arm: reason}}``.
    """
    if scale.name != DECISION_SCALE:
        return None
    checked: Dict[str, str] = {}
    qualified: List[str] = []
    for arm, per_k in speedups.items():
        late = {k: v["mean"] for k, v in per_k.items() if k >= DECISION_FROM_STEP}
        # a "<" or a "mixed" mean is no lower bound: it fails the rule whatever its value
        slow = [k for k, m in late.items() if m is None or m[1] in ("<", "mixed") or m[0] < DECISION_MIN_SPEEDUP]
        reasons = []
        if slow:
            where = ", ".join(f"{k} ({_speedup_cell(late[k], truncate=True)})" for k in sorted(slow))
            reasons.append(f"S < {DECISION_MIN_SPEEDUP:g} at step{'s' if len(slow) > 1 else ''} {where}")
        for other in ("baseline", "min_snr"):
            d = seed_diffs(per_arm, arm, other) if arm != other else []
            if arm != other and (not d or float(np.mean(d)) >= 0):
                reasons.append(f"does not end ahead of {other}" + ("" if d else " (no paired run)"))
        checked[arm] = "; ".join(reasons) or "meets the rule"
        if not reasons:
            qualified.append(arm)
    return {"qualified": qualified, "checked": checked}


def speedup_markdown(scale: Scale, speedups: Dict[str, Dict[int, Dict[str, Any]]],
                     fastest: Optional[Dict[str, Any]]) -> str:
    """The S(k) table (mean over seeds, then each seed's) and, at ``DECISION_SCALE``, the decision."""
    steps = scale.eval_steps()
    lines = [f"S(k) = k / (iterations the arm needs to reach the FID the baseline of the same seed has at step k), "
             f"interpolated between checkpoints every {scale.eval_every} steps; 1 = as fast as the baseline, "
             "2 = the paper's claim for CLTS + MDLRC. ≥: already below the target at the first checkpoint; "
             "<: not reached by the last measured step; ~: seeds censored both ways (no bound). Mean over seeds "
             "(each seed's in brackets).",
             "", "| arm | seeds | " + " | ".join(f"S({k})" for k in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for arm, per_k in speedups.items():
        seeds = sorted({s for v in per_k.values() for s in v["seeds"]})
        cells = []
        for k in steps:
            v = per_k[k]
            each = [_speedup_cell(v["seeds"].get(s)) for s in seeds]
            cells.append(_speedup_cell(v["mean"]) + (f" [{', '.join(each)}]" if len(seeds) > 1 else ""))
        lines.append(f"| {arm} | {' '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if fastest is not None:
        lines += ["", f"Decision rule (issue 32): mean S(k) ≥ {DECISION_MIN_SPEEDUP:g} at every k ≥ "
                  f"{DECISION_FROM_STEP}, and the final FID ahead of the baseline and of Min-SNR (paired by seed)."]
        lines.append("Arms that meet it: " + (", ".join(fastest["qualified"]) or "none") + ".")
        lines += [f"- {arm}: {reason}" for arm, reason in fastest["checked"].items()]
    return "\n".join(lines) + "\n"


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


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _diff_text(diffs: Sequence[float], interval: Optional[Tuple[float, float, int]] = None) -> str:
    if not diffs:
        return "no paired runs yet"
    m, sd = mean_sd(diffs)
    text = f"ΔFID {m:+.2f} ± {sd:.2f} (n={len(diffs)}: {', '.join(f'{d:+.2f}' for d in diffs)})"
    if interval is not None:
        text += f", 95% [{interval[0]:+.2f}, {interval[1]:+.2f}]"
    return text


def _best_of(per_arm: Dict[str, Dict[str, Any]], names: Sequence[str], label: Callable[[str], str],
             expected: str, noise: Optional[Tuple[float, int]] = None) -> Tuple[str, str]:
    """(measured, verdict) of "``expected`` is the best of ``names``": the lowest mean final FID, and
    whether each other arm is worse than ``expected`` (paired by seed)."""
    have = [n for n in names if per_arm.get(n, {}).get("final_fid")
            and any(v is not None for v in per_arm[n]["final_fid"].values())]
    if len(have) < 2 or expected not in have:
        return f"{len(have)} of {len(names)} arms measured", "not measured"
    means = {n: mean_sd(list(per_arm[n]["final_fid"].values()))[0] for n in have}
    best = min(have, key=lambda n: means[n])
    others = [verdict(seed_diffs(per_arm, expected, n), noise=noise) for n in have if n != expected]
    text = "; ".join(f"{label(n)}: {means[n]:.2f}" for n in have) + f" (best {label(best)})"
    if best == expected and all(v == "supported" for v in others):
        return text, "supported"
    if best != expected and verdict(seed_diffs(per_arm, best, expected), noise=noise) == "supported":
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
    full = f"{BEST_ARM}_mdlrc"
    noise = paired_noise(per_arm)

    def vs(arm: str, other: str = "baseline") -> Tuple[str, str]:
        ci = bootstrap_interval(bootstrap_path, arm, seeds) if other == "baseline" else None
        d = seed_diffs(per_arm, arm, other)
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
             "is the paired bootstrap's, where committed. Verdict: the interval where it spans two or more seeds, "
             "else a paired "
             f"t-test at {100 * VERDICT_ALPHA:g}% (two-sided) with the seed noise pooled over the scale's arms"
             + (f" (sd {noise[0]:.2f} FID, {noise[1]} degrees of freedom)" if noise else "")
             + "; rules: `experiments/study/stats.py: verdict`.", "",
             "| claim | the paper | measured here | verdict |", "|---|---|---|---|"]

    def add(claim: str, paper: str, measured: str, v: str) -> None:
        lines.append(f"| {claim} | {paper} | {measured} | {v} |")

    m, v = vs(full)
    add(f"CLTS + MDLRC ({full}) trains faster than the baseline (Fig. 5)",
        "about 2× fewer iterations to the baseline's FID on CIFAR-10 (2.6× on ImageNet-128)", m + speedup(full), v)
    for arm, what in (("md_only", "momentum decay alone"), ("mdlrc", "MDLRC"), (BEST_ARM, "CLTS")):
        m, v = vs(arm)
        add(f"{what} ({arm}) helps on its own (Fig. 6a)", "each module lowers FID; all together lowest",
            m + speedup(arm), v)
    for arm in ("md_only", "mdlrc", BEST_ARM):
        m, v = vs(full, arm)
        add(f"all modules beat {arm} (Fig. 6a)", "all together lowest", m, v)
    m, v = _best_of(per_arm, GROUPS["mu"], lambda n: "μ " + ablation_value(n, "mu", scale), BEST_ARM, noise)
    add("μ of the target Gaussian: best near 0.3 (Fig. 6b)", "best FID at μ ≈ 0.3", m, v)
    m, v = _best_of(per_arm, GROUPS["target"], lambda n: "target " + ablation_value(n, "target", scale), BEST_ARM,
                    noise)
    add(f"target iteration: best near 1/5 of the run ({scale.clts_target_steps}) (Fig. 6c)",
        "best FID near 100k of about 500k iterations", m, v)
    for arm in GROUPS["comparisons"]:
        m, v = vs(full, arm)
        add(f"CLTS + MDLRC beats {arm} (Tables 2-3)", "ahead of Min-SNR and FDM (and of the other baselines)", m, v)
    m, v = _best_of(per_arm, [n for n in GROUPS["sigma"] if n != "baseline"],
                    lambda n: "σ " + ablation_value(n, "sigma", scale), BEST_ARM, noise)
    add(f"σ of the target Gaussian: {BEST_SIGMA} (this repository's study reading)", "Eq. 7: \"standard variance 1\"",
        m, v)
    m, v = vs("clts_s1.0")
    add("CLTS with σ = 1.0 (Eq. 7's literal reading, the default until 2026-12-03) helps",
        "(the paper's legible text)", m, v)
    d2 = seed_diffs(per_arm, BEST_ARM, "baseline", "second_fid")
    add(f"{BEST_ARM}'s gain holds with the ancestral sampler (100 steps, many at high noise)",
        "(the paper evaluates with its own samplers)", _diff_text(d2),
        verdict(d2, noise=paired_noise(per_arm, "second_fid")))
    for arm, paper in ARM_CLAIMS.items():  # the long horizon's new arms, once measured
        if arm not in per_arm:
            continue
        for other in ("baseline", "min_snr"):
            m, v = vs(arm, other)
            add(f"{arm} ends ahead of {other} at step {scale.total_steps}", paper,
                m + (speedup(arm) if other == "baseline" else ""), v)
    if lead:
        add(f"{BEST_ARM}'s paired ΔFID vs the baseline at every evaluated checkpoint (mean over "
            f"{_seeds(max(n for _, n in lead.values()))})", "Fig. 5: the gap to the baseline along training",
            ", ".join(f"step {st}: {m_:+.2f}" for st, (m_, _) in lead.items()), "a measurement")
    if probe:
        text = ", ".join(f"t {t}: {100 * m_:+.1f}%" for t, (m_, _, _) in sorted(probe.items()))
        add(f"{BEST_ARM}'s held-out ε-MSE vs the baseline's at step {scale.total_steps} (mean over "
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
        with writing(doc):
            atomic_write_text(doc, new)
    return new != text
