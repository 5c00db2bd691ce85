"""Training images: finding them, reading any image file as RGB, captions, and the DreamBooth transforms.

The transforms are those of diffusers' `train_dreambooth_lora_sdxl.py` (resize the shorter side, optional flip,
center or random square crop, SDXL micro-conditioning), but every random draw comes from a generator seeded by the
dataset item (`rng.generator("augment", ...)`), so an item is the same picture whenever and wherever it is read.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .. import rng
from .buckets import Bucket, bucket_sizes, nearest_bucket
from ..errors import KronaError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2 × Image.MAX_IMAGE_PIXELS)
CAPTION_SUFFIX = ".txt"

TimeIds = tuple[int, int, int, int, int, int]


# Commands whose folder option is not spelled `--{what}-dir` (krona eval: --images, --reference).
_FLAGS = {"images": "--images", "reference": "--reference"}


def _flag(what: str, folder: Path) -> str:
    return f"{_FLAGS.get(what, f'--{what}-dir')} '{folder}'"


def scan_images(folder: str | Path, what: str = "instance", allow_empty: bool = False) -> tuple[list[Path], list[Path]]:
    """(images sorted by name, skipped files) of one folder; sub-folders, hidden files and captions are ignored.

    Skipped: files without an image suffix and empty files. A missing folder, or one with no usable image (unless
    `allow_empty`), is an error that names the `--{what}-dir` flag (and the files it skipped).
    """
    folder = Path(folder).expanduser()
    flag = _flag(what, folder)
    if not folder.is_dir():
        raise KronaError(f"{flag} does not exist or is not a folder; point it at the folder that holds your images")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise KronaError(f"cannot list {flag}: {e.strerror}; check its permissions") from e
    images, skipped = [], []
    for path in entries:
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() == CAPTION_SUFFIX:
            continue
        usable = path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and path.stat().st_size > 0
        (images if usable else skipped).append(path)
    if not images and not allow_empty:
        found = f"; it has only {skipped_note(skipped)}" if skipped else ""
        raise KronaError(f"{flag} holds no images ({', '.join(IMAGE_SUFFIXES)}){found}; add photos there or point "
                         "the flag at the folder that has them")
    return images, skipped


def skipped_note(skipped: Sequence[Path], limit: int = 5) -> str:
    """'3 files that are empty or not images: a.pdf, b.jpg (empty), c.md' (at most `limit` names, then '...')."""
    names = [p.name + (" (empty)" if p.suffix.lower() in IMAGE_SUFFIXES else "") for p in skipped]
    more = ", ..." if len(names) > limit else ""
    return f"{len(names)} file(s) that are empty or not images: {', '.join(names[:limit])}{more}"


def check_images(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Decode every image once, whole, before any work depends on them; their (height, width) as loaded (EXIF
    orientation applied), in `paths` order.

    A file that cannot be used (truncated, corrupt, too large to decode safely) fails here rather than in the middle
    of a run: a KronaError naming it, or, when several are bad, naming how many and the first few.
    """
    sizes, bad = [], []
    for path in paths:
        try:
            image = load_image(path)
        except KronaError as e:
            bad.append((Path(path), e))
            continue
        sizes.append((image.height, image.width))
        image.close()
    if len(bad) == 1:
        raise bad[0][1]
    if bad:
        names = ", ".join(p.name for p, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise KronaError(f"{len(bad)} images cannot be used ({names}) in '{Path(bad[0][0]).parent}'; the first: "
                         f"{bad[0][1]}")
    return sizes


def small_images_warning(paths: Sequence[Path], sizes: Sequence[tuple[int, int]], targets: Sequence[Bucket],
                         what: str = "instance", limit: int = 3) -> str | None:
    """A warning about the images smaller than their training size in either side (they are upscaled), or None.

    `sizes` are (height, width) in `paths` order, as `check_images` returns them; `targets` each image's training
    size (`ImageSet.buckets`).
    """
    small = [(Path(p), h, w, t) for p, (h, w), t in zip(paths, sizes, targets) if h < t.height or w < t.width]
    if not small:
        return None
    listed = ", ".join(f"{p.name} {w}×{h} → {t}" for p, h, w, t in small[:limit]) + (", ..." if len(small) > limit
                                                                                     else "")
    return (f"{len(small)} of {len(sizes)} {what} images are smaller than their training size and will be upscaled "
            f"({listed}); use larger photos or a lower --resolution")


def load_image(path: Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, EXIF orientation applied; a file that cannot be used is a KronaError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, or fine to load
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(
                        f"{image.width}×{image.height} pixels, over the {MAX_PIXELS:,}-pixel limit")
                return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as e:
        raise KronaError(f"image '{path}' is too large to load safely ({e}); downscale it or remove it") from e
    except Exception as e:  # any failure to decode or convert (OSError, SyntaxError, zlib.error...): unusable file
        raise KronaError(f"cannot read image '{path}': {e}; remove or replace it") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high-bit greyscale scaled by its range, transparency composited on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(_grey_to_uint8(np.asarray(image), image.mode))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit and 32-bit integer greyscale divided by 257; float greyscale from 0..1, or min-max when it exceeds 1."""
    values = values.astype(np.float64)
    if mode == "F":
        values = np.nan_to_num(values)
        high, low = values.max(), values.min()
        scaled = values.clip(0, 1) * 255 if high <= 1 else (values - low) / ((high - low) or 1) * 255
    else:
        scaled = values.clip(0, 65535) / 257
    return np.round(scaled).astype(np.uint8)


def read_caption(image_path: Path, default: str) -> str:
    """The image's sidecar caption (same name, `.txt`), stripped; `default` when there is none or it is empty."""
    sidecar = Path(image_path).with_suffix(CAPTION_SUFFIX)
    if not sidecar.is_file():
        return default
    try:
        caption = sidecar.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KronaError(f"cannot read caption file '{sidecar}': {e}; save it as UTF-8 text or delete it") from e
    return caption or default


@dataclass(frozen=True)
class Example:
    """One training item: pixels in [-1, 1] (3, R, R), SDXL time ids (original h, w, crop y, x, target h, w)."""

    pixels: torch.Tensor
    time_ids: TimeIds
    caption: str
    source: Path


def prepare_image(image: Image.Image, size: int | tuple[int, int], center_crop: bool, random_flip: bool,
                  generator: torch.Generator) -> tuple[torch.Tensor, TimeIds]:
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

    def __init__(self, folder: str | Path, prompt: str, resolution: int, *, repeats: int = 1, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0, what: str = "instance", buckets: bool = False,
                 sizes: Sequence[tuple[int, int]] | None = None):
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
        pixels, time_ids = prepare_image(load_image(self.paths[image]), (bucket.height, bucket.width),
                                         self.center_crop, self.random_flip, generator)
        return Example(pixels, time_ids, self.captions[image], self.paths[image])
