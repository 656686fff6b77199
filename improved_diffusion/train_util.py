"""Alias of ``guided_diffusion.train_util`` (the same module object)."""
import sys

from guided_diffusion import train_util as _module

sys.modules[__name__] = _module
