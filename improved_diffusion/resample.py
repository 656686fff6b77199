"""Alias of ``guided_diffusion.resample`` (the same module object)."""
import sys

from guided_diffusion import resample as _module

sys.modules[__name__] = _module
