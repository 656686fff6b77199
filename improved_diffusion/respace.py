"""Alias of ``guided_diffusion.respace`` (the same module object)."""
import sys

from guided_diffusion import respace as _module

sys.modules[__name__] = _module
