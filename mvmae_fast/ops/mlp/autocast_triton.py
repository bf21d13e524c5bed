"""The autocast layers' elementwise kernels for CUDA, in Triton (autocast.py's CPU kernels' twins).

Under CUDA autocast (bfloat16 or float16: the activation dtype ``act``) the pre-norm block's layers
keep autocast's GEMMs (cuBLAS on the same ``act`` operands) and do the rest in these kernels:

- ``layer_norm``: float32 rows -> the normalised rows in ``act`` (no float32 output, no cast pass),
  and each row's mean and 1/std (float32, for the backward);
- ``layer_norm_backward``: the ``act`` gradient of those rows -> the float32 input gradient, plus
  a residual's float32 gradient added in the same pass, and the weight and bias gradients;
- ``gelu_forward``: GELU of fc1's ``act`` output, and gelu'(x) * 2^14 as float16, kept instead of
  the input so the backward is one multiply;
- ``gelu_backward``: dact * gelu' -> ``act``, and its column sums (fc1's bias gradient);
- ``cast_colsum``: a float32 gradient -> ``act``, and its column sums (a bias gradient);
- ``colsum``: column sums of an ``act`` gradient.

Row kernels give each program ``BLOCK_R`` whole rows (the row's ``D`` values padded to a power of two
in registers: ``D`` up to MAX_DIM). Column sums are deterministic: each program sums a fixed group of
rows into a float32 partial row (a tile of ``BLOCK_R`` strands, then a tree sum), and the partials
are summed by torch in a fixed order. Everything is computed in float32; ``act`` values are loaded
and converted first (the interpreter's bfloat16 arithmetic is wrong) and rounded once on store.

The functions take contiguous tensors (the caller, autocast.py, makes them so) on CUDA, or on the
CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

import contextlib

import torch
import triton
import triton.language as tl

MAX_DIM = 8192  # a LayerNorm row sits in one program's registers
# Values per program (rows per program = TILE // next_pow2(D)) and per thread (num_warps =
# TILE // (32 * per thread), 4 to 32) of the LayerNorm kernels. The backward holds about twice the
# forward's live values per element (dh, x, xhat, dx and the dw/db accumulators): with the forward's
# 4096-value tile and 8 warps it took 240-255 registers on sm_90 (one program per SM) and spilled at
# D = 8192; in 1024-value tiles (or one row) with 8 values a thread, 64-128 registers on sm_80 and
# sm_90 at every width and no spills (tests/test_triton_compile.py checks).
TILE_ELEMENTS, VALUES_PER_THREAD = 4096, 16
BACKWARD_TILE_ELEMENTS, BACKWARD_VALUES_PER_THREAD = 1024, 8
SUM_BLOCK_R = 16  # rows per step of the column-sum kernels
SUM_BLOCK_C = 128  # columns per program of the column-sum kernels
SUM_WARPS = 8  # 8 values a thread: 32-44 registers on sm_90 (4 warps, 16 values a thread: 144-188)
MAX_SUM_GROUPS = 512  # row groups (float32 partial rows) of a column sum at most
GELU_BLOCK = 1024
# Constants the kernels read: compiled Triton reads only globals made tl.constexpr (the interpreter
# reads any, so tests/test_autocast_triton_layers.py also compiles every kernel for sm_80 and sm_90).
GELU_SCALE = tl.constexpr(16384.0)  # gelu' in [-0.17, 1.13] is stored times 2^14 in float16
GELU_TAIL_X2 = tl.constexpr(174.0)  # past x^2 = 174 (z^2 = 87) exp(-x^2/2) is under float32's normal range
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, h_ptr, mean_ptr, rstd_ptr, rows, D, eps,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    d_ok = d < D
    ok = row_ok[:, None] & d_ok[None, :]
    offs = r[:, None] * D + d[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    mean = tl.sum(x, axis=1) / D
    dev = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(dev * dev, axis=1) / D + eps)
    w = tl.load(w_ptr + d, mask=d_ok, other=0.0)
    b = tl.load(b_ptr + d, mask=d_ok, other=0.0)
    h = dev * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + r, mean, mask=row_ok)
    tl.store(rstd_ptr + r, rstd, mask=row_ok)


@triton.jit
def _layer_norm_backward_kernel(dh_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, res_ptr, dx_ptr, dw_ptr, db_ptr,
                                rows, D, rows_per_group,
                                HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    group = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    w = tl.load(w_ptr + d, mask=d_ok, other=0.0)
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    start = group.to(tl.int64) * rows_per_group
    end = tl.minimum(start + rows_per_group, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < end
        ok = row_ok[:, None] & d_ok[None, :]
        offs = r[:, None] * D + d[None, :]
        dh = tl.load(dh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        mean = tl.load(mean_ptr + r, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dh * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_RESIDUAL:
            dx += tl.load(res_ptr + offs, mask=ok, other=0.0)
        tl.store(dx_ptr + offs, dx, mask=ok)
        dw += dh * xhat
        db += dh
    tl.store(dw_ptr + group * D + d, tl.sum(dw, axis=0), mask=d_ok)
    tl.store(db_ptr + group * D + d, tl.sum(db, axis=0), mask=d_ok)


@triton.jit
def _gelu_forward_kernel(pre_ptr, act_ptr, deriv_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(pre_ptr + i, mask=ok, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(x * _INV_SQRT2))
    value = x * cdf
    grad = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    # The tails as their limits (x or 0, 1 or 0), which also keeps +-inf from inf * 0.
    tail = x * x > GELU_TAIL_X2
    right = x > 0
    value = tl.where(tail, tl.where(right, x, 0.0), value)
    grad = tl.where(tail, tl.where(right, 1.0, 0.0), grad)
    tl.store(act_ptr + i, value.to(act_ptr.dtype.element_ty), mask=ok)
    tl.store(deriv_ptr + i, (grad * GELU_SCALE).to(tl.float16), mask=ok)


@triton.jit
def _colsum_kernel(g_ptr, deriv_ptr, out_ptr, partial_ptr, rows, C, rows_per_group,
                   MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column sums of a row group into partial[group]; MODE 0: of g (act); 1: of g (float32), also
    written to out in act; 2: of g (act) * deriv / 2^14 (float32), also written to out in act."""
    group = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    start = group.to(tl.int64) * rows_per_group
    end = tl.minimum(start + rows_per_group, rows)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < end)[:, None] & c_ok[None, :]
        offs = r[:, None] * C + c[None, :]
        v = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if MODE == 2:
            v = v * (tl.load(deriv_ptr + offs, mask=ok, other=0.0).to(tl.float32) * (1.0 / GELU_SCALE))
        if MODE != 0:
            tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=ok)
        acc += v
    tl.store(partial_ptr + group.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=c_ok)


def _row_launch(D, tile, per_thread, max_rows=None):
    block_d = triton.next_power_of_2(D)
    block_r = max(1, tile // block_d if max_rows is None else min(max_rows, tile // block_d))
    warps = min(32, max(4, triton.next_power_of_2(block_r * block_d // (32 * per_thread))))
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)


def layer_norm_launch(D):
    """The LayerNorm forward's tile (BLOCK_R rows of BLOCK_D values) and num_warps for rows of D values."""
    return _row_launch(D, TILE_ELEMENTS, VALUES_PER_THREAD)


def layer_norm_backward_launch(D):
    """The LayerNorm backward's tile and num_warps (at most 16 rows: its accumulators are whole tiles)."""
    return _row_launch(D, BACKWARD_TILE_ELEMENTS, BACKWARD_VALUES_PER_THREAD, 16)


def column_sum_launch():
    return dict(BLOCK_R=SUM_BLOCK_R, BLOCK_C=SUM_BLOCK_C, num_warps=SUM_WARPS)


def gelu_launch():
    return dict(BLOCK=GELU_BLOCK, num_warps=4)


def _groups(rows, block_r):
    """(number of row groups, rows per group): groups of whole BLOCK_R steps, MAX_SUM_GROUPS at most."""
    steps = triton.cdiv(max(rows, 1), block_r)
    per_group = triton.cdiv(steps, MAX_SUM_GROUPS) * block_r
    return triton.cdiv(max(rows, 1), per_group), per_group


def _on(device):
    """Makes ``device`` current for the launch when it is another CUDA device than the current one."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_dim(D):
    """Why these kernels cannot take rows of D values (None when they can)."""
    if D > MAX_DIM:
        return f"rows of {D} values are over the Triton LayerNorm's {MAX_DIM}"
    return None


def layer_norm(x2d, weight, bias, eps, h, mean, rstd):
    """x2d (rows, D) float32 -> h (rows, D) in h's dtype (act), mean and rstd (rows,) float32, written in
    place."""
    rows, D = x2d.shape
    if rows == 0:
        return h, mean, rstd
    launch = layer_norm_launch(D)
    with _on(x2d.device):
        _layer_norm_kernel[(triton.cdiv(rows, launch["BLOCK_R"]),)](
            x2d, weight, bias, h, mean, rstd, rows, D, float(eps), **launch)
    return h, mean, rstd


def layer_norm_backward(dh, x2d, mean, rstd, weight, residual, dx):
    """dh (rows, D) act, x2d float32 -> dx (rows, D) float32 (+ residual, float32, when given: written
    in place), and the weight's and the bias's gradients (D,) float32."""
    rows, D = x2d.shape
    launch = layer_norm_backward_launch(D)
    groups, per_group = _groups(rows, launch["BLOCK_R"])
    partial = torch.empty(2, groups, D, dtype=torch.float32, device=x2d.device)
    with _on(x2d.device):
        _layer_norm_backward_kernel[(groups,)](
            dh, x2d, mean, rstd, weight, x2d if residual is None else residual, dx, partial[0], partial[1],
            rows, D, per_group, HAS_RESIDUAL=residual is not None, **launch)
    sums = partial.sum(dim=1)
    return dx, sums[0], sums[1]


def gelu_forward(pre, act, deriv):
    """pre (any shape) act -> act = gelu(pre) (pre's dtype), deriv = gelu'(pre) * 2^14 float16."""
    n = pre.numel()
    if n:
        with _on(pre.device):
            _gelu_forward_kernel[(triton.cdiv(n, GELU_BLOCK),)](pre, act, deriv, n, **gelu_launch())
    return act, deriv


def _column_sums(mode, g, deriv, out):
    rows, C = g.shape
    groups, per_group = _groups(rows, SUM_BLOCK_R)
    partial = torch.empty(groups, C, dtype=torch.float32, device=g.device)
    if C:
        with _on(g.device):
            _colsum_kernel[(groups, triton.cdiv(C, SUM_BLOCK_C))](
                g, g if deriv is None else deriv, g if out is None else out, partial, rows, C, per_group,
                MODE=mode, **column_sum_launch())
    return partial.sum(dim=0)


def colsum(g):
    """Column sums (C,) float32 of g (rows, C) act."""
    return _column_sums(0, g, None, None)


def cast_colsum(grad, out):
    """grad (rows, C) float32 -> out = grad in out's dtype, and grad's column sums (C,) float32."""
    return out, _column_sums(1, grad, None, out)


def gelu_backward(dact, deriv, dpre):
    """dpre = dact * deriv / 2^14 in dact's dtype (the product in float32, rounded once), and the
    float32 products' column sums (fc1's bias gradient)."""
    return dpre, _column_sums(2, dact, deriv, dpre)
