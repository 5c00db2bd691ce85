"""Shared test helpers: adapters with random (non-zero) updates on the tiny pipelines, and a tiny training command."""

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open

from krona_cli.formats import collect_adapter, to_lycoris
from krona_cli.inference.merge import pipeline_components
from krona_cli.kron import adapted_layers, inject
from krona_cli.pipeline.tiny import build_tiny_pipeline


def random_adapter(arch, scale=1.0, seed=5, unet_targets="attn-ff", training=None):
    """Kronecker adapters on the tiny pipeline's UNet (4x4) and every text encoder (2x2), random B, collected."""
    pipe = build_tiny_pipeline(arch)
    components = pipeline_components(pipe)
    torch.manual_seed(seed)
    for name, model in components.items():
        inject(
            model,
            targets=unet_targets if name == "unet" else "text",
            factors="4x4" if name == "unet" else "2x2",
            scale=scale,
        )
    for model in components.values():
        for layer in adapted_layers(model).values():
            with torch.no_grad():
                layer.kron_b.normal_(std=0.05)
    return collect_adapter(
        components,
        scale=scale,
        base_model=f"tiny-{arch}",
        architecture=arch,
        targets={c: (unet_targets if c == "unet" else "text") for c in components},
        training=training,
    )


def factors_of(adapter):
    """{component: {module: "OxI"}}: the factors of every layer of a Kronecker adapter."""
    return {c: {m: layer.factors for m, layer in mods.items()} for c, mods in adapter.layers.items()}


def factor_tensors(adapter):
    """{(component, module, "a" | "b"): tensor}: the factors of every layer of a Kronecker adapter."""
    return {
        (c, m, name): getattr(layer, name)
        for c, mods in adapter.layers.items()
        for m, layer in mods.items()
        for name in ("a", "b")
    }


def relayout(adapter, layer_type, **changes):
    """The adapter with every layer's factors (A, B) held by `layer_type` (KronLayer, DiffuseKronALayer), and
    `changes` to its settings."""
    layers = {c: {m: layer_type(layer.a, layer.b) for m, layer in mods.items()} for c, mods in adapter.layers.items()}
    return dataclasses.replace(adapter, layers=layers, **changes)


def fixed_pair_loss(pipe, arch, folder, prompt):
    """Denoising loss of a pipeline on the (center-cropped, 64 px) images of `folder` at fixed noise and timesteps."""
    from krona_cli import families
    from krona_cli.training.data import ImageSet

    images = ImageSet(folder, prompt, 64, center_crop=True)
    pixels = torch.stack([images[i].pixels for i in range(len(images))])
    family = families.get(arch)
    objective = family.objective(pipe.scheduler.config)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=g)
        cond = family.encode_prompts(family.tokenizers(pipe), family.text_models(pipe), [prompt] * len(latents))
        geometry = torch.tensor([images[i].time_ids for i in range(len(images))], dtype=torch.float32)
        noisy = objective.noisy(latents, noise, timesteps)
        prediction = family.denoise(pipe.unet, noisy, timesteps, cond, geometry, torch.float32)
        return float(objective.per_sample_loss(prediction, noise, timesteps, None).mean())


def put_in_hub_cache(folder, repo_id, cache):
    """Copy a diffusers folder into a Hugging Face hub cache (`HF_HUB_CACHE` layout) as `repo_id`'s main revision,
    the way `hf download` leaves it: blobs, a snapshot of links to them, and refs/main."""
    import hashlib
    import os
    import shutil
    from pathlib import Path

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


CAT_PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "cat"


def tiny_train_args(pipeline, out, *more) -> list[str]:
    """`krona train` on a tiny pipeline with the tiny preset and the cat photos, into `out`, then `more` flags."""
    args = ["train", "--config", "tiny", "--pretrained-model", pipeline, "--instance-dir", CAT_PHOTOS]
    return [str(a) for a in (*args, "--prompt", "a photo of sks cat", "--output-dir", out, *more)]


def read_torch(path):
    """A .safetensors file's tensors and metadata as torch's own reader gives them."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def lycoris_torch(adapter, title=None):
    """`to_lycoris`'s tensors (numpy) as torch tensors, and its metadata."""
    tensors, metadata = to_lycoris(adapter, title)
    return {k: torch.from_numpy(v) for k, v in tensors.items()}, metadata


class TorchAtTinyWidth:
    """torch, except that `split` by diffusers' hard-coded FLUX.1 widths (3072 × 3, 12288) splits a tiny model's
    `linear1` in the same proportions (h, h, h, 4h). diffusers 0.42's `convert_flux_transformer_checkpoint_to_diffusers`
    fixes `inner_dim = 3072`, so it (and `from_single_file`, which calls it) can read only the full-size model;
    everything else it does is left as it is. Patch it in with
    `monkeypatch.setattr(diffusers.loaders.single_file_utils, "torch", TorchAtTinyWidth())`."""

    SPLIT = (3072, 3072, 3072, 12288)

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(tensor, sizes, dim=0):
        if tuple(sizes) == TorchAtTinyWidth.SPLIT:
            h = tensor.shape[dim] // 7
            sizes = (h, h, h, 4 * h)
        return torch.split(tensor, sizes, dim)


def record_losses(monkeypatch, diffusers_loss, **script) -> list:
    """Make every training loss also be computed by `diffusers_loss(pipe, denoiser, latents, noise, sigmas, captions,
    **script)` on that micro-batch's own draws, before the step changes the adapter; returns the list that collects
    (sigmas, krona's loss, diffusers') per micro-batch."""
    from krona_cli.training.run import Run

    seen, original = [], Run.loss

    def spy(run, micro):
        latents, noise, sigmas, _, captions = run.batch(micro)  # this step's draws, made again: they depend on it
        with torch.no_grad():
            expected = diffusers_loss(run.encoder.pipe, run.denoiser, latents, noise, sigmas, captions, **script)
        loss = original(run, micro)
        seen.append((sigmas, loss.detach(), expected))
        return loss

    monkeypatch.setattr(Run, "loss", spy)
    return seen
