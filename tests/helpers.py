"""Shared test helpers: adapters with random (non-zero) updates on the tiny pipelines."""

import torch

from krona_cli.formats import collect_adapter
from krona_cli.kron import adapted_layers, inject
from krona_cli.merge import pipeline_components
from krona_cli.tiny import build_tiny_pipeline


def random_adapter(arch, scale=1.0, seed=5, unet_targets="attn-ff", training=None):
    """Kronecker adapters on the tiny pipeline's UNet (4x4) and every text encoder (2x2), random B, collected."""
    pipe = build_tiny_pipeline(arch)
    components = pipeline_components(pipe)
    torch.manual_seed(seed)
    for name, model in components.items():
        inject(model, targets=unet_targets if name == "unet" else "text", factors="4x4" if name == "unet" else "2x2", scale=scale)
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
