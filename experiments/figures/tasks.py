"""
The figures' analyses as tasks (one ledger entry each: the runs and checkpoints a task reads, the
ledger files it writes) and the ledger's bookkeeping (``ledger.json``: settings, runs, tasks).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from experiments.figures.settings import GROUPS, ROOT, RUN_BY_NAME, Settings
from guided_diffusion.files import atomic_write


# ---------------------------------------------------------------------------------------------
# Tasks (one ledger entry each)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One analysis: the runs and checkpoints it reads and the ledger files it writes."""

    key: str                     # e.g. "table1/eps-ddpm100-seed0-step002000"
    kind: str                    # "table1", "fig2", "fig3", "fig4"
    runs: Tuple[str, ...]
    files: Tuple[str, ...]       # ledger paths (relative to the ledger folder) it writes
    params: Dict[str, Any] = field(default_factory=dict)


def sampler_tag(settings: Settings, ddim: bool) -> str:
    return ("ddim" + settings.ddim.replace("ddim", "")) if ddim else f"ddpm{settings.respacing}"


def table1_key(group: str, sampler: str, seed0: int, step: int) -> str:
    return f"table1/{group}-{sampler}-seed{seed0}-step{step:06d}"


def build_tasks(settings: Settings) -> List[Task]:
    """Every analysis of the figures, in the order they run."""
    tasks: List[Task] = []
    n = settings.num_samples
    for group, names in GROUPS.items():
        kind = RUN_BY_NAME[names[0]].kind
        steps = settings.steps(kind)
        variants = [(s, False, 0) for s in steps]  # (step, ddim, first seed)
        variants.append((steps[-1], False, n))  # a replicate on other seeds: the sampling spread, and the null
        if kind == "diffusion":
            variants.append((steps[-1], True, 0))  # the sampler check
        for step, ddim, seed0 in variants:
            sampler = "gan" if kind == "gan" else sampler_tag(settings, ddim)
            key = table1_key(group, sampler, seed0, step)
            tasks.append(Task(key, "table1", names, (key + ".npz",),
                              dict(group=group, step=step, ddim=ddim, seed0=seed0, sampler=sampler)))
    final = settings.steps("diffusion")[-1]
    for pair, names in (("eps", ("baseline-s1", "baseline-s2")), ("x0", ("x0_pred-s1", "x0_pred-s2"))):
        tasks.append(Task(f"fig2/{pair}", "fig2", names, (f"fig2/{pair}.csv", f"fig2/{pair}.npz"),
                          dict(pair=pair, step=final)))
    hessian_files = ("hessian_eigenvalues.csv", "hessian_density.csv", "hessian_summary.json")
    landscape_files = ("loss_landscape.csv", "loss_landscape.json")
    for kind, name in (("diffusion", "baseline-s1"), ("gan", "dcgan-s1")):
        step = settings.steps(kind)[-1]
        tasks.append(Task(f"fig3/{kind}", "fig3", (name,), tuple(f"fig3/{kind}/{f}" for f in hessian_files),
                          dict(model_kind=kind, step=step)))
    for kind, name in (("diffusion", "baseline-s1"), ("gan", "dcgan-s1")):
        a, b = settings.steps(kind, settings.fig4_fractions)
        tasks.append(Task(f"fig4/{kind}", "fig4", (name,), tuple(f"fig4/{kind}/{f}" for f in landscape_files),
                          dict(model_kind=kind, steps=(a, b))))
    return tasks


def task_done(task: Task, ledger: str) -> bool:
    return all(os.path.isfile(os.path.join(ledger, f)) for f in task.files)


# ---------------------------------------------------------------------------------------------
# The ledger's bookkeeping (ledger.json)
# ---------------------------------------------------------------------------------------------

LEDGER_JSON = "ledger.json"


def load_ledger(ledger: str) -> Dict[str, Any]:
    path = os.path.join(ledger, LEDGER_JSON)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_ledger(ledger: str, data: Dict[str, Any]) -> None:
    os.makedirs(ledger, exist_ok=True)
    atomic_write(os.path.join(ledger, LEDGER_JSON),
                 lambda f: f.write(json.dumps(data, indent=1, sort_keys=True) + "\n"), text=True)


def check_settings(ledger: str, settings: Settings) -> Dict[str, Any]:
    """The ledger's bookkeeping; refuses a ledger made with other settings (mixing would mislabel numbers)."""
    data = load_ledger(ledger)
    have = data.get("settings")
    if have is not None and have != settings.fingerprint():
        want = settings.fingerprint()
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"{ledger}/{LEDGER_JSON} was written with other settings (differ in: {', '.join(diff)}); "
                         "give another --ledger, or delete that ledger to measure again")
    data.setdefault("settings", settings.fingerprint())
    data.setdefault("tasks", {})
    data.setdefault("runs", {})
    return data


def ledger_status(ledger: str, settings: Settings) -> Dict[str, List[str]]:
    """``{"done": [...], "missing": [...]}``: the task keys with and without their ledger files."""
    tasks = build_tasks(settings)
    book = load_ledger(ledger).get("tasks", {})
    done = [t.key for t in tasks if task_done(t, ledger) and t.key in book]
    return {"done": done, "missing": [t.key for t in tasks if t.key not in done]}


def repo_rel(path: str) -> str:
    """A path relative to the repository root when it lies inside it (commands read the same on any clone)."""
    ap = os.path.abspath(path)
    return os.path.relpath(ap, ROOT) if ap.startswith(ROOT + os.sep) else ap
