#!/usr/bin/env bash
# Set up .venv if needed, then personalise a real (small) model end to end on 2 CPU cores in a few minutes: write
# the toy SDXL pipeline (`--arch flux`: the toy FLUX.1, `--arch sd15`: the toy SD 1.5; pretrained on the toy world of
# coloured shapes, shipped with krona; no download), train a
# Kronecker adapter on the toy subject (examples/toy-subject: a pink square, a colour no pretraining picture
# shows) with prior preservation, draw the base and the adapted model with the same prompts and seeds
# (demo-out/before-after.png; demo-out-flux/ for the toy FLUX), score both with the toy world's scorers, export the adapter for ComfyUI/A1111 and bake
# it into a pipeline folder.
set -euo pipefail
arch=sdxl
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="${2:-}"; shift $(($# > 1 ? 2 : 1)) ;;
        *) echo "usage: scripts/demo.sh [--arch sdxl|sd15|flux]" >&2; exit 2 ;;
    esac
done
case "$arch" in
    sdxl|sd15|flux) ;;
    *) echo "scripts/demo.sh: --arch must be sdxl, sd15 or flux, got '$arch'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
. scripts/setup.sh
# Some krona commands run two side by side below, one core each (training has both): two torch processes with
# default threads on 2 cores slow each other down many times.
export OMP_NUM_THREADS=1
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed step stops the one beside it too
out=demo-out
[ "$arch" = sdxl ] || out="demo-out-$arch"
prompts="$out/prompts.txt"
mkdir -p "$out"
python -c "from krona_cli.world.scenes import eval_prompts; print('\n'.join(eval_prompts()))" > "$prompts"
krona make-toy "$out/toy-$arch" --arch "$arch" --overwrite
OMP_NUM_THREADS=2 krona train --config toy --pretrained-model "$out/toy-$arch" --instance-dir examples/toy-subject \
    --prompt "a photo of sks square" --class-prompt "a photo of a square" --output-dir "$out/train" --overwrite
# The base model and the adapted model draw the same prompts and seeds side by side.
krona sample --pretrained-model "$out/toy-$arch" --prompts-file "$prompts" -n 2 --batch-size 10 --output-dir "$out/before" \
    --overwrite > "$out/before.log" 2>&1 &
before=$!
krona sample --adapter "$out/train/adapter.safetensors" --prompts-file "$prompts" -n 2 --batch-size 10 \
    --output-dir "$out/after" --overwrite
wait "$before" || { cat "$out/before.log"; exit 1; }
cat "$out/before.log"
# The adapter is exported and baked in beside the comparison and the scores.
{
    krona export --adapter "$out/train/adapter.safetensors" --to lycoris --output "$out/adapter-lokr.safetensors" \
        --overwrite
    krona merge --adapter "$out/train/adapter.safetensors" --output-dir "$out/merged" --overwrite
} > "$out/ship.log" 2>&1 &
ship=$!
python -c "from krona_cli.inference.sampling import before_after; before_after('$out/before', '$out/after', \
'$out/before-after.png')"
echo "base model:"
krona eval --scorer toy --images "$out/before" --output "$out/scores-before.json"
echo "adapted model:"
krona eval --scorer toy --images "$out/after" --output "$out/scores-after.json"
wait "$ship" || { cat "$out/ship.log"; exit 1; }
cat "$out/ship.log"
echo
echo "outputs in $out/:"
echo "  before-after.png             the base model and the adapted model, same prompts and seeds, side by side"
echo "  scores-before.json, scores-after.json"
echo "                               subject fidelity (how much the subject looks like itself, 0..1), prompt fidelity"
echo "                               (its background as asked), class accuracy and look rate (the plain square)"
echo "  toy-$arch/                    the toy base pipeline"
echo "  train/adapter.safetensors    the trained adapter (train/README.md: its model card; train/config.yaml: its settings)"
echo "  train/samples/step-*.png     sample grids written while training (the subject on new backgrounds)"
echo "  train/validation.png         the validations at steps 0, 150, 300, 450 and the best step (train/validation.json;"
echo "                               train/best/adapter.safetensors holds that step)"
echo "  train/class-images/          generated class images (prior preservation)"
echo "  adapter-lokr.safetensors     the adapter as a LyCORIS LoKr file (ComfyUI, A1111/Forge)"
echo "  merged/                      a diffusers pipeline with the adapter baked in"
echo
echo "the same adapter for the real model, layer by layer: krona plan --arch $arch --factors 64x4,8x64"
