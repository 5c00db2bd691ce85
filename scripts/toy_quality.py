"""Prompt following of the shipped toy pipelines: how often each asked attribute is drawn, on (colour, shape) pairs
seen in pretraining and on the held-out ones, at krona sample's defaults (Euler, 30 steps, guidance 7), and each
shape's share read back right. Prints a table and writes docs/toy_quality.json.

    python scripts/toy_quality.py [--count 128]
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
    args = parser.parse_args()
    results = {}
    for arch in ARCHS:
        pretraining = read_weights(weights_file(arch))[1]
        pipe = build_toy_pipeline(arch)
        pipe.set_progress_bar_config(disable=True)
        results[arch] = {"pretraining": pretraining}
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
    settings = {"count": args.count, "steps": 30, "guidance": 7.0, "scheduler": "euler", "torch": torch.__version__}
    Path(args.output).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
