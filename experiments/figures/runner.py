"""
Training the figures' models and running their analyses into the ledger: where each run lives
(the CPU study's folder or ``--out``), training the missing ones, one runner per task kind, and
``run_figures``, which does both and then rebuilds the report from the ledger.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from experiments import analysis as an
from experiments.figures.reporting import report
from experiments.figures.settings import GROUPS, ROOT, RUN_BY_NAME, RUNS, SCRIPTS, Settings, config_mismatches, \
    diffusion_flags, gan_finished, gan_flags
from experiments.figures.tasks import Task, build_tasks, check_settings, repo_rel, save_ledger, task_done
from experiments.study.arms import flags_to_argv
from experiments.study.data import prepare_data
from experiments.study.ledger import run_finished
from guided_diffusion import logger
from guided_diffusion.files import atomic_write


def _command(script: str, argv: Sequence[str]) -> str:
    return "python " + shlex.join([repo_rel(os.path.join(SCRIPTS, script))]
                                  + [repo_rel(a) if os.path.exists(a) else a for a in map(str, argv)])


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OPENAI_LOGDIR", None)
    # this checkout first: the scripts must import this tree's packages, not another installed copy
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


_SCRIPT_CACHE: Dict[str, Any] = {}


def load_script(rel: str):
    """A script of ``scripts/`` as a module (its ``main(argv)`` is what the command line runs)."""
    if rel not in _SCRIPT_CACHE:
        path = os.path.join(SCRIPTS, rel)
        spec = importlib.util.spec_from_file_location("figures_" + os.path.splitext(os.path.basename(rel))[0], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _SCRIPT_CACHE[rel] = mod
    return _SCRIPT_CACHE[rel]


def call_script(rel: str, argv: List[str], log_path: str, settings: Settings) -> None:
    """Run ``scripts/<rel>`` with ``argv``: a subprocess (its output to ``log_path``), or in-process for tests."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as logf:
        logf.write(f"\n$ {_command(rel, argv)}\n")
    if settings.train_inprocess:
        with open(log_path, "a") as logf, contextlib.redirect_stdout(logf):
            try:
                load_script(rel).main(argv)
            finally:
                logger.reset()  # its stdout writer holds this log file: close it while it is open
        return
    with open(log_path, "a") as logf:
        proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, rel)] + argv, stdout=logf,
                              stderr=subprocess.STDOUT, env=_env(settings.diffusion.threads), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/{rel} failed (exit {proc.returncode}); see {log_path}")


def locate_runs(settings: Settings, out: str, study_out: str, data: str, names: Sequence[str],
                log: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
    """
    Where each run lives and whether it must be trained: a ``from_study`` run is the study's
    folder when finished there with the flags it would get here, else ``out/runs/<name>``.

    :return: name -> ``{"dir", "source" ("study" or "figures"), "finished", "flags", "script"}``.
    """
    where: Dict[str, Dict[str, Any]] = {}
    for name in names:
        spec = RUN_BY_NAME[name]
        own = os.path.join(out, "runs", name)
        if spec.kind == "gan":
            flags = gan_flags(spec, settings, data, own)
            if os.path.isfile(os.path.join(own, "gan_config.yaml")):
                bad = config_mismatches(own, flags, ("image_size", "nz", "ngf", "ndf", "batch_size", "lr",
                                                     "total_steps", "save_interval", "seed"), "gan_config.yaml")
                if bad:
                    raise ValueError(f"{own} was trained with other settings ({'; '.join(bad)}); delete it or use "
                                     "another --out")
            where[name] = dict(dir=own, source="figures", finished=gan_finished(own, settings.gan.total_steps),
                               flags=flags, script="baselines/dcgan_train.py")
            continue
        total = settings.diffusion.total_steps
        if spec.from_study and study_out:
            theirs = os.path.join(study_out, "runs", name)
            if run_finished(theirs, total):
                bad = config_mismatches(theirs, diffusion_flags(spec, settings, data, theirs))
                if not bad:
                    where[name] = dict(dir=theirs, source="study", finished=True,
                                       flags=diffusion_flags(spec, settings, data, theirs), script="image_train.py")
                    continue
                log(f"figures: {theirs} differs from the study's flags here ({'; '.join(bad)}); not used")
            elif os.path.isdir(theirs):
                log(f"figures: {theirs} is not finished (no complete checkpoint at step {total}); not used")
        flags = diffusion_flags(spec, settings, data, own)
        if os.path.isfile(os.path.join(own, "config.yaml")):
            bad = config_mismatches(own, flags)
            if bad:
                raise ValueError(f"{own} was trained with other settings ({'; '.join(bad)}); delete it or use another "
                                 "--out")
        where[name] = dict(dir=own, source="figures", finished=run_finished(own, total), flags=flags,
                           script="image_train.py")
    return where


def _train_cost(name: str) -> float:
    """Relative single-thread cost (measured: docs/figures.md), for longest-first scheduling."""
    return {"deep-s3": 2300.0, "dcgan-s1": 600.0, "dcgan-s2": 600.0}.get(name, 1660.0)


def train_runs(settings: Settings, where: Dict[str, Dict[str, Any]], out: str, jobs: int,
               log: Callable[[str], None] = print) -> Dict[str, float]:
    """Train (or resume) every unfinished run of ``where``, ``jobs`` at a time; returns name -> seconds."""
    todo = sorted((n for n, w in where.items() if not w["finished"]), key=_train_cost, reverse=True)
    if not todo:
        return {}
    log(f"figures: training {len(todo)} run(s), {max(1, jobs)} at a time: {', '.join(todo)}")

    def one(name: str) -> Tuple[str, float]:
        w = where[name]
        t0 = time.time()
        log(f"figures: {name}: training ({RUN_BY_NAME[name].arm.description if RUN_BY_NAME[name].arm else 'DCGAN'}, "
            f"seed {RUN_BY_NAME[name].seed}) -> {repo_rel(w['dir'])}")
        call_script(w["script"], flags_to_argv(w["flags"]), os.path.join(out, "logs", name + ".log"), settings)
        done = (gan_finished(w["dir"], settings.gan.total_steps) if RUN_BY_NAME[name].kind == "gan"
                else run_finished(w["dir"], settings.diffusion.total_steps))
        if not done:
            raise RuntimeError(f"{name}: training ended without its final checkpoint; see {out}/logs/{name}.log")
        w["finished"] = True
        log(f"figures: {name}: trained in {time.time() - t0:.0f} s")
        return name, time.time() - t0

    if settings.train_inprocess or jobs <= 1:
        return dict(one(n) for n in todo)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, todo))


def training_data(settings: Settings, out: str, study_out: str, source: str,
                  log: Callable[[str], None] = print) -> str:
    """The training images: the study's ``data/train_<px>.npz`` when it is there, else prepared in ``out``."""
    px = settings.diffusion.image_size
    theirs = os.path.join(study_out, "data", f"train_{px}.npz") if study_out else ""
    if not source and theirs and os.path.isfile(theirs):
        return theirs
    return prepare_data(out, settings.diffusion, source, log)[0]


# ---------------------------------------------------------------------------------------------
# Running the analyses
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    settings: Settings
    ledger: str
    work: str                       # out/analysis: the scripts' own output folders
    where: Dict[str, Dict[str, Any]]
    data: str
    device: str
    log: Callable[[str], None]


def _write_npz(path: str, **arrays: Any) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _copy_into_ledger(src_dir: str, names: Sequence[str], dest_dir: str) -> None:
    os.makedirs(dest_dir, exist_ok=True)
    for n in names:  # the last file decides completeness: each appears whole or not at all
        with open(os.path.join(src_dir, n), "rb") as src:
            atomic_write(os.path.join(dest_dir, n), lambda f: shutil.copyfileobj(src, f))


def run_table1(task: Task, ctx: Context) -> str:
    """One ``scripts/consistency.py`` call; its uint8 samples go to the ledger."""
    p, s = task.params, ctx.settings
    names = GROUPS[p["group"]]
    out_dir = os.path.join(ctx.work, task.key)
    argv = ["--run_dir", *[ctx.where[n]["dir"] for n in names], "--step", str(p["step"]),
            "--names", ",".join(names), "--num_samples", str(s.num_samples), "--seed", str(p["seed0"]),
            "--batch_size", str(s.num_samples), "--device", ctx.device, "--out_dir", out_dir]
    if RUN_BY_NAME[names[0]].kind == "diffusion":
        argv += ["--ema_rate", s.ema_rate]
        argv += (["--use_ddim", "True", "--timestep_respacing", s.ddim] if p["ddim"] else
                 ["--use_ddim", "False", "--timestep_respacing", s.respacing])
    with contextlib.redirect_stdout(_Tee(ctx.log)):
        load_script("consistency.py").main(argv)
    with np.load(os.path.join(out_dir, "samples.npz")) as f:
        images, got_names, seeds = f["arr_0"], [str(x) for x in f["names"]], f["seeds"]
    if got_names != list(names) or images.dtype != np.uint8:
        raise RuntimeError(f"{out_dir}/samples.npz: unexpected content ({got_names}, {images.dtype})")
    _write_npz(os.path.join(ctx.ledger, task.files[0]), images=images, names=np.asarray(names), seeds=seeds,
               step=np.asarray(p["step"]), sampler=np.asarray(p["sampler"]))
    return _command("consistency.py", argv)


def run_fig2(task: Task, ctx: Context) -> str:
    """
    Fig. 2 for one pair: each model's own sampling chain from the same x_T and per-step noise
    (``analysis.predicted_xstart_trajectory``, every step kept); per step, the PSNR between the two
    models' predicted x0 (pooled and per-image mean) and each one's PSNR to its own final sample.
    """
    p, s = task.params, ctx.settings
    seeds = list(range(s.fig2_seeds))
    device = an.pick_device(ctx.device)
    shape = (3, s.diffusion.image_size, s.diffusion.image_size)
    preds, finals, to_final, t_train = [], [], [], None
    for name in task.runs:
        ckpt = an.resolve_checkpoint("", ctx.where[name]["dir"], p["step"], s.ema_rate, True)
        model, diffusion, _, _ = an.load_diffusion_model(ckpt, overrides={"timestep_respacing": s.respacing},
                                                         device=device)
        keep = range(diffusion.num_timesteps)
        with torch.no_grad():
            kept, final, table = an.predicted_xstart_trajectory(model, diffusion, an.SharedNoise(seeds, shape), keep,
                                                                device=device)
        preds.append(np.stack([an.to_uint8(k["pred_xstart"]) for k in kept]))  # [S, N, H, W, C]
        finals.append(an.to_uint8(final))
        to_final.append(table)  # [S, N] dB
        t_train = [int(k["t_train"]) for k in kept]
    rows = []
    for k, t in enumerate(t_train):
        rows.append({"step": k, "t_train": t, "between_pooled_db": an.pooled_psnr(preds[0][k], preds[1][k]),
                     "between_mean_db": float(an.psnr(preds[0][k], preds[1][k]).mean()),
                     "a_to_final_db": float(to_final[0][k].mean()), "b_to_final_db": float(to_final[1][k].mean())})
    cols = an.evenly_spaced_steps(len(t_train), s.fig2_columns)
    _write_npz(os.path.join(ctx.ledger, task.files[1]),
               xstart=np.stack([pr[cols][:, : s.fig2_show] for pr in preds]),  # [2, cols, show, H, W, C]
               final=np.stack([f[: s.fig2_show] for f in finals]), t_train=np.asarray([t_train[c] for c in cols]),
               names=np.asarray(task.runs), final_pooled_db=np.asarray(an.pooled_psnr(finals[0], finals[1])))
    an.write_csv(os.path.join(ctx.ledger, task.files[0]), rows)  # last (atomic): the task is complete
    # "experiments/figures.py" (the module's old path) is kept: the committed ledger and docs/figures.md quote it
    return (f"experiments/figures.py: run_fig2 (analysis.predicted_xstart_trajectory of {', '.join(task.runs)} at step "
            f"{p['step']}, EMA {s.ema_rate}, DDPM respaced to {s.respacing}, seeds 0-{len(seeds) - 1}); one model's "
            f"half: python scripts/structure_timesteps.py --run_dir {repo_rel(ctx.where[task.runs[0]]['dir'])} "
            f"--step {p['step']} --ema_rate {s.ema_rate} --timestep_respacing {s.respacing}")


def run_fig3(task: Task, ctx: Context) -> str:
    p, s = task.params, ctx.settings
    name = task.runs[0]
    out_dir = os.path.join(ctx.work, task.key)
    argv = ["--run_dir", ctx.where[name]["dir"], "--step", str(p["step"]), "--use_ema", "False",
            *flags_to_argv(s.hessian), "--device", ctx.device, "--out_dir", out_dir]
    argv += ["--data_dir", ctx.data] if p["model_kind"] == "diffusion" else ["--gan_batchnorm", s.gan_batchnorm]
    with contextlib.redirect_stdout(_Tee(ctx.log)):
        load_script("hessian_spectrum.py").main(argv)
    _copy_into_ledger(out_dir, [os.path.basename(f) for f in task.files], os.path.join(ctx.ledger, task.key))
    return _command("hessian_spectrum.py", argv)


def run_fig4(task: Task, ctx: Context) -> str:
    p, s = task.params, ctx.settings
    name = task.runs[0]
    out_dir = os.path.join(ctx.work, task.key)
    argv = ["--run_dir", ctx.where[name]["dir"], "--step", f"{p['steps'][0]},{p['steps'][1]}", "--use_ema", "False",
            f"--alphas={s.landscape_alphas}", "--batch_size", str(s.landscape_batch), "--device", ctx.device,
            "--out_dir", out_dir]
    argv += ["--data_dir", ctx.data] if p["model_kind"] == "diffusion" else ["--gan_batchnorm", s.gan_batchnorm]
    with contextlib.redirect_stdout(_Tee(ctx.log)):
        load_script("loss_landscape.py").main(argv)
    _copy_into_ledger(out_dir, [os.path.basename(f) for f in task.files], os.path.join(ctx.ledger, task.key))
    return _command("loss_landscape.py", argv)


RUNNERS: Dict[str, Callable[[Task, Context], str]] = {"table1": run_table1, "fig2": run_fig2, "fig3": run_fig3,
                                                      "fig4": run_fig4}


class _Tee:
    """Stdout for the scripts run in-process: their lines, indented, to the stream that was stdout before."""

    def __init__(self, log: Callable[[str], None]):
        self.stream, self.buf = sys.stdout, ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self.stream.write("    " + line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_figures(out: str, settings: Settings, ledger: str, doc: str = "", study_out: str = "", source: str = "",
                jobs: Optional[int] = None, device: str = "auto", log: Callable[[str], None] = print) -> Dict[str, Any]:
    """
    Train what the missing analyses need, run them into the ledger, then rebuild the tables,
    figures and ``doc``'s generated section from the ledger (``report``).

    :param out: the working folder (runs, logs, the scripts' outputs).
    :param ledger: the folder of committed results (docs/figures for the cpu preset).
    :param doc: the markdown file whose "Measured here" section is regenerated ("" = none).
    :param study_out: the CPU study's folder: its finished baseline-s1/-s2 are reused.
    :return: the report (see ``report``) with ``"trained"`` (name -> seconds) and ``"ran"`` (task keys).
    """
    jobs = jobs or settings.diffusion.jobs
    book = check_settings(ledger, settings)
    tasks = build_tasks(settings)
    todo = [t for t in tasks if not (task_done(t, ledger) and t.key in book["tasks"])]
    trained: Dict[str, float] = {}
    ran: List[str] = []
    if not todo:
        log(f"figures: all {len(tasks)} analyses are in {repo_rel(ledger)}; nothing to train or measure")
    else:
        log(f"figures: {len(todo)} of {len(tasks)} analyses to run (the rest are in {repo_rel(ledger)})")
        t0 = time.time()
        data = training_data(settings, out, study_out, source, log)
        with np.load(data) as f:
            book["train_images"] = int(f["arr_0"].shape[0])
        needed = sorted({n for t in todo for n in t.runs}, key=lambda n: [r.name for r in RUNS].index(n))
        where = locate_runs(settings, out, study_out, data, needed, log)
        trained = train_runs(settings, where, out, jobs, log)
        book["settings"] = settings.fingerprint()
        for name, w in where.items():
            entry = book["runs"].setdefault(name, {})
            entry.update(source=w["source"], dir=repo_rel(w["dir"]),
                         command=_command(w["script"], flags_to_argv({k: v for k, v in w["flags"].items()})))
            if name in trained:
                entry["train_s"] = round(trained[name], 1)
        save_ledger(ledger, book)
        ctx = Context(settings, ledger, os.path.join(out, "analysis"), where, data, device, log)
        with _torch_threads(max(1, jobs) * max(1, settings.diffusion.threads)):
            for task in todo:
                t1 = time.time()
                log(f"figures: {task.key}: running")
                command = RUNNERS[task.kind](task, ctx)
                now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                book["tasks"][task.key] = {"command": command, "seconds": round(time.time() - t1, 1),
                                           "runs": {n: repo_rel(where[n]["dir"]) for n in task.runs}, "finished": now}
                save_ledger(ledger, book)
                ran.append(task.key)
                log(f"figures: {task.key}: done in {time.time() - t1:.0f} s")
        book["commit"] = _git_commit()
        book["wall_s"] = round(book.get("wall_s", 0.0) + time.time() - t0, 1)
        save_ledger(ledger, book)
    rep = report(ledger, settings, doc, log)
    rep.update(trained=trained, ran=ran)
    return rep
