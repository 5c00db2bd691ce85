"""scripts/bench_gpu.py runs both its parts end to end on the CPU at its smallest settings and records every variant.

Not a timing test: it checks the plumbing (every UNet variant builds, trains a step and is taken off again, the
LoKr peers get exactly krona's factors, `krona train` runs under the step clock) and that the JSON holds finite,
positive times for all of it. Part 1 runs the SD 1.5 UNet here (16 transformer blocks, so torch.compile's tracing
takes seconds, not the minute SDXL's 70 take on two cores); part 2 always trains an SDXL pipeline.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("frozen", "krona", "krona-compile", "materialised", "peft-lokr", "lycoris-lokr", "peft-lora-r4")
TRAIN_STEPS, TRAIN_WARMUP = 3, 1


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_bench_gpu_cpu_smallest(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_gpu.py"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--arch",
        "sd15",
        "--width-scale",
        "0.125",
        "--resolution",
        "64",
        "--warmup",
        "1",
        "--reps",
        "2",
        "--gradient-checkpointing",
        "off",
        "--compile-backend",
        "eager",
        "--train-steps",
        str(TRAIN_STEPS),
        "--train-warmup",
        str(TRAIN_WARMUP),
        "--cache-latents",
        "on,off",
        "--optimizer",
        "adamw8bit",
        "--work-dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    # one thread: two OpenMP threads on a 2-core machine that is also running something else slow down 10-50x
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    for key in ("date", "device", "versions", "args"):
        assert doc[key], key
    assert doc["failures"] == 0

    unet = doc["unet"]
    assert unet["factors"] == "8x4"  # 64x4 with the output side scaled by 1/8
    results = unet["results"]["off"]
    assert set(results) == set(VARIANTS) | {"frozen-again"}  # the floor again, just before krona-compile
    for name in (*VARIANTS, "frozen-again"):
        r = results[name]
        assert "error" not in r and "skipped" not in r, (name, r)
        assert _positive(r["median_ms"]) and all(_positive(t) for t in r["times_ms"]), (name, r)
        assert len(r["times_ms"]) == 2
        assert _positive(r["ratio_to_floor"]), name
    assert results["frozen"]["trainable_params"] == 0
    assert _positive(results["krona-compile"]["compile_s"] + results["krona-compile"]["median_ms"])
    # the LoKr peers hold exactly krona's factors on exactly its layers; LoRA r4 on the same layers
    krona = results["krona"]["trainable_params"]
    assert krona > 0
    for name in ("krona-compile", "materialised", "peft-lokr", "lycoris-lokr"):
        assert results[name]["trainable_params"] == krona, name
    assert results["peft-lora-r4"]["trainable_params"] > krona
    layers = {results[n]["adapted_layers"] for n in VARIANTS if n != "frozen"}
    assert layers == {unet["adapted_layers"]} and unet["adapted_layers"] == 128  # SD 1.5: 16 blocks × 2 × 4
    assert results["materialised"]["krona_paths"] == {"merged": 128}

    runs = doc["train"]["runs"]
    assert [(r["cache_latents"], r["optimizer"]) for r in runs] == [(True, "adamw8bit"), (False, "adamw8bit")]
    for r in runs:
        assert "error" not in r and "skipped" not in r, r
        assert _positive(r["s_per_step_median"]) and len(r["step_s"]) == TRAIN_STEPS - TRAIN_WARMUP, r
        assert all(_positive(t) for t in r["step_s"])
        assert len(r["losses"]) == TRAIN_STEPS and all(math.isfinite(x) for x in r["losses"])
        assert _positive(r["load_s"]) and _positive(r["run_s"])
    assert not (tmp_path / "work").exists()  # the pipeline and run folders are cleaned up
