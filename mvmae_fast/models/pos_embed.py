"""Fixed 2-D sin-cos position embeddings (MAE's layout)."""

import torch


def sincos_1d(dim, positions):
    """(len(positions), dim): sin in the first half, cos in the second, w_m = 10000^(-m/(dim/2))."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim, grid_size, cls_token=True):
    """(1 + L or L, dim) float32. Dims [0, dim/2) encode the column j, [dim/2, dim) the row i;
    the cls row is all zeros."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sin-cos embeddings, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.to(torch.float32)
