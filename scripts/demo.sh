#!/usr/bin/env bash
# Set up .venv if needed, then the main job on the embedded default: build a tiny random-weight SDXL pipeline
# (no download), adapt it, save and inspect the adapter, and plan the adapter for the real SDXL.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
out=demo-out
mkdir -p "$out"
krona make-tiny "$out/tiny-sdxl" --arch sdxl
python - "$out" <<'PY'
import sys
from pathlib import Path

from diffusers import StableDiffusionXLPipeline

from krona_cli.formats import collect_adapter, save_adapter
from krona_cli.kron import inject

out = Path(sys.argv[1])
pipe = StableDiffusionXLPipeline.from_pretrained(out / "tiny-sdxl")
names = inject(pipe.unet, targets="attn", factors="64x4")
adapter = collect_adapter({"unet": pipe.unet}, base_model=str(out / "tiny-sdxl"), architecture="sdxl",
                          targets={"unet": "attn"})
save_adapter(out / "adapter.safetensors", adapter)
print(f"adapted {len(names)} attention projections of the tiny SDXL UNet -> {out / 'adapter.safetensors'}")
PY
krona inspect "$out/adapter.safetensors"
krona plan --arch sdxl --factors 64x4,8x64
