"""
The registries of the training methods: timestep samplers (``resample``) and loss weightings
(``weighting``) register their classes here, and this module is the one owner of "which method
options exist": a method's options are its constructor's keyword parameters, named as the
command-line flags, with the constructor's defaults as the flags' defaults (one convention for
samplers and weightings alike).

- ``MethodRegistry``: one kind of method (name -> class, its options, lookup, building).
- ``method_option_defaults()``: every registered method's options, flag -> default.
- ``known_method_options()``: their names plus the registries' common options (``seed``, ``rank``),
  so a caller may pass every flag to any method's factory and only a name no method knows is refused.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Sequence, Set, Tuple

from .checks import canonical_name, lookup_registered, reject_unknown_options

__all__ = ["MethodRegistry", "constructor_options", "method_option_defaults", "known_method_options"]

# the constructor parameters that are not options: what a method is built with (the run's length
# is the training flag --total_steps, handed to the methods whose schedule depends on it)
_NOT_OPTIONS = ("self", "diffusion", "seed", "rank", "total_steps")
_REGISTRIES: List["MethodRegistry"] = []


def constructor_options(cls: type, skip: Sequence[str] = _NOT_OPTIONS) -> Dict[str, Any]:
    """A method class's options: its constructor's keyword parameters (flag name -> default)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items()
            if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class MethodRegistry:
    """
    The registry of one kind of method (e.g. timestep samplers): classes by name (and aliases),
    compared as ``checks.canonical_name`` does ("min-snr" == "min_snr").

    :param what: the kind, for messages ("schedule sampler").
    :param flag: the flag that names a method of this kind ("schedule_sampler").
    :param common: options every method of this kind takes besides its own (a sampler's ``seed``, ``rank``).
    :param order: where this kind's options come in ``method_option_defaults`` (and so in the
        training flags and config.yaml), whichever module was imported first.
    """

    def __init__(self, what: str, flag: str, common: Tuple[str, ...] = (), order: int = 0):
        self.what = what
        self.flag = flag
        self.common = tuple(common)
        self.order = int(order)
        self._classes: Dict[str, type] = {}
        #: registered name (and alias) -> the options of its class, then ``common``
        self.flags: Dict[str, Tuple[str, ...]] = {}
        _REGISTRIES.append(self)

    def register(self, cls: type) -> type:
        """Add ``cls`` under ``cls.name`` and its ``aliases``; its options follow from its constructor."""
        for key in (cls.name,) + tuple(getattr(cls, "aliases", ())):
            self._classes[canonical_name(key)] = cls
            self.flags[key] = tuple(constructor_options(cls)) + self.common
        return cls

    @property
    def names(self) -> Tuple[str, ...]:
        """The registered names and aliases, in registration order."""
        return tuple(self.flags)

    def classes(self) -> List[type]:
        """The registered classes, each once."""
        return list(dict.fromkeys(self._classes.values()))

    def lookup(self, name: Any) -> type:
        """The class registered as ``name``; ``checks.UnknownNameError`` naming the flag and the choices."""
        return lookup_registered(self._classes, name, self.what, self.flag, self.names)

    def option_defaults(self) -> Dict[str, Any]:
        """Every registered class's options (flag name -> default), in registration order."""
        out: Dict[str, Any] = {}
        for cls in self.classes():
            out.update(constructor_options(cls))
        return out

    def options_for(self, cls: type, options: Dict[str, Any]) -> Dict[str, Any]:
        """
        The entries of ``options`` that ``cls`` takes; the options of other methods are left out,
        a name no method knows is refused (``ValueError`` naming the flag and what ``cls`` accepts).
        """
        reject_unknown_options(options, known_method_options(), self.flag, cls.name, self.flags[cls.name])
        return {k: v for k, v in options.items() if k in self.flags[cls.name]}


def method_option_defaults() -> Dict[str, Any]:
    """The options of every registered method of every kind (flag name -> the constructor's default)."""
    out: Dict[str, Any] = {}
    for registry in sorted(_REGISTRIES, key=lambda r: r.order):
        out.update(registry.option_defaults())
    return out


def known_method_options() -> Set[str]:
    """Every option name a method factory accepts (``method_option_defaults`` and the common ones)."""
    names = set(method_option_defaults())
    for registry in _REGISTRIES:
        names |= set(registry.common)
    return names
