"""Alias of ``guided_diffusion.logger`` (the same module object)."""
import sys

from guided_diffusion import logger as _module

sys.modules[__name__] = _module
