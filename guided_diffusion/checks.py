"""
Checks shared by the whole package (its base layer): numbers and whole numbers in a range, with
messages that name the command-line flag (``check_number``, ``check_integer``: the one rule of what
a whole number is, ``whole_number``), registry names, and what a diffusion object must provide.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import numpy as np

__all__ = ["canonical_name", "lookup_registered", "reject_unknown_options", "UnknownNameError", "check_number",
           "check_integer", "whole_number", "num_timesteps_of", "alphas_cumprod_of"]


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


def whole_number(value: Any) -> Optional[int]:
    """
    ``value`` as an int when it is a whole number, else None: THE rule of the project's integer
    flags and arguments. An int (numpy's too) is one; so is a finite real number with no fraction
    (``100.0``, as a YAML file or a computed value may hold it); a bool, a fraction (``1.5``),
    ``inf``/``nan`` and text (``"3"``) are not.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    return None


def check_integer(value: Any, flag: str, *, lo: Optional[int] = None, what: Optional[str] = None,
                  name: Optional[str] = None) -> int:
    """
    Return ``value`` as an int after checking it is a whole number (``whole_number``) >= ``lo``.

    :param flag: the flag the message names (``--flag must be ...``).
    :param what: what the message says is expected (default ``an integer >= lo``).
    :param name: the whole subject of the message instead of ``--flag`` (e.g. ``MomentumDecay: step``).
    """
    v = whole_number(value)
    if v is None or (lo is not None and v < lo):
        expected = what or ("an integer" if lo is None else f"an integer >= {lo}")
        raise ValueError(f"{name or '--' + flag} must be {expected}, got {value!r}")
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
