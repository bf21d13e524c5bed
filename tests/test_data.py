"""Tests for mvmae_fast.data: transforms, datasets, seeded loader (CPU, no downloads)."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvmae_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageWarning,
    DigitsDataset,
    EvalTransform,
    ImageFolderDataset,
    PretrainTransform,
    RandomHorizontalFlip,
    RandomResizedCrop,
    SyntheticShapesDataset,
    build_dataset,
    build_loader,
)

Image = pytest.importorskip("PIL.Image")

MEAN = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(-1, 1, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_image(h, w, seed=0):
    return torch.rand(3, h, w, generator=gen(seed))


def pil_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def digits_all():
    return DigitsDataset(split="all")


# --------------------------------------------------------------------------- #
# transforms
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("source", ["tensor", "pil"])
@pytest.mark.parametrize("hw", [(40, 40), (50, 30), (17, 64)])
def test_random_resized_crop_size_and_range(source, hw):
    img = random_image(*hw) if source == "tensor" else pil_image(*hw)
    crop = RandomResizedCrop(24)
    g = gen(1)
    for _ in range(20):
        out = crop(img, generator=g)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_crop_area_fraction_within_scale():
    h = w = 224
    scale = (0.2, 1.0)
    g = gen(0)
    fractions = []
    for _ in range(2000):
        top, left, ch, cw = RandomResizedCrop.get_params(h, w, scale, (3 / 4, 4 / 3), g)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        fractions.append(ch * cw / (h * w))
    fractions = torch.tensor(fractions)
    # Rounding the side lengths moves the area by < 1% at this size.
    assert fractions.min() >= scale[0] - 0.01
    assert fractions.max() <= scale[1]
    # Uniform in scale has mean 0.6; rejecting crops that overflow the image lowers it a little.
    assert 0.45 < fractions.mean() < 0.65
    assert fractions.std() > 0.15  # actually spread over the range, not stuck on the fallback


def test_crop_fallback_is_central_and_ratio_clamped():
    # A 10x100 strip with scale=(1, 1) never fits a ratio <= 4/3: every attempt fails.
    top, left, h, w = RandomResizedCrop.get_params(10, 100, (1.0, 1.0), (3 / 4, 4 / 3), gen(0))
    assert (h, w) == (10, 13) and top == 0 and left == (100 - 13) // 2


def test_full_square_crop_is_plain_resize():
    img = random_image(48, 48)
    out = RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(img, generator=gen(3))
    ref = F.interpolate(img[None], size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref[0].clamp(0, 1))
    same = RandomResizedCrop(48, scale=(1.0, 1.0), ratio=(1.0, 1.0))(img, generator=gen(3))
    torch.testing.assert_close(same, img)


def test_flip_rate_is_binomial():
    img = random_image(8, 8)
    flip = RandomHorizontalFlip(0.5)
    g = gen(5)
    n = 2000
    flips = sum(bool(torch.equal(flip(img, g), img.flip(-1))) for _ in range(n))
    sd = math.sqrt(n * 0.25)
    assert abs(flips - n / 2) < 5 * sd
    assert all(torch.equal(RandomHorizontalFlip(0.0)(img, g), img) for _ in range(20))
    assert all(torch.equal(RandomHorizontalFlip(1.0)(img, g), img.flip(-1)) for _ in range(20))


def test_two_crops_views_differ_one_crop_views_equal():
    img = random_image(64, 64)
    two = PretrainTransform(32, view_mode="two_crops")(img, generator=gen(0))
    one = PretrainTransform(32, view_mode="one_crop")(img, generator=gen(0))
    assert two.shape == one.shape == (2, 3, 32, 32)
    assert not torch.allclose(two[0], two[1])
    assert torch.equal(one[0], one[1])
    single = PretrainTransform(32, views=1)(img, generator=gen(0))
    assert single.shape == (1, 3, 32, 32)


def test_pretrain_transform_normalises():
    img = random_image(40, 40)
    out = PretrainTransform(32)(img, generator=gen(0))
    raw = out * STD + MEAN
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Same draws through the pieces by hand: crop, flip, normalise.
    g = gen(0)
    crop, flip = RandomResizedCrop(32), RandomHorizontalFlip()
    first = flip(crop(img, g), g)
    torch.testing.assert_close(out[0], (first - MEAN) / STD)


def test_pretrain_transform_uses_global_rng_without_generator():
    img = random_image(40, 40)
    t = PretrainTransform(16)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    assert torch.equal(a, b)


def test_eval_transform_shape_and_center():
    out = EvalTransform(32)(pil_image(60, 90))
    assert out.shape == (3, 32, 32)
    # crop_pct=1 on a square image of the right size is the identity (up to normalisation).
    img = random_image(32, 32)
    torch.testing.assert_close(EvalTransform(32, crop_pct=1.0)(img) * STD + MEAN, img)
    # The crop is centred: a bright centre column stays in the middle.
    img = torch.zeros(3, 40, 80)
    img[:, :, 39:41] = 1.0
    centre = EvalTransform(20, crop_pct=1.0)(img) * STD + MEAN
    assert centre[0].mean(0).argmax().item() in (9, 10)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(size=32, view_mode="three_crops"), "view_mode"),
        (dict(size=32, views=3), "views"),
        (dict(size=32, views=0), "views"),
        (dict(size=0), "size"),
        (dict(size=2.5), "size"),
        (dict(size=32, scale=(0.0, 1.0)), "scale"),
        (dict(size=32, scale=(0.5, 1.5)), "scale"),
        (dict(size=32, scale=(0.8, 0.2)), "scale"),
        (dict(size=32, scale=0.5), "scale"),
        (dict(size=32, ratio=(2.0, 1.0)), "ratio"),
    ],
)
def test_pretrain_transform_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PretrainTransform(**kwargs)


def test_other_bad_transform_arguments():
    with pytest.raises(ValueError, match="size"):
        RandomResizedCrop(-1)
    with pytest.raises(ValueError, match="p"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(32, crop_pct=0.0)


# --------------------------------------------------------------------------- #
# loader
# --------------------------------------------------------------------------- #


def first_batches(loader, n=3):
    out = []
    for i, (x, y) in enumerate(loader):
        if i == n:
            break
        out.append((x, y))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_seeded_loader_is_deterministic():
    ds = DigitsDataset(transform=PretrainTransform(16), size=16, split="test")
    a = first_batches(build_loader(ds, batch_size=8, seed=0))
    b = first_batches(build_loader(ds, batch_size=8, seed=0))
    c = first_batches(build_loader(ds, batch_size=8, seed=1))
    assert_same_batches(a, b)
    assert a[0][0].shape == (8, 2, 3, 16, 16)
    assert not torch.equal(a[0][0], c[0][0])


def test_unshuffled_loader_still_varies_augmentation_by_seed():
    ds = SyntheticShapesDataset(16, transform=PretrainTransform(16))
    a = first_batches(build_loader(ds, batch_size=4, shuffle=False, seed=0), 1)
    c = first_batches(build_loader(ds, batch_size=4, shuffle=False, seed=1), 1)
    assert torch.equal(a[0][1], c[0][1])  # same order
    assert not torch.equal(a[0][0], c[0][0])  # different crops


def test_in_process_loader_leaves_global_rng_alone():
    ds = SyntheticShapesDataset(16, transform=PretrainTransform(16))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    for _ in build_loader(ds, batch_size=4):
        pass
    assert torch.equal(torch.rand(4), expected)


def test_seeded_loader_with_workers_is_deterministic():
    ds = SyntheticShapesDataset(32, size=16, transform=PretrainTransform(16))
    a = first_batches(build_loader(ds, batch_size=4, num_workers=2, seed=7), 4)
    b = first_batches(build_loader(ds, batch_size=4, num_workers=2, seed=7), 4)
    assert_same_batches(a, b)


def test_loader_options():
    ds = SyntheticShapesDataset(10)
    loader = build_loader(ds, batch_size=4)
    assert len(loader) == 2 and not loader.pin_memory
    assert len(build_loader(ds, batch_size=4, drop_last=False)) == 3
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, batch_size=11)


# --------------------------------------------------------------------------- #
# datasets
# --------------------------------------------------------------------------- #


def test_digits_all(digits_all):
    ds = digits_all
    assert len(ds) == 1797
    assert sorted(set(ds.targets)) == list(range(10))
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    assert label == ds.targets[0]


def test_digits_splits_disjoint_and_stratified():
    train, test = DigitsDataset(split="train"), DigitsDataset(split="test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.2) < 0.01
    a, b = set(train.indices.tolist()), set(test.indices.tolist())
    assert not a & b and len(a | b) == 1797
    for c in range(10):
        n_train, n_test = train.targets.count(c), test.targets.count(c)
        assert abs(n_test / (n_train + n_test) - 0.2) < 0.02
    assert torch.equal(DigitsDataset(split="train").indices, train.indices)  # fixed split


def test_digits_upsampling_matches_original(digits_all):
    ds = digits_all
    n = 200
    up = torch.stack([ds[i][0][0] for i in range(n)])  # (n, 32, 32)
    down = F.avg_pool2d(up[:, None], 4)[:, 0]
    corr = torch.corrcoef(torch.stack([down.flatten(), ds.data[:n].flatten()]))[0, 1]
    assert corr > 0.9
    assert ds.data.min() >= 0.0 and ds.data.max() <= 1.0


def test_digits_with_transform():
    ds = DigitsDataset(transform=PretrainTransform(24, view_mode="one_crop"), size=24, split="test")
    x, y = ds[3]
    assert x.shape == (2, 3, 24, 24) and 0 <= y <= 9


def test_shapes_dataset_deterministic():
    a = SyntheticShapesDataset(12, size=24, seed=0)
    b = SyntheticShapesDataset(12, size=24, seed=0)
    c = SyntheticShapesDataset(12, size=24, seed=1)
    assert len(a) == 12 and a.targets == [i % 3 for i in range(12)]
    for i in (0, 5, 11):
        x, y = a[i]
        assert x.shape == (3, 24, 24) and 0 <= x.min() and x.max() <= 1 and y == i % 3
        assert torch.equal(x, b[i][0])
        assert not torch.equal(x, c[i][0])
    assert torch.equal(a[-1][0], a[11][0])
    with pytest.raises(ValueError, match="n"):
        SyntheticShapesDataset(0)


# --------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------- #


def write_png(path, seed):
    pil_image(12 + seed, 10 + 2 * seed, seed).save(path)


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    for i in range(3):
        write_png(tmp_path / "cat" / f"c{i}.png", i)
    write_png(tmp_path / "dog" / "d0.png", 3)
    (tmp_path / "dog" / "d1_bad.png").write_bytes(os.urandom(256))  # sorts between d0 and d2
    write_png(tmp_path / "dog" / "d2.png", 4)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_skips_corrupt_file(image_folder):
    ds = ImageFolderDataset(image_folder)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
    assert [os.path.basename(p) for p, _ in ds.samples][4] == "d1_bad.png"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
        items += [ds[i] for i in range(len(ds))]  # a second pass must not warn again
    relevant = [w for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(relevant) == 1 and "d1_bad.png" in str(relevant[0].message)
    assert ds.num_skipped == 1
    # The corrupt sample is replaced by the next readable one (d2.png).
    assert items[4][1] == 1 and items[4][0].size == items[5][0].size
    assert all(img.mode == "RGB" for img, _ in items)


def test_image_folder_corrupt_last_file_wraps(tmp_path):
    (tmp_path / "a").mkdir()
    write_png(tmp_path / "a" / "x.png", 0)
    (tmp_path / "a" / "z.png").write_bytes(b"\x89PNG not really")
    ds = ImageFolderDataset(tmp_path, transform=EvalTransform(8))
    with pytest.warns(CorruptImageWarning):
        x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 0 and ds.num_skipped == 1


def test_image_folder_through_loader(image_folder):
    ds = ImageFolderDataset(image_folder, transform=PretrainTransform(16))
    with pytest.warns(CorruptImageWarning):
        batches = list(build_loader(ds, batch_size=3, seed=0))
    assert len(batches) == 2 and batches[0][0].shape == (3, 2, 3, 16, 16)


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "readme.txt").write_text("x")
    for root in (missing, a_file, empty, no_images):
        with pytest.raises(ValueError) as info:
            ImageFolderDataset(root)
        msg = str(info.value)
        assert str(root) in msg and "\n" not in msg


# --------------------------------------------------------------------------- #
# build_dataset
# --------------------------------------------------------------------------- #


def test_build_dataset(image_folder, tmp_path):
    assert isinstance(build_dataset(), DigitsDataset)
    assert len(build_dataset("digits", split="all")) == 1797
    shapes_train = build_dataset("shapes", num_samples=6)
    shapes_test = build_dataset("shapes", split="test", num_samples=6)
    assert isinstance(shapes_train, SyntheticShapesDataset) and len(shapes_train) == 6
    assert not torch.equal(shapes_train[0][0], shapes_test[0][0])
    folder = build_dataset(str(image_folder))
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 6

    with pytest.raises(ValueError) as info:
        build_dataset("imagenet-not-here")
    assert "imagenet-not-here" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", split="val")
    with pytest.raises(ValueError, match="test"):
        build_dataset(str(image_folder), split="test")
