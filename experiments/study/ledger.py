"""
The study's records: a run folder's files as the study reads them (its FID/KID curve, probe rows,
training clock, final samples) and the committed ledger (``<ledger>/<scale>/<run>/``: a finished
run's small files and its ``done.json``): committing a run to it, and checking it
(``ledger_problems``, ``check_ledger``) before anything is computed from it or rewritten.

A ledger run folder is complete for its scale when it has ``done.json`` (written last: a folder
without it is an incomplete run), ``config.yaml``, ``progress.csv``, a ``fid_curve.csv`` with the
FID of the scale's ``num_samples`` DDIM samples at every evaluation step (and the second,
ancestral sampler's at the final step for the runs that keep their samples: ``arms.keeps_samples``)
and a ``probe.csv`` with every probe timestep at the final step; every row of its CSV files whole.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from experiments.study.arms import ROOT, Scale, keeps_samples
from experiments.study.errors import LedgerError, writing
from experiments.study.evaluation import probe_timesteps, sampler_key, second_sampler
from guided_diffusion.checkpoint import list_complete_checkpoints


DEFAULT_LEDGER = os.path.join(ROOT, "docs", "study", "ledger")
LEDGER_FILES = ("config.yaml", "progress.csv", "fid_curve.csv", "probe.csv")
DONE_FILE = "done.json"  # written last: a run folder without it is incomplete
# the headline runs' final DDIM samples (the FID's own images, uint8, ~0.2 MB): anyone can recompute
# that FID, and the paired bootstrap resamples their features
SAMPLES_FILE = "samples_final.npz"
BOOTSTRAP_FILE = "bootstrap.csv"  # per scale: the replicates of each headline arm's paired FID difference


# ------------------------------------------------------------------------------------ reading CSVs


def csv_records(path: str, required: Sequence[str] = ()) -> Iterator[Tuple[int, Dict[str, str]]]:
    """
    ``(line, row)`` for every row of a CSV file the study wrote (blank lines skipped, as
    ``csv.DictReader`` does).

    :raises LedgerError: naming the file (and the line) when it has no header, lacks a ``required``
        column, or a row has more or fewer fields than the header (a row cut by a crash or an edit).
    """
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                raise LedgerError(f"{path}: empty (no header line)")
            missing = [c for c in required if c not in header]
            if missing:
                raise LedgerError(f"{path}: a damaged header (no {', '.join(missing)} column)")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise LedgerError(f"{path}, line {reader.line_num}: a damaged row ({len(row)} of "
                                      f"{len(header)} fields)")
                yield reader.line_num, dict(zip(header, row))
        except csv.Error as e:
            raise LedgerError(f"{path}, line {reader.line_num}: a damaged row ({e})") from None


def _value(path: str, line: int, row: Dict[str, str], column: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(row[column])
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise LedgerError(f"{path}, line {line}: a damaged row ({column} {row[column]!r} is not {what})") from None


# (line, step, num_samples, fid or None, kid or nan, (sampler, sampling_steps) or None)
CurveRecord = Tuple[int, int, int, Optional[float], float, Optional[Tuple[str, int]]]


def curve_records(path: str) -> List[CurveRecord]:
    """Every row of a ``fid_curve.csv``, parsed (``csv_records``' errors for a damaged file)."""
    out = []
    for line, r in csv_records(path, ("step", "num_samples", "fid")):
        fid = _value(path, line, r, "fid", float) if r["fid"] else None
        kid = _value(path, line, r, "kid", float) if r.get("kid") else math.nan
        sampler = (r["sampler"], _value(path, line, r, "sampling_steps", int)) if r.get("sampler") else None
        out.append((line, _value(path, line, r, "step", int), _value(path, line, r, "num_samples", int), fid, kid,
                    sampler))
    return out


# ------------------------------------------------------------------------------------ a run folder


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


def gradient_norm_spread(run_dir: str, after_step: int) -> Tuple[float, float, float]:
    """
    (mean, coefficient of variation, max) of the ``grad_norm`` column of the run's ``progress.csv``
    over the log rows after ``after_step``: how evenly a batch's draws pull (a weighting that lets a
    few rare draws dominate shows as a large, spread gradient norm).

    :raises LedgerError: naming the file when it has no such rows.
    """
    path = os.path.join(run_dir, "progress.csv")
    norms = [_value(path, line, r, "grad_norm", float) for line, r in csv_records(path, ("step", "grad_norm"))
             if _value(path, line, r, "step", int) > after_step]
    if not norms:
        raise LedgerError(f"{path}: no grad_norm rows after step {after_step}")
    mean = sum(norms) / len(norms)
    sd = math.sqrt(sum((g - mean) ** 2 for g in norms) / len(norms))
    return mean, sd / mean, max(norms)


def final_samples(run_dir: str, scale: Scale) -> Optional[str]:
    """The final checkpoint's DDIM samples that ``fid_curve.py --keep_samples True`` kept, or None."""
    folder = os.path.join(run_dir, "fid_curve_samples", f"step{scale.total_steps:06d}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npz")) if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def read_curve(run_dir: str, scale: Scale, second: bool = False) -> List[Tuple[int, float, float]]:
    """
    (step, fid, kid) rows of the run's fid_curve.csv measured with the study's settings: its
    DDIM sampler, or with ``second`` the ancestral ``SECOND_SAMPLER``, at the scale's evaluation
    steps (the FDM pair's ledger also holds a point at the step its first try was stopped at,
    measured before ``fid_flags`` named the steps). [] without the file; ``LedgerError`` for a
    damaged one, or for two different FIDs at one step with the same settings.
    """
    steps = set(scale.eval_steps())
    path = os.path.join(run_dir, "fid_curve.csv")
    if not os.path.isfile(path):
        return []
    second_flags = second_sampler(scale)
    want = (sampler_key(second_flags["use_ddim"], second_flags["timestep_respacing"]) if second
            else sampler_key(True, scale.sampling))
    rows: Dict[int, Tuple[int, float, float]] = {}
    for line, step, num_samples, fid, kid, sampler in curve_records(path):
        if num_samples != scale.num_samples or fid is None or step not in steps:
            continue
        if sampler is not None and sampler != want:
            continue
        if step in rows and rows[step][1] != fid:
            # which of two measurements the tables used would depend on the file's order
            raise LedgerError(f"{path}, line {line}: a second FID at step {step} ({fid:g}; the first: "
                              f"{rows[step][1]:g}), measured with the same settings")
        rows.setdefault(step, (step, fid, kid))
    return sorted(rows.values())


def missing_points(run_dir: str, scale: Scale) -> List[int]:
    """The scale's evaluation steps that the run's curve (DDIM, ``num_samples``) lacks."""
    have = {s for s, _, _ in read_curve(run_dir, scale)}
    return [s for s in scale.eval_steps() if s not in have]


def final_fid(run_dir: str, scale: Scale) -> Optional[float]:
    """The run's FID at the final step (DDIM), or None."""
    return next((f for st, f, _ in read_curve(run_dir, scale) if st == scale.total_steps), None)


def probe_rows(run_dir: str, step: int) -> Dict[int, float]:
    """t -> held-out epsilon-MSE of the run's EMA model at ``step`` (its probe.csv), {} when absent."""
    path = os.path.join(run_dir, "probe.csv")
    if not os.path.isfile(path):
        return {}
    out = {}
    for line, r in csv_records(path, ("step", "t", "mse")):
        if _value(path, line, r, "step", int) == step:
            out[_value(path, line, r, "t", int)] = _value(path, line, r, "mse", float)
    return out


# ------------------------------------------------------------------------------------ the ledger


def ledger_dir(ledger: str, scale: Scale, run: str) -> str:
    """Where a finished run's small files live in the committed ledger: ``<ledger>/<scale>/<run>/``."""
    return os.path.join(ledger, scale.name, run)


def in_ledger(ledger: str, scale: Scale, run: str) -> bool:
    """True when the run's results are committed (its ``done.json`` is there): it is not run again."""
    return os.path.isfile(os.path.join(ledger_dir(ledger, scale, run), DONE_FILE))


def commit_to_ledger(ledger: str, scale: Scale, run_dir: str, run: str, info: Dict[str, Any],
                     log: Callable[[str], None] = print) -> str:
    """
    Copy a finished run's small files (``LEDGER_FILES``, no checkpoints) and ``done.json`` into the
    ledger, all at once (written beside, then renamed), so the ledger never holds half a run. A
    folder already there is replaced, and ``log`` says so: which folder, and why.
    """
    dest = ledger_dir(ledger, scale, run)
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in LEDGER_FILES:
        if os.path.isfile(os.path.join(run_dir, name)):
            with writing(os.path.join(tmp, name)):
                shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
    samples = final_samples(run_dir, scale)
    if samples:
        with writing(os.path.join(tmp, SAMPLES_FILE)):
            shutil.copyfile(samples, os.path.join(tmp, SAMPLES_FILE))
    with writing(os.path.join(tmp, DONE_FILE)), open(os.path.join(tmp, DONE_FILE), "w") as f:
        json.dump({"run": run, "scale": scale.name, "total_steps": scale.total_steps, "commit": _commit(), **info},
                  f, indent=1)
    if os.path.isdir(dest):
        why = ("it has no done.json: an incomplete run folder" if not os.path.isfile(os.path.join(dest, DONE_FILE))
               else "it was committed while this run was measured: another study on the same ledger?")
        log(f"study: {run}: replacing the ledger folder {dest} with this run's results ({why})")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def committed_seeds(ledger: str, scale: Scale) -> List[int]:
    """The seeds of the scale's committed runs (those with their ``done.json``)."""
    folder = os.path.join(ledger, scale.name)
    runs = [d for d in os.listdir(folder) if in_ledger(ledger, scale, d)] if os.path.isdir(folder) else []
    return sorted({int(d.rsplit("-s", 1)[1]) for d in runs})


def read_bootstrap(path: str) -> List[Tuple[str, int, float]]:
    """The (arm, seed, paired FID difference) rows of a ``bootstrap.csv`` ([] when it is missing)."""
    if not os.path.isfile(path):
        return []
    return [(r["arm"], _value(path, line, r, "seed", int), _value(path, line, r, "dfid", float))
            for line, r in csv_records(path, ("arm", "seed", "dfid"))]


# ------------------------------------------------------------------------------------ checking the ledger


def run_folder_problems(folder: str, scale: Scale, second: bool = True) -> List[str]:
    """
    What keeps a ledger run folder from being complete for ``scale`` (the module's docstring), one
    line each, naming the file (and the line of a damaged row); [] when it is complete.

    :param second: also require the second sampler's final point of the runs that keep their
        samples (``runner.bootstrap_study`` adds it to a run that became a headline arm later).
    """
    name = os.path.basename(folder.rstrip(os.sep))
    arm, sep, seed = name.rpartition("-s")
    if not sep or not arm or not seed.isdigit():
        return [f"{folder}: not a run folder (expected <arm>-s<seed>)"]
    done = os.path.join(folder, DONE_FILE)
    if not os.path.isfile(done):
        return [f"{folder}: no {DONE_FILE}: an incomplete run folder (a run is committed with its {DONE_FILE} "
                "last); rerun its arm to replace it, or remove the folder"]
    problems = []
    try:
        with open(done) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        problems.append(f"{done}: damaged (not a JSON object)")
    else:
        for key, want in (("run", name), ("scale", scale.name), ("total_steps", scale.total_steps)):
            if key in info and info[key] != want:
                problems.append(f"{done}: {key} is {info[key]!r}, expected {want!r}")
    for base in ("config.yaml", "progress.csv", "fid_curve.csv", "probe.csv"):
        if not os.path.isfile(os.path.join(folder, base)):
            problems.append(f"{os.path.join(folder, base)}: missing")
    final = scale.total_steps
    curve = os.path.join(folder, "fid_curve.csv")
    if os.path.isfile(curve):
        try:
            lacking = []
            missing = missing_points(folder, scale)
            if missing:
                lacking.append(f"no FID of {scale.num_samples} samples ({scale.sampling}) at step"
                               f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}")
            if second and keeps_samples(arm, scale) and not any(st == final for st, _, _
                                                                in read_curve(folder, scale, second=True)):
                flags = second_sampler(scale)
                lacking.append(f"no FID of the second sampler (ancestral, {flags['timestep_respacing']} steps) at "
                               f"the final step {final}")
            if lacking:
                problems.append(f"{curve}: " + "; ".join(lacking))
        except LedgerError as e:
            problems.append(str(e))
    probe = os.path.join(folder, "probe.csv")
    if os.path.isfile(probe):
        try:
            have = probe_rows(folder, final)
            missing = [t for t in probe_timesteps(scale.diffusion_steps) if t not in have]
            if missing:
                problems.append(f"{probe}: no probe rows at the final step {final} for t "
                                f"{', '.join(map(str, missing))}")
        except LedgerError as e:
            problems.append(str(e))
    return problems


def ledger_problems(ledger: str, scale: Scale, skip: Sequence[str] = (), second: bool = True) -> List[str]:
    """
    Every problem of the scale's ledger (``run_folder_problems`` of each run folder but those named
    in ``skip``, and a damaged ``bootstrap.csv``); [] when it is complete or absent. A ``.tmp``
    folder (a commit under way, or one a crash left: the next commit of that run removes it) is not a run.
    """
    folder = os.path.join(ledger, scale.name)
    if not os.path.isdir(folder):
        return []
    problems = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not name.endswith(".tmp") and name not in skip:
            problems += run_folder_problems(path, scale, second)
    try:
        read_bootstrap(os.path.join(folder, BOOTSTRAP_FILE))
    except LedgerError as e:
        problems.append(str(e))
    return problems


def check_ledger(ledger: str, scale: Scale, skip: Sequence[str] = (), second: bool = True,
                 consequence: str = "nothing was rewritten") -> None:
    """
    ``ledger_problems`` as an error: the first problem in one line (and how many more there are).

    :raises LedgerError: when the scale's ledger is incomplete or damaged.
    """
    problems = ledger_problems(ledger, scale, skip, second)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise LedgerError(f"the {scale.name} ledger is incomplete or damaged, {consequence}: {problems[0]}{more}")
