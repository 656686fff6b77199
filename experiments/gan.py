"""
A small DCGAN (Radford et al. 2016) for the GAN side of the paper's Table 1: the consistency
of GAN generators trained from different initialisations, fed the same latent z.

Standard architecture for square images of side 2^k (k >= 3): the generator maps z [N, nz, 1, 1]
through a 4x4 transposed convolution and stride-2 transposed convolutions (BatchNorm + ReLU)
to a Tanh image in [-1, 1]; the discriminator mirrors it with stride-2 convolutions
(BatchNorm + LeakyReLU 0.2, no BatchNorm on the first layer) down to one logit. Weights are
initialised N(0, 0.02) (BatchNorm scales N(1, 0.02)), as the paper.

Files a training run writes (``scripts/baselines/dcgan_train.py``): ``gan_config.yaml`` (the
flags below), ``generator_NNNNNN.pt`` and ``discriminator_NNNNNN.pt`` (plain state_dicts).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from guided_diffusion.config import coerce_config, load_config

GAN_CONFIG_NAME = "gan_config.yaml"


def gan_defaults() -> Dict[str, Any]:
    """The architecture flags of the DCGAN (saved to ``gan_config.yaml`` by the training script)."""
    return dict(
        image_size=32,
        nz=100,  # latent dimension
        ngf=64,  # generator width
        ndf=64,  # discriminator width
        num_channels=3,  # image channels
    )


def _num_stages(image_size: int) -> int:
    k = int(round(math.log2(image_size))) if image_size > 0 else -1
    if image_size < 8 or 2**k != image_size:
        raise ValueError(f"--image_size: the DCGAN needs a power of two >= 8, got {image_size}")
    return k - 2  # 4x4 -> image_size in (k - 2) doublings


class DCGANGenerator(nn.Module):
    """z [N, nz, 1, 1] (or [N, nz]) -> images [N, C, S, S] in [-1, 1]."""

    def __init__(self, image_size: int = 32, nz: int = 100, ngf: int = 64, num_channels: int = 3):
        super().__init__()
        self.nz = int(nz)
        stages = _num_stages(image_size)
        ch = ngf * 2 ** (stages - 1)
        layers = [nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, num_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 2:
            z = z[:, :, None, None]
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    """images [N, C, S, S] -> logits [N] (real = high)."""

    def __init__(self, image_size: int = 32, ndf: int = 64, num_channels: int = 3):
        super().__init__()
        stages = _num_stages(image_size)
        layers = [nn.Conv2d(num_channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for _ in range(stages - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).reshape(-1)


def dcgan_weights_init(module: nn.Module) -> None:
    """Radford et al.'s initialisation: conv weights N(0, 0.02), BatchNorm N(1, 0.02) and 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def create_gan(
    image_size: int = 32, nz: int = 100, ngf: int = 64, ndf: int = 64, num_channels: int = 3
) -> Tuple[DCGANGenerator, DCGANDiscriminator]:
    """
    Build and initialise a DCGAN generator and discriminator.

    :return: ``(generator, discriminator)``.
    """
    g = DCGANGenerator(image_size, nz, ngf, num_channels)
    d = DCGANDiscriminator(image_size, ndf, num_channels)
    g.apply(dcgan_weights_init)
    d.apply(dcgan_weights_init)
    return g, d


def gan_latents(seeds: Sequence[int], nz: int) -> torch.Tensor:
    """
    The latent z of each seed, [len(seeds), nz, 1, 1]: a function of the seed alone (not of
    the model or batch), so every generator gets the same z for the same seed.
    """
    out = torch.empty(len(seeds), int(nz), 1, 1)
    for n, s in enumerate(seeds):
        out[n] = torch.randn(int(nz), 1, 1, generator=torch.Generator().manual_seed(int(s)))
    return out


def find_gan_config(checkpoint: Union[str, Path]) -> Optional[Path]:
    """The ``gan_config.yaml`` beside a checkpoint, or None (then it is not a GAN checkpoint)."""
    path = Path(checkpoint).resolve().parent / GAN_CONFIG_NAME
    return path if path.is_file() else None


def load_gan_flags(checkpoint: Union[str, Path]) -> Dict[str, Any]:
    """
    The architecture flags of a GAN checkpoint, from the ``gan_config.yaml`` beside it.

    :raises FileNotFoundError: naming the missing file.
    """
    cfg_path = find_gan_config(checkpoint)
    if cfg_path is None:
        raise FileNotFoundError(
            f"{checkpoint}: no {GAN_CONFIG_NAME} beside it (GAN checkpoints are the generator_*.pt files "
            "that scripts/baselines/dcgan_train.py writes next to their config)"
        )
    defaults = gan_defaults()
    cfg = {k: v for k, v in load_config(cfg_path).items() if k in defaults}
    flags = dict(defaults)
    flags.update(coerce_config(cfg, defaults, str(cfg_path)))
    return flags


def discriminator_path_for(generator_checkpoint: Union[str, Path]) -> Path:
    """``.../generator_000100.pt`` -> ``.../discriminator_000100.pt``."""
    p = Path(generator_checkpoint)
    if not p.name.startswith("generator"):
        raise ValueError(f"{p}: expected a generator_*.pt file to find its discriminator")
    return p.with_name("discriminator" + p.name[len("generator"):])
