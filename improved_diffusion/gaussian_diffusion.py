"""Alias of ``guided_diffusion.gaussian_diffusion`` (the same module object)."""
import sys

from guided_diffusion import gaussian_diffusion as _module

sys.modules[__name__] = _module
