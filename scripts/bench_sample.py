#!/usr/bin/env python
"""Sampling time with an adapter merged into the weights against the base model alone (`krona sample`'s cost).

The issue's criterion: sampling with the adapter takes no more than 1.1x the time of sampling the base model. krona
bakes adapters into the weights before sampling (`sampling.prepare_pipeline`), so both pipelines run the same
operations on the same shapes and the ratio should be 1 up to noise.

Both pipelines are loaded once and kept; each timed round runs `sampling.generate` (what `krona sample` runs: the
diffusers pipeline, PNG encoding and the atomic writes) on each of them with the same prompt, seeds and settings,
in an order alternated from round to round so that drift hits both alike. Reported: the median over the timed rounds
of each (after --warmup untimed rounds), their ratio (the criterion), the median of the per-round ratios, and the
ratio of the fastest rounds (on a shared machine interference only ever adds time). The adapter's images are checked
to differ from the base's, so the adapter really is in the weights.

Default: a tiny SDXL pipeline (`krona make-tiny`) built in a temp dir, 128x128, 10 steps, with a random adapter
(factors --factors on the UNet's attention, B ~ N(0, 0.1)). On real models: --pretrained-model (a folder, a
.safetensors checkpoint or a hub id already in the cache) and --adapter FILE (else a random adapter is made for that
model), --device cuda, --dtype fp16, --width/--height (default there: the model's native size).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from krona_cli.dtypes import DTYPES  # noqa: E402
from krona_cli.formats import collect_adapter, save_adapter  # noqa: E402
from krona_cli.inference.sampling import SCHEDULERS, SampleConfig, generate, prepare_pipeline  # noqa: E402
from krona_cli.kron import adapted_layers, inject, remove  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_adapter(pretrained: str, path: Path, factors: str, device: str, dtype: str) -> Path:
    """A random adapter on the UNet's attention of `pretrained` (B ~ N(0, 0.1) so it changes the images)."""
    pipe, info = prepare_pipeline([], pretrained, device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inject(pipe.unet, factors=factors)
        for layer in adapted_layers(pipe.unet).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.1)
    adapter = collect_adapter(
        {"unet": pipe.unet}, base_model=pretrained, architecture=info.architecture, targets={"unet": "attn"}
    )
    remove(pipe.unet)
    del pipe
    adapter.training = {"note": "random adapter made by scripts/bench_sample.py"}
    save_adapter(path, adapter)
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import diffusers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu"]
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained-model", default=None, help="base model (default: a tiny SDXL built in a temp dir)")
    ap.add_argument("--adapter", default=None, help="adapter FILE[:SCALE] (default: a random one for the model)")
    ap.add_argument("--factors", default=None, help="factors of the random adapter (default: 4x4 tiny, 64x4 real)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on the CPU, fp16 on GPUs")
    ap.add_argument("--width", type=int, default=None, help="default: 128 for the tiny model, else native")
    ap.add_argument("--height", type=int, default=None, help="default: 128 for the tiny model, else native")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--scheduler", choices=SCHEDULERS, default="euler")
    ap.add_argument("--images", type=int, default=2, help="images per round (seeds 0..N-1, one prompt)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", default="bench_sample.json", help="where to write the results")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="krona-bench-sample-") as tmp:
        tmp = Path(tmp)
        tiny = args.pretrained_model is None
        if tiny:
            from krona_cli.pipeline.tiny import make_tiny

            pretrained = str(make_tiny(tmp / "tiny-sdxl", "sdxl"))
        else:
            pretrained = args.pretrained_model
        if args.adapter:
            from krona_cli.inference.merge import parse_adapter_spec

            adapter = parse_adapter_spec(args.adapter)
        else:
            args.factors = args.factors or ("4x4" if tiny else "64x4")
            path = random_adapter(pretrained, tmp / "adapter.safetensors", args.factors, args.device, dtype)
            adapter = (str(path), 1.0)
        width = args.width or (128 if tiny else None)
        height = args.height or (128 if tiny else None)
        config = SampleConfig(
            num_images=args.images,
            seed=0,
            steps=args.steps,
            guidance=args.guidance,
            scheduler=args.scheduler,
            width=width,
            height=height,
            batch_size=args.batch_size,
        )
        prompts = ["a photo of a dog on the beach"]
        pipes = {
            "base": prepare_pipeline([], pretrained, args.device, dtype),
            "adapter": prepare_pipeline([adapter], pretrained, args.device, dtype),
        }
        results, times = {}, {name: [] for name in pipes}
        order = list(pipes)
        for r in range(args.warmup + args.reps):
            for name in order if r % 2 == 0 else order[::-1]:
                pipe, info = pipes[name]
                _sync(args.device)
                t0 = time.perf_counter()
                results[name] = generate(pipe, config, prompts, info, tmp / name)
                _sync(args.device)
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        base_img = np.asarray(Image.open(results["base"].images[0]), dtype=np.float64) / 255
        adapted_img = np.asarray(Image.open(results["adapter"].images[0]), dtype=np.float64) / 255
        image_diff = float(np.abs(base_img - adapted_img).mean())
        if image_diff == 0:
            print("error: the adapter does not change the image; it is not in the weights", file=sys.stderr)
            return 1
        size = (results["base"].width, results["base"].height)
        layers = pipes["adapter"][1].layers_changed
        arch = pipes["base"][1].architecture

    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["adapter"] / med["base"]
    paired = statistics.median(a / b for a, b in zip(times["adapter"], times["base"]))
    fastest = min(times["adapter"]) / min(times["base"])  # on a shared machine interference only adds time
    machine = machine_info(args.device)
    print(
        f"krona sample: base vs adapter merged | {'tiny ' if tiny else ''}{arch} {pretrained if not tiny else ''}| "
        f"{size[0]}x{size[1]}, {args.steps} steps, {args.scheduler}, {args.images} images, batch {args.batch_size} | "
        f"{machine['device_name']} ({args.device}, {dtype}), torch {machine['torch']}, threads {machine['threads']}"
    )
    print(f"{'pipeline':<10} {'median s':>10} {'min s':>10} {'max s':>10} {'s/image':>10}")
    for name, t in times.items():
        print(f"{name:<10} {med[name]:>10.4f} {min(t):>10.4f} {max(t):>10.4f} {med[name] / args.images:>10.4f}")
    verdict = "PASS" if ratio <= 1.1 else "FAIL"
    print(
        f"ratio adapter/base: {ratio:.3f} (median of per-round ratios {paired:.3f}, of fastest rounds {fastest:.3f}); "
        f"criterion <= 1.1: {verdict} | "
        f"adapter layers baked: {layers}, mean |image difference| {image_diff:.4f}"
    )
    doc = {
        "benchmark": "bench_sample",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "pipeline": {
            "base_model": "tiny-sdxl (make-tiny)" if tiny else pretrained,
            "architecture": arch,
            "adapter": "random" if not args.adapter else args.adapter,
            "factors": args.factors,
            "layers_changed": layers,
            "dtype": dtype,
        },
        "settings": {
            "width": size[0],
            "height": size[1],
            "steps": args.steps,
            "guidance": args.guidance,
            "scheduler": args.scheduler,
            "images": args.images,
            "batch_size": args.batch_size,
            "reps": args.reps,
            "warmup": args.warmup,
        },
        "times_s": times,
        "median_s": med,
        "ratio": ratio,
        "paired_ratio_median": paired,
        "fastest_ratio": fastest,
        "criterion": "ratio <= 1.1",
        "pass": ratio <= 1.1,
        "image_mean_abs_diff": image_diff,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {args.json}")
    return 0 if ratio <= 1.1 else 2


if __name__ == "__main__":
    sys.exit(main())
