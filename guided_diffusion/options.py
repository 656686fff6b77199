"""
The training flags: their defaults (``training_defaults``, upstream's image_train flags plus this
project's) and their checks (``validate_training_args`` and the small resolvers every training
entry point shares). One owner for "what does this flag mean and what values are valid";
``TrainLoop``, the scripts and the configs take their defaults from here.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import fdm as _fdm
from .checks import check_integer, check_number, whole_number
from .folded import check_foldable
from .method_registry import method_option_defaults
from .optim import MomentumDecay
from .resample import create_named_schedule_sampler
from .script_util import model_and_diffusion_defaults
from .weighting import create_loss_weighting

__all__ = [
    "training_defaults",
    "method_options",
    "RESUME_FREE_FLAGS",
    "run_defining_training_flags",
    "validate_training_args",
    "resolve_fast_path",
    "resolve_batch_size",
    "parse_ema_rates",
    "parse_save_steps",
    "PRECISIONS",
    "COMPILE_MODES",
    "LOOP_GROUPS",
    "UPSTREAM_LOOP_ARGS",
    "LOOP_OBJECTS",
    "LOOP_FLAG_NAMES",
    "train_loop_defaults",
    "momentum_decay_from_flags",
    "LoopSettings",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def method_options() -> Dict[str, Any]:
    """
    The training flags of the registered timestep samplers and loss weightings, flag name ->
    default: ``method_registry.method_option_defaults()`` (taken from their classes, so a new
    sampler's flags need no entry here) without the model flags a weighting reads
    (``predict_xstart`` stays a model flag).
    """
    model = model_and_diffusion_defaults()
    return {k: v for k, v in method_option_defaults().items() if k not in model}


# The training flags but the methods' options, in --help / config.yaml order (the methods'
# options go between the two parts).
_FLAGS_BEFORE_METHODS: Dict[str, Any] = dict(
    flavor="guided",  # improved | guided: which upstream codebase's defaults (recorded in config.yaml)
    # upstream image_train.py
    data_dir="",
    schedule_sampler="uniform",
    lr=1e-4,
    weight_decay=0.0,
    lr_anneal_steps=0,
    batch_size=1,  # per process, as upstream: the global batch is batch_size x processes
    global_batch_size=0,  # > 0: the batch over all processes (per process = this / world size)
    random_flip=True,  # left-right flips of training images (guided-diffusion; improved-diffusion: False)
    save_steps="",  # comma-separated extra steps at which a checkpoint set is saved (e.g. epoch ends)
    microbatch=-1,  # -1 disables microbatches
    ema_rate="0.9999",  # comma-separated list of EMA rates
    log_interval=10,
    save_interval=10000,
    resume_checkpoint="",
    use_fp16=False,
    fp16_scale_growth=1e-3,
)
_FLAGS_AFTER_METHODS: Dict[str, Any] = dict(
    # loss weighting: none | min_snr | p2 | speed | edm | flow
    loss_weighting="none",
    # True: draw t in proportion to p(t) w(t) (--schedule_sampler's p, --loss_weighting's w) with weights of 1:
    # the same objective up to a constant (folded.py, which measures when it helps; fixed samplers only)
    fold_weighting=False,
    # FDM's loss-weight warm-up (with --fdm True; the FDM model flags are script_util.fdm_defaults()):
    # VP's 1/sigma^2 clamped at 5 -> 500 over this many steps (0: off)
    fdm_warmup_steps=_fdm.DEFAULT_WARMUP_STEPS,
    # optimizer and MDLRC
    beta1=0.9,
    beta2=0.999,
    momentum_decay=False,
    beta1_min=0.5,
    total_steps=0,  # 0: no end (as upstream) unless lr_anneal_steps
    lr_compensation=True,
    decay_beta1=True,  # False: lr-only control (MDLRC's lr schedule, beta1 held at --beta1)
    allow_change="",  # run-defining flags that may change on resume (comma-separated)
    overwrite=False,  # --resume none into a folder with checkpoints: move them aside and start over
    stop_at=0,  # end this process at this step after a checkpoint (job time limits)
    # speed / numerics
    precision="auto",  # auto | fp32 | bf16 | fp16
    compile="auto",  # auto | True | False
    channels_last="auto",  # auto | True | False
    fused_optimizer="auto",  # auto | True | False (fused AdamW; auto: on CUDA)
    compile_mode="default",  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    grad_clip=0.0,  # max global gradient norm; 0 = off
    sample_interval=0,  # steps between EMA sample grids; 0 = off
    # run bookkeeping
    log_dir="",
    seed=0,
    resume="auto",  # auto | none | PATH
    max_nonfinite=20,  # stop after this many non-finite steps in a row; 0 = never
    skip_corrupt=True,  # corrupt/unreadable images in --data_dir: skip and count (False: error)
    deterministic=False,  # torch deterministic algorithms (cuDNN benchmark off)
)
_LOOP_FLAG_DEFAULTS: Dict[str, Any] = {**_FLAGS_BEFORE_METHODS, **_FLAGS_AFTER_METHODS}


def training_defaults() -> Dict[str, Any]:
    """
    Defaults of the training flags of ``scripts/image_train.py`` (upstream's plus this
    project's); merge with ``script_util.model_and_diffusion_defaults()``.

    ``precision``/``compile``/``channels_last`` "auto" mean: bf16 autocast, torch.compile and
    channels_last on CUDA; exact float32 without them on CPU.
    """
    # each sampler's and weighting's options (clts_*, speed_*, min_snr_gamma, p2_*, ...) are
    # declared once, by its class's constructor (resample.py, weighting.py): see method_options()
    return {**_FLAGS_BEFORE_METHODS, **method_options(), **_FLAGS_AFTER_METHODS}


#: The training flags that may change on resume without ``--allow_change``, each with why: they
#: say where things are, how this process runs or what it reports, not what the run computes.
#: Every other training flag (``run_defining_training_flags``) is run-defining, so a new flag, a
#: new sampler's or weighting's option included, is refused on change unless it is declared here.
RESUME_FREE_FLAGS: Dict[str, str] = dict(
    data_dir="where the images are (a moved dataset is the same dataset)",
    log_dir="where the run is",
    resume="which checkpoint to continue from",
    resume_checkpoint="which checkpoint to continue from (upstream's flag)",
    allow_change="what may change on this resume",
    overwrite="what to do with a folder's old checkpoints",
    stop_at="where this process ends (job time limits); --total_steps is the run's length",
    save_steps="when checkpoints are written",
    save_interval="when checkpoints are written",
    log_interval="when rows are logged",
    sample_interval="when EMA sample grids are drawn",
    microbatch="how a batch is split (the same gradient)",
    use_fp16="numerics of the fast path (upstream's flag), not the run",
    fp16_scale_growth="numerics of the fast path (upstream's flag), not the run",
    precision="numerics of the fast path, not the run",
    compile="the fast path (torch.compile)",
    compile_mode="the fast path (torch.compile)",
    channels_last="the fast path (memory layout)",
    fused_optimizer="the fast path (fused AdamW)",
    deterministic="torch's deterministic algorithms (speed, not the run)",
    max_nonfinite="when the non-finite guard stops this process",
    skip_corrupt="what to do with unreadable images",
)


def run_defining_training_flags() -> Tuple[str, ...]:
    """
    The training flags that define a run (``run_folder`` refuses a change on resume unless
    ``--allow_change`` names it): every flag of ``training_defaults()``, the registered samplers'
    and weightings' options (``method_options()``) included, but ``RESUME_FREE_FLAGS``.
    Derived, not typed: a flag declared here or by a method's class is run-defining by default.
    """
    return tuple(k for k in training_defaults() if k not in RESUME_FREE_FLAGS)


# ---------------------------------------------------------------------------------------------
# Flag validation (every message names the flag)
# ---------------------------------------------------------------------------------------------


def _auto_bool(value: Any, flag: str, auto: bool) -> bool:
    """Resolve a flag that takes True/False/"auto"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return auto
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"--{flag} must be auto, True or False, got {value!r}")


def _resolve_precision(precision: str, use_fp16: bool, device: torch.device) -> str:
    """Map --precision (and upstream's --use_fp16) to one of fp32 | bf16 | fp16."""
    p = str(precision).strip().lower()
    if p not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if use_fp16:
        if p not in ("auto", "fp16"):
            raise ValueError(f"--use_fp16 True asks for fp16 but --precision is {precision!r}; "
                             "drop one of them (--use_fp16 True is the same as --precision fp16)")
        return "fp16"
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def resolve_fast_path(
    device: Union[str, torch.device],
    precision: str = "auto",
    use_fp16: bool = False,
    compile: Union[bool, str] = "auto",
    channels_last: Union[bool, str] = "auto",
    fused_optimizer: Union[bool, str] = "auto",
) -> Dict[str, Any]:
    """
    Resolve the speed flags for ``device`` as TrainLoop does: "auto" turns every lever on on
    CUDA (bf16 autocast, torch.compile, channels_last, fused AdamW) and off elsewhere (exact
    float32 on the CPU).

    :param device: the device the model trains on.
    :param precision: --precision (auto | fp32 | bf16 | fp16).
    :param use_fp16: upstream's --use_fp16 (the same as --precision fp16).
    :param compile: --compile (auto | True | False).
    :param channels_last: --channels_last (auto | True | False).
    :param fused_optimizer: fused AdamW kernel (auto | True | False); auto: when on CUDA.
    :return: dict with precision ("fp32" | "bf16" | "fp16"), compile, channels_last and
             fused_optimizer (bools).
    :raises ValueError: naming the flag whose value is not understood.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    return dict(
        precision=_resolve_precision(precision, bool(use_fp16), device),
        compile=_auto_bool(compile, "compile", on_cuda),
        channels_last=_auto_bool(channels_last, "channels_last", on_cuda),
        fused_optimizer=_auto_bool(fused_optimizer, "fused_optimizer", on_cuda),
    )


def parse_ema_rates(ema_rate: Union[str, float, Sequence[float]]) -> List[float]:
    """
    Parse ``--ema_rate`` ("0.9999" or "0.9999,0.999", or numbers) into a list of floats.

    :raises ValueError: naming --ema_rate when a rate is not a number in (0, 1).
    """
    if isinstance(ema_rate, (int, float)) and not isinstance(ema_rate, bool):
        items: List[Any] = [ema_rate]
    elif isinstance(ema_rate, str):
        items = [x for x in ema_rate.split(",") if x.strip()]
    else:
        items = list(ema_rate)
    rates = []
    for x in items:
        try:
            r = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"--ema_rate must be comma-separated numbers in (0, 1), got {ema_rate!r}") from None
        if not 0.0 < r < 1.0:
            raise ValueError(f"--ema_rate: every rate must be in (0, 1), got {r!r} in {ema_rate!r}")
        rates.append(r)
    if not rates:
        raise ValueError(f"--ema_rate needs at least one rate, got {ema_rate!r}")
    return rates


def _int_flag(args: Dict[str, Any], flag: str, lo: int) -> None:
    if args.get(flag) is not None:
        check_integer(args[flag], flag, lo=lo)


def _num_flag(args: Dict[str, Any], flag: str, lo: float, hi: float = math.inf,
              lo_open: bool = False, hi_open: bool = False) -> None:
    v = args.get(flag)
    if v is None:
        return
    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    # no upper bound: inf is refused too (never a usable value), so the range is not "(0, inf]"
    what = (f"a finite number {'>' if lo_open else '>='} {lo:g}" if math.isinf(hi)
            else f"a number in {lb}{lo:g}, {hi:g}{rb}")
    check_number(v, flag, lo=lo, hi=None if math.isinf(hi) else hi, lo_open=lo_open, hi_open=hi_open, what=what)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_batch_size(batch_size: int, global_batch_size: int, world_size: int,
                       batch_size_given: bool = False) -> int:
    """
    The per-process batch: ``--global_batch_size`` / processes when it is set, else ``--batch_size``
    (upstream's per-process semantics).

    :param batch_size: --batch_size (per process).
    :param global_batch_size: --global_batch_size (0: off).
    :param world_size: number of processes.
    :param batch_size_given: --batch_size was given on the command line; with --global_batch_size
                             it must then agree (batch_size x processes == global_batch_size).
    :raises ValueError: naming both flags when they conflict or the global batch does not divide.
    """
    if not global_batch_size:
        return int(batch_size)
    g, n = int(global_batch_size), int(world_size)
    if g < 1:
        raise ValueError(f"--global_batch_size must be an integer >= 0 (0: use --batch_size), got {global_batch_size!r}")
    if g % n:
        raise ValueError(f"--global_batch_size {g} does not divide over {n} processes; use a multiple of {n} "
                         "(or --global_batch_size 0 with a per-process --batch_size)")
    per_rank = g // n
    if batch_size_given and int(batch_size) != per_rank:
        raise ValueError(f"--batch_size {batch_size} (per process) and --global_batch_size {g} ({n} processes -> "
                         f"{per_rank} per process) disagree; give one of them (--global_batch_size 0 switches "
                         "the global batch off)")
    return per_rank


def parse_save_steps(save_steps: Union[str, Sequence[int], None]) -> List[int]:
    """
    ``--save_steps`` ("3906,39062") -> sorted list of steps at which a checkpoint set is saved in
    addition to every ``--save_interval``.

    :raises ValueError: naming --save_steps when an entry is not an integer >= 1.
    """
    if save_steps is None or (isinstance(save_steps, str) and not save_steps.strip()):
        return []
    items = save_steps.split(",") if isinstance(save_steps, str) else list(save_steps)
    out = []
    for x in items:
        try:
            v = int(str(x).strip())
        except ValueError:
            raise ValueError(f"--save_steps must be comma-separated integers >= 1, got {save_steps!r}") from None
        if v < 1:
            raise ValueError(f"--save_steps must be comma-separated integers >= 1, got {save_steps!r}")
        out.append(v)
    return sorted(set(out))


def validate_training_args(args: Dict[str, Any]) -> None:
    """
    Check the training flags before anything is built or written.

    :param args: flag name -> value (e.g. ``vars(argparse_namespace)``); keys that are absent
                 are not checked.
    :raises ValueError: naming the flag, the value and what was expected.
    """
    _check_flags(args)
    if args.get("momentum_decay"):
        momentum_decay_from_flags(args)


def _check_flags(args: Mapping[str, Any]) -> None:
    """Every check of ``validate_training_args`` but building the MDLRC schedule."""
    for flag in ("batch_size", "log_interval"):
        _int_flag(args, flag, 1)
    for flag in ("save_interval", "lr_anneal_steps", "total_steps", "stop_at", "sample_interval",
                 "max_nonfinite", "seed"):
        _int_flag(args, flag, 0)
    mb = args.get("microbatch")
    if mb is not None and whole_number(mb) not in (0, -1):
        check_integer(mb, "microbatch", lo=1, what="-1 (off) or an integer >= 1")
    _num_flag(args, "lr", 0.0, lo_open=True)
    _num_flag(args, "weight_decay", 0.0)
    _num_flag(args, "grad_clip", 0.0)
    _num_flag(args, "fp16_scale_growth", 0.0, 1.0, lo_open=True)
    _num_flag(args, "beta1", 0.0, 1.0, hi_open=True)
    _num_flag(args, "beta2", 0.0, 1.0, hi_open=True)
    _num_flag(args, "beta1_min", 0.0, 1.0, hi_open=True)
    if "ema_rate" in args:
        parse_ema_rates(args["ema_rate"])
    _int_flag(args, "global_batch_size", 0)
    if "save_steps" in args:
        parse_save_steps(args["save_steps"])
    if "precision" in args:
        _resolve_precision(args["precision"], bool(args.get("use_fp16", False)), torch.device("cpu"))
    for flag in ("compile", "channels_last", "fused_optimizer"):
        if flag in args:
            _auto_bool(args[flag], flag, False)
    mode = args.get("compile_mode")
    if mode is not None and str(mode) not in COMPILE_MODES:
        raise ValueError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    _check_methods(args)
    if "fdm_warmup_steps" in args or "fdm_multiplier" in args or "fdm_sigma_range" in args:
        _fdm.check_fdm_options(args.get("fdm_multiplier", _fdm.DEFAULT_MULTIPLIER),
                               args.get("fdm_sigma_range", _fdm.DEFAULT_SIGMA_RANGE), args.get("fdm_warmup_steps"))
    total, stop_at = args.get("total_steps") or 0, args.get("stop_at") or 0
    if total and stop_at and stop_at > total:
        raise ValueError(f"--stop_at {stop_at} is past --total_steps {total}: the run ends at --total_steps; "
                         "use a --stop_at below it (or 0)")
    resume = args.get("resume")
    if resume is not None and not str(resume).strip():
        raise ValueError("--resume must be auto, none or a checkpoint path, got an empty value")


class _StandInDiffusion:
    """A 10-step linear-schedule stand-in, so the method classes' own checks can run on flags."""

    num_timesteps = 10
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.2, 10))


# longer than any target iteration, so that without --total_steps only the run's real length (given to
# training.create_schedule) can refuse a CLTS release that starts before the target
_STAND_IN_TOTAL_STEPS = 10 ** 12


def _check_methods(args: Dict[str, Any]) -> None:
    # The classes validate their own options (one check per option, messages name the flags):
    # building the chosen sampler and weighting here runs those checks early.
    options = {k: args[k] for k in method_options() if k in args}
    if "schedule_sampler" in args:
        # --total_steps is a TrainLoop setting, checked with the loop's (LoopSettings); where it is not
        # among ``args`` a stand-in length lets the sampler check its own options, and
        # training.create_schedule builds it with the real one before anything is written
        sampler = create_named_schedule_sampler(args["schedule_sampler"], _StandInDiffusion(), seed=0,
                                                total_steps=args.get("total_steps", _STAND_IN_TOTAL_STEPS), **options)
        if args.get("fold_weighting"):
            check_foldable(sampler, args.get("loss_weighting", "none"), bool(args.get("learn_sigma", False)))
    if "loss_weighting" in args:
        create_loss_weighting(args["loss_weighting"], _StandInDiffusion(), **options)


def momentum_decay_from_flags(args: Mapping[str, Any]) -> MomentumDecay:
    """
    The run's MDLRC schedule from its flags (``--momentum_decay``, ``--beta1``, ``--beta1_min``,
    ``--total_steps``, ``--lr_compensation``, ``--decay_beta1``; absent ones at their defaults).
    Building it is its check: the constructor refuses bad values naming the flag.
    """
    d = _LOOP_FLAG_DEFAULTS
    get = lambda k: args.get(k, d[k])  # noqa: E731
    total = get("total_steps")
    enabled = bool(get("momentum_decay"))
    # --total_steps 0 means "no end": passed as it is when MDLRC is on, so that the refusal names
    # the value given ("got 0", not "got None"); off, 0 stands for no horizon (None)
    return MomentumDecay(beta1=get("beta1"), beta1_min=get("beta1_min"),
                         total_steps=total if enabled else (total or None),
                         lr_compensation=get("lr_compensation"), enabled=enabled,
                         decay_beta1=bool(get("decay_beta1")))


# ---------------------------------------------------------------------------------------------
# TrainLoop's settings: upstream's keyword arguments plus the new ones, grouped (as EDM groups its
# options into *_kwargs dicts), every default the flag's
# ---------------------------------------------------------------------------------------------

#: upstream's TrainLoop keywords (the first six have no default, as upstream)
UPSTREAM_LOOP_ARGS: Tuple[str, ...] = (
    "batch_size", "microbatch", "lr", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "schedule_sampler", "weight_decay", "lr_anneal_steps",
)
_REQUIRED_LOOP_ARGS = UPSTREAM_LOOP_ARGS[:6]

#: the new TrainLoop keywords, by group. ``run_kwargs``: the run's length, checkpoints, folder,
#: seed, resume point and recorded configuration; ``optimizer_kwargs``: AdamW's betas, MDLRC,
#: clipping and the base-lr schedule; ``loss_kwargs``: the loss weighting and FDM's warm-up;
#: ``speed_kwargs``: the fast path (``resolve_fast_path``) and determinism; ``guard_kwargs``: the
#: non-finite step guard and the periodic EMA sample grid.
LOOP_GROUPS: Dict[str, Tuple[str, ...]] = {
    "run_kwargs": ("total_steps", "stop_at", "save_steps", "log_dir", "seed", "resume", "config"),
    "optimizer_kwargs": ("beta1", "beta2", "momentum_decay", "beta1_min", "lr_compensation", "decay_beta1",
                         "grad_clip", "lr_schedule"),
    "loss_kwargs": ("loss_weighting", "loss_weighting_options", "fdm_warmup_steps"),
    "speed_kwargs": ("precision", "compile", "compile_mode", "channels_last", "fused_optimizer", "deterministic"),
    "guard_kwargs": ("max_nonfinite", "sample_interval"),
}

#: TrainLoop keywords that take objects a caller builds, not flag values, with their defaults:
#: the run's configuration, a ``schedules.LRSchedule``, a weighting given by name or as a
#: length-T array, and a named weighting's options. ``schedule_sampler`` (upstream's) is one too.
LOOP_OBJECTS: Dict[str, Any] = {"config": None, "lr_schedule": None, "loss_weighting": "none",
                                "loss_weighting_options": None}

_LOOP_NAMES: Tuple[str, ...] = UPSTREAM_LOOP_ARGS + tuple(k for names in LOOP_GROUPS.values() for k in names)
#: the TrainLoop settings that are training flags (what ``LoopSettings.from_flags`` reads and checks)
LOOP_FLAG_NAMES: Tuple[str, ...] = tuple(k for k in _LOOP_NAMES if k not in LOOP_OBJECTS and k != "schedule_sampler")


def train_loop_defaults() -> Dict[str, Any]:
    """
    The default of every ``TrainLoop`` keyword that has one: the flag's default from
    ``training_defaults()`` (``LOOP_OBJECTS``' for the object-valued ones). ``TrainLoop`` takes
    its defaults from here and nowhere else.
    """
    names = _LOOP_NAMES[len(_REQUIRED_LOOP_ARGS):]
    return {k: LOOP_OBJECTS[k] if k in LOOP_OBJECTS else _LOOP_FLAG_DEFAULTS[k] for k in names}


class LoopSettings(Mapping):
    """
    Every setting of one ``TrainLoop`` (upstream's keywords but the built sampler, and every group
    member), with the defaults of ``train_loop_defaults()`` filled in, checked once when built:
    the flag-valued ones by ``validate_training_args``' checks, the MDLRC schedule by building it
    (``momentum``, which the loop then uses: it is built once per run). Read-only mapping.

    ``training.train`` builds one from the flags before the run folder is touched and passes it
    to ``TrainLoop(settings=...)``, which then checks nothing again.
    """

    def __init__(self, values: Mapping[str, Any]):
        """
        :param values: setting name -> value; absent ones take their defaults, except upstream's
                       six required ones (batch_size, microbatch, lr, ema_rate, log_interval,
                       save_interval).
        :raises TypeError: naming an unknown or missing setting.
        :raises ValueError: naming the flag of a bad value.
        """
        unknown = sorted(set(values) - set(_LOOP_NAMES) - {"schedule_sampler"})
        if unknown:
            raise TypeError(f"TrainLoop got unknown keyword(s) {', '.join(unknown)}; its keywords are upstream's "
                            f"and those of {', '.join(LOOP_GROUPS)}: {', '.join(_LOOP_NAMES)}")
        missing = [k for k in _REQUIRED_LOOP_ARGS if k not in values]
        if missing:
            raise TypeError(f"TrainLoop needs {', '.join(missing)} (upstream's required keywords)")
        self._values = dict(train_loop_defaults())
        self._values.update(values)
        self._values.pop("schedule_sampler", None)  # an object the loop gets on its own
        # objects (and a resolved ResumePoint) are the loop's to check when it uses them
        _check_flags({k: v for k, v in self._values.items()
                      if k not in LOOP_OBJECTS and not (k == "resume" and not isinstance(v, str))})
        self.momentum = momentum_decay_from_flags(self._values)

    @classmethod
    def from_groups(cls, upstream: Mapping[str, Any], groups: Mapping[str, Optional[Mapping[str, Any]]],
                    flat: Mapping[str, Any]) -> "LoopSettings":
        """
        Settings from ``TrainLoop``'s arguments: upstream's keywords, the ``*_kwargs`` groups, and
        new keywords given flat (``TrainLoop(..., total_steps=8)``, as earlier versions took them).

        :raises TypeError: a group member in the wrong group, or given twice.
        """
        values = dict(upstream)
        for group, members in groups.items():
            for k, v in (members or {}).items():
                if k not in LOOP_GROUPS[group]:
                    raise TypeError(f"{group} has no {k!r}; its keywords: {', '.join(LOOP_GROUPS[group])}")
                values[k] = v
        twice = sorted(set(values) & set(flat))
        if twice:
            raise TypeError(f"TrainLoop got {', '.join(twice)} twice (in a *_kwargs group and as a keyword)")
        values.update(flat)
        return cls(values)

    @classmethod
    def from_flags(cls, args: Mapping[str, Any], **objects: Any) -> "LoopSettings":
        """Settings from parsed flags (``vars(args)``): every setting that is a flag, then ``objects``."""
        values = {k: args[k] for k in LOOP_FLAG_NAMES if k in args}
        values.update(objects)
        return cls(values)

    def replace(self, **changes: Any) -> "LoopSettings":
        """
        A copy with some settings changed: objects (the run's config, a resolved ``ResumePoint``
        as ``resume``, built weights) need no check; a changed flag (e.g. the per-process
        ``batch_size`` resolved from ``--global_batch_size``) is checked on its own. The MDLRC
        schedule is kept unless one of its flags changes.
        """
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise TypeError(f"LoopSettings has no {', '.join(unknown)}")
        # "resume" here is the decision a caller took (a ResumePoint or "none"), not a flag to check
        _check_flags({k: v for k, v in changes.items() if k in LOOP_FLAG_NAMES and k != "resume"})
        new = object.__new__(type(self))
        new._values = dict(self._values, **changes)
        momentum_flags = {"beta1", "beta1_min", "total_steps", "lr_compensation", "momentum_decay", "decay_beta1"}
        new.momentum = momentum_decay_from_flags(new._values) if momentum_flags & set(changes) else self.momentum
        return new

    def upstream_kwargs(self) -> Dict[str, Any]:
        """Upstream's keywords (but the sampler) with these values, for ``TrainLoop(**..., settings=self)``."""
        return {k: self._values[k] for k in UPSTREAM_LOOP_ARGS if k != "schedule_sampler"}

    def group(self, name: str) -> Dict[str, Any]:
        """The values of one ``*_kwargs`` group."""
        return {k: self._values[k] for k in LOOP_GROUPS[name]}

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
