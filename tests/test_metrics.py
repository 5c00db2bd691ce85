"""CLIP-I, CLIP-T and DINO against a direct computation from the same models' outputs, on tiny local models.

`evaluate` runs on models loaded from saved folders (offline); the expected values are computed here from the
in-memory models `tiny.build_tiny_*` returns, called directly (vision tower + projection, CLS token), normalised
and compared pair by pair, so a save/load round trip that changed anything would fail too.
"""

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from krona_cli.errors import KronaError
from krona_cli.scoring.metrics import Embedder, Metrics, evaluate, read_prompt, remove_identifier

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples" / "cat").glob("*.jpg"))
TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from krona_cli.pipeline.tiny import make_tiny_clip, make_tiny_dino

    root = tmp_path_factory.mktemp("scorers")
    return make_tiny_clip(root / "clip"), make_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def models(folders):
    return Embedder.clip(str(folders[0])), Embedder.dino(str(folders[1]))


@pytest.fixture(scope="module")
def direct():
    """The in-memory tiny models, called directly: (image embedding fns, text embedding fn), normalised by hand."""
    from krona_cli.images import load_image
    from krona_cli.pipeline.tiny import build_tiny_clip, build_tiny_dino

    clip, clip_processor, tokenizer = build_tiny_clip(0)
    dino, dino_processor = build_tiny_dino(0)

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def clip_images(paths):
        pixels = clip_processor(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        return unit(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output))

    @torch.no_grad()
    def dino_images(paths):
        pixels = dino_processor(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        return unit(dino(pixel_values=pixels).last_hidden_state[:, 0])

    @torch.no_grad()
    def clip_texts(texts):
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        return unit(clip.text_projection(clip.text_model(**tokens).pooler_output))

    return clip_images, dino_images, clip_texts


def _all_pairs_mean(g, r):
    return sum(float(g[i] @ r[j]) for i in range(len(g)) for j in range(len(r))) / (len(g) * len(r))


def _png(path: Path, source: Path, prompt: str | None) -> Path:
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", prompt)
        info.add_text("seed", "0")
    Image.open(source).convert("RGB").save(path, pnginfo=info)
    return path


def test_metrics_equal_a_direct_computation(models, direct):
    clip, dino = models
    clip_images, dino_images, clip_texts = direct
    generated, reference = EXAMPLES[:3], EXAMPLES[3:5]
    prompts = ["a photo of sks cat", "a sks cat on the beach", "SKS cat in the snow"]
    cleaned = ["a photo of cat", "a cat on the beach", "cat in the snow"]
    metrics = evaluate(generated, reference, prompts, clip=clip, dino=dino)

    g, r = clip_images(generated), clip_images(reference)
    gd, rd = dino_images(generated), dino_images(reference)
    t = clip_texts(cleaned)
    assert metrics.clip_i == pytest.approx(_all_pairs_mean(g, r), abs=TOL)
    assert metrics.dino == pytest.approx(_all_pairs_mean(gd, rd), abs=TOL)
    assert metrics.clip_t == pytest.approx(sum(float(g[i] @ t[i]) for i in range(3)) / 3, abs=TOL)
    assert (metrics.generated, metrics.reference) == (3, 2)
    for i, row in enumerate(metrics.per_image):
        assert row["file"] == str(generated[i]) and row["prompt"] == prompts[i]
        assert row["clip_i"] == pytest.approx(sum(float(g[i] @ r[j]) for j in range(2)) / 2, abs=TOL)
        assert row["dino"] == pytest.approx(sum(float(gd[i] @ rd[j]) for j in range(2)) / 2, abs=TOL)
        assert row["clip_t"] == pytest.approx(float(g[i] @ t[i]), abs=TOL)
    # The test can tell: different photos are not identical to the scorers, and the identifier changes CLIP-T.
    assert abs(metrics.clip_i - 1) > 1e-3 and abs(metrics.dino - 1) > 1e-3
    raw = clip_texts(prompts)
    assert abs(metrics.clip_t - sum(float(g[i] @ raw[i]) for i in range(3)) / 3) > 1e-4
    assert set(metrics.to_dict()) == {"clip_i", "clip_t", "dino", "generated", "reference", "per_image"}


def test_the_same_single_image_scores_one(models):
    clip, dino = models
    metrics = evaluate(EXAMPLES[:1], EXAMPLES[:1], clip=clip, dino=dino)
    assert metrics.clip_i == pytest.approx(1.0, abs=1e-6) and metrics.dino == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_t is None and metrics.per_image[0]["clip_t"] is None  # a JPEG carries no prompt


def test_clip_t_reads_png_prompts_and_drops_the_identifier(models, direct, tmp_path):
    clip, _ = models
    clip_images, _, clip_texts = direct
    pngs = [
        _png(tmp_path / "p00-s0.png", EXAMPLES[0], "a photo of sks cat on the moon"),
        _png(tmp_path / "p01-s0.png", EXAMPLES[1], "a Sks cat, sks, in the snow"),
        _png(tmp_path / "p02-s0.png", EXAMPLES[2], None),
    ]
    assert read_prompt(pngs[0]) == "a photo of sks cat on the moon"
    assert read_prompt(pngs[2]) is None and read_prompt(EXAMPLES[0]) is None  # no chunk; a JPEG
    with pytest.raises(KronaError, match="cannot read image"):
        read_prompt(tmp_path / "missing.png")

    metrics = evaluate(pngs, EXAMPLES[3:4], clip=clip)
    g, t = clip_images(pngs[:2]), clip_texts(["a photo of cat on the moon", "a cat, , in the snow"])
    assert metrics.clip_t == pytest.approx((float(g[0] @ t[0]) + float(g[1] @ t[1])) / 2, abs=TOL)
    assert [row["prompt"] for row in metrics.per_image] == [read_prompt(p) for p in pngs]
    assert metrics.per_image[2]["clip_t"] is None and metrics.per_image[2]["clip_i"] is not None
    assert metrics.dino is None  # no DINO model given

    # One prompt for every image overrides the metadata; another identifier leaves "sks" in.
    one = evaluate(pngs, EXAMPLES[3:4], ["a photo of sks cat"], identifier="zwx", clip=clip)
    t = clip_texts(["a photo of sks cat"])
    assert one.clip_t == pytest.approx(float((clip_images(pngs) @ t[0]).mean()), abs=TOL)


def test_batches_and_progress(models):
    clip, dino = models
    calls = []
    small = evaluate(
        EXAMPLES[:3],
        EXAMPLES[3:5],
        ["a sks cat"],
        clip=clip,
        dino=dino,
        batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    whole = evaluate(EXAMPLES[:3], EXAMPLES[3:5], ["a sks cat"], clip=clip, dino=dino, batch_size=16)
    assert calls == [(2, 5), (3, 5), (5, 5)]  # generated in batches of two, then the references
    for key in ("clip_i", "clip_t", "dino"):
        assert getattr(small, key) == pytest.approx(getattr(whole, key), abs=1e-6)
    vectors = clip.images([Image.open(p) for p in EXAMPLES[:3]], batch_size=2)
    assert vectors.dtype == torch.float32 and vectors.shape == (3, 16)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert clip.texts(["a cat", "a dog"]).shape == (2, 16) and dino.images([]).shape == (0, 32)


def test_without_models_and_bad_arguments(models):
    clip, dino = models
    none = evaluate(EXAMPLES[:2], EXAMPLES[2:3], ["a sks cat"])
    assert isinstance(none, Metrics) and (none.clip_i, none.clip_t, none.dino) == (None, None, None)
    only_dino = evaluate(EXAMPLES[:2], EXAMPLES[2:3], ["a sks cat"], dino=dino)
    assert only_dino.clip_i is None and only_dino.clip_t is None and only_dino.dino is not None
    with pytest.raises(KronaError, match="2 prompts for 3 images"):
        evaluate(EXAMPLES[:3], EXAMPLES[3:4], ["a", "b"], clip=clip)
    with pytest.raises(KronaError, match="nothing to score"):
        evaluate([], EXAMPLES[:1], clip=clip)
    with pytest.raises(KronaError, match="CLIP"):
        dino.texts(["a cat"])
    with pytest.raises(KronaError, match="batch size"):
        evaluate(EXAMPLES[:1], EXAMPLES[:1], clip=clip, batch_size=0)


def test_loads_offline_from_local_folders(folders, direct, monkeypatch):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before any import

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    clip, dino = Embedder.clip(str(folders[0])), Embedder.dino(str(folders[1]))
    clip_images, dino_images, _ = direct
    images = [Image.open(p) for p in EXAMPLES[:2]]
    assert torch.allclose(clip.images(images), clip_images(EXAMPLES[:2]), atol=1e-6)
    assert torch.allclose(dino.images(images), dino_images(EXAMPLES[:2]), atol=1e-6)


def test_unloadable_models_name_their_flags(folders, tmp_path):
    clip_folder, dino_folder = folders
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    for load, flag, wrong in (
        (Embedder.clip, "--clip-model", dino_folder),
        (Embedder.dino, "--dino-model", clip_folder),
    ):
        for name in (
            str(tmp_path / "nothing"),
            "no-such-org/no-such-model",
            str(a_file),
            str(empty),
            str(wrong),
            "~/no-such-folder",
            "",
        ):
            with pytest.raises(KronaError, match=flag) as error:
                load(name)
            message = str(error.value)
            assert "Traceback" not in message and "\n" not in message and "with a local folder or a hub id" in message
    with pytest.raises(KronaError, match="not a DINO ViT"):
        Embedder.dino(str(clip_folder))  # transformers would load it into a ViT with random weights
    with pytest.raises(KronaError, match="not a CLIP model"):
        Embedder.clip(str(dino_folder))
    damaged = shutil.copytree(dino_folder, tmp_path / "damaged")  # a ViT config beside a CLIP model's weights
    shutil.copy(clip_folder / "model.safetensors", damaged / "model.safetensors")
    with pytest.raises(KronaError, match="weights missing") as error:
        Embedder.dino(str(damaged))
    assert "weights missing from the checkpoint" in str(error.value) and "--dino-model" in str(error.value)


def test_remove_identifier():
    assert remove_identifier("a photo of sks dog") == "a photo of dog"
    assert remove_identifier("sks dog") == "dog" and remove_identifier("a dog, sks") == "a dog,"
    assert remove_identifier("SKS dog, Sks and sks", "sks") == "dog, and"  # every occurrence, any case
    assert remove_identifier("a sksy dog near skss") == "a sksy dog near skss"  # whole words only
    assert remove_identifier("a photo   of zwx  dog", "zwx") == "a photo of dog"
    assert remove_identifier("a photo of <sks> dog", "<sks>") == "a photo of dog"  # not word characters
    assert remove_identifier("a photo of sks dog", "") == "a photo of sks dog"
    assert remove_identifier("a photo of ohwx man", "sks") == "a photo of ohwx man"


def test_tiny_scorers_are_deterministic():
    from krona_cli.pipeline.tiny import build_tiny_clip, build_tiny_dino

    state = torch.random.get_rng_state()
    first, second, other = build_tiny_clip(0)[0].state_dict(), build_tiny_clip(0)[0].state_dict(), build_tiny_clip(1)[0]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["visual_projection.weight"], other.state_dict()["visual_projection.weight"])
    a, b = build_tiny_dino(3)[0].state_dict(), build_tiny_dino(3)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_eval_leaves_out_sample_grids(tmp_path, tiny_sdxl_dir, capsys):
    """`krona sample` writes grid.png beside its images; eval scores the images, not the grid (nor only a grid)."""
    from krona_cli.cli import main
    from krona_cli.pipeline.tiny import make_tiny_clip, make_tiny_dino

    clip, dino = make_tiny_clip(tmp_path / "clip"), make_tiny_dino(tmp_path / "dino")
    assert (
        main(
            [
                "sample",
                "--pretrained-model",
                str(tiny_sdxl_dir),
                "--prompt",
                "a photo of sks cat",
                "-n",
                "2",
                "--sample-steps",
                "2",
                "--output-dir",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    models = ["--clip-model", str(clip), "--dino-model", str(dino), "--reference", str(tmp_path / "s")]
    assert main(["eval", "--images", str(tmp_path / "s"), *models, "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["generated"] == 2
    only_grid = tmp_path / "grid-only"
    only_grid.mkdir()
    (only_grid / "grid.png").write_bytes((tmp_path / "s" / "grid.png").read_bytes())
    capsys.readouterr()
    assert main(["eval", "--images", str(only_grid), *models]) == 2
    assert "only sample grids" in capsys.readouterr().err
