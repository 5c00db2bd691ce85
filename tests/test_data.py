"""Training images: folder scanning, reading every image mode, captions, the DreamBooth transforms, ImageSet."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from krona_cli import images
from krona_cli.errors import KronaError
from krona_cli.images import load_image, read_caption, scan_images
from krona_cli.training.data import ImageSet, prepare_image


def save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def noise(width, height, seed=0):
    """An RGB image of random pixels (asymmetric, so crops and flips are visible)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def expected_pixels(image):
    """What prepare_image must return for an image already cropped by hand: CHW float32, x / 127.5 - 1."""
    return torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1


# --- scanning folders -------------------------------------------------------------------------------------------------


def test_scan_images_sorts_images_and_lists_skipped_files(tmp_path):
    save(tmp_path / "b.png", noise(4, 4))
    save(tmp_path / "a.JPG", noise(4, 4), format="JPEG")
    save(tmp_path / ".hidden.png", noise(4, 4))
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "c.png", noise(4, 4))
    images, skipped = scan_images(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.png"]
    assert [p.name for p in skipped] == ["empty.jpg", "notes.pdf"]


def test_scan_images_missing_folder_names_the_flag(tmp_path):
    with pytest.raises(KronaError, match=r"--class-dir '.*nowhere' does not exist"):
        scan_images(tmp_path / "nowhere", "class")
    save(tmp_path / "file.png", noise(4, 4))
    with pytest.raises(KronaError, match="--instance-dir .* does not exist"):
        scan_images(tmp_path / "file.png")


def test_scan_images_folder_without_images_names_the_flag(tmp_path):
    with pytest.raises(KronaError, match=r"--instance-dir '.*' holds no images \(.jpg, "):
        scan_images(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(KronaError, match="--class-dir .* holds no images"):
        scan_images(tmp_path, "class")


# --- reading images ---------------------------------------------------------------------------------------------------


def palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (made transparent on save), index 1 blue
    image.putpixel((1, 0), 1)
    return image


MODES = [  # (mode as reopened, image, save options, expected RGB of each pixel in the first row)
    ("RGBA", Image.frombytes("RGBA", (2, 1), bytes([255, 0, 0, 0, 10, 20, 30, 255])), {}, [(255,) * 3, (10, 20, 30)]),
    ("LA", Image.frombytes("LA", (2, 1), bytes([0, 0, 40, 255])), {}, [(255,) * 3, (40,) * 3]),
    ("P", palette_with_transparency(), {"transparency": 0}, [(255,) * 3, (0, 0, 255)]),
    ("L", Image.frombytes("L", (2, 1), bytes([77, 200])), {}, [(77,) * 3, (200,) * 3]),
    ("1", Image.frombytes("L", (2, 1), bytes([0, 255])).convert("1"), {}, [(0,) * 3, (255,) * 3]),
    (
        "CMYK",
        Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0])),
        {"format": "TIFF"},
        [(255,) * 3, (255, 0, 0)],
    ),
    ("I;16", Image.fromarray(np.array([[25700, 65535, 0]], np.uint16)), {}, [(100,) * 3, (255,) * 3, (0,) * 3]),
    (
        "I",
        Image.fromarray(np.array([[-5, 25700, 100000]], np.int32)),
        {"format": "TIFF"},
        [(0,) * 3, (100,) * 3, (255,) * 3],
    ),
    (
        "F",
        Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)),
        {"format": "TIFF"},
        [(0,) * 3, (64,) * 3, (128,) * 3, (255,) * 3],
    ),  # max > 1: scaled by the range 0..2
]


@pytest.mark.parametrize("mode,image,options,expected", MODES, ids=[m[0] for m in MODES])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode, image, options, expected):
    path = save(tmp_path / "image.png", image, **options)
    assert Image.open(path).mode == mode  # the file really is in the mode under test
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(loaded.width)] == expected


@pytest.mark.filterwarnings("error")  # a NaN from dividing by a zero range only warns when cast
@pytest.mark.parametrize("values,expected", [([0.2, 0.4], [51, 102]), ([5.0, 5.0], [0, 0])])
def test_load_image_float_greyscale(tmp_path, values, expected):
    """Values within 0..1 are not stretched; a constant image above 1 does not divide by zero."""
    path = save(tmp_path / "f.tif", Image.fromarray(np.array([values], np.float32)))
    assert [load_image(path).getpixel((x, 0))[0] for x in range(2)] == expected


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = save(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) is displayed at the top
    assert bottom[2] > 200 and bottom[0] < 50


def test_load_image_truncated_or_corrupt_file_is_named(tmp_path):
    full = save(tmp_path / "full.jpg", noise(64, 64), quality=95).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(KronaError, match=r"cannot read image '.*truncated\.jpg': .*remove or replace it"):
        load_image(truncated)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a picture")
    with pytest.raises(KronaError, match=r"cannot read image '.*garbage\.png'"):
        load_image(garbage)


def png_header_only(width, height):
    """The start of a PNG of the given size: enough for Pillow to read its size, no pixel data to decode."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    )


def test_load_image_refuses_decompression_bombs(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20_000, 10_000))  # 200 MP: Pillow's own check refuses it
    with pytest.raises(KronaError, match=r"image '.*bomb\.png' is too large"):
        load_image(bomb)
    small = save(tmp_path / "small.png", noise(20, 20))
    monkeypatch.setattr(images, "MAX_PIXELS", 399)  # krona's own check, whatever Pillow's global limit is
    with pytest.raises(KronaError, match=r"20×20 pixels, over the 399-pixel limit"):
        load_image(small)


# --- captions ---------------------------------------------------------------------------------------------------------


def test_read_caption_from_sidecar_or_default(tmp_path):
    image = tmp_path / "dog.jpg"
    assert read_caption(image, "a photo of sks dog") == "a photo of sks dog"
    (tmp_path / "dog.txt").write_text("  sks dog on the grass \n")
    assert read_caption(image, "a photo of sks dog") == "sks dog on the grass"
    (tmp_path / "dog.txt").write_text(" \n")
    assert read_caption(image, "fallback") == "fallback"
    (tmp_path / "dog.txt").write_bytes("\ufeffsks dog, café".encode())  # UTF-8 with a byte-order mark
    assert read_caption(image, "fallback") == "sks dog, café"


def test_read_caption_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "dog.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(KronaError, match=r"caption file '.*dog\.txt'.*UTF-8"):
        read_caption(tmp_path / "dog.png", "default")


# --- transforms -------------------------------------------------------------------------------------------------------


def test_prepare_image_center_crop_landscape():
    image = noise(80, 50)  # w × h; at 32 the short side 50 -> 32, the long side int(80 * 32 / 50) = int(51.2) = 51
    pixels, time_ids = prepare_image(image, 32, center_crop=True, random_flip=False, generator=torch.Generator())
    # crop x = round((51 - 32) / 2) = round(9.5) = 10 (Python and torchvision round half to even), y = 0
    assert time_ids == (50, 80, 0, 10, 32, 32)
    assert all(type(v) is int for v in time_ids)
    expected = expected_pixels(image.resize((51, 32), Image.Resampling.LANCZOS).crop((10, 0, 42, 32)))
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, expected, atol=1e-6)


def test_prepare_image_center_crop_portrait_truncates_like_torchvision():
    image = noise(50, 90)  # long side int(90 * 32 / 50) = int(57.6) = 57 (torchvision truncates; round would be 58)
    pixels, time_ids = prepare_image(image, 32, center_crop=True, random_flip=False, generator=torch.Generator())
    assert time_ids == (90, 50, 12, 0, 32, 32)  # y = round((57 - 32) / 2) = round(12.5) = 12
    expected = expected_pixels(image.resize((32, 57), Image.Resampling.LANCZOS).crop((0, 12, 32, 44)))
    assert torch.allclose(pixels, expected, atol=1e-6)


def test_prepare_image_pixel_range():
    for colour, value in (((0, 0, 0), -1.0), ((255, 255, 255), 1.0)):
        pixels, _ = prepare_image(Image.new("RGB", (40, 36), colour), 16, True, False, torch.Generator())
        assert torch.all(pixels == value)
    pixels, _ = prepare_image(noise(24, 16), 16, False, True, torch.Generator().manual_seed(1))  # no resize: raw noise
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() < -0.9 and pixels.max() > 0.9


def test_random_flip_mirrors_the_pixels():
    image = noise(32, 32)
    plain, _ = prepare_image(image, 32, center_crop=True, random_flip=False, generator=torch.Generator())
    assert torch.allclose(plain, expected_pixels(image))
    mirrored = expected_pixels(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert not torch.equal(plain, mirrored)
    outcomes = []
    for seed in range(16):
        pixels, _ = prepare_image(image, 32, True, True, torch.Generator().manual_seed(seed))
        outcomes.append("flipped" if torch.equal(pixels, mirrored) else "plain" if torch.equal(pixels, plain) else "?")
    assert set(outcomes) == {"flipped", "plain"}


# --- ImageSet ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path):
    """a.png 80×50 (landscape), b.png 50×90 (portrait), c.png 40×40 with a sidecar caption."""
    save(tmp_path / "a.png", noise(80, 50, seed=1))
    save(tmp_path / "b.png", noise(50, 90, seed=2))
    save(tmp_path / "c.png", noise(40, 40, seed=3))
    (tmp_path / "c.txt").write_text("sks thing on a table\n")
    (tmp_path / "notes.md").write_text("not an image")
    return tmp_path


def test_imageset_repeats_in_order_with_captions(folder):
    s = ImageSet(folder, "a photo of sks thing", 32, repeats=2)
    assert [p.name for p in s.paths] == ["a.png", "b.png", "c.png"] and [p.name for p in s.skipped] == ["notes.md"]
    assert s.captions == ["a photo of sks thing", "a photo of sks thing", "sks thing on a table"]
    assert len(s) == 6
    assert [s[i].source.name for i in range(6)] == ["a.png", "b.png", "c.png"] * 2
    assert [s[i].caption for i in range(3)] == s.captions
    with pytest.raises(IndexError):
        s[6]
    with pytest.raises(KronaError, match="--repeats"):
        ImageSet(folder, "p", 32, repeats=0)


def test_imageset_random_crop_is_in_bounds_and_deterministic_per_item(folder):
    s = ImageSet(folder, "p", 32, repeats=4, random_flip=True, seed=7)
    crops = [s[i].time_ids[2:4] for i in range(len(s))]
    for i, (y, x) in enumerate(crops):
        if i % 3 == 0:
            assert y == 0 and 0 <= x <= 51 - 32  # a.png resized to 51×32
        elif i % 3 == 1:
            assert x == 0 and 0 <= y <= 57 - 32  # b.png resized to 32×57
        else:
            assert (y, x) == (0, 0)  # c.png resized to 32×32
    assert len(set(crops[0::3])) > 1  # repeats of one image get their own crops

    again = ImageSet(folder, "p", 32, repeats=4, random_flip=True, seed=7)
    for i in (0, 1, 5, 11):
        assert torch.equal(s[i].pixels, again[i].pixels) and s[i].time_ids == again[i].time_ids
        assert torch.equal(s[i].pixels, s[i].pixels)
    other = ImageSet(folder, "p", 32, repeats=4, random_flip=True, seed=8)
    assert [other[i].time_ids for i in range(len(s))] != [s[i].time_ids for i in range(len(s))]
    classes = ImageSet(folder, "p", 32, repeats=4, random_flip=True, seed=7, what="class")
    assert [classes[i].time_ids for i in range(len(s))] != [s[i].time_ids for i in range(len(s))]


def test_imageset_items_match_prepare_image_with_their_generator(folder):
    from krona_cli import rng

    s = ImageSet(folder, "p", 32, repeats=2, random_flip=True, seed=3)
    item = s[4]  # b.png, second repeat
    generator = rng.generator("augment", "instance", 3, 4)
    pixels, time_ids = prepare_image(load_image(folder / "b.png"), 32, False, True, generator)
    assert torch.equal(item.pixels, pixels) and item.time_ids == time_ids
    assert item.pixels.shape == (3, 32, 32) and item.time_ids[:2] == (90, 50) and item.time_ids[4:] == (32, 32)


def test_imageset_original_sizes_follow_exif(tmp_path):
    save(tmp_path / "a.png", noise(30, 20))
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 8
    save(tmp_path / "b.jpg", noise(40, 24), exif=exif)
    s = ImageSet(tmp_path, "p", 16, center_crop=True)
    assert s.sizes == [(20, 30), (40, 24)]
    assert s[1].time_ids[:2] == (40, 24)
