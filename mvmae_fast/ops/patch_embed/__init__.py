"""Patch embedding of the visible patches only: gather pixels first, then a K-row GEMM.

``gather_visible_patches(imgs, ids_keep, patch_size)`` -> (B, K, p*p*C): the kept patches of
(B, C, H, W) images in MAE's patchify layout, ``out[n, k, (a*p + b)*C + c] = imgs[n, c, i*p + a,
j*p + b]`` for patch ``ids_keep[n, k] = i*(W/p) + j``, read straight from the image at any strides
(no patchified image). Differentiable in ``imgs``: the backward writes the image gradient in one
pass (zeros outside the kept patches).

``embed_visible_patches(imgs, ids_keep, proj_weight, proj_bias, pos_embed)`` -> (B, K, D): what
MAE's encoder computes before masking, ``conv2d(imgs, W, b, stride=p).flatten(2).transpose(1, 2)
+ pos_embed[:, 1:]``, gathered at ``ids_keep``, but with the patch embedding run on the K kept
patches only; the gathered (pos_embed + bias) rows are added in the GEMM epilogue (``addmm``).

``gather_table_rows(table, ids)`` -> (B, K, D): rows ``table[ids[b, k]]`` of one (L, D) table
shared by the batch (the position embedding); its backward sums the gradient rows into the table
in a fixed order (deterministic, no atomics).

Indices (int32 or int64) must be unique within a sample and in [0, L); ``check_indices=False``
skips that check (a device sync on CUDA) for indices you made yourself.
"""

import torch
import torch.nn.functional as F

from ... import backends
from ..._utils import (check_index_values, check_int, check_same_device, check_tensor, device_guard,
                       direct_backward, direct_kernel_calls, eager_function, new_output)
from . import reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
_IMPLEMENTED = ("torch", "triton")


def _check_ids(name, ids, src_name, src, num_rows, batch=None):
    check_tensor(name, ids, 2, _INDEX_DTYPES, "(B, K)")
    if ids.device != src.device:
        raise ValueError(f"{name} is on {ids.device} but {src_name} is on {src.device}")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"{name} has batch size {ids.shape[0]} but {src_name} has {batch}")
    if ids.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(ids.shape)})")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one index per sample, got shape {tuple(ids.shape)}")
    if ids.shape[1] > num_rows:
        raise ValueError(f"{name} has {ids.shape[1]} indices per sample, more than the {num_rows} rows")


def _check_image_size(height, width, patch_size, name):
    if height % patch_size or width % patch_size:
        raise ValueError(f"{name} is {height}x{width}, not divisible by patch_size {patch_size}")
    return (height // patch_size) * (width // patch_size)


def _check_gather(imgs, ids_keep, patch_size):
    check_tensor("imgs", imgs, 4, _DTYPES, "(B, C, H, W)")
    check_int("patch_size", patch_size, minimum=1)
    if 0 in imgs.shape:
        raise ValueError(f"imgs has an empty dimension: shape {tuple(imgs.shape)}")
    num_patches = _check_image_size(imgs.shape[2], imgs.shape[3], patch_size, "imgs")
    _check_ids("ids_keep", ids_keep, "imgs", imgs, num_patches, imgs.shape[0])
    return num_patches


def _check_scatter(patches, ids_keep, patch_size, height, width):
    check_tensor("patches", patches, 3, _DTYPES, "(B, K, p*p*C)")
    check_int("patch_size", patch_size, minimum=1)
    check_int("height", height, minimum=1)
    check_int("width", width, minimum=1)
    if 0 in patches.shape or patches.shape[2] % (patch_size * patch_size):
        raise ValueError(f"patches must have shape (B, K, p*p*C) with p={patch_size} and C >= 1, "
                         f"got {tuple(patches.shape)}")
    num_patches = _check_image_size(height, width, patch_size, "the image (height x width)")
    _check_ids("ids_keep", ids_keep, "patches", patches, num_patches, patches.shape[0])
    if ids_keep.shape[1] != patches.shape[1]:
        raise ValueError(f"ids_keep has {ids_keep.shape[1]} indices per sample but patches has "
                         f"{patches.shape[1]} rows")
    return num_patches


def _check_table(table, ids):
    check_tensor("table", table, 2, _DTYPES, "(L, D)")
    if 0 in table.shape:
        raise ValueError(f"table has an empty dimension: shape {tuple(table.shape)}")
    _check_ids("ids", ids, "table", table, table.shape[0])


def _check_table_grad(y, ids, num_rows):
    check_tensor("y", y, 3, _DTYPES, "(B, K, D)")
    check_int("num_rows", num_rows, minimum=1)
    if y.shape[2] == 0:
        raise ValueError(f"y has an empty dimension: shape {tuple(y.shape)}")
    _check_ids("ids", ids, "y", y, num_rows, y.shape[0])
    if ids.shape[1] != y.shape[1]:
        raise ValueError(f"ids has {ids.shape[1]} indices per sample but y has {y.shape[1]} rows")


def _triton():
    from . import triton_impl

    return triton_impl


# -- the ops ---------------------------------------------------------------------------------------
@torch.library.custom_op("mvmae_fast::gather_visible_patches", mutates_args=())
def _gather_visible_patches_op(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                               check_indices: bool, backend: str) -> torch.Tensor:
    num_patches = _check_gather(imgs, ids_keep, patch_size)
    if check_indices:
        check_index_values("ids_keep", ids_keep, num_patches)
    name = backends.select_backend("gather_visible_patches", imgs.device, backend, _IMPLEMENTED)
    if name == "torch":
        return reference.gather_visible_patches(imgs, ids_keep, patch_size)
    B, C = imgs.shape[:2]
    ids_keep = ids_keep.contiguous()
    out = new_output((B, ids_keep.shape[1], patch_size * patch_size * C), imgs.dtype, imgs.device)
    with device_guard(imgs.device):
        _triton().gather_visible_patches(imgs, ids_keep, out, patch_size)
    return out


@_gather_visible_patches_op.register_fake
def _(imgs, ids_keep, patch_size, check_indices, backend):
    _check_gather(imgs, ids_keep, patch_size)
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], patch_size * patch_size * imgs.shape[1])


@torch.library.custom_op("mvmae_fast::scatter_visible_patches", mutates_args=())
def _scatter_visible_patches_op(patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, height: int,
                                width: int, check_indices: bool, backend: str) -> torch.Tensor:
    num_patches = _check_scatter(patches, ids_keep, patch_size, height, width)
    if check_indices:
        check_index_values("ids_keep", ids_keep, num_patches)
    name = backends.select_backend("scatter_visible_patches", patches.device, backend, _IMPLEMENTED)
    if name == "torch":
        return reference.scatter_visible_patches(patches, ids_keep, patch_size, height, width)
    B, _, P = patches.shape
    out = new_output((B, P // (patch_size * patch_size), height, width), patches.dtype, patches.device)
    with device_guard(patches.device):
        _triton().scatter_visible_patches(patches.contiguous(), ids_keep.contiguous(), out, patch_size)
    return out


@_scatter_visible_patches_op.register_fake
def _(patches, ids_keep, patch_size, height, width, check_indices, backend):
    _check_scatter(patches, ids_keep, patch_size, height, width)
    return patches.new_empty(patches.shape[0], patches.shape[2] // (patch_size * patch_size), height, width)


@torch.library.custom_op("mvmae_fast::gather_table_rows", mutates_args=())
def _gather_table_rows_op(table: torch.Tensor, ids: torch.Tensor, check_indices: bool,
                          backend: str) -> torch.Tensor:
    _check_table(table, ids)
    if check_indices:
        check_index_values("ids", ids, table.shape[0])
    name = backends.select_backend("gather_table_rows", table.device, backend, _IMPLEMENTED)
    if name == "torch":
        return reference.gather_table_rows(table, ids)
    ids = ids.contiguous()
    out = new_output((ids.shape[0], ids.shape[1], table.shape[1]), table.dtype, table.device)
    with device_guard(table.device):
        _triton().gather_table_rows(table.contiguous(), ids, out)
    return out


@_gather_table_rows_op.register_fake
def _(table, ids, check_indices, backend):
    _check_table(table, ids)
    return table.new_empty(ids.shape[0], ids.shape[1], table.shape[1])


@torch.library.custom_op("mvmae_fast::scatter_add_table_rows", mutates_args=())
def _scatter_add_table_rows_op(y: torch.Tensor, ids: torch.Tensor, num_rows: int, check_indices: bool,
                               backend: str) -> torch.Tensor:
    _check_table_grad(y, ids, num_rows)
    if check_indices:
        check_index_values("ids", ids, num_rows)
    name = backends.select_backend("scatter_add_table_rows", y.device, backend, _IMPLEMENTED)
    if name == "torch":
        return reference.scatter_add_table_rows(y, ids, num_rows)
    impl = _triton()
    chunks = -(-y.shape[0] // impl.TABLE_SAMPLES)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    partial = new_output((chunks, num_rows, y.shape[2]), acc, y.device)
    with device_guard(y.device):
        impl.scatter_add_table_rows(y.contiguous(), ids.contiguous(), partial)
    return partial.sum(dim=0).to(y.dtype)


@_scatter_add_table_rows_op.register_fake
def _(y, ids, num_rows, check_indices, backend):
    _check_table_grad(y, ids, num_rows)
    return y.new_empty(num_rows, y.shape[2])


# -- autograd: each op's backward is its partner, reusing the indices the forward pass checked -----
def _patches_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, _, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.patch_size, ctx.image_size, ctx.backend = patch_size, tuple(imgs.shape[2:]), backend


def _patches_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    if direct_backward(ctx):  # a node of _EagerVisiblePatches: the torch code
        grad_imgs = reference.scatter_visible_patches(grad, ids_keep, ctx.patch_size, *ctx.image_size)
    else:
        grad_imgs = _scatter_visible_patches_op(grad, ids_keep, ctx.patch_size, *ctx.image_size, False, ctx.backend)
    return grad_imgs, None, None, None, None


def _image_setup(ctx, inputs, output):
    _, ids_keep, patch_size, _, _, _, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.patch_size, ctx.backend = patch_size, backend


def _image_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    grad_patches = _gather_visible_patches_op(grad, ids_keep, ctx.patch_size, False, ctx.backend)
    return grad_patches, None, None, None, None, None, None


def _table_setup(ctx, inputs, output):
    table, ids, _, backend = inputs
    ctx.save_for_backward(ids)
    ctx.num_rows, ctx.backend = table.shape[0], backend


def _table_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    if direct_backward(ctx):  # a node of _EagerTableRows: the torch code
        return reference.scatter_add_table_rows(grad, ids, ctx.num_rows), None, None, None
    return _scatter_add_table_rows_op(grad, ids, ctx.num_rows, False, ctx.backend), None, None, None


def _table_grad_setup(ctx, inputs, output):
    _, ids, _, _, backend = inputs
    ctx.save_for_backward(ids)
    ctx.backend = backend


def _table_grad_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    return _gather_table_rows_op(grad, ids, False, ctx.backend), None, None, None, None


_gather_visible_patches_op.register_autograd(_patches_backward, setup_context=_patches_setup)
_scatter_visible_patches_op.register_autograd(_image_backward, setup_context=_image_setup)
_gather_table_rows_op.register_autograd(_table_backward, setup_context=_table_setup)
_scatter_add_table_rows_op.register_autograd(_table_grad_backward, setup_context=_table_grad_setup)


# -- eager CPU: the torch code without the custom ops' Python dispatch ----------------------------
# On the CPU these ops run their torch code; eager calls run it from autograd Functions with the
# custom ops' context and backward (which runs the partner's torch code directly for these nodes,
# _utils.direct_backward) instead of through the custom ops' dispatch (~70 us a call, twice that with
# the backward). torch.compile and the other tracers get the custom ops (_utils.direct_kernel_calls).
def _eager_torch(op, device, backend, *tensors):
    return (device.type == "cpu" and direct_kernel_calls(*tensors)
            and backends.select_backend(op, device, backend, _IMPLEMENTED) == "torch")


_EagerVisiblePatches = eager_function("_EagerVisiblePatches", reference.gather_visible_patches, _patches_setup,
                                      _patches_backward, "torch")
_EagerTableRows = eager_function("_EagerTableRows", reference.gather_table_rows, _table_setup, _table_backward,
                                 "torch")


def _visible_patches(imgs, ids_keep, patch_size, check_indices, backend):
    if (isinstance(imgs, torch.Tensor) and isinstance(ids_keep, torch.Tensor)
            and _eager_torch("gather_visible_patches", imgs.device, backend, imgs, ids_keep)):
        num_patches = _check_gather(imgs, ids_keep, patch_size)
        if check_indices:
            check_index_values("ids_keep", ids_keep, num_patches)
        return _EagerVisiblePatches.apply(imgs, ids_keep, patch_size)
    return _gather_visible_patches_op(imgs, ids_keep, patch_size, check_indices, backend)


def _table_rows(table, ids, check_indices, backend):
    if (isinstance(table, torch.Tensor) and isinstance(ids, torch.Tensor)
            and _eager_torch("gather_table_rows", table.device, backend, table, ids)):
        _check_table(table, ids)
        if check_indices:
            check_index_values("ids", ids, table.shape[0])
        return _EagerTableRows.apply(table, ids)
    return _gather_table_rows_op(table, ids, check_indices, backend)


# -- public API ----------------------------------------------------------------------------------
def gather_visible_patches(imgs, ids_keep, patch_size, *, check_indices=True, backend=None):
    """Pixels of the kept patches, (B, C, H, W) and (B, K) -> (B, K, p*p*C) in patchify layout.

    Differentiable in ``imgs``. H and W must be multiples of ``patch_size``; patch l is at grid row
    l // (W/p), column l % (W/p).
    """
    return _visible_patches(imgs, ids_keep, patch_size, check_indices, backend or "")


def gather_table_rows(table, ids, *, check_indices=True, backend=None):
    """``table[ids]``: (L, D) and (B, K) -> (B, K, D). Differentiable in ``table`` (deterministic)."""
    return _table_rows(table, ids, check_indices, backend or "")


def embed_visible_patches(imgs, ids_keep, proj_weight, proj_bias, pos_embed, *, check_indices=True, backend=None):
    """Patch embedding plus position embedding of the kept patches only: (B, K, D).

    Equals ``(conv2d(imgs, proj_weight, proj_bias, stride=p).flatten(2).transpose(1, 2)
    + pos_embed[:, 1:])`` gathered at ``ids_keep`` (B, K), up to summation order.

    imgs (B, C, H, W); proj_weight (D, C, p, p) (a PatchEmbed conv's weight); proj_bias (D,) or None;
    pos_embed (1, 1 + L, D), cls row first, L = (H/p) * (W/p). Outside autocast all four share a
    dtype and the result has it. Under autocast the GEMM and the bias run in the autocast dtype, as
    the conv would, and the position embedding is added in its own dtype (float32 for MAE), so the
    result has the promoted dtype, as in MAE. Gradients flow to proj_weight, proj_bias, pos_embed
    (when it requires grad) and imgs (when it requires grad).
    """
    check_tensor("proj_weight", proj_weight, 4, _DTYPES, "(D, C, p, p)")
    check_tensor("imgs", imgs, 4, _DTYPES, "(B, C, H, W)")
    check_tensor("pos_embed", pos_embed, 3, _DTYPES, "(1, 1 + L, D)")
    D, C, p, q = proj_weight.shape
    if p != q:
        raise ValueError(f"proj_weight must have square p x p kernels, got shape {tuple(proj_weight.shape)}")
    if imgs.shape[1] != C:
        raise ValueError(f"imgs has {imgs.shape[1]} channels but proj_weight expects {C}")
    num_patches = _check_image_size(imgs.shape[2], imgs.shape[3], p, "imgs")
    if tuple(pos_embed.shape) != (1, num_patches + 1, D):
        raise ValueError(f"pos_embed must have shape (1, {num_patches + 1}, {D}) for {num_patches} patches of "
                         f"dim {D} (cls row first), got {tuple(pos_embed.shape)}")
    params = [("proj_weight", proj_weight), ("pos_embed", pos_embed)]
    if proj_bias is not None:
        check_tensor("proj_bias", proj_bias, 1, _DTYPES, "(D,)")
        if proj_bias.shape[0] != D:
            raise ValueError(f"proj_bias must have shape ({D},), got {tuple(proj_bias.shape)}")
        params.append(("proj_bias", proj_bias))
    check_same_device("imgs", imgs, **dict(params))
    autocast = torch.is_autocast_enabled(imgs.device.type)
    if not autocast and any(t.dtype != imgs.dtype for _, t in params):
        raise TypeError("outside autocast, imgs, proj_weight, proj_bias and pos_embed must share a dtype; got "
                        + ", ".join(f"{name} {t.dtype}" for name, t in [("imgs", imgs), *params]))

    backend = backend or ""
    patches = _visible_patches(imgs, ids_keep, p, check_indices, backend)
    weight = proj_weight.permute(0, 2, 3, 1).reshape(D, p * p * C)
    pos = pos_embed[0, 1:]
    if autocast:
        return F.linear(patches, weight, proj_bias) + _table_rows(pos, ids_keep, False, backend)
    table = pos if proj_bias is None else pos + proj_bias
    rows = _table_rows(table, ids_keep, False, backend)
    B, K = ids_keep.shape
    return torch.addmm(rows.view(B * K, D), patches.view(B * K, -1), weight.t()).view(B, K, D)


__all__ = ["embed_visible_patches", "gather_table_rows", "gather_visible_patches"]
