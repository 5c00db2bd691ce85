"""Aspect-ratio buckets: the sizes, which bucket a photo gets, how it is cut to it, and batches from one bucket."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from krona_cli.training.buckets import (
    Bucket,
    Schedule,
    bucket_sizes,
    crop_fraction,
    histogram,
    nearest_bucket,
    spread,
    stream_item,
)
from krona_cli.training.config import load_config
from krona_cli.training.data import ImageSet, prepare_image
from krona_cli.training.train import train

PROMPT, CLASS_PROMPT = "a photo of sks thing", "a photo of a thing"


def test_bucket_sizes_are_multiples_of_64_about_the_area_and_symmetric():
    buckets = bucket_sizes(1024)
    assert Bucket(1024, 1024) in buckets and Bucket(1216, 832) in buckets and Bucket(832, 1216) in buckets
    assert Bucket(2048, 512) in buckets and Bucket(512, 2048) in buckets  # SDXL's own extremes
    for b in buckets:
        assert b.height % 64 == 0 and b.width % 64 == 0 and b.height * b.width <= 1024**2
        assert max(b.height, b.width) <= 4 * min(b.height, b.width)
        assert Bucket(b.width, b.height) in buckets
        # as large as it can be: one more step on the side that was derived would exceed the area
        assert (b.height + 64) * b.width > 1024**2 or (b.width + 64) * b.height > 1024**2
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)
    assert len(set(b.aspect for b in buckets)) == len(buckets)
    assert bucket_sizes(64) == [Bucket(64, 64)]


@pytest.mark.parametrize("resolution", [1024, 512, 192])
def test_each_photo_gets_the_bucket_that_crops_it_least(resolution):
    buckets = bucket_sizes(resolution)
    for aspect in np.exp(np.linspace(math.log(0.2), math.log(5), 301)):
        h, w = 1000, int(round(1000 * aspect))
        chosen = nearest_bucket(h, w, buckets)
        assert crop_fraction(h, w, chosen) <= min(crop_fraction(h, w, b) for b in buckets) + 1e-12


def test_a_portrait_is_resized_to_cover_its_bucket_and_only_the_overhang_is_cut():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 1000, 3), dtype=np.uint8))  # 2:3
    bucket = nearest_bucket(1500, 1000, bucket_sizes(1024))
    assert bucket == Bucket(1216, 832)
    pixels, time_ids = prepare_image(image, (bucket.height, bucket.width), True, False, torch.Generator())
    assert pixels.shape == (3, 1216, 832)
    # covered by width: 1000 -> 832, 1500 -> 1248; 32 rows of overhang, 16 cut at the top (centre crop)
    assert time_ids == (1500, 1000, 16, 0, 1216, 832)
    assert 32 / 1248 == pytest.approx(crop_fraction(1500, 1000, bucket), abs=1 / 1248)
    # a square crop of the same photo would cut a third of it
    assert crop_fraction(1500, 1000, Bucket(1024, 1024)) == pytest.approx(1 / 3)


def test_spread_keeps_the_proportions_interleaved():
    a, b, c = Bucket(64, 128), Bucket(128, 64), Bucket(96, 96)
    out = spread([a, a, a, b, b, c], 12)
    assert Counter(out) == {a: 6, b: 4, c: 2}
    assert out[:3] != [a, a, a]
    assert histogram([a, b, a]) == "2 × 128×64, 1 × 64×128"


def test_schedule_batches_come_from_one_bucket_in_proportion_and_walk_each_bucket_in_epochs():
    a, b = Bucket(64, 128), Bucket(128, 64)
    item_buckets = [a] * 6 + [b] * 2
    schedule = Schedule(item_buckets, batch=2, seed=3, what="instance")
    counts, seen = Counter(), {a: [], b: []}
    for step in range(400):
        bucket, earlier = schedule.step(step)
        items = schedule.take(bucket, earlier)
        assert all(item_buckets[i] == bucket for i in items)
        assert earlier == counts[bucket]
        counts[bucket] += 1
        seen[bucket] += items
    assert 0.65 < counts[a] / 400 < 0.85  # 6 of 8 items
    for bucket, group in ((a, range(6)), (b, range(6, 8))):  # every epoch of a bucket holds each of its items once
        n = len(group)
        walked = seen[bucket]
        for start in range(0, len(walked) - n + 1, n):
            assert sorted(walked[start : start + n]) == list(group)
    again = Schedule(item_buckets, batch=2, seed=3, what="instance")
    assert [again.take(*again.step(s)) for s in range(399, -1, -1)][::-1] == [
        schedule.take(*schedule.step(s)) for s in range(400)
    ]  # the same whatever order the steps are asked in
    other = Schedule(item_buckets, batch=2, seed=4, what="instance")
    assert [other.step(s)[0] for s in range(50)] != [schedule.step(s)[0] for s in range(50)]
    assert schedule.take(Bucket(96, 96), 0) is None


def test_one_bucket_is_a_plain_walk_over_epochs():
    schedule = Schedule([Bucket(64, 64)] * 5, batch=3, seed=1, what="class")
    for step in range(7):
        bucket, earlier = schedule.step(step)
        assert earlier == step
        assert schedule.take(bucket, earlier) == [stream_item(step * 3 + j, 5, 1, "class") for j in range(3)]
        assert schedule.take_any(step) == schedule.take(bucket, earlier)


def _photos(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


MIXED = {"portrait": (100, 180), "landscape": (240, 130), "square": (150, 150), "tall": (90, 200)}  # (w, h)


def _spy_unet(monkeypatch):
    """Record (latent shape, time ids) of every training call of the UNet."""
    seen = []
    original = __import__("krona_cli.training.trainable", fromlist=["trainable_adapter"]).trainable_adapter

    def attach_and_spy(pipe, *args, **kwargs):
        adapter = original(pipe, *args, **kwargs)
        pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: (
                seen.append((tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"].clone()))
                if module.training
                else None
            ),
            with_kwargs=True,
        )
        return adapter

    monkeypatch.setattr("krona_cli.training.trainable.trainable_adapter", attach_and_spy)
    return seen


def _config(pipeline_dir, photos, out, **overrides):
    settings = dict(
        pretrained_model=str(pipeline_dir),
        instance_dir=str(photos),
        prompt=PROMPT,
        output_dir=str(out),
        sample_every=0,
        checkpoint_every=0,
        resolution=192,
        steps=12,
        batch_size=2,
    )
    return load_config("tiny", settings | overrides)


def test_sdxl_trains_mixed_photos_in_buckets(tiny_sdxl_dir, tmp_path, monkeypatch):
    """Portrait, landscape and square photos with prior preservation (class images generated in the photos'
    buckets): each UNet batch is one bucket, instance rows carry the photo's own size, a crop inside the overhang and
    the bucket as target; no photo loses more than its bucket rounding; class rows are uncropped class images."""
    photos = _photos(tmp_path / "photos", MIXED)
    seen = _spy_unet(monkeypatch)
    result = train(
        _config(
            tiny_sdxl_dir, photos, tmp_path / "run", class_prompt=CLASS_PROMPT, num_class_images=6, random_flip=True
        )
    )
    assert result.step == 12 and len(seen) == 12
    buckets = bucket_sizes(192)
    sizes = {(h, w) for w, h in MIXED.values()}
    expected = {(h, w): nearest_bucket(h, w, buckets) for h, w in sizes}
    assert ("sizes", f"aspect-ratio buckets of about 192² px: {histogram(list(expected.values()))}") in result.summary
    used = set()
    class_sizes = {Image.open(p).size[::-1] for p in (tmp_path / "run" / "class-images").glob("*.png")}
    assert class_sizes <= {(b.height, b.width) for b in expected.values()}
    for shape, time_ids in seen:
        assert shape[0] == 4  # 2 instance rows + 2 class rows in one batch
        rows = [tuple(int(v) for v in row) for row in time_ids]
        bucket = Bucket(shape[2] * 8, shape[3] * 8)
        for h, w, y, x, th, tw in rows[:2]:
            assert (th, tw) == (bucket.height, bucket.width) and expected[(h, w)] == bucket
            # resized to cover the bucket: the overhang on one side only, and the crop inside it
            if w * th >= tw * h:  # wider than the bucket: heights match, the width overhangs
                over_h, over_w = 0, max(tw, int(w * th / h)) - tw
            else:
                over_h, over_w = max(th, int(h * tw / w)) - th, 0
            assert 0 <= y <= over_h and 0 <= x <= over_w
            assert max(over_h / (th + over_h), over_w / (tw + over_w)) <= crop_fraction(h, w, bucket) + 1 / min(th, tw)
            assert crop_fraction(h, w, bucket) == min(crop_fraction(h, w, b) for b in buckets)
            used.add((h, w))
        for h, w, y, x, th, tw in rows[2:]:  # generated in this bucket: the whole class image
            assert (h, w, y, x, th, tw) == (bucket.height, bucket.width, 0, 0, bucket.height, bucket.width)
    assert used == sizes


def test_class_images_of_another_shape_are_fitted_to_the_photos_bucket(tiny_sdxl_dir, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos", {"portrait": (100, 180), "tall": (90, 200)})
    classes = _photos(tmp_path / "classes", {"c0": (200, 200), "c1": (180, 170)})  # square bucket only
    seen = _spy_unet(monkeypatch)
    result = train(
        _config(
            tiny_sdxl_dir,
            photos,
            tmp_path / "run",
            class_prompt=CLASS_PROMPT,
            class_dir=str(classes),
            num_class_images=2,
            steps=3,
            sample_width=128,
            sample_height=256,
        )
    )
    grid = Image.open(result.samples[-1])  # one prompt, two seeds, in the photos' aspect, labelled on the top and left
    assert grid.width > 2 * 128 and grid.height > 256
    assert grid.width - 2 * 128 < grid.width / 2 and grid.height - 256 < grid.height / 4
    for shape, time_ids in seen:
        bucket = (shape[2] * 8, shape[3] * 8)
        assert bucket == (256, 128)
        assert all(tuple(int(v) for v in row[4:]) == bucket for row in time_ids)
        assert {tuple(int(v) for v in row[:2]) for row in time_ids[2:]} <= {(200, 200), (170, 180)}


@pytest.mark.slow
def test_buckets_resume_exactly_and_cached_latents_equal_uncached(tiny_sdxl_dir, tmp_path):
    photos = _photos(tmp_path / "photos", MIXED)
    common = dict(class_prompt=CLASS_PROMPT, class_dir=str(tmp_path / "classes"), num_class_images=4, random_flip=True)
    straight = train(_config(tiny_sdxl_dir, photos, tmp_path / "a", steps=6, **common))
    train(_config(tiny_sdxl_dir, photos, tmp_path / "b", steps=3, **common))
    resumed = train(_config(tiny_sdxl_dir, photos, tmp_path / "b", steps=6, resume="latest", **common))
    assert resumed.losses == straight.losses[3:]
    uncached = train(_config(tiny_sdxl_dir, photos, tmp_path / "c", steps=6, cache_latents=False, **common))
    assert uncached.losses == pytest.approx(straight.losses, rel=1e-5)


def test_buckets_are_off_by_default_for_sd15_and_can_be_turned_on(tiny_sd15_dir, tmp_path):
    photos = _photos(tmp_path / "photos", {"portrait": (100, 180), "landscape": (240, 130)})
    off = train(_config(tiny_sd15_dir, photos, tmp_path / "a", steps=1, dry_run=True))
    assert ("sizes", "192×192 squares") in off.summary
    on = train(_config(tiny_sd15_dir, photos, tmp_path / "b", steps=1, dry_run=True, buckets=True))
    assert ("sizes", "aspect-ratio buckets of about 192² px: 1 × 256×128, 1 × 128×256") in on.summary
    images = ImageSet(photos, PROMPT, 192, buckets=True)  # landscape.png, portrait.png
    assert [images[0].pixels.shape, images[1].pixels.shape] == [(3, 128, 256), (3, 256, 128)]
