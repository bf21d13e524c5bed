"""FlashAttention-2 style non-causal attention in Triton, forward and backward.

q, k and v are read in place from the fused projection output ``qkv`` (B, N, 3*H*Dh), element
``(b, n, t, h, d)`` at ``b*s_b + n*s_n + ((t*H + h)*Dh + d)*s_c`` for any strides; no permute copy.
The output is written as (B, N, H*Dh), the layout the output projection reads.

Forward: one program per (batch*head, query block); the query tile stays resident while key/value
tiles stream past with an online softmax in base 2. It saves the natural-log row log-sum-exp of the
scaled scores, (B, H, N) float32, so the backward pass recomputes probabilities instead of storing
an N x N matrix.

Backward, deterministic (no atomics): ``delta = rowsum(dO * O)``; then one kernel per key block
accumulates dk and dv over all query blocks, and one per query block accumulates dq over all key
blocks. Each gradient element is written once by one program, in a fixed order.

The head dimension is padded to a power of two >= 16 (80 -> 128) and masked; every load is masked on
rows and head-dim columns, so sequence lengths need not be multiples of any block.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tests) autotuning cannot run, so a fixed
large block is used (the interpreter's cost is per operation, not per element), and bf16 is widened
to float32 on load because the interpreter's bf16 arithmetic is wrong.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Kernels spell log2(e) and ln(2) as literals: Triton reads only constexpr globals.
LOG2E = 1.4426950408889634


def interpreter_blocks(seq_len):
    """(BLOCK_M, BLOCK_N) under the interpreter: one tile up to 64 rows, then 64-row tiles."""
    block = min(64, max(16, triton.next_power_of_2(seq_len)))
    return block, block


def head_dim_block(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _load_tile(base, rows, row_ok, cols, col_ok, stride_n, UPCAST: tl.constexpr):
    """Rows ``rows`` and element offsets ``cols`` (already scaled by the column stride) of one head."""
    tile = tl.load(base + rows[:, None] * stride_n + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _attn_fwd_kernel(qkv_ptr, out_ptr, lse_ptr, N, H,
                     s_qkv_b, s_qkv_n, s_qkv_c, s_out_b, s_out_n, s_out_c, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows_m < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = qkv_ptr + b * s_qkv_b
    q = _load_tile(base, rows_m, m_ok, (h * HEAD_DIM + d) * s_qkv_c, d_ok, s_qkv_n, UPCAST)
    k_cols = ((H + h) * HEAD_DIM + d) * s_qkv_c
    v_cols = ((2 * H + h) * HEAD_DIM + d) * s_qkv_c

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        rows_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = rows_n < N
        k = _load_tile(base, rows_n, n_ok, k_cols, d_ok, s_qkv_n, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(base, rows_n, n_ok, v_cols, d_ok, s_qkv_n, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out = out_ptr + b * s_out_b + rows_m[:, None] * s_out_n + (h * HEAD_DIM + d)[None, :] * s_out_c
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, N, H,
                           s_out_b, s_out_n, s_out_c, s_do_b, s_do_n, s_do_c,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    o = _load_tile(out_ptr + b * s_out_b, rows, row_ok, (h * HEAD_DIM + d) * s_out_c, d_ok, s_out_n, True)
    do = _load_tile(dout_ptr + b * s_do_b, rows, row_ok, (h * HEAD_DIM + d) * s_do_c, d_ok, s_do_n, True)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, N, H,
                          s_qkv_b, s_qkv_n, s_qkv_c, s_do_b, s_do_n, s_do_c,
                          s_dqkv_b, s_dqkv_n, s_dqkv_c, sm_scale, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows_n < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = qkv_ptr + b * s_qkv_b
    k = _load_tile(base, rows_n, n_ok, ((H + h) * HEAD_DIM + d) * s_qkv_c, d_ok, s_qkv_n, UPCAST)
    v = _load_tile(base, rows_n, n_ok, ((2 * H + h) * HEAD_DIM + d) * s_qkv_c, d_ok, s_qkv_n, UPCAST)
    q_cols = (h * HEAD_DIM + d) * s_qkv_c
    do_base = dout_ptr + b * s_do_b
    do_cols = (h * HEAD_DIM + d) * s_do_c
    row_stats = bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = rows_m < N
        q = _load_tile(base, rows_m, m_ok, q_cols, d_ok, s_qkv_n, UPCAST)
        do = _load_tile(do_base, rows_m, m_ok, do_cols, d_ok, s_do_n, UPCAST)
        # Padding query rows get lse = +inf, hence probability 0 and no contribution.
        lse = tl.load(lse_ptr + row_stats + rows_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_stats + rows_m, mask=m_ok, other=0.0)
        # Transposed tiles (keys x queries), so no probability tile needs transposing.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    tile_ok = n_ok[:, None] & d_ok[None, :]
    grad = dqkv_ptr + b * s_dqkv_b + rows_n[:, None] * s_dqkv_n
    tl.store(grad + ((H + h) * HEAD_DIM + d)[None, :] * s_dqkv_c, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty),
             mask=tile_ok)
    tl.store(grad + ((2 * H + h) * HEAD_DIM + d)[None, :] * s_dqkv_c, dv.to(dqkv_ptr.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _attn_bwd_dq_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, N, H,
                        s_qkv_b, s_qkv_n, s_qkv_c, s_do_b, s_do_n, s_do_c,
                        s_dqkv_b, s_dqkv_n, s_dqkv_c, sm_scale, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows_m < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = qkv_ptr + b * s_qkv_b
    q = _load_tile(base, rows_m, m_ok, (h * HEAD_DIM + d) * s_qkv_c, d_ok, s_qkv_n, UPCAST)
    do = _load_tile(dout_ptr + b * s_do_b, rows_m, m_ok, (h * HEAD_DIM + d) * s_do_c, d_ok, s_do_n, UPCAST)
    row_stats = bh.to(tl.int64) * N
    lse = tl.load(lse_ptr + row_stats + rows_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_stats + rows_m, mask=m_ok, other=0.0)
    k_cols = ((H + h) * HEAD_DIM + d) * s_qkv_c
    v_cols = ((2 * H + h) * HEAD_DIM + d) * s_qkv_c

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        rows_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = rows_n < N
        k = _load_tile(base, rows_n, n_ok, k_cols, d_ok, s_qkv_n, UPCAST)
        v = _load_tile(base, rows_n, n_ok, v_cols, d_ok, s_qkv_n, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(tl.where(n_ok[None, :], s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    grad = dqkv_ptr + b * s_dqkv_b + rows_m[:, None] * s_dqkv_n + (h * HEAD_DIM + d)[None, :] * s_dqkv_c
    tl.store(grad, (dq * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _gpu_configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# On a GPU the tile shape is autotuned per (sequence length, head dim); MAE uses a handful of each.
if INTERPRET:
    _fwd, _dkdv, _dq = _attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
else:
    _TUNE_KEY = ["N", "HEAD_DIM"]
    _fwd = triton.autotune(_gpu_configs([(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 3),
                                         (64, 32, 4, 2), (32, 32, 2, 2)]), key=_TUNE_KEY)(_attn_fwd_kernel)
    _BWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2),
                    (128, 64, 8, 2), (64, 128, 8, 2)]
    _dkdv = triton.autotune(_gpu_configs(_BWD_CONFIGS), key=_TUNE_KEY)(_attn_bwd_dkdv_kernel)
    _dq = triton.autotune(_gpu_configs(_BWD_CONFIGS), key=_TUNE_KEY)(_attn_bwd_dq_kernel)


def _dot_options(dtype):
    """(UPCAST, DOT_PRECISION): float32 operands get IEEE dots (not tf32), so float32 inputs keep
    float32 accuracy on a GPU; bf16 is widened to float32 under the interpreter."""
    upcast = INTERPRET and dtype == torch.bfloat16
    return upcast, "ieee" if upcast or dtype == torch.float32 else "tf32"


def _blocks(seq_len, **fixed):
    """Launch constants: with fixed tile sizes under the interpreter, else the autotuner picks them."""
    if INTERPRET:
        block_m, block_n = interpreter_blocks(seq_len)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, **fixed}
    return fixed


def _grid(batch_heads, seq_len, rows):
    return lambda meta: (batch_heads, triton.cdiv(seq_len, meta[rows]))


def forward(qkv, num_heads, out, lse):
    """Fill ``out`` (B, N, H*Dh) and ``lse`` (B, H, N) float32 from ``qkv`` (B, N, 3*H*Dh)."""
    B, N, C = qkv.shape
    head_dim = C // (3 * num_heads)
    upcast, precision = _dot_options(qkv.dtype)
    _fwd[_grid(B * num_heads, N, "BLOCK_M")](
        qkv, out, lse, N, num_heads, *qkv.stride(), *out.stride(), head_dim**-0.5 * LOG2E,
        **_blocks(N, HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), UPCAST=upcast, DOT_PRECISION=precision))


def backward(dout, qkv, out, lse, num_heads, dqkv):
    """Fill ``dqkv`` (B, N, 3*H*Dh) with the gradient of the attention output ``out`` w.r.t. ``qkv``."""
    B, N, C = qkv.shape
    head_dim = C // (3 * num_heads)
    block_d = head_dim_block(head_dim)
    upcast, precision = _dot_options(qkv.dtype)
    delta = torch.empty(B, num_heads, N, dtype=torch.float32, device=qkv.device)
    delta_rows = min(64, max(16, triton.next_power_of_2(N)))
    _attn_bwd_delta_kernel[(B * num_heads, triton.cdiv(N, delta_rows))](
        out, dout, delta, N, num_heads, *out.stride(), *dout.stride(),
        HEAD_DIM=head_dim, BLOCK_M=delta_rows, BLOCK_D=block_d)
    args = (qkv, dout, lse, delta, dqkv, N, num_heads, *qkv.stride(), *dout.stride(), *dqkv.stride(),
            head_dim**-0.5, head_dim**-0.5 * LOG2E)
    meta = _blocks(N, HEAD_DIM=head_dim, BLOCK_D=block_d, UPCAST=upcast, DOT_PRECISION=precision)
    _dkdv[_grid(B * num_heads, N, "BLOCK_N")](*args, **meta)
    _dq[_grid(B * num_heads, N, "BLOCK_M")](*args, **meta)
