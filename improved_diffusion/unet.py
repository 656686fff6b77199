"""Alias of ``guided_diffusion.unet`` (the same module object)."""
import sys

from guided_diffusion import unet as _module

sys.modules[__name__] = _module
