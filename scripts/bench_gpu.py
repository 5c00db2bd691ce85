#!/usr/bin/env python
"""What an adapter costs inside a real-size SDXL training step, and what `krona train` costs per step.

Two parts (--part unet|train|all), both built from the public architecture configs in configs/models/ with random
weights, on the device, without any download:

unet   One training step (forward + backward, batch 1, latents of --resolution/8) of the SDXL UNet (or SD 1.5's,
       --arch sd15), with gradient checkpointing off and on (--gradient-checkpointing), for each variant:
         frozen         no adapter; gradients flow to the input latents only (the floor)
         krona          krona's KronLinear (path auto) on the attention projections (--targets attn)
         krona-compile  the same under torch.compile(unet); the first step (compilation) is reported apart, and
                        its ratio is to the floor timed again just before it (frozen-again): it runs last
         materialised   F.linear(x, W + s·kron(A, B)): KronLinear with path="merged" is exactly this
         peft-lokr      peft's LoKr Linear, w1 / w2 replaced by exactly A- and B-shaped matrices (bench_adapter.py)
         lycoris-lokr   LyCORIS' LokrModule (full matrices, default rebuild forward), w1 / w2 replaced the same way
         peft-lora-r4   peft's LoRA, rank 4
       and, only when named in --variants, krona-reshape (the reshape path forced everywhere, never A ⊗ B) and
       lycoris-lokr-bypass (LyCORIS' bypass forward: x -> w2 -> w1).
       Every variant gets a fresh adapter on the same layers of the same UNet, taken off again afterwards (the
       script checks the UNet is back to plain nn.Linear layers with nothing trainable), with A and B (LoRA's A and
       B) random and non-zero, so no path is skipped. Runs under torch.autocast in the dtype, as krona train does
       (--no-autocast: not). Reported: median ms per step after --warmup steps, the ratio to the floor, and on
       CUDA torch.cuda.max_memory_allocated over the timed steps (reset per variant; it counts the weights,
       adapters, activations and gradients; this part has no optimizer). The CPU has no allocator peak: there the
       script reports instead the peak allocated during one extra, untimed step above the level before it
       (activations, gradients, temporaries; not the weights), from torch.profiler's allocation records.

train  `krona train` itself (krona_cli.training.train.train): a random-weight SDXL pipeline (UNet, VAE, both text
       encoders from configs/models/, the tokenizer of krona_cli.pipeline.tiny) is saved once in the compute dtype to a
       temporary folder, then each run trains --train-steps steps on the photos of --instance-dir (default
       examples/cat/) at --resolution, batch 1, gradient checkpointing, prompt embeddings cached, square crops, no
       sample grids or checkpoints until the end, for cached latents on/off × --optimizer (adamw, adamw8bit), and each
       further --base-precision (int8, nf4) once with the first cache and optimizer setting. Reported: seconds per step
       (timestamps taken in Reporter.step, once per optimizer step; the first --train-warmup steps, model loading and
       latent caching excluded) and on CUDA the peak memory over the timed steps and over the whole run.

--width-scale s builds the same architecture (blocks, layers, transformer depth, head counts) at s times the width
(channels, head width, text width, time embedding, norm groups: s must be a multiple of 1/32), so a CPU can run it.
The default factors are 64x4 with the output side scaled by s (and both sides reduced to divisors of every adapted
layer if needed); the factors used are printed and recorded.

Both parts print tables and write one JSON file (date, device, versions, arguments, results), rewritten after every
measurement, so a run cut short keeps what it measured. A variant or run that fails is recorded with its error and
the script exits with status 1 at the end. --budget-s skips (and records as skipped) what would start after that
many seconds.

    python3 scripts/bench_gpu.py --base-precision bf16,int8,nf4 --budget-s 480 --json bench_gpu.json   # a GPU
    OMP_NUM_THREADS=1 python scripts/bench_gpu.py --device cpu --threads 1 --width-scale 0.25 --resolution 256 \
        --compile-backend aot_eager --train-steps 10                      # the CPU run of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: everything here is built from local configs

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_adapter import cpu_model, lycoris_lokr_layer, peft_lokr_layer, peft_lora_layer, pkg_version  # noqa: E402

from krona_cli import families  # noqa: E402
from krona_cli.architectures import load_model_config  # noqa: E402
from krona_cli.dtypes import DTYPES  # noqa: E402
from krona_cli.kron import Factors, adapted_layers, find_targets, inject, parse_factors, remove  # noqa: E402

UNET_VARIANTS = ("frozen", "krona", "krona-compile", "materialised", "peft-lokr", "lycoris-lokr", "peft-lora-r4")
# not run unless named in --variants: krona's reshape path forced everywhere, LyCORIS' bypass forward
EXTRA_VARIANTS = ("krona-reshape", "lycoris-lokr-bypass")
B_STD = 1e-3  # B (and the peers' w2) ~ N(0, B_STD²): non-zero, small beside random weights
PROMPT = "a photo of sks cat"


# ----------------------------------------------------------------------------------------------------------------------
# Architectures at a reduced width


def check_width_scale(s: float) -> None:
    if not 0 < s <= 1 or abs(32 * s - round(32 * s)) > 1e-9:
        raise SystemExit(f"--width-scale must be a multiple of 1/32 in (0, 1] (e.g. 1, 0.5, 0.25, 0.125); got {s}")


def _scale(n: int, s: float, what: str) -> int:
    v = n * s
    if abs(v - round(v)) > 1e-9 or round(v) < 1:
        raise SystemExit(f"--width-scale {s}: {what} {n} × {s} = {v:g} is not a whole number")
    return int(round(v))


def unet_config(arch: str, s: float) -> dict:
    """The UNet config of `arch` from configs/models/ at s times the width: channels, cross-attention (text) width,
    time embedding and norm groups scaled (channels per group kept), head counts (`attention_head_dim`, diffusers'
    legacy name for them) kept so heads get s times narrower, layers and transformer depth kept."""
    cfg = load_model_config(families.get(arch).component_configs()["unet"])
    if s == 1:
        return cfg
    cfg["block_out_channels"] = [_scale(c, s, "block_out_channels") for c in cfg["block_out_channels"]]
    cfg["norm_num_groups"] = _scale(cfg["norm_num_groups"], s, "norm_num_groups")
    cfg["cross_attention_dim"] = _scale(cfg["cross_attention_dim"], s, "cross_attention_dim")
    heads = cfg["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(cfg["block_out_channels"])
    for channels, n in zip(cfg["block_out_channels"], heads):
        if channels % n:
            raise SystemExit(f"--width-scale {s}: {channels} channels do not split into {n} heads")
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        cfg["addition_time_embed_dim"] = _scale(cfg["addition_time_embed_dim"], s, "addition_time_embed_dim")
        cfg["projection_class_embeddings_input_dim"] = (
            _scale(pooled, s, "pooled text width") + 6 * cfg["addition_time_embed_dim"]
        )
    return cfg


def text_encoder(component: str, s: float, tokenizer):
    """SDXL's text encoder `component` (CLIP ViT-L or OpenCLIP bigG with projection) at s times the width, its
    special-token ids those of `tokenizer` (CLIP pools at the first eos token)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = load_model_config(families.get("sdxl").component_configs()[component])
    cls = CLIPTextModelWithProjection if cfg.pop("architectures") == ["CLIPTextModelWithProjection"] else CLIPTextModel
    for key in ("hidden_size", "intermediate_size", "projection_dim"):
        cfg[key] = _scale(cfg[key], s, f"{component} {key}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise SystemExit(f"--width-scale {s}: {component} width {cfg['hidden_size']} does not split into heads")
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return cls(CLIPTextConfig(**cfg, **ids))


def vae_config(s: float) -> dict:
    cfg = load_model_config("sdxl_vae.json")
    cfg["block_out_channels"] = [_scale(c, s, "VAE block_out_channels") for c in cfg["block_out_channels"]]
    cfg["norm_num_groups"] = _scale(cfg["norm_num_groups"], s, "VAE norm_num_groups")
    return cfg


def build_unet(arch: str, s: float, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config(arch, s))
    return unet.to(dtype)


def pick_factors(unet: nn.Module, targets: str, requested: str | None, s: float) -> Factors:
    """--factors if given (it must divide every adapted layer), else 64x4 with the output side scaled by the width
    scale, each side lowered to the largest divisor of every adapted layer's size on that side."""
    layers = [unet.get_submodule(n) for n in find_targets(unet, targets)]
    outs, ins = {m.out_features for m in layers}, {m.in_features for m in layers}
    if requested:
        f = parse_factors(requested)
        bad = sorted(
            {(m.out_features, m.in_features) for m in layers if m.out_features % f.a_out or m.in_features % f.a_in}
        )
        if bad:
            raise SystemExit(f"--factors {f} do not divide the adapted layers {bad[:4]} (out x in)")
        return f
    g_out, g_in = math.gcd(*outs), math.gcd(*ins)
    a_out = max(d for d in range(1, max(1, round(64 * s)) + 1) if g_out % d == 0)
    a_in = max(d for d in range(1, 5) if g_in % d == 0)
    return parse_factors(f"{a_out}x{a_in}")


# ----------------------------------------------------------------------------------------------------------------------
# Adapters on the UNet, each removable


@dataclass
class Attached:
    params: list
    layers: int
    detach: Callable[[], None]
    info: dict = dataclasses.field(default_factory=dict)


def attach_krona(unet: nn.Module, targets: str, factors: Factors, path: str, seed: int) -> Attached:
    names = inject(unet, targets=targets, factors=factors, strict_factors=True, path=path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(unet).values():
            layer.kron_b.copy_(torch.randn(layer.kron_b.shape, generator=gen) * B_STD)
    params = [p for p in unet.parameters() if p.requires_grad]
    return Attached(params, len(names), lambda: remove(unet), {"path": path})


def attach_wrapped(unet: nn.Module, targets: str, factors: Factors, wrap, seed: int) -> Attached:
    """Replace each targeted nn.Linear with wrap(base, A, B) -> (module, params); detach puts the bases back."""
    gen = torch.Generator().manual_seed(seed)
    bases, params = {}, []
    try:
        for name in find_targets(unet, targets):
            base = unet.get_submodule(name)
            b_out, b_in = factors.b_shape(base.out_features, base.in_features)
            a = torch.randn(factors.a_out, factors.a_in, generator=gen) / factors.a_out
            b = torch.randn(b_out, b_in, generator=gen) * B_STD
            module, ps = wrap(base, a, b)
            unet.set_submodule(name, module)
            bases[name] = base
            params += ps
    except BaseException:
        for name, base in bases.items():
            unet.set_submodule(name, base)
        raise

    def detach():
        for name, base in bases.items():
            unet.set_submodule(name, base)

    return Attached(params, len(bases), detach)


def make_attach(variant: str, targets: str, factors: Factors, seed: int) -> Callable[[nn.Module], Attached | None]:
    if variant in ("frozen", "frozen-again"):
        return lambda unet: None
    if variant in ("krona", "krona-compile"):
        return lambda unet: attach_krona(unet, targets, factors, "auto", seed)
    if variant in ("materialised", "krona-reshape"):
        path = "merged" if variant == "materialised" else "reshape"
        return lambda unet: attach_krona(unet, targets, factors, path, seed)
    wraps = {
        "peft-lokr": lambda base, a, b: peft_lokr_layer(base, a, b)[:2],
        "lycoris-lokr": lambda base, a, b: lycoris_lokr_layer(base, a, b, bypass=False)[:2],
        "lycoris-lokr-bypass": lambda base, a, b: lycoris_lokr_layer(base, a, b, bypass=True)[:2],
        "peft-lora-r4": lambda base, a, b: peft_lora_layer(base, rank=4, seed=seed),
    }
    return lambda unet: attach_wrapped(unet, targets, factors, wraps[variant], seed)


def check_plain(unet: nn.Module, targets: str, expected: int) -> None:
    """The UNet is back to its frozen self: the targeted layers plain nn.Linear, nothing trainable."""
    names = find_targets(unet, targets)
    odd = [n for n in names if type(unet.get_submodule(n)) is not nn.Linear]
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if len(names) != expected or odd or trainable:
        raise RuntimeError(
            f"the UNet was not restored after a variant: {len(names)} of {expected} target layers, "
            f"not plain: {odd[:3]}, trainable: {trainable[:3]}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profiled_peak_gib(step: Callable[[], object]) -> float:
    """Peak of the memory allocated during one call of `step` above the level before it, in GiB, from
    torch.profiler's record of every CPU allocation and free (size and time), summed in time order. Checked against
    the resident size of a process whose C allocator was told to return every block of 64 KiB or more at once
    (mallopt): the same peak to 0.1 MiB for an 8-block MLP with and without checkpointing. (The resident size of a
    normal process cannot be used: the C allocator keeps freed memory, and it did not rise at all during a step in
    a trial run.)"""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_muted(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:  # every allocation and free as it happened
        changes = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # another torch: each op's net allocation (at its start if positive, else at its end)
        changes = []
        for e in prof.events():
            delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            if delta:
                changes.append((e.time_range.start if delta > 0 else e.time_range.end, delta))
    current = peak = 0
    for _, delta in sorted(changes):
        current += delta
        peak = max(peak, current)
    return peak / 2**30


@contextlib.contextmanager
def _stderr_muted():
    """The profiler's C++ side writes start / stop lines to stderr (file descriptor 2): silence them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def unet_inputs(unet, resolution: int, device, dtype):
    latent = resolution // 8
    cfg = unet.config
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, cfg.in_channels, latent, latent, generator=gen).to(device, dtype).requires_grad_(True)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    kwargs = {"encoder_hidden_states": text}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen).to(device, dtype),
            "time_ids": torch.tensor(
                [[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=dtype
            ),
        }
    return sample, torch.tensor([500], device=device), kwargs


def time_unet(model, inputs, params, device, warmup: int, reps: int, autocast_dtype, cpu_memory: bool) -> dict:
    """Median ms per training step over `reps` after `warmup` steps (the first step's time reported apart)."""
    sample, timestep, kwargs = inputs

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(sample, timestep, **kwargs).sample
        loss = out.float().square().mean()
        loss.backward()
        sample.grad = None
        for p in params:
            p.grad = None
        return loss

    first_s = None
    for i in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        if i == 0:
            first_s = time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {float(loss)}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "times_ms": [round(t, 3) for t in times],
        "first_step_s": first_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }
    if cpu_memory and device.type == "cpu":
        out["cpu_step_peak_gib"] = profiled_peak_gib(step)
    return out


def krona_paths(unet, inputs, autocast_dtype) -> dict[str, int]:
    """How many KronLinear layers take each path (reshape / merged) in one forward, untimed, without gradients."""
    sample, timestep, kwargs = inputs
    counts: dict[str, int] = {}

    def hook(layer, args):
        x = args[0]
        elem = torch.empty((), dtype=layer._compute_dtype(x)).element_size()
        path = layer.resolved_path(x.numel() // x.shape[-1], x.device.type, elem)
        counts[path] = counts.get(path, 0) + 1

    handles = [layer.register_forward_pre_hook(hook) for layer in adapted_layers(unet).values()]
    try:
        with (
            torch.no_grad(),
            torch.autocast(sample.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
        ):
            unet(sample.detach(), timestep, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counts


# ----------------------------------------------------------------------------------------------------------------------
# Output


def versions() -> dict:
    names = ("torch", "diffusers", "transformers", "accelerate", "peft", "lycoris-lora", "bitsandbytes")
    out = {"python": platform.python_version()} | {n: pkg_version(n) for n in names}
    out["cuda"] = torch.version.cuda
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads)"


def _plain(value):
    """`value` with NaN / inf as null, so that the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(_plain(doc), fh, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.{digits}f}"


def unet_table(part: dict) -> str:
    """One row per variant; per GC setting: ms/step, × floor and a memory column (CUDA: peak allocated over the
    timed steps; CPU: the profiled step's peak above its start)."""
    gcs = list(part["results"])
    cpu = any("cpu_step_peak_gib" in r for g in gcs for r in part["results"][g].values())
    if cpu:
        mem_key, mem_label, mem_digits = "cpu_step_peak_gib", "CPU step peak GiB", 3
    else:
        mem_key, mem_label, mem_digits = "peak_gib", "peak GiB", 2
    head = ["variant"]
    for g in gcs:
        label = "" if len(gcs) == 1 else f" (GC {g})"
        head += [f"ms/step{label}", f"× floor{label}", f"{mem_label}{label}"]
    rows = [head, ["---"] * len(head)]
    for v in part["variants"]:
        row = [v]
        for g in gcs:
            r = part["results"][g].get(v, {})
            if "median_ms" not in r:
                row += ["skipped" if r.get("skipped") else ("FAILED" if r.get("error") else "-"), "", ""]
            else:
                row += [fmt(r["median_ms"]), fmt(r.get("ratio_to_floor"), 3), fmt(r.get(mem_key), mem_digits)]
        rows.append(row)
    return _markdown(rows)


def train_table(part: dict) -> str:
    """One row per run; the peak-memory columns only where there is a CUDA peak."""
    done = [r for r in part["runs"] if "s_per_step_median" in r]
    cuda = any(isinstance(r.get("peak_gib_steps"), float) and math.isfinite(r["peak_gib_steps"]) for r in done)
    head = ["base", "latents", "optimizer", "s/step (median)", "s/step (mean)"]
    head += ["peak GiB (steps)", "peak GiB (run)"] if cuda else []
    head += ["load s", "cache + warm-up s", "run s"]
    rows = [head, ["---"] * len(head)]
    for r in part["runs"]:
        row = [r["base_precision"], "cached" if r["cache_latents"] else "encoded per step", r["optimizer"]]
        if "s_per_step_median" not in r:
            why = "skipped: " + r["skipped"] if r.get("skipped") else "FAILED: " + str(r.get("error", ""))[:60]
            rows.append(row + [why] + [""] * (len(head) - 4))
            continue
        row += [fmt(r["s_per_step_median"], 3), fmt(r["s_per_step_mean"], 3)]
        row += [fmt(r["peak_gib_steps"], 2), fmt(r["peak_gib_run"], 2)] if cuda else []
        row += [fmt(r["load_s"]), fmt(r["cache_and_warmup_s"]), fmt(r["run_s"])]
        rows.append(row)
    return _markdown(rows)


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "| " + " | ".join(("-" * widths[i]) if c == "---" else c.ljust(widths[i]) for i, c in enumerate(r)) + " |"
        for r in rows
    )


def quiet_libraries() -> None:
    """No loading / saving progress bars or cast notices from diffusers and transformers in the output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    # dynamo notes that it traces through lru_cache-wrapped helpers (diffusers', krona's choose_path): expected
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def out(self) -> bool:
        return self.seconds > 0 and time.perf_counter() - self.start > self.seconds


# ----------------------------------------------------------------------------------------------------------------------
# Part 1: the UNet training step


def run_unet_part(
    args, device, dtype, doc: dict, save: Callable[[], None], budget: Budget, phase: str, held: dict
) -> int:
    """Time the UNet variants of one phase: `eager` (every variant but krona-compile, for every GC setting) or
    `compile` (krona-compile for every GC setting). The UNet is built once: between the phases (while krona train
    runs) it waits in `held`, in CPU memory."""
    autocast_dtype = dtype if args.autocast and dtype != torch.float32 else None
    variants = [v for v in UNET_VARIANTS + EXTRA_VARIANTS if v in args.variants]
    gcs = args.gradient_checkpointing
    if phase == "eager":
        order = [(g, v) for g in gcs for v in variants if v != "krona-compile"]
    else:
        # the floor again just before it: the compiled variant runs minutes after the others (after krona train),
        # and a shared machine's speed drifts by more than the differences measured
        order = [(g, v) for g in gcs if "krona-compile" in variants for v in ("frozen-again", "krona-compile")]
    if not order:
        return 0
    t0 = time.perf_counter()
    how = "moved back" if "unet" in held else "built"
    if "unet" in held:
        unet = held.pop("unet").to(device)
    else:
        unet = build_unet(args.arch, args.width_scale, device, dtype)
        unet.requires_grad_(False)
        unet.train()
    build_s = time.perf_counter() - t0
    factors = pick_factors(unet, args.targets, args.factors, args.width_scale)
    n_targets = len(find_targets(unet, args.targets))
    inputs = unet_inputs(unet, args.resolution, device, dtype)
    if "unet" not in doc:
        doc["unet"] = {
            "arch": args.arch,
            "width_scale": args.width_scale,
            "unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "resolution": args.resolution,
            "latent": [inputs[0].shape[-2], inputs[0].shape[-1]],
            "dtype": args.dtype,
            "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
            "factors": str(factors),
            "targets": args.targets,
            "adapted_layers": n_targets,
            "warmup": args.warmup,
            "reps": args.reps,
            "build_s": {},
            "variants": variants,
            "results": {g: {} for g in gcs},
        }
    part = doc["unet"]
    part["build_s"][phase] = build_s
    if phase == "compile" and "frozen-again" not in part["variants"]:
        part["variants"].insert(part["variants"].index("krona-compile"), "frozen-again")
    print(
        f"{args.arch} UNet ×{args.width_scale:g} width ({part['unet_params'] / 1e6:.1f} M parameters), "
        f"{args.resolution} px (latents {part['latent'][0]}×{part['latent'][1]}), batch 1, {args.dtype}"
        f"{', autocast ' + part['autocast'] if autocast_dtype else ''}, factors {factors} on {n_targets} "
        f"'{args.targets}' layers, {how} in {build_s:.1f}s ({phase} variants)",
        flush=True,
    )
    failures = 0
    for g, variant in order:
        res = part["results"][g]
        if budget.out():
            res[variant] = {"skipped": "time budget (--budget-s) spent"}
            continue
        if g == "on":
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        attached = None
        t_build = time.perf_counter()
        try:
            attached = make_attach(variant, args.targets, factors, seed=2)(unet)
            params = attached.params if attached else []
            model = unet
            if variant == "krona-compile":
                model = torch.compile(unet, backend=args.compile_backend)
            build_adapter_s = time.perf_counter() - t_build
            r = time_unet(model, inputs, params, device, args.warmup, args.reps, autocast_dtype, args.cpu_memory)
            r["adapter_build_s"] = build_adapter_s
            r["trainable_params"] = sum(p.numel() for p in params)
            r["adapted_layers"] = attached.layers if attached else 0
            if variant == "krona-compile":
                r["compile_s"] = r["first_step_s"] - r["median_ms"] / 1e3
                r["compile_backend"] = args.compile_backend
            if variant in ("krona", "materialised", "krona-reshape"):
                r["krona_paths"] = krona_paths(unet, inputs, autocast_dtype)
        except Exception as e:  # recorded, the other variants still run; the exit status says it failed
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
            failures += 1
        finally:
            if attached is not None:
                attached.detach()
            if variant == "krona-compile":
                torch._dynamo.reset()
            release(device)
        try:
            check_plain(unet, args.targets, n_targets)
        except RuntimeError as e:
            r = {"error": str(e)}
            failures += 1
            res[variant] = r
            save()
            break
        res[variant] = r
        first_floor = res.get("frozen", {}).get("median_ms")
        for name, v in res.items():
            # krona-compile against the floor timed just before it (frozen-again), the others against the first one
            floor = res.get("frozen-again", {}).get("median_ms") if name == "krona-compile" else first_floor
            if floor and "median_ms" in v:
                v["ratio_to_floor"] = v["median_ms"] / floor
            if name in ("krona-compile", "frozen-again") and first_floor and "median_ms" in v:
                v["ratio_to_first_floor"] = v["median_ms"] / first_floor
        shown = (
            "skipped"
            if "skipped" in r
            else (
                f"FAILED {r['error']}"
                if "error" in r
                else f"{r['median_ms']:.1f} ms/step, "
                + (
                    f"peak {fmt(r['peak_gib'], 2)} GiB"
                    if device.type == "cuda"
                    else f"step peak {fmt(r.get('cpu_step_peak_gib'), 3)} GiB"
                )
                + (f", compile {r['compile_s']:.1f}s" if "compile_s" in r else "")
            )
        )
        print(f"  GC {g:<3} {variant:<14} {shown}", flush=True)
        save()
    # the trainable counts must agree: the LoKr peers have exactly krona's factors on exactly its layers
    same = (
        "krona",
        "krona-compile",
        "materialised",
        "krona-reshape",
        "peft-lokr",
        "lycoris-lokr",
        "lycoris-lokr-bypass",
    )
    for g in gcs:
        counts = {
            v: part["results"][g][v].get("trainable_params")
            for v in same
            if (v == "krona" or (g, v) in order) and "trainable_params" in part["results"][g].get(v, {})
        }
        if len(set(counts.values())) > 1:
            print(f"  MISMATCH: adapter parameter counts differ (GC {g}): {counts}")
            part.setdefault("errors", []).append(f"parameter counts differ: {counts}")
            failures += 1
    if phase == "eager" and "krona-compile" in variants:
        held["unet"] = unet.to("cpu")
    del unet, inputs
    release(device)
    return failures


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: krona train


def save_pipeline(
    folder: Path, s: float, device: torch.device, dtype: torch.dtype, targets: str, factors: str | None, seed: int = 0
) -> tuple[dict, Factors]:
    """A random-weight SDXL pipeline at s times the width, saved in `dtype`; returns the parameter counts and the
    factors to train with (`pick_factors` on its UNet, as part 1 picks them)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from krona_cli.pipeline.tiny import _scheduler, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        parts = {
            "unet": UNet2DConditionModel.from_config(unet_config("sdxl", s)),
            "vae": AutoencoderKL.from_config(vae_config(s)),
            "text_encoder": text_encoder("text_encoder", s, tokenizer),
            "text_encoder_2": text_encoder("text_encoder_2", s, tokenizer),
        }
    for m in parts.values():
        m.to(dtype)
    pipe = StableDiffusionXLPipeline(
        **parts, tokenizer=tokenizer, tokenizer_2=build_tokenizer(), scheduler=_scheduler(), add_watermarker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    factors = pick_factors(parts["unet"], targets, factors, s)
    del pipe, parts
    release(device)
    return counts, factors


def step_clock_class():
    from krona_cli.training.train import Reporter

    class StepClock(Reporter):
        """Timestamps of every optimizer step (Reporter.step), the start of training, warnings; the CUDA peak
        memory is reset after the warm-up steps and read at the last step."""

        def __init__(self, device: torch.device, warmup: int):
            self.device, self.warmup = device, warmup
            self.started = None
            self.stamps: list[float] = []
            self.losses: list[float] = []
            self.warnings: list[str] = []
            self.summary: list = []
            self.peak_steps = float("nan")

        def start(self, summary):
            self.started = time.perf_counter()
            self.summary = summary

        def warn(self, message):
            self.warnings.append(message)

        def step(self, step, total, loss, lr):
            sync(self.device)
            self.stamps.append(time.perf_counter())
            self.losses.append(loss)
            if self.device.type == "cuda":
                if len(self.stamps) == self.warmup:
                    torch.cuda.reset_peak_memory_stats(self.device)
                if step == total:
                    self.peak_steps = torch.cuda.max_memory_allocated(self.device) / 2**30

    return StepClock


def run_train_part(
    args, device, dtype, doc: dict, save: Callable[[], None], budget: Budget, phase: str, held: dict
) -> int:
    """`krona train` runs of one phase: `grid` (cached latents × optimizers at the first base precision) or
    `extra` (each further base precision, cached latents and the first optimizer). The pipeline is saved once, in
    the grid phase, and removed after the extra phase."""
    from krona_cli.training.config import TrainConfig, load_config
    from krona_cli.training.train import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    compute = "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[compute]
    precisions = args.base_precision or [compute]
    if phase == "grid":
        runs = [(precisions[0], c, o) for c in args.cache_latents for o in args.optimizer]
    else:
        runs = [(p, args.cache_latents[0], args.optimizer[0]) for p in precisions[1:]]
    if "train_work" not in held:
        if not runs:
            return 0
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_gpu_"))
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        counts, factors = save_pipeline(
            work / "sdxl-random", args.width_scale, device, dtype, args.targets, args.factors
        )
        save_s = time.perf_counter() - t0
        held["train_work"], held["train_factors"] = work, factors
        doc["train"] = {
            "width_scale": args.width_scale,
            "params": counts,
            "factors": str(factors),
            "targets": args.targets,
            "saved_dtype": compute,
            "pipeline_build_and_save_s": save_s,
            "instance_dir": str(args.instance_dir),
            "resolution": args.resolution,
            "steps": args.train_steps,
            "warmup_steps": args.train_warmup,
            "mixed_precision": mixed,
            "settings": "batch 1, gradient checkpointing, prompt embeddings cached, square crops, sample grid "
            "(1 image, 1 step) and checkpoint at the end only, report-to none",
            "runs": [],
        }
        print(
            f"\nkrona train: SDXL ×{args.width_scale:g} width ({sum(counts.values()) / 1e6:.1f} M parameters), "
            f"saved in {compute} in {save_s:.1f}s; {args.resolution} px, {args.train_steps} steps per run "
            f"({args.train_warmup} warm-up), mixed precision {mixed}, factors {factors}",
            flush=True,
        )
    work, factors = held["train_work"], held["train_factors"]
    folder = work / "sdxl-random"
    part = doc["train"]
    if phase == "extra" and runs:
        print(f"krona train, further base precisions: {', '.join(p for p, _, _ in runs)}", flush=True)
    StepClock = step_clock_class()
    failures = 0
    for precision, cache, optimizer in runs:
        i = len(part["runs"])
        r = {"base_precision": precision, "cache_latents": cache, "optimizer": optimizer}
        part["runs"].append(r)
        if budget.out():
            r["skipped"] = "time budget (--budget-s) spent"
            save()
            continue
        overrides = dict(
            pretrained_model=str(folder),
            instance_dir=str(args.instance_dir),
            prompt=PROMPT,
            resolution=args.resolution,
            steps=args.train_steps,
            batch_size=1,
            mixed_precision=mixed,
            gradient_checkpointing=True,
            cache_latents=cache,
            optimizer=optimizer,
            output_dir=str(work / f"run-{i}"),
            checkpoint_every=0,
            sample_every=0,
            sample_images=1,
            sample_steps=1,
            sample_guidance=0.0,
            report_to="none",
            overwrite=True,
            seed=0,
            factors=str(factors),
            targets=args.targets,
        )
        if "buckets" in fields:
            overrides["buckets"] = False  # every step the same 1024×1024 size
        if precision != compute:
            if "base_precision" not in fields:
                r["skipped"] = "this krona has no TrainConfig.base_precision"
                print(f"  {precision:<5} skipped: {r['skipped']}")
                save()
                continue
            overrides["base_precision"] = precision
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            r["allocated_gib_before"] = torch.cuda.memory_allocated(device) / 2**30
        clock = StepClock(device, args.train_warmup)
        t_call = time.perf_counter()
        try:
            cfg = load_config(None, overrides)
            result = train(cfg, clock)
            t_end = time.perf_counter()
            intervals = [
                b - a for a, b in zip(clock.stamps[args.train_warmup - 1 :], clock.stamps[args.train_warmup :])
            ]
            if len(clock.stamps) != args.train_steps or not intervals:
                raise RuntimeError(f"{len(clock.stamps)} step reports for {args.train_steps} steps")
            r |= {
                "s_per_step_median": statistics.median(intervals),
                "s_per_step_mean": statistics.fmean(intervals),
                "s_per_step_min": min(intervals),
                "step_s": [round(x, 4) for x in intervals],
                "load_s": clock.started - t_call,
                "cache_and_warmup_s": clock.stamps[args.train_warmup - 1] - clock.started,
                "after_last_step_s": t_end - clock.stamps[-1],
                "run_s": t_end - t_call,
                "peak_gib_steps": clock.peak_steps,
                "peak_gib_run": (
                    torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                ),
                "losses": clock.losses,
                "bad_steps": result.bad_steps,
                "warnings": clock.warnings,
                "summary": clock.summary,
            }
            if not all(math.isfinite(x) for x in clock.losses):
                raise RuntimeError(f"non-finite losses: {clock.losses}")
            print(
                f"  {precision:<5} {'cached' if cache else 'encoded':<8} {optimizer:<10} "
                f"{r['s_per_step_median']:.3f} s/step, peak {fmt(r['peak_gib_steps'], 2)} GiB "
                f"(load {r['load_s']:.1f}s, run {r['run_s']:.1f}s)",
                flush=True,
            )
        except Exception as e:
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"
            failures += 1
            print(f"  {precision:<5} {'cached' if cache else 'encoded':<8} {optimizer:<10} FAILED {r['error']}")
        finally:
            shutil.rmtree(work / f"run-{i}", ignore_errors=True)
            release(device)
        save()
    if phase == "extra":
        held.pop("train_work")
        if not args.keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return failures


# ----------------------------------------------------------------------------------------------------------------------


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(choices)}")
        return items

    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("unet", "train", "all"), default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--resolution", type=int, default=1024, help="pixels (latents are resolution/8); default 1024")
    ap.add_argument(
        "--width-scale",
        type=float,
        default=1.0,
        help="build the architecture at this fraction of its width (a multiple of 1/32); default 1 (real size)",
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    ap.add_argument(
        "--factors",
        default=None,
        help="A's shape OxI, both parts; default 64x4 with the output side "
        "× the width scale (lowered to divide every adapted layer)",
    )
    ap.add_argument("--targets", default="attn", help="adapted layers, both parts (krona's presets or a regex)")
    ap.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flush subnormal floats to zero (default: on on the CPU)",
    )
    ap.add_argument("--json", default="bench_gpu.json")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="skip what would start after this many seconds (recorded as skipped); 0: no limit",
    )
    g1 = ap.add_argument_group("part 1: UNet training step")
    g1.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    g1.add_argument(
        "--variants",
        type=_list(UNET_VARIANTS + EXTRA_VARIANTS),
        default=list(UNET_VARIANTS),
        help=f"comma-separated list; default {','.join(UNET_VARIANTS)}; also: {','.join(EXTRA_VARIANTS)}",
    )
    g1.add_argument(
        "--gradient-checkpointing", type=_list(("off", "on")), default=["off", "on"], help="off,on (default), off or on"
    )
    g1.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (≥ 1: the first is the compile)")
    g1.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    g1.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run under torch.autocast in the dtype, as krona train does (no effect in fp32)",
    )
    g1.add_argument("--compile-backend", default="inductor", help="torch.compile backend of krona-compile")
    g1.add_argument(
        "--cpu-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, one more untimed, profiled step per variant measuring its peak allocation",
    )
    g2 = ap.add_argument_group("part 2: krona train")
    g2.add_argument("--instance-dir", default=str(ROOT / "examples" / "cat"))
    g2.add_argument("--train-steps", type=int, default=30)
    g2.add_argument("--train-warmup", type=int, default=2, help="steps not timed at the start of each run (≥ 1)")
    g2.add_argument("--cache-latents", type=_list(("on", "off")), default=["on", "off"])
    g2.add_argument("--optimizer", type=_list(("adamw", "adamw8bit")), default=["adamw", "adamw8bit"])
    g2.add_argument(
        "--base-precision",
        type=_list(("fp32", "fp16", "bf16", "int8", "nf4")),
        default=None,
        help="frozen-UNet precisions, e.g. bf16,int8,nf4: the first crossed with --cache-latents × "
        "--optimizer, each further one run once at their first values; default: the compute dtype",
    )
    g2.add_argument("--work-dir", default=None, help="where the pipeline and runs go (default: a new temp folder)")
    g2.add_argument("--keep-work-dir", action="store_true")
    args = ap.parse_args(argv)

    check_width_scale(args.width_scale)
    if args.resolution % 32:
        raise SystemExit("--resolution must be a multiple of 32 (the VAE's 8× and the UNet's two 2× downsamplings)")
    if args.warmup < 1 or args.reps < 1 or args.train_warmup < 1 or args.train_steps <= args.train_warmup:
        raise SystemExit("need --warmup ≥ 1, --reps ≥ 1 and --train-steps > --train-warmup ≥ 1")
    args.cache_latents = [c == "on" for c in args.cache_latents]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.flush_denormal is None:
        args.flush_denormal = device.type == "cpu"
    if args.flush_denormal:
        # random weights at reduced width drive parts of the step into subnormal floats, which the CPU computes
        # tens of times slower (a frozen step 5x, some variants 200x slower in one run); GPUs are not affected
        torch.set_flush_denormal(True)
    dtype = DTYPES[args.dtype]

    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": versions(),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else None,
        "args": {k: v for k, v in vars(args).items()},
    }

    def save():
        doc["elapsed_s"] = time.perf_counter() - budget.start
        write_json(args.json, doc)

    budget = Budget(args.budget_s)
    quiet_libraries()
    print(f"{doc['device']} | torch {torch.__version__} | {args.dtype}", flush=True)
    failures = 0
    # eager UNet variants, krona train's grid, torch.compile (slowest and least certain), then krona train at the
    # further base precisions: a --budget-s that runs out cuts from the end
    held: dict = {}
    if args.part in ("unet", "all"):
        failures += run_unet_part(args, device, dtype, doc, save, budget, "eager", held)
    if args.part in ("train", "all"):
        failures += run_train_part(args, device, dtype, doc, save, budget, "grid", held)
    if args.part in ("unet", "all"):
        failures += run_unet_part(args, device, dtype, doc, save, budget, "compile", held)
        held.pop("unet", None)
    if args.part in ("train", "all"):
        failures += run_train_part(args, device, dtype, doc, save, budget, "extra", held)
    if "unet" in doc:
        print()
        print(unet_table(doc["unet"]))
        compiled = {
            g: r["krona-compile"]["compile_s"]
            for g, r in doc["unet"]["results"].items()
            if "compile_s" in r.get("krona-compile", {})
        }
        if compiled:
            print(
                "krona-compile: compile time (first step − median step) "
                + ", ".join(f"GC {g}: {s:.1f}s" for g, s in compiled.items())
            )
    if "train" in doc:
        print()
        print(train_table(doc["train"]))
    doc["failures"] = failures
    save()
    print(
        f"\n{'FAILED: ' + str(failures) + ' variant(s) or run(s); ' if failures else ''}"
        f"total {doc['elapsed_s']:.0f}s, wrote {args.json}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
