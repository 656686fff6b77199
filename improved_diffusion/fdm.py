"""Alias of ``guided_diffusion.fdm`` (the same module object)."""
import sys

from guided_diffusion import fdm as _module

sys.modules[__name__] = _module
