"""Alias of ``guided_diffusion.losses`` (the same module object)."""
import sys

from guided_diffusion import losses as _module

sys.modules[__name__] = _module
