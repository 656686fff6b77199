"""Alias of ``guided_diffusion.nn`` (the same module object)."""
import sys

from guided_diffusion import nn as _module

sys.modules[__name__] = _module
