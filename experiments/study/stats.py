"""
The study's statistics: iterations to a target FID, means and paired differences over seeds, the
pooled seed noise and the verdicts' rules (``verdict``), the bootstrap interval of a seed mean, the
probe's relative loss and the curves' per-step paired lead. Pure functions of numbers (and of the
ledger's ``bootstrap.csv``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import t as student_t

from experiments.study.ledger import read_bootstrap


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


def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample sd of the values that are not None or NaN ((nan, nan) for none, sd 0 for one)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_differences(arm: Dict[int, Optional[float]], base: Dict[int, Optional[float]],
                       key: str) -> Dict[str, Any]:
    """Per-seed differences arm - baseline of the same seed (the runs share sampling noise): mean, sd, n."""
    diffs = [arm[s] - base[s] for s in arm if arm.get(s) is not None and base.get(s) is not None]
    m, sd = mean_sd(diffs)
    return {f"{key}_mean": m, f"{key}_sd": sd, f"{key}_n": len(diffs),
            f"{key}_per_seed": " ".join(f"{d:+.2f}" for d in diffs)}


def seed_diffs(per_arm: Dict[str, Dict[str, Any]], arm: str, other: str,
               key: str = "final_fid") -> List[float]:
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
        d = np.asarray(seed_diffs(per_arm, arm, "baseline", key), dtype=float)
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
    m, own_sd = mean_sd(diffs)
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


def probe_relative(probes: Dict[Tuple[str, int], Dict[int, float]], arm: str,
                   seeds: Sequence[int]) -> Dict[int, Tuple[float, float, int]]:
    """t -> (mean, sd, n) over seeds of arm/baseline - 1 of the held-out loss, paired by seed."""
    out: Dict[int, Tuple[float, float, int]] = {}
    ts = sorted(set().union(*(probes.get((arm, s), {}).keys() for s in seeds)))
    for t in ts:
        rel = [probes[(arm, s)][t] / probes[("baseline", s)][t] - 1.0 for s in seeds
               if t in probes.get((arm, s), {}) and t in probes.get(("baseline", s), {})]
        if rel:
            m, sd = mean_sd(rel)
            out[t] = (m, sd, len(rel))
    return out


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


def speedup(arm_curve: Sequence[Tuple[int, float]], base_curve: Sequence[Tuple[int, float]],
            k: int) -> Optional[Tuple[float, str]]:
    """
    S(k) = k / (the iterations the arm needs to reach the baseline's FID at step k), from one
    seed's curves ((step, FID), as measured; ``iterations_to_reach`` interpolates between points).

    :return: ``(S, bound)``; ``bound`` is "" for a measured S, ">=" when the arm is already below
        the target at its first point (S is at least k / that step), "<" when it has not got there
        by its last measured step (S is below k / that step); None when the baseline has no point at k
        or the arm has no curve.
    """
    target = next((f for st, f in base_curve if st == k), None)
    if target is None or not arm_curve:
        return None
    it = iterations_to_reach(arm_curve, target)
    if it is None:
        return k / arm_curve[-1][0], "<"
    if it == arm_curve[0][0] and arm_curve[0][1] <= target:
        return k / it, ">="
    return k / it, ""


def mean_speedup(per_seed: Dict[int, Optional[Tuple[float, str]]]) -> Optional[Tuple[float, str]]:
    """
    The mean S over the seeds that have one, with the bound its censored seeds give it: "<" or
    ">=" when they are all censored the same way, "mixed" when some are "<" and others ">=" (the
    mean is then no bound at all).
    """
    got = [v for v in per_seed.values() if v is not None]
    if not got:
        return None
    bounds = {b for _, b in got if b}
    return float(np.mean([v for v, _ in got])), ("mixed" if len(bounds) > 1 else bounds.pop() if bounds else "")
