"""Subject and prompt fidelity, as the DiffuseKronA and DreamBooth papers measure them (reference §3).

- CLIP-I: the mean cosine similarity between CLIP image embeddings over every (generated, reference) pair;
- CLIP-T: the mean, over generated images, of the cosine similarity between an image and its prompt with the
  subject's identifier word removed ("a photo of sks dog" is scored as "a photo of dog");
- DINO: the mean cosine similarity between DINO ViT CLS embeddings over every (generated, reference) pair.

The paper's models are CLIP ViT-B/32 and DINO ViT-S/16 (`DEFAULT_CLIP_MODEL`, `DEFAULT_DINO_MODEL`). Images go
through the model's own preprocessing, always with transformers' PIL image processors (never the torchvision ones):
the numbers do not change with whether torchvision happens to be installed, and PIL's bicubic resize is what
OpenAI's CLIP preprocessing uses.

Library code: raises KronaError, never prints.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import KronaError
from ..inference.sampling import png_text
from ..paths import expand
from ..pipeline.hub import model_error, model_source

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"

# The transformers model types each scorer accepts (config.json's "model_type").
_CLIP_TYPES = ("clip",)
_DINO_TYPES = ("vit", "dinov2")

Progress = Callable[[int, int], None]


def remove_identifier(prompt: str, identifier: str = "sks") -> str:
    """The prompt without the identifier as a whole word, any case, spaces collapsed: 'a photo of sks dog' ->
    'a photo of dog'. A space left before punctuation ('of , a') tokenizes as without it in CLIP."""
    words = identifier.split()
    if not words:
        return " ".join(prompt.split())
    pattern = r"\s+".join(re.escape(w) for w in words)
    cleaned = re.sub(rf"(?<!\w){pattern}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    return " ".join(cleaned.split())


class Embedder:
    """A loaded CLIP or DINO model with its image processor (and, for CLIP, its tokenizer)."""

    def __init__(self, kind: str, model, processor, tokenizer=None, device: str | torch.device = "cpu", name: str = ""):
        self.kind, self.model, self.processor, self.tokenizer = kind, model, processor, tokenizer
        self.device, self.name = torch.device(device), name

    @classmethod
    def clip(cls, name: str, device: str | torch.device = "cpu") -> Embedder:
        """A CLIPModel (image and text towers), its image processor and tokenizer, from a hub id or a local folder."""
        from transformers import AutoTokenizer, CLIPModel

        source = model_source(name, "--clip-model", "CLIP")
        with _loading(name, "--clip-model", "CLIP"):
            model_type = _model_type(source)
            if model_type not in _CLIP_TYPES:
                raise _WrongKind(f"it holds a '{model_type}' model, not a CLIP model with image and text towers")
            model = _weights(CLIPModel, source)
            processor = _image_processor(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        return cls("clip", _to(model, device, name), processor, tokenizer, device, name)

    @classmethod
    def dino(cls, name: str, device: str | torch.device = "cpu") -> Embedder:
        """A DINO ViT (ViTModel; DINOv2 also works) and its image processor, from a hub id or a local folder. Its
        embedding is the CLS token of the last hidden state."""
        from transformers import AutoModel, ViTModel

        source = model_source(name, "--dino-model", "DINO")
        with _loading(name, "--dino-model", "DINO"):
            model_type = _model_type(source)
            if model_type not in _DINO_TYPES:
                raise _WrongKind(f"it holds a '{model_type}' model, not a DINO ViT ({', '.join(_DINO_TYPES)})")
            if model_type == "vit":  # no pooler: the CLS token is the embedding
                model = _weights(ViTModel, source, add_pooling_layer=False)
            else:
                model = _weights(AutoModel, source)
            processor = _image_processor(source)
        return cls("dino", _to(model, device, name), processor, None, device, name)

    @property
    def dim(self) -> int:
        """Length of the embeddings."""
        config = self.model.config
        return config.projection_dim if self.kind == "clip" else config.hidden_size

    @torch.inference_mode()
    def images(self, images: Sequence, batch_size: int = 16, progress: Progress | None = None) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings of PIL images (converted to RGB), `batch_size` at a time;
        `progress(done, N)` after each batch."""
        _check_batch_size(batch_size)
        rows = [torch.zeros(0, self.dim)]
        for start in range(0, len(images), batch_size):
            batch = [
                image if image.mode == "RGB" else image.convert("RGB") for image in images[start : start + batch_size]
            ]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, self.model.dtype)
            if self.kind == "clip":
                out = self.model.get_image_features(pixel_values=pixels)
                out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
            else:
                out = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            rows.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu())
            if progress is not None:
                progress(start + len(batch), len(images))
        return torch.cat(rows)

    @torch.inference_mode()
    def texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 L2-normalised CLIP text embeddings (texts past CLIP's 77 tokens are truncated)."""
        if self.kind != "clip":
            raise KronaError("text embeddings need a CLIP model; this is a DINO model")
        _check_batch_size(batch_size)
        rows = [torch.zeros(0, self.dim)]
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.device)
            out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            out = getattr(out, "pooler_output", out)
            rows.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu())
        return torch.cat(rows)


class _WrongKind(Exception):
    """A folder or hub id that loads but holds the wrong kind of model."""


@contextmanager
def _loading(name: str, flag: str, what: str):
    """Turns any failure to load into a KronaError naming the flag to set."""
    try:
        yield
    except KronaError:
        raise
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not expand(name).is_dir():  # tried as a hub id
            detail = f"no such local folder, and from the hub: {detail}"
        raise model_error(name, flag, what, detail) from e


def _model_type(source: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).model_type


def _weights(model_class, source: str, **options):
    """The model in float32; a checkpoint that leaves any weight uninitialised (a different or damaged model, which
    transformers would fill with random values and only log) is an error."""
    dtype_key = "dtype" if _transformers_5() else "torch_dtype"
    model, info = model_class.from_pretrained(source, output_loading_info=True, **{dtype_key: torch.float32}, **options)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise _WrongKind(f"{len(missing)} weights missing from the checkpoint: {listed}")
    return model.eval()


def _image_processor(source: str):
    """The model's image processor, PIL backend (the same numbers with or without torchvision installed)."""
    from transformers import AutoImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _transformers_5():
            return AutoImageProcessor.from_pretrained(source, backend="pil")
        return AutoImageProcessor.from_pretrained(source, use_fast=False)


def _transformers_5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _to(model, device, name: str):
    try:
        return model.to(device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise KronaError(f"cannot move the model '{name}' to device '{device}' ({e}); pick an available device") from e


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KronaError(f"batch size must be a positive whole number, not {batch_size!r}; pass --batch-size 16")


@dataclass
class Metrics:
    clip_i: float | None  # mean cosine over all (generated, reference) pairs of CLIP image embeddings
    clip_t: float | None  # mean over generated images with a prompt of cos(image, prompt without the identifier)
    dino: float | None  # mean cosine over all (generated, reference) pairs of DINO CLS embeddings
    generated: int
    reference: int
    per_image: list[dict] = field(default_factory=list)  # file, prompt, clip_i, clip_t, dino per generated image

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompt(path: Path) -> str | None:
    """The prompt `krona sample` wrote into a PNG's "prompt" text chunk; None for other files or an empty prompt."""
    prompt = png_text(path, "prompt")
    return prompt if prompt is not None and prompt.strip() else None


def is_sample_grid(path: Path) -> bool:
    """True for the grids `krona sample` and training write (their metadata list the prompts and seeds of a grid)."""
    return png_text(path, "prompts") is not None and png_text(path, "seeds") is not None


def evaluate(
    generated: Sequence[Path],
    reference: Sequence[Path],
    prompts: Sequence[str] | None = None,
    identifier: str = "sks",
    clip: Embedder | None = None,
    dino: Embedder | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> Metrics:
    """Score generated images against the subject's reference photos (and their prompts).

    `prompts`: one per generated image, one for all, or None to read each PNG's "prompt" metadata (images without
    one get no CLIP-T). A metric whose model is not given is None. Images are decoded once, `batch_size` at a time,
    and go through both models; `progress(done, total)` after each batch, counting generated and reference images.
    """
    from ..images import load_image

    generated, reference = [Path(p) for p in generated], [Path(p) for p in reference]
    if not generated or not reference:
        raise KronaError("nothing to score: give at least one generated image and one reference photo")
    _check_batch_size(batch_size)
    if prompts is None:
        prompts = [read_prompt(p) for p in generated]
    elif isinstance(prompts, str):
        prompts = [prompts] * len(generated)
    elif len(prompts) == 1:
        prompts = list(prompts) * len(generated)
    elif len(prompts) != len(generated):
        raise KronaError(f"{len(prompts)} prompts for {len(generated)} images; give one prompt, or one per image")
    prompts = [p if p and p.strip() else None for p in prompts]

    embedders = {name: e for name, e in (("clip", clip), ("dino", dino)) if e is not None}
    total, done = len(generated) + len(reference), 0

    def embed(paths: list[Path]) -> dict[str, torch.Tensor]:
        nonlocal done
        out = {name: [] for name in embedders}
        for start in range(0, len(paths), batch_size):
            batch = [load_image(p) for p in paths[start : start + batch_size]]
            for name, embedder in embedders.items():
                out[name].append(embedder.images(batch, batch_size))
            for image in batch:
                image.close()
            done += len(batch)
            if progress is not None:
                progress(done, total)
        return {name: torch.cat(rows) for name, rows in out.items()}

    gen, ref = (embed(generated), embed(reference)) if embedders else ({}, {})
    scores, rows = score_embeddings(gen, ref, prompts, identifier, clip)
    per_image = [{"file": str(p)} | row for p, row in zip(generated, rows)]
    return Metrics(scores["clip_i"], scores["clip_t"], scores["dino"], len(generated), len(reference), per_image)


def score_embeddings(
    gen: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    prompts: Sequence[str | None],
    identifier: str,
    clip: Embedder | None,
) -> tuple[dict[str, float | None], list[dict]]:
    """({clip_i, clip_t, dino}, a row per generated image with its prompt and the three) from unit embeddings by
    model ("clip", "dino": generated `gen`, reference `ref`); CLIP-T of the images with a prompt, text embedded by
    `clip`. A metric whose model is missing is None."""
    per_image = [{"prompt": prompt, "clip_i": None, "clip_t": None, "dino": None} for prompt in prompts]
    scores: dict[str, float | None] = {"clip_i": None, "clip_t": None, "dino": None}
    for name, key in (("clip", "clip_i"), ("dino", "dino")):
        if name in gen:
            similarity = gen[name] @ ref[name].T  # (generated, reference) cosines: unit vectors
            scores[key] = float(similarity.double().mean())
            for row, value in zip(per_image, similarity.double().mean(dim=1).tolist()):
                row[key] = value
    scored = [i for i, p in enumerate(prompts) if p is not None]
    if clip is not None and "clip" in gen and scored:
        text = clip.texts([remove_identifier(prompts[i], identifier) for i in scored])
        values = (gen["clip"][scored] * text).sum(dim=1).double().tolist()
        for i, value in zip(scored, values):
            per_image[i]["clip_t"] = value
        scores["clip_t"] = sum(values) / len(values)
    return scores, per_image
