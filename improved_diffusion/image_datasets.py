"""Alias of ``guided_diffusion.image_datasets`` (the same module object)."""
import sys

from guided_diffusion import image_datasets as _module

sys.modules[__name__] = _module
