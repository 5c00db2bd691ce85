#!/usr/bin/env python
"""Training-step time of the real-size SDXL (or SD 1.5) UNet with krona's adapter paths against the frozen floor.

Builds the UNet from configs/models/ with random weights (no download), then times forward+backward of one
training step (batch 1, latents of --resolution/8) for:
  frozen           no adapter; gradients flow to the input latents only (the floor)
  krona-auto       KronLinear on every attention projection, path chosen per call (the default)
  krona-reshape    the reshape path forced everywhere (A ⊗ B never built)
  krona-merged     the merged path forced everywhere (F.linear with W + s·A⊗B)
Prints a table (median ms per step, extra over the floor, peak memory) and writes JSON.

    python scripts/bench_unet.py --device cuda --dtype bf16 --json bench_unet.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from krona_cli.kron import adapted_layers, inject
from krona_cli.models import build_component

from krona_cli.dtypes import DTYPES  # noqa: E402
VARIANTS = ("frozen", "krona-auto", "krona-reshape", "krona-merged")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_inputs(unet, resolution: int, device, dtype):
    latent = resolution // 8
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, latent, latent, device=device, dtype=dtype, requires_grad=True)
    text = torch.randn(1, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    kwargs = {"encoder_hidden_states": text}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=dtype),
        }
    return sample, torch.tensor([500], device=device), kwargs


def time_steps(unet, inputs, device, reps: int, warmup: int) -> tuple[float, float]:
    sample, timestep, kwargs = inputs
    params = [p for p in unet.parameters() if p.requires_grad]

    def step():
        out = unet(sample, timestep, **kwargs).sample
        out.float().square().mean().backward()
        sample.grad = None
        for p in params:
            p.grad = None

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sdxl", choices=["sdxl", "sd15"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--factors", default="64x4")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="bench_unet.json")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = build_component(args.arch, "unet", device=device).to(dtype)
    build_s = time.perf_counter() - t0
    unet.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    inputs = unet_inputs(unet, args.resolution, device, dtype)

    results = {}
    for variant in VARIANTS:
        if variant != "frozen" and not adapted_layers(unet):
            inject(unet, targets="attn", factors=args.factors)
            for layer in adapted_layers(unet).values():
                with torch.no_grad():
                    layer.kron_b.normal_(std=1e-3)
        for layer in adapted_layers(unet).values():
            layer.path = variant.removeprefix("krona-")
        ms, peak = time_steps(unet, inputs, device, args.reps, args.warmup)
        results[variant] = {"median_ms": ms, "peak_gib": peak}
    floor = results["frozen"]["median_ms"]
    for r in results.values():
        r["extra_ms"] = r["median_ms"] - floor
        r["ratio_to_floor"] = r["median_ms"] / floor

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{args.arch} UNet, {args.resolution}px, batch 1, {args.dtype}, factors {args.factors}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {device_name}")
    print(f"{'variant':<15} {'ms/step':>9} {'extra ms':>9} {'x floor':>8} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<15} {r['median_ms']:9.1f} {r['extra_ms']:9.1f} {r['ratio_to_floor']:8.3f} {r['peak_gib']:9.2f}")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "args": vars(args),
        "build_s": build_s,
        "results": results,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
