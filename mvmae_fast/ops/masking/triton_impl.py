"""Random masking in Triton: one program per (sample, block of patches). Each patch's rank in the
(key, index) order is counted against all patches in tiles, so ids_restore is written directly and
ids_keep by a scatter; no sort and no second pass. Keys as in reference.py."""

import triton
import triton.language as tl

BLOCK_I = 64
BLOCK_J = 64


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _keys(i, t0, t1):
    hi = _mix32(i ^ t0).to(tl.uint64)
    lo = (_mix32(i ^ t1) >> 1).to(tl.uint64)
    return (hi << 31) | lo


# The seed words are plain runtime values: specialising on them (e.g. a word equal to 1) would
# compile a new kernel for a new seed.
@triton.jit(do_not_specialize=["s0", "s1"])
def _random_masking_kernel(ids_keep_ptr, ids_restore_ptr, mask_ptr, L, K, s0, s1,
                           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    b32 = b.to(tl.uint32)
    t0 = _mix32(b32 ^ s0.to(tl.uint32))
    t1 = _mix32(b32 ^ s1.to(tl.uint32))
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_range = i < L
    key_i = _keys(i.to(tl.uint32), t0, t1)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        key_j = _keys(j.to(tl.uint32), t0, t1)
        before = (key_j[None, :] < key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        before = before & (j < L)[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    row = b.to(tl.int64) * L
    tl.store(ids_restore_ptr + row + i, rank.to(tl.int64), mask=in_range)
    tl.store(mask_ptr + row + i, (rank >= K).to(tl.float32), mask=in_range)
    tl.store(ids_keep_ptr + b.to(tl.int64) * K + rank, i.to(tl.int64), mask=in_range & (rank < K))


def random_masking(ids_keep, ids_restore, mask, batch, num_patches, keep, s0, s1):
    grid = (batch, triton.cdiv(num_patches, BLOCK_I))
    _random_masking_kernel[grid](ids_keep, ids_restore, mask, num_patches, keep, s0, s1,
                                 BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J)
