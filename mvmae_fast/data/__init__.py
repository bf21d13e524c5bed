"""Data pipeline for (MV-)MAE pretraining: transforms, download-free datasets and a seeded loader.

The default dataset is scikit-learn's digits (shipped with scikit-learn); ``"shapes"`` is a
procedural fallback with no dependency; any ImageFolder-layout directory works too. Nothing is
downloaded at run time.
"""

from .datasets import (
    IMG_EXTENSIONS,
    SPLITS,
    CorruptImageWarning,
    DigitsDataset,
    ImageFolderDataset,
    SyntheticShapesDataset,
    build_dataset,
)
from .loader import SeededDataLoader, build_loader
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    Normalize,
    PretrainTransform,
    RandomHorizontalFlip,
    RandomResizedCrop,
    to_tensor,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "SPLITS",
    "CorruptImageWarning",
    "DigitsDataset",
    "EvalTransform",
    "ImageFolderDataset",
    "Normalize",
    "PretrainTransform",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "SeededDataLoader",
    "SyntheticShapesDataset",
    "build_dataset",
    "build_loader",
    "to_tensor",
]
