"""Aspect-ratio buckets: training sizes of about resolution² pixels with sides that are multiples of 64, each photo
in the bucket nearest its aspect ratio, and a schedule that draws every step's batch from one bucket.

A photo is resized to cover its bucket and only the overhang is cropped, so what is cut off is the difference between
the photo's aspect ratio and its bucket's (the bucket rounding), never a square out of a portrait. The schedule is
counter-based like the rest of a run (`rng.py`): which bucket step s uses, and which photos fill it, depend only on
the seed and s, so resuming and splitting a batch over processes draw the same batches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..rng import derive_seed, generator

STEP = 64  # sides are multiples of this (8 latent pixels)
MAX_RATIO = 4.0  # the longest side is at most this many times the shortest (SDXL's own buckets: 512×2048)


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}×{self.height}"


def bucket_sizes(resolution: int, step: int = STEP, max_ratio: float = MAX_RATIO) -> list[Bucket]:
    """Every size whose sides are multiples of `step`, whose area is at most resolution² and as large as it can be
    for one of its sides, with an aspect ratio within 1:max_ratio, sorted by aspect ratio (tall to wide)."""
    area = resolution * resolution
    sizes = set()
    for side in range(step, area // step + 1, step):
        other = area // side // step * step
        if other >= step and max(side, other) <= max_ratio * min(side, other):
            sizes.add(Bucket(height=other, width=side))
            sizes.add(Bucket(height=side, width=other))
    if not sizes:  # a resolution under one step: one square bucket of that size
        sizes.add(Bucket(resolution, resolution))
    return sorted(sizes, key=lambda b: (b.aspect, b.width))


def crop_fraction(height: int, width: int, bucket: Bucket) -> float:
    """The fraction of a height×width photo's longer overhanging side cut off when it is resized to cover `bucket`."""
    aspect = width / height
    return 1 - min(aspect, bucket.aspect) / max(aspect, bucket.aspect)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket that crops the least of a height×width photo (the nearest aspect ratio; the larger on a tie)."""
    return min(buckets, key=lambda b: (round(crop_fraction(height, width, b), 12), -b.height * b.width))


def histogram(buckets: Sequence[Bucket]) -> str:
    """'3 × 832×1216, 2 × 1024×1024' for a list of buckets, most used first."""
    return ", ".join(f"{n} × {b}" for b, n in Counter(buckets).most_common())


def spread(buckets: Sequence[Bucket], count: int) -> list[Bucket]:
    """`count` buckets in the proportions of `buckets`, interleaved (smooth weighted round robin): the sizes in which
    to generate class images so that every photo's bucket has class images of its own."""
    weights = Counter(buckets)
    total, credit, out = sum(weights.values()), dict.fromkeys(sorted(weights), 0), []
    for _ in range(count):
        for b in credit:
            credit[b] += weights[b]
        best = max(credit, key=lambda b: (credit[b], b))
        credit[best] -= total
        out.append(best)
    return out


@lru_cache(maxsize=64)
def _order(n: int, seed: int, epoch: int, stream: str) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=generator("order", stream, seed, epoch)).tolist())


def stream_item(position: int, n: int, seed: int, stream: str) -> int:
    """The position-th draw of a stream over n items: epochs walk them in a seeded random order."""
    return _order(n, seed, position // n, stream)[position % n]


class Schedule:
    """Which dataset items make up each step's global batch, every step from one bucket.

    Step s uses bucket k with probability (items in k) / (items), drawn from a seed derived from (seed, s); bucket
    k's items are a stream of seeded epochs of its own, and step s takes the next `batch` of them (`step`, then
    `take`). With one bucket this is a plain seeded walk over epochs of the dataset.
    """

    def __init__(self, item_buckets: Sequence[Bucket], batch: int, seed: int, what: str):
        self.groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(item_buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.order = sorted(self.groups)
        self.batch, self.seed, self.what = batch, seed, what
        sizes = [len(self.groups[b]) for b in self.order]
        self._cumulative = [sum(sizes[: i + 1]) / sum(sizes) for i in range(len(sizes))]
        self._picks: list[tuple[int, int]] = []  # steps 0, 1, ... drawn so far: (bucket index, earlier uses of it)
        self._uses = [0] * len(self.order)

    def step(self, step: int) -> tuple[Bucket, int]:
        """(the bucket of step `step`, how many earlier steps used it)."""
        while len(self._picks) <= step:
            u = derive_seed("bucket", self.what, self.seed, len(self._picks)) / 2**63
            k = next((i for i, c in enumerate(self._cumulative) if u < c), len(self.order) - 1)
            self._picks.append((k, self._uses[k]))
            self._uses[k] += 1
        k, earlier = self._picks[step]
        return self.order[k], earlier

    def stream(self, bucket: Bucket) -> str:
        return self.what if len(self.order) == 1 else f"{self.what}/{bucket}"

    def take(self, bucket: Bucket, earlier: int) -> list[int] | None:
        """The items of the (earlier + 1)-th batch drawn from `bucket`; None if no item is in that bucket."""
        group = self.groups.get(bucket)
        if group is None:
            return None
        first = earlier * self.batch
        return [group[stream_item(first + j, len(group), self.seed, self.stream(bucket))] for j in range(self.batch)]

    def take_any(self, step: int) -> list[int]:
        """Step `step`'s batch drawn from all items whatever their bucket (for a bucket that has none of its own)."""
        n = sum(len(g) for g in self.groups.values())
        return [stream_item(step * self.batch + j, n, self.seed, self.what) for j in range(self.batch)]
