#!/usr/bin/env python
"""What validation costs a training run: the toy preset on the toy SDXL and the toy subject, once with validation off
(`--validate-every 0`, the preset's sample grids of the instance prompt) and once as the preset has it (the validation
loss and the toy scorer's scores of the sample grid at step 0, every 200 steps and at the end, the grid then showing
the subject on five new backgrounds; validation.json, validation.png, best/adapter.safetensors).

Both runs share one class-image folder filled before either is timed; each is timed from `train()` to its return, in
a fresh process, alternating the order over --rounds. Reported: each arm's median time and validation's share of the
validated run's (the issue's bar: <= 15%). Prints a table and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"off": {"validate_every": 0, "scorer": "none"}, "on": {}}  # "on": the toy preset as it is
CHILD = """
import json, sys, time
from krona_cli.training.config import load_config
from krona_cli.training.train import train
settings = json.loads(sys.argv[1])
cfg = load_config("toy", settings)
start = time.perf_counter()
result = train(cfg)
print(json.dumps({"seconds": time.perf_counter() - start, "validations": len(result.validation),
                  "best": None if result.best is None else result.best.step}))
"""


def run(settings: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "docs" / "bench_validation_cpu.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from krona_cli.pipeline.toy import make_toy

    with tempfile.TemporaryDirectory() as tmp:
        base = make_toy(Path(tmp) / "toy-sdxl", "sdxl")
        common = {
            "pretrained_model": str(base),
            "instance_dir": str(ROOT / "examples" / "toy-subject"),
            "prompt": "a photo of sks square",
            "class_prompt": "a photo of a square",
            "class_dir": str(Path(tmp) / "classes"),
        }
        run(common | {"steps": 1, "output_dir": str(Path(tmp) / "fill"), "validate_every": 0, "scorer": "none"})
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        last: dict[str, dict] = {}
        for r in range(args.rounds):
            for arm in ARMS if r % 2 == 0 else reversed(list(ARMS)):
                last[arm] = run(common | ARMS[arm] | {"output_dir": str(Path(tmp) / f"{arm}-{r}")})
                times[arm].append(last[arm]["seconds"])
    median = {arm: statistics.median(t) for arm, t in times.items()}
    share = (median["on"] - median["off"]) / median["on"]
    print("| run | median s | runs | validations | best step |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        row = [f"validation {arm}", f"{median[arm]:.1f}", len(times[arm]), last[arm]["validations"], last[arm]["best"]]
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"validation's share of the validated run: {share:.1%}")
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "times": times,
        "median": median,
        "share": share,
        "runs": last,
    }
    Path(args.output).write_text(json.dumps(record, indent=1))
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
