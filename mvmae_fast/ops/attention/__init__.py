"""``attention``: non-causal multi-head self-attention straight from the fused qkv projection.

Input ``qkv`` (B, N, 3*H*Dh) laid out as (B, N, 3, H, Dh), the output of ``Linear(D, 3D)``, with any
strides; output (B, N, H*Dh), ready for the output projection. Scale ``Dh ** -0.5``.

Backends: ``torch`` is PyTorch's ``scaled_dot_product_attention`` (the reference, plain autograd);
``triton`` is a FlashAttention-2 style kernel pair for CUDA (see triton_impl.py); ``cpp`` is the
extension's CPU kernel (csrc/cpu/attention.cpp: one (sample, head) per task with the head's N x N
scores in a per-thread buffer, register-blocked micro-GEMMs, no reshape copies of q, k, v or the
gradient; bfloat16 on CPUs with AVX512-BF16 runs its products on ``vdpbf16ps``, rounding the
probabilities and score gradients to bfloat16 for them as autocast's matmuls do (the forward rounds
the unnormalised exp(s - max)) and reading subnormal bfloat16 inputs as zero, as oneDNN's bfloat16
GEMMs do; ``_C.attention_bf16_dot(head_dim)`` says whether it does, ``MVMAE_FAST_CPU_ISA=avx512``
turns it off). Both are reached through the custom
ops ``mvmae_fast::attention`` (qkv, num_heads, backend) -> (out, lse) and
``mvmae_fast::attention_backward`` (grad_out, qkv, out, lse, num_heads, backend) -> dqkv, so
``torch.compile`` traces through them. The kernels take float16, bfloat16 and float32 (accumulating
in float32); triton takes head dims up to 128, cpp sequences up to 2048 tokens.
Automatic dispatch uses torch for inputs outside that (float64, larger heads, longer sequences); a
forced kernel backend raises :class:`~mvmae_fast.UnsupportedBackendError` instead.
"""

import torch

from ... import _ext, backends
from ..._utils import CPP_DTYPE_CODES, check_int, check_tensor, device_guard, direct_kernel_calls, new_output
from . import reference

IMPLEMENTED = ("torch", "cpp", "triton")
KERNEL_BACKENDS = ("cpp", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 128  # triton
MAX_CPP_SEQ_LEN = 2048  # cpp: a head's N x N float32 scores (and three more) per thread


def _implemented(device):
    """Backends this op has on ``device``: the cpp kernel is CPU-only."""
    return IMPLEMENTED if torch.device(device).type == "cpu" else ("torch", "triton")


def _check(qkv, num_heads):
    check_tensor("qkv", qkv, 3, _DTYPES, "(B, N, 3*H*Dh)")
    check_int("num_heads", num_heads, minimum=1)
    if qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"qkv's last dimension ({qkv.shape[2]}) must be a multiple of "
                         f"3 * num_heads ({3 * num_heads})")
    if qkv.numel() == 0:
        raise ValueError(f"qkv has an empty dimension (shape {tuple(qkv.shape)}): "
                         "attention needs B, N and Dh >= 1")


def _kernel_refusals(qkv, num_heads, name):
    """Why kernel backend ``name`` cannot take this qkv (empty when it can)."""
    reasons = []
    if qkv.dtype not in _KERNEL_DTYPES:
        dtype = str(qkv.dtype).replace("torch.", "")
        reasons.append(f"the kernels take float16, bfloat16 and float32, not {dtype}")
    head_dim = qkv.shape[2] // (3 * num_heads)
    if name == "triton" and head_dim > MAX_KERNEL_HEAD_DIM:
        reasons.append(f"head dim {head_dim} (qkv last dim {qkv.shape[2]} / (3 * {num_heads} heads)) is over "
                       f"the kernels' maximum of {MAX_KERNEL_HEAD_DIM}")
    if name == "cpp" and qkv.shape[1] > MAX_CPP_SEQ_LEN:
        reasons.append(f"sequence length {qkv.shape[1]} is over the cpp kernel's maximum of {MAX_CPP_SEQ_LEN}")
    return reasons


def _kernel_backend(qkv, num_heads, backend):
    """The kernel backend (cpp or triton) the custom ops run, or UnsupportedBackendError."""
    name = backends.select_backend("attention", qkv.device, backend, KERNEL_BACKENDS)
    if name not in KERNEL_BACKENDS:
        raise backends.UnsupportedBackendError(
            f"attention: no kernel backend can run on {qkv.device} tensors here "
            f"(kernel backends: {', '.join(KERNEL_BACKENDS)}); use backend='torch'")
    if name == "cpp" and qkv.device.type != "cpu":
        raise backends.UnsupportedBackendError(
            f"attention: the cpp kernel is CPU-only, got {qkv.device} tensors; use 'triton' or 'torch'")
    reasons = _kernel_refusals(qkv, num_heads, name)
    if reasons:
        raise backends.UnsupportedBackendError(f"attention: backend {name!r} cannot run qkv of shape "
                                               f"{tuple(qkv.shape)}: {'; '.join(reasons)}. Use backend='torch'.")
    return name


def _check_backward(grad_out, qkv, out, lse, num_heads):
    _check(qkv, num_heads)
    B, N, C = qkv.shape
    out_shape = (B, N, C // 3)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_tensor(name, t, 3, (qkv.dtype,), "(B, N, H*Dh)")
        if tuple(t.shape) != out_shape:
            raise ValueError(f"{name} must have shape {out_shape} for qkv of shape {tuple(qkv.shape)}, "
                             f"got {tuple(t.shape)}")
    check_tensor("lse", lse, 3, (torch.float32,), "(B, H, N)")
    if tuple(lse.shape) != (B, num_heads, N):
        raise ValueError(f"lse must have shape {(B, num_heads, N)}, got {tuple(lse.shape)}")


def _cpp_qkv(qkv):
    """qkv as the cpp kernel reads it: any batch and row strides, the channel dim packed."""
    return qkv if qkv.stride(2) == 1 else qkv.contiguous()


def _cpp_shape_args(qkv, num_heads):
    """The cpp kernels' trailing arguments: dtype code, sizes, qkv's strides, thread count."""
    B, N, C = qkv.shape
    return (CPP_DTYPE_CODES[qkv.dtype], B, N, num_heads, C // (3 * num_heads), qkv.stride(1), qkv.stride(0),
            torch.get_num_threads())


def _cpp_forward(qkv, num_heads, out, lse):
    qkv = _cpp_qkv(qkv)
    _ext._C.attention_forward_cpu(qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), *_cpp_shape_args(qkv, num_heads))
    return out, lse


def _cpp_backward(grad_out, qkv, out, lse, num_heads, dqkv):
    qkv, grad_out, out = _cpp_qkv(qkv), grad_out.contiguous(), out.contiguous()
    _ext._C.attention_backward_cpu(grad_out.data_ptr(), qkv.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                   dqkv.data_ptr(), *_cpp_shape_args(qkv, num_heads))
    return dqkv


def _kernel_forward(name, qkv, num_heads):
    """(out, lse) from kernel backend ``name`` (checked by the caller)."""
    B, N, C = qkv.shape
    out = new_output((B, N, C // 3), qkv.dtype, qkv.device)
    lse = new_output((B, num_heads, N), torch.float32, qkv.device)
    if name == "cpp":
        return _cpp_forward(qkv, num_heads, out, lse)
    from . import triton_impl

    with device_guard(qkv.device):
        triton_impl.forward(qkv, num_heads, out, lse)
    return out, lse


def _kernel_backward(name, grad_out, qkv, out, lse, num_heads):
    """dqkv from kernel backend ``name`` (checked by the caller)."""
    dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)
    lse = lse.contiguous()
    if name == "cpp":
        return _cpp_backward(grad_out, qkv, out, lse, num_heads, dqkv)
    from . import triton_impl

    with device_guard(qkv.device):
        triton_impl.backward(grad_out, qkv, out, lse, num_heads, dqkv)
    return dqkv


@torch.library.custom_op("mvmae_fast::attention", mutates_args=())
def _attention_op(qkv: torch.Tensor, num_heads: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check(qkv, num_heads)
    return _kernel_forward(_kernel_backend(qkv, num_heads, backend), qkv, num_heads)


@_attention_op.register_fake
def _(qkv, num_heads, backend):
    _check(qkv, num_heads)
    B, N, C = qkv.shape
    return qkv.new_empty(B, N, C // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("mvmae_fast::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           num_heads: int, backend: str) -> torch.Tensor:
    _check_backward(grad_out, qkv, out, lse, num_heads)
    name = _kernel_backend(qkv, num_heads, backend)
    return _kernel_backward(name, grad_out, qkv, out, lse, num_heads)


@_attention_backward_op.register_fake
def _(grad_out, qkv, out, lse, num_heads, backend):
    _check_backward(grad_out, qkv, out, lse, num_heads)
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for it in the backward
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward_op(grad_out, qkv, out, lse, ctx.num_heads, ctx.backend), None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(qkv, num_heads, *, backend=None):
    """softmax(q k^T / sqrt(Dh)) v per head, from the fused (B, N, 3*H*Dh) qkv tensor -> (B, N, H*Dh).

    Differentiable in ``qkv``. ``backend``: ``"torch"``, ``"cpp"`` (CPU) or ``"triton"`` (CUDA)
    (default: the kernel for the device when it supports the input, torch otherwise; see
    :mod:`mvmae_fast.backends`).
    """
    _check(qkv, num_heads)
    name = backends.select_backend("attention", qkv.device, backend or "", _implemented(qkv.device))
    if name in KERNEL_BACKENDS and _kernel_refusals(qkv, num_heads, name):
        if backend or backends.requested_backend()[0] is not None:
            _kernel_backend(qkv, num_heads, name)  # raises, saying why
        name = "torch"
    if name == "torch":
        return reference.attention(qkv, num_heads)
    if direct_kernel_calls(qkv):
        return _EagerKernelAttention.apply(qkv, num_heads, name)  # name: checked above
    return _attention_op(qkv, num_heads, name)[0]


class _EagerKernelAttention(torch.autograd.Function):
    """The kernels (cpp or triton) called from eager mode without the custom ops' Python dispatch
    (~50-100 us per call, twice per layer with the backward: the eager CUDA step is host-bound, see
    the README's GPU numbers); torch.compile and the other tracers get the custom ops (see
    _utils.direct_kernel_calls)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, name):
        out, lse = _kernel_forward(name, qkv, num_heads)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads, ctx.name = num_heads, name
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        return _kernel_backward(ctx.name, grad_out, qkv, out, lse, ctx.num_heads), None, None
