"""Decoder unshuffle in Triton.

Forward: one program per (sample, tile of output rows, block of columns). Output row r reads
x row 0 (r = 0), x row 1 + ids_restore[r - 1] (a visible patch) or the mask token (a removed one),
adds pos row r in float32 and stores once: no concatenated or index tensors.

Backward: one program per (sample, block of columns) walks the sample's rows in tiles. Visible rows
are stored to their x row (ids_restore is a permutation, so each x row is written exactly once, no
atomics); removed rows are summed in registers into one partial mask-token gradient per program,
which a small torch sum over the batch finishes (deterministic).

K (the visible count) is a runtime value, never specialised on; the blocks depend on D only.
"""

import triton
import triton.language as tl

BLOCK_R = 16
MAX_BLOCK_D = 128


@triton.jit
def _source_rows(ids_ptr, r, row_ok, K):
    """x row feeding output row r, and whether it is one (else the mask token)."""
    t = tl.load(ids_ptr + r - 1, mask=row_ok & (r > 0), other=0)
    visible = row_ok & ((r == 0) | (t < K))
    return tl.where(r == 0, 0, t + 1).to(tl.int64), visible


@triton.jit(do_not_specialize=["K"])
def _unshuffle_fwd_kernel(x_ptr, ids_ptr, token_ptr, pos_ptr, out_ptr, K, L, D, row_tiles,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // row_tiles).to(tl.int64)
    r = (pid % row_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < L + 1
    src, visible = _source_rows(ids_ptr + b * L, r, row_ok, K)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = d < D
    x_rows = (b * (K + 1) + src) * D
    vals = tl.load(x_ptr + x_rows[:, None] + d[None, :], mask=visible[:, None] & col_ok[None, :], other=0.0)
    token = tl.load(token_ptr + d, mask=col_ok, other=0.0).to(ACC)
    pos = tl.load(pos_ptr + r[:, None] * D + d[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    vals = tl.where(visible[:, None], vals.to(ACC), token[None, :]) + pos.to(ACC)
    out_rows = (b * (L + 1) + r) * D
    tl.store(out_ptr + out_rows[:, None] + d[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["K"])
def _unshuffle_bwd_kernel(grad_ptr, ids_ptr, grad_x_ptr, partial_ptr, K, L, D,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = d < D
    removed_sum = tl.zeros([BLOCK_D], ACC)
    for r0 in range(0, L + 1, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < L + 1
        dst, visible = _source_rows(ids_ptr + b * L, r, row_ok, K)
        grad_rows = (b * (L + 1) + r) * D
        g = tl.load(grad_ptr + grad_rows[:, None] + d[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x_rows = (b * (K + 1) + dst) * D
        tl.store(grad_x_ptr + x_rows[:, None] + d[None, :], g.to(grad_x_ptr.dtype.element_ty),
                 mask=visible[:, None] & col_ok[None, :])
        removed = row_ok & ~visible
        removed_sum += tl.sum(tl.where(removed[:, None], g.to(ACC), 0.0), axis=0)
    tl.store(partial_ptr + b * D + d, removed_sum, mask=col_ok)


def _acc(dtype):
    return tl.float64 if dtype.itemsize == 8 else tl.float32


def _block_d(D):
    return min(triton.next_power_of_2(D), MAX_BLOCK_D)


def decoder_unshuffle(x, ids_restore, mask_token, pos, out):
    B, L = ids_restore.shape
    D = x.shape[2]
    row_tiles = triton.cdiv(L + 1, BLOCK_R)
    block_d = _block_d(D)
    grid = (B * row_tiles, triton.cdiv(D, block_d))
    _unshuffle_fwd_kernel[grid](x, ids_restore, mask_token, pos, out, x.shape[1] - 1, L, D, row_tiles,
                                ACC=_acc(out.dtype), BLOCK_R=BLOCK_R, BLOCK_D=block_d)


def decoder_unshuffle_backward(grad, ids_restore, grad_x, partial):
    B, L = ids_restore.shape
    D = grad.shape[2]
    block_d = _block_d(D)
    grid = (B, triton.cdiv(D, block_d))
    _unshuffle_bwd_kernel[grid](grad, ids_restore, grad_x, partial, grad_x.shape[1] - 1, L, D,
                                ACC=_acc(partial.dtype), BLOCK_R=BLOCK_R, BLOCK_D=block_d)
