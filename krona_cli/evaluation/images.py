"""`krona eval`: the scores of a folder of generated images (CLIP-I, CLIP-T and DINO against the subject's photos and
the prompts, or the toy world's scores read from the pictures), written to a JSON file.

Everything a user can get wrong is checked before any scorer loads: the folders, the prompts, the scorer models, and
the output (its suffix, a writable place, and no file replaced but one `krona eval` wrote, and that only with
overwrite). Library code: raises KronaError, never prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import KronaError
from ..outputs import output_file
from .compare import METRICS

WRITTEN_BY = "krona eval"  # the mark of metrics files krona wrote (the only ones it replaces)


@dataclass
class ImageScores:
    title: str  # what was scored, in words
    columns: dict[str, float | None]  # each metric's title and value
    output: Path


def _check_output(output: Path, overwrite: bool) -> Path:
    path = output_file(output, "--output", ".json", overwrite)
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("written_by") == WRITTEN_BY
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise KronaError(f"--output '{output}' was not written by krona eval; choose another name")
    return path


def score_images(
    images: Path,
    reference: Path | None = None,
    scorer: str = "clip",
    prompts: list[str] | None = None,
    output: Path = Path("metrics.json"),
    identifier: str = "sks",
    clip_model: str = "openai/clip-vit-base-patch32",
    dino_model: str = "facebook/dino-vits16",
    batch_size: int = 16,
    overwrite: bool = False,
    loading: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImageScores:
    """Score the images of `images` (krona sample's grids left out) and write the metrics to `output`. `prompts`: one
    for every image, or one per image in file-name order; else each PNG's metadata. `loading()` is called before the
    scorer models load, `progress(done, total)` while they score."""
    from ..images import scan_images
    from ..scoring.metrics import is_sample_grid, read_prompt

    if scorer not in METRICS:
        raise KronaError(f"--scorer must be one of {', '.join(METRICS)}, not {scorer!r}")
    if scorer == "clip" and reference is None:
        raise KronaError("--scorer clip needs --reference, the folder of the subject's real photos")
    generated = [p for p in scan_images(images, "images")[0] if not is_sample_grid(p)]  # grids repeat the images
    if not generated:
        raise KronaError(f"--images '{images}' holds only sample grids; give the folder of the single images")
    photos = scan_images(reference, "reference")[0] if reference is not None else []
    if prompts is not None and len(prompts) not in (1, len(generated)):
        raise KronaError(f"{len(prompts)} prompts for {len(generated)} images; give one prompt, or one per image")
    output = _check_output(output, overwrite)
    if scorer == "clip":  # the scorer models are found (a folder, or a hub id cached or reachable) before any loads
        from ..pipeline.hub import model_source

        model_source(clip_model, "--clip-model", "CLIP")
        model_source(dino_model, "--dino-model", "DINO")
    prompts = prompts * len(generated) if prompts is not None and len(prompts) == 1 else prompts
    settings = {"images_dir": str(images), "reference_dir": None if reference is None else str(reference)}
    if scorer == "toy":
        from .toy import score_files

        metrics = score_files(generated, prompts or [read_prompt(p) for p in generated], identifier)
        result = metrics.to_dict() | settings | {"scorer": "toy"}
        title = f"{metrics.subject_images} pictures of the subject, {metrics.class_images} of its class"
    else:
        from ..scoring.metrics import Embedder, evaluate

        (loading or (lambda: None))()
        clip, dino = Embedder.clip(clip_model), Embedder.dino(dino_model)
        metrics = evaluate(
            generated,
            photos,
            prompts,
            identifier=identifier,
            clip=clip,
            dino=dino,
            batch_size=batch_size,
            progress=progress,
        )
        result = metrics.to_dict() | settings | {"clip_model": clip_model, "dino_model": dino_model}
        title = f"{metrics.generated} images against {metrics.reference} reference photos"
    from ..atomic import write_bytes_atomic

    result |= {"identifier": identifier, "written_by": WRITTEN_BY}
    write_bytes_atomic(output, json.dumps(result, indent=2).encode())
    return ImageScores(title, {name: getattr(metrics, key) for key, name in METRICS[scorer]}, output)
