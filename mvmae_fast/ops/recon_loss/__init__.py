"""``masked_recon_loss``: MAE's per-view reconstruction loss.

Per patch: mean over its p*p*C values of (pred - target)^2, where target is the patchified image,
normalised per patch (mean 0, divided by sqrt(unbiased var + 1e-6)) when ``norm_pix_loss``. The view
loss is the sum over removed patches divided by their number; visible patches do not count.

``masked_recon_loss`` takes predictions for every patch and a mask (the reference MAE's interface);
``masked_recon_loss_rows`` takes predictions for the removed patches only, with their indices, and
can do every view in one call. Its cpp (CPU) and triton backends read the targets from the image,
never materialising them; their backward pass writes the gradient of the prediction directly.
"""

import torch

from ... import _ext, backends
from ..._utils import (CPP_DTYPE_CODES, check_index_values, check_int, check_tensor, device_guard,
                       direct_backward, direct_kernel_calls, eager_function, new_output)

_IMPLEMENTED = ("torch", "cpp", "triton")
_KERNELS = ("cpp", "triton")  # the backends the custom ops run


def _implemented(device, kernels_only=False):
    """The cpp kernels are CPU kernels: on other devices forcing cpp is refused with the reason."""
    names = _KERNELS if kernels_only else _IMPLEMENTED
    return names if torch.device(device).type == "cpu" else tuple(n for n in names if n != "cpp")


_INDEX_DTYPES = (torch.int32, torch.int64)

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
    """MAE's targets: the patchified image, each patch normalised (minus its mean, over sqrt(unbiased
    variance + 1e-6)) with norm_pix_loss, exactly as the official code writes it."""
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


def _check_rows(pred, imgs, ids_removed, patch_size):
    """pred (V*B, M, P), imgs (V, B, C, H, W), ids_removed (V*B, M)."""
    check_tensor("pred", pred, 3, _DTYPES, "(V*B, M, p*p*C)")
    check_tensor("imgs", imgs, 5, _DTYPES, "(V, B, C, H, W)")
    check_tensor("ids_removed", ids_removed, 2, _INDEX_DTYPES, "(V*B, M)")
    check_int("patch_size", patch_size, minimum=1)
    if pred.device != imgs.device or ids_removed.device != pred.device:
        raise ValueError(f"pred, imgs and ids_removed must be on one device, got {pred.device}, "
                         f"{imgs.device} and {ids_removed.device}")
    V, B, C, H, W = imgs.shape
    if min(V, B, C, H, W) == 0:
        raise ValueError(f"imgs has an empty dimension: shape {tuple(imgs.shape)}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {patch_size}")
    if pred.shape[0] != V * B:
        raise ValueError(f"pred holds {pred.shape[0]} samples but imgs {V} views of {B}")
    if pred.shape[2] != patch_size * patch_size * C:
        raise ValueError(f"pred rows have {pred.shape[2]} values; patches of {patch_size}x{patch_size}x{C} "
                         f"have {patch_size * patch_size * C}")
    if pred.shape[1] == 0:
        raise ValueError("pred must hold at least one removed patch per sample, got shape (N, 0, P)")
    if ids_removed.shape != pred.shape[:2]:
        raise ValueError(f"ids_removed must have shape {tuple(pred.shape[:2])}, got {tuple(ids_removed.shape)}")


def _loss_dtype(pred, imgs):
    """As ``masked_recon_loss`` with a float32 mask: at least float32."""
    return torch.promote_types(torch.promote_types(pred.dtype, imgs.dtype), torch.float32)


def _recon_rows_torch(pred, imgs, ids_removed, patch_size, norm_pix_loss):
    """The view losses (V,) in plain PyTorch: patchify, gather the removed rows, normalise those (the
    normalisation is per patch, so only the removed patches need it)."""
    V, B = imgs.shape[:2]
    target = patchify(imgs.reshape(V * B, *imgs.shape[2:]), patch_size)
    target = torch.gather(target, 1, ids_removed.long().unsqueeze(-1).expand(-1, -1, target.shape[2]))
    if norm_pix_loss and target.dtype in (torch.float32, torch.float64):
        # patch_targets' normalisation with the variance as a plain sum: torch's CPU var over a short
        # last dim is several times slower than these element-wise passes. (Half precision keeps
        # torch.var, which accumulates in float32.)
        centred = target - target.mean(dim=-1, keepdim=True)
        var = (centred * centred).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
        target = centred / (var + 1.0e-6) ** 0.5
    elif norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        target = (target - mean) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1).to(_loss_dtype(pred, imgs))
    return per_patch.reshape(V, -1).mean(dim=1)


def _num_patches(imgs, patch_size):
    return (imgs.shape[3] // patch_size) * (imgs.shape[4] // patch_size)


def _cpp_runs(pred, imgs):
    """The cpp kernels compute in float32: pred in float32, bfloat16 or float16, imgs converted exactly
    to float32 if half. float64 takes the torch code."""
    return pred.dtype in CPP_DTYPE_CODES and imgs.dtype in CPP_DTYPE_CODES


def _cpp_args(pred, imgs, ids_removed, patch_size):
    """The kernels' leading arguments and sizes, and imgs as they read it: the caller keeps the
    tensors whose pointers these are alive until the call returns."""
    imgs = imgs if imgs.dtype == torch.float32 else imgs.to(torch.float32)
    V, B, C, H, W = imgs.shape
    return (pred.data_ptr(), CPP_DTYPE_CODES[pred.dtype], imgs.data_ptr(), list(imgs.stride()),
            ids_removed.data_ptr(), ids_removed.element_size()), (V, B, C, W, patch_size, pred.shape[1]), imgs


def _cpp_squared_error_sums(pred, imgs, ids_removed, patch_size, norm_pix_loss):
    """Per-view sums of squared errors, float64 (V,): one pass over the removed rows, each patch's
    target gathered from the image and normalised in registers (csrc/cpu/tokens.cpp)."""
    head, sizes, imgs = _cpp_args(pred, imgs, ids_removed, patch_size)
    sums = new_output((imgs.shape[0],), torch.float64, pred.device)
    _ext._C.recon_rows_forward_cpu(*head, sums.data_ptr(), *sizes, norm_pix_loss, torch.get_num_threads())
    return sums


@torch.library.custom_op("mvmae_fast::masked_recon_loss_rows", mutates_args=())
def _recon_rows_op(pred: torch.Tensor, imgs: torch.Tensor, ids_removed: torch.Tensor, patch_size: int,
                   norm_pix_loss: bool, check_indices: bool, backend: str = "") -> torch.Tensor:
    """The view losses (V,)."""
    _check_rows(pred, imgs, ids_removed, patch_size)
    if check_indices:
        check_index_values("ids_removed", ids_removed, _num_patches(imgs, patch_size), unique=False)
    name = backends.select_backend("masked_recon_loss_rows", pred.device, backend, _implemented(pred.device, True))
    B, M, P = imgs.shape[1], pred.shape[1], pred.shape[2]
    if name == "cpp":
        if not _cpp_runs(pred, imgs):
            raise TypeError(f"masked_recon_loss_rows: the cpp kernels take float32/bfloat16/float16 pred and imgs, "
                            f"got {pred.dtype} and {imgs.dtype} (use backend='torch')")
        return _cpp_losses(pred, imgs, ids_removed, patch_size, norm_pix_loss)
    from . import triton_impl

    with device_guard(pred.device):
        sums = triton_impl.squared_error_sums(pred.contiguous(), imgs, ids_removed.contiguous(), patch_size,
                                              norm_pix_loss)
    return (sums / (P * B * M)).to(_loss_dtype(pred, imgs))


def _cpp_losses(pred, imgs, ids_removed, patch_size, norm_pix_loss):
    B, M, P = imgs.shape[1], pred.shape[1], pred.shape[2]
    sums = _cpp_squared_error_sums(pred.contiguous(), imgs, ids_removed.contiguous(), patch_size, norm_pix_loss)
    return (sums / (P * B * M)).to(_loss_dtype(pred, imgs))


def _cpp_grad_pred(grad_losses, pred, imgs, ids_removed, patch_size, norm_pix_loss):
    pred = pred.contiguous()
    grad = new_output(pred.shape, pred.dtype, pred.device)
    B, M, P = imgs.shape[1], pred.shape[1], pred.shape[2]
    scale = (grad_losses.to(torch.float64) / (P * B * M)).to(torch.float32).contiguous()
    ids_removed = ids_removed.contiguous()
    head, sizes, imgs = _cpp_args(pred, imgs, ids_removed, patch_size)  # keeps a float32 copy alive
    _ext._C.recon_rows_backward_cpu(scale.data_ptr(), *head, grad.data_ptr(), *sizes, norm_pix_loss,
                                    torch.get_num_threads())
    return grad


@_recon_rows_op.register_fake
def _(pred, imgs, ids_removed, patch_size, norm_pix_loss, check_indices, backend=""):
    _check_rows(pred, imgs, ids_removed, patch_size)
    return pred.new_empty(imgs.shape[0], dtype=_loss_dtype(pred, imgs))


@torch.library.custom_op("mvmae_fast::masked_recon_loss_rows_backward", mutates_args=())
def _recon_rows_backward_op(grad_losses: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor,
                            ids_removed: torch.Tensor, patch_size: int, norm_pix_loss: bool,
                            backend: str = "") -> torch.Tensor:
    """d(sum_v grad_losses[v] * loss_v) / d(pred), recomputing the targets from the image."""
    _check_rows(pred, imgs, ids_removed, patch_size)
    if grad_losses.shape != (imgs.shape[0],):
        raise ValueError(f"grad_losses must have shape ({imgs.shape[0]},), got {tuple(grad_losses.shape)}")
    name = backends.select_backend("masked_recon_loss_rows", pred.device, backend, _implemented(pred.device, True))
    if name == "cpp":
        if not _cpp_runs(pred, imgs):
            raise TypeError(f"masked_recon_loss_rows_backward: the cpp kernels take float32/bfloat16/float16 pred "
                            f"and imgs, got {pred.dtype} and {imgs.dtype}")
        return _cpp_grad_pred(grad_losses, pred, imgs, ids_removed, patch_size, norm_pix_loss)
    pred = pred.contiguous()
    grad = new_output(pred.shape, pred.dtype, pred.device)
    from . import triton_impl

    with device_guard(pred.device):
        triton_impl.grad_pred(grad_losses.contiguous(), pred, imgs, ids_removed.contiguous(), patch_size,
                              norm_pix_loss, grad)
    return grad


@_recon_rows_backward_op.register_fake
def _(grad_losses, pred, imgs, ids_removed, patch_size, norm_pix_loss, backend=""):
    _check_rows(pred, imgs, ids_removed, patch_size)
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


# The backward pass reads the prediction and the image again rather than keeping a gradient from
# the forward pass: the same traffic give or take, no extra buffer, and d(pred) is rounded to its
# dtype once, after the upstream gradient (an fp16 loss scale included) is applied.
def _recon_rows_setup(ctx, inputs, output):
    pred, imgs, ids_removed, patch_size, norm_pix_loss, _, *backend = inputs
    ctx.save_for_backward(pred, imgs, ids_removed)
    ctx.patch_size, ctx.norm_pix_loss, ctx.backend = patch_size, norm_pix_loss, (backend or [""])[0]


def _recon_rows_backward(ctx, grad_losses):
    if ctx.needs_input_grad[1]:
        raise NotImplementedError("masked_recon_loss_rows is not differentiable in imgs (use backend='torch')")
    pred, imgs, ids_removed = ctx.saved_tensors
    if direct_backward(ctx):  # a node of _EagerCppReconRows
        grad = _cpp_grad_pred(grad_losses, pred, imgs, ids_removed, ctx.patch_size, ctx.norm_pix_loss)
    else:
        grad = _recon_rows_backward_op(grad_losses, pred, imgs, ids_removed, ctx.patch_size, ctx.norm_pix_loss,
                                       ctx.backend)
    return grad, None, None, None, None, None, None


_recon_rows_op.register_autograd(_recon_rows_backward, setup_context=_recon_rows_setup)


# The cpp kernels called from eager mode on the CPU without the custom op's Python dispatch (~70 us
# a call, twice that with the backward); torch.compile and the other tracers get the custom op
# (_utils.direct_kernel_calls).
_EagerCppReconRows = eager_function("_EagerCppReconRows", _cpp_losses, _recon_rows_setup, _recon_rows_backward, "cpp")


def masked_recon_loss_rows(pred, imgs, ids_removed, patch_size, norm_pix_loss=True, *, views=None,
                           check_indices=True, backend=None):
    """MAE's reconstruction loss from the predictions of the removed patches only.

    pred (N, M, p*p*C): row ``m`` of sample ``n`` predicts patch ``ids_removed[n, m]`` (ids_removed
    (N, M), int32 or int64, indices into the patchify order). With ``views=None``, imgs (N, C, H, W)
    and the result is the scalar loss, equal to ``masked_recon_loss(pred_full, imgs, mask, ...)``
    when pred holds the removed rows of pred_full. With ``views=V``, the views are concatenated
    along the batch (N = V*B, view-major, as the model stacks them): imgs is (V*B, C, H, W) or
    (V, B, C, H, W), and the result is (V,), one loss per view, from one launch. The 5-D imgs may
    be any strided view, read in place: ``imgs.transpose(0, 1)`` of a (B, V, C, H, W) batch, or
    ``img.expand(V, -1, -1, -1, -1)`` for a target shared by the views.

    Differentiable in pred only. ``check_indices=False`` skips the range check of ids_removed (a
    device sync on CUDA); out-of-range indices then read out of bounds in the triton kernels (the cpp
    kernels and the torch backend's gather still refuse them). The cpp backend computes in float32
    (float64 inputs take the torch code).
    """
    check_int("patch_size", patch_size, minimum=1)
    if views is not None:
        check_int("views", views, minimum=1)
    if not isinstance(imgs, torch.Tensor) or imgs.dim() not in (4, 5):
        raise ValueError("imgs must be a (N, C, H, W) or (V, B, C, H, W) tensor")
    if imgs.dim() == 5:
        if views is None or imgs.shape[0] != views:
            raise ValueError(f"imgs of shape {tuple(imgs.shape)} needs views={imgs.shape[0]}")
        imgs5 = imgs
    else:
        V = views or 1
        if imgs.shape[0] % V:
            raise ValueError(f"imgs holds {imgs.shape[0]} samples, not a multiple of views={V}")
        imgs5 = imgs.unflatten(0, (V, imgs.shape[0] // V))
    _check_rows(pred, imgs5, ids_removed, patch_size)
    name = backends.select_backend("masked_recon_loss_rows", pred.device, backend or "", _implemented(pred.device))
    if name == "torch" or (name == "cpp" and not _cpp_runs(pred, imgs5)):  # float64: the torch code
        losses = _recon_rows_torch(pred, imgs5, ids_removed, patch_size, norm_pix_loss)
    elif name == "cpp" and pred.device.type == "cpu" and direct_kernel_calls(pred, imgs5, ids_removed):
        if check_indices:
            check_index_values("ids_removed", ids_removed, _num_patches(imgs5, patch_size), unique=False)
        losses = _EagerCppReconRows.apply(pred, imgs5, ids_removed, patch_size, norm_pix_loss)
    else:
        losses = _recon_rows_op(pred, imgs5, ids_removed, patch_size, norm_pix_loss, check_indices, name)
    return losses if views is not None else losses[0]
