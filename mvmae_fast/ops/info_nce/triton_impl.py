"""NT-Xent / InfoNCE in Triton: tiled logits, online log-sum-exp, no (n, N) matrix in memory.

Notation: q (n, d) the local anchors, k (N, d) the keys (all ranks' rows; k is q itself in a single
process), anchor i is key ``offset + i`` and its positive is key ``offset + (i + n/2) % n``.
s_ij = q_i.k_j / t, p_ij = softmax_j over j != offset + i, loss = mean_i (LSE_i - s_i,pos(i)).

Forward: one program per block of anchors loops over all key blocks (and over d in blocks inside
each tile), keeping a running max and sum per row; it stores LSE_i and the row's loss.

Backward, with g the upstream gradient and c = g / (n t):
  dq_i = c (sum_j p_ij k_j - k_pos(i))                    (anchor role)
  dk_j = c (sum_i p_ij q_i - q_i for the i with pos(i)=j)  (key role)
Each is one kernel over blocks of output rows that loops over every block of the other side and
recomputes the logits tile, so each output row is written once by one program: deterministic, no
atomics. In a single process q = k and s is symmetric, so one tile gives both roles:
dz_i = c (sum_j (p_ij + p_ji) z_j - 2 z_partner(i)), with p_ji = exp(s_ij - LSE_j).
Past d = 256 the output columns are split over a second grid axis (the tile is recomputed per split).
"""

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # anchors (or output rows) per program
BLOCK_N = 64  # keys per inner tile
BLOCK_D = 64  # reduction chunk of the logits
MAX_BLOCK_OUT = 256  # output columns per backward program
WIDE_BLOCK_M = 32  # output rows per backward program when its rows hold over 256 bytes of y
NUM_WARPS = 8
# Compiled for sm_90 (tests/triton_aot.py), the forward at 4 warps spilled 128 (bf16) and 368 (fp32)
# bytes at 255 registers; at 8 warps it takes 175-188 and spills nothing. The backward keeps every
# output column of rows up to d = 256 in one program (64 x 128 columns per program used to recompute
# each row block's logits once per 128 columns: 3 instead of 2 n N d multiply-adds at d = 256), with
# 32 rows a program where a row of y holds over 256 bytes, to stay within the registers (64 rows
# spilled 256 bytes at d = 256 in bf16, 24-40 at d = 128 and 1488 at d = 256 in fp32; 32, none).

# fp32 inputs: exact fp32 products (a GPU's default, tf32, would move logits at t = 0.05 by ~0.02).
FP32_DOT_PRECISION = "ieee"

# Backward roles (constexpr: one compiled kernel each).
ANCHOR = tl.constexpr(0)
KEY = tl.constexpr(1)
BOTH = tl.constexpr(2)
_LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(ptr, rows, row_ok, cols, n_cols, UPCAST: tl.constexpr):
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :],
                mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits_tile(x_ptr, y_ptr, rows, row_ok, cols, col_ok, d,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x_rows . y_cols^T (fp32), looping over d in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = _load_rows(x_ptr, rows, row_ok, dd, d, UPCAST)
        y = _load_rows(y_ptr, cols, col_ok, dd, d, UPCAST)
        s = tl.dot(x, tl.trans(y), s, input_precision=PRECISION)
    return s


@triton.jit
def _info_nce_fwd_kernel(q_ptr, k_ptr, lse_ptr, loss_ptr, n, N, d, offset, scale2,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    self_key = rows + offset
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile gives exp2(-inf) = 0
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _logits_tile(q_ptr, k_ptr, rows, row_ok, cols, col_ok, d,
                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION) * scale2
        s = tl.where(col_ok[None, :] & (cols[None, :] != self_key[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    lse = (m + tl.log2(acc)) * 0.6931471805599453

    positive = offset + (rows + n // 2) % n
    pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = _load_rows(q_ptr, rows, row_ok, dd, d, True)
        y = _load_rows(k_ptr, positive, row_ok, dd, d, True)
        pos += tl.sum(x * y, axis=1)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - pos * (scale2 * 0.6931471805599453), mask=row_ok)


@triton.jit
def _info_nce_bwd_kernel(x_ptr, y_ptr, lse_ptr, grad_ptr, dx_ptr, n_x, n_y, n, d, offset, scale2, coef,
                         ROLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dx for the rows of x (the anchors q for ANCHOR, the keys k for KEY, z for BOTH); y is the
    other side. LSEs belong to anchors: x's rows for ANCHOR and BOTH, y's rows for KEY and BOTH."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_x
    out_cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    if ROLE != KEY:
        lse_rows = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, BLOCK_OUT], dtype=tl.float32)
    for c0 in range(0, n_y, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_y
        s = _logits_tile(x_ptr, y_ptr, rows, row_ok, cols, col_ok, d,
                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION) * scale2
        if ROLE == ANCHOR:
            self_pair = cols[None, :] == rows[:, None] + offset
        elif ROLE == KEY:
            self_pair = rows[:, None] == cols[None, :] + offset
        else:
            self_pair = rows[:, None] == cols[None, :]
        if ROLE == ANCHOR:
            p = tl.exp2(s - lse_rows[:, None])
        else:
            lse_cols = tl.load(lse_ptr + cols, mask=col_ok, other=0.0) * 1.4426950408889634
            p = tl.exp2(s - lse_cols[None, :])
            if ROLE == BOTH:
                p += tl.exp2(s - lse_rows[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :] & ~self_pair, p, 0.0)
        y = _load_rows(y_ptr, cols, col_ok, out_cols, d, UPCAST)
        acc = tl.dot(p.to(y.dtype), y, acc, input_precision=PRECISION)

    half = n // 2
    if ROLE == ANCHOR:
        partner = offset + (rows + half) % n
        has_partner = row_ok
    elif ROLE == KEY:
        local = rows - offset
        has_partner = row_ok & (local >= 0) & (local < n)
        partner = tl.where(has_partner, (local + half) % n, 0)
    else:
        partner = (rows + half) % n
        has_partner = row_ok
    y_partner = _load_rows(y_ptr, partner, has_partner, out_cols, d, True)
    if ROLE == BOTH:
        acc -= 2.0 * y_partner
    else:
        acc -= y_partner
    dx = acc * (tl.load(grad_ptr).to(tl.float32) * coef)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * d + out_cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (out_cols < d)[None, :])


def _dot_options(z):
    # fp64 runs in fp32 (as the reference, which casts its logits to fp32); bf16 only under the
    # interpreter, whose bf16 arithmetic is wrong.
    upcast = z.dtype == torch.float64 or (z.dtype == torch.bfloat16 and z.device.type == "cpu")
    precision = FP32_DOT_PRECISION if (z.dtype == torch.float32 or upcast) else None  # None: 16-bit default
    return dict(UPCAST=upcast, PRECISION=precision)


def _block_d(d):
    return max(16, min(BLOCK_D, triton.next_power_of_2(d)))


def forward_launch(d):
    """The forward kernel's tile sizes and num_warps for rows of d values."""
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(d), num_warps=NUM_WARPS)


def backward_launch(d, itemsize):
    """The backward kernel's tile sizes (BLOCK_OUT output columns per program) and num_warps, for rows
    of d values of ``itemsize`` bytes as the kernel loads them."""
    block_out = max(16, min(MAX_BLOCK_OUT, triton.next_power_of_2(d)))
    return dict(BLOCK_M=BLOCK_M if block_out * itemsize <= 256 else WIDE_BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_D=_block_d(d), BLOCK_OUT=block_out, num_warps=NUM_WARPS)


def forward(q, k, offset, temperature, lse, row_loss):
    """q (n, d), k (N, d) contiguous; writes lse (n,) and row_loss (n,) in fp32."""
    n, d = q.shape
    launch = forward_launch(d)
    _info_nce_fwd_kernel[(triton.cdiv(n, launch["BLOCK_M"]),)](
        q, k, lse, row_loss, n, k.shape[0], d, offset, _LOG2E / temperature, **launch, **_dot_options(q))


def backward(role, x, y, lse, grad, dx, n, offset, temperature):
    """dx (rows of x, d) for ``role`` (ANCHOR, KEY or BOTH); grad is the loss's upstream gradient."""
    n_x, d = x.shape
    options = _dot_options(x)
    launch = backward_launch(d, 4 if options["UPCAST"] else x.element_size())
    grid = (triton.cdiv(n_x, launch["BLOCK_M"]), triton.cdiv(d, launch["BLOCK_OUT"]))
    _info_nce_bwd_kernel[grid](
        x, y, lse, grad, dx, n_x, y.shape[0], n, d, offset, _LOG2E / temperature, 1.0 / (n * temperature),
        ROLE=role, **launch, **options)
