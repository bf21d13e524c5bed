"""``random_masking``: a uniformly random subset of ``keep`` patches per sample, MAE-style.

Returns ``ids_keep`` (B, K), the kept patch indices in random order; ``ids_restore`` (B, L), the
inverse permutation (``ids_restore[b, ids_keep[b, r]] == r``; removed patches map to [K, L)); and
``mask`` (B, L) float32, 1 for removed patches. The result is a pure function of the seed, identical
on every backend and device (see reference.py for the exact definition).
"""

from typing import NamedTuple

import torch

from ... import _ext, backends
from ..._utils import check_int, cuda_stream, device_guard, direct_kernel_calls, new_output
from . import reference

_SEED_LIMIT = 2**63


class MaskingResult(NamedTuple):
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def _check_sizes(batch, num_patches, keep):
    check_int("batch", batch, minimum=1)
    check_int("num_patches", num_patches, minimum=1, maximum=2**31 - 1)
    check_int("keep", keep, minimum=1)
    if keep > num_patches:
        raise ValueError(f"keep must be <= num_patches ({num_patches}), got {keep}")


@torch.library.custom_op("mvmae_fast::random_masking", mutates_args=())
def _random_masking_op(batch: int, num_patches: int, keep: int, seed: int, device: torch.device,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _random_masking(batch, num_patches, keep, seed, device, backend)


def _random_masking(batch, num_patches, keep, seed, device, backend):
    """The op's body; eager CPU calls run it directly (the custom op's dispatch costs ~50 us)."""
    _check_sizes(batch, num_patches, keep)
    check_int("seed", seed, minimum=0)
    name = backends.select_backend("random_masking", device, backend)
    s0, s1 = reference.seed_words(seed)
    if name == "torch":
        return reference.random_masking(batch, num_patches, keep, s0, s1, device)
    ids_keep = new_output((batch, keep), torch.int64, device)
    ids_restore = new_output((batch, num_patches), torch.int64, device)
    mask = new_output((batch, num_patches), torch.float32, device)
    if name == "triton":
        from . import triton_impl

        with device_guard(device):
            triton_impl.random_masking(ids_keep, ids_restore, mask, batch, num_patches, keep, s0, s1)
    elif device.type == "cuda":
        with device_guard(device):
            _ext._C.random_masking_cuda(ids_keep.data_ptr(), ids_restore.data_ptr(), mask.data_ptr(),
                                        batch, num_patches, keep, s0, s1, cuda_stream(device))
    else:
        _ext._C.random_masking_cpu(ids_keep.data_ptr(), ids_restore.data_ptr(), mask.data_ptr(),
                                   batch, num_patches, keep, s0, s1, torch.get_num_threads())
    return ids_keep, ids_restore, mask


@_random_masking_op.register_fake
def _(batch, num_patches, keep, seed, device, backend):
    return (torch.empty(batch, keep, dtype=torch.int64, device=device),
            torch.empty(batch, num_patches, dtype=torch.int64, device=device),
            torch.empty(batch, num_patches, dtype=torch.float32, device=device))


def resolve_seed(seed=None, generator=None):
    """An explicit seed, one drawn from ``generator``, or one drawn from torch's global RNG."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        check_int("seed", seed, minimum=0, maximum=_SEED_LIMIT - 1)
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _SEED_LIMIT - 1, (), generator=generator, device=device))


def random_masking(batch, num_patches, keep, *, device="cpu", seed=None, generator=None, backend=None):
    """Draw a random mask keeping ``keep`` of ``num_patches`` patches in each of ``batch`` samples.

    ``seed`` (an int in [0, 2**63)) fixes the result exactly, on every backend; else a seed is drawn
    from ``generator`` or from torch's global RNG. Under ``torch.compile`` pass ``seed``.
    """
    _check_sizes(batch, num_patches, keep)
    seed = resolve_seed(seed, generator)
    device = torch.device(device)
    if device.type == "cpu" and direct_kernel_calls():
        return MaskingResult(*_random_masking(batch, num_patches, keep, seed, device, backend or ""))
    return MaskingResult(*_random_masking_op(batch, num_patches, keep, seed, device, backend or ""))


def masking_from_noise(noise, keep):
    """The official MAE masking from per-patch ``noise`` (B, L): keep the ``keep`` smallest.

    Lets a run be reproduced exactly against another implementation that draws the same noise.
    """
    if not isinstance(noise, torch.Tensor) or noise.dim() != 2 or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point (B, L) tensor, got {getattr(noise, 'shape', type(noise))}")
    check_int("keep", keep, minimum=1, maximum=noise.shape[1])
    return MaskingResult(*reference.split_shuffle(torch.argsort(noise, dim=1), keep))
