#!/usr/bin/env python
"""Bit-identity of krona's outputs across a change (a refactor must not move one bit): the same commands run on a git
worktree of a reference commit and on this working tree, and every output is hashed and compared.

The commands, on tiny SDXL and SD 1.5 pipelines (`krona make-tiny`) and the cat photos, at one torch thread:
`train` with the text encoders, prior preservation (class images drawn), min-SNR, a noise offset, checkpoints and
validation losses; a v-prediction SD 1.5 run; the LoRA baseline; `sample` (pixels); `export` to LoKr and LoRA;
`merge` to a single file. Hashed: the tensors of every .safetensors output (key, dtype, shape, bytes) and, apart, its
metadata but what two saves of the same adapter differ in (the time, a merged adapter file's sha256); every image's
pixels; validation.json. Prints a table of what differs and writes JSON (--output).

    python scripts/golden.py [--ref HEAD] [--output golden.json]

Hashes depend on torch's version, the CPU and the thread count, so both trees run here, now, with one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATS = ROOT / "examples" / "cat"
PROMPT = "a photo of sks cat"
# Runs `krona` commands (JSON list of argument lists, argv[1]) with the krona_cli of the current directory.
CHILD = (
    "import json, sys; sys.path.insert(0, '.'); import torch; torch.set_num_threads(1); "
    "from krona_cli.cli import main; "
    "[sys.exit(f'{a[0]} failed: {c}') for a in json.loads(sys.argv[1]) for c in [main(a)] if c]"
)


def commands(work: Path) -> tuple[list[list[str]], list[str]]:
    """The krona commands of one tree, writing under `work`, and the v-prediction run (after `v_prediction_copy`)."""
    out: list[list[str]] = []
    for arch in ("sdxl", "sd15"):
        base, run = work / f"tiny-{arch}", work / f"{arch}-kron"
        out.append(["make-tiny", str(base), "--arch", arch])
        common = ["train", "--config", "tiny", "--pretrained-model", str(base), "--instance-dir", str(CATS)]
        common += ["--prompt", PROMPT, "--steps", "4", "--sample-every", "0"]
        out.append(
            [*common, "--output-dir", str(run), "--train-text-encoder", "--class-prompt", "a photo of a cat"]
            + ["--num-class-images", "2", "--class-batch-size", "2", "--snr-gamma", "5", "--noise-offset", "0.05"]
            + ["--checkpoint-every", "2", "--validate-every", "2", "--scorer", "none"]
        )
        out.append([*common, "--output-dir", str(work / f"{arch}-lora"), "--adapter-type", "lora", "--rank", "4"])
        adapter = str(run / "adapter.safetensors")
        out.append(["sample", "--adapter", adapter, "--prompt", PROMPT, "-n", "2", "--sample-steps", "4"])
        out[-1] += ["--output-dir", str(work / f"{arch}-samples")]
        for to, more in (("lycoris", []), ("lora", ["--rank", "4"])):
            out.append(["export", "--adapter", adapter, "--to", to, *more])
            out[-1] += ["--output", str(work / f"{arch}-{to}.safetensors")]
        out.append(["merge", "--adapter", adapter, "--output", str(work / f"{arch}-merged.safetensors")])
    v_run = ["train", "--config", "tiny", "--pretrained-model", str(work / "tiny-sd15-v"), "--instance-dir", str(CATS)]
    v_run += ["--prompt", PROMPT, "--steps", "3", "--sample-every", "0", "--output-dir", str(work / "sd15-v-kron")]
    return out, v_run


def v_prediction_copy(work: Path) -> None:
    """tiny-sd15-v: the tiny SD 1.5 pipeline with a v-prediction scheduler."""
    target = work / "tiny-sd15-v"
    shutil.copytree(work / "tiny-sd15", target)
    config = target / "scheduler" / "scheduler_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "prediction_type": "v_prediction"}))


def run_tree(tree: Path, work: Path) -> None:
    """Every command, with the krona of `tree`, one thread, offline."""
    first, v_run = commands(work)
    _run(tree, first)
    v_prediction_copy(work)
    _run(tree, [v_run])


def _run(tree: Path, batch: list[list[str]]) -> None:
    """krona commands in one process with the krona of `tree`; exits with the last line of what failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(batch)], cwd=tree, env=env, text=True,
                          capture_output=True)  # fmt: skip
    if done.returncode:
        sys.exit(f"{tree}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")


def _safetensors_hashes(path: Path) -> tuple[str, str]:
    """sha256 of a .safetensors file's tensors (key, dtype, shape, bytes) and of its metadata but what differs between
    two saves of the same adapter: the time it was written, and the sha256 a merge records of each adapter file (whose
    header holds that time, in an order safetensors picks anew at every save)."""
    import torch
    from safetensors import safe_open

    tensors = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != "modelspec.date"}
        if "krona_merge" in metadata:
            merge = json.loads(metadata["krona_merge"])
            merge["adapters"] = [{k: v for k, v in a.items() if k != "sha256"} for a in merge["adapters"]]
            metadata["krona_merge"] = json.dumps(merge)
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            tensors.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            tensors.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return tensors.hexdigest(), hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def file_hashes(work: Path) -> dict[str, str]:
    """sha256 of every output under `work` but the base pipelines: a .safetensors file's tensors and metadata apart,
    images' pixels, validation.json."""
    from PIL import Image

    hashes = {}
    for path in sorted(work.rglob("*")):
        relative = path.relative_to(work).as_posix()
        if not path.is_file() or relative.startswith("tiny-"):
            continue
        if path.suffix == ".safetensors":
            hashes[f"{relative} tensors"], hashes[f"{relative} metadata"] = _safetensors_hashes(path)
        elif path.suffix == ".png":
            with Image.open(path) as image:
                hashes[relative] = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
        elif path.name == "validation.json":
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="HEAD", help="the reference commit (default HEAD: what is committed)")
    ap.add_argument("--output", type=Path, help="write the hashes and differences here as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="krona-golden-") as scratch:
        scratch = Path(scratch)
        reference = scratch / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.ref], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            results = {}
            for name, tree in (("reference", reference), ("working tree", ROOT)):
                work = scratch / "out"  # the same path for both: files record their base model's path
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                run_tree(tree, work)
                results[name] = file_hashes(work)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=True)
    ref, new = results["reference"], results["working tree"]
    differ = sorted(k for k in ref.keys() | new.keys() if ref.get(k) != new.get(k))
    print(f"{'output':72} {'same':>6}")
    for key in sorted(ref.keys() | new.keys()):
        print(f"{key:72} {'yes' if key not in differ else 'NO':>6}")
    total = len(ref.keys() | new.keys())
    print(f"\n{total - len(differ)} of {total} outputs bit-identical to {args.ref}")
    if args.output:
        args.output.write_text(json.dumps({"ref": args.ref, "hashes": results, "differ": differ}, indent=2))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
