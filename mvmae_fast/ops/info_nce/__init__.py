"""``info_nce``: the NT-Xent / InfoNCE loss between two views.

For the 2B normalised vectors z = [z1; z2], anchor i with partner j (the other view of the same
image): l_i = -log(exp(z_i.z_j / t) / sum_{k != i} exp(z_i.z_k / t)); the loss is the mean over the
anchors. Under ``torch.distributed`` with ``gather=True`` the negatives come from every rank, with
gradients flowing back to their owners, so the data-parallel loss (averaged over ranks, as DDP
averages gradients) equals the single-process loss over the concatenated batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..._utils import check_tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _GatherFromAllRanks(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order. Backward: every rank's loss depends on every
    rank's rows, so the gradients are summed over ranks and each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, z):
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(z) for _ in range(ctx.world)]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // ctx.world
        return grad[ctx.rank * rows:(ctx.rank + 1) * rows]


def info_nce(z1, z2, temperature=0.1, *, gather=True):
    """Mean NT-Xent over the local 2B anchors; z1, z2 (B, d) are L2-normalised features of the views."""
    check_tensor("z1", z1, 2, _DTYPES, "(B, d)")
    check_tensor("z2", z2, 2, _DTYPES, "(B, d)")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B = z1.shape[0]
    local = torch.cat([z1, z2], dim=0)
    distributed = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        everyone = _GatherFromAllRanks.apply(local)
        offset = dist.get_rank() * 2 * B
    else:
        everyone, offset = local, 0
    if everyone.shape[0] <= 2:
        raise ValueError("info_nce needs a batch of at least 2 images: with one, each anchor has no negatives")
    logits = (local @ everyone.t()).float() / temperature
    rows = torch.arange(2 * B, device=z1.device)
    logits[rows, rows + offset] = float("-inf")
    positives = (rows + B) % (2 * B) + offset
    return F.cross_entropy(logits, positives)
