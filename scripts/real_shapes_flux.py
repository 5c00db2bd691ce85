#!/usr/bin/env python
"""The real FLUX.1 shapes once, on the CPU: a random-weight, real-size FLUX.1 [dev] transformer, quantized, one step.

1. The transformer (11.9 B parameters, configs/models/flux_dev_transformer.json) is written as one .safetensors file
   in Black Forest Labs' layout (what `flux1-dev.safetensors` is), in bf16 (~24 GB), built on the meta device and
   streamed to disk one tensor at a time (random normal × 0.02, norm scales 1, biases 0): it is never whole in memory.
2. A FLUX.1 diffusers folder for the rest: a real-size CLIP ViT-L (random) with CLIP's real tokenizer, the real FLUX
   VAE (random), [dev]'s scheduler, and for T5-XXL one layer of it at its real width (d_model 4096, 64 heads, d_ff
   10240; the real 24 layers, 4.7 B parameters, would not fit beside the rest) behind a small T5-style tokenizer
   (no real one exists offline). Its transformer/ holds the config only: `--transformer FILE` replaces it.
3. `krona train --transformer FILE --base-precision nf4` (or int8) for one step at 256 px: T5 tokens at [dev]'s 512,
   prompt embeddings and latents cached, compute fp32 (a CPU without AVX512-BF16 runs bf16 far slower), gradient
   checkpointing (without it the activations of 57 blocks at 768 tokens would be ~15 GB, estimated), one sample
   grid of one image at one denoising step at the end (train always draws one).

Each run is a subprocess under /usr/bin/time -v (wall seconds, peak RSS), watched every half second: it is stopped
(its Python stack dumped first, faulthandler on SIGUSR1) when its anonymous memory passes --max-rss-gib, the machine's
MemAvailable falls under --min-available-gib or it runs past --timeout-min. Inside it, krona's load, caching, training
step and sample grid are timed (a wrapper that patches timers around them; krona itself is unchanged).

Runs (--runs, comma-separated): nf4, int8 (`--base-precision`). krona reads the file layer by layer and quantizes
each linear layer as it arrives (pipeline/flux_file.py): the first version read it whole in fp32 (48 GB) and was
stopped at 20 GiB here, which is how this script found it.

Not part of CI (~20 min a run on 2 cores; ~24 GB of disk under --work, deleted afterwards unless --keep).
docs/real_shapes_flux_cpu.json is what this wrote:

    OMP_NUM_THREADS=2 python scripts/real_shapes_flux.py --runs nf4 --json docs/real_shapes_flux_cpu.json
    python scripts/real_shapes_flux.py --layers 1,1 --json /tmp/smoke.json   # a 2-block transformer: minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
T5_LAYER = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 1}  # one T5-XXL layer


# --- the files -------------------------------------------------------------------------------------------------------


def transformer_config(layers: tuple[int, int] | None) -> dict:
    from krona_cli.architectures import load_model_config

    config = {k: v for k, v in load_model_config("flux_dev_transformer.json").items() if k != "_comment"}
    if layers:
        config["num_layers"], config["num_single_layers"] = layers
    return config


def build_transformer_file(path: Path, config: dict) -> dict:
    """The transformer in BFL's layout, bf16, random, streamed one tensor at a time (flux_file.py's writer)."""
    import diffusers
    import torch

    from krona_cli.atomic import write_atomic
    from krona_cli.formats.bfl_layout import diffusers_to_bfl
    from krona_cli.pipeline.flux_file import _header, _parts, _Stacked

    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel.from_config(config)
    tensors = diffusers_to_bfl(model.state_dict(), concatenate=_Stacked)  # BFL names and shapes, nothing computed
    params = sum(t.numel() for t in model.state_dict().values())
    generator = torch.Generator().manual_seed(0)

    def random(name: str, shape) -> torch.Tensor:
        if len(shape) == 1:
            return (torch.ones if name.endswith(".scale") else torch.zeros)(shape, dtype=torch.bfloat16)
        return torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)

    def stream(f) -> None:
        f.write(_header(tensors, torch.bfloat16, {}))
        for name in sorted(tensors):
            for part in _parts(tensors[name]):
                f.write(random(name, tuple(part.shape)).reshape(-1).view(torch.uint8).numpy())

    write_atomic(path, stream)
    return {"parameters": params, "tensors": len(tensors)}


def build_base_folder(folder: Path, config: dict) -> None:
    """A FLUX.1 diffusers folder: real-size random CLIP-L (real tokenizer), one real-width T5-XXL layer, the real VAE
    (random), [dev]'s scheduler; transformer/ holds the real config only."""
    import diffusers
    import torch
    import transformers

    from krona_cli.architectures import load_model_config
    from krona_cli.pipeline.clip_tokenizer import clip_tokenizer
    from krona_cli.pipeline.models import build_component
    from krona_cli.pipeline.tiny_flux import _flux_transformer, build_t5_tokenizer

    def config_of(name: str) -> dict:
        return {k: v for k, v in load_model_config(name).items() if k != "_comment"}

    torch.manual_seed(0)
    tokenizer_2 = build_t5_tokenizer()
    t5 = config_of("t5_xxl_text.json")
    t5.pop("architectures")
    t5.update(T5_LAYER, vocab_size=len(tokenizer_2))
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(config_of("flux_dev_scheduler.json")),
        vae=diffusers.AutoencoderKL.from_config(config_of("flux_vae.json")),
        text_encoder=build_component("flux", "text_encoder", "cpu"),
        tokenizer=clip_tokenizer(),
        text_encoder_2=transformers.T5EncoderModel(transformers.T5Config(**t5)),
        tokenizer_2=tokenizer_2,
        transformer=_flux_transformer(True),  # a placeholder: only its config file is kept, then replaced
    )
    pipe.save_pretrained(folder)
    for file in (folder / "transformer").iterdir():
        file.unlink()
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))


# --- inside the krona process (`real_shapes_flux.py _krona ...`) ---------------------------------------------------


def _memory() -> dict:
    status = Path("/proc/self/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) * 1024 / GIB  # noqa: E731
    return {
        "rss_anon_gib": round(get("RssAnon"), 2),
        "rss_gib": round(get("VmRSS"), 2),
        "hwm_gib": round(get("VmHWM"), 2),
    }


def _timed(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record = {"phase": label, "s": round(time.perf_counter() - started, 1), **_memory()}
            print("REAL_SHAPES " + json.dumps(record), file=sys.stderr, flush=True)

    setattr(owner, name, wrapper)


def krona_child(argv: list[str]) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the watchdog asks for the stack before it kills

    from krona_cli.training import run, train

    _timed(train, "load_base", "load_base (load, quantize)")
    _timed(train, "_encoder", "cache prompts and latents")
    _timed(run.Run, "step", "training step")
    _timed(run.Run, "samples", "sample grid")
    from krona_cli.cli import main

    sys.argv = ["krona", *argv]
    main()


# --- the parent: run, watch, report ----------------------------------------------------------------------------------


def _status(pid: int) -> dict | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return {k: int(v) * 1024 / GIB for k, v in re.findall(r"^(RssAnon|RssFile|VmRSS):\s+(\d+)", text, re.M)}


def _available_gib() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024 / GIB


def run(name: str, args: list[str], log: Path, env: dict, limits: argparse.Namespace) -> dict:
    """`args` under /usr/bin/time -v, watched: stopped (stack dumped first) past the memory or time limits."""
    started = time.perf_counter()
    watched = {"peak_anon_gib": 0.0, "peak_file_gib": 0.0, "min_available_gib": _available_gib(), "stopped": None}
    with log.open("w") as out:
        timer = subprocess.Popen(
            ["/usr/bin/time", "-v", *args], stdout=out, stderr=subprocess.STDOUT, env=os.environ | env, cwd=ROOT
        )
        child = None
        while timer.poll() is None:
            time.sleep(0.5)
            if child is None:
                try:
                    child = int(Path(f"/proc/{timer.pid}/task/{timer.pid}/children").read_text().split()[0])
                except (OSError, IndexError, ValueError):
                    continue
            status = _status(child)
            if status is None:
                continue
            available = _available_gib()
            watched["peak_anon_gib"] = max(watched["peak_anon_gib"], status.get("RssAnon", 0))
            watched["peak_file_gib"] = max(watched["peak_file_gib"], status.get("RssFile", 0))
            watched["min_available_gib"] = min(watched["min_available_gib"], available)
            why = (
                f"anonymous memory {status['RssAnon']:.1f} GiB > {limits.max_rss_gib} GiB"
                if status.get("RssAnon", 0) > limits.max_rss_gib
                else f"MemAvailable {available:.1f} GiB < {limits.min_available_gib} GiB"
                if available < limits.min_available_gib
                else f"ran past {limits.timeout_min} min"
                if time.perf_counter() - started > 60 * limits.timeout_min
                else None
            )
            if why and not watched["stopped"]:
                watched["stopped"] = why
                os.kill(child, signal.SIGUSR1)  # faulthandler: where it was
                time.sleep(1)
                os.kill(child, signal.SIGKILL)
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    phases = [json.loads(line) for line in re.findall(r"^REAL_SHAPES (.*)$", text, re.M)]
    estimate = re.search(r"memory \(estimate\)\s+(.+?)\s*$", text, re.M)
    loss = re.findall(r"training\D+\d+/\d+ loss (\S+)", text)
    dump = text[text.find("most recent call first") :] if "most recent call first" in text else ""
    stack = re.findall(r'File "[^"]*krona_cli/([^"]+)", line (\d+) in (\w+)', dump)  # innermost first
    result = {
        "run": name,
        "returncode": timer.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "time_wall": wall.group(1) if wall else None,
        "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,  # /usr/bin/time: anonymous + mapped
        "peak_rss_anon_gib": round(watched["peak_anon_gib"], 2),  # sampled every 0.5 s
        "peak_rss_file_gib": round(watched["peak_file_gib"], 2),  # pages of mapped files (safetensors' mmap)
        "min_mem_available_gib": round(watched["min_available_gib"], 2),
        "stopped": watched["stopped"],
        "stopped_in": [f"krona_cli/{f}:{n} {fn}" for f, n, fn in stack[:5]] or None,
        "summary_memory_estimate": estimate.group(1) if estimate else None,
        "loss": loss[-1] if loss else None,
        "phases": phases,
        "s_per_step": next((p["s"] for p in phases if p["phase"] == "training step"), None),
        "log": str(log),
    }
    if timer.returncode and not watched["stopped"]:
        print(text[-3000:], file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/real-shapes-flux"))
    parser.add_argument("--json", default="real_shapes_flux.json")
    parser.add_argument("--runs", default="nf4", help="--base-precision of each run: nf4, int8")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--precision", default="no", choices=("no", "bf16"), help="--mixed-precision of train")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--layers", help="DOUBLE,SINGLE blocks instead of FLUX.1's 19,38 (a smoke test)")
    parser.add_argument("--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--min-available-gib", type=float, default=1.0)
    parser.add_argument("--timeout-min", type=float, default=45.0)
    parser.add_argument("--keep", action="store_true", help="keep --work (the ~24 GB transformer file) afterwards")
    args = parser.parse_args()
    layers = tuple(int(n) for n in args.layers.split(",")) if args.layers else None
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    config = transformer_config(layers)
    file, base = work / "flux1-random-bfl.safetensors", work / "flux-base"
    needed = 2.1 * 12e9 * (1 if not layers else 0.1)
    if not file.exists() and shutil.disk_usage(work).free < needed:
        print(f"not enough disk under {work}: {shutil.disk_usage(work).free / GIB:.1f} GiB free", file=sys.stderr)
        return 1
    started = time.perf_counter()
    described = build_transformer_file(file, config) if not file.exists() else {}
    file_s = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    if not base.exists():
        build_base_folder(base, config)
    base_s = round(time.perf_counter() - started, 1)
    print(f"transformer file {file.stat().st_size / GIB:.2f} GiB in {file_s} s; base folder in {base_s} s", flush=True)
    results = []
    for name in args.runs.split(","):
        train = [
            *("train", "--pretrained-model", str(base), "--transformer", str(file)),
            *("--instance-dir", str(ROOT / "examples" / "cat"), "--prompt", "a photo of sks cat"),
            *("--base-precision", name, "--mixed-precision", args.precision),
            *("--resolution", str(args.resolution), "--steps", "1", "--no-buckets"),
            *("--sample-every", "0", "--sample-images", "1", "--sample-steps", "1", "--checkpoint-every", "0"),
            *("--report-to", "none", "--output-dir", str(work / f"run-{name}"), "--overwrite"),
            *([] if args.no_gradient_checkpointing else ["--gradient-checkpointing"]),
        ]
        env = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, str(Path(__file__).resolve()), "_krona", *train]
        results.append(run(name, command, work / f"train-{name}.log", env, args))
        print(json.dumps(results[-1]), flush=True)
    import torch

    files = {str(p.relative_to(work)): round(p.stat().st_size / GIB, 2) for p in [file, *base.rglob("*.safetensors")]}
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "transformer": {
            "config": config,
            "parameters": described.get("parameters"),
            "file_gib": files[file.name],
            "layout": "bfl, bf16",
            "build_s": file_s,
        },
        "base_folder": {"files_gib": {k: v for k, v in files.items() if k != file.name}, "build_s": base_s},
        "text_encoder_2": f"T5 with {T5_LAYER} (the real T5-XXL: 24 layers, 4.76 B parameters), small tokenizer",
        "arguments": vars(args) | {"work": str(work)},
        "runs": results,
    }
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'run':12} {'rc':>4} {'wall s':>8} {'s/step':>7} {'peak RSS GiB':>13} {'anon GiB':>9}  memory (estimate)")
    for r in results:
        print(
            f"{r['run']:12} {r['returncode']!s:>4} {r['wall_s']:>8} {r['s_per_step']!s:>7} {r['peak_rss_gib']!s:>13} "
            f"{r['peak_rss_anon_gib']!s:>9}  {r['summary_memory_estimate'] or r['stopped']}"
        )
    if not args.keep:
        shutil.rmtree(work)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_krona"]:
        krona_child(sys.argv[2:])
    else:
        sys.exit(main())
