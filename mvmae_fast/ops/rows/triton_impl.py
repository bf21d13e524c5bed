"""Row gather and scatter in Triton.

The gather copies one row per program. The scatter gives each program a tile of output rows; it
finds which index (if any) points at each row by comparing the tile against the sample's indices,
then writes every row of the tile once: the source row or zeros. Indices are unique, so no atomics,
no zero-fill pass and no inverse-index tensor.

The kept count K is a runtime value that is not specialised on (``do_not_specialize``) and the
indices are scanned in fixed SCATTER_BLOCK_K blocks, so a new K never compiles a new kernel; block
sizes depend only on D. Indices may be int32 or int64.
"""

import triton
import triton.language as tl

SCATTER_BLOCK_L = 16
SCATTER_BLOCK_K = 64


@triton.jit(do_not_specialize=["K"])
def _gather_rows_kernel(x_ptr, ids_ptr, out_ptr, L, K, D, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // K
    src = x_ptr + (b * L + tl.load(ids_ptr + r).to(tl.int64)) * D
    dst = out_ptr + r * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        keep = d < D
        tl.store(dst + d, tl.load(src + d, mask=keep), mask=keep)


@triton.jit(do_not_specialize=["K"])
def _scatter_rows_kernel(y_ptr, ids_ptr, out_ptr, L, K, D, row_tiles,
                         BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // row_tiles).to(tl.int64)
    rows = (pid % row_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
    source = tl.full([BLOCK_L], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + b * K + k, mask=k < K, other=-1).to(tl.int32)
        hit = ids[None, :] == rows[:, None]
        source = tl.maximum(source, tl.max(tl.where(hit, k[None, :], -1), axis=1))
    found = source >= 0
    src_rows = (b * K + tl.maximum(source, 0)) * D
    dst_rows = (b * L + rows) * D
    row_ok = rows < L
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        col_ok = (d < D)[None, :]
        vals = tl.load(y_ptr + src_rows[:, None] + d[None, :], mask=found[:, None] & col_ok, other=0.0)
        tl.store(out_ptr + dst_rows[:, None] + d[None, :], vals, mask=row_ok[:, None] & col_ok)


def gather_rows(x, ids, out):
    B, L, D = x.shape
    K = ids.shape[1]
    _gather_rows_kernel[(B * K,)](x, ids, out, L, K, D, BLOCK_D=min(triton.next_power_of_2(D), 1024))


def scatter_rows(y, ids, out):
    B, K, D = y.shape
    L = out.shape[1]
    row_tiles = triton.cdiv(L, SCATTER_BLOCK_L)
    _scatter_rows_kernel[(B * row_tiles,)](
        y, ids, out, L, K, D, row_tiles, BLOCK_L=SCATTER_BLOCK_L,
        BLOCK_K=SCATTER_BLOCK_K, BLOCK_D=min(triton.next_power_of_2(D), 256))
