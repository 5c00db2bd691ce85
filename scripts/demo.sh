#!/usr/bin/env bash
# Set up .venv if needed, then the main job on the embedded default: build a tiny random-weight SDXL pipeline
# (no download), attach a fresh (untrained: ΔW = 0) adapter, save and inspect it, sample with it, export it for
# ComfyUI/A1111, bake it into a pipeline folder, and plan the adapter for the real SDXL. Training comes next.
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
krona sample --adapter "$out/adapter.safetensors" --prompt "a photo of sks dog" -n 2 --steps 4 --output-dir "$out/samples"
krona export --adapter "$out/adapter.safetensors" --to lycoris --output "$out/adapter-lokr.safetensors"
krona merge --adapter "$out/adapter.safetensors" --output-dir "$out/merged" --overwrite
krona plan --arch sdxl --factors 64x4,8x64
