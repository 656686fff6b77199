"""
Checkpoint files and resume: the file names (upstream's ``model/ema/opt{step:06d}.pt`` plus this
project's ``state{step:06d}.pt``, written last so it marks a complete set), listing complete
sets, atomic writes, deciding what a run resumes from (falling back past a damaged newest set),
safe loading (``weights_only=True``) and the checks that refuse a resume into another model.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import dist_util, logger
from .errors import CheckpointWriteError, ProjectError
from .files import atomic_torch_save, atomic_write, atomic_write_text
from .script_util import model_and_diffusion_defaults

__all__ = [
    "ResumeError",
    "CheckpointWriteError",
    "ResumePoint",
    "MODEL_FLAGS_IGNORED_ON_RESUME",
    "checkpoint_names",
    "parse_resume_step_from_filename",
    "get_blob_logdir",
    "find_ema_checkpoint",
    "list_complete_checkpoints",
    "list_stateless_checkpoints",
    "weight_files",
    "find_resume_checkpoint",
    "resolve_resume",
    "unreadable_checkpoint",
    "load_state_file",
    "load_weights",
    "saved_config",
    "check_resume_compatible",
    "same_flag_value",
    "fresh_start_hint",
    "atomic_write",
    "atomic_torch_save",
    "atomic_write_text",
    "checkpoint_file_step",
    "state_config_beside",
    "load_state_dict_file",
    "load_into",
]

# Model flags a resume may change (numerics only, not the model's function).
MODEL_FLAGS_IGNORED_ON_RESUME = frozenset({"use_fp16", "use_checkpoint"})


class ResumeError(ProjectError, ValueError):
    """A checkpoint cannot be resumed with the current flags (names what differs)."""

    exit_status = 2  # bad input: the flags or the named checkpoint


_MODEL_RE = re.compile(r"^model(?P<step>\d+)\.pt$")
_STATE_RE = re.compile(r"^state(?P<step>\d+)\.pt$")
_OPT_RE = re.compile(r"^opt(?P<step>\d+)\.pt$")


def parse_resume_step_from_filename(filename: str) -> int:
    """
    Parse filenames of the form path/to/modelNNNNNN.pt (or stateNNNNNN.pt), where NNNNNN is
    the checkpoint's number of steps (upstream's helper).

    :return: the step, or 0 when the name has no such number (as upstream).
    """
    base = os.path.basename(str(filename))
    for pattern in (_MODEL_RE, _STATE_RE):
        m = pattern.match(base)
        if m:
            return int(m.group("step"))
    split = base.split("model")
    if len(split) < 2:
        return 0
    digits = split[-1].split(".")[0]
    try:
        return int(digits)
    except ValueError:
        return 0


def get_blob_logdir() -> Optional[str]:
    """The folder checkpoints go to: the logger's run folder (as upstream)."""
    return logger.get_dir()


def checkpoint_names(step: int, ema_rates: Sequence[float]) -> Dict[str, Any]:
    """The file names of the checkpoint set of ``step``: model, opt, state and one EMA per rate."""
    return {
        "model": f"model{step:06d}.pt",
        "opt": f"opt{step:06d}.pt",
        "state": f"state{step:06d}.pt",
        "ema": {rate: f"ema_{rate}_{step:06d}.pt" for rate in ema_rates},
    }


def find_ema_checkpoint(main_checkpoint: Optional[str], step: int, rate: float) -> Optional[str]:
    """The EMA file of ``rate`` beside ``main_checkpoint`` at ``step``, or None (upstream's helper)."""
    if not main_checkpoint:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def list_complete_checkpoints(log_dir: Optional[str]) -> List[int]:
    """
    Steps of the complete checkpoint sets in ``log_dir``, oldest first.

    A set is complete when ``state{N}.pt`` (written last) exists together with ``model{N}.pt``
    and ``opt{N}.pt``; half-written temporary files never carry these names.
    """
    if not log_dir or not os.path.isdir(log_dir):
        return []
    names = set(os.listdir(log_dir))
    steps = []
    for name in names:
        m = _STATE_RE.match(name)
        if m:
            step = int(m.group("step"))
            if f"model{step:06d}.pt" in names and f"opt{step:06d}.pt" in names:
                steps.append(step)
    return sorted(steps)


_EMA_RE = re.compile(r"^ema_(?P<rate>.+)_(?P<step>\d+)\.pt$")


def list_stateless_checkpoints(log_dir: Optional[str]) -> Dict[int, List[str]]:
    """
    The checkpoint sets of ``log_dir`` in upstream improved-/guided-diffusion's format: a
    ``model{N}.pt`` and ``opt{N}.pt`` (and EMA files) without this project's ``state{N}.pt``, as
    upstream writes them, or as a run of ours leaves them when its state files were removed. (A
    save of ours interrupted before the optimizer file leaves no ``opt{N}.pt``: not listed.)

    :return: step -> the set's file names (model, optimizer, EMAs), oldest step first.
    """
    if not log_dir or not os.path.isdir(log_dir):
        return {}
    names = set(os.listdir(log_dir))
    found: Dict[int, List[str]] = {}
    for name in sorted(names):
        m = _MODEL_RE.match(name)
        if m:
            step = int(m.group("step"))
            if f"opt{step:06d}.pt" in names and f"state{step:06d}.pt" not in names:
                found[step] = [name, f"opt{step:06d}.pt"]
    for name in sorted(names):
        m = _EMA_RE.match(name)
        if m and int(m.group("step")) in found:
            found[int(m.group("step"))].append(name)
    return dict(sorted(found.items()))


def weight_files(names: Iterable[str]) -> Tuple[List[int], Dict[str, List[int]]]:
    """
    The weight files among the file ``names`` of a run folder (what a sampler can load), read with
    the one set of file-name rules this module owns.

    :return: ``(steps, ema)``: the steps of the ``model{N}.pt`` files, and each EMA rate as written in
             the ``ema_{rate}_{N}.pt`` names -> its steps; all sorted.
    """
    steps: List[int] = []
    ema: Dict[str, List[int]] = {}
    for name in names:
        m = _MODEL_RE.match(name)
        if m:
            steps.append(int(m.group("step")))
        m = _EMA_RE.match(name)
        if m:
            ema.setdefault(m.group("rate"), []).append(int(m.group("step")))
    return sorted(steps), {rate: sorted(v) for rate, v in sorted(ema.items())}


def find_resume_checkpoint(log_dir: Optional[str] = None) -> Optional[str]:
    """
    The model file of the newest complete checkpoint set in ``log_dir`` (default: the logger's
    run folder), or None. Upstream left this as a stub to override.
    """
    log_dir = log_dir or get_blob_logdir()
    steps = list_complete_checkpoints(log_dir)
    if not steps:
        return None
    return os.path.join(log_dir, f"model{steps[-1]:06d}.pt")


@dataclass
class ResumePoint:
    """
    What a run resumes from.

    :param step: completed steps of the checkpoint.
    :param model_path: the model weights.
    :param opt_path: the optimizer state, if present.
    :param state_path: this project's state file (sampler, RNG, data position, ...), if present.
    :param ema_paths: EMA rate -> file, for the rates present.
    :param how: "auto" (newest complete set of the run folder) or the flag that named it.
    """

    step: int
    model_path: str
    opt_path: Optional[str] = None
    state_path: Optional[str] = None
    ema_paths: Dict[float, str] = field(default_factory=dict)
    how: str = "auto"
    _state: Any = field(default=None, repr=False)

    def load_state(self) -> Optional[Dict[str, Any]]:
        """The state file's dict (cached), or None when there is none."""
        if self.state_path is None:
            return None
        if self._state is None:
            self._state = load_state_file(self.state_path)
        return self._state

    def describe(self) -> str:
        folder = os.path.dirname(self.model_path) or "."
        parts = [os.path.basename(self.model_path)]
        if self.opt_path:
            parts.append(os.path.basename(self.opt_path))
        parts += [os.path.basename(p) for p in self.ema_paths.values()]
        if self.state_path:
            parts.append(os.path.basename(self.state_path))
        return f"{folder}/{{{', '.join(parts)}}}"


def _point_at(folder: str, step: int, ema_rates: Sequence[float], how: str,
              model_path: Optional[str] = None) -> ResumePoint:
    names = checkpoint_names(step, ema_rates)

    def existing(name: str) -> Optional[str]:
        path = os.path.join(folder, name)
        return path if os.path.exists(path) else None

    ema_paths = {}
    for rate, name in names["ema"].items():
        path = existing(name)
        if path:
            ema_paths[rate] = path
    return ResumePoint(
        step=step,
        model_path=model_path or os.path.join(folder, names["model"]),
        opt_path=existing(names["opt"]),
        state_path=existing(names["state"]),
        ema_paths=ema_paths,
        how=how,
    )


def resolve_resume(
    log_dir: Optional[str],
    resume: str = "auto",
    resume_checkpoint: str = "",
    ema_rates: Sequence[float] = (0.9999,),
) -> Optional[ResumePoint]:
    """
    Decide what a run resumes from.

    :param log_dir: the run folder ("auto" looks there).
    :param resume: a ResumePoint (returned as it is: the caller decided), "auto" (newest
                   complete set in ``log_dir``, none if there is none), "none",
                   or a path: a ``modelNNNNNN.pt``/``stateNNNNNN.pt`` file or a run folder.
    :param resume_checkpoint: upstream's flag, a ``modelNNNNNN.pt`` path; wins over "auto".
    :param ema_rates: the EMA rates whose files are looked for.
    :return: a ResumePoint, or None for a fresh start.
    :raises FileNotFoundError / ValueError: naming the flag when a named checkpoint is unusable.
    """
    if isinstance(resume, ResumePoint):  # already decided (and checked) by the caller
        return resume
    resume = str(resume if resume is not None else "auto").strip()
    explicit = resume.lower() not in ("auto", "none")
    if resume_checkpoint and explicit and os.path.abspath(resume) != os.path.abspath(resume_checkpoint):
        raise ValueError(f"--resume {resume!r} and --resume_checkpoint {resume_checkpoint!r} name different "
                         "checkpoints; give only one")
    if resume_checkpoint or explicit:
        flag = "--resume_checkpoint" if resume_checkpoint else "--resume"
        path = resume_checkpoint or resume
        if os.path.isdir(path):
            steps = list_complete_checkpoints(path)
            if not steps:
                raise FileNotFoundError(f"{flag} {path}: no complete checkpoint set (stateNNNNNN.pt with "
                                        "modelNNNNNN.pt and optNNNNNN.pt) in this folder")
            return _point_at(path, steps[-1], ema_rates, flag)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: checkpoint file not found: {path}")
        base = os.path.basename(path)
        folder = os.path.dirname(path) or "."
        m = _STATE_RE.match(base)
        if m:
            step = int(m.group("step"))
            point = _point_at(folder, step, ema_rates, flag)
            if not os.path.exists(point.model_path):
                raise FileNotFoundError(f"{flag} {path}: the model file {point.model_path} of this state is missing")
            return point
        step = parse_resume_step_from_filename(path)
        if not _MODEL_RE.match(base):
            logger.warn(f"{flag} {path}: not named modelNNNNNN.pt; resuming its weights at step {step}")
        return _point_at(folder, step, ema_rates, flag, model_path=path)
    if resume.lower() == "none":
        return None
    steps = list_complete_checkpoints(log_dir)
    if not steps:
        return None
    newest_problem = None
    for step in reversed(steps):
        point = _point_at(log_dir, step, ema_rates, "auto")
        problem = unreadable_checkpoint(point)
        if problem is None:
            if newest_problem is not None:
                logger.warn(f"the newest checkpoint set of {log_dir} (step {steps[-1]}) cannot be read: "
                            f"{newest_problem}; resuming from step {step}, the newest complete set that reads "
                            f"({point.describe()})")
            return point
        newest_problem = newest_problem or problem
    raise ResumeError(f"{log_dir}: no complete checkpoint set can be read (newest, step {steps[-1]}: "
                      f"{newest_problem}); start a new run with --resume none --overwrite True or another --log_dir")


def unreadable_checkpoint(point: ResumePoint) -> Optional[str]:
    """
    Why a checkpoint set cannot be resumed from (a truncated or corrupt file), or None when its
    state, model, optimizer and EMA files all read (memory-mapped, so cheap for large models).
    """
    try:
        if point.state_path:
            point.load_state()
        for path in [point.model_path, point.opt_path, *point.ema_paths.values()]:
            if path:
                load_weights(path)
    except Exception as e:  # noqa: BLE001 - any failure to read makes the set unusable
        return f"{type(e).__name__}: {e}"
    return None


def _legacy_numpy_globals() -> List[Any]:
    """
    The numpy names that state files written before they held only tensors need (the numpy RNG
    key array): admitted by ``torch.load(weights_only=True)`` and nothing else.
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return names


def load_state_file(path: str) -> Dict[str, Any]:
    """
    Read a ``stateNNNNNN.pt`` safely: ``torch.load(weights_only=True)`` (tensors, Python
    containers and scalars), plus the few numpy names older state files contain. A file that
    would need anything else (e.g. a crafted pickle that runs code) is refused.

    :raises ResumeError: naming the file and why it was refused or could not be read.
    """
    problem = None
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = dist_util.safe_torch_load(path, what="state file", map_location="cpu")
    except ValueError as e:  # the message names the file and why, without torch's advice to load it unsafely
        problem = str(e)
    except OSError as e:  # unreadable (permissions, I/O): a state file that cannot be used, as before
        problem = f"cannot read the state file {path}: {type(e).__name__}: {e}"
    if problem is not None:  # raised here, with no exception chained to it
        raise ResumeError(problem)
    if not isinstance(state, dict) or "step" not in state:
        raise ResumeError(f"{path} is not a training state file of this project (no 'step' entry)")
    return state



def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors on the CPU, read safely (``weights_only=True``; memory-mapped when
    possible, so a check is cheap)."""
    if "://" in path:
        return dist_util.load_state_dict(path, map_location="cpu", weights_only=True)
    # a failure names the file without torch's advice to load it unsafely (dist_util.safe_torch_load)
    try:
        return dist_util.safe_torch_load(path, map_location="cpu", mmap=True)
    except ValueError:  # e.g. a file in torch's legacy format cannot be memory-mapped: read below
        pass
    return dist_util.safe_torch_load(path, map_location="cpu")


def saved_config(point: ResumePoint) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The resolved config the checkpoint's run saved: from its state file, else config.yaml beside it."""
    state = point.load_state()
    if state is not None and isinstance(state.get("config"), dict):
        return state["config"], point.state_path
    cfg_path = os.path.join(os.path.dirname(point.model_path) or ".", "config.yaml")
    if os.path.isfile(cfg_path):
        try:
            import yaml

            with open(cfg_path) as f:
                cfg = yaml.safe_load(f)
            if isinstance(cfg, dict):
                return cfg, cfg_path
        except Exception:  # noqa: BLE001 - an unreadable side file only skips the flag check
            return None, None
    return None, None


def same_flag_value(a: Any, b: Any) -> bool:
    """
    Whether a flag's saved value and its new value are the same for the resume checks: equal, or
    equal as text up to case and surrounding spaces (a YAML ``True`` and a command-line ``true``,
    ``"0.9999"`` and ``0.9999``).
    """
    if a == b:
        return True
    return str(a).strip().lower() == str(b).strip().lower()


def fresh_start_hint(point: ResumePoint, log_dir: Optional[str] = None) -> str:
    """
    How to start a new run instead of resuming ``point``, for refusals: with ``--resume auto`` a
    new run needs ``--resume none`` or another folder; a checkpoint named by ``--resume PATH`` (or
    ``--resume_checkpoint``) is left out by dropping that flag, in the ``--log_dir`` already given.
    """
    if point.how == "auto":
        return "start a new run (--resume none, or another --log_dir)"
    folder = os.path.abspath(os.path.dirname(point.model_path) or ".")
    if log_dir and os.path.abspath(log_dir) != folder:
        return f"start {log_dir} as a new run without it (drop {point.how})"
    return f"start a new run (another --log_dir, without {point.how})"


def check_resume_compatible(
    point: ResumePoint,
    config: Optional[Dict[str, Any]],
    model: Optional[torch.nn.Module] = None,
    log_dir: Optional[str] = None,
) -> None:
    """
    Refuse a resume that would change the model.

    1. Every key of ``model_and_diffusion_defaults()`` (except ``MODEL_FLAGS_IGNORED_ON_RESUME``)
       must equal the value in the checkpoint's saved configuration.
    2. The checkpoint's tensors must have the model's keys and shapes.

    :param point: the checkpoint.
    :param config: this run's resolved configuration (None skips check 1).
    :param model: the freshly built model (None skips check 2).
    :param log_dir: the run folder resumed into, for the message's way out (``fresh_start_hint``).
    :raises ResumeError: naming the differing flags with both values, or the mismatched
                         keys/shapes.
    """
    if config is not None:
        saved, source = saved_config(point)
        if saved is not None:
            diffs = []
            for key in model_and_diffusion_defaults():
                if key in MODEL_FLAGS_IGNORED_ON_RESUME or key not in saved or key not in config:
                    continue
                if not same_flag_value(saved[key], config[key]):
                    diffs.append(f"--{key}: checkpoint {saved[key]!r}, now {config[key]!r}")
            if diffs:
                raise ResumeError(
                    f"cannot resume from {point.describe()} (step {point.step}): these model/diffusion flags "
                    f"differ from the run that wrote it ({source}): " + "; ".join(diffs)
                    + f". Resume with the checkpoint's values, or {fresh_start_hint(point, log_dir)}."
                )
    if model is not None:
        try:
            ckpt = load_weights(point.model_path)
        except Exception as e:  # noqa: BLE001
            raise ResumeError(f"cannot read the model checkpoint {point.model_path}: {type(e).__name__}: {e}") from e
        _check_state_dict_matches(ckpt, model.state_dict(), point.model_path)


def _check_state_dict_matches(ckpt: Dict[str, Any], expected: Dict[str, torch.Tensor], path: str) -> None:
    if not isinstance(ckpt, dict):
        raise ResumeError(f"{path} does not hold a state_dict (got {type(ckpt).__name__})")
    mismatch = dist_util.state_dict_mismatch(ckpt, expected)
    if mismatch:
        raise ResumeError(f"the checkpoint {path} was made for another model configuration: {mismatch}. "
                          "Use the flags it was trained with (see config.yaml in its run folder).")


def checkpoint_file_step(path: Union[str, Path], *, weights_only: bool = False) -> Optional[int]:
    """
    The step in a checkpoint file's name (``model/opt/state{N}.pt``, ``ema_{rate}_{N}.pt``), or None.

    :param weights_only: only the files that hold weights (``model{N}.pt``, ``ema_{rate}_{N}.pt``):
                         what a sampler or ``fid_curve`` can load (``model_loading.checkpoint_step``).
    """
    base = os.path.basename(str(path))
    patterns = (_MODEL_RE, _EMA_RE) if weights_only else (_MODEL_RE, _STATE_RE, _EMA_RE, _OPT_RE)
    for pattern in patterns:
        m = pattern.match(base)
        if m:
            return int(m.group("step"))
    return None


def state_config_beside(checkpoint: Union[str, Path]) -> Tuple[Dict[str, Any], Optional[str]]:
    """
    The resolved configuration a run saved in its state files, for a checkpoint whose
    ``config.yaml`` is missing: the state file of the checkpoint's own step, else the newest one
    in its folder (read safely, ``load_state_file``; an unreadable one is passed over).

    :return: ``(config, state file)``, or ``({}, None)`` when no state file holds one.
    """
    folder = os.path.dirname(os.path.abspath(str(checkpoint)))
    if not os.path.isdir(folder):
        return {}, None
    steps = sorted((int(m.group("step")) for m in map(_STATE_RE.match, os.listdir(folder)) if m), reverse=True)
    own = checkpoint_file_step(checkpoint)
    if own in steps:
        steps.remove(own)
        steps.insert(0, own)
    for step in steps:
        path = os.path.join(folder, f"state{step:06d}.pt")
        try:
            config = load_state_file(path).get("config")
        except ResumeError:
            continue
        if isinstance(config, dict):
            return dict(config), path
    return {}, None


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a plain state_dict checkpoint on the CPU, with a clear error for a missing/bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # a failure names the file without torch's advice to load it unsafely (dist_util.safe_torch_load)
    sd = dist_util.safe_torch_load(path, map_location="cpu")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path}: expected a plain state_dict (name -> tensor)")
    return sd


def load_into(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path, source: str = "") -> None:
    """``model.load_state_dict(strict=True)`` with an error naming the mismatched keys/shapes."""
    mismatch = dist_util.state_dict_mismatch(state_dict, model.state_dict())
    if mismatch:
        raise ValueError(f"checkpoint {path} does not fit the model built from {source or 'the given flags'}: "
                         f"{mismatch} (give the training flags with --model_flags, or put the run's config.yaml "
                         "beside the checkpoint)")
    model.load_state_dict(state_dict, strict=True)
