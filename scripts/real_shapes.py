#!/usr/bin/env python
"""The real shapes once, on the CPU: a real-size SDXL with random weights goes through the user's whole path.

1. A random-weight SDXL base 1.0 (UNet, VAE, both text encoders and CLIP's real tokenizer, from the configs krona
   ships) is written as one single-file checkpoint in the original layout, with no krona metadata: what a user
   downloads from civitai, read back through the shipped configs.
2. `krona train --config sdxl` on it: both text encoders adapted, prior preservation (one class image given), --steps
   at 256 px, computing in --precision (fp32 by default: on a CPU without AVX512-BF16 a bf16 convolution runs about
   160x slower than fp32, measured here, so a bf16 step takes hours; the frozen weights load from the 16-bit file).
3. `krona sample` with the adapter, `krona merge --output` (a single-file checkpoint again, fp16), and `krona sample`
   from the merged file (fp32: the CPU's fast path; one denoising step, the shapes are what is checked).

Each command runs as a subprocess under /usr/bin/time: wall seconds and peak RSS per command; s/step and the
summary's memory estimate from train's output. Prints a table and writes JSON. Not part of CI (minutes, ~20 GB RAM).

    OMP_NUM_THREADS=2 python scripts/real_shapes.py --work /tmp/real-shapes --json docs/real_shapes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KRONA = [sys.executable, "-m", "krona_cli"]


def build_base(path: Path) -> None:
    """Random-weight SDXL from the shipped configs, created directly in bf16, saved as one original-layout file."""
    import diffusers
    import torch
    import transformers

    from krona_cli.formats.original_layout import save_single_file
    from krona_cli.pipeline.single_file import _shipped, _tokenizers

    description = _shipped("sdxl")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    parts = {}
    for name, (library, cls) in description["index"].items():
        config = dict(description["components"][name])
        if library == "transformers":
            parts[name] = getattr(transformers, cls)(transformers.CLIPTextConfig(**config))
        elif name != "scheduler":
            parts[name] = getattr(diffusers, cls).from_config(config)
    torch.set_default_dtype(torch.float32)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(description["components"]["scheduler"])
    pipe = diffusers.StableDiffusionXLPipeline(scheduler=scheduler, **parts, **_tokenizers(description))
    save_single_file(pipe, path, torch.bfloat16)


def run(name: str, args: list[str], cwd: Path, log: Path) -> dict:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "MAXRSS_KB %M", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"COLUMNS": "200"},
        )
    text = log.read_text()
    rss = re.findall(r"MAXRSS_KB (\d+)", text)
    result = {
        "command": name,
        "returncode": done.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_gib": round(int(rss[-1]) / 2**20, 2) if rss else None,
        "log": str(log),
    }
    if done.returncode:
        print(text[-3000:], file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/real-shapes"))
    parser.add_argument("--json", default="real_shapes.json")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="--mixed-precision of train")
    args = parser.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    base, run_dir = work / "sdxl-random.safetensors", work / "run"
    started = time.perf_counter()
    if not base.exists():
        build_base(base)
    build_s = round(time.perf_counter() - started, 1)
    size = f"{args.resolution}"
    classes = work / "class-images"
    classes.mkdir(exist_ok=True)
    (classes / "class-00000.jpg").write_bytes((ROOT / "examples" / "cat" / "cat-01.jpg").read_bytes())
    train = [
        *KRONA,
        "train",
        "--config",
        "sdxl",
        "--pretrained-model",
        str(base),
        "--instance-dir",
        str(ROOT / "examples" / "cat"),
        "--prompt",
        "a photo of sks cat",
        "--class-prompt",
        "a photo of a cat",
        "--num-class-images",
        "1",
        "--class-dir",
        str(classes),
        "--train-text-encoder",
        "--mixed-precision",
        args.precision,
        "--resolution",
        size,
        "--steps",
        str(args.steps),
        "--sample-steps",
        "1",
        "--sample-images",
        "1",
        "--checkpoint-every",
        "0",
        "--report-to",
        "none",
        "--no-buckets",
        "--output-dir",
        str(run_dir),
        "--overwrite",
    ]
    adapter = str(run_dir / "adapter.safetensors")
    sample = [
        "--prompt",
        "a photo of sks cat on the moon",
        "-n",
        "1",
        "--sample-steps",
        "1",
        "--width",
        size,
        "--height",
        size,
        "--dtype",
        "fp32",
    ]
    commands = [
        ("train", train),
        ("sample (adapter)", [*KRONA, "sample", "--adapter", adapter, *sample, "--output-dir", str(work / "s1")]),
        (
            "merge --output",
            [*KRONA, "merge", "--adapter", adapter, "--output", str(work / "merged.safetensors"), "--overwrite"],
        ),
        (
            "sample (merged file)",
            [
                *KRONA,
                "sample",
                "--pretrained-model",
                str(work / "merged.safetensors"),
                *sample,
                "--output-dir",
                str(work / "s2"),
            ],
        ),
    ]
    results = []
    for name, command in commands:
        results.append(run(name, command, work, work / f"{name.split()[0]}-{len(results)}.log"))
        if results[-1]["returncode"]:
            break
    train_log = Path(results[0]["log"]).read_text()
    estimate = re.search(r"memory \(estimate\)\s+(.+?)\s*$", train_log, re.M)
    # the progress bar's last state: "training ━━━ 2/2 loss ... 0:01:04 ETA" (steps done, time spent on them)
    bars = re.findall(r"training\D+(\d+)/\d+ .*? (\d+):(\d\d):(\d\d) ETA", train_log)
    steps, h, m, sec = map(int, bars[-1]) if bars else (0, 0, 0, 0)
    s_per_step = round((3600 * h + 60 * m + sec) / steps, 1) if steps else None
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS")},
        "base_file_gib": round(base.stat().st_size / 2**30, 2),
        "build_s": build_s,
        "arguments": vars(args) | {"work": str(work)},
        "summary_memory_estimate": estimate.group(1) if estimate else None,
        "train_s_per_step": s_per_step,
        "commands": results,
    }
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(
        f"base: {doc['base_file_gib']} GiB single file (built in {build_s} s); summary estimate: "
        f"{doc['summary_memory_estimate']}; train: {doc['train_s_per_step']} s/step"
    )
    print(f"{'command':24} {'rc':>3} {'wall s':>8} {'peak RSS GiB':>13}")
    for r in results:
        print(f"{r['command']:24} {r['returncode']:>3} {r['wall_s']:>8} {r['peak_rss_gib']!s:>13}")
    return 1 if any(r["returncode"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
