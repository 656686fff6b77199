"""
The study's runner: trains and evaluates the runs (``train_and_evaluate``: one run;
``run_study``: every pending run, ``jobs`` at once), commits each finished run to the ledger, adds
the paired bootstrap (``bootstrap_study``, sampling a run's final checkpoint again where its
samples were not committed), and holds ``--out`` for one study at a time (``StudyLock``).

Everything goes to one folder (``--out``): ``data/``, ``runs/<arm>-s<seed>/`` (normal training run
folders), ``logs/``, ``cache/``, ``study.json``, ``timing.json`` and the lock ``study.lock``.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from experiments.study.arms import ARMS, ROOT, SCRIPTS, Arm, Scale, arm_flags, flags_to_argv, keeps_samples, \
    run_name
from experiments.study.data import prepare_data, prepare_heldout
from experiments.study.errors import StudyLocked, run_step, writing
from experiments.study.evaluation import PairedBootstrap, fid_flags, probe_run, reference_statistics, \
    sample_features, second_sampler, warm_reference
from experiments.study.ledger import BOOTSTRAP_FILE, SAMPLES_FILE, check_ledger, commit_to_ledger, committed_seeds, \
    final_fid, final_samples, in_ledger, ledger_dir, missing_points, read_bootstrap, read_curve, run_finished, \
    training_clock_s
from experiments.study.report import summarize
from guided_diffusion.checkpoint import list_complete_checkpoints
from guided_diffusion.files import atomic_write
from guided_diffusion.run_folder import RunFolderError, RunLock

LOCK_FILE = "study.lock"


class StudyLock(RunLock):
    """
    ``--out`` held by one study: the file ``<out>/study.lock`` names the holder's pid, host and start
    time (``run_folder.RunLock``'s rules: a lock whose process on this host is gone is stale and
    taken over; one held by a live process, or by another host, which cannot be checked, is not).
    """

    def __init__(self, out: str):
        super().__init__(out)
        self.path = os.path.join(out, LOCK_FILE)

    def acquire(self) -> "StudyLock":
        """
        Take the lock.

        :raises StudyLocked: in one line, naming the holder, when another study holds ``--out``.
        """
        try:
            with writing(self.path):
                super().acquire()
        except RunFolderError:
            owner = self.owner() or {}
            here = owner.get("host") == socket.gethostname()
            raise StudyLocked(
                f"{self.folder} is in use by another study (pid {owner.get('pid')} on "
                f"{'this host' if here else 'host ' + str(owner.get('host'))}, since {owner.get('since')}): "
                f"two studies on one --out would train the same runs; wait for it, stop it, or use another "
                f"--out (if that process is gone, delete {self.path})") from None
        return self


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OPENAI_LOGDIR", None)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _call(argv: List[str], log_path: str, env: Dict[str, str]) -> None:
    run_step(argv, log_path, env, cwd=ROOT)


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
                         {k: info[k] for k in ("train_s", "eval_s", "train_clock_s", "resumed")}, log=log)
    log(f"study: {info['run']}: done (train {info['train_s']:.0f} s, eval {info['eval_s']:.0f} s)")
    return info


def _copy_atomic(src: str, dest: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    with writing(dest):
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
    committed = final_fid(ledger_dir(ledger, scale, run), scale)
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
    if any(st == scale.total_steps for st, _, _ in read_curve(committed, scale, second=True)):
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

    The ledger is checked first (``ledger.check_ledger``, the second sampler's points aside: they
    are added here); a damaged or incomplete one stops it before anything is written.

    :return: the file's path.
    """
    check_ledger(ledger, scale, second=False, consequence="nothing was bootstrapped")
    path = os.path.join(ledger, scale.name, BOOTSTRAP_FILE)
    done = {(a, s) for a, s, _ in read_bootstrap(path)}
    cache_dir = os.path.join(out, "cache")
    boot: Optional[PairedBootstrap] = None
    for arm in bootstrap_arms(scale):
        for seed in sorted(committed_seeds(ledger, scale)):
            run, base = run_name(arm, seed), run_name("baseline", seed)
            if (arm, seed) in done or not (in_ledger(ledger, scale, run) and in_ledger(ledger, scale, base)):
                continue
            for r in (run, base):
                backfill_second_sampler(out, scale, ledger, r, ref, log)
            files = [backfill_samples(out, scale, ledger, r, ref, log) for r in (run, base)]
            if None in files:
                continue
            boot = boot or PairedBootstrap(*reference_statistics(scale, ref, cache_dir))
            reps = boot.replicates(*(sample_features(f, cache_dir) for f in files))
            new = not os.path.isfile(path)
            with writing(path), open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["arm", "seed", "draw", "dfid"])
                w.writerows([arm, seed, i, f"{d:.6f}"] for i, d in enumerate(reps))
            log(f"study: {run}: paired bootstrap of FID - baseline's, {len(reps)} draws: "
                f"2.5-97.5% [{np.percentile(reps, 2.5):+.2f}, {np.percentile(reps, 97.5):+.2f}]")
    return path


def _update_timing(out: str, key: str, seconds: float) -> Dict[str, float]:
    path = os.path.join(out, "timing.json")
    timing: Dict[str, float] = {}
    if os.path.isfile(path):
        with open(path) as f:
            timing = json.load(f)
    timing[key] = timing.get(key, 0.0) + seconds
    with writing(path):
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
    The ledger is checked before anything is trained (``ledger.check_ledger``); a ledger folder
    without ``done.json`` of a run to train is reported and replaced when the run is committed.
    ``out`` is held for this study alone (``StudyLock``).

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
    with writing(out):
        os.makedirs(out, exist_ok=True)
    with StudyLock(out) as lock, writing():
        if lock.took_over:
            log(f"study: {out}: took over the lock of pid {lock.took_over.get('pid')} (since "
                f"{lock.took_over.get('since')}), which is no longer running")
        log(f"study: ledger {os.path.join(os.path.abspath(ledger), scale.name)}" if ledger
            else f"study: no ledger (--ledger ''): the results stay in {os.path.abspath(out)}")
        return _run_study(out, scale, arms, seeds, source, jobs, log, ledger)


def _run_study(out: str, scale: Scale, arms: Sequence[Arm], seeds: Sequence[int], source: str, jobs: int,
               log: Callable[[str], None], ledger: str) -> Dict[str, Any]:
    # arm-major: an arm's seeds finish together, so its paired differences exist as early as possible
    todo = [(a, s) for a in arms for s in seeds]
    if ledger:
        pending = [(a, s) for a, s in todo if not in_ledger(ledger, scale, run_name(a.name, s))]
        names = [run_name(a.name, s) for a, s in pending]
        for name in names:
            if os.path.isdir(ledger_dir(ledger, scale, name)):
                log(f"study: {ledger_dir(ledger, scale, name)}: in the ledger without done.json (an incomplete "
                    f"run); {name} runs again and replaces it")
        check_ledger(ledger, scale, skip=names, second=False, consequence="nothing was trained")
    path = os.path.join(out, "study.json")
    with writing(path), open(path, "w") as f:
        json.dump({"scale": asdict(scale), "arms": [asdict(a) for a in arms], "seeds": list(seeds)}, f, indent=1)
    t0 = time.time()
    train, ref = prepare_data(out, scale, source, log)
    cache_dir = os.path.join(out, "cache")
    if not ledger:
        pending = [(a, s) for a, s in todo
                   if not run_finished(os.path.join(out, "runs", run_name(a.name, s)), scale.total_steps)
                   or missing_points(os.path.join(out, "runs", run_name(a.name, s)), scale)]
    infos: List[Dict[str, Any]] = []
    if pending:
        warm_reference(scale, ref, cache_dir)
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


def run_bootstrap(out: str, scale: Scale, ledger: str, source: str = "", log: Callable[[str], None] = print) -> str:
    """
    ``--bootstrap_only``: train nothing, add the paired bootstrap of the committed runs to the ledger
    (``bootstrap_study``), with ``out`` held as ``run_study`` holds it.

    :return: the bootstrap file's path.
    """
    with writing(out):
        os.makedirs(out, exist_ok=True)
    with StudyLock(out), writing():
        log(f"study: ledger {os.path.join(os.path.abspath(ledger), scale.name)}")
        _, ref = prepare_data(out, scale, source, log)
        return bootstrap_study(out, scale, ledger, ref, log)


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
