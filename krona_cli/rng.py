"""Counter-based randomness: every random draw of a run comes from a generator seeded by what it is for.

`generator("noise", seed, step, index)` gives the same numbers whatever process, batch or resume produced the call,
so a resumed run, or a run split over more processes, draws exactly what an uninterrupted single-process run draws.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints and strings (stable across processes, machines and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode() if isinstance(part, str) else int(part).to_bytes(16, "little", signed=True)
        h.update(len(data).to_bytes(2, "little") + data)
    return int.from_bytes(h.digest(), "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A fresh CPU torch.Generator seeded by `derive_seed(*parts)`."""
    return torch.Generator("cpu").manual_seed(derive_seed(*parts))
