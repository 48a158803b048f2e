"""Seeds: order-independent per-item randomness and global seeding (design.md section 2)."""

from __future__ import annotations

import hashlib
import random

import numpy as np


def stable_seed(seed: int, *labels: object) -> int:
    """First 8 bytes, little-endian, of sha256 over ``(seed, *labels)`` joined by ``\\x1f``."""
    text = "\x1f".join(map(str, (seed, *labels)))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def stable_rng(seed: int, *labels: object) -> np.random.Generator:
    """A numpy PCG64 generator seeded with :func:`stable_seed`; never Python's salted ``hash()``."""
    return np.random.Generator(np.random.PCG64(stable_seed(seed, *labels)))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)
