"""Subject and prompt fidelity, as the DiffuseKronA and DreamBooth papers measure them.

- CLIP-I: the mean cosine similarity between CLIP image embeddings of every (generated, reference) pair;
- CLIP-T: the mean cosine similarity between each generated image and its prompt, the identifier token removed;
- DINO: the mean cosine similarity between DINO ViT CLS embeddings of every (generated, reference) pair.

Library code: raises KronaError, never prints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import KronaError

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"


def remove_identifier(prompt: str, identifier: str = "sks") -> str:
    """The prompt without the identifier word: 'a photo of sks dog' -> 'a photo of dog'."""
    cleaned = re.sub(rf"\b{re.escape(identifier)}\b", " ", prompt, flags=re.IGNORECASE)
    return " ".join(cleaned.split())


class Embedder:
    """A loaded CLIP or DINO model with its image processor (and, for CLIP, its tokenizer)."""

    def __init__(self, kind: str, model, processor, tokenizer=None, device="cpu"):
        self.kind, self.model, self.processor, self.tokenizer, self.device = kind, model, processor, tokenizer, device

    @classmethod
    def clip(cls, name: str, device="cpu") -> Embedder:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        model, processor, tokenizer = _load(name, "--clip-model", "CLIP", CLIPModel, CLIPImageProcessor, AutoTokenizer)
        return cls("clip", model.to(device).eval(), processor, tokenizer, device)

    @classmethod
    def dino(cls, name: str, device="cpu") -> Embedder:
        from transformers import AutoImageProcessor, ViTModel

        model, processor, _ = _load(name, "--dino-model", "DINO", ViTModel, AutoImageProcessor, None,
                                    add_pooling_layer=False)  # the CLS token is the embedding; no pooler
        return cls("dino", model.to(device).eval(), processor, None, device)

    @torch.no_grad()
    def images(self, images: Sequence, batch_size: int = 16, progress: Callable[[int, int], None] | None = None):
        """(N, D) float32 L2-normalised embeddings of PIL images."""
        rows = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(images=list(images[start : start + batch_size]), return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device)
            if self.kind == "clip":
                out = self.model.get_image_features(pixel_values=pixels)
                out = getattr(out, "pooler_output", out)
            else:
                out = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            rows.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu())
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
        return torch.cat(rows)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]):
        """(N, D) float32 L2-normalised CLIP text embeddings."""
        if self.kind != "clip":
            raise KronaError("text embeddings need a CLIP model, not DINO")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


def _load(name: str, flag: str, what: str, model_class, processor_class, tokenizer_class, **model_options):
    try:
        model = model_class.from_pretrained(name, **model_options)
        processor = processor_class.from_pretrained(name)
        tokenizer = tokenizer_class.from_pretrained(name) if tokenizer_class is not None else None
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KronaError(
            f"cannot load the {what} model '{name}' ({detail[:160]}); pass {flag} with a local folder, or a hub id "
            "while online"
        ) from None
    return model, processor, tokenizer


@dataclass
class Metrics:
    clip_i: float | None
    clip_t: float | None
    dino: float | None
    generated: int
    reference: int
    per_image: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompt(path: Path) -> str | None:
    """The prompt `krona sample` wrote into a PNG's metadata, or None."""
    from PIL import Image

    with Image.open(path) as image:
        return getattr(image, "text", {}).get("prompt") if image.format == "PNG" else None


def evaluate(
    generated: Sequence[Path],
    reference: Sequence[Path],
    prompts: Sequence[str] | None = None,
    identifier: str = "sks",
    clip: Embedder | None = None,
    dino: Embedder | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Metrics:
    """Score generated images against the subject's photos (and their prompts). `prompts`: one per image, one for
    all, or None to read each PNG's metadata; a metric whose model is not given is None."""
    from .data import load_image

    if not generated or not reference:
        raise KronaError("nothing to score: give at least one generated image and one reference photo")
    if prompts is None:
        prompts = [read_prompt(Path(p)) for p in generated]
    elif len(prompts) == 1:
        prompts = list(prompts) * len(generated)
    elif len(prompts) != len(generated):
        raise KronaError(f"{len(prompts)} prompts for {len(generated)} images; give one prompt, or one per image")
    gen_images = [load_image(Path(p)) for p in generated]
    ref_images = [load_image(Path(p)) for p in reference]
    total = (len(gen_images) + len(ref_images)) * ((clip is not None) + (dino is not None))
    done = [0]

    def embed(model: Embedder, images):
        def step(d, _n):
            if progress is not None:
                progress(done[0] + d, total)

        out = model.images(images, batch_size, step)
        done[0] += len(images)
        return out

    per_image = [{"file": str(p), "prompt": prompts[i]} for i, p in enumerate(generated)]
    clip_i = clip_t = dino_score = None
    if clip is not None:
        gen_vectors = embed(clip, gen_images)
        similarity = gen_vectors @ embed(clip, ref_images).T
        clip_i = float(similarity.mean())
        for row, value in zip(per_image, similarity.mean(dim=1).tolist()):
            row["clip_i"] = value
        scored = [i for i, p in enumerate(prompts) if p]
        if scored:
            text_vectors = clip.texts([remove_identifier(prompts[i], identifier) for i in scored])
            values = (gen_vectors[scored] * text_vectors).sum(dim=1).tolist()
            for i, value in zip(scored, values):
                per_image[i]["clip_t"] = value
            clip_t = sum(values) / len(values)
    if dino is not None:
        similarity = embed(dino, gen_images) @ embed(dino, ref_images).T
        dino_score = float(similarity.mean())
        for row, value in zip(per_image, similarity.mean(dim=1).tolist()):
            row["dino"] = value
    return Metrics(clip_i, clip_t, dino_score, len(gen_images), len(ref_images), per_image)
