#!/usr/bin/env python
"""How fast krona's model-free commands answer, warm (bytecode cached, files in the page cache): every `--help`,
`presets`, `plan`, `inspect` and `export` of a small adapter. Each command runs once to warm up, then --runs times in a
fresh process; reported: the median wall time against the bar of 1 s, and which heavy libraries the command imported.
Prints a table and writes JSON (--output).

    python scripts/bench_start.py [--runs 5] [--output docs/bench_start_cpu.json]
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
sys.path.insert(0, str(ROOT))
BAR = 1.0  # seconds
HEAVY = ("torch", "diffusers", "transformers", "bitsandbytes", "peft")
# Runs a krona command in this process as `krona` does, then says which heavy libraries it imported (on stderr).
CHILD = (
    "import sys; from krona_cli.cli import main; code = main(sys.argv[1:]); "
    f"print('imported:', ','.join(m for m in {HEAVY!r} if sys.modules.get(m)), file=sys.stderr); sys.exit(code)"
)


def write_adapter(folder: Path) -> Path:
    """A krona adapter on the tiny SDXL UNet's attention (the command's input, made once, not timed)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the tiny pipeline's own notices
    from krona_cli.formats import collect_adapter, save_adapter
    from krona_cli.kron import inject
    from krona_cli.pipeline.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    inject(pipe.unet, factors="4x4")
    adapter = collect_adapter({"unet": pipe.unet}, targets={"unet": "attn"}, architecture="sdxl")
    return save_adapter(folder / "adapter.safetensors", adapter)


def commands(adapter: Path, folder: Path) -> dict[str, list[str]]:
    helps = ["", "train", "sample", "merge", "export", "inspect", "plan", "presets", "eval", "compare", "make-toy"]
    out = {f"krona {c} --help".replace("  ", " "): ([c] if c else []) + ["--help"] for c in helps}
    out |= {
        "krona presets": ["presets"],
        "krona plan --arch sdxl": ["plan", "--arch", "sdxl"],
        "krona inspect ADAPTER": ["inspect", str(adapter)],
        "krona export --to lycoris": ["export", "--adapter", str(adapter), "--to", "lycoris"]
        + ["--output", str(folder / "lokr.safetensors"), "--overwrite"],
        "krona export --to lora --rank 8": ["export", "--adapter", str(adapter), "--to", "lora", "--rank", "8"]
        + ["--output", str(folder / "lora.safetensors"), "--overwrite"],
    }
    return out


def timed(args: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"krona {' '.join(args)} failed:\n{done.stderr}")
    imported = next(line for line in done.stderr.splitlines() if line.startswith("imported:"))
    return seconds, imported.removeprefix("imported:").strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "bench_start_cpu.json")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        adapter = write_adapter(folder)
        for name, argv in commands(adapter, folder).items():
            timed(argv, env)  # warm up: bytecode written, files cached
            times = [timed(argv, env)[0] for _ in range(args.runs)]
            imported = timed(argv, env)[1]
            rows.append({"command": name, "median_s": statistics.median(times), "runs_s": times, "imports": imported})
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':{width}}  median   <= {BAR:g} s  heavy libraries imported")
    for r in rows:
        ok = "yes" if r["median_s"] <= BAR else "NO"
        print(f"{r['command']:{width}}  {r['median_s']:5.2f} s  {ok:8}  {r['imports'] or '-'}")
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": args.runs,
        "bar_s": BAR,
        "commands": rows,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
