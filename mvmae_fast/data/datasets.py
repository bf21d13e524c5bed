"""Datasets that need no download: an ImageFolder reader, scikit-learn's digits, procedural shapes.

Each ``__getitem__`` returns ``(image, label)``; with ``transform=None`` the image is a float32
(3, H, W) tensor in [0, 1], except for :class:`ImageFolderDataset`, which returns the RGB PIL image
(files differ in size, so there is no common tensor shape to give).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "IMG_EXTENSIONS",
    "SPLITS",
    "CorruptImageWarning",
    "DigitsDataset",
    "ImageFolderDataset",
    "SyntheticShapesDataset",
    "build_dataset",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test", "all")

Transform = Callable[[object], object]


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# --------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------- #


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` with labels from the sorted class folder names.

    Files are only listed here, not opened: a file that fails to decode is found when it is first
    read. It is then skipped in favour of the next readable sample (wrapping around), counted in
    ``num_skipped`` and, for the first such file only, reported with a :class:`CorruptImageWarning`.
    With DataLoader workers each worker holds its own copy, so the warning and the count are per
    worker process.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None):
        root = os.fspath(root)
        if not os.path.exists(root):
            raise ValueError(f"ImageFolderDataset: root '{root}' does not exist")
        if not os.path.isdir(root):
            raise ValueError(f"ImageFolderDataset: root '{root}' is not a directory")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"ImageFolderDataset: no class folders in '{root}'")

        samples = []
        for label, name in enumerate(classes):
            for path in _list_images(os.path.join(root, name)):
                samples.append((path, label))
        if not samples:
            raise ValueError(
                f"ImageFolderDataset: no image files ({', '.join(IMG_EXTENSIONS)}) under '{root}'"
            )

        self.root = root
        self.transform = transform
        # Empty class folders keep their label, so the mapping depends only on the folder names.
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.num_skipped = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int):
        from PIL import Image

        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # convert() forces the full decode inside the try
        # PIL decoders raise many types (OSError, SyntaxError, struct.error, ...); only the
        # decode is inside this try, so a bug in a transform still surfaces.
        except Exception as exc:  # noqa: BLE001
            self._bad.add(index)
            self.num_skipped += 1
            if self.num_skipped == 1:
                warnings.warn(
                    f"ImageFolderDataset: skipping unreadable image '{path}' "
                    f"({type(exc).__name__}: {exc}); further failures are counted in num_skipped "
                    "without a warning",
                    CorruptImageWarning,
                    stacklevel=3,
                )
            return None

    def __getitem__(self, index: int):
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            img = self._load(i)
            if img is not None:
                if self.transform is not None:
                    img = self.transform(img)
                return img, self.samples[i][1]
        raise RuntimeError(f"ImageFolderDataset: none of the {n} files under '{self.root}' could be read")


def _list_images(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # os.walk visits in directory order; sorting makes labels/indices stable
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return found


# --------------------------------------------------------------------------- #
# scikit-learn digits
# --------------------------------------------------------------------------- #


def _upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, h, w) in [0, 1] -> (N, 1, size, size), bicubic, clamped to [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


class DigitsDataset(Dataset):
    """scikit-learn's ``load_digits``: 1797 real 8x8 handwritten digits, labels 0..9.

    Images are scaled from 0..16 to [0, 1], upsampled (bicubic) to size x size and replicated to 3
    channels. The data ships with scikit-learn, so nothing is downloaded.

    ``split``: ``"train"`` / ``"test"`` is a fixed 80/20 split stratified by class (a seed-0
    permutation, the same on every machine); ``"all"`` is all 1797 images. ``indices`` holds the
    positions in the full set, ``data`` the split's original 8x8 images in [0, 1].
    """

    NUM_SAMPLES = 1797
    TRAIN_FRACTION = 0.8
    SPLIT_SEED = 0

    def __init__(self, transform: Transform | None = None, size: int = 32, split: str = "train"):
        from sklearn.datasets import load_digits

        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        _check_split(split)
        digits = load_digits()
        images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0)
        labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))

        indices = self.split_indices(labels, split)
        self.transform = transform
        self.size = size
        self.split = split
        self.classes = [str(d) for d in range(10)]
        self.indices = indices
        self.data = images[indices]  # (N, 8, 8)
        self.targets = labels[indices].tolist()
        # Upsampling 8x8 images is cheap, and doing it once keeps __getitem__ a plain index
        # (1 channel: the 3-channel copy is made per item).
        self._images = _upsample(self.data.unsqueeze(1), size)

    @classmethod
    def split_indices(cls, labels: torch.Tensor, split: str) -> torch.Tensor:
        """Sorted positions of ``split`` in the full set, given all labels."""
        if split == "all":
            return torch.arange(len(labels))
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cls.SPLIT_SEED))
        train, test = [], []
        for c in labels.unique().tolist():
            members = perm[labels[perm] == c]  # this class, in permuted order
            n_train = int(round(cls.TRAIN_FRACTION * len(members)))
            train.append(members[:n_train])
            test.append(members[n_train:])
        chosen = torch.cat(train if split == "train" else test)
        return chosen.sort().values

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self._images[index].repeat(3, 1, 1)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# --------------------------------------------------------------------------- #
# procedural shapes
# --------------------------------------------------------------------------- #


class SyntheticShapesDataset(Dataset):
    """``n`` procedural images of one coloured shape on a gradient background.

    Label ``i % 3`` picks the shape (rectangle, ellipse, triangle), so classes are balanced. Each
    image is drawn from its own RNG keyed on (seed, index): the dataset is deterministic, needs no
    memory up front, and gives the same image for an index whatever the access order.
    """

    classes = ["rectangle", "ellipse", "triangle"]

    def __init__(self, n: int, size: int = 32, seed: int = 0, transform: Transform | None = None):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 4:
            raise ValueError(f"size must be an int >= 4, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.n = n
        self.size = size
        self.seed = seed
        self.transform = transform
        self.targets = [i % len(self.classes) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def render(self, index: int) -> torch.Tensor:
        """The (3, size, size) float32 image in [0, 1] for ``index``, before any transform."""
        # numpy's SeedSequence mixes the (seed, index) pair properly; torch.manual_seed keeps only
        # 32 bits, which would make nearby (seed, index) combinations collide.
        rng = np.random.default_rng((self.seed, index))
        s = self.size
        yy, xx = np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5, indexing="ij")

        c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3))
        angle = rng.uniform(0.0, 2 * math.pi)
        t = ((xx - s / 2) * math.cos(angle) + (yy - s / 2) * math.sin(angle)) / s + 0.5
        img = c0[:, None, None] + (c1 - c0)[:, None, None] * t[None]

        # A shape colour far from the background keeps the shape visible (and the task learnable).
        bg = (c0 + c1) / 2
        for _ in range(16):
            colour = rng.uniform(0.0, 1.0, size=3)
            if np.abs(colour - bg).sum() > 0.75:
                break
        else:
            colour = 1.0 - bg

        mask = self._shape_mask(index % len(self.classes), xx, yy, rng)
        img = np.where(mask[None], colour[:, None, None], img)
        img = img + rng.normal(0.0, 0.02, size=img.shape)
        return torch.from_numpy(np.clip(img, 0.0, 1.0).astype(np.float32))

    def _shape_mask(self, label: int, xx: np.ndarray, yy: np.ndarray, rng) -> np.ndarray:
        s = self.size
        radius = rng.uniform(0.18, 0.38) * s  # half-extent: the shape fits in a circle of this radius
        cx, cy = rng.uniform(radius, s - radius, size=2)
        if label == 0:
            # 0.7 * sqrt(2) < 1: the corners stay inside the circle, hence inside the image.
            hw, hh = 0.7 * radius, 0.7 * radius * rng.uniform(0.5, 1.0)
            if rng.random() < 0.5:
                hw, hh = hh, hw
            return (np.abs(xx - cx) <= hw) & (np.abs(yy - cy) <= hh)
        if label == 1:
            rx, ry = radius, radius * rng.uniform(0.6, 1.0)
            if rng.random() < 0.5:
                rx, ry = ry, rx
            return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        # Triangle: three vertices on the circle, roughly equilateral but randomly rotated/jittered.
        base = rng.uniform(0.0, 2 * math.pi)
        angles = base + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
        vx, vy = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
        signs = []
        for k in range(3):
            ax, ay, bx, by = vx[k], vy[k], vx[(k + 1) % 3], vy[(k + 1) % 3]
            signs.append((bx - ax) * (yy - ay) - (by - ay) * (xx - ax))
        signs = np.stack(signs)
        return (signs >= 0).all(0) | (signs <= 0).all(0)

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        img = self.render(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# --------------------------------------------------------------------------- #
# factory
# --------------------------------------------------------------------------- #

SHAPES_SPLIT_SIZES = {"train": 5000, "test": 1000}


def build_dataset(
    name_or_path: str | os.PathLike = "digits",
    transform: Transform | None = None,
    split: str = "train",
    *,
    size: int = 32,
    num_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """``"digits"`` (default), ``"shapes"``, or a directory in ImageFolder layout.

    ``size`` is the native image size of the digits / shapes sets (the transform sets the model's
    input size). For ``"shapes"``, ``split`` selects a disjoint RNG stream (train: ``seed``,
    test: ``seed + 1``) of ``num_samples`` images (default 5000 / 1000); ``"all"`` is not defined.
    For a directory, ``split="train"`` reads ``<path>/train`` if present, else ``<path>`` itself;
    ``split="test"`` reads ``<path>/test`` or ``<path>/val``; ``split="all"`` reads ``<path>``.
    """
    _check_split(split)
    name = os.fspath(name_or_path)
    if name == "digits":
        return DigitsDataset(transform=transform, size=size, split=split)
    if name == "shapes":
        if split == "all":
            raise ValueError("split='all' is not defined for the 'shapes' dataset: use 'train' or 'test'")
        n = num_samples if num_samples is not None else SHAPES_SPLIT_SIZES[split]
        return SyntheticShapesDataset(n, size=size, seed=seed + (split == "test"), transform=transform)
    if os.path.isdir(name):
        return ImageFolderDataset(_split_dir(name, split), transform=transform)
    raise ValueError(
        f"unknown dataset '{name}': expected 'digits', 'shapes' or an existing directory"
    )


def _split_dir(root: str, split: str) -> str:
    if split == "all":
        return root
    candidates = ("train",) if split == "train" else ("test", "val")
    for sub in candidates:
        path = os.path.join(root, sub)
        if os.path.isdir(path):
            return path
    if split == "train":
        return root
    raise ValueError(f"no 'test' or 'val' folder under '{root}' for split='test'")
