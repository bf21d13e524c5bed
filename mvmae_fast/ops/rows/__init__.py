"""``gather_rows`` / ``scatter_rows``: move token rows by index, e.g. MAE's kept tokens.

``gather_rows(x, ids)[b, k] = x[b, ids[b, k]]`` for x (B, L, D) and ids (B, K);
``scatter_rows(y, ids, L)`` is its adjoint: row ``ids[b, k]`` of the (B, L, D) output is ``y[b, k]``
and every other row is zero. Each is the other's backward. Indices must be unique within a sample
(a subset of the rows, as a mask produces), which lets the scatter write without atomics.
"""

import torch

from ... import _ext, backends
from ..._utils import (check_index_values, check_int, check_tensor, cuda_stream, device_guard, direct_backward,
                       direct_kernel_calls, eager_function, new_output)
from . import reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_ids(ids, src_name, src, num_rows):
    check_tensor("ids", ids, 2, _INDEX_DTYPES, "(B, K)")
    if ids.device != src.device:
        raise ValueError(f"ids is on {ids.device} but {src_name} is on {src.device}")
    if src.shape[0] == 0:
        raise ValueError(f"{src_name} has an empty batch (shape {tuple(src.shape)})")
    if ids.shape[0] != src.shape[0]:
        raise ValueError(f"ids has batch size {ids.shape[0]} but {src_name} has {src.shape[0]}")
    if ids.shape[1] == 0:
        raise ValueError("ids must hold at least one index per sample, got shape (B, 0)")
    if ids.shape[1] > num_rows:
        raise ValueError(f"ids has {ids.shape[1]} indices per sample, more than the {num_rows} rows")


def _check_gather(x, ids):
    check_tensor("x", x, 3, _DTYPES, "(B, L, D)")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)}")
    _check_ids(ids, "x", x, x.shape[1])


def _check_scatter(y, ids, num_rows):
    check_tensor("y", y, 3, _DTYPES, "(B, K, D)")
    check_int("num_rows", num_rows, minimum=1)
    if y.shape[2] == 0:
        raise ValueError(f"y has an empty dimension: shape {tuple(y.shape)}")
    _check_ids(ids, "y", y, num_rows)
    if ids.shape[1] != y.shape[1]:
        raise ValueError(f"ids has {ids.shape[1]} indices per sample but y has {y.shape[1]} rows")


def _cpp_call(kernel, src, ids, out, num_rows):
    B, K = ids.shape
    args = (src.data_ptr(), ids.data_ptr(), ids.element_size(), out.data_ptr(), B, num_rows, K,
            src.shape[2] * src.element_size())
    if src.is_cuda:
        with device_guard(src.device):
            getattr(_ext._C, kernel + "_cuda")(*args, cuda_stream(src.device))
    else:
        getattr(_ext._C, kernel + "_cpu")(*args, torch.get_num_threads())


def _gather_cpp(x, ids, num_rows):
    x, ids = x.contiguous(), ids.contiguous()
    out = new_output((x.shape[0], ids.shape[1], x.shape[2]), x.dtype, x.device)
    _cpp_call("gather_rows", x, ids, out, num_rows)
    return out


def _scatter_cpp(y, ids, num_rows):
    y, ids = y.contiguous(), ids.contiguous()
    out = new_output((y.shape[0], num_rows, y.shape[2]), y.dtype, y.device)
    _cpp_call("scatter_rows", y, ids, out, num_rows)
    return out


@torch.library.custom_op("mvmae_fast::gather_rows", mutates_args=())
def _gather_rows_op(x: torch.Tensor, ids: torch.Tensor, check_indices: bool, backend: str) -> torch.Tensor:
    _check_gather(x, ids)
    L = x.shape[1]
    if check_indices:
        check_index_values("ids", ids, L)
    name = backends.select_backend("gather_rows", x.device, backend)
    if name == "torch":
        return reference.gather_rows(x, ids)
    if name == "cpp":
        return _gather_cpp(x, ids, L)
    x, ids = x.contiguous(), ids.contiguous()
    out = new_output((x.shape[0], ids.shape[1], x.shape[2]), x.dtype, x.device)
    from . import triton_impl

    with device_guard(x.device):
        triton_impl.gather_rows(x, ids, out)
    return out


@_gather_rows_op.register_fake
def _(x, ids, check_indices, backend):
    _check_gather(x, ids)
    return x.new_empty(x.shape[0], ids.shape[1], x.shape[2])


@torch.library.custom_op("mvmae_fast::scatter_rows", mutates_args=())
def _scatter_rows_op(y: torch.Tensor, ids: torch.Tensor, num_rows: int, check_indices: bool,
                     backend: str) -> torch.Tensor:
    _check_scatter(y, ids, num_rows)
    if check_indices:
        check_index_values("ids", ids, num_rows)
    name = backends.select_backend("scatter_rows", y.device, backend)
    if name == "torch":
        return reference.scatter_rows(y, ids, num_rows)
    if name == "cpp":
        return _scatter_cpp(y, ids, num_rows)
    y, ids = y.contiguous(), ids.contiguous()
    out = new_output((y.shape[0], num_rows, y.shape[2]), y.dtype, y.device)
    from . import triton_impl

    with device_guard(y.device):
        triton_impl.scatter_rows(y, ids, out)
    return out


@_scatter_rows_op.register_fake
def _(y, ids, num_rows, check_indices, backend):
    _check_scatter(y, ids, num_rows)
    return y.new_empty(y.shape[0], num_rows, y.shape[2])


# Backward passes reuse the indices the forward pass already checked. Each op's backward is its
# partner; a node made by the eager Functions below calls the partner's kernel directly
# (_utils.direct_backward), any other (or a differentiated backward) runs the partner custom op.
def _gather_setup(ctx, inputs, output):
    x, ids, _, backend = inputs
    ctx.save_for_backward(ids)
    ctx.num_rows = x.shape[1]
    ctx.backend = backend


def _gather_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    if direct_backward(ctx):
        return _scatter_cpp(grad, ids, ctx.num_rows), None, None, None
    return _scatter_rows_op(grad, ids, ctx.num_rows, False, ctx.backend), None, None, None


def _scatter_setup(ctx, inputs, output):
    _, ids, _, _, backend = inputs
    ctx.save_for_backward(ids)
    ctx.backend = backend


def _scatter_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    if direct_backward(ctx):
        return _gather_cpp(grad, ids, grad.shape[1]), None, None, None, None
    return _gather_rows_op(grad, ids, False, ctx.backend), None, None, None, None


_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_rows_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# Eager CPU calls run the cpp kernels from these autograd Functions (the custom ops' checks, kernels,
# context and backward) instead of through the custom ops' Python dispatch (~70 us a call, ~200 us
# with its backward); torch.compile and the other tracers get the custom ops
# (_utils.direct_kernel_calls).
def _eager_cpp(op, device, backend, *tensors):
    return (device.type == "cpu" and direct_kernel_calls(*tensors)
            and backends.select_backend(op, device, backend) == "cpp")


_EagerGatherRows = eager_function("_EagerGatherRows", lambda x, ids: _gather_cpp(x, ids, x.shape[1]),
                                  _gather_setup, _gather_backward, "cpp")
_EagerScatterRows = eager_function("_EagerScatterRows", _scatter_cpp, _scatter_setup, _scatter_backward, "cpp")


def gather_rows(x, ids, *, check_indices=True, backend=None):
    """Rows ``ids[b, k]`` of ``x[b]``: (B, L, D), (B, K) -> (B, K, D). Differentiable in ``x``.

    ``check_indices=False`` skips the range and uniqueness check of ``ids`` (a device sync on
    CUDA); pass it only for indices you made yourself, e.g. from :func:`random_masking`.
    """
    if (isinstance(x, torch.Tensor) and isinstance(ids, torch.Tensor)
            and _eager_cpp("gather_rows", x.device, backend or "", x, ids)):
        _check_gather(x, ids)
        if check_indices:
            check_index_values("ids", ids, x.shape[1])
        return _EagerGatherRows.apply(x, ids)
    return _gather_rows_op(x, ids, check_indices, backend or "")


def scatter_rows(y, ids, num_rows, *, check_indices=True, backend=None):
    """Row ``ids[b, k]`` of a (B, num_rows, D) zero tensor set to ``y[b, k]``. Differentiable in ``y``."""
    check_int("num_rows", num_rows, minimum=1)
    if (isinstance(y, torch.Tensor) and isinstance(ids, torch.Tensor)
            and _eager_cpp("scatter_rows", y.device, backend or "", y, ids)):
        _check_scatter(y, ids, num_rows)
        if check_indices:
            check_index_values("ids", ids, num_rows)
        return _EagerScatterRows.apply(y, ids, num_rows)
    return _scatter_rows_op(y, ids, num_rows, check_indices, backend or "")
