"""Alias of ``guided_diffusion.schedules`` (the same module object)."""
import sys

from guided_diffusion import schedules as _module

sys.modules[__name__] = _module
