"""Per-op benchmarks: our backends against the reference MAE's way of doing the same work.

The reference gathers rows with ``torch.gather`` and an index ``.repeat``-ed to (B, K, D) (as the
official MAE code does), its backward is autograd's zero-fill plus scatter-add, and its masking is
noise + argsort + argsort. GB/s counts the bytes an ideal kernel reads and writes.
"""

import torch

from conftest import SIZE
from mvmae_fast import ops

# (B, L, K, D): MAE ViT-B (75% mask) on CUDA; a CPU-sized batch; tiny for CI.
SHAPES = {"cuda": (256, 196, 49, 768), "cpu": (64, 196, 49, 384)}
TINY = (2, 16, 4, 8)


def shape_for(device):
    return TINY if SIZE == "tiny" else SHAPES[device.type]


def mae_gather(x, ids):
    return torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, x.shape[2]))


def inputs(device, dtype=torch.float32):
    B, L, K, D = shape_for(device)
    x = torch.randn(B, L, D, device=device, dtype=dtype)
    ids = ops.random_masking(B, L, K, device=device, seed=0).ids_keep
    return x, ids


def test_gather_rows(timed, device, provider):
    x, ids = inputs(device)
    if provider == "reference":
        fn = lambda: mae_gather(x, ids)
    else:
        fn = lambda: ops.gather_rows(x, ids, check_indices=False, backend=provider)
    out = timed(fn, bytes_moved=2 * ids.numel() * x.shape[2] * x.element_size())
    assert torch.equal(out, mae_gather(x, ids))


def test_gather_rows_backward(timed, device, provider):
    x, ids = inputs(device)
    grad = torch.randn(ids.shape[0], ids.shape[1], x.shape[2], device=device)
    if provider == "reference":
        x.requires_grad_(True)
        out = mae_gather(x, ids)
        fn = lambda: torch.autograd.grad(out, x, grad, retain_graph=True)[0]
    else:
        fn = lambda: ops.scatter_rows(grad, ids, x.shape[1], check_indices=False, backend=provider)
    result = timed(fn, bytes_moved=(ids.numel() + x.shape[0] * x.shape[1]) * x.shape[2] * x.element_size())
    expected = torch.zeros_like(x).scatter_(1, ids.unsqueeze(-1).expand_as(grad), grad)
    assert torch.equal(result, expected)


def test_random_masking(timed, device, provider):
    B, L, K, _ = shape_for(device)
    if provider == "reference":
        def fn():
            noise = torch.rand(B, L, device=device)
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            mask = torch.ones(B, L, device=device)
            mask[:, :K] = 0
            return ids_shuffle[:, :K], ids_restore, torch.gather(mask, 1, ids_restore)
    else:
        fn = lambda: ops.random_masking(B, L, K, device=device, seed=1, backend=provider)
    ids_keep, ids_restore, mask = timed(fn)
    assert int(mask.sum()) == B * (L - K)
