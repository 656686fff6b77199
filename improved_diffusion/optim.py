"""Alias of ``guided_diffusion.optim`` (the same module object)."""
import sys

from guided_diffusion import optim as _module

sys.modules[__name__] = _module
