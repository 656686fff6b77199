"""Alias of ``guided_diffusion.fp16_util`` (the same module object)."""
import sys

from guided_diffusion import fp16_util as _module

sys.modules[__name__] = _module
