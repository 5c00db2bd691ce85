"""Prompt following of the shipped toy pipelines: how often each asked attribute is drawn, on (colour, shape) pairs
seen in pretraining and on the held-out ones, at krona sample's defaults (the toy SDXL and SD 1.5: Euler, 30 steps,
guidance 7; the toy FLUX: flow-matching Euler, 28 steps, guidance 3.5), and each shape's share read back right.
Prints a table and writes docs/toy_quality.json (the archs measured replace theirs; the others are kept).

    python scripts/toy_quality.py [--count 128] [--arch flux]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from krona_cli import families
from krona_cli.evaluation.toy import draw, following_prompts
from krona_cli.pipeline.toy import ARCHS, build_toy_pipeline, read_weights, weights_file
from krona_cli.world.scenes import HELD_OUT, SHAPES, seen_pairs
from krona_cli.world.scorers import parse, score


def shape_rates(per_image: list[dict]) -> dict[str, float | None]:
    """Of the pictures asking for each shape, the share whose shape is read back as asked."""
    asked = [(parse(row["prompt"]).shape, row["read_shape"]) for row in per_image]
    rates = {}
    for shape in SHAPES:
        reads = [read for wanted, read in asked if wanted == shape]
        rates[shape] = sum(read == shape for read in reads) / len(reads) if reads else None
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=128, help="pictures per arch and set (seen, held out)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "toy_quality.json"))
    parser.add_argument("--arch", choices=ARCHS, action="append", help="measure only these (repeatable)")
    args = parser.parse_args()
    output = Path(args.output)
    kept = json.loads(output.read_text()) if output.is_file() else {"settings": {}, "results": {}}
    results = {}
    for arch in args.arch or ARCHS:
        pretraining = read_weights(weights_file(arch))[1]
        pipe = build_toy_pipeline(arch)
        pipe.set_progress_bar_config(disable=True)
        family = families.recognise_pipeline(pipe, type(pipe).__name__)
        defaults = family.sampler_defaults(pipe)
        sampler = {"steps": defaults.steps, "guidance": defaults.guidance, "scheduler": type(pipe.scheduler).__name__}
        results[arch] = {"pretraining": pretraining, "sampler": sampler}
        for name, pairs, seed in (("seen", seen_pairs(), 0), ("held_out", list(HELD_OUT), 10_000)):
            start = time.time()
            prompts = following_prompts(pairs, args.count, seed)
            scores = score(draw(pipe, prompts, seed=seed), prompts)
            results[arch][name] = {
                "background": scores.class_background,
                "colour": scores.class_colour,
                "shape": scores.class_shape,
                "shapes": shape_rates(scores.per_image),
                "pictures": scores.class_images,
                "seconds": round(time.time() - start, 1),
            }
    print(f"{'arch':6} {'set':9} {'background':>10} {'colour':>7} {'shape':>6} {'pictures':>8}  each shape")
    for arch, sets in results.items():
        for name in ("seen", "held_out"):
            r = sets[name]
            shapes = " ".join(f"{k} {'-' if v is None else f'{v:.0%}'}" for k, v in r["shapes"].items())
            print(
                f"{arch:6} {name:9} {r['background']:10.1%} {r['colour']:7.1%} {r['shape']:6.1%} {r['pictures']:8d}"
                f"  {shapes}"
            )
    old = kept["settings"]  # files before the toy FLUX held one sampler for all
    for sets in kept["results"].values():
        sets.setdefault("sampler", {"steps": old.get("steps"), "guidance": old.get("guidance"), "scheduler": "euler"})
    settings = {"count": args.count, "torch": torch.__version__}
    results = kept["results"] | results
    output.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(f"-> {output}")


if __name__ == "__main__":
    main()
