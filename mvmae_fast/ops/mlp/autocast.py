"""The pre-norm block's layers under bfloat16 autocast: autocast's arithmetic, fewer passes.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the reference computes LayerNorm in float32,
casts its output to bfloat16 for the linear, runs the linears in bfloat16 (oneDNN's AMX / AVX512-BF16
GEMMs, which no float32 kernel matches), GELU in bfloat16, and adds the bfloat16 MLP output to the
float32 residual. These functions run the same linears on the same bfloat16 operands and do the rest
in the extension's kernels (csrc/cpu/autocast.cpp). On a CPU with AVX512-BF16 (AMD Zen 4, Intel Cooper
Lake, Sapphire Rapids and later) the linears are the extension's own GEMMs on ``vdpbf16ps``
(``linear_bf16_*``: the weight cast to bfloat16 and packed in one pass, autocast's single rounding of
product + bias, the float32 sums in their own order, so ~1e-4 of the outputs differ from oneDNN's in the
last bit), with the work around them in their epilogues: fc1's bias and GELU (act and gelu' straight from
the accumulators, no ``pre`` tensor), fc2's and the projection's residual add, fc2's input gradient
times gelu' with fc1's bias gradient, and the weight gradients' rounding and float32 cast. Elsewhere
(no AVX512-BF16, ``MVMAE_FAST_CPU_ISA=avx512`` or lower, or AMX, whose oneDNN GEMMs are faster;
``MVMAE_FAST_CPU_BF16_GEMM=onednn|own`` overrides the choice) they are ``torch.addmm`` / ``torch.mm``,
oneDNN's, as autocast's, and separate passes do the rest:

- LayerNorm writes its output in bfloat16 directly (no float32 tensor, no cast pass);
- GELU's forward also writes gelu'(pre) (float16, scaled by 2^14), kept instead of ``pre``: the
  backward is then one multiply, fused with fc1's bias gradient, instead of GELU's exp and erf again;
- the incoming float32 gradient is cast to bfloat16 in the same pass that sums fc2's bias gradient;
- LayerNorm's backward reads the bfloat16 gradient and adds the residual's gradient in its pass;
- the block's first half (LayerNorm, qkv, attention, projection, residual) is one autograd node
  (:func:`attention_half`, used by ``Block``) calling the attention kernels directly, so the
  residual add, its gradient's accumulation and the bias gradients need no passes of their own;
- temporaries that die within a call (fc1's output before GELU, the bfloat16 gradients) live in
  per-thread buffers reused from call to call instead of freshly mapped (page-faulting) memory.

Differences from autocast's numbers: LayerNorm's statistics are summed in another order; the bias
gradients are float32 sums of the float32 products (autocast rounds them to bfloat16); gelu'(pre)
carries float16's rounding (2^-11 relative) before the product's bfloat16 rounding (2^-8). Weight
gradients are bfloat16 GEMM results, as autocast's; the own GEMMs' sums run in another order than
oneDNN's (within one bfloat16 ulp, tests/test_linear_bf16.py).

CUDA: the same Functions run under ``torch.autocast("cuda")`` in bfloat16 or float16 with the
elementwise work in Triton (autocast_triton.py) and the Triton attention, cuBLAS for the GEMMs. They
remove what the eager CUDA step's profile shows around the GEMMs (benchmarks/results/
NVIDIA_H100_80GB_HBM3_profiles.txt): the LayerNorm outputs' float32 -> act casts and their gradients'
casts back, GELU's backward recomputing erf, the bias gradients' separate column sums and the
residual gradients' accumulation adds. They are tested under the Triton interpreter
(tests/test_autocast_triton.py, tests/test_autocast_triton_layers.py; the latter's CUDA cases run on a
GPU), but their speed has not been measured on one yet, so they are opt-in: set ``MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1`` (benchmarks/cuda_step.py compares both).

The forward is autocast's bits on the CPU with oneDNN's GEMMs (tested), and as close as the sums'
order allows with the own ones. Eager only: :func:`supported` is False while
``torch.compile`` traces (inductor fuses the same elementwise work itself) or any other tracer,
transform or dispatch mode is active, and for anything but float32 tensors under their device's
autocast as above. The backward is once-differentiable (double backward raises).
"""

import math
import os
import threading

import torch

from ... import _ext, backends
from ..._utils import POISON_OUTPUTS, direct_kernel_calls, new_output
from ..attention import _cpp_backward as _cpp_attention_backward
from ..attention import _kernel_backward as _attention_kernel_backward
from ..attention import _kernel_forward as _attention_kernel_forward

_ACT_DTYPE = torch.bfloat16  # the CPU kernels'
_CUDA_ACT_DTYPES = (torch.bfloat16, torch.float16)
CUDA_LAYERS_ENV = "MVMAE_FAST_CUDA_AUTOCAST_LAYERS"
BF16_GEMM_ENV = "MVMAE_FAST_CPU_BF16_GEMM"  # onednn | own; unset: own on AVX512-BF16 without AMX


class _Workspace(threading.local):
    """Per-thread buffers for the temporaries that die within one forward or backward call (fc1's
    output before GELU, the bfloat16 gradients): reused from call to call, so they are not freshly
    mapped memory each time (a fresh multi-MB tensor page-faults on its first write: ~0.5 ms per
    decoder-sized tensor here). Each role's buffer only grows."""

    def __init__(self):
        self.buffers = {}

    def get(self, role, shape, dtype):
        numel = math.prod(shape)
        buf = self.buffers.get(role)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor even if made under inference_mode
                buf = self.buffers[role] = torch.empty(numel, dtype=dtype)
        out = buf[:numel].view(shape)
        if POISON_OUTPUTS:  # as _utils.new_output: a kernel that skips an element fails the tests
            out.fill_(float("nan"))
        return out


_workspace = _Workspace()


def supported(*tensors):
    """Whether these tensors (x first) take the autocast path: float32 tensors in eager mode (nothing
    tracing or transforming: _utils.direct_kernel_calls), and either on the CPU under CPU bfloat16
    autocast with the extension built, or on CUDA under CUDA bfloat16 or float16 autocast with Triton
    installed, rows of at most autocast_triton.MAX_DIM values, and the CUDA layers switched on
    (CUDA_LAYERS_ENV=1)."""
    if not direct_kernel_calls(*tensors):  # first: nothing below runs while torch.compile traces
        return False
    device = tensors[0].device
    if device.type == "cpu":
        if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
        if _ext._C is None:
            return False
    elif device.type == "cuda":
        if not cuda_layers_enabled() or not torch.is_autocast_enabled("cuda"):
            return False
        if torch.get_autocast_dtype("cuda") not in _CUDA_ACT_DTYPES or backends.unavailable_reasons("triton", device):
            return False
        if _triton_kernels().check_dim(tensors[0].shape[-1]) is not None:
            return False
    else:
        return False
    return all(t.device == device and t.dtype == torch.float32 for t in tensors)


def _new(shape, dtype=torch.float32):
    """A CPU output a kernel fills (poisoned in the tests, see _utils.new_output)."""
    return new_output(shape, dtype, "cpu")


def cuda_layers_enabled():
    """Whether CUDA_LAYERS_ENV is 1: the CUDA autocast layers are opt-in until measured on a GPU."""
    return os.environ.get(CUDA_LAYERS_ENV, "").strip() == "1"


def _triton_kernels():
    from . import autocast_triton  # imports triton: only when CUDA tensors (or the tests) need it

    return autocast_triton


class _CpuKernels:
    """The extension's kernels (csrc/cpu/autocast.cpp), bfloat16 only, per-thread workspace buffers."""

    act_dtype = torch.bfloat16

    @staticmethod
    def workspace(role, shape, dtype, device):
        return _workspace.get(role, shape, dtype)

    @staticmethod
    def layer_norm(x2d, norm_weight, norm_bias, eps):
        rows, dim = x2d.shape
        h, mean, rstd = _new((rows, dim), _ACT_DTYPE), _new((rows,)), _new((rows,))
        _ext._C.layer_norm_bf16_forward_cpu(x2d.data_ptr(), norm_weight.data_ptr(), norm_bias.data_ptr(), float(eps),
                                            h.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows, dim,
                                            torch.get_num_threads())
        return h, mean, rstd

    @staticmethod
    def layer_norm_backward(dh, x2d, mean, rstd, norm_weight, residual):
        rows, dim = x2d.shape
        dx, dnw, dnb = _new((rows, dim)), _new((dim,)), _new((dim,))
        _ext._C.layer_norm_bf16_backward_cpu(dh.data_ptr(), x2d.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                             norm_weight.data_ptr(), 0 if residual is None else residual.data_ptr(),
                                             dx.data_ptr(), dnw.data_ptr(), dnb.data_ptr(), rows, dim,
                                             torch.get_num_threads())
        return dx, dnw, dnb

    @staticmethod
    def residual(x2d, y):
        """x2d (float32) + y (bfloat16) -> float32 in one pass."""
        out = _new(x2d.shape)
        _ext._C.add_bf16_cpu(x2d.data_ptr(), y.data_ptr(), out.data_ptr(), out.numel(), torch.get_num_threads())
        return out

    @staticmethod
    def colsum(g):
        """Column sums of a contiguous bfloat16 (rows, cols) gradient, in float32."""
        out = _new((g.shape[1],))
        _ext._C.colsum_bf16_cpu(g.data_ptr(), out.data_ptr(), g.shape[0], g.shape[1], torch.get_num_threads())
        return out

    @staticmethod
    def cast_colsum(grad):
        """A float32 gradient as bfloat16 (a workspace buffer) and its column sums."""
        rows, cols = grad.shape
        gb, colsum = _workspace.get("rows", (rows, cols), _ACT_DTYPE), _new((cols,))
        _ext._C.cast_bf16_colsum_cpu(grad.data_ptr(), gb.data_ptr(), colsum.data_ptr(), rows, cols,
                                     torch.get_num_threads())
        return gb, colsum

    @staticmethod
    def gelu_forward(pre):
        act, deriv = _new(pre.shape, _ACT_DTYPE), _new(pre.shape, torch.float16)
        _ext._C.gelu_bf16_forward_cpu(pre.data_ptr(), act.data_ptr(), deriv.data_ptr(), pre.numel(),
                                      torch.get_num_threads())
        return act, deriv

    @staticmethod
    def gelu_backward(dact, deriv):
        rows, hidden = dact.shape
        dpre, db = _workspace.get("hidden2", (rows, hidden), _ACT_DTYPE), _new((hidden,))
        _ext._C.gelu_bf16_backward_cpu(dact.data_ptr(), deriv.data_ptr(), dpre.data_ptr(), db.data_ptr(), rows,
                                       hidden, torch.get_num_threads())
        return dpre, db

    @staticmethod
    def linear_supported():
        """Whether the layers call linear() / linear_backward_*() (csrc/cpu/autocast.cpp) instead of addmm /
        mm: by default where the CPU has AVX512-BF16 and no AMX (oneDNN's AMX GEMMs are faster);
        BF16_GEMM_ENV=onednn forces addmm / mm, =own the extension's GEMMs wherever they run."""
        value = os.environ.get(BF16_GEMM_ENV, "")
        choice = value.strip().lower()
        if choice == "onednn":
            return False
        if choice == "own":
            return _ext._C.linear_bf16_supported()
        if choice:
            raise ValueError(f"{BF16_GEMM_ENV}={value!r}: expected 'onednn' or 'own' (or unset: own GEMMs on "
                             "AVX512-BF16 without AMX)")
        return _ext._C.linear_bf16_preferred()

    @staticmethod
    def linear(a, w, b, epilogue, residual=None):
        """addmm(b.bfloat16(), a, w.bfloat16().t()) as autocast computes it, then an epilogue, in one
        kernel: a (rows, K) contiguous bfloat16, w (N, K) and b (N) float32. Returns (w as bfloat16 for the
        backward, *outputs): epilogue "store" -> y (bfloat16); "gelu" -> gelu(y) (bfloat16), gelu'(y) *
        2^14 (float16), as gelu_forward; "residual" -> residual + y (float32, residual (rows, N))."""
        rows, K = a.shape
        N = w.shape[0]
        w, b = w.contiguous(), b.contiguous()
        wb = _new((N, K), _ACT_DTYPE)
        outs = [_new((rows, N), torch.float32 if epilogue == "residual" else _ACT_DTYPE)]
        if epilogue == "gelu":
            outs.append(_new((rows, N), torch.float16))
        code = {"store": 0, "gelu": 1, "residual": 2}[epilogue]
        _ext._C.linear_bf16_cpu(a.data_ptr(), w.data_ptr(), b.data_ptr(), wb.data_ptr(), rows, K, N, code,
                                outs[0].data_ptr(), outs[1].data_ptr() if epilogue == "gelu" else 0,
                                residual.data_ptr() if epilogue == "residual" else 0, torch.get_num_threads())
        return (wb, *outs)

    @staticmethod
    def linear_backward_input(g, wb, role, deriv=None):
        """mm(g, wb) as autocast computes it (a linear's input gradient; g (rows, N) and wb (N, K)
        contiguous bfloat16) into the workspace buffer `role`; with deriv (gelu_forward's), GELU's
        backward on it in the same kernel, as gelu_backward: returns (dpre, its column sums)."""
        rows, N = g.shape
        K = wb.shape[1]
        out = _workspace.get(role, (rows, K), _ACT_DTYPE)
        colsum = None if deriv is None else _new((K,))
        _ext._C.linear_bf16_backward_input_cpu(g.data_ptr(), wb.data_ptr(), rows, N, K, out.data_ptr(),
                                               deriv is not None, 0 if deriv is None else deriv.data_ptr(),
                                               0 if colsum is None else colsum.data_ptr(), torch.get_num_threads())
        return out if deriv is None else (out, colsum)

    @staticmethod
    def linear_backward_weight(g, x):
        """mm(g.t(), x).float() as autocast computes it (a linear's weight gradient, bfloat16 rounded):
        g (rows, N) and x (rows, K) contiguous bfloat16 -> (N, K) float32."""
        rows, N = g.shape
        K = x.shape[1]
        dw = _new((N, K))
        _ext._C.linear_bf16_backward_weight_cpu(g.data_ptr(), x.data_ptr(), rows, N, K, dw.data_ptr(),
                                                torch.get_num_threads())
        return dw

    @staticmethod
    def attention_forward(qkv, num_heads):
        return _attention_kernel_forward("cpp", qkv, num_heads)

    @staticmethod
    def attention_backward(d_out, qkv, out, lse, num_heads):
        return _cpp_attention_backward(d_out, qkv, out, lse, num_heads,
                                       _workspace.get("qkv", qkv.shape, qkv.dtype))


class _TritonKernels:
    """autocast_triton's kernels (CUDA; the CPU under TRITON_INTERPRET=1 in the tests) and the Triton
    attention, for activations in act_dtype (bfloat16 or float16). Temporaries come from torch's
    caching allocator, which reuses them."""

    def __init__(self, act_dtype):
        self.act_dtype = act_dtype
        self.k = _triton_kernels()

    @staticmethod
    def linear_supported():
        """The linears stay cuBLAS's (torch.addmm / torch.mm)."""
        return False

    @staticmethod
    def workspace(role, shape, dtype, device):
        return None  # the GEMMs allocate their own outputs (out=None)

    def layer_norm(self, x2d, norm_weight, norm_bias, eps):
        rows, dim = x2d.shape
        dev = x2d.device
        return self.k.layer_norm(x2d, norm_weight, norm_bias, eps,
                                 new_output((rows, dim), self.act_dtype, dev), new_output((rows,), torch.float32, dev),
                                 new_output((rows,), torch.float32, dev))

    def layer_norm_backward(self, dh, x2d, mean, rstd, norm_weight, residual):
        return self.k.layer_norm_backward(dh, x2d, mean, rstd, norm_weight, residual,
                                          new_output(x2d.shape, torch.float32, x2d.device))

    @staticmethod
    def residual(x2d, y):
        return torch.add(x2d, y)  # one pass already (float32 + act -> float32)

    def colsum(self, g):
        return self.k.colsum(g)

    def cast_colsum(self, grad):
        return self.k.cast_colsum(grad, new_output(grad.shape, self.act_dtype, grad.device))

    def gelu_forward(self, pre):
        return self.k.gelu_forward(pre, new_output(pre.shape, pre.dtype, pre.device),
                                   new_output(pre.shape, torch.float16, pre.device))

    def gelu_backward(self, dact, deriv):
        return self.k.gelu_backward(dact, deriv, new_output(dact.shape, dact.dtype, dact.device))

    @staticmethod
    def attention_forward(qkv, num_heads):
        return _attention_kernel_forward("triton", qkv, num_heads)

    @staticmethod
    def attention_backward(d_out, qkv, out, lse, num_heads):
        return _attention_kernel_backward("triton", d_out, qkv, out, lse, num_heads)


_CPU_KERNELS = _CpuKernels()
_triton_sets = {}


def _kernels(device):
    """The kernel set for tensors on ``device`` under autocast there."""
    if device.type == "cpu":
        return _CPU_KERNELS
    dtype = torch.get_autocast_dtype(device.type)
    ks = _triton_sets.get(dtype)
    if ks is None:
        ks = _triton_sets[dtype] = _TritonKernels(dtype)
    return ks


class _PrenormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        k = _kernels(x.device)
        act_dtype = k.act_dtype
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
        h, mean, rstd = k.layer_norm(x2d, norm_weight, norm_bias, eps)
        ctx.own = k.linear_supported()  # the backward runs the same GEMMs
        if ctx.own:
            w1b, act, deriv = k.linear(h, w1, b1, "gelu")
            w2b, y = k.linear(act, w2, b2, "residual", residual=x2d)
        else:
            w1b, w2b = w1.to(act_dtype), w2.to(act_dtype)
            rows, hidden = x2d.shape[0], w1.shape[0]
            pre = torch.addmm(b1.to(act_dtype), h, w1b.t(),
                              out=k.workspace("hidden", (rows, hidden), act_dtype, x2d.device))
            act, deriv = k.gelu_forward(pre)
            out = torch.addmm(b2.to(act_dtype), act, w2b.t(),
                              out=k.workspace("rows", x2d.shape, act_dtype, x2d.device))
            y = k.residual(x2d, out)
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, h, w1b, act, deriv, w2b)
        ctx.shape, ctx.kernels = shape, k
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, h, w1b, act, deriv, w2b = ctx.saved_tensors
        k = ctx.kernels
        rows, dim = x2d.shape
        hidden = w1b.shape[0]
        grad = grad.reshape(rows, dim).contiguous()
        gb, db2 = k.cast_colsum(grad)
        own = ctx.own
        if own:
            dpre, db1 = k.linear_backward_input(gb, w2b, "hidden2", deriv)
        else:
            dact = torch.mm(gb, w2b, out=k.workspace("hidden", (rows, hidden), k.act_dtype, x2d.device))
        dw2 = k.linear_backward_weight(gb, act) if own else torch.mm(gb.t(), act).float()
        if own:  # gb's buffer ("rows") is free from here
            dh = k.linear_backward_input(dpre, w1b, "rows")
        else:
            dpre, db1 = k.gelu_backward(dact, deriv)
            dh = torch.mm(dpre, w1b, out=k.workspace("rows", (rows, dim), k.act_dtype, x2d.device))
        dw1 = k.linear_backward_weight(dpre, h) if own else torch.mm(dpre.t(), h).float()
        dx, dnw, dnb = k.layer_norm_backward(dh, x2d, mean, rstd, norm_weight, grad)
        return dx.view(ctx.shape), dnw, dnb, None, dw1, db1, dw2, db2


class _PrenormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w, b):
        k = _kernels(x.device)
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
        h, mean, rstd = k.layer_norm(x2d, norm_weight, norm_bias, eps)
        ctx.own = k.linear_supported()  # the backward runs the same GEMMs
        if ctx.own:
            wb, out = k.linear(h, w, b, "store")
        else:
            wb = w.to(k.act_dtype)
            out = torch.addmm(b.to(k.act_dtype), h, wb.t())
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, h, wb)
        ctx.shape, ctx.kernels = x.shape, k
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, h, wb = ctx.saved_tensors
        k = ctx.kernels
        grad = grad.reshape(-1, wb.shape[0]).to(k.act_dtype).contiguous()
        if ctx.own:
            dh = k.linear_backward_input(grad, wb, "rows")
            dw = k.linear_backward_weight(grad, h)
        else:
            dh = torch.mm(grad, wb, out=k.workspace("rows", x2d.shape, k.act_dtype, x2d.device))
            dw = torch.mm(grad.t(), h).float()
        db = k.colsum(grad)
        dx, dnw, dnb = k.layer_norm_backward(dh, x2d, mean, rstd, norm_weight, None)
        return dx.view(ctx.shape), dnw, dnb, None, dw, db


class _AttentionHalf(torch.autograd.Function):
    """x + proj(attention(qkv(LayerNorm(x)))): the pre-norm block's first half, with mvmae_fast's
    attention kernels (cpp on the CPU, Triton on CUDA) called directly on the act-dtype qkv (as
    ops.attention does)."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads):
        k = _kernels(x.device)
        act_dtype = k.act_dtype
        B, N, D = x.shape
        rows = B * N
        x2d = x.reshape(rows, D).contiguous()
        norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
        h, mean, rstd = k.layer_norm(x2d, norm_weight, norm_bias, eps)
        own = ctx.own = k.linear_supported()  # the backward runs the same GEMMs
        if own:
            w_qkv_b, qkv = k.linear(h, w_qkv, b_qkv, "store")
            qkv = qkv.view(B, N, 3 * D)
        else:
            w_qkv_b, w_proj_b = w_qkv.to(act_dtype), w_proj.to(act_dtype)
            qkv = torch.addmm(b_qkv.to(act_dtype), h, w_qkv_b.t()).view(B, N, 3 * D)
        attended, lse = k.attention_forward(qkv, num_heads)
        if own:
            w_proj_b, y = k.linear(attended.view(rows, D), w_proj, b_proj, "residual", residual=x2d)
        else:
            out = torch.addmm(b_proj.to(act_dtype), attended.view(rows, D), w_proj_b.t(),
                              out=k.workspace("rows", (rows, D), act_dtype, x2d.device))
            y = k.residual(x2d, out)
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, h, w_qkv_b, qkv, attended, lse, w_proj_b)
        ctx.num_heads, ctx.kernels = num_heads, k
        return y.view(B, N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, h, w_qkv_b, qkv, attended, lse, w_proj_b = ctx.saved_tensors
        k = ctx.kernels
        B, N, D = grad.shape
        rows = B * N
        grad = grad.reshape(rows, D).contiguous()
        gb, db_proj = k.cast_colsum(grad)
        own = ctx.own
        if own:
            d_attended = k.linear_backward_input(gb, w_proj_b, "rows2")
            dw_proj = k.linear_backward_weight(gb, attended.view(rows, D))
        else:
            d_attended = torch.mm(gb, w_proj_b, out=k.workspace("rows2", (rows, D), k.act_dtype, x2d.device))
            dw_proj = torch.mm(gb.t(), attended.view(rows, D)).float()
        dqkv = k.attention_backward(d_attended.view(B, N, D), qkv, attended, lse, ctx.num_heads).view(rows, 3 * D)
        db_qkv = k.colsum(dqkv)
        if own:
            dh = k.linear_backward_input(dqkv, w_qkv_b, "rows")
        else:
            dh = torch.mm(dqkv, w_qkv_b, out=k.workspace("rows", (rows, D), k.act_dtype, x2d.device))
        dw_qkv = k.linear_backward_weight(dqkv, h) if own else torch.mm(dqkv.t(), h).float()
        dx, dnw, dnb = k.layer_norm_backward(dh, x2d, mean, rstd, norm_weight, grad)
        return dx.view(B, N, D), dnw, dnb, None, dw_qkv, db_qkv, dw_proj, db_proj, None


def attention_half(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads):
    """``x + proj(attention(linear(layer_norm(x))))`` as CPU bfloat16 autocast computes it with
    mvmae_fast's attention: x (B, N, D) float32 -> float32. The caller (ops.mlp.fused_attention_half)
    checks the arguments and :func:`supported`."""
    return _AttentionHalf.apply(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads)


def prenorm_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
    """``x + mlp(layer_norm(x))`` as CPU bfloat16 autocast computes it (x float32 -> float32)."""
    return _PrenormMlp.apply(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)


def prenorm_linear(x, norm_weight, norm_bias, eps, w, b):
    """``linear(layer_norm(x), w, b)`` as CPU bfloat16 autocast computes it (x float32 -> bfloat16)."""
    return _PrenormLinear.apply(x, norm_weight, norm_bias, eps, w, b)
