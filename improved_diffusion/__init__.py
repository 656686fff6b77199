"""
Improved-Diffusion's package name over the one implementation in ``guided_diffusion``.

Every module here except ``script_util`` replaces itself in ``sys.modules`` with the
guided_diffusion module of the same name, so ``improved_diffusion.gaussian_diffusion is
guided_diffusion.gaussian_diffusion`` and no code is copied. ``script_util`` carries
Improved-Diffusion's defaults.
"""
