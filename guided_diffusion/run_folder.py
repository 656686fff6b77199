"""
A run folder belongs to one run.

- ``RunLock``: a lock file (``.lock``: pid, host, start time) held while a training writes into
  the folder; a second training into the same folder is refused, a stale lock left by a killed
  process on this host is taken over.
- ``check_resume_flags``: the flags that define a run (its model, schedules, optimizer, batch,
  seed) cannot change on resume unless ``--allow_change FLAG,...`` names them.
- ``record_config``: ``config.yaml`` is the run's current resolved configuration; a resume that
  changed allowed flags first moves the previous one into ``config_history/`` (nothing is
  overwritten), and a resume with the same flags leaves the file byte-identical.

The rule on a rerun (resume) after an allowed change: the run's current value of a run-defining
flag is the one in the run folder's ``config.yaml`` (it records an ``--allow_change`` made since
the checkpoint's state file was written, e.g. a resume that stopped before its next checkpoint),
else the checkpoint's saved configuration. A resume is compared with that current value:

- the same value (also when the checkpoint was written with the value before the change):
  accepted without ``--allow_change``; config.yaml stays byte-identical;
- another value, the run's original one or a default included (``--total_steps`` omitted):
  refused like any change, naming config.yaml's value and the checkpoint's, unless
  ``--allow_change`` names the flag again; then it is logged ("changes from 6 to 4") and the
  previous config.yaml goes to ``config_history/``.

config.yaml is never rewritten silently: every flag whose value it changes (run-defining or
not, on a resume or on a rerun of a run without checkpoints) is logged as ``config.yaml: --flag
changes from OLD to NEW`` (``claim_run_folder``), and the previous file is kept in
``config_history/``.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .checkpoint import (
    MODEL_FLAGS_IGNORED_ON_RESUME,
    check_resume_compatible,
    fresh_start_hint,
    list_complete_checkpoints,
    list_stateless_checkpoints,
    resolve_resume,
    same_flag_value,
    saved_config,
)
from .errors import ProjectError
from .files import atomic_write_text
from .options import run_defining_training_flags
from .script_util import model_and_diffusion_defaults

__all__ = [
    "LOCK_NAME",
    "CONFIG_NAME",
    "HISTORY_DIR",
    "RUN_DEFINING_TRAINING_FLAGS",
    "RunFolderError",
    "RunLock",
    "run_defining_flags",
    "parse_allow_change",
    "check_allow_change",
    "check_resume_flags",
    "ResumeBatch",
    "run_global_batch",
    "resume_batch",
    "read_current_config",
    "config_changes",
    "record_config",
    "prepare_resume",
    "claim_run_folder",
    "describe_checkpoints",
    "stateless_refusal",
]

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"
HISTORY_DIR = "config_history"

# Training flags that define what a run computes; changing one mid-run silently makes another run
# (e.g. --total_steps restarts MDLRC's schedule). Derived from the flag declarations
# (``options.run_defining_training_flags``: every training flag but ``options.RESUME_FREE_FLAGS``,
# the methods' options included), as of import; ``run_defining_flags`` derives it again on each call,
# so that a method registered later counts too, and adds the model/diffusion flags.
RUN_DEFINING_TRAINING_FLAGS: Tuple[str, ...] = run_defining_training_flags()


class RunFolderError(ProjectError, RuntimeError):
    """A run folder cannot be used as asked (in use, would be overwritten, a flag would change)."""

    exit_status = 1  # as the training scripts have always reported it (their ``failures``)


def run_defining_flags(config: Dict[str, Any]) -> List[str]:
    """
    The keys of ``config`` that define the run: model/diffusion flags and the run-defining training
    flags (``options.run_defining_training_flags``), which include every option of a registered
    timestep sampler or loss weighting (``options.method_options``).
    """
    model = [k for k in model_and_diffusion_defaults() if k not in MODEL_FLAGS_IGNORED_ON_RESUME]
    return [k for k in model + list(run_defining_training_flags()) if k in config]


def parse_allow_change(text: Any) -> List[str]:
    """``--allow_change "total_steps,lr"`` -> ``["total_steps", "lr"]``."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(t).strip() for t in text if str(t).strip()]
    return [t.strip().lstrip("-") for t in str(text).split(",") if t.strip()]


def check_allow_change(allow_change: Iterable[str], config: Dict[str, Any]) -> None:
    """
    Refuse ``--allow_change`` names that are not run-defining flags (a typo would otherwise allow
    nothing, silently, also on a new run where there is nothing to compare yet).

    :raises RunFolderError: naming the unknown names and the run-defining flags.
    """
    allowed = set(allow_change)
    unknown = sorted(allowed - set(run_defining_flags(config)))
    if unknown:
        raise RunFolderError(f"--allow_change {','.join(sorted(allowed))}: {', '.join(unknown)} "
                             f"{'is' if len(unknown) == 1 else 'are'} not run-defining flags (those are: "
                             f"{', '.join(run_defining_flags(config))}); other flags may change freely")


def check_resume_flags(saved: Optional[Dict[str, Any]], config: Dict[str, Any], allow_change: Iterable[str] = (),
                       source: str = CONFIG_NAME, new_run_hint: str = "start a new run (another --log_dir)",
                       current: Optional[Dict[str, Any]] = None, current_source: str = CONFIG_NAME
                       ) -> Dict[str, Tuple[Any, Any]]:
    """
    Compare this invocation's resolved flags with the run's current ones (the module's rule: a
    flag's value in ``current``, the run folder's config.yaml, else in ``saved``).

    :param saved: the run's resolved configuration (its state file's or config.yaml), or None.
    :param config: this invocation's resolved configuration.
    :param allow_change: flag names that may differ (``--allow_change``).
    :param source: where ``saved`` came from, for the message.
    :param new_run_hint: how to start a new run instead (``checkpoint.fresh_start_hint``).
    :param current: the run folder's config.yaml (``read_current_config``), or None: it holds
        allowed changes made after ``saved`` was written.
    :param current_source: where ``current`` came from, for the message.
    :return: the allowed changes, flag -> (run's current value, new value).
    :raises RunFolderError: naming every run-defining flag that differs and how to allow it.
    """
    if not saved and not current:
        return {}
    saved, current = saved or {}, current or {}
    allowed = set(allow_change)
    check_allow_change(allowed, config)
    changed, refused = {}, []
    for key in run_defining_flags(config):
        if key in current:
            run_value = current[key]
        elif key in saved:
            run_value = saved[key]
        else:
            continue
        if same_flag_value(run_value, config[key]):
            continue
        if key in allowed:
            changed[key] = (run_value, config[key])
        elif key in current and key in saved and not same_flag_value(saved[key], current[key]):
            refused.append(f"--{key}: run {run_value!r}, now {config[key]!r} (the run's current value, "
                           f"in {current_source}, set by an earlier --allow_change; the checkpoint was "
                           f"written with {saved[key]!r}; earlier configurations are in {HISTORY_DIR}/)")
        else:
            refused.append(f"--{key}: run {run_value!r}, now {config[key]!r}")
    if refused:
        names = ",".join(r.split(":")[0][2:] for r in refused)
        raise RunFolderError(
            f"resuming would change flags that define this run ({source}): " + "; ".join(refused)
            + f". Resume with the run's values, {new_run_hint}, or, to change them "
            f"mid-run on purpose, add --allow_change {names} (the change is logged and the previous "
            f"configuration kept in {HISTORY_DIR}/)."
        )
    return changed


class ResumeBatch(NamedTuple):
    """What ``resume_batch`` decided: the per-process and global batch of the resumed run, the
    note to print ("" when there is nothing to say) and the allowed change (flag -> (old, new))."""

    per_rank: int
    global_batch: int
    note: str
    change: Dict[str, Tuple[Any, Any]]


def run_global_batch(state: Optional[Dict[str, Any]]) -> Optional[Tuple[int, int]]:
    """``(global batch, world size)`` a checkpoint's state file records (the global batch from its
    config's ``batch_size`` x world size for state files without one); None when it records no world
    size (no state file: upstream's format)."""
    if not isinstance(state, dict) or state.get("world_size") is None:
        return None
    world = int(state["world_size"])
    batch = state.get("global_batch")
    if batch is None:
        per_rank = (state.get("config") or {}).get("batch_size")
        if per_rank is None:
            return None
        batch = int(per_rank) * world
    return int(batch), world


def _some(values: Sequence[int], show: int = 10) -> str:
    return ", ".join(map(str, values[:show])) + (", ..." if len(values) > show else "")


def resume_batch(state: Optional[Dict[str, Any]], config: Dict[str, Any], world_size: int,
                 allow_change: Iterable[str] = ()) -> Optional[ResumeBatch]:
    """
    The batch of a resume, compared through the run's *global* batch (what defines the run; the
    per-process ``--batch_size`` follows from it and the number of processes). The rule, with G
    and W the checkpoint's global batch and world size, N this invocation's processes, and "asked"
    the flags' global batch (``--global_batch_size``, else ``--batch_size`` x N):

    - asked == G: resumed as it is (a changed N is noted with the per-process batch);
    - ``--allow_change global_batch_size`` (or ``batch_size``): the asked global batch is used, noted;
    - N != W and no ``--global_batch_size``: G is kept when it divides by N, with G / N per process
      (noted: old/new world size, per-process batch); otherwise refused, naming G, W, N, the
      numbers of processes that divide G and the flags that would change it;
    - anything else (another batch with the same N, or a ``--global_batch_size`` other than G):
      refused, naming the numbers and ``--allow_change global_batch_size``.

    :param state: the checkpoint's state file (None or one without a world size: no decision).
    :param config: this invocation's resolved flags (``batch_size`` per process, ``global_batch_size``).
    :param world_size: this invocation's number of processes.
    :param allow_change: ``--allow_change``'s names.
    :return: the decision, or None when the checkpoint records no global batch.
    :raises RunFolderError: naming ``--batch_size``/``--global_batch_size``, the world sizes and what would divide.
    """
    run = run_global_batch(state)
    if run is None or config.get("batch_size") is None:
        return None
    g, w = run
    n, per_rank = int(world_size), int(config["batch_size"])
    explicit = int(config.get("global_batch_size") or 0)
    asked = explicit or per_rank * n
    if asked == g:
        note = "" if n == w else (f"resuming with {n} process(es) (the checkpoint was written by {w}): the run's "
                                  f"global batch {g} is kept, {per_rank} per process (was {g // w})")
        return ResumeBatch(per_rank, g, note, {})
    named = [k for k in ("global_batch_size", "batch_size") if k in set(allow_change)]
    if named:
        change = {named[0]: (g, asked) if named[0] == "global_batch_size" else (g // w, per_rank)}
        return ResumeBatch(per_rank, asked, f"--allow_change {named[0]}: the global batch changes from {g} "
                           f"({w} process(es) x {g // w}) to {asked} ({n} process(es) x {per_rank})", change)
    if n != w and not explicit and g % n == 0:
        return ResumeBatch(g // n, g, (
            f"resuming with {n} process(es) (the checkpoint was written by {w}): the run's global batch {g} is "
            f"kept, {g // n} per process (was {g // w}; --batch_size {per_rank} per process would have made it "
            f"{asked}: add --allow_change global_batch_size for that)"), {})
    fits = [d for d in range(1, g + 1) if g % d == 0]
    lower = g // n * n
    near = " or ".join(str(b) for b in (lower, lower + n) if b > 0)
    asks = f"--global_batch_size {explicit}" if explicit else f"--batch_size {per_rank} x {n} process(es)"
    if g % n:
        keep = (f"{g} does not divide over {n} processes: resume with a number of processes that divides it "
                f"({_some(fits)}), or add --allow_change global_batch_size to go on with another global batch "
                f"(--global_batch_size, a multiple of {n}: e.g. {near}; or --batch_size per process)")
    else:
        keep = (f"to keep it, resume with --global_batch_size {g} (or --batch_size {g // n}); to change it mid-run "
                "on purpose, add --allow_change global_batch_size")
    raise RunFolderError(
        f"resuming would change the run's global batch: the checkpoint was written by {w} process(es) with a "
        f"global batch of {g} ({g // w} per process), and {asks} asks for {asked} with {n} process(es) now. "
        f"{keep}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """
    An exclusive lock on a run folder: the file ``<folder>/.lock`` holds the owner's pid, host and
    start time. ``acquire`` refuses a folder locked by a live process (or by another host, which
    cannot be checked) and takes over a lock whose process on this host is gone (a killed run).
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False
        self.took_over: Optional[Dict[str, Any]] = None

    def owner(self) -> Optional[Dict[str, Any]]:
        """The current lock's content, or None when unlocked (an unreadable lock counts as stale)."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": socket.gethostname(), "unreadable": True}

    def _is_stale(self, owner: Dict[str, Any]) -> bool:
        if owner.get("unreadable"):
            return True
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell: assume alive
        pid = int(owner.get("pid", -1))
        # our own pid: left by an earlier training in this process that did not get to release it
        return pid == os.getpid() or not _pid_alive(pid)

    def acquire(self) -> "RunLock":
        """
        Take the lock.

        :raises RunFolderError: when a live process (or another host) holds it.
        """
        os.makedirs(self.folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile
                if not self._is_stale(owner):
                    where = "this host" if owner.get("host") == socket.gethostname() else f"host {owner.get('host')}"
                    raise RunFolderError(
                        f"run folder {self.folder} is in use by pid {owner.get('pid')} on {where} (since "
                        f"{owner.get('since')}): two trainings in one folder would mix their checkpoints and "
                        f"logs. Wait for it, stop it, or use another --log_dir (if that process is gone, "
                        f"delete {self.path})")
                self.took_over = owner
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunFolderError(f"could not lock {self.folder}: {self.path} keeps reappearing")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid():
            try:
                os.unlink(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_current_config(folder: str) -> Optional[Dict[str, Any]]:
    """The run folder's config.yaml as a dict (the run's current configuration), or None when absent or unreadable."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except Exception:  # noqa: BLE001 - an unreadable config.yaml only skips this comparison (it is kept in history)
        return None
    return data if isinstance(data, dict) else None


def config_changes(old_text: str, new_text: str) -> Dict[str, Tuple[Any, Any]]:
    """
    The flags whose values differ between two config.yaml texts, flag -> (old, new); a flag only
    one of them has is reported with ``None`` on the other side. Unreadable YAML reports nothing.
    """
    try:
        import yaml

        old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    except Exception:  # noqa: BLE001
        return {}
    if not isinstance(old, dict) or not isinstance(new, dict):
        return {}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new), key=str)
            if not (k in old and k in new and same_flag_value(old[k], new[k]))}


def record_config(folder: str, text: str, step: int, changes: Dict[str, Tuple[Any, Any]]) -> Optional[str]:
    """
    Make ``<folder>/config.yaml`` hold ``text`` without losing the previous configuration.

    - no config.yaml yet: write it;
    - the same text: leave the file as it is (byte-identical);
    - different text: move the old file to ``config_history/config-step<step>-<n>.yaml`` first.

    :param changes: the allowed run-defining changes (logged into the new file's header).
    :return: the history file written, or None.
    """
    path = os.path.join(folder, CONFIG_NAME)
    if changes:
        note = "".join(f"# --allow_change at step {step}: {k} {old!r} -> {new!r}\n" for k, (old, new) in changes.items())
        text = note + text
    if not os.path.isfile(path):
        atomic_write_text(path, text)
        return None
    with open(path, encoding="utf-8") as f:
        old = f.read()
    if _strip_header(old) == _strip_header(text) and not changes:
        return None
    history = os.path.join(folder, HISTORY_DIR)
    os.makedirs(history, exist_ok=True)
    n = len([x for x in os.listdir(history) if x.endswith(".yaml")])
    kept = os.path.join(history, f"config-{n:03d}-before-step{step:06d}.yaml")
    atomic_write_text(kept, old)
    atomic_write_text(path, text)
    return kept


def _strip_header(text: str) -> str:
    # the header names the command line that wrote the file; the flags are what matter
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def describe_checkpoints(folder: str, steps: Sequence[int]) -> str:
    """'the last complete checkpoint is step N (<folder>/state...)' or 'no complete checkpoint yet'."""
    if not steps:
        return f"no complete checkpoint in {folder} yet"
    return f"the last complete checkpoint is step {steps[-1]} ({os.path.join(folder, f'state{steps[-1]:06d}.pt')})"


def prepare_resume(
    log_dir: str,
    config: Dict[str, Any],
    model: Any = None,
    *,
    resume: str = "auto",
    resume_checkpoint: str = "",
    ema_rates: Sequence[float] = (0.9999,),
    allow_change: Any = "",
    overwrite: bool = False,
    world_size: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
):
    """
    Decide what a training resumes from and refuse what would mix up the run folder, before
    anything is written: ``--resume none`` into a folder that holds another run's checkpoints
    (unless ``overwrite``), a model that does not match the checkpoint, run-defining flags that
    differ from the run's (unless ``--allow_change`` names them).

    With ``world_size`` (this invocation's number of processes) the batch is compared through the
    run's global batch (``resume_batch``): ``config["batch_size"]`` becomes the per-process batch
    the resume uses (the run's global batch kept over another number of processes), and the
    decision's note goes to ``log`` (default ``print``).

    :return: ``(point, changes, replace)``: the ResumePoint (or None), the allowed changes
             (flag -> (old, new)), and whether the folder's old checkpoints are to be moved aside
             (``claim_run_folder`` does it, under the lock).
    :raises RunFolderError / ResumeError: naming the folder, the flags and what to do.
    """
    check_allow_change(parse_allow_change(allow_change), config)
    point = resolve_resume(log_dir, resume, resume_checkpoint, ema_rates)
    replace = False
    if point is None and str(resume).strip().lower() == "none":
        existing = list_complete_checkpoints(log_dir)
        if existing and not overwrite:
            raise RunFolderError(
                f"--resume none: {log_dir} already holds a run (complete checkpoints up to step {existing[-1]}); "
                "a new run there would later resume from the old run's checkpoints. Use another --log_dir, "
                "resume it (--resume auto), or pass --overwrite True to move the old run's files into "
                f"{log_dir}/replaced-<time>/ and start over")
        replace = bool(existing)
    if point is None:
        stateless = list_stateless_checkpoints(log_dir)
        if stateless and not overwrite:
            raise RunFolderError(stateless_refusal(log_dir, stateless, resume))
        replace = replace or bool(stateless)
    changes: Dict[str, Tuple[Any, Any]] = {}
    if point is not None:
        check_resume_compatible(point, config, model, log_dir=log_dir)
        saved, source = saved_config(point)
        current_path = os.path.join(log_dir, CONFIG_NAME)
        current = read_current_config(log_dir)
        batch = None if world_size is None else resume_batch(point.load_state(), config, world_size,
                                                             parse_allow_change(allow_change))
        if batch is not None:  # the batch flags are compared through the global batch, decided above
            config["batch_size"] = batch.per_rank
            same = {k: config.get(k) for k in ("batch_size", "global_batch_size")}
            saved, current = ({**d, **same} if d else d for d in (saved, current))
            if batch.note:
                (log or print)(batch.note)
        changes = check_resume_flags(saved, config, parse_allow_change(allow_change), source or CONFIG_NAME,
                                     fresh_start_hint(point, log_dir), current=current,
                                     current_source=current_path)
        changes.update(batch.change if batch is not None else {})
    return point, changes, replace


def stateless_refusal(log_dir: str, stateless: Dict[int, List[str]], resume: Any = "auto") -> str:
    """
    The refusal of a fresh start in a folder that holds checkpoint sets without state files
    (upstream's format): names the files, and how to continue from them or start elsewhere.
    """
    files = [name for names in stateless.values() for name in names]
    shown = ", ".join(files[:8]) + (f" ... (+{len(files) - 8} more)" if len(files) > 8 else "")
    newest = os.path.join(log_dir, f"model{max(stateless):06d}.pt")
    return (f"--resume {resume}: {log_dir} holds checkpoint files without a state file ({shown}: upstream "
            "improved-/guided-diffusion's format, or a run whose state*.pt were removed), so it has no complete set "
            "to resume, and a new run there would start at step 0 and overwrite them. To continue from them: "
            f"--resume {newest} (weights, optimizer and EMA; the sampler, data position and RNG streams start "
            "fresh). To start a new run: another --log_dir, or --overwrite True to move them into "
            f"{log_dir}/replaced-<time>/ first")


def _move_run_aside(folder: str) -> str:
    """Move every file of ``folder`` except the lock into ``folder/replaced-<time>/``."""
    target = os.path.join(folder, "replaced-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(target)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == LOCK_NAME or name.startswith("replaced-") or not os.path.isfile(path):
            continue
        os.replace(path, os.path.join(target, name))
    return target


def claim_run_folder(folder: str, config_text: str, step: int, changes: Dict[str, Tuple[Any, Any]],
                     replace: bool = False, log: Any = print) -> RunLock:
    """
    Lock ``folder`` for this training and record its configuration (``record_config``); with
    ``replace``, first move the old run's files aside. Call on the writing rank only.

    :return: the held lock (release it when the training ends).
    :raises RunFolderError: the folder is in use, or cannot be written (named with the reason).
    """
    lock = RunLock(folder)
    try:
        lock.acquire()
        if lock.took_over:
            log(f"warning: {folder}: took over the lock of pid {lock.took_over.get('pid')} "
                f"(since {lock.took_over.get('since')}), which is no longer running")
        if replace:
            log(f"--overwrite: moved the previous run's files to {_move_run_aside(folder)}")
        for key, (old, new) in changes.items():
            log(f"--allow_change: {key} changes from {old!r} to {new!r} at step {step}")
        path = os.path.join(folder, CONFIG_NAME)
        if not replace and os.path.isfile(path):  # every other change config.yaml gets is named too
            with open(path, encoding="utf-8") as f:
                others = {k: v for k, v in config_changes(f.read(), config_text).items() if k not in changes}
            for key, (old, new) in others.items():
                log(f"{path}: --{key} changes from {old!r} to {new!r} (at step {step})")
        kept = record_config(folder, config_text, step, changes)
        if kept:
            log(f"the previous configuration is kept in {kept}")
    except OSError as e:
        lock.release()
        raise RunFolderError(f"cannot write into the run folder {folder}: {e.strerror or e} "
                             f"({getattr(e, 'filename', None) or folder}); choose a writable --log_dir") from e
    except BaseException:
        lock.release()
        raise
    return lock
