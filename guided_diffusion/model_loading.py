"""
The model a checkpoint was trained with, and which checkpoint a script loads.

- A checkpoint's flags (``resolve_model_flags``: defaults in the run's flavour < the run's
  ``config.yaml`` or its state files < ``--model_flags``), building its model and loading its
  weights (``load_diffusion_model`` for the analyses, ``load_checkpoint_model`` for the sample
  scripts, whose command-line model flags win).
- Checkpoint selection, declared once for every script that loads one: ``--model_path FILE``, or
  ``--run_dir DIR`` with ``--step``, ``--ema_rate`` and ``--use_ema``
  (``checkpoint_selection_defaults`` for the defaults-dict scripts, ``add_checkpoint_args`` for the
  argparse ones; ``resolve_checkpoint`` / ``resolve_checkpoint_args`` find the files).

Below it, ``checkpoint`` owns the file names, listing, resume and safe loading.
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch

from . import dist_util
from .checkpoint import checkpoint_file_step, load_into, load_state_dict_file, state_config_beside, weight_files
from .config import DEFAULT_FLAVOR, add_dict_to_argparser, apply_flavor, check_flavor, coerce_config, load_config, \
    str2bool
from .dist_util import state_dict_mismatch
from .options import parse_ema_rates
from .script_util import create_model_and_diffusion, model_and_diffusion_defaults

__all__ = [
    "ANALYSIS_OVERRIDES",
    "parse_model_flags",
    "resolve_model_flags",
    "load_diffusion_model",
    "model_flags_hint",
    "load_checkpoint_model",
    "checkpoint_selection_defaults",
    "CHECKPOINT_SELECTION_HELP",
    "CHECKPOINT_COUNTS",
    "add_checkpoint_args",
    "parse_step_list",
    "resolve_checkpoint",
    "resolve_checkpoint_args",
    "checkpoint_step",
    "run_ema_rates",
    "same_rate",
    "step_list",
]


# ---------------------------------------------------------------------------------------------
# A checkpoint's flags and its model
# ---------------------------------------------------------------------------------------------

# Flags that change nothing for analysis but would get in the way of it.
ANALYSIS_OVERRIDES = {"use_fp16": False, "use_checkpoint": False}


def parse_model_flags(text: str, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """
    Parse a ``--model_flags`` string in upstream flag syntax ("--num_channels 64 --learn_sigma
    True ...") against ``defaults``; return only the flags it sets.

    :raises ValueError: naming an unknown flag or a bad value.
    """
    parser = argparse.ArgumentParser(prog="--model_flags", add_help=False, exit_on_error=False)
    add_dict_to_argparser(parser, defaults)  # typed like the defaults (a bare boolean flag means True) ...
    parser.set_defaults(**{k: None for k in defaults})  # ... but None defaults: see what was set
    typed = argparse.ArgumentParser(prog="--model_flags", add_help=False, exit_on_error=False)
    add_dict_to_argparser(typed, defaults)
    tokens = shlex.split(text)
    try:
        raw, unknown = parser.parse_known_args(tokens)
        if unknown:
            raise ValueError(f"--model_flags: unknown flag(s) {unknown}; valid: {', '.join(sorted(defaults))}")
        given = [k for k, v in vars(raw).items() if v is not None]
        parsed = typed.parse_args(tokens)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"--model_flags {text!r}: {e}") from None
    return {k: getattr(parsed, k) for k in given}


def resolve_model_flags(
    checkpoint: Union[str, Path],
    model_flags: Optional[str] = None,
    defaults: Optional[Dict[str, Any]] = None,
    flavor: Optional[str] = None,
) -> Tuple[Dict[str, Any], str]:
    """
    The model-and-diffusion flags of a checkpoint: ``defaults`` (guided-diffusion's
    ``model_and_diffusion_defaults()``) in the run's flavour, overridden by the ``config.yaml``
    in the checkpoint's folder when there is one (training-only keys ignored; without it, the
    configuration saved in the run's state file, ``state_config_beside``), overridden by
    ``model_flags``.

    The flavour (``--flavor improved`` selects Improved-Diffusion's defaults: timestep rescaling
    etc.) is the one in ``model_flags``, else the run's ``config.yaml``, else ``flavor``, else
    guided. It matters for a bare upstream checkpoint: our runs' config.yaml spells every flag.

    :param checkpoint: the ``.pt`` file.
    :param model_flags: a string of upstream flags (may include ``--flavor``), or None.
    :param flavor: the script's ``--flavor``, or None.
    :return: ``(flags, source)``; ``source`` says where they came from, for messages.
    """
    defaults = dict(defaults or model_and_diffusion_defaults())
    cfg_path = Path(checkpoint).resolve().parent / "config.yaml"
    if cfg_path.is_file():
        cfg = load_config(cfg_path)
    else:  # config.yaml lost: every state file holds the run's resolved configuration too
        cfg, state_path = state_config_beside(checkpoint)
        cfg_path = Path(state_path) if state_path else cfg_path
    given = parse_model_flags(model_flags, dict(defaults, flavor=DEFAULT_FLAVOR)) if model_flags else {}
    chosen = given.pop("flavor", None) or cfg.get("flavor") or flavor or DEFAULT_FLAVOR
    chosen = check_flavor(chosen, "flavor")
    flags = apply_flavor(defaults, chosen)
    sources = ["defaults" if chosen == DEFAULT_FLAVOR else f"{chosen} defaults"]
    if cfg:
        cfg = {k: v for k, v in cfg.items() if k in defaults}
        flags.update(coerce_config(cfg, defaults, str(cfg_path)))
        sources.append(str(cfg_path))
    if model_flags:
        flags.update(given)
        sources.append(f"--model_flags {model_flags!r}")
    return flags, " < ".join(sources)


def load_diffusion_model(
    checkpoint: Union[str, Path],
    model_flags: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    device: Union[str, torch.device] = "cpu",
):
    """
    Build the model and diffusion a checkpoint was trained with and load its weights
    (fp32, eval mode, no gradient checkpointing).

    :param checkpoint: a ``model*.pt`` / ``ema_*.pt`` state_dict.
    :param model_flags: upstream flag string for this checkpoint (see ``resolve_model_flags``).
    :param overrides: flags set last, e.g. ``{"timestep_respacing": "ddim50"}``.
    :return: ``(model, diffusion, flags, source)``.
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    flags, source = resolve_model_flags(checkpoint, model_flags)
    flags.update(ANALYSIS_OVERRIDES)
    flags.update(overrides or {})
    model, diffusion = create_model_and_diffusion(**flags)
    load_into(model, load_state_dict_file(checkpoint), checkpoint, source)
    model.to(device).eval()
    return model, diffusion, flags, source


def checkpoint_step(path: Union[str, os.PathLike]) -> Optional[int]:
    """
    The step in a ``modelNNNNNN.pt`` / ``ema_R_NNNNNN.pt`` name, or None: kept under this name for
    earlier callers; the rule is ``checkpoint.checkpoint_file_step(path, weights_only=True)``'s.
    """
    return checkpoint_file_step(path, weights_only=True)

def run_ema_rates(run_dir: str) -> List[str]:
    """The EMA rates of a run as written in its file names (config order when known)."""
    rates: List[str] = []
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        rate = load_config(cfg_path).get("ema_rate")
        if rate not in (None, ""):
            rates = [str(r) for r in parse_ema_rates(rate)]
    found = sorted(weight_files(os.listdir(run_dir))[1])
    return rates + [r for r in found if r not in rates]

def same_rate(a: str, b: str) -> bool:
    """Whether two EMA rates as written are the same number ("0.9999" and "0.99990" are)."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)

def step_list(steps: Sequence[int], near: Optional[int] = None, show: int = 20) -> str:
    """
    Steps for a message: all of them when few, else the first and last few and the ones either
    side of ``near`` (the step asked for), so that a run with hundreds of checkpoints stays readable.
    """
    steps = sorted(set(int(s) for s in steps))
    if not steps:
        return "none"
    if len(steps) <= show:
        return ", ".join(map(str, steps))
    keep = set(steps[:3] + steps[-3:])
    if near is not None:
        below = [s for s in steps if s < near]
        above = [s for s in steps if s > near]
        keep |= set(below[-2:] + above[:2])
    out, prev = [], None
    for k, s in enumerate(steps):
        if s in keep:
            if prev is not None and k != prev + 1:
                out.append("...")
            out.append(str(s))
            prev = k
    return f"{', '.join(out)} ({len(steps)} steps)"

def resolve_checkpoint(
    model_path: str = "",
    run_dir: str = "",
    step: int = -1,
    ema_rate: str = "",
    use_ema: bool = True,
) -> str:
    """
    The checkpoint file a sample script loads.

    ``--model_path`` (a ``modelNNNNNN.pt`` or ``ema_R_NNNNNN.pt``, as upstream) wins. Otherwise
    ``--run_dir`` with ``--step`` (default: the newest step with a model file) and, with
    ``--use_ema True`` (default), the EMA file of ``--ema_rate`` (default: the run's first rate;
    a rate spelled differently from the file names, e.g. ``0.99990``, finds ``ema_0.9999_*``).

    :raises ValueError / FileNotFoundError: naming the flag and what is missing: for a step
        without a checkpoint, the steps that have one; for a missing EMA rate, the run's rates.
    """
    if model_path:
        if run_dir:
            raise ValueError("give either --model_path or --run_dir, not both")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"--model_path: checkpoint not found: {model_path}")
        return model_path
    if not run_dir:
        raise ValueError("--model_path (a modelNNNNNN.pt / ema_R_NNNNNN.pt file) or --run_dir (a training run "
                         "folder) is required")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run_dir: folder not found: {run_dir}")
    steps, ema_steps = weight_files(os.listdir(run_dir))  # ema: rate as written in the file names -> its steps
    if int(step) < 0:
        if not steps:
            raise FileNotFoundError(f"--run_dir {run_dir}: no modelNNNNNN.pt checkpoint in it")
        step = steps[-1]
    step = int(step)
    if not use_ema:
        path = os.path.join(run_dir, f"model{step:06d}.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--run_dir {run_dir} --step {step}: {os.path.basename(path)} not found; "
                                    f"steps with a model file: {step_list(steps, step)}")
        return path
    run_rates = run_ema_rates(run_dir)
    if ema_rate:
        rates = [str(ema_rate)] + [r for r in run_rates if r != str(ema_rate) and same_rate(r, ema_rate)]
    else:
        rates = run_rates
    for rate in rates:
        path = os.path.join(run_dir, f"ema_{rate}_{step:06d}.pt")
        if os.path.isfile(path):
            return path
    # Nothing to load: say which of step and rate is wrong, listing what the run does have (the
    # rates found in the run, not the one asked for; the existing steps, not a flag that cannot help).
    wanted = f"ema_{ema_rate}_{step:06d}.pt" if ema_rate else f"ema_<rate>_{step:06d}.pt"
    rates_text = ", ".join(run_rates) or "none"
    of_rate = [s for r, v in ema_steps.items() if not ema_rate or same_rate(r, ema_rate) for s in v]
    all_steps = set(steps) | {s for v in ema_steps.values() for s in v}
    if step not in all_steps:
        what = f"an EMA {ema_rate} checkpoint" if ema_rate else "an EMA checkpoint"
        more = f" (the run's EMA rates: {rates_text})" if ema_rate and not of_rate else ""
        if not of_rate and steps:
            more += f"; steps with a model file (--use_ema False): {step_list(steps, step)}"
        raise FileNotFoundError(f"--run_dir {run_dir} --step {step}: the run has no checkpoint of step {step}; "
                                f"steps with {what}: {step_list(of_rate, step)}{more}")
    at_step = [r for r, v in ema_steps.items() if step in v]
    if set(at_step) == set(run_rates):
        at_step = []  # every rate is there: nothing to add
    raw = (f"; or --use_ema False for the raw model model{step:06d}.pt" if step in steps else "")
    if ema_rate:
        raise FileNotFoundError(f"--run_dir {run_dir} --step {step} --ema_rate {ema_rate}: no EMA checkpoint "
                                f"{wanted}; the run's EMA rates: {rates_text}"
                                f"{f' (at step {step}: ' + ', '.join(at_step) + ')' if at_step else ''}. "
                                f"Pass --ema_rate with one of them{raw}")
    raise FileNotFoundError(f"--run_dir {run_dir} --step {step}: no EMA checkpoint {wanted} (the run's EMA rates: "
                            f"{rates_text}; steps with an EMA checkpoint: {step_list(of_rate, step)}){raw}")

def model_flags_hint(defaults: Dict[str, Any]) -> str:
    """
    How a sample script is given a checkpoint's training flags: upstream's model flags directly
    on the command line, or a ``--config`` file, or the run's ``config.yaml`` beside the checkpoint.

    :param defaults: the model's flags (their names pick the example).
    """
    if "classifier_width" in defaults and "num_channels" not in defaults:
        example = "--classifier_width 128 --classifier_depth 2"
    else:
        example = "--num_channels 128 --num_res_blocks 3"
    return (f"pass the flags it was trained with on the command line, as upstream's sample scripts take them "
            f"(e.g. {example}), or in --config FILE.yaml (the run's config.yaml works), or put the run's "
            "config.yaml beside the checkpoint")

def load_checkpoint_model(
    checkpoint: str,
    args: argparse.Namespace,
    given: Set[str],
    defaults: Dict[str, Any],
    factory: Callable[..., Tuple[torch.nn.Module, Any]],
    device: Union[str, torch.device, None] = None,
    flag_map: Optional[Dict[str, str]] = None,
    model_flags: Optional[str] = None,
    flags_hint: Optional[str] = None,
) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """
    Build ``factory(**flags)`` and load ``checkpoint`` into it (strict; errors name keys/shapes).

    Flags: ``defaults`` < the ``config.yaml`` of the checkpoint's run < ``model_flags`` (an
    upstream flag string, for runs without a config.yaml) < the flags in ``given`` (``--config``
    and command line; ``timestep_respacing`` etc.).

    :param factory: e.g. ``create_model_and_diffusion``.
    :param flag_map: script flag -> factory flag, for scripts whose flags are renamed
        (none of upstream's are; kept for callers).
    :param flags_hint: how the caller's user gives the training flags, for the error of a
        checkpoint that does not fit (default: ``model_flags_hint(defaults)``, the sample scripts' way).
    :return: ``(model, diffusion, flags)``; the model in eval mode on ``device``.
    """
    flags, source = resolve_model_flags(checkpoint, model_flags or None, defaults, flavor=getattr(args, "flavor", None))
    flag_map = flag_map or {}
    for k in given:
        key = flag_map.get(k, k)
        if key in defaults:
            flags[key] = getattr(args, k)
    if "use_checkpoint" in flags:
        flags["use_checkpoint"] = False  # gradient checkpointing only costs time when sampling
    model, diffusion = factory(**flags)
    state = load_state_dict_file(checkpoint)
    # analysis.load_into's hint names --model_flags, a flag of the analysis scripts (and fid_curve)
    # that the sample scripts do not have: check here and name what this caller accepts
    mismatch = state_dict_mismatch(state, model.state_dict())
    if mismatch:
        built = source + (" < command line" if given else "")
        raise ValueError(f"checkpoint {checkpoint} does not fit the model built from {built}: {mismatch} "
                         f"({flags_hint or model_flags_hint(defaults)})")
    load_into(model, state, checkpoint, source + (" < command line" if given else ""))
    if flags.get("use_fp16") or flags.get("classifier_use_fp16"):
        model.convert_to_fp16()
    model.to(device if device is not None else dist_util.dev()).eval()
    return model, diffusion, flags

# ---------------------------------------------------------------------------------------------
# Which checkpoint: --model_path FILE, or --run_dir DIR with --step / --ema_rate / --use_ema
# ---------------------------------------------------------------------------------------------


def checkpoint_selection_defaults() -> Dict[str, Any]:
    """
    The checkpoint-selection flags of every script that loads a checkpoint, with their defaults
    (declared here once): ``model_path`` (a file; wins), else ``run_dir`` with ``step`` (-1: the
    newest), ``ema_rate`` ("": the run's first) and ``use_ema`` (False: the raw model file).
    """
    return dict(model_path="", run_dir="", step=-1, ema_rate="", use_ema=True)


CHECKPOINT_SELECTION_HELP = {
    "run_dir": "a training run folder, its checkpoint picked by --step, --ema_rate and --use_ema",
    "step": "with --run_dir: the training step (default: the newest)",
    "ema_rate": "with --run_dir: the EMA rate (default: the run's first)",
    "use_ema": "with --run_dir: True: the EMA file ema_R_NNNNNN.pt, False: the raw modelNNNNNN.pt",
}

CHECKPOINT_COUNTS = ("one", "two", "many")



def add_checkpoint_args(parser: argparse.ArgumentParser, count: str = "one",
                        model_path_aliases: Sequence[str] = (), model_path_help: str = "") -> argparse.ArgumentParser:
    """
    The checkpoint flags of the analysis scripts, spelled as the sample scripts spell them:
    ``--model_path`` (a checkpoint file), or ``--run_dir`` (a training run folder) with ``--step``
    (default: the newest), ``--ema_rate`` (default: the run's first rate) and ``--use_ema``
    (default True; False: the raw ``modelNNNNNN.pt``). A DCGAN run folder (``gan_config.yaml``)
    gives ``generator_NNNNNN.pt``. ``resolve_checkpoint_args`` turns them into files.

    :param count: "one" (``--model_path FILE``, ``--run_dir DIR``, ``--step N``), "two" or
        "many" (``--model_path A B ...``, ``--run_dir D1 [D2 ...]``, ``--step N`` or ``--step A,B,...``).
    :param model_path_aliases: older spellings of ``--model_path`` (``--ckpt``, ``--models``).
    :param model_path_help: what ``--model_path`` takes, for ``--help`` (default: any checkpoint file).
    """
    one = count == "one"
    if count not in CHECKPOINT_COUNTS:
        raise ValueError(f"add_checkpoint_args: count must be one of {CHECKPOINT_COUNTS}, got {count!r}")
    alias = f" ({', '.join(model_path_aliases)}: the same flag)" if model_path_aliases else ""
    files = "modelNNNNNN.pt, ema_R_NNNNNN.pt or a DCGAN generator_NNNNNN.pt"
    default_help = {"one": f"a checkpoint file: {files}", "two": f"checkpoints A and B (alpha = 0 and 1): {files}",
                    "many": f"checkpoint files: {files}"}[count]
    parser.add_argument("--model_path", *model_path_aliases, dest="model_path", nargs=None if one else "+",
                        default=None, metavar="FILE", help=(model_path_help or default_help) + alias)
    parser.add_argument("--run_dir", nargs=None if one else "+", default=None, metavar="DIR",
                        help="instead of --model_path: " + ("a training run folder, its checkpoint" if one else
                                                            "training run folder(s), the checkpoints")
                        + " picked by --step, --ema_rate and --use_ema")
    parser.add_argument("--step", type=str, default="",
                        help=CHECKPOINT_SELECTION_HELP["step"] + (
                            "" if one else "; a comma list (A,B) takes several steps of one run, or one step "
                                           "per --run_dir"))
    defaults = checkpoint_selection_defaults()
    parser.add_argument("--ema_rate", type=str, default=defaults["ema_rate"], help=CHECKPOINT_SELECTION_HELP["ema_rate"])
    parser.add_argument("--use_ema", type=str2bool, nargs="?", const=True, default=defaults["use_ema"],
                        help=CHECKPOINT_SELECTION_HELP["use_ema"])
    return parser


def parse_step_list(text: Union[str, int, None]) -> List[int]:
    """``--step``: "" (the newest), "N" or "A,B,..." -> the steps ([] for the newest)."""
    text = "" if text is None else str(text).strip()
    if not text:
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--step: expected a training step or comma-separated steps, got {text!r}") from None


def resolve_checkpoint_args(args: argparse.Namespace, count: str = "one",
                            resolve: Callable[..., str] = resolve_checkpoint) -> List[str]:
    """
    The checkpoint files of ``add_checkpoint_args``'s flags, each as ``resolve`` finds it
    (``resolve_checkpoint``, or a caller's rule for other kinds of runs, e.g. the DCGAN baseline's).

    ``--model_path`` gives the files themselves. ``--run_dir D`` with ``--step A,B`` gives two steps
    of one run; ``--run_dir D1 D2`` with ``--step N`` (or none: each run's newest) the same step of
    each run; ``--run_dir D1 D2 --step A,B`` step A of D1 and B of D2.

    :param count: as given to ``add_checkpoint_args``; "one" and "two" check the number of files.
    :return: the files, in the order given.
    :raises ValueError / FileNotFoundError: naming the flag (and the steps / rates a run has).
    """
    def as_list(v: Any) -> List[str]:
        return [] if v in (None, "") else ([v] if isinstance(v, str) else [str(x) for x in v])

    paths, run_dirs = as_list(args.model_path), as_list(args.run_dir)
    steps = parse_step_list(getattr(args, "step", ""))
    ema_rate, use_ema = getattr(args, "ema_rate", "") or "", getattr(args, "use_ema", True)
    if paths and run_dirs:
        raise ValueError("give either --model_path or --run_dir, not both")
    if paths:
        out = [resolve(p) for p in paths]
    elif not run_dirs:
        out = [resolve()]  # raises: --model_path or --run_dir is required
    else:
        if count == "one" and len(steps) > 1:
            raise ValueError(f"--step: one step, got {args.step!r}")
        if len(run_dirs) == 1:
            pairs = [(run_dirs[0], s) for s in steps] or [(run_dirs[0], -1)]
        elif len(steps) <= 1:
            pairs = [(d, steps[0] if steps else -1) for d in run_dirs]
        elif len(steps) == len(run_dirs):
            pairs = list(zip(run_dirs, steps))
        else:
            raise ValueError(f"--step {args.step}: {len(steps)} steps for {len(run_dirs)} --run_dir folders; give "
                             "one step for all of them, or one per folder")
        out = [resolve("", d, s, ema_rate, use_ema) for d, s in pairs]
    wanted = {"one": 1, "two": 2}.get(count)
    if wanted is not None and len(out) != wanted:
        how = "--model_path A B, or --run_dir DIR --step A,B" if wanted == 2 else "--model_path FILE, or --run_dir DIR"
        raise ValueError(f"expected {wanted} checkpoint{'s' if wanted > 1 else ''} ({how}), got {len(out)}: "
                         f"{', '.join(out)}")
    return out
