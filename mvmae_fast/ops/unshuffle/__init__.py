"""``decoder_unshuffle``: MAE's decoder input from the decoder-embedded visible tokens, in one pass.

For x (B, 1 + K, D) (cls row first, then the K visible tokens in ``ids_keep`` order), ids_restore
(B, L) (a permutation of [0, L) per sample, as masking returns it), mask_token (1, 1, D) and
decoder_pos_embed (1, 1 + L, D)::

    out[b, 0]     = x[b, 0] + pos[0]
    out[b, 1 + l] = (x[b, 1 + t] if t < K else mask_token) + pos[1 + l],   t = ids_restore[b, l]

which is the official ``cat([x[:, 1:], mask_tokens]) -> gather(ids_restore) -> cat(cls) + pos``
without the concatenations or the ``.repeat``-ed index. The result has the promoted dtype of x,
mask_token and pos (float32 under autocast with MAE's float32 parameters, as in MAE), each value
added in float32 and rounded once.

Backward: grad x (cls row from row 0, visible rows scattered back without atomics, ids_restore
being a permutation), grad mask_token (the sum over removed rows, deterministic), and grad pos
(the sum over the batch) only when pos requires grad.
"""

import torch

from ... import _ext, backends
from ..._utils import (CPP_DTYPE_CODES, check_index_values, check_int, check_same_device, check_tensor, device_guard,
                       direct_backward, direct_kernel_calls, eager_function, new_output)
from . import reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
_IMPLEMENTED = ("torch", "cpp", "triton")


def _implemented(device):
    """The cpp kernels are CPU kernels (the extension has no CUDA unshuffle): on other devices the op
    has torch and triton only, so forcing cpp there is refused with the reason."""
    return _IMPLEMENTED if torch.device(device).type == "cpu" else ("torch", "triton")


def _cpp_runs(*dtypes):
    """The cpp backend computes in float32 (x in float32, bfloat16 or float16; the mask token and
    the position embedding, converted exactly to float32 if half); float64 takes the torch code."""
    return all(d in CPP_DTYPE_CODES for d in dtypes)


def _out_dtype(x, mask_token, pos):
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos.dtype)


def _check_ids_restore(ids_restore, batch, device, num_visible, src_name):
    check_tensor("ids_restore", ids_restore, 2, _INDEX_DTYPES, "(B, L)")
    if ids_restore.device != device:
        raise ValueError(f"ids_restore is on {ids_restore.device} but {src_name} is on {device}")
    if ids_restore.shape[0] != batch:
        raise ValueError(f"ids_restore has batch size {ids_restore.shape[0]} but {src_name} has {batch}")
    L = ids_restore.shape[1]
    if L == 0:
        raise ValueError("ids_restore must hold at least one patch per sample, got shape (B, 0)")
    if num_visible > L:
        raise ValueError(f"{src_name} holds {num_visible} visible tokens, more than the {L} patches of ids_restore")
    return L


def _check_forward(x, ids_restore, mask_token, pos):
    check_tensor("x", x, 3, _DTYPES, "(B, 1 + K, D)")
    if 0 in x.shape:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)}")
    B, K1, D = x.shape
    L = _check_ids_restore(ids_restore, B, x.device, K1 - 1, "x")
    check_tensor("mask_token", mask_token, 3, _DTYPES, "(1, 1, D)")
    if tuple(mask_token.shape) != (1, 1, D):
        raise ValueError(f"mask_token must have shape (1, 1, {D}), got {tuple(mask_token.shape)}")
    check_tensor("decoder_pos_embed", pos, 3, _DTYPES, "(1, 1 + L, D)")
    if tuple(pos.shape) != (1, L + 1, D):
        raise ValueError(f"decoder_pos_embed must have shape (1, {L + 1}, {D}) for L={L} patches, "
                         f"got {tuple(pos.shape)}")
    check_same_device("x", x, mask_token=mask_token, decoder_pos_embed=pos)
    return L


def _check_backward(grad, ids_restore, num_visible, x_dtype, token_dtype):
    check_tensor("grad", grad, 3, _DTYPES, "(B, 1 + L, D)")
    if 0 in grad.shape:
        raise ValueError(f"grad has an empty dimension: shape {tuple(grad.shape)}")
    check_int("num_visible", num_visible, minimum=0)
    L = _check_ids_restore(ids_restore, grad.shape[0], grad.device, num_visible, "grad")
    if grad.shape[1] != L + 1:
        raise ValueError(f"grad has {grad.shape[1]} rows, expected 1 + L = {L + 1}")
    for name, dtype in (("x_dtype", x_dtype), ("token_dtype", token_dtype)):
        if dtype not in _DTYPES:
            raise TypeError(f"{name} must be a floating dtype, got {dtype}")


def _check_permutation(ids_restore):
    L = ids_restore.shape[1]
    check_index_values("ids_restore", ids_restore, L, rule=f"be a permutation of [0, {L}) in each sample")


@torch.library.custom_op("mvmae_fast::decoder_unshuffle", mutates_args=())
def _decoder_unshuffle_op(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                          decoder_pos_embed: torch.Tensor, check_indices: bool, backend: str) -> torch.Tensor:
    L = _check_forward(x, ids_restore, mask_token, decoder_pos_embed)
    if check_indices:
        _check_permutation(ids_restore)
    name = backends.select_backend("decoder_unshuffle", x.device, backend, _implemented(x.device))
    if name == "cpp" and _cpp_runs(x.dtype, mask_token.dtype, decoder_pos_embed.dtype):
        return _cpp_forward(x, ids_restore, mask_token, decoder_pos_embed, L)
    if name in ("torch", "cpp"):
        return reference.decoder_unshuffle(x, ids_restore, mask_token, decoder_pos_embed)
    out = new_output((x.shape[0], L + 1, x.shape[2]), _out_dtype(x, mask_token, decoder_pos_embed), x.device)
    from . import triton_impl

    with device_guard(x.device):
        triton_impl.decoder_unshuffle(x.contiguous(), ids_restore.contiguous(), mask_token.contiguous(),
                                      decoder_pos_embed.contiguous(), out)
    return out


def _cpp_forward(x, ids_restore, mask_token, pos, L):
    """One pass over the output rows (csrc/cpu/tokens.cpp); values added in float32, rounded once."""
    out_dtype = _out_dtype(x, mask_token, pos)
    x, ids_restore = x.contiguous(), ids_restore.contiguous()
    token = mask_token.reshape(-1).to(torch.float32).contiguous()
    pos = pos.reshape(L + 1, -1).to(torch.float32).contiguous()
    B, K1, D = x.shape
    out = new_output((B, L + 1, D), torch.float32, x.device)
    _ext._C.decoder_unshuffle_forward_cpu(x.data_ptr(), CPP_DTYPE_CODES[x.dtype], ids_restore.data_ptr(),
                                          ids_restore.element_size(), token.data_ptr(), pos.data_ptr(),
                                          out.data_ptr(), B, K1 - 1, L, D, torch.get_num_threads())
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _cpp_backward(grad, ids_restore, num_visible, x_dtype, token_dtype):
    """grad_x (copies, zero where no patch maps) and the mask token's gradient (float32 sums per
    sample, added over the batch in order) in one pass over grad."""
    grad = grad.to(torch.float32).contiguous()
    ids_restore = ids_restore.contiguous()
    B, L1, D = grad.shape
    grad_x = new_output((B, num_visible + 1, D), x_dtype, grad.device)
    grad_token = new_output((1, 1, D), torch.float32, grad.device)
    _ext._C.decoder_unshuffle_backward_cpu(grad.data_ptr(), ids_restore.data_ptr(), ids_restore.element_size(),
                                           grad_x.data_ptr(), CPP_DTYPE_CODES[x_dtype], grad_token.data_ptr(), B,
                                           num_visible, L1 - 1, D, torch.get_num_threads())
    return grad_x, grad_token.to(token_dtype)


@_decoder_unshuffle_op.register_fake
def _(x, ids_restore, mask_token, decoder_pos_embed, check_indices, backend):
    L = _check_forward(x, ids_restore, mask_token, decoder_pos_embed)
    return x.new_empty(x.shape[0], L + 1, x.shape[2], dtype=_out_dtype(x, mask_token, decoder_pos_embed))


@torch.library.custom_op("mvmae_fast::decoder_unshuffle_backward", mutates_args=())
def _decoder_unshuffle_backward_op(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                                   x_dtype: torch.dtype, token_dtype: torch.dtype,
                                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backward(grad, ids_restore, num_visible, x_dtype, token_dtype)
    name = backends.select_backend("decoder_unshuffle", grad.device, backend, _implemented(grad.device))
    if name == "cpp" and _cpp_runs(grad.dtype, x_dtype, token_dtype):
        return _cpp_backward(grad, ids_restore, num_visible, x_dtype, token_dtype)
    if name in ("torch", "cpp"):
        return reference.decoder_unshuffle_backward(grad, ids_restore, num_visible, x_dtype, token_dtype)
    B, _, D = grad.shape
    grad_x = new_output((B, num_visible + 1, D), x_dtype, grad.device)
    partial = new_output((B, D), torch.float64 if grad.dtype == torch.float64 else torch.float32, grad.device)
    from . import triton_impl

    with device_guard(grad.device):
        triton_impl.decoder_unshuffle_backward(grad.contiguous(), ids_restore.contiguous(), grad_x, partial)
    return grad_x, partial.sum(dim=0).reshape(1, 1, D).to(token_dtype)


@_decoder_unshuffle_backward_op.register_fake
def _(grad, ids_restore, num_visible, x_dtype, token_dtype, backend):
    _check_backward(grad, ids_restore, num_visible, x_dtype, token_dtype)
    B, _, D = grad.shape
    return grad.new_empty(B, num_visible + 1, D, dtype=x_dtype), grad.new_empty(1, 1, D, dtype=token_dtype)


def _setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos, _, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_visible, ctx.x_dtype, ctx.token_dtype = x.shape[1] - 1, x.dtype, mask_token.dtype
    ctx.pos_dtype, ctx.backend = pos.dtype, backend


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad_x = grad_token = grad_pos = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        if direct_backward(ctx):  # a node of _EagerCppUnshuffle
            grad_x, grad_token = _cpp_backward(grad, ids_restore, ctx.num_visible, ctx.x_dtype, ctx.token_dtype)
        else:
            grad_x, grad_token = _decoder_unshuffle_backward_op(grad, ids_restore, ctx.num_visible, ctx.x_dtype,
                                                                ctx.token_dtype, ctx.backend)
    if ctx.needs_input_grad[3]:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_pos = grad.sum(dim=0, keepdim=True, dtype=acc).to(ctx.pos_dtype)
    return grad_x, None, grad_token, grad_pos, None, None


def _backward_setup(ctx, inputs, output):
    grad, ids_restore, num_visible, x_dtype, token_dtype, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.grad_shape, ctx.grad_dtype = tuple(grad.shape), grad.dtype
    ctx.num_visible, ctx.x_dtype, ctx.token_dtype, ctx.backend = num_visible, x_dtype, token_dtype, backend


def _backward_backward(ctx, grad_grad_x, grad_grad_token):
    # The backward is linear in grad: its adjoint is the forward pass with a zero position embedding.
    (ids_restore,) = ctx.saved_tensors
    B, rows, D = ctx.grad_shape
    if grad_grad_x is None:
        grad_grad_x = ids_restore.new_zeros(B, ctx.num_visible + 1, D, dtype=ctx.x_dtype)
    if grad_grad_token is None:
        grad_grad_token = ids_restore.new_zeros(1, 1, D, dtype=ctx.token_dtype)
    zero_pos = ids_restore.new_zeros(1, rows, D, dtype=ctx.grad_dtype)
    out = _decoder_unshuffle_op(grad_grad_x, ids_restore, grad_grad_token, zero_pos, False, ctx.backend)
    return out.to(ctx.grad_dtype), None, None, None, None, None


_decoder_unshuffle_op.register_autograd(_backward, setup_context=_setup)
_decoder_unshuffle_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup)


# The cpp kernels called from eager mode on the CPU without the custom ops' Python dispatch (~70 us
# a call, twice that with the backward); torch.compile and the other tracers get the custom op
# (_utils.direct_kernel_calls). Arguments: x, ids_restore, mask_token, pos, num_patches.
_EagerCppUnshuffle = eager_function("_EagerCppUnshuffle", _cpp_forward, _setup, _backward, "cpp", setup_args=4)


def decoder_unshuffle(x, ids_restore, mask_token, decoder_pos_embed, *, check_indices=True, backend=None):
    """MAE's full decoder input (B, 1 + L, D) from x (B, 1 + K, D), ids_restore (B, L),
    mask_token (1, 1, D) and decoder_pos_embed (1, 1 + L, D); see the module docstring.

    Differentiable in x, mask_token and decoder_pos_embed. ``check_indices=False`` skips checking
    that ids_restore is a permutation (a device sync on CUDA); pass it only for indices you made
    yourself, e.g. from :func:`random_masking`.
    """
    tensors = (x, ids_restore, mask_token, decoder_pos_embed)
    if (all(isinstance(t, torch.Tensor) for t in tensors) and x.device.type == "cpu" and direct_kernel_calls(*tensors)
            and backends.select_backend("decoder_unshuffle", x.device, backend or "", _implemented(x.device)) == "cpp"
            and _cpp_runs(x.dtype, mask_token.dtype, decoder_pos_embed.dtype)):
        L = _check_forward(x, ids_restore, mask_token, decoder_pos_embed)
        if check_indices:
            _check_permutation(ids_restore)
        return _EagerCppUnshuffle.apply(x, ids_restore, mask_token, decoder_pos_embed, L)
    return _decoder_unshuffle_op(x, ids_restore, mask_token, decoder_pos_embed, check_indices, backend or "")


__all__ = ["decoder_unshuffle"]
