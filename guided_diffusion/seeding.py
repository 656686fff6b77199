"""
Seeds derived from integers, at the bottom of the package: every random stream of training,
sampling and the analyses is seeded through here.

- ``mix_seed(*parts)``: a 63-bit SplitMix64 hash, cheap enough to seed one generator per
  image and step (sampling: ``(seed, sample index, stream)``; the analyses: ``(image seed, step)``).
- ``derive_seed(*parts)``: numpy ``SeedSequence`` hashing, for the few per-step streams of
  training (timesteps, noise, dropout). It is kept as it is so that runs resume bit-exactly
  with the checkpoints written before this module existed.
"""
from __future__ import annotations

import numpy as np

__all__ = ["mix_seed", "derive_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(first: int, *rest: int) -> int:
    """A 63-bit generator seed hashed (SplitMix64) from integers: h = sm(first), h = sm(h ^ part)..."""
    h = _splitmix64(int(first) & _MASK64)
    for part in rest:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers by numpy's SeedSequence (training's per-step streams)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))
