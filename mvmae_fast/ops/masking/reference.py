"""Random masking in plain PyTorch: the spec the other backends match bit for bit.

Patch i of sample b gets the 63-bit key ``hi << 31 | lo`` with
``hi = mix32(i ^ mix32(b ^ s0))`` and ``lo = mix32(i ^ mix32(b ^ s1)) >> 1``, where ``mix32`` is the
lowbias32 integer hash and ``s0, s1`` come from the seed (:func:`seed_words`). Sorting the patches by
(key, i) gives a uniformly random permutation ``shuffle``; the first ``keep`` entries are kept.
Keys are hashed rather than drawn from a stateful generator so that every backend and device
produces the same mask for the same seed.
"""

import torch

_MASK32 = 0xFFFFFFFF


def mix32_int(x):
    """lowbias32 on a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def seed_words(seed):
    """The two 32-bit words every backend derives the keys from."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    return mix32_int(lo ^ mix32_int(hi ^ 0x9E3779B9)), mix32_int(lo ^ mix32_int(hi ^ 0x7F4A7C15))


def _mulmod32(x, c):
    # x * c mod 2**32 on int64 tensors holding uint32 values, split so no product overflows int64.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def masking_keys(batch, num_patches, s0, s1, device):
    b = torch.arange(batch, dtype=torch.int64, device=device).unsqueeze(1)
    i = torch.arange(num_patches, dtype=torch.int64, device=device).unsqueeze(0)
    hi = _mix32(i ^ _mix32(b ^ s0))
    lo = _mix32(i ^ _mix32(b ^ s1)) >> 1
    return (hi << 31) | lo


def invert_permutation(perm):
    """Row-wise inverse of a batch of permutations (B, L), by a scatter (O(L), no second sort)."""
    positions = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, positions)


def split_shuffle(shuffle, keep):
    """(ids_keep, ids_restore, mask) from a per-sample patch order whose first ``keep`` are kept."""
    ids_restore = invert_permutation(shuffle)
    return shuffle[:, :keep].contiguous(), ids_restore, (ids_restore >= keep).to(torch.float32)


def random_masking(batch, num_patches, keep, s0, s1, device):
    keys = masking_keys(batch, num_patches, s0, s1, device)
    return split_shuffle(torch.argsort(keys, dim=1, stable=True), keep)
