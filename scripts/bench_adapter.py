#!/usr/bin/env python
"""Forward+backward time of one adapted linear layer at SDXL shapes: KronLinear against its baselines and peers.

Every variant runs y = layer(x); y.backward(dy) with x.requires_grad=True (as inside a network), the base weight
frozen and the adapter's own parameters trainable. All variants of one shape get the same random base weight, bias,
factors A (a_out x a_in) and B (d_out/a_out x d_in/a_in), input x and upstream gradient dy; B is random, not zero.

Variants:
  frozen               the base nn.Linear alone (gradient to x only): the floor
  krona                KronLinear, path="auto" (the path it picks is recorded)
  krona_reshape        KronLinear, path="reshape" forced
  krona_merged         KronLinear, path="merged" forced
  materialised         F.linear(x, W + s*kron(A, B), bias) with A, B leaf tensors (kron.kron_delta): one extra
                       weight-sized GEMM
  peft_lokr            peft's LoKr Linear, full w1 (= A) and w2 (= B) at exactly the same factor shapes
  lycoris_lokr         LyCORIS LokrModule, full matrices, default (rebuild) forward
  lycoris_lokr_bypass  LyCORIS LokrModule, full matrices, bypass_mode=True
  official_order       DiffuseKronA's contraction order (A first, then B), re-stated here as plain torch ops
  peft_lora_r4         peft LoRA, rank 4, lora_B non-zero

Before timing, the outputs and the gradients (x, A, B) of krona, materialised, peft_lokr and both LyCORIS variants
are checked against each other in float32; a mismatch stops the run.

Rounds are interleaved (every variant once per round, in an order rotated from round to round) so that background
load hits all variants alike. Reported: the median over the timed rounds, and "extra" = the median of the per-round
differences from `frozen`. Check (a) compares krona's extra with materialised's by their fastest rounds (on a shared
machine interference only ever adds time) and prints the ratio of the median paired extras beside it; check (b)
takes the median over rounds of krona - peer, timed in the same round. Big shapes get fewer timed rounds (at least
--min-reps) when --shape-budget-s would be exceeded. The defaults take about 2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from krona_cli.kron import KronLinear, kron_delta, parse_factors  # noqa: E402

DEFAULT_SHAPES = "640x640:4096,1280x1280:4096,1280x1280:1024,640x2048:77,1280x2048:77"
VARIANTS = (
    "frozen",
    "krona",
    "krona_reshape",
    "krona_merged",
    "materialised",
    "peft_lokr",
    "lycoris_lokr",
    "lycoris_lokr_bypass",
    "official_order",
    "peft_lora_r4",
)
CHECKED = ("krona", "materialised", "peft_lokr", "lycoris_lokr", "lycoris_lokr_bypass")
from krona_cli.dtypes import DTYPES  # noqa: E402

SCALE = 1.0  # peft LoKr: alpha/r = 1; LyCORIS full-matrix LoKr forces alpha = lora_dim, i.e. scale 1


@dataclass
class Shape:
    d_out: int
    d_in: int
    n_tokens: int

    @property
    def label(self) -> str:
        if self.d_out == self.d_in:
            return f"{self.d_out}x{self.d_in}"
        return f"{self.d_in}->{self.d_out}"

    @property
    def batch(self) -> int:
        return 2 if self.n_tokens % 2 == 0 else 1


@dataclass
class Variant:
    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list  # trainable leaves; for the checked variants [A-like, B-like]
    note: str = ""
    info: dict = field(default_factory=dict)


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            dims, n = item.split(":")
            d_out, d_in = dims.lower().split("x")
            shapes.append(Shape(int(d_out), int(d_in), int(n)))
        except ValueError:
            raise SystemExit(f"--shapes: '{item}' is not OUTxIN:N (e.g. 1280x1280:4096, 640x2048:77)") from None
    return shapes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# Variant construction. Every builder gets fresh tensors: W, bias (frozen), A, B (trainable copies).


def make_base(w: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    d_out, d_in = w.shape
    base = nn.Linear(d_in, d_out, bias=True, device=w.device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(bias)
    base.requires_grad_(False)
    return base


def build_frozen(w, bias, a, b, dtype, factors) -> Variant:
    base = make_base(w, bias, dtype)
    return Variant(base, [])


def build_krona(path: str):
    def build(w, bias, a, b, dtype, factors) -> Variant:
        layer = KronLinear(make_base(w, bias, dtype), factors=factors, scale=SCALE, path=path, dtype=torch.float32)
        with torch.no_grad():
            layer.kron_a.copy_(a)
            layer.kron_b.copy_(b)
        return Variant(layer, [layer.kron_a, layer.kron_b], info={"layer": layer})

    return build


def build_materialised(w, bias, a, b, dtype, factors) -> Variant:
    weight = w.to(dtype).detach()
    bias_ = bias.to(dtype).detach()
    a_ = a.detach().clone().float().requires_grad_(True)
    b_ = b.detach().clone().float().requires_grad_(True)

    def fn(x):
        return F.linear(x, weight + kron_delta(a_, b_, SCALE).to(weight.dtype), bias_)

    return Variant(fn, [a_, b_])


def peft_lokr_layer(base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
    """peft's LoKr `Linear` around the frozen `base` whose w1 / w2 are exactly A (a_out x a_in) and B, scale 1.

    Returns (layer, [w1, w2], info). peft's factorization(dim, factor) splits d_out and d_in with ONE factor, so a
    64x4 A cannot be asked for: the layer is made with full matrices (r = max(d_out, d_in), alpha = r,
    decompose_both=False) and its w1 / w2 are replaced by exactly-shaped fp32 parameters on `base`'s device (its
    forward is F.linear(x, kron(w1, w2) * alpha/r), shapes taken from the tensors it holds)."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    d_out, d_in = base.out_features, base.in_features
    r = max(d_out, d_in)  # r >= max(w2 dims)/2: w2 is a full matrix; decompose_both=False: w1 is full too
    cfg = LoKrConfig(r=r, alpha=r, decompose_both=False, decompose_factor=-1, target_modules=["lin"])
    layer = LoKrLinear(base, "default", config=cfg, r=r, alpha=r)
    base.requires_grad_(False)
    assert "default" in layer.lokr_w1 and "default" in layer.lokr_w2, "peft LoKr did not make full w1/w2"
    made = (tuple(layer.lokr_w1["default"].shape), tuple(layer.lokr_w2["default"].shape))
    device = base.weight.device
    layer.lokr_w1["default"] = nn.Parameter(a.detach().clone().float().to(device))
    layer.lokr_w2["default"] = nn.Parameter(b.detach().clone().float().to(device))
    scaling = layer.scaling["default"]
    assert scaling == SCALE, f"peft LoKr scaling {scaling} != {SCALE}"
    params = [layer.lokr_w1["default"], layer.lokr_w2["default"]]
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in base.parameters())
    return layer, params, {"scale": scaling, "made_w1_w2": made}


def lycoris_lokr_layer(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, bypass: bool = False):
    """LyCORIS `LokrModule(full_matrix=True)` around the frozen `base` with w1 = A and w2 = B exactly, scale 1;
    `bypass` picks its bypass forward (x -> w2 -> w1, kron never built) over its default rebuild forward.

    Returns (module, [w1, w2], info). Same one-factor limitation as peft (LyCORIS' factorization is the one peft
    copied), so w1 / w2 are replaced by exactly-shaped fp32 parameters: both its rebuild (kron(w1, w2).view(shape))
    and its bypass forward (x.reshape(..., w1.in, -1) -> w2 -> w1) take the shapes from the tensors it holds. The
    module calls `base` itself (it keeps it out of its own parameters), so it can stand in `base`'s place."""
    from lycoris.modules.lokr import LokrModule

    mod = LokrModule(
        "bench",
        base,
        multiplier=1.0,
        lora_dim=1,
        alpha=1,
        decompose_both=False,
        factor=-1,
        full_matrix=True,
        bypass_mode=bypass,
    )
    assert mod.use_w1 and mod.use_w2, "LyCORIS LoKr did not make full w1/w2"
    made = (tuple(mod.lokr_w1.shape), tuple(mod.lokr_w2.shape))
    mod.lokr_w1 = nn.Parameter(a.detach().clone().float())
    mod.lokr_w2 = nn.Parameter(b.detach().clone().float())
    mod.to(base.weight.device)
    assert mod.scale == SCALE, f"LyCORIS LoKr scale {mod.scale} != {SCALE}"
    assert mod.bypass_mode == bypass
    return mod, [mod.lokr_w1, mod.lokr_w2], {"scale": mod.scale, "made_w1_w2": made}


def peft_lora_layer(base: nn.Linear, rank: int = 4, seed: int = 1):
    """peft's LoRA `Linear` around the frozen `base`, rank `rank`, alpha = rank (scale 1), lora_A and lora_B fp32
    and random (N(0, 0.02²), drawn from `seed`), so the update is not skipped. Returns (layer, [trainable params])."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["lin"])
    layer = LoraLinear(base, "default", config=cfg, r=rank, lora_alpha=rank)
    base.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (layer.lora_A["default"], layer.lora_B["default"]):
            mod.float()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.02)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 2
    return layer, params


def build_peft_lokr(w, bias, a, b, dtype, factors) -> Variant:
    layer, params, info = peft_lokr_layer(make_base(w, bias, dtype), a, b)
    return Variant(layer, params, info=info)


def build_lycoris(bypass: bool):
    def build(w, bias, a, b, dtype, factors) -> Variant:
        mod, params, info = lycoris_lokr_layer(make_base(w, bias, dtype), a, b, bypass)
        return Variant(mod, params, info=info)

    return build


def build_official(w, bias, a, b, dtype, factors) -> Variant:
    """DiffuseKronA's order: X = x as (N, b_in, a_in); Y = B @ (X @ Aᵀ) (N, b_out, a_out). Row-permuted A⊗B: same
    FLOPs and contraction order as the official layer, not the same function, so it is timed but not checked."""
    base = make_base(w, bias, dtype)
    a_ = a.detach().clone().float().requires_grad_(True)
    b_ = b.detach().clone().float().requires_grad_(True)
    a_out, a_in = a.shape
    b_out, b_in = b.shape

    def fn(x):
        am, bm = a_.to(x.dtype), b_.to(x.dtype)
        xs = x.reshape(-1, a_in, b_in).transpose(1, 2)
        y = bm @ (xs @ am.t())
        return base(x) + SCALE * y.reshape(*x.shape[:-1], a_out * b_out)

    return Variant(fn, [a_, b_])


def build_peft_lora(w, bias, a, b, dtype, factors) -> Variant:
    layer, params = peft_lora_layer(make_base(w, bias, dtype), rank=4, seed=1)
    return Variant(layer, params)


BUILDERS = {
    "frozen": build_frozen,
    "krona": build_krona("auto"),
    "krona_reshape": build_krona("reshape"),
    "krona_merged": build_krona("merged"),
    "materialised": build_materialised,
    "peft_lokr": build_peft_lokr,
    "lycoris_lokr": build_lycoris(False),
    "lycoris_lokr_bypass": build_lycoris(True),
    "official_order": build_official,
    "peft_lora_r4": build_peft_lora,
}
NEEDS = {"peft_lokr": "peft", "peft_lora_r4": "peft", "lycoris_lokr": "lycoris", "lycoris_lokr_bypass": "lycoris"}


def available(name: str) -> str | None:
    """None when the variant can run, else why not."""
    pkg = NEEDS.get(name)
    if pkg is None:
        return None
    try:
        __import__(pkg)
    except ImportError as exc:
        return f"skipped: {pkg} not installed ({exc})"
    return None


# ----------------------------------------------------------------------------------------------------------------------


def make_data(shape: Shape, factors, device: torch.device, seed: int = 0):
    """fp32 tensors on `device`: W, bias like nn.Linear's init; A ~ N(0, 1/a_out) (DiffuseKronA); B random, small."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape.d_out, shape.d_in
    bound = 1.0 / d_in**0.5
    w = (torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(d_out, generator=gen) * 2 - 1) * bound
    b_out, b_in = factors.b_shape(d_out, d_in)
    a = torch.randn(factors.a_out, factors.a_in, generator=gen) / factors.a_out
    b = torch.randn(b_out, b_in, generator=gen) * 0.05
    x = torch.randn(shape.batch, shape.n_tokens // shape.batch, d_in, generator=gen)
    dy = torch.randn(shape.batch, shape.n_tokens // shape.batch, d_out, generator=gen)
    return [t.to(device) for t in (w, bias, a, b, x, dy)]


def run_once(v: Variant, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x.grad = None
    for p in v.params:
        p.grad = None
    y = v.fn(x)
    y.backward(dy)
    return y


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def verify(shape: Shape, factors, device, names, tol: float = 1e-4, keep_going: bool = False) -> dict:
    """float32 outputs and gradients of the checked variants against `materialised`; raises on a mismatch (with
    keep_going, prints it and records it under "MISMATCH" instead)."""
    w, bias, a, b, x, dy = make_data(shape, factors, device)
    results = {}
    for name in names:
        v = BUILDERS[name](w, bias, a, b, torch.float32, factors)
        xr = x.detach().clone().requires_grad_(True)
        y = run_once(v, xr, dy)
        results[name] = {"y": y.detach(), "dx": xr.grad, "dA": v.params[0].grad, "dB": v.params[1].grad}
    ref = results["materialised"]
    report, bad = {}, []
    for name, res in results.items():
        if name == "materialised":
            continue
        errs = {k: rel_err(res[k], ref[k]) for k in ("y", "dx", "dA", "dB")}
        report[name] = errs
        for k, e in errs.items():
            if not e <= tol:
                bad.append(f"{name}.{k}: relative error {e:.2e} > {tol:.0e}")
    if bad and keep_going:
        print(f"  MISMATCH at {shape.label} N={shape.n_tokens}: " + "; ".join(bad), flush=True)
        report["MISMATCH"] = bad
    elif bad:
        raise AssertionError(
            f"{shape.label} N={shape.n_tokens}: variants disagree with materialised: " + "; ".join(bad)
        )
    return report


def bench_shape(shape: Shape, factors, device, dtype, names, args) -> dict:
    w, bias, a, b, x32, dy32 = make_data(shape, factors, device)
    x = x32.to(dtype).requires_grad_(True)
    dy = dy32.to(dtype)
    variants = {n: BUILDERS[n](w, bias, a, b, dtype, factors) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}

    def one_round(record: bool, start: int = 0) -> float:
        total = 0.0
        for n in names[start:] + names[:start]:  # rotated per round: no variant always runs first or last
            v = variants[n]
            x.grad = None
            for p in v.params:
                p.grad = None
            sync(device)
            t0 = time.perf_counter()
            y = v.fn(x)
            y.backward(dy)
            sync(device)
            dt = time.perf_counter() - t0
            del y
            total += dt
            if record:
                times[n].append(dt * 1e3)
        return total

    round_s = 0.0
    for _ in range(args.warmup):
        round_s = one_round(False)
    reps = args.reps
    if args.shape_budget_s > 0 and round_s > 0:
        reps = max(min(args.reps, args.min_reps), min(args.reps, int(args.shape_budget_s / round_s)))
    for r in range(reps):
        one_round(True, r % len(names))

    n_tokens = shape.n_tokens
    krona_layer = variants["krona"].info["layer"] if "krona" in variants else None
    elem = torch.empty((), dtype=dtype).element_size()
    path = krona_layer.resolved_path(n_tokens, device.type, elem) if krona_layer is not None else None
    out = {
        "d_out": shape.d_out,
        "d_in": shape.d_in,
        "n_tokens": n_tokens,
        "batch": shape.batch,
        "x_shape": list(x.shape),
        "a_shape": list(a.shape),
        "b_shape": list(b.shape),
        "krona_path": path,
        "reps": reps,
        "variants": {},
    }
    floor = times.get("frozen")
    for n in names:
        med = statistics.median(times[n])
        # extra over frozen: the median of the per-round differences (both ran in the same round, seconds apart),
        # which is steadier than a difference of medians when the machine's speed drifts between rounds
        extra = None
        if floor is not None and n != "frozen":
            extra = statistics.median(t - f for t, f in zip(times[n], floor))
        out["variants"][n] = {
            "median_ms": round(med, 4),
            "min_ms": round(min(times[n]), 4),
            "extra_ms": None if extra is None else round(extra, 4),
            "times_ms": [round(t, 3) for t in times[n]],
        }
    return out


# ----------------------------------------------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def ratio(res: dict, by: str = "median") -> float | None:
    """krona's extra time over frozen divided by materialised's: `median` uses the medians of the per-round
    differences, `min` the fastest round of each variant (interference from elsewhere only ever adds time, so the
    minimum is the steadiest estimate of what the code itself costs on a shared machine)."""
    v = res["variants"]
    try:
        if by == "min":
            floor = v["frozen"]["min_ms"]
            return (v["krona"]["min_ms"] - floor) / (v["materialised"]["min_ms"] - floor)
        return v["krona"]["extra_ms"] / v["materialised"]["extra_ms"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def table(results: list[dict], skipped: dict[str, str]) -> str:
    """Markdown table: one row per shape; 'ms (+extra over frozen)' per variant."""
    head = ["shape (out x in)", "N", "krona path"] + list(VARIANTS) + ["krona extra / materialised extra (median, min)"]
    rows = [head, ["---"] * len(head)]
    for res in results:
        shp = f"{res['d_out']}x{res['d_in']}"
        row = [shp, str(res["n_tokens"]), str(res["krona_path"])]
        for n in VARIANTS:
            if n in skipped:
                row.append("skipped")
                continue
            v = res["variants"].get(n)
            if v is None:
                row.append("-")
            elif v["extra_ms"] is None:
                row.append(fmt_ms(v["median_ms"]))
            else:
                row.append(f"{fmt_ms(v['median_ms'])} (+{fmt_ms(v['extra_ms'])})".replace("+-", "-"))
        r, r_min = ratio(res), ratio(res, "min")
        row.append("-" if r is None or r_min is None else f"{r:.2f}, {r_min:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [("-" * widths[i]) if c == "---" else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(results: list[dict]) -> list[dict]:
    checks = []
    for res in results:
        if (res["d_out"], res["d_in"], res["n_tokens"]) not in ((1280, 1280, 4096), (640, 640, 4096)):
            continue
        r, r_min = ratio(res), ratio(res, "min")
        checks.append(
            {
                "check": f"(a) {res['d_out']}x{res['d_in']} N={res['n_tokens']}: krona extra <= 0.5 x materialised "
                f"extra, by fastest rounds (by median paired differences: "
                f"{'-' if r is None else f'{r:.3f}'})",
                "value": None if r_min is None else round(r_min, 3),
                "pass": None if r_min is None else bool(r_min <= 0.5),
            }
        )
    for res in results:
        v = res["variants"]
        if "krona" not in v:
            continue
        peers = [p for p in ("peft_lokr", "lycoris_lokr", "lycoris_lokr_bypass") if p in v]
        if not peers:
            continue
        # paired: the median over rounds of (krona - peer), both timed in the same round, so that the machine's
        # drift between rounds cancels; krona is faster when that median is below zero
        diffs = {p: statistics.median(k - q for k, q in zip(v["krona"]["times_ms"], v[p]["times_ms"])) for p in peers}
        slower = [p for p in peers if not diffs[p] < 0]
        detail = ", ".join(f"{p} {fmt_ms(diffs[p])}" for p in peers)
        checks.append(
            {
                "check": f"(b) {res['d_out']}x{res['d_in']} N={res['n_tokens']}: krona faster than every LoKr "
                f"(paired median krona - peer, ms: {detail})",
                "value": slower,
                "pass": not slower,
            }
        )
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="frozen base and activations' dtype")
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per shape (upper bound, see --shape-budget-s)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--shape-budget-s",
        type=float,
        default=75.0,
        help="cap the timed rounds of a shape to about this many seconds (at least --min-reps); 0 = no cap",
    )
    ap.add_argument("--min-reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--factors", default="64x4", help="A's shape a_out x a_in (default 64x4)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"OUTxIN:N,... (default {DEFAULT_SHAPES})")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of: " + ",".join(VARIANTS))
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="on a verification mismatch, print and record it in the JSON and go on timing instead of stopping",
    )
    ap.add_argument("--json", default="bench_adapter.json", help="where to write the results")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype = DTYPES[args.dtype]
    factors = parse_factors(args.factors)
    shapes = parse_shapes(args.shapes)
    for s in shapes:
        if s.d_out % factors.a_out or s.d_in % factors.a_in:
            raise SystemExit(f"factors {factors} do not divide {s.d_out}x{s.d_in}")

    wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    skipped = {n: why for n in wanted if (why := available(n))}
    names = [n for n in VARIANTS if n in wanted and n not in skipped]
    for n, why in skipped.items():
        print(f"[{n}] {why}")

    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "peft": pkg_version("peft"),
        "lycoris_lora": pkg_version("lycoris-lora"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
    }
    print(
        f"torch {machine['torch']} | {machine['device_name']} | threads {machine['threads']} | {args.dtype} | "
        f"factors {factors} | reps {args.reps} (budget {args.shape_budget_s:g}s/shape) warmup {args.warmup}",
        flush=True,
    )

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    checked = [n for n in CHECKED if n in names]
    results = []
    t_start = time.perf_counter()
    for shape in shapes:
        t0 = time.perf_counter()
        check = {}
        if "materialised" in checked and len(checked) > 1:
            check = verify(shape, factors, device, checked, keep_going=args.keep_going)
        res = bench_shape(shape, factors, device, dtype, names, args)
        res["verify_rel_err_vs_materialised_fp32"] = check
        results.append(res)
        worst = max((e for k, errs in check.items() if k != "MISMATCH" for e in errs.values()), default=float("nan"))
        print(
            f"  {shape.label} N={shape.n_tokens}: {res['reps']} rounds, krona path {res['krona_path']}, "
            f"verify worst rel err {worst:.1e}, {time.perf_counter() - t0:.1f}s",
            flush=True,
        )

    print()
    print(table(results, skipped))
    checks = acceptance(results)
    print("\nacceptance:")
    for c in checks:
        verdict = "n/a " if c["pass"] is None else "PASS" if c["pass"] else "FAIL"
        extra = f" (ratio {c['value']})" if isinstance(c["value"], float) else ""
        extra += f" (not faster than: {', '.join(c['value'])})" if isinstance(c["value"], list) and c["value"] else ""
        print(f"  {verdict}  {c['check']}{extra}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")

    doc = {
        "machine": machine,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else None,
        "factors": str(factors),
        "scale": SCALE,
        "reps": args.reps,
        "warmup": args.warmup,
        "shape_budget_s": args.shape_budget_s,
        "skipped": skipped,
        "shapes": {f"{r['d_out']}x{r['d_in']}:{r['n_tokens']}": r for r in results},
        "ratio_krona_extra_over_materialised_extra": {
            f"{r['d_out']}x{r['d_in']}:{r['n_tokens']}": {"median": ratio(r), "min": ratio(r, "min")} for r in results
        },
        "acceptance": checks,
        # 1-minute load average before and after the run (others' work on the machine shows up here)
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
