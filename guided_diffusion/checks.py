"""
Checks shared by the samplers, weightings and options: numbers and integers in a range, with
messages that name the command-line flag, and what a diffusion object must provide.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import numpy as np

__all__ = ["canonical_name", "lookup_registered", "reject_unknown_options", "UnknownNameError", "check_number", "check_integer", "num_timesteps_of", "alphas_cumprod_of"]


class UnknownNameError(NotImplementedError, ValueError):
    """An unknown sampler / weighting name (catchable as NotImplementedError, as upstream, or ValueError)."""


def check_number(value: Any, flag: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
            lo_open: bool = False, hi_open: bool = False, what: Optional[str] = None) -> float:
    """Return ``value`` as a float after checking it is a real number inside the given range."""
    lo_b = "(" if lo_open else "["
    hi_b = ")" if hi_open else "]"
    if what is None:
        if lo is not None and hi is not None:
            what = f"a number in {lo_b}{lo:g}, {hi:g}{hi_b}"
        elif lo is not None:
            what = f"a number {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            what = f"a number {'<' if hi_open else '<='} {hi:g}"
        else:
            what = "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"--{flag} must be {what}, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise ValueError(f"--{flag} must be {what}, got {value!r}")
    return v


def check_integer(value: Any, flag: str, *, lo: int) -> int:
    """Return ``value`` as an int after checking it is an integer (or integral float) >= lo."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v: Optional[int] = int(value)
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    else:
        v = None
    if v is None or v < lo:
        raise ValueError(f"--{flag} must be an integer >= {lo}, got {value!r}")
    return v


def num_timesteps_of(diffusion: Any) -> int:
    try:
        n = int(diffusion.num_timesteps)
    except AttributeError:
        raise TypeError(f"the diffusion object ({type(diffusion).__name__}) has no num_timesteps") from None
    if n < 1:
        raise ValueError(f"diffusion.num_timesteps must be >= 1, got {n}")
    return n


def alphas_cumprod_of(diffusion: Any) -> np.ndarray:
    try:
        ac = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    except AttributeError:
        raise TypeError(f"the diffusion object ({type(diffusion).__name__}) has no alphas_cumprod") from None
    if ac.ndim != 1 or len(ac) < 1:
        raise ValueError(f"diffusion.alphas_cumprod must be a non-empty 1-D array, got shape {ac.shape}")
    return ac


def canonical_name(name: Any) -> str:
    """How registry names are compared: case, hyphens and underscores do not matter ("min-snr" == "min_snr")."""
    return str(name).strip().lower().replace("-", "_")


def lookup_registered(registry: dict, name: Any, what: str, flag: str, choices: Any) -> Any:
    """
    ``registry[canonical_name(name)]``, or UnknownNameError naming the flag and the choices
    (e.g. ``unknown schedule sampler: 'cts' (--schedule_sampler must be one of ...)``).
    """
    found = registry.get(canonical_name(name))
    if found is None:
        raise UnknownNameError(f"unknown {what}: {name!r} (--{flag} must be one of {', '.join(choices)})")
    return found


def reject_unknown_options(options: Any, known: Any, flag: str, name: str, accepts: Any) -> None:
    """ValueError listing the options that no method knows (other methods' options are fine)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for --{flag} {name}; it accepts {list(accepts)}")
