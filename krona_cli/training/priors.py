"""Class images for prior preservation: generated with the base model when the class folder holds too few.

Generation is resumable: images already in the folder (made by an earlier, interrupted run or put there by the user)
are kept and counted, and only the missing ones are made. Image `class-NNNNN.png` is drawn from its own seed
(`rng.derive_seed("class-image", seed, NNNNN)`), so an interrupted and resumed generation makes the same images as
an uninterrupted one. Every file is written atomically, with its prompt and seed in the PNG metadata.

Library code: raises KronaError, never prints; progress is reported through a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import stopping
from ..atomic import write_bytes_atomic
from ..errors import KronaError
from ..images import scan_images
from ..inference.sampling import SampleConfig, image_metadata, png_bytes, render
from ..rng import derive_seed


def existing_class_images(class_dir: Path) -> list[Path]:
    """The images already in a class folder (none if it does not exist yet)."""
    return scan_images(class_dir, "class", allow_empty=True)[0] if class_dir.is_dir() else []


def missing_indices(class_dir: Path, wanted: int) -> list[int]:
    """The `class-NNNNN.png` indices still to generate so that the folder holds `wanted` images."""
    have = existing_class_images(class_dir)
    taken = {p.stem for p in have}
    free = (i for i in range(10**6) if f"class-{i:05d}" not in taken)
    return [next(free) for _ in range(max(0, wanted - len(have)))]


def generate_class_images(
    pipe,
    info,
    class_dir: str | Path,
    prompt: str,
    wanted: int,
    size_of: Callable[[int], tuple[int, int]],
    seed: int = 0,
    batch_size: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[Path]:
    """Fill `class_dir` up to `wanted` images of `prompt` made by `pipe`; return the new files. Image
    `class-NNNNN.png` is made at `size_of(NNNNN)` = (height, width) pixels.

    With several processes, process `rank` of `world` makes every world-th missing image (all of them must have
    listed the folder before any starts); the images are the same whatever the process count. `info` is the
    sampling.ModelInfo written into each PNG's metadata. `progress(done, total)` is called after every image.
    A stop request (`stopping`) is answered after the sampler step it comes in: `Stopped`, saying how many images
    the folder keeps (the same command makes the rest).
    """
    class_dir = Path(class_dir)
    todo = missing_indices(class_dir, wanted)[rank::world]
    if not todo:
        return []
    try:
        class_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KronaError(f"cannot create the class folder '{class_dir}': {e.strerror or e}; set --class-dir") from e
    written: list[Path] = []
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        by_size.setdefault(size_of(i), []).append(i)
    with stopping.deferred():
        try:
            for (height, width), indices in by_size.items():
                seeds = [derive_seed("class-image", seed, i) for i in indices]
                index_of = dict(zip(seeds, indices))
                config = SampleConfig(steps=steps, guidance=guidance, width=width, height=height, batch_size=batch_size)
                config = config.for_model(pipe, preview=True)
                meta = image_metadata(config, info, width, height)

                def write(_prompt_index: int, image_seed: int, image, index_of=index_of, meta=meta) -> None:
                    path = class_dir / f"class-{index_of[image_seed]:05d}.png"
                    write_bytes_atomic(path, png_bytes(image, {"prompt": prompt, "seed": str(image_seed), **meta}))
                    written.append(path)
                    if progress is not None:
                        progress(len(written), len(todo))

                render(pipe, config, [prompt], on_image=write, seeds=seeds)
        except stopping.StopRequest:
            raise stopping.Stopped(
                f"stopped by {stopping.signal_name()} while drawing class images: "
                f"{len(existing_class_images(class_dir))} of {wanted} are in '{class_dir}' and are kept; continue "
                f"with: {stopping.rerun()}"
            ) from None
    return written
