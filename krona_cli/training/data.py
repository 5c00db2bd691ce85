"""Training images: the DreamBooth transforms and the dataset of a folder (finding and reading image files:
images.py).

The transforms are those of diffusers' `train_dreambooth_lora_sdxl.py` (resize the shorter side, optional flip,
center or random square crop, SDXL micro-conditioning), but every random draw comes from a generator seeded by the
dataset item (`rng.generator("augment", ...)`), so an item is the same picture whenever and wherever it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .. import rng
from ..errors import KronaError
from ..images import check_images, load_image, read_caption, scan_images
from .buckets import Bucket, bucket_sizes, nearest_bucket

TimeIds = tuple[int, int, int, int, int, int]


def small_images_warning(
    paths: Sequence[Path],
    sizes: Sequence[tuple[int, int]],
    targets: Sequence[Bucket],
    what: str = "instance",
    limit: int = 3,
) -> str | None:
    """A warning about the images smaller than their training size in either side (they are upscaled), or None.

    `sizes` are (height, width) in `paths` order, as `check_images` returns them; `targets` each image's training
    size (`ImageSet.buckets`).
    """
    small = [(Path(p), h, w, t) for p, (h, w), t in zip(paths, sizes, targets) if h < t.height or w < t.width]
    if not small:
        return None
    listed = ", ".join(f"{p.name} {w}×{h} → {t}" for p, h, w, t in small[:limit]) + (
        ", ..." if len(small) > limit else ""
    )
    return (
        f"{len(small)} of {len(sizes)} {what} images are smaller than their training size and will be upscaled "
        f"({listed}); use larger photos or a lower --resolution"
    )


@dataclass(frozen=True)
class Example:
    """One training item: pixels in [-1, 1] (3, R, R), SDXL time ids (original h, w, crop y, x, target h, w)."""

    pixels: torch.Tensor
    time_ids: TimeIds
    caption: str
    source: Path


def prepare_image(
    image: Image.Image, size: int | tuple[int, int], center_crop: bool, random_flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, TimeIds]:
    """Resize to cover `size` ((height, width), or one side of a square), maybe flip, crop the overhang; pixels
    (3, H, W) in [-1, 1] and time ids (original height, width, crop top, left, target height, width).

    As diffusers does it for squares: the side that fits exactly is resized to its target and the other becomes
    int(side · scale) (torchvision's Resize), the flip comes before the crop, and the crop's top-left is in the
    flipped image. Random draws (flip, then crop) come from `generator`.
    """
    height, width = (size, size) if isinstance(size, int) else size
    original = (image.height, image.width)
    if image.width * height >= width * image.height:  # as wide as the target or wider: the heights match
        resized = (max(width, int(image.width * height / image.height)), height)
    else:
        resized = (width, max(height, int(image.height * width / image.width)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    if random_flip and torch.rand(1, generator=generator).item() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        y, x = round((image.height - height) / 2), round((image.width - width) / 2)
    else:
        y = int(torch.randint(0, image.height - height + 1, (1,), generator=generator))
        x = int(torch.randint(0, image.width - width + 1, (1,), generator=generator))
    image = image.crop((x, y, x + width, y + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()
    return pixels, (*original, y, x, height, width)


class ImageSet(Dataset):
    """One folder of images with captions, repeated; item i is image i % len(paths), augmented by its own generator.

    Each image has a training size: the square `resolution`², or with `buckets` the aspect-ratio bucket nearest its
    own aspect (`buckets.py`). `sizes` are the images' (height, width) when the caller has already decoded them
    (`check_images`); otherwise every image is decoded once here.
    """

    def __init__(
        self,
        folder: str | Path,
        prompt: str,
        resolution: int,
        *,
        repeats: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        what: str = "instance",
        buckets: bool = False,
        sizes: Sequence[tuple[int, int]] | None = None,
    ):
        if repeats < 1:
            raise KronaError(f"--repeats must be at least 1 (got {repeats})")
        self.paths, self.skipped = scan_images(folder, what)
        self.captions = [read_caption(path, prompt) for path in self.paths]
        self.resolution, self.repeats, self.seed, self.what = resolution, repeats, seed, what
        self.center_crop, self.random_flip = center_crop, random_flip
        self.sizes = list(sizes) if sizes is not None else check_images(self.paths)
        if len(self.sizes) != len(self.paths):
            raise KronaError(f"the {what} folder '{folder}' changed while krona was reading it; run again")
        choices = bucket_sizes(resolution) if buckets else [Bucket(resolution, resolution)]
        self.buckets = [nearest_bucket(h, w, choices) for h, w in self.sizes]

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def bucket_of(self, index: int) -> Bucket:
        return self.buckets[index % len(self.paths)]

    def __getitem__(self, index: int) -> Example:
        return self.example(index)

    def example(self, index: int, bucket: Bucket | None = None) -> Example:
        """Item `index` at its own training size, or resized to cover `bucket` and cropped to it."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of a {len(self)}-item image set")
        image = index % len(self.paths)
        bucket = bucket or self.buckets[image]
        generator = rng.generator("augment", self.what, self.seed, index)
        pixels, time_ids = prepare_image(
            load_image(self.paths[image]), (bucket.height, bucket.width), self.center_crop, self.random_flip, generator
        )
        return Example(pixels, time_ids, self.captions[image], self.paths[image])
