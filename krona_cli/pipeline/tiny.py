"""Tiny, offline, random-weight SDXL- and SD1.5-shaped diffusers pipelines for tests and smoke runs.

Everything here is built in-process in about a second, with no model hub access:

* :func:`build_tokenizer` trains a small CLIP-style byte-level BPE tokenizer on a built-in corpus of prompt words
  and lays its vocabulary out exactly the way OpenAI's CLIP does (512 byte symbols, learned merges, specials).
* :func:`build_tiny_pipeline` assembles a :class:`~diffusers.StableDiffusionXLPipeline` or
  :class:`~diffusers.StableDiffusionPipeline` whose components keep the real architectures' *structure* (block
  types, text-time conditioning, two text encoders, an 8x VAE) at a few megabytes of weights in all.
* :func:`make_tiny` saves such a pipeline with ``save_pretrained`` into a folder that
  ``DiffusionPipeline.from_pretrained(folder)`` loads like a real checkpoint.

The UNets are sized so that every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) has in and out
features among 16, 32, 64 and 80 (SDXL's 32 + 48 concatenated text width), all divisible by 2, 4, 8 and 16, so
Kronecker factorisations such as 2x2, 4x4 or 8x4 divide every one of them.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from krona_cli.atomic import write_folder_atomic
from krona_cli.errors import KronaError
from krona_cli.families import FAMILIES, tiny_archs
from krona_cli.outputs import output_folder
from krona_cli.paths import expand
from krona_cli.pipeline.clip_tokenizer import END_OF_WORD, MAX_LENGTH, tokenizer_from_merges

__all__ = [
    "build_tokenizer",
    "build_tiny_pipeline",
    "make_tiny",
    "build_tiny_clip",
    "build_tiny_dino",
    "make_tiny_clip",
    "make_tiny_dino",
]

# Words typical of text-to-image and DreamBooth prompts. Every word here becomes a single token, as common
# English words are in the real CLIP vocabulary; anything else falls back to sub-words and, ultimately, bytes.
_CORPUS = """
a an the of on in at by with and or for to from into over under near behind above below beside between
is are was be as it its this that these those his her their my your our one two three four five
photo photograph picture image portrait painting drawing sketch illustration render rendering artwork art
sks zwx ohwx skd shs xyz
dog dogs cat cats puppy kitten bird birds horse cow sheep fox wolf bear lion tiger rabbit mouse duck owl
fish frog turtle deer elephant monkey panda squirrel dragon unicorn robot toy teddy plush figurine
man woman men women person people boy girl child children baby face eyes hair smile hand hands
backpack bag bottle can cup mug vase bowl plate chair table sofa bed lamp clock book candle sneaker shoe
boot hat cap glasses sunglasses shirt dress jacket coat scarf car bicycle bike boat ship train plane
house building castle tower bridge church temple city street road town village room kitchen garden park
beach sea ocean lake river waterfall mountain mountains hill forest jungle desert snow ice field meadow
grass flower flowers tree trees leaves rock rocks sand sky cloud clouds rain fog storm sun moon star stars
space planet galaxy night day morning evening sunset sunrise dawn dusk light shadow fire water wood stone
red orange yellow green blue purple pink brown black white gray grey golden silver colorful dark bright
big small tiny large huge little tall short old young new cute happy sad angry beautiful pretty ugly
soft hard shiny wet dry hot cold warm cool fluffy furry wooden metal glass plastic paper
sitting standing running jumping walking flying swimming sleeping eating playing wearing holding
looking riding reading smiling lying floating dancing
style styled stylized realistic photorealistic hyperrealistic cinematic dramatic lighting studio
detailed highly intricate sharp focus blurry bokeh depth close closeup up view shot angle wide lens
camera canon nikon sony mm film analog digital vintage retro modern futuristic fantasy surreal abstract
oil watercolor acrylic pencil ink charcoal pastel anime cartoon manga comic pixel low poly
octane unreal engine trending artstation masterpiece best quality high resolution hd uhd
van gogh monet picasso rembrandt vermeer
background foreground top bottom left right front back side center middle
"""


def _corpus_words(corpus: str) -> list[str]:
    """The corpus split into byte-level pre-tokens by CLIPTokenizer's own normaliser and word splitter.

    Borrowing them from a (vocabulary-less) ``CLIPTokenizer`` backend guarantees training sees words exactly the way
    the finished tokenizer will.
    """
    backend = CLIPTokenizer(model_max_length=MAX_LENGTH).backend_tokenizer
    text = backend.normalizer.normalize_str(corpus)
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``symbols`` with every left-to-right occurrence of ``pair`` fused into one symbol."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


@functools.cache
def _learn_bpe(corpus: str) -> tuple[tuple[str, str], ...]:
    """Learn BPE merges on ``corpus``, in rank order.

    A plain, fully deterministic BPE learner: each step fuses the most frequent adjacent pair, ties going to the
    lexicographically smallest pair, until every corpus word is a single symbol. (``tokenizers``' own
    ``BpeTrainer`` is not used because its tie-breaking depends on hash-map order, so it learns different merges
    from one process to the next.) The vocabulary follows from the merges as CLIP's does (clip_tokenizer.py).
    """
    word_counts = Counter(_corpus_words(corpus))
    # Each distinct word as a symbol sequence whose last symbol carries the end-of-word mark: "dog" -> d, o, g</w>.
    words = {word: (*word[:-1], word[-1] + END_OF_WORD) for word in sorted(word_counts)}

    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words = {word: _merge_word(symbols, best) if best[0] in symbols else symbols for word, symbols in words.items()}
    return tuple(merges)


def build_tokenizer(extra_words: str = "") -> CLIPTokenizer:
    """A small CLIP-style BPE tokenizer, identical on every call and in every process; ``extra_words`` join the
    built-in corpus (each then one token).

    Uses CLIP's normaliser, word splitter, byte-level alphabet and ``</w>`` end-of-word suffix, so no input
    (unicode, emoji, punctuation) ever maps to the unknown token. ``<|endoftext|>`` is eos, unk and pad, and the
    context length is 77, as in CLIP. Each call returns a fresh tokenizer object.
    """
    return tokenizer_from_merges(list(_learn_bpe(_CORPUS + extra_words)))


def clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str, layers: int = 2) -> CLIPTextConfig:
    """A CLIP text config of width ``hidden_size`` and ``layers`` layers whose vocabulary and special ids match
    ``tokenizer``.

    The eos id matters beyond the embedding size: CLIP pools the sequence at the first eos token.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(scaling_factor: float, latent_channels: int = 4, **flux: float | bool) -> AutoencoderKL:
    """A VAE with four resolution levels, hence the real VAEs' 8x spatial downscale, and 4 latent channels (SD's);
    FLUX's gives 16 channels and its `shift_factor` and quant-conv settings as `flux`."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        **flux,
    )


def _scheduler() -> EulerDiscreteScheduler:
    """Euler with the beta schedule, spacing and offset SD 1.5 and SDXL ship with."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


# UNet settings the two architectures share. ``attention_head_dim`` is, as in the real configs, diffusers' legacy
# name for the number of heads per block; with these widths every head is 8 channels wide.
_UNET_COMMON = dict(
    sample_size=8,  # 8x8 latents, i.e. 64x64 images through the 8x VAE
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4, 8),
    norm_num_groups=8,
)


def _sdxl_unet(text_width: int, pooled_width: int) -> UNet2DConditionModel:
    """SDXL's UNet layout: no attention at the highest resolution, more transformer layers deeper down, linear
    projections, and "text_time" added conditioning (pooled text embedding plus six embedded size/crop numbers)."""
    time_embed_dim = 8
    return UNet2DConditionModel(
        **_UNET_COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
    )


def _sd15_unet(text_width: int) -> UNet2DConditionModel:
    """SD 1.5's UNet layout: cross-attention at the higher resolutions, none at the lowest, 1x1 conv projections."""
    return UNet2DConditionModel(
        **_UNET_COMMON,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
    )


def build_tiny_pipeline(arch: str = "sdxl", seed: int = 0):
    """Build a tiny random-weight pipeline in memory of the family that lists ``arch`` among its `tiny` names: the
    UNet families' here, every other family's by ``build_tiny(arch, seed)`` of pipeline/tiny_<family name>.py.

    Weights are drawn under ``torch.manual_seed(seed)`` inside a forked RNG, so the same seed always gives the same
    weights and the caller's global RNG state is left untouched.

    Raises:
        KronaError: ``arch`` is not one of :func:`tiny_archs`.
    """
    family = next((f for f in FAMILIES if arch in f.tiny), None)
    if family is None:
        known = ", ".join(repr(a) for a in tiny_archs())
        raise KronaError(f"Unknown tiny architecture {arch!r}: expected one of {known}.")
    if family.denoiser != "unet":
        module = importlib.import_module(f"{__package__}.tiny_{family.name.replace('-', '_')}")
        return module.build_tiny(arch, seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        if arch == "sdxl":
            # Two encoders like SDXL's CLIP ViT-L (32 wide here) and OpenCLIP bigG with projection (48 wide here):
            # the UNet attends to their concatenated penultimate states and is conditioned on the pooled projection.
            text_encoder = CLIPTextModel(clip_text_config(tokenizer, 32, "quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, 48, "gelu"))
            return StableDiffusionXLPipeline(
                vae=tiny_vae(scaling_factor=0.13025),
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=build_tokenizer(),
                unet=_sdxl_unet(text_width=32 + 48, pooled_width=48),
                scheduler=_scheduler(),
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=tiny_vae(scaling_factor=0.18215),
            text_encoder=CLIPTextModel(clip_text_config(tokenizer, 32, "quick_gelu")),
            tokenizer=tokenizer,
            unet=_sd15_unet(text_width=32),
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )


MARKER = "krona-tiny.json"  # in every folder make_tiny writes: what --overwrite may replace


def make_tiny(path: str | Path, arch: str = "sdxl", seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny pipeline (see :func:`build_tiny_pipeline`) and save it as a diffusers folder at ``path``.

    The folder is written into a temporary sibling and renamed into place, so ``path`` never holds a half-written
    pipeline. An existing empty folder is filled; a tiny pipeline this function wrote is replaced with ``overwrite``;
    anything else at ``path`` is left alone and reported (outputs.output_folder).

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        KronaError: ``arch`` is unknown, or ``path`` holds something that may not be replaced.
    """
    return save_marked_pipeline(
        path, MARKER, {"arch": arch, "seed": seed}, overwrite, lambda: build_tiny_pipeline(arch, seed)
    )


def save_marked_pipeline(path: str | Path, marker: str, info: dict, overwrite: bool, build) -> Path:
    """``build()``'s pipeline saved with ``save_pretrained`` at ``path``, with ``info`` as JSON in the ``marker``
    file, written into a temporary sibling and renamed into place. An empty folder is filled; a folder holding
    ``marker`` is replaced with ``overwrite``; anything else is left alone and reported (outputs.output_folder),
    before anything is built. Returns ``path`` as an absolute Path."""
    target = expand(path).absolute()
    ours = (target / marker).is_file()
    output_folder(target, "DIRECTORY", lambda _file: ours, overwrite)
    pipeline = build()

    def fill(folder: Path) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        (folder / marker).write_text(json.dumps(info))

    write_folder_atomic(target, fill)
    return target


def _pil_image_processor(name: str):
    """transformers' PIL image processor class ``name`` (``CLIPImageProcessorPil`` in transformers 5, where the plain
    class needs torchvision; the plain class, which is the PIL one, before)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def build_tiny_clip(seed: int = 0):
    """A tiny random CLIP model, its image processor and tokenizer: ``(CLIPModel, processor, CLIPTokenizer)``.

    Text tower: :func:`build_tokenizer`'s vocabulary, width 32, 2 layers, 4 heads, quick-GELU, 77 positions. Vision
    tower: 32-px images in 8-px patches (16 patches and a class token), width 32, 2 layers, 2 heads. Both project to
    16. The processor is CLIP's (shorter side to 32, bicubic, centre crop 32, CLIP's mean and std). Weights are drawn
    under ``torch.manual_seed(seed)`` in a forked RNG: the same seed gives the same model, the caller's RNG is
    untouched.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    tokenizer = build_tokenizer()
    text = clip_text_config(tokenizer, hidden_size=32, hidden_act="quick_gelu").to_dict() | {"projection_dim": 16}
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
        hidden_act="quick_gelu",
    ).to_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = _pil_image_processor("CLIPImageProcessor")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, processor, tokenizer


def build_tiny_dino(seed: int = 0):
    """A tiny random DINO-style ViT and its image processor: ``(ViTModel, processor)``.

    32-px images in 8-px patches, width 32, 2 layers, 2 heads, no pooler (the CLS token of the last hidden state is
    the embedding). The processor resizes to 32x32 (bilinear) with ImageNet's mean and std, as facebook/dino-vits16's
    does at 224. Deterministic in ``seed``, the caller's RNG untouched.
    """
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False).eval()
    processor = _pil_image_processor("ViTImageProcessor")(
        size={"height": 32, "width": 32}, resample=2, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )
    return model, processor


def _save_parts(path: str | Path, parts) -> Path:
    """``save_pretrained`` every part into one folder, written atomically; like :func:`make_tiny`, only an empty
    folder or a model folder (one holding ``config.json``) is replaced."""
    target = expand(path).absolute()
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / "config.json").is_file())):
        raise KronaError(
            f"Refusing to overwrite {target}: it exists and is neither an empty folder nor a model folder "
            "(no config.json). Choose another path or remove it."
        )
    write_folder_atomic(target, lambda folder: [part.save_pretrained(folder) for part in parts])
    return target


def make_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`build_tiny_clip`'s model, processor and tokenizer at ``path`` (written atomically), a folder that
    ``metrics.Embedder.clip(str(path))`` loads offline. Returns ``path`` as an absolute Path."""
    return _save_parts(path, build_tiny_clip(seed))


def make_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`build_tiny_dino`'s model and processor at ``path`` (written atomically), a folder that
    ``metrics.Embedder.dino(str(path))`` loads offline. Returns ``path`` as an absolute Path."""
    return _save_parts(path, build_tiny_dino(seed))
