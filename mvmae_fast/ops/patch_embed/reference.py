"""Visible-patch gather and table-row gather in plain PyTorch: the spec for the other backends.

Patch layout (as MAE's patchify): patch l = i * (W / p) + j holds
``x[(a * p + b) * C + c] = img[c, i * p + a, j * p + b]``. These touch only the K kept patches:
the image is viewed as (B, C, h, p, w, p) (a view for any strides) and indexed per patch.
"""

import torch


def _patch_grid(imgs, ids, patch_size):
    B, C, H, W = imgs.shape
    grid_w = W // patch_size
    ids = ids.long()
    rows, cols = ids // grid_w, ids % grid_w
    batch = torch.arange(B, device=imgs.device).unsqueeze(1)
    return batch, rows, cols


def gather_visible_patches(imgs, ids, patch_size):
    B, C, H, W = imgs.shape
    p = patch_size
    grid = imgs.unflatten(2, (H // p, p)).unflatten(4, (W // p, p))  # (B, C, h, p, w, p)
    batch, rows, cols = _patch_grid(imgs, ids, p)
    patches = grid[batch, :, rows, :, cols, :]  # (B, K, C, p, p): the advanced dims come first
    return patches.permute(0, 1, 3, 4, 2).reshape(B, ids.shape[1], p * p * C)


def scatter_visible_patches(patches, ids, patch_size, height, width):
    B, K, P = patches.shape
    p = patch_size
    C = P // (p * p)
    out = patches.new_zeros(B, C, height // p, p, width // p, p)
    batch, rows, cols = _patch_grid(out.view(B, C, height, width), ids, p)
    out[batch, :, rows, :, cols, :] = patches.view(B, K, p, p, C).permute(0, 1, 4, 2, 3)
    return out.view(B, C, height, width)


def gather_table_rows(table, ids):
    return table[ids.long()]


def scatter_add_table_rows(y, ids, num_rows):
    # index_add_ is deterministic on the CPU; on CUDA it uses atomics (the triton backend does not)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    D = y.shape[2]
    out = torch.zeros(num_rows, D, dtype=acc, device=y.device)
    return out.index_add_(0, ids.reshape(-1).long(), y.reshape(-1, D).to(acc)).to(y.dtype)
