"""Where a toy pipeline loses an object's shape: world scenes are noised part of the way (img2img's strength: the
share of the sampling steps run again) and drawn again from their own caption, and from the same caption with
another shape word. Kept shape (the true caption) says up to which noise level the model keeps a shape it is shown;
the other shape word, from which noise level the caption sets the shape. Prints a table; writes
docs/toy_shape_probe.json (the archs probed replace theirs).

    python scripts/toy_shape_probe.py --arch flux [--count 24]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from krona_cli import families
from krona_cli.pipeline.toy import ARCHS, build_toy_pipeline, read_weights, weights_file
from krona_cli.world.scenes import SHAPES, SIZE, prompt, random_scene, render
from krona_cli.world.scorers import score

STRENGTHS = (0.3, 0.5, 0.7, 0.85, 1.0)


def noise_to_signal(scheduler) -> float | None:
    """The noise's scale over the picture's in the latents img2img starts from (the step it began at): comparable
    across the toy UNets' Euler (whose sigma is that ratio) and FLUX's flow matching (sigma / (1 - sigma); None at
    pure noise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigma = float(scheduler.sigmas[scheduler.begin_index])
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return sigma / (1 - sigma) if sigma < 1 else None
    return sigma


def scenes(count: int, seed: int):
    """``count`` world scenes, rendered (random_scene draws the (colour, shape) pairs pretraining shows)."""
    rng, found = np.random.default_rng(seed), []
    for _ in range(count):
        scene = random_scene(rng)
        found.append((scene, render(scene, rng)))
    return found


def redrawn(img2img, pictures, prompts, strength: float, defaults, extra: dict) -> list:
    """Each picture noised to ``strength`` and drawn again from its prompt, picture i from seed i, at the family's
    sampling defaults and call arguments (``extra``)."""
    from PIL import Image

    images = []
    for i, (picture, text) in enumerate(zip(pictures, prompts)):
        with torch.no_grad():
            images += img2img(
                prompt=text,
                image=Image.fromarray(picture),
                strength=strength,
                num_inference_steps=defaults.steps,
                guidance_scale=defaults.guidance,
                generator=torch.Generator("cpu").manual_seed(i),
                **extra,
            ).images
    return images


def probe(arch: str, count: int) -> dict:
    from diffusers import AutoPipelineForImage2Image

    pipe = build_toy_pipeline(arch)
    family = families.recognise_pipeline(pipe, type(pipe).__name__)
    defaults, extra = family.sampler_defaults(pipe), family.call_kwargs(pipe)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    if "height" in inspect.signature(img2img.__call__).parameters:  # FLUX's would resize the picture to 512 px
        extra |= {"height": SIZE, "width": SIZE}
    img2img.set_progress_bar_config(disable=True)
    shown = scenes(count, seed=5)
    pictures = [picture for _, picture in shown]
    true = [prompt(s.shape, s.colour, s.background) for s, _ in shown]
    other = [prompt(SHAPES[(SHAPES.index(s.shape) + 2) % len(SHAPES)], s.colour, s.background) for s, _ in shown]
    rows = []
    for strength in STRENGTHS:
        start = time.time()
        kept = score(redrawn(img2img, pictures, true, strength, defaults, extra), true)
        ratio = noise_to_signal(img2img.scheduler)
        moved = score(redrawn(img2img, pictures, other, strength, defaults, extra), other)
        rows.append(
            {
                "strength": strength,
                "noise_to_signal": ratio if ratio is None else round(ratio, 3),
                "kept_shape": kept.class_shape,
                "other_word_drawn": moved.class_shape,
                "kept_colour": kept.class_colour,
                "seconds": round(time.time() - start, 1),
            }
        )
        level = "pure noise" if ratio is None else f"{ratio:.2f}"
        print(
            f"{arch:5} {strength:8.2f} {level:>15} {kept.class_shape:10.0%} {moved.class_shape:16.0%} "
            f"{kept.class_colour:11.0%}",
            flush=True,
        )
    sampler = {"steps": defaults.steps, "guidance": defaults.guidance, "scheduler": type(pipe.scheduler).__name__}
    return {"pretraining": read_weights(weights_file(arch))[1], "sampler": sampler, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=24, help="scenes per strength")
    parser.add_argument("--output", default=str(ROOT / "docs" / "toy_shape_probe.json"))
    parser.add_argument("--arch", choices=ARCHS, action="append", help="probe only these (repeatable)")
    args = parser.parse_args()
    output = Path(args.output)
    kept = json.loads(output.read_text()) if output.is_file() else {"settings": {}, "results": {}}
    header = ("strength", "noise to signal", "kept shape", "other word drawn", "kept colour")
    print(f"{'arch':5} " + " ".join(f"{name:>{width}}" for name, width in zip(header, (8, 15, 10, 16, 11))))
    results = {arch: probe(arch, args.count) for arch in args.arch or ARCHS}
    kept["settings"] = {"count": args.count, "torch": torch.__version__}
    kept["results"] |= results
    output.write_text(json.dumps(kept, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
