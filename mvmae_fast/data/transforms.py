"""Image transforms for pretraining and evaluation, in plain torch (no torchvision).

Every random draw goes through an optional ``torch.Generator`` argument, falling back to torch's
global RNG. Inside DataLoader workers torch seeds that global RNG per worker from the loader's
generator, so a seeded loader (see :func:`mvmae_fast.data.build_loader`) gives reproducible views.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "Normalize",
    "PretrainTransform",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VIEW_MODES = ("two_crops", "one_crop")


# --------------------------------------------------------------------------- #
# argument checks (shared so every class reports the same way)
# --------------------------------------------------------------------------- #


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return int(size)


def _check_range(name: str, value, low_open: float, high: float | None) -> tuple[float, float]:
    """A (lo, hi) pair with low_open < lo <= hi (<= high when given)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (lo, hi), got {value!r}") from None
    bound = f"{low_open} < {name}[0] <= {name}[1]" + (f" <= {high}" if high is not None else "")
    if not (low_open < lo <= hi) or (high is not None and hi > high):
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")
    return lo, hi


def _check_prob(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


# --------------------------------------------------------------------------- #
# functional helpers
# --------------------------------------------------------------------------- #


def _pil_image_type():
    # A PIL image can only exist if PIL is already imported, so looking in sys.modules keeps
    # pillow an optional dependency for tensor-only users.
    module = sys.modules.get("PIL.Image")
    return module.Image if module is not None else None


def _as_image(img) -> torch.Tensor:
    """(C, H, W) tensor, uint8 or float, without converting to float yet.

    Staying uint8 until after cropping means only the crop, not the full image, is converted.
    """
    pil_type = _pil_image_type()
    if pil_type is not None and isinstance(img, pil_type):
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        arr = np.array(img, dtype=np.uint8)  # a copy: torch.from_numpy warns on read-only arrays
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1)
    if isinstance(img, torch.Tensor):
        if img.dim() != 3:
            raise ValueError(f"image tensor must be (C, H, W), got shape {tuple(img.shape)}")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise ValueError(f"image tensor must be float in [0, 1] or uint8, got {img.dtype}")
        return img
    raise TypeError(f"expected a PIL image or a (C, H, W) tensor, got {type(img).__name__}")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def to_tensor(img) -> torch.Tensor:
    """A PIL image or (C, H, W) tensor as a float32 (C, H, W) tensor in [0, 1]."""
    return _to_float(_as_image(img))


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of a float (C, H, W) image, clamped back to [0, 1].

    Bicubic overshoots near edges; clamping keeps the input's value range so normalisation
    statistics stay meaningful.
    """
    out = F.interpolate(
        x.unsqueeze(0), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return out.squeeze(0).clamp_(0.0, 1.0)


def _rand_uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _rand_int(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


# --------------------------------------------------------------------------- #
# transforms
# --------------------------------------------------------------------------- #


class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize to (size, size) with bicubic interpolation.

    Same sampling as torchvision's ``RandomResizedCrop.get_params``. Output: float32 (C, size, size)
    in [0, 1], not normalised.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        self.size = _check_size(size)
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", ratio, 0.0, None)

    @staticmethod
    def get_params(
        height: int,
        width: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        generator: torch.Generator | None = None,
    ) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) of a random crop of a height x width image."""
        area = height * width
        log_ratio = torch.log(torch.tensor([float(ratio[0]), float(ratio[1])]))
        for _ in range(10):
            target_area = area * _rand_uniform(scale[0], scale[1], generator)
            aspect = math.exp(_rand_uniform(log_ratio[0].item(), log_ratio[1].item(), generator))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = _rand_int(height - h + 1, generator)
                left = _rand_int(width - w + 1, generator)
                return top, left, h, w

        # Every attempt fell outside the image: take the largest central crop whose aspect ratio
        # is inside the allowed range.
        in_ratio = width / height
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _as_image(img)
        top, left, h, w = self.get_params(x.shape[-2], x.shape[-1], self.scale, self.ratio, generator)
        crop = _to_float(x[:, top : top + h, left : left + w])
        return _resize(crop, self.size, self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Flip a (..., H, W) tensor left-right with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = _check_prob("p", p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # Always draw, even for p in {0, 1}, so the RNG stream does not depend on p.
        if torch.rand(1, generator=generator).item() < self.p:
            return x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """Per-channel (x - mean) / std on a (..., C, H, W) float tensor.

    A single grey channel is broadcast to len(mean) channels, so grey images meet an RGB model.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-3]
        if channels not in (1, self.mean.shape[0]):
            raise ValueError(f"expected 1 or {self.mean.shape[0]} channels, got {channels}")
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype)
        return (x - mean) / std

    def __repr__(self) -> str:
        mean, std = tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())
        return f"Normalize(mean={mean}, std={std})"


class PretrainTransform:
    """Views for (MV-)MAE pretraining: a float32 tensor (views, C, size, size), normalised.

    ``two_crops``: each view is an independent random resized crop + flip of the image.
    ``one_crop``: one crop + flip, repeated for every view; the model then differs the views only
    by their (independent) masks.
    """

    def __init__(
        self,
        size: int,
        view_mode: str = "two_crops",
        views: int = 2,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if view_mode not in VIEW_MODES:
            raise ValueError(f"view_mode must be one of {VIEW_MODES}, got {view_mode!r}")
        if isinstance(views, bool) or views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views!r}")
        self.view_mode = view_mode
        self.views = int(views)
        self.crop = RandomResizedCrop(size, scale=scale, ratio=ratio)
        self.flip = RandomHorizontalFlip(flip_p)
        self.normalize = Normalize(mean, std)

    @property
    def size(self) -> int:
        return self.crop.size

    def _view(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.flip(self.crop(x, generator), generator)

    def __call__(self, img, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _as_image(img)  # decode a PIL image once, not once per view
        if self.view_mode == "two_crops":
            out = torch.stack([self._view(x, generator) for _ in range(self.views)])
        else:
            out = self._view(x, generator).unsqueeze(0).repeat(self.views, 1, 1, 1)
        return self.normalize(out)

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(size={self.size}, view_mode={self.view_mode!r}, views={self.views}, "
            f"scale={self.crop.scale}, ratio={self.crop.ratio}, flip_p={self.flip.p})"
        )


class EvalTransform:
    """Deterministic transform for linear probing / feature extraction: float32 (C, size, size).

    Resizes the shorter side to ``floor(size / crop_pct)`` (bicubic), center-crops to size and
    normalises. crop_pct=0.875 is the usual 256 -> 224 ImageNet protocol; crop_pct=1.0 keeps the
    whole shorter side.
    """

    def __init__(
        self,
        size: int,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.size = _check_size(size)
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        self.resize_size = max(self.size, math.floor(self.size / self.crop_pct))
        self.normalize = Normalize(mean, std)

    def __call__(self, img) -> torch.Tensor:
        x = to_tensor(img)
        height, width = x.shape[-2:]
        short = self.resize_size
        # torchvision's Resize(int): the longer side is scaled proportionally and truncated.
        if height <= width:
            new_h, new_w = short, int(short * width / height)
        else:
            new_h, new_w = int(short * height / width), short
        if (new_h, new_w) != (height, width):
            x = _resize(x, new_h, new_w)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        x = x[:, top : top + self.size, left : left + self.size]
        return self.normalize(x)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, crop_pct={self.crop_pct})"
