"""Alias of ``guided_diffusion.dist_util`` (the same module object)."""
import sys

from guided_diffusion import dist_util as _module

sys.modules[__name__] = _module
