"""``info_nce``: the NT-Xent / InfoNCE loss between two views.

For the 2B normalised vectors z = [z1; z2], anchor i with partner j (the other view of the same
image): l_i = -log(exp(z_i.z_j / t) / sum_{k != i} exp(z_i.z_k / t)); the loss is the mean over the
anchors. Under ``torch.distributed`` with ``gather=True`` the negatives come from every rank, with
gradients flowing back to their owners, so the data-parallel loss (averaged over ranks, as DDP
averages gradients) equals the single-process loss over the concatenated batch.

Backends: ``torch`` (the logits matrix and ``cross_entropy``: the reference) and ``triton`` (tiled
logits with an online log-sum-exp; only one fp32 LSE per anchor is kept for the backward pass,
which recomputes the tiles). Both take the local rows, the global set of keys and the local rows'
offset in it, so the distributed path gathers in torch and calls either.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ... import backends
from ..._utils import check_int, check_tensor, device_guard, new_output

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_IMPLEMENTED = ("torch", "triton")


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


def _check_local(local, everyone, offset, temperature):
    check_tensor("local", local, 2, _DTYPES, "(2B, d)")
    check_int("offset", offset, minimum=0)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, d = local.shape
    if n == 0 or n % 2 or d == 0:
        raise ValueError(f"local must hold the 2B rows [z1; z2] (an even, non-zero number) of d > 0 "
                         f"values, got shape {tuple(local.shape)}")
    if everyone is None:
        if offset != 0:
            raise ValueError(f"offset must be 0 when the keys are the local rows, got {offset}")
        total = n
    else:
        check_tensor("everyone", everyone, 2, _DTYPES, "(N, d)")
        if everyone.dtype != local.dtype or everyone.device != local.device:
            raise ValueError(f"everyone ({everyone.dtype}, {everyone.device}) must match local "
                             f"({local.dtype}, {local.device})")
        if everyone.shape[1] != d:
            raise ValueError(f"everyone has rows of {everyone.shape[1]} values, local of {d}")
        total = everyone.shape[0]
        if offset + n > total:
            raise ValueError(f"local rows [{offset}, {offset + n}) do not fit in the {total} rows of everyone")
    if total <= 2:
        raise ValueError("info_nce needs a batch of at least 2 images: with one, each anchor has no negatives")


def _info_nce_torch(local, everyone, offset, temperature):
    B = local.shape[0] // 2
    logits = (local @ everyone.t()).float() / temperature
    rows = torch.arange(2 * B, device=local.device)
    logits[rows, rows + offset] = float("-inf")
    positives = (rows + B) % (2 * B) + offset
    return F.cross_entropy(logits, positives)


@torch.library.custom_op("mvmae_fast::info_nce", mutates_args=())
def _info_nce_op(local: torch.Tensor, everyone: Optional[torch.Tensor], offset: int,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the local anchors (fp32 scalar), LSE per local anchor (fp32, for backward))."""
    _check_local(local, everyone, offset, temperature)
    backends.select_backend("info_nce", local.device, "triton", _IMPLEMENTED)
    from . import triton_impl

    local = local.contiguous()
    keys = local if everyone is None else everyone.contiguous()
    lse = new_output((local.shape[0],), torch.float32, local.device)
    row_loss = new_output((local.shape[0],), torch.float32, local.device)
    with device_guard(local.device):
        triton_impl.forward(local, keys, offset, temperature, lse, row_loss)
    return row_loss.mean(), lse


@_info_nce_op.register_fake
def _(local, everyone, offset, temperature):
    _check_local(local, everyone, offset, temperature)
    return local.new_empty((), dtype=torch.float32), local.new_empty(local.shape[0], dtype=torch.float32)


@torch.library.custom_op("mvmae_fast::info_nce_backward", mutates_args=())
def _info_nce_backward_op(grad: torch.Tensor, local: torch.Tensor, everyone: Optional[torch.Tensor],
                          lse: torch.Tensor, offset: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d local, d everyone); without everyone (keys = local) d local has both roles and d
    everyone is empty."""
    _check_local(local, everyone, offset, temperature)
    backends.select_backend("info_nce", local.device, "triton", _IMPLEMENTED)
    from . import triton_impl

    n = local.shape[0]
    local, lse, grad = local.contiguous(), lse.contiguous(), grad.reshape(1).contiguous()
    d_local = new_output(local.shape, local.dtype, local.device)
    with device_guard(local.device):
        if everyone is None:
            triton_impl.backward(triton_impl.BOTH, local, local, lse, grad, d_local, n, 0, temperature)
            return d_local, local.new_empty(0)
        everyone = everyone.contiguous()
        d_everyone = new_output(everyone.shape, everyone.dtype, everyone.device)
        triton_impl.backward(triton_impl.ANCHOR, local, everyone, lse, grad, d_local, n, offset, temperature)
        triton_impl.backward(triton_impl.KEY, everyone, local, lse, grad, d_everyone, n, offset, temperature)
    return d_local, d_everyone


@_info_nce_backward_op.register_fake
def _(grad, local, everyone, lse, offset, temperature):
    _check_local(local, everyone, offset, temperature)
    return torch.empty_like(local), (local.new_empty(0) if everyone is None else torch.empty_like(everyone))


def _info_nce_setup(ctx, inputs, output):
    local, everyone, offset, temperature = inputs
    ctx.save_for_backward(local, everyone, output[1])
    ctx.offset, ctx.temperature = offset, temperature
    ctx.mark_non_differentiable(output[1])


def _info_nce_backward(ctx, grad_loss, _):
    local, everyone, lse = ctx.saved_tensors
    d_local, d_everyone = _info_nce_backward_op(grad_loss, local, everyone, lse, ctx.offset, ctx.temperature)
    return d_local, (None if everyone is None else d_everyone), None, None


_info_nce_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


def info_nce_rows(local, everyone=None, offset=0, temperature=0.1, *, backend=None):
    """Mean NT-Xent over the anchors ``local`` = [z1; z2] (2B, d) against the keys ``everyone``
    (N, d), in which the local rows are rows [offset, offset + 2B); ``everyone=None``: the keys are
    the local rows. Differentiable in both (each row is an anchor and a key)."""
    _check_local(local, everyone, offset, temperature)
    name = backends.select_backend("info_nce", local.device, backend or "", _IMPLEMENTED)
    if name == "torch":
        return _info_nce_torch(local, local if everyone is None else everyone, offset, temperature)
    return _info_nce_op(local, everyone, offset, float(temperature))[0]


def info_nce(z1, z2, temperature=0.1, *, gather=True, backend=None):
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
        return info_nce_rows(local, _GatherFromAllRanks.apply(local), dist.get_rank() * 2 * B, temperature,
                             backend=backend)
    return info_nce_rows(local, None, 0, temperature, backend=backend)
