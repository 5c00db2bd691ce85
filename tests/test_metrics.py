"""CLIP-I, CLIP-T and DINO against a direct computation from the same models' outputs, on tiny local models."""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krona_cli.errors import KronaError
from krona_cli.metrics import Embedder, evaluate, read_prompt, remove_identifier

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples" / "cat").glob("*.jpg"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from krona_cli.tiny import make_tiny_clip, make_tiny_dino

    root = tmp_path_factory.mktemp("scorers")
    return Embedder.clip(str(make_tiny_clip(root / "clip"))), Embedder.dino(str(make_tiny_dino(root / "dino")))


def _direct(embedder, paths):
    """Embeddings computed here from the transformers model itself, normalised by hand."""
    from krona_cli.data import load_image

    pixels = embedder.processor(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if embedder.kind == "clip":
            vision = embedder.model.vision_model(pixel_values=pixels).pooler_output
            out = embedder.model.visual_projection(vision)
        else:
            out = embedder.model(pixel_values=pixels).last_hidden_state[:, 0]
    return out / out.norm(dim=-1, keepdim=True)


def test_metrics_equal_a_direct_computation(models):
    clip, dino = models
    generated, reference = EXAMPLES[:3], EXAMPLES[3:5]
    prompt = "a photo of sks cat"
    metrics = evaluate(generated, reference, [prompt], clip=clip, dino=dino)
    g, r = _direct(clip, generated), _direct(clip, reference)
    expected_clip_i = sum(float(g[i] @ r[j]) for i in range(3) for j in range(2)) / 6
    tokens = clip.tokenizer(["a photo of cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = clip.model.text_projection(clip.model.text_model(**tokens).pooler_output)
    text = text / text.norm(dim=-1, keepdim=True)
    expected_clip_t = sum(float(g[i] @ text[0]) for i in range(3)) / 3
    gd, rd = _direct(dino, generated), _direct(dino, reference)
    expected_dino = sum(float(gd[i] @ rd[j]) for i in range(3) for j in range(2)) / 6
    assert metrics.clip_i == pytest.approx(expected_clip_i, abs=1e-5)
    assert metrics.clip_t == pytest.approx(expected_clip_t, abs=1e-5)
    assert metrics.dino == pytest.approx(expected_dino, abs=1e-5)
    assert metrics.generated == 3 and metrics.reference == 2 and len(metrics.per_image) == 3
    assert abs(metrics.clip_i - 1.0) > 1e-3  # different photos are not identical to the scorer


def test_the_same_single_image_scores_one(models):
    clip, dino = models
    metrics = evaluate(EXAMPLES[:1], EXAMPLES[:1], clip=clip, dino=dino)
    assert metrics.clip_i == pytest.approx(1.0, abs=1e-6) and metrics.dino == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_t is None  # a JPEG carries no prompt


def test_clip_t_reads_png_prompts_and_drops_the_identifier(models, tmp_path):
    clip, _ = models
    info = PngInfo()
    info.add_text("prompt", "a photo of sks cat on the moon")
    buffer = io.BytesIO()
    Image.open(EXAMPLES[0]).convert("RGB").save(buffer, format="PNG", pnginfo=info)
    path = tmp_path / "p00-s0.png"
    path.write_bytes(buffer.getvalue())
    assert read_prompt(path) == "a photo of sks cat on the moon"
    from_metadata = evaluate([path], EXAMPLES[:1], clip=clip)
    given = evaluate([path], EXAMPLES[:1], ["a photo of cat on the moon"], clip=clip, identifier="zzz")
    assert from_metadata.clip_t == pytest.approx(given.clip_t, abs=1e-6)
    assert from_metadata.per_image[0]["prompt"] == "a photo of sks cat on the moon"


def test_remove_identifier():
    assert remove_identifier("a photo of sks dog") == "a photo of dog"
    assert remove_identifier("SKS dog, sks", "sks") == "dog,"
    assert remove_identifier("a sksy dog") == "a sksy dog"  # whole words only


def test_missing_models_name_their_flags(tmp_path):
    with pytest.raises(KronaError, match="--clip-model"):
        Embedder.clip(str(tmp_path / "nothing"))
    with pytest.raises(KronaError, match="--dino-model"):
        Embedder.dino("no-such-org/no-such-model")
