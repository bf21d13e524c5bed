"""BEiT-style block-wise masking: remove rectangles of patches until L - keep are removed.

Each block has a random area in [min_block, remaining] patches and a log-uniform aspect ratio in
[0.3, 1/0.3], placed uniformly; a block that would overshoot or add nothing is redrawn (10 tries).
When the blocks cannot reach the exact count, random single patches finish it (or are given back),
so every sample removes exactly L - keep patches and batches stay rectangular.
"""

import math

import torch

from . import MaskingResult
from .reference import split_shuffle


def _one_sample(grid, remove, min_block, g):
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    count = 0
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    while count < remove:
        budget = remove - count
        added = 0
        for _ in range(10):
            area = min_block + float(torch.rand((), generator=g)) * max(budget - min_block, 0)
            aspect = math.exp(log_ratio[0] + float(torch.rand((), generator=g)) * (log_ratio[1] - log_ratio[0]))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h < grid and 1 <= w < grid):
                continue
            top = int(torch.randint(0, grid - h + 1, (), generator=g))
            left = int(torch.randint(0, grid - w + 1, (), generator=g))
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.flatten()
    if count < remove:  # finish with single random patches
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=g)[: remove - count]]] = True
    return flat


def block_masking(batch, grid, keep, seed, min_block=4, device="cpu"):
    """MaskingResult for ``batch`` samples of a ``grid`` x ``grid`` patch grid, ``keep`` kept each;
    the kept and the removed patches each come in random order, as ``random_masking``'s do."""
    L = grid * grid
    if not 1 <= keep <= L:
        raise ValueError(f"keep must be in [1, {L}], got {keep}")
    g = torch.Generator().manual_seed(seed)
    shuffles = []
    for _ in range(batch):
        removed = _one_sample(grid, L - keep, min_block, g)
        order = torch.randperm(L, generator=g)
        shuffles.append(torch.cat([order[~removed[order]], order[removed[order]]]))
    return MaskingResult(*split_shuffle(torch.stack(shuffles).to(device), keep))
