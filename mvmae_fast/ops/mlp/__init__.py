"""``mlp``: the transformer MLP ``fc2(gelu(fc1(x)))`` with the exact (erf) GELU, fused on the CPU.

x (..., D), fc1's weight (Hd, D) and bias (Hd), fc2's weight (D, Hd) and bias (D) -> (..., D).

Backends: ``torch`` is two ``F.linear`` calls around ``F.gelu`` (the reference, plain autograd);
``cpp`` is the extension's float32 CPU kernel (csrc/cpu/mlp.cpp): each thread works through its rows
in chunks whose hidden activations stay in its L2 cache, so the (..., Hd) hidden tensor goes through
memory once at most (unfused it does five or six times per step): in eager mode fc1's output is
written once for the backward, which reads it back per chunk; through the custom ops (torch.compile)
nothing of the hidden layer is kept and the backward recomputes fc1 (the same bits, a fifth more
GEMM work, M x Hd floats less memory). The weight gradients accumulate per thread. It is reached
through the custom ops ``mvmae_fast::mlp`` (x2d, w1, b1, w2, b2) -> out and
``mvmae_fast::mlp_backward`` (grad_out, x2d, w1, b1, w2) -> (dx, dw1, db1, dw2, db2), so
``torch.compile`` traces through them. :func:`prenorm_mlp` and :func:`prenorm_linear` are the
pre-norm block's pieces built on the same kernel.

Automatic choice: ``cpp`` for float32 CPU tensors outside CPU autocast when the backward's scratch
stays under :data:`MAX_CPP_WORKSPACE_BYTES`; under CPU bfloat16 autocast, :func:`prenorm_mlp` and
:func:`prenorm_linear` run the autocast layers (autocast.py: autocast's own bfloat16 GEMMs on the
CPU's AMX / AVX512-BF16 units, which no float32 kernel matches, with the elementwise work in the
extension) and :func:`mlp` runs torch; under CUDA autocast, with ``MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1``,
they run the same layers with Triton elementwise kernels (autocast_triton.py); ``torch`` otherwise
(and on CUDA by default, where cuBLAS and inductor's fusions serve). A forced ``cpp`` backend runs
the float32 kernel whenever it can (float32 CPU tensors, autocast or not) and raises
:class:`~mvmae_fast.UnsupportedBackendError` saying why when it cannot. In eager mode the kernels
are called from autograd Functions rather than through the custom ops (same kernels, without the
custom ops' Python dispatch); :func:`fused_attention_half` is the block's first half as one such
node.
"""

import torch

from ... import _ext, backends
from ..._utils import check_int, check_same_device, check_tensor, direct_kernel_calls, new_output
from ..attention import MAX_CPP_SEQ_LEN, MAX_KERNEL_HEAD_DIM
from ..attention import _cpp_backward as _attention_backward
from ..attention import _cpp_forward as _attention_forward
from . import autocast, reference

IMPLEMENTED = ("torch", "cpp")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The backward keeps, per thread, fp32 accumulators for the weight gradients plus the chunk's buffers
# (reused across calls; see workspace_bytes); above this the automatic choice takes torch.
MAX_CPP_WORKSPACE_BYTES = 256 << 20


def _check(x, w1, b1, w2, b2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., D)")
    check_tensor("w1", w1, 2, _DTYPES, "(Hd, D)")
    hidden, dim = w1.shape
    check_tensor("b1", b1, 1, _DTYPES, "(Hd,)")
    check_tensor("w2", w2, 2, _DTYPES, "(D, Hd)")
    check_tensor("b2", b2, 1, _DTYPES, "(D,)")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if hidden == 0 or dim == 0:
        raise ValueError(f"w1 has an empty dimension (shape {tuple(w1.shape)})")
    if x.shape[-1] != dim:
        raise ValueError(f"x's last dimension must be D = {dim} (w1 has shape {tuple(w1.shape)}), "
                         f"got shape {tuple(x.shape)}")
    for name, t, want in (("b1", b1, (hidden,)), ("w2", w2, (dim, hidden)), ("b2", b2, (dim,))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} to match w1 of shape {tuple(w1.shape)}, "
                             f"got {tuple(t.shape)}")
    check_same_device("x", x, w1=w1, b1=b1, w2=w2, b2=b2)


def _kernel_refusals(x, *others):
    """Why the cpp kernel cannot take these tensors at all (empty when it can)."""
    if x.device.type == "cpu" and all(t.dtype == torch.float32 for t in (x, *others)):
        return []  # the common case, without building messages
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"the cpp MLP kernel is CPU-only, got {x.device} tensors")
    dtypes = {str(t.dtype).replace("torch.", "") for t in (x, *others)}
    if dtypes != {"float32"}:
        reasons.append(f"the kernel takes float32 only, got {', '.join(sorted(dtypes))}")
    return reasons


_CHUNK = 96  # csrc/cpu/mlp.cpp's kChunk


def _scratch_shape(dim, hidden, threads, rows):
    """(hp, dp, slots): the widths padded to AVX-512's 32-wide panels (the widest variant's) and the
    number of per-thread slots, as csrc/cpu/mlp.cpp lays out its scratch."""
    return -(-hidden // 32) * 32, -(-dim // 32) * 32, max(1, min(threads, -(-rows // _CHUNK)))


def workspace_bytes(dim, hidden, threads, rows):
    """An upper bound on the scratch the cpp MLP backward keeps (mlp_backward_cpu: three packed weights,
    the padded bias, then backward_scratch per slot); plain arithmetic, so ``torch.compile`` folds it."""
    hp, dp, slots = _scratch_shape(dim, hidden, threads, rows)
    per_slot = 2 * _CHUNK * hp + 2 * _CHUNK * dp + hidden * dp + dim * hp + 2 * (hp + 3 * dp)
    return 4 * (3 * hp * dp + hp + slots * per_slot)


@torch.compiler.assume_constant_result
def _threads():
    """torch's thread count; a constant to torch.compile (which cannot trace the call itself)."""
    return torch.get_num_threads()


def _automatic_refusals(scratch_bytes):
    """Why the automatic choice passes over a cpp kernel that could run (a forced cpp still runs)."""
    if torch.is_autocast_enabled("cpu"):
        return ["CPU autocast is on (its bfloat16 linears are faster than the float32 kernel)"]
    if scratch_bytes > MAX_CPP_WORKSPACE_BYTES:
        return [f"its backward would keep {scratch_bytes / 2**20:.0f} MiB of scratch"]
    return []


def _choose(backend, tensors, scratch):
    """'cpp' or 'torch' for one call of the op on ``tensors`` (x first): a forced cpp that cannot run
    them raises; the automatic choice takes cpp when the kernel can run them and should (see the
    module docstring). ``scratch(threads)``: the backward's scratch bytes at that thread count."""
    x = tensors[0]
    name = backends.select_backend("mlp", x.device, backend or "", IMPLEMENTED)
    if name != "cpp":
        return name
    if backend or backends.requested_backend()[0] is not None:
        _raise_if_refused(*tensors)
        return name
    if _kernel_refusals(*tensors) or _automatic_refusals(scratch(_threads())):
        return "torch"
    return name


def _autocast_layers(backend, tensors):
    """Whether this call runs the autocast layers (autocast.py): the automatic choice under CPU
    bfloat16 autocast, for float32 CPU tensors in eager mode (a forced backend runs as forced)."""
    return not backend and backends.requested_backend()[0] is None and autocast.supported(*tensors)


def _raise_if_refused(x, *others):
    reasons = _kernel_refusals(x, *others)
    if reasons:
        raise backends.UnsupportedBackendError(
            f"mlp: backend 'cpp' cannot run x of shape {tuple(x.shape)}: {'; '.join(reasons)}. Use backend='torch'.")


def _check_2d(x, w1, b1, w2, b2, op="mlp"):
    """The forward op's inputs: _check's, with x as (M, D), and what the kernel takes."""
    _check(x, w1, b1, w2, b2)
    if x.dim() != 2:
        raise ValueError(f"mvmae_fast::{op} takes x as (M, D), got shape {tuple(x.shape)}")
    _raise_if_refused(x, w1, b1, w2, b2)


def _check_backward(grad_out, x, w1, b1, w2, op="mlp_backward"):
    check_tensor("w1", w1, 2, _DTYPES, "(Hd, D)")
    check_tensor("w2", w2, 2, _DTYPES, "(D, Hd)")
    hidden, dim = w1.shape
    check_tensor("x", x, 2, _DTYPES, "(M, D)")
    rows = x.shape[0]
    for name, t, want in (("grad_out", grad_out, (rows, dim)), ("x", x, (rows, dim)), ("b1", b1, (hidden,)),
                          ("w2", w2, (dim, hidden))):
        check_tensor(name, t, len(want), _DTYPES, str(want))
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want} (x {tuple(x.shape)}, w1 "
                             f"{tuple(w1.shape)}), got {tuple(t.shape)}")
    check_same_device("x", x, grad_out=grad_out, w1=w1, b1=b1, w2=w2)
    _raise_if_refused(x, grad_out, w1, b1, w2)


def _contiguous(*tensors):
    """Each tensor contiguous; None (an optional argument left out) stays None."""
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("mvmae_fast::mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    _check_2d(x, w1, b1, w2, b2)
    return _mlp_forward(x, w1, b1, w2, b2)


def _new_hidden(x, w1, keep):
    """fc1's output (M, Hd) for the forward kernel to write and the backward to read, or None (the
    backward recomputes it; the custom ops do, so their schemas carry no extra tensor)."""
    return new_output((x.shape[0], w1.shape[0]), x.dtype, x.device) if keep else None


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _mlp_forward(x, w1, b1, w2, b2, keep_hidden=False):
    """The kernel call behind mvmae_fast::mlp (and the eager path): arguments already checked. Returns
    out, or (out, fc1's output) with keep_hidden."""
    x, w1, b1, w2, b2 = _contiguous(x, w1, b1, w2, b2)
    rows, dim = x.shape
    out = new_output((rows, dim), x.dtype, x.device)
    hidden = _new_hidden(x, w1, keep_hidden)
    _ext._C.mlp_forward_cpu(x.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(), 0, 0, 0.0, False,
                            out.data_ptr(), 0, 0, _ptr(hidden), rows, dim, w1.shape[0], torch.get_num_threads())
    return (out, hidden) if keep_hidden else out


@_mlp_op.register_fake
def _(x, w1, b1, w2, b2):
    _check(x, w1, b1, w2, b2)
    return x.new_empty(x.shape[0], x.shape[1])


def _vector_grads(x, dim, hidden):
    """Empty (dx, dw1, db1, dw2, db2) for the backward kernels to fill."""
    return [new_output(shape, x.dtype, x.device)
            for shape in ((x.shape[0], dim), (hidden, dim), (hidden,), (dim, hidden), (dim,))]


@torch.library.custom_op("mvmae_fast::mlp_backward", mutates_args=())
def _mlp_backward_op(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                     w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backward(grad_out, x, w1, b1, w2)
    return _mlp_backward(grad_out, x, w1, b1, w2)


def _mlp_backward(grad_out, x, w1, b1, w2, fc1_out=None):
    """fc1_out: the forward's (keep_hidden) fc1 output, or None to recompute it (same bits)."""
    grad_out, x, w1, b1, w2 = _contiguous(grad_out, x, w1, b1, w2)
    rows, dim = x.shape
    hidden = w1.shape[0]
    dx, dw1, db1, dw2, db2 = _vector_grads(x, dim, hidden)
    _ext._C.mlp_backward_cpu(grad_out.data_ptr(), x.data_ptr(), 0, 0, 0, 0, False, w1.data_ptr(), b1.data_ptr(),
                             w2.data_ptr(), dx.data_ptr(), dw1.data_ptr(), db1.data_ptr(), dw2.data_ptr(), db2.data_ptr(),
                             0, 0, _ptr(fc1_out), rows, dim, hidden, torch.get_num_threads())
    return dx, dw1, db1, dw2, db2


@_mlp_backward_op.register_fake
def _(grad_out, x, w1, b1, w2):
    _check_backward(grad_out, x, w1, b1, w2)
    hidden, dim = w1.shape
    return (x.new_empty(x.shape), x.new_empty(hidden, dim), x.new_empty(hidden), x.new_empty(dim, hidden),
            x.new_empty(dim))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, w1, b1, w2)


def _backward(ctx, grad_out):
    return _mlp_backward_op(grad_out, *ctx.saved_tensors)


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def mlp(x, w1, b1, w2, b2, *, backend=None):
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)``: x (..., D) -> (..., D), differentiable in
    every input. ``backend``: ``"torch"`` or ``"cpp"`` (CPU, float32); default: cpp when it can take
    the inputs, torch otherwise (see the module docstring and :mod:`mvmae_fast.backends`)."""
    _check(x, w1, b1, w2, b2)
    rows = x.numel() // x.shape[-1]
    name = _choose(backend, (x, w1, b1, w2, b2), lambda threads: workspace_bytes(*w1.shape[::-1], threads, rows))
    if name == "torch":
        return reference.mlp(x, w1, b1, w2, b2)
    x2d = x.reshape(-1, x.shape[-1])
    if direct_kernel_calls(x, w1, b1, w2, b2):
        return _EagerMlp.apply(x2d, w1, b1, w2, b2).view(x.shape)
    return _mlp_op(x2d, w1, b1, w2, b2).view(x.shape)


# Eager mode calls the kernels from these autograd Functions (same kernels, same checks done by the
# public functions) instead of through the custom ops, whose Python dispatch costs ~50-100 us per call
# (~3 ms per training step of the micro preset); torch.compile, export, functorch transforms, fake
# tensors and dispatch modes get the custom ops (see _utils.direct_kernel_calls).
# The eager MLP nodes keep fc1's output (M x Hd floats) for the backward instead of recomputing it
# there: a fifth of the backward's GEMM work (7% of a tiny-preset training step) for a copy.
class _EagerMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        out, fc1_out = _mlp_forward(x, w1, b1, w2, b2, keep_hidden=True)
        ctx.save_for_backward(x, w1, b1, w2, fc1_out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _mlp_backward(grad_out, *ctx.saved_tensors)


class _EagerPrenormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        out, mean, rstd, fc1_out = _prenorm_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, keep_hidden=True)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, fc1_out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dx, dnw, dnb, dw1, db1, dw2, db2 = _prenorm_backward_kernel(grad_out, *ctx.saved_tensors)
        return dx, dnw, dnb, None, dw1, db1, dw2, db2


class _EagerPrenormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w, b):
        out, mean, rstd = _linear_forward(x, norm_weight, norm_bias, eps, w, b)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dx, dnw, dnb, dw, db = _linear_backward_kernel(grad_out, *ctx.saved_tensors)
        return dx, dnw, dnb, None, dw, db


# --------------------------------------------------------------------------- #
# prenorm_mlp: the pre-norm block's second half, x + mlp(layer_norm(x))
# --------------------------------------------------------------------------- #
def _check_norm(x, norm_weight, norm_bias, eps):
    dim = x.shape[-1]
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_tensor(name, t, 1, _DTYPES, "(D,)")
        if t.shape[0] != dim:
            raise ValueError(f"{name} must have shape ({dim},) to match x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
    check_same_device("x", x, norm_weight=norm_weight, norm_bias=norm_bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


@torch.library.custom_op("mvmae_fast::prenorm_mlp", mutates_args=())
def _prenorm_op(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, w1: torch.Tensor,
                b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_2d(x, w1, b1, w2, b2, op="prenorm_mlp")
    _check_norm(x, norm_weight, norm_bias, eps)
    _raise_if_refused(x, norm_weight, norm_bias)
    return _prenorm_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)


def _prenorm_forward(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, keep_hidden=False):
    """(out, mean, rstd), and fc1's output with keep_hidden."""
    x, norm_weight, norm_bias, w1, b1, w2, b2 = _contiguous(x, norm_weight, norm_bias, w1, b1, w2, b2)
    rows, dim = x.shape
    out = new_output((rows, dim), x.dtype, x.device)
    mean = new_output((rows,), x.dtype, x.device)
    rstd = new_output((rows,), x.dtype, x.device)
    hidden = _new_hidden(x, w1, keep_hidden)
    _ext._C.mlp_forward_cpu(x.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
                            norm_weight.data_ptr(), norm_bias.data_ptr(), float(eps), True, out.data_ptr(),
                            mean.data_ptr(), rstd.data_ptr(), _ptr(hidden), rows, dim, w1.shape[0],
                            torch.get_num_threads())
    return (out, mean, rstd, hidden) if keep_hidden else (out, mean, rstd)


@_prenorm_op.register_fake
def _(x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
    _check(x, w1, b1, w2, b2)
    _check_norm(x, norm_weight, norm_bias, eps)
    rows = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(rows), x.new_empty(rows)


@torch.library.custom_op("mvmae_fast::prenorm_mlp_backward", mutates_args=())
def _prenorm_backward_op(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                         w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_prenorm_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2)
    return _prenorm_backward_kernel(grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2)


def _prenorm_backward_kernel(grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, fc1_out=None):
    grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2 = _contiguous(
        grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2)
    rows, dim = x.shape
    hidden = w1.shape[0]
    dx, dw1, db1, dw2, db2 = _vector_grads(x, dim, hidden)
    dnw, dnb = new_output((dim,), x.dtype, x.device), new_output((dim,), x.dtype, x.device)
    _ext._C.mlp_backward_cpu(grad_out.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                             norm_weight.data_ptr(), norm_bias.data_ptr(), True, w1.data_ptr(), b1.data_ptr(),
                             w2.data_ptr(), dx.data_ptr(), dw1.data_ptr(), db1.data_ptr(), dw2.data_ptr(), db2.data_ptr(),
                             dnw.data_ptr(), dnb.data_ptr(), _ptr(fc1_out), rows, dim, hidden, torch.get_num_threads())
    return dx, dnw, dnb, dw1, db1, dw2, db2


def _check_prenorm_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2):
    _check_backward(grad_out, x, w1, b1, w2, op="prenorm_mlp_backward")
    _check_norm(x, norm_weight, norm_bias, 0.0)
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_tensor(name, t, 1, _DTYPES, "(M,)")
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"prenorm_mlp_backward: {name} must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    _raise_if_refused(x, mean, rstd, norm_weight, norm_bias)


@_prenorm_backward_op.register_fake
def _(grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2):
    _check_prenorm_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2)
    hidden, dim = w1.shape
    return (x.new_empty(x.shape), x.new_empty(dim), x.new_empty(dim), x.new_empty(hidden, dim), x.new_empty(hidden),
            x.new_empty(dim, hidden), x.new_empty(dim))


def _prenorm_setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, eps, w1, b1, w2, b2 = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, b1, w2)


def _prenorm_backward(ctx, grad_out, grad_mean, grad_rstd):
    if grad_out is None:
        return (None,) * 8
    dx, dnw, dnb, dw1, db1, dw2, db2 = _prenorm_backward_op(grad_out, *ctx.saved_tensors)
    return dx, dnw, dnb, None, dw1, db1, dw2, db2


_prenorm_op.register_autograd(_prenorm_backward, setup_context=_prenorm_setup_context)


def prenorm_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, *, backend=None):
    """``x + mlp(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), w1, b1, w2, b2)``: the second half
    of a pre-norm transformer block, x (..., D) -> (..., D), differentiable in every tensor. The cpp
    backend normalises each chunk of rows in cache, keeps only the rows' mean and 1/std for the
    backward (not the normalised tensor), adds the residual in fc2's epilogue and returns dx with the
    residual's gradient already added. Backends and their choice as :func:`mlp`'s."""
    _check(x, w1, b1, w2, b2)
    _check_norm(x, norm_weight, norm_bias, eps)
    if _autocast_layers(backend, (x, norm_weight, norm_bias, w1, b1, w2, b2)):
        return autocast.prenorm_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)
    rows = x.numel() // x.shape[-1]
    name = _choose(backend, (x, norm_weight, norm_bias, w1, b1, w2, b2),
                   lambda threads: workspace_bytes(*w1.shape[::-1], threads, rows))
    if name == "torch":
        return x + reference.mlp(torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps),
                                 w1, b1, w2, b2)
    args = (x.reshape(-1, x.shape[-1]), norm_weight, norm_bias, eps, w1, b1, w2, b2)
    if direct_kernel_calls(x, norm_weight, norm_bias, w1, b1, w2, b2):
        return _EagerPrenormMlp.apply(*args).view(x.shape)
    return _prenorm_op(*args)[0].view(x.shape)


# --------------------------------------------------------------------------- #
# prenorm_linear: LayerNorm then one Linear (a pre-norm block's qkv projection)
# --------------------------------------------------------------------------- #
def _check_linear(x, w, b, w_name="w", b_name="b"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., D)")
    check_tensor(w_name, w, 2, _DTYPES, "(out_features, D)")
    check_tensor(b_name, b, 1, _DTYPES, "(out_features,)")
    if w.numel() == 0:
        raise ValueError(f"{w_name} has an empty dimension (shape {tuple(w.shape)})")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x's last dimension must be D = {w.shape[1]} ({w_name} has shape {tuple(w.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{b_name} must have shape ({w.shape[0]},) to match {w_name} of shape {tuple(w.shape)}, "
                         f"got {tuple(b.shape)}")
    check_same_device("x", x, **{w_name: w, b_name: b})


def linear_workspace_bytes(dim, out_dim, threads, rows):
    """An upper bound on the scratch prenorm_linear's cpp backward keeps (as :func:`workspace_bytes`)."""
    hp, dp, slots = _scratch_shape(dim, out_dim, threads, rows)
    return 4 * (hp * dp + slots * (2 * _CHUNK * dp + out_dim * dp + 2 * (hp + 2 * dp)))


@torch.library.custom_op("mvmae_fast::prenorm_linear", mutates_args=())
def _prenorm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                       w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_linear(x, w, b)
    if x.dim() != 2:
        raise ValueError(f"mvmae_fast::prenorm_linear takes x as (M, D), got shape {tuple(x.shape)}")
    _check_norm(x, norm_weight, norm_bias, eps)
    _raise_if_refused(x, norm_weight, norm_bias, w, b)
    return _linear_forward(x, norm_weight, norm_bias, eps, w, b)


def _linear_forward(x, norm_weight, norm_bias, eps, w, b, addend=None):
    """(out, mean, rstd): out = LN(x) w^T + b (+ addend); norm_weight None: no LayerNorm (mean and
    rstd None). Validated tensors: float32, CPU, x (M, D), w (out, D), b (out,), addend (M, out)."""
    x, norm_weight, norm_bias, w, b, addend = _contiguous(x, norm_weight, norm_bias, w, b, addend)
    rows, dim = x.shape
    out_dim = w.shape[0]
    out = new_output((rows, out_dim), x.dtype, x.device)
    mean = rstd = None
    if norm_weight is not None:
        mean = new_output((rows,), x.dtype, x.device)
        rstd = new_output((rows,), x.dtype, x.device)
    _ext._C.norm_linear_forward_cpu(x.data_ptr(), _ptr(norm_weight), _ptr(norm_bias), float(eps), w.data_ptr(),
                                    b.data_ptr(), _ptr(addend), out.data_ptr(), _ptr(mean), _ptr(rstd), rows, dim,
                                    out_dim, torch.get_num_threads())
    return out, mean, rstd


@_prenorm_linear_op.register_fake
def _(x, norm_weight, norm_bias, eps, w, b):
    _check_linear(x, w, b)
    _check_norm(x, norm_weight, norm_bias, eps)
    rows = x.shape[0]
    return x.new_empty(rows, w.shape[0]), x.new_empty(rows), x.new_empty(rows)


def _check_prenorm_linear_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, w):
    _check_linear(x, w, w.new_empty(w.shape[0]))
    check_tensor("x", x, 2, _DTYPES, "(M, D)")
    rows = x.shape[0]
    check_tensor("grad_out", grad_out, 2, _DTYPES, "(M, out_features)")
    if tuple(grad_out.shape) != (rows, w.shape[0]):
        raise ValueError(f"prenorm_linear_backward: grad_out must have shape {(rows, w.shape[0])}, "
                         f"got {tuple(grad_out.shape)}")
    _check_norm(x, norm_weight, norm_bias, 0.0)
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_tensor(name, t, 1, _DTYPES, "(M,)")
        if t.shape[0] != rows:
            raise ValueError(f"prenorm_linear_backward: {name} must have shape ({rows},), got {tuple(t.shape)}")
    check_same_device("x", x, grad_out=grad_out, mean=mean, rstd=rstd)
    _raise_if_refused(x, grad_out, mean, rstd, norm_weight, norm_bias, w)


@torch.library.custom_op("mvmae_fast::prenorm_linear_backward", mutates_args=())
def _prenorm_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                norm_weight: torch.Tensor, norm_bias: torch.Tensor, w: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_prenorm_linear_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, w)
    return _linear_backward_kernel(grad_out, x, mean, rstd, norm_weight, norm_bias, w)


def _linear_backward_kernel(grad_out, x, mean, rstd, norm_weight, norm_bias, w, addend=None):
    """(dx, dnorm_weight, dnorm_bias, dw, db) of _linear_forward; dx has addend (M, D) added (a
    residual's gradient); without a norm (norm_weight None) the dnorm outputs are None."""
    grad_out, x, mean, rstd, norm_weight, norm_bias, w, addend = _contiguous(grad_out, x, mean, rstd, norm_weight,
                                                                             norm_bias, w, addend)
    rows, dim = x.shape
    out_dim = w.shape[0]
    dx, dw, db = [new_output(shape, x.dtype, x.device) for shape in ((rows, dim), (out_dim, dim), (out_dim,))]
    dnw = dnb = None
    if norm_weight is not None:
        dnw, dnb = new_output((dim,), x.dtype, x.device), new_output((dim,), x.dtype, x.device)
    _ext._C.norm_linear_backward_cpu(grad_out.data_ptr(), x.data_ptr(), _ptr(mean), _ptr(rstd), _ptr(norm_weight),
                                     _ptr(norm_bias), w.data_ptr(), _ptr(addend), dx.data_ptr(), _ptr(dnw), _ptr(dnb),
                                     dw.data_ptr(), db.data_ptr(), rows, dim, out_dim, torch.get_num_threads())
    return dx, dnw, dnb, dw, db


@_prenorm_linear_backward_op.register_fake
def _(grad_out, x, mean, rstd, norm_weight, norm_bias, w):
    _check_prenorm_linear_backward(grad_out, x, mean, rstd, norm_weight, norm_bias, w)
    out_dim, dim = w.shape
    return x.new_empty(x.shape), x.new_empty(dim), x.new_empty(dim), x.new_empty(out_dim, dim), x.new_empty(out_dim)


def _prenorm_linear_setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, eps, w, b = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w)


def _prenorm_linear_backward(ctx, grad_out, grad_mean, grad_rstd):
    if grad_out is None:
        return (None,) * 6
    dx, dnw, dnb, dw, db = _prenorm_linear_backward_op(grad_out, *ctx.saved_tensors)
    return dx, dnw, dnb, None, dw, db


_prenorm_linear_op.register_autograd(_prenorm_linear_backward, setup_context=_prenorm_linear_setup_context)


def prenorm_linear(x, norm_weight, norm_bias, eps, w, b, *, backend=None):
    """``F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), w, b)``: x (..., D) -> (..., out),
    a pre-norm block's qkv projection, differentiable in every tensor. The cpp backend normalises each
    chunk of rows in cache and keeps only the rows' mean and 1/std for the backward (not the
    normalised tensor). Backends and their choice as :func:`mlp`'s."""
    _check_linear(x, w, b)
    _check_norm(x, norm_weight, norm_bias, eps)
    if _autocast_layers(backend, (x, norm_weight, norm_bias, w, b)):
        return autocast.prenorm_linear(x, norm_weight, norm_bias, eps, w, b)
    rows = x.numel() // x.shape[-1]
    name = _choose(backend, (x, norm_weight, norm_bias, w, b),
                   lambda threads: linear_workspace_bytes(*w.shape[::-1], threads, rows))
    if name == "torch":
        return torch.nn.functional.linear(
            torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps), w, b)
    args = (x.reshape(-1, x.shape[-1]), norm_weight, norm_bias, eps, w, b)
    if direct_kernel_calls(x, norm_weight, norm_bias, w, b):
        return _EagerPrenormLinear.apply(*args).view(*x.shape[:-1], w.shape[0])
    return _prenorm_linear_op(*args)[0].view(*x.shape[:-1], w.shape[0])


# --------------------------------------------------------------------------- #
# the pre-norm block's first half, x + proj(attention(prenorm_linear(x))), as one autograd node
# --------------------------------------------------------------------------- #
class _EagerAttentionHalf(torch.autograd.Function):
    """float32, eager, CPU: the fused LayerNorm + qkv kernel, the cpp attention kernels and the
    projection in one node. The projection is the same kernel without its norm: bias and residual
    added in the GEMM's epilogue, and in the backward dA, dW and the bias' column sums in one pass
    over the rows (per-thread sums, as the other layers), and the residual's gradient added to dx
    in the LayerNorm's backward. No separate add, bias-sum or gradient-accumulation passes; one
    autograd node instead of four."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads):
        B, N, D = x.shape
        x2d = x.reshape(B * N, D)
        qkv, mean, rstd = _linear_forward(x2d, norm_weight, norm_bias, eps, w_qkv, b_qkv)
        qkv = qkv.view(B, N, 3 * D)
        attended, lse = _attention_forward(qkv, num_heads, new_output((B, N, D), x.dtype, x.device),
                                           new_output((B, num_heads, N), torch.float32, x.device))
        out, _, _ = _linear_forward(attended.view(B * N, D), None, None, 0.0, w_proj, b_proj, addend=x2d)
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, norm_bias, w_qkv, qkv, attended, lse, w_proj)
        ctx.num_heads = num_heads
        return out.view(B, N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, norm_bias, w_qkv, qkv, attended, lse, w_proj = ctx.saved_tensors
        B, N, D = grad.shape
        grad = grad.reshape(B * N, D)
        d_attended, _, _, dw_proj, db_proj = _linear_backward_kernel(grad, attended.view(B * N, D), None, None, None,
                                                                     None, w_proj)
        dqkv = _attention_backward(d_attended.view(B, N, D), qkv, attended, lse, ctx.num_heads,
                                   new_output(qkv.shape, qkv.dtype, qkv.device))
        dx, dnw, dnb, dw_qkv, db_qkv = _linear_backward_kernel(dqkv.view(B * N, 3 * D), x2d, mean, rstd, norm_weight,
                                                               norm_bias, w_qkv, addend=grad)
        return dx.view(B, N, D), dnw, dnb, None, dw_qkv, db_qkv, dw_proj, db_proj, None


def fused_attention_half(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads):
    """``x + linear(attention(prenorm_linear(x, ...), num_heads), w_proj, b_proj)`` as one autograd
    node when the automatic choice would run every piece on the extension in eager mode: under CPU
    bfloat16 autocast the autocast layers' version (autocast.py), for float32 CPU tensors outside
    autocast the float32 one, under CUDA autocast the autocast layers' Triton version when switched
    on (autocast.CUDA_LAYERS_ENV) and the head dim is at most MAX_KERNEL_HEAD_DIM; None otherwise
    (and under a forced backend), for the caller to run the pieces. x (B, N, D), the weights those of
    nn.LayerNorm(D), nn.Linear(D, 3D) and nn.Linear(D, D)."""
    _check_attention_half(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads)
    tensors = (x, norm_weight, norm_bias, w_qkv, b_qkv, w_proj, b_proj)
    B, N, D = x.shape
    # The attention kernel the node calls directly: Triton on CUDA, the extension's on the CPU.
    attention_fits = (D // num_heads <= MAX_KERNEL_HEAD_DIM if x.device.type == "cuda"
                      else _ext._C is not None and N <= MAX_CPP_SEQ_LEN)
    if backends.requested_backend()[0] is not None or x.numel() == 0 or not attention_fits:
        return None
    if autocast.supported(*tensors):
        return autocast.attention_half(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads)
    if (_kernel_refusals(*tensors) or not direct_kernel_calls(*tensors)
            or _automatic_refusals(linear_workspace_bytes(D, 3 * D, _threads(), B * N))):
        return None
    return _EagerAttentionHalf.apply(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads)


def _check_attention_half(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads):
    """fused_attention_half's arguments, before any pointer reaches a kernel."""
    check_tensor("x", x, 3, _DTYPES, "(B, N, D)")
    dim = x.shape[2]
    _check_linear(x, w_qkv, b_qkv, "w_qkv", "b_qkv")
    if tuple(w_qkv.shape) != (3 * dim, dim):
        raise ValueError(f"w_qkv must have shape {(3 * dim, dim)} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(w_qkv.shape)}")
    _check_linear(x, w_proj, b_proj, "w_proj", "b_proj")
    if tuple(w_proj.shape) != (dim, dim):
        raise ValueError(f"w_proj must have shape {(dim, dim)} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(w_proj.shape)}")
    _check_norm(x, norm_weight, norm_bias, eps)
    check_int("num_heads", num_heads, minimum=1)
    if dim % num_heads:
        raise ValueError(f"x's last dimension ({dim}) must be a multiple of num_heads ({num_heads})")
