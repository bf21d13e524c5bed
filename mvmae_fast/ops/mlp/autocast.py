"""The pre-norm block's layers under CPU bfloat16 autocast: autocast's arithmetic, fewer passes.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the reference computes LayerNorm in float32,
casts its output to bfloat16 for the linear, runs the linears in bfloat16 (oneDNN's AMX / AVX512-BF16
GEMMs, which no float32 kernel matches), GELU in bfloat16, and adds the bfloat16 MLP output to the
float32 residual. These functions run the same linears (``torch.addmm`` / ``torch.mm`` on the same
bfloat16 operands, so the GEMMs are the reference's) and do the rest in the extension's kernels
(csrc/cpu/autocast.cpp):

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
gradients are bfloat16 GEMM results, as autocast's.

The forward is autocast's bits (tested). Eager only: :func:`supported` is False while
``torch.compile`` traces (inductor fuses the same elementwise work itself) or any other tracer,
transform or dispatch mode is active, and for anything but float32 CPU tensors under CPU bfloat16
autocast. The backward is once-differentiable (double backward raises).
"""

import math
import threading

import torch

from ... import _ext
from ..._utils import POISON_OUTPUTS, direct_kernel_calls, new_output
from ..attention import _cpp_backward as _attention_backward
from ..attention import _cpp_forward as _attention_forward

_ACT_DTYPE = torch.bfloat16


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
    """Whether these tensors (x first) take the autocast path: CPU bfloat16 autocast is on, every
    tensor is a float32 CPU tensor, the extension is built, and nothing is tracing or transforming
    (_utils.direct_kernel_calls)."""
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    if _ext._C is None or not direct_kernel_calls(*tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _new(shape, dtype=torch.float32):
    """An output a kernel fills (poisoned in the tests, see _utils.new_output)."""
    return new_output(shape, dtype, "cpu")


def _layer_norm(x2d, norm_weight, norm_bias, eps, threads):
    rows, dim = x2d.shape
    h, mean, rstd = _new((rows, dim), _ACT_DTYPE), _new((rows,)), _new((rows,))
    _ext._C.layer_norm_bf16_forward_cpu(x2d.data_ptr(), norm_weight.data_ptr(), norm_bias.data_ptr(), float(eps),
                                        h.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows, dim, threads)
    return h, mean, rstd


def _layer_norm_backward(dh, x2d, mean, rstd, norm_weight, residual, threads):
    rows, dim = x2d.shape
    dx, dnw, dnb = _new((rows, dim)), _new((dim,)), _new((dim,))
    _ext._C.layer_norm_bf16_backward_cpu(dh.data_ptr(), x2d.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                         norm_weight.data_ptr(), 0 if residual is None else residual.data_ptr(),
                                         dx.data_ptr(), dnw.data_ptr(), dnb.data_ptr(), rows, dim, threads)
    return dx, dnw, dnb


def _residual(x2d, y, threads):
    """x2d (float32) + y (bfloat16) -> float32 in one pass."""
    out = _new(x2d.shape)
    _ext._C.add_bf16_cpu(x2d.data_ptr(), y.data_ptr(), out.data_ptr(), out.numel(), threads)
    return out


def _colsum(g, threads):
    """Column sums of a contiguous bfloat16 (rows, cols) gradient, in float32."""
    out = _new((g.shape[1],))
    _ext._C.colsum_bf16_cpu(g.data_ptr(), out.data_ptr(), g.shape[0], g.shape[1], threads)
    return out


def _cast_colsum(grad, threads):
    """A float32 gradient as bfloat16 (a workspace buffer) and its column sums."""
    rows, cols = grad.shape
    gb, colsum = _workspace.get("rows", (rows, cols), _ACT_DTYPE), _new((cols,))
    _ext._C.cast_bf16_colsum_cpu(grad.data_ptr(), gb.data_ptr(), colsum.data_ptr(), rows, cols, threads)
    return gb, colsum


class _PrenormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        threads = torch.get_num_threads()
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
        h, mean, rstd = _layer_norm(x2d, norm_weight, norm_bias, eps, threads)
        w1b, w2b = w1.to(_ACT_DTYPE), w2.to(_ACT_DTYPE)
        rows, hidden = x2d.shape[0], w1.shape[0]
        pre = torch.addmm(b1.to(_ACT_DTYPE), h, w1b.t(),
                          out=_workspace.get("hidden", (rows, hidden), _ACT_DTYPE))
        act, deriv = _new(pre.shape, _ACT_DTYPE), _new(pre.shape, torch.float16)
        _ext._C.gelu_bf16_forward_cpu(pre.data_ptr(), act.data_ptr(), deriv.data_ptr(), pre.numel(), threads)
        out = torch.addmm(b2.to(_ACT_DTYPE), act, w2b.t(), out=_workspace.get("rows", x2d.shape, _ACT_DTYPE))
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, h, w1b, act, deriv, w2b)
        ctx.shape = shape
        return _residual(x2d, out, threads).view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, h, w1b, act, deriv, w2b = ctx.saved_tensors
        threads = torch.get_num_threads()
        rows, dim = x2d.shape
        hidden = w1b.shape[0]
        grad = grad.reshape(rows, dim).contiguous()
        gb, db2 = _cast_colsum(grad, threads)
        dact = torch.mm(gb, w2b, out=_workspace.get("hidden", (rows, hidden), _ACT_DTYPE))
        dw2 = torch.mm(gb.t(), act).float()
        dpre, db1 = _workspace.get("hidden2", (rows, hidden), _ACT_DTYPE), _new((hidden,))
        _ext._C.gelu_bf16_backward_cpu(dact.data_ptr(), deriv.data_ptr(), dpre.data_ptr(), db1.data_ptr(), rows, hidden,
                                       threads)
        dh = torch.mm(dpre, w1b, out=_workspace.get("rows", (rows, dim), _ACT_DTYPE))
        dw1 = torch.mm(dpre.t(), h).float()
        dx, dnw, dnb = _layer_norm_backward(dh, x2d, mean, rstd, norm_weight, grad, threads)
        return dx.view(ctx.shape), dnw, dnb, None, dw1, db1, dw2, db2


class _PrenormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w, b):
        threads = torch.get_num_threads()
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
        h, mean, rstd = _layer_norm(x2d, norm_weight, norm_bias, eps, threads)
        wb = w.to(_ACT_DTYPE)
        out = torch.addmm(b.to(_ACT_DTYPE), h, wb.t())
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, h, wb)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, h, wb = ctx.saved_tensors
        threads = torch.get_num_threads()
        grad = grad.reshape(-1, wb.shape[0]).to(_ACT_DTYPE).contiguous()
        dh = torch.mm(grad, wb, out=_workspace.get("rows", x2d.shape, _ACT_DTYPE))
        dw = torch.mm(grad.t(), h).float()
        db = _colsum(grad, threads)
        dx, dnw, dnb = _layer_norm_backward(dh, x2d, mean, rstd, norm_weight, None, threads)
        return dx.view(ctx.shape), dnw, dnb, None, dw, db


class _AttentionHalf(torch.autograd.Function):
    """x + proj(attention(qkv(LayerNorm(x)))): the pre-norm block's first half, with the extension's
    attention kernels called directly on the bfloat16 qkv (as ops.attention's cpp backend does)."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, num_heads):
        threads = torch.get_num_threads()
        B, N, D = x.shape
        rows = B * N
        x2d = x.reshape(rows, D).contiguous()
        norm_weight, norm_bias = norm_weight.contiguous(), norm_bias.contiguous()
        h, mean, rstd = _layer_norm(x2d, norm_weight, norm_bias, eps, threads)
        w_qkv_b, w_proj_b = w_qkv.to(_ACT_DTYPE), w_proj.to(_ACT_DTYPE)
        qkv = torch.addmm(b_qkv.to(_ACT_DTYPE), h, w_qkv_b.t()).view(B, N, 3 * D)
        attended, lse = _attention_forward(qkv, num_heads, new_output((B, N, D), _ACT_DTYPE, x.device),
                                           new_output((B, num_heads, N), torch.float32, x.device))
        out = torch.addmm(b_proj.to(_ACT_DTYPE), attended.view(rows, D), w_proj_b.t(),
                          out=_workspace.get("rows", (rows, D), _ACT_DTYPE))
        ctx.save_for_backward(x2d, mean, rstd, norm_weight, h, w_qkv_b, qkv, attended, lse, w_proj_b)
        ctx.num_heads = num_heads
        return _residual(x2d, out, threads).view(B, N, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd, norm_weight, h, w_qkv_b, qkv, attended, lse, w_proj_b = ctx.saved_tensors
        threads = torch.get_num_threads()
        B, N, D = grad.shape
        rows = B * N
        grad = grad.reshape(rows, D).contiguous()
        gb, db_proj = _cast_colsum(grad, threads)
        d_attended = torch.mm(gb, w_proj_b, out=_workspace.get("rows2", (rows, D), _ACT_DTYPE))
        dw_proj = torch.mm(gb.t(), attended.view(rows, D)).float()
        dqkv = _attention_backward(d_attended.view(B, N, D), qkv, attended, lse, ctx.num_heads,
                                   _workspace.get("qkv", (B, N, 3 * D), _ACT_DTYPE)).view(rows, 3 * D)
        db_qkv = _colsum(dqkv, threads)
        dh = torch.mm(dqkv, w_qkv_b, out=_workspace.get("rows", (rows, D), _ACT_DTYPE))
        dw_qkv = torch.mm(dqkv.t(), h).float()
        dx, dnw, dnb = _layer_norm_backward(dh, x2d, mean, rstd, norm_weight, grad, threads)
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
