"""``masked_recon_loss``: MAE's per-view reconstruction loss.

Per patch: mean over its p*p*C values of (pred - target)^2, where target is the patchified image,
normalised per patch (mean 0, divided by sqrt(unbiased var + 1e-6)) when ``norm_pix_loss``. The view
loss is the sum over removed patches divided by their number; visible patches do not count.
"""

import torch

from ..._utils import check_tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def patchify(imgs, patch_size):
    """(B, C, H, W) -> (B, L, p*p*C), row-major patches, channel last inside a patch."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x, patch_size, channels=3, height=None):
    """Inverse of :func:`patchify`; ``height`` in patches defaults to a square grid."""
    B, L, _ = x.shape
    p = patch_size
    h = height if height is not None else int(round(L**0.5))
    w = L // h
    if h * w != L:
        raise ValueError(f"cannot arrange {L} patches in {h} rows")
    x = x.reshape(B, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, h * p, w * p)


def patch_targets(imgs, patch_size, norm_pix_loss):
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_recon_loss(pred, imgs, mask, patch_size, norm_pix_loss=True):
    """pred (B, L, p*p*C), imgs (B, C, H, W), mask (B, L) with 1 = removed -> scalar loss."""
    check_tensor("pred", pred, 3, _DTYPES, "(B, L, p*p*C)")
    check_tensor("imgs", imgs, 4, _DTYPES, "(B, C, H, W)")
    target = patch_targets(imgs, patch_size, norm_pix_loss)
    if target.shape != pred.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but the patchified imgs have {tuple(target.shape)}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
