"""Image files: finding them in a folder (sorted; hidden files, sub-folders and captions left out; empty and unknown
files reported), reading any of them as RGB, and their captions. Light on purpose (PIL and numpy, no torch): commands
check their folders here before anything heavy loads."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import KronaError
from .paths import expand

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2 × Image.MAX_IMAGE_PIXELS)
CAPTION_SUFFIX = ".txt"


# Commands whose folder option is not spelled `--{what}-dir` (krona eval: --images, --reference).
_FLAGS = {"images": "--images", "reference": "--reference"}


def _flag(what: str, folder: Path) -> str:
    return f"{_FLAGS.get(what, f'--{what}-dir')} '{folder}'"


def scan_images(folder: str | Path, what: str = "instance", allow_empty: bool = False) -> tuple[list[Path], list[Path]]:
    """(images sorted by name, skipped files) of one folder; sub-folders, hidden files and captions are ignored.

    Skipped: files without an image suffix and empty files. A missing folder, or one with no usable image (unless
    `allow_empty`), is an error that names the `--{what}-dir` flag (and the files it skipped).
    """
    folder = expand(folder)
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
        raise KronaError(
            f"{flag} holds no images ({', '.join(IMAGE_SUFFIXES)}){found}; add photos there or point "
            "the flag at the folder that has them"
        )
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
        raise KronaError(
            f"{len(bad)} images cannot be used ({names}) in '{Path(bad[0][0]).parent}'; the first: {bad[0][1]}"
        )
    return sizes


def load_image(path: Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, EXIF orientation applied; a file that cannot be used is a KronaError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, or fine to load
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(
                        f"{image.width}×{image.height} pixels, over the {MAX_PIXELS:,}-pixel limit"
                    )
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
