"""Visible-patch gather / scatter and table-row gather / sum in Triton.

``_gather_patches_kernel``: one program per kept patch (b, k) copies its p*p*C pixels straight from
the image, at any image strides, into the patchify layout (channel fastest). No patchified image.

``_scatter_patches_kernel`` (its adjoint, the image gradient): one program per image patch (b, l)
finds which k (if any) kept it by scanning the sample's indices in fixed blocks, then writes the
whole patch once, in image order: the gradient pixels or zeros. No zero-fill pass, no atomics.

``_table_rows_grad_kernel``: out[l] = sum over samples b of y[b, k] where ids[b, k] == l. Each
program owns a tile of table rows and columns for a chunk of TABLE_SAMPLES samples and finds each
sample's source row by scanning its indices; it sums in a fixed order in float32 (float64 for
float64), and a torch sum over the chunks finishes: deterministic, no atomics (indices are unique
within a sample), and enough programs to fill a GPU at batch 256.

K is a runtime value, never specialised on; every block size depends on p, C or D only.
"""

import triton
import triton.language as tl

MAX_BLOCK = 1024
BLOCK_K = 64
TABLE_BLOCK_L = 16
TABLE_SAMPLES = 16  # samples summed per program: enough programs at batch 256


@triton.jit(do_not_specialize=["K"])
def _gather_patches_kernel(img_ptr, ids_ptr, out_ptr, K, grid_w, s_b, s_c, s_h, s_w,
                           PATCH: tl.constexpr, CHANNELS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // K
    patch = tl.load(ids_ptr + r).to(tl.int64)
    i = patch // grid_w
    j = patch - i * grid_w
    src = img_ptr + b * s_b + i * PATCH * s_h + j * PATCH * s_w
    dst = out_ptr + r * (PATCH * PATCH * CHANNELS)
    for e0 in range(0, PATCH * PATCH * CHANNELS, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        keep = e < PATCH * PATCH * CHANNELS
        c = e % CHANNELS
        pixel = e // CHANNELS
        a = pixel // PATCH
        col = pixel % PATCH
        vals = tl.load(src + c * s_c + a * s_h + col * s_w, mask=keep)
        tl.store(dst + e, vals, mask=keep)


@triton.jit(do_not_specialize=["K"])
def _scatter_patches_kernel(patches_ptr, ids_ptr, img_ptr, K, L, grid_w, height, width,
                            PATCH: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // L).to(tl.int64)
    patch = pid % L
    source = tl.full([BLOCK_K], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + b * K + k, mask=k < K, other=-1)
        source = tl.maximum(source, tl.where(ids == patch, k, -1))
    k_src = tl.max(source, axis=0)
    readable = tl.where(k_src >= 0, PATCH * PATCH * CHANNELS, 0)  # 0 elements for a removed patch
    i = patch // grid_w
    j = patch - i * grid_w
    src = patches_ptr + (b * K + tl.maximum(k_src, 0)) * (PATCH * PATCH * CHANNELS)
    dst = img_ptr + b * CHANNELS * height * width + (i * PATCH) * width + j * PATCH
    for e0 in range(0, PATCH * PATCH * CHANNELS, BLOCK):
        e = e0 + tl.arange(0, BLOCK)  # image order: c, then pixel row a, then pixel column
        keep = e < PATCH * PATCH * CHANNELS
        c = e // (PATCH * PATCH)
        a = (e // PATCH) % PATCH
        col = e % PATCH
        vals = tl.load(src + (a * PATCH + col) * CHANNELS + c, mask=e < readable, other=0.0)
        tl.store(dst + c.to(tl.int64) * height * width + a * width + col, vals, mask=keep)


@triton.jit
def _gather_table_rows_kernel(table_ptr, ids_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    src = table_ptr + tl.load(ids_ptr + r).to(tl.int64) * D
    dst = out_ptr + r * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        keep = d < D
        tl.store(dst + d, tl.load(src + d, mask=keep), mask=keep)


@triton.jit(do_not_specialize=["B", "K"])
def _table_rows_grad_kernel(y_ptr, ids_ptr, partial_ptr, B, K, L, D, SAMPLES: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)
    col_ok = (d < D)[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], partial_ptr.dtype.element_ty)
    first = chunk * SAMPLES
    ids_b = ids_ptr + first.to(tl.int64) * K
    y_b = y_ptr + first.to(tl.int64) * K * D
    for _ in range(first, tl.minimum(first + SAMPLES, B)):
        source = tl.full([BLOCK_L], -1, tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ids = tl.load(ids_b + k, mask=k < K, other=-1)
            hit = ids[None, :] == rows[:, None]
            source = tl.maximum(source, tl.max(tl.where(hit, k[None, :], -1), axis=1))
        found = (source >= 0)[:, None]
        src = tl.maximum(source, 0).to(tl.int64) * D
        acc += tl.load(y_b + src[:, None] + d[None, :], mask=found & col_ok, other=0.0).to(acc.dtype)
        ids_b += K
        y_b += K * D
    dst = (chunk.to(tl.int64) * L + rows)[:, None] * D + d[None, :]
    tl.store(partial_ptr + dst, acc, mask=(rows < L)[:, None] & col_ok)


def _block(n):
    return min(triton.next_power_of_2(n), MAX_BLOCK)


def gather_visible_patches(imgs, ids, out, patch_size):
    B, C, H, W = imgs.shape
    K = ids.shape[1]
    _gather_patches_kernel[(B * K,)](imgs, ids, out, K, W // patch_size, *imgs.stride(),
                                     PATCH=patch_size, CHANNELS=C, BLOCK=_block(patch_size * patch_size * C))


def scatter_visible_patches(patches, ids, out, patch_size):
    B, C, H, W = out.shape
    K = ids.shape[1]
    L = (H // patch_size) * (W // patch_size)
    _scatter_patches_kernel[(B * L,)](patches, ids, out, K, L, W // patch_size, H, W, PATCH=patch_size,
                                      CHANNELS=C, BLOCK_K=BLOCK_K, BLOCK=_block(patch_size * patch_size * C))


def gather_table_rows(table, ids, out):
    D = table.shape[1]
    _gather_table_rows_kernel[(ids.numel(),)](table, ids, out, D, BLOCK_D=_block(D))


def scatter_add_table_rows(y, ids, partial):
    """Per-chunk sums into ``partial`` (cdiv(B, TABLE_SAMPLES), L, D) float32 (float64 for float64)."""
    B, K, D = y.shape
    L = partial.shape[1]
    block_d = min(triton.next_power_of_2(D), 128)
    grid = (triton.cdiv(L, TABLE_BLOCK_L), triton.cdiv(D, block_d), triton.cdiv(B, TABLE_SAMPLES))
    _table_rows_grad_kernel[grid](y, ids, partial, B, K, L, D, SAMPLES=TABLE_SAMPLES, BLOCK_L=TABLE_BLOCK_L,
                                  BLOCK_K=BLOCK_K, BLOCK_D=block_d)
