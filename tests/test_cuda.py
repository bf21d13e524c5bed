"""The same correctness checks as test_masking.py / test_rows.py, on CUDA tensors.

Skipped entirely without a CUDA GPU.

conftest.py sets TRITON_INTERPRET=1 (setdefault) for the CPU suite; with it set,
Triton kernels run in the interpreter even for CUDA tensors, i.e. the compiled
GPU kernels are NOT exercised and large cases take minutes.  Run this file as

    TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py

to test the real GPU kernels.  Under the interpreter the heavy Triton cases are
skipped (with a reason saying so); everything else still runs.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import mvmae_fast  # noqa: E402
from mvmae_fast import ops  # noqa: E402

from mvmae_helpers import (  # noqa: E402
    param_id,
    BACKENDS,
    assert_bitwise_equal,
    assert_masking_equal,
    check_gather,
    check_gather_grad,
    check_masking_result,
    check_roundtrip,
    check_scatter,
    check_scatter_grad,
    check_with_masking,
    kept_count_test,
    make_ids,
    make_noncontig,
    make_x,
    pair_test,
    rank_test,
    ref_gather,
    ref_scatter_index_put,
)

DEV = "cuda"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def skip_if_heavy_interpreted(backend, *sizes):
    """Triton under the interpreter is ~1000x slower: skip big cases (run with TRITON_INTERPRET=0)."""
    n = 1
    for s in sizes:
        n *= s
    if backend == "triton" and INTERPRETED and n > 200_000:
        pytest.skip("Triton is running in the interpreter (TRITON_INTERPRET=1); run with TRITON_INTERPRET=0")

SHAPES = [
    (2, 197, 49, 61),
    (3, 50, 1, 64),
    (2, 50, 50, 17),
    (1, 197, 196, 8),
    (2, 1, 1, 3),
    (8, 197, 49, 768),  # ViT-B
    (4, 197, 147, 1024),  # ViT-L, mask ratio 0.25 kept inverted
    (3, 1, 1, 4096),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDX_DTYPES = [torch.int32, torch.int64]
SEEDS = [0, 1, 2**40 + 3, 2**63 - 1]


def test_available_backends_cuda():
    avail = mvmae_fast.available_backends("cuda")
    assert set(avail) == set(BACKENDS), avail
    assert set(mvmae_fast.available_backends(torch.device("cuda", 0))) == set(BACKENDS)


# --------------------------------------------------------------------------- #
# random_masking
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,K", [(3, 197, 49), (2, 50, 1), (2, 50, 49), (1, 1, 1), (4, 16, 16), (256, 196, 49)])
def test_masking_invariants(backend, B, L, K):
    skip_if_heavy_interpreted(backend, B, L, 10)
    res = ops.random_masking(B, L, K, device=DEV, seed=B * 1000 + L * 10 + K, backend=backend)
    check_masking_result(res, B, L, K, device=DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_masking_cuda_bit_identical_to_cpu_torch(backend, seed):
    ref = ops.random_masking(5, 197, 49, device="cpu", seed=seed, backend="torch")
    out = ops.random_masking(5, 197, 49, device=DEV, seed=seed, backend=backend)
    for name in ("ids_keep", "ids_restore", "mask"):
        assert_bitwise_equal(getattr(out, name).cpu(), getattr(ref, name), f"{backend} cuda vs cpu torch {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_reproducible_and_seed_sensitive(backend):
    a = ops.random_masking(4, 197, 49, device=DEV, seed=5, backend=backend)
    b = ops.random_masking(4, 197, 49, device=DEV, seed=5, backend=backend)
    c = ops.random_masking(4, 197, 49, device=DEV, seed=6, backend=backend)
    assert_masking_equal(a, b)
    assert not torch.equal(a.ids_keep, c.ids_keep)
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    assert_masking_equal(
        ops.random_masking(4, 50, 12, device=DEV, generator=g1, backend=backend),
        ops.random_masking(4, 50, 12, device=DEV, generator=g2, backend=backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_uniformity(backend):
    skip_if_heavy_interpreted(backend, 4000, 49, 12)
    res = ops.random_masking(4000, 49, 12, device=DEV, seed=20240601, backend=backend)
    for name, (stat, df, p) in (
        ("kept", kept_count_test(res.ids_keep, 49)),
        ("rank", rank_test(res.ids_keep, 49)),
    ):
        assert p > 1e-4, f"{name}: chi2={stat:.1f} df={df} p={p:.3g}"
    res = ops.random_masking(40000, 8, 3, device=DEV, seed=4242, backend=backend)
    stat, df, p = pair_test(res.ids_keep, 8)
    assert p > 1e-4, f"pairs: chi2={stat:.1f} df={df} p={p:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_opcheck(backend):
    torch.library.opcheck(
        torch.ops.mvmae_fast.random_masking.default, (2, 50, 12, 123, torch.device(DEV), backend)
    )


# --------------------------------------------------------------------------- #
# gather / scatter
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather(backend, dtype, idx_dtype, shape):
    skip_if_heavy_interpreted(backend, *shape[:1], *shape[2:])
    check_gather(backend, dtype, idx_dtype, *shape, device=DEV)


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter(backend, dtype, idx_dtype, shape):
    skip_if_heavy_interpreted(backend, shape[0], shape[1], shape[3])
    check_scatter(backend, dtype, idx_dtype, *shape, device=DEV)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_check_indices_false(backend):
    skip_if_heavy_interpreted(backend, 8, 197, 49, 768)
    check_gather(backend, torch.float64, torch.int64, 2, 33, 7, 129, device=DEV)
    check_scatter(backend, torch.float64, torch.int32, 2, 33, 7, 129, device=DEV)
    check_gather(backend, torch.float32, torch.int64, 8, 197, 49, 768, device=DEV, check_indices=False)
    check_scatter(backend, torch.float32, torch.int64, 8, 197, 49, 768, device=DEV, check_indices=False)


@pytest.mark.parametrize("shape", [(2, 50, 12, 16), (8, 197, 49, 768)], ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(backend, idx_dtype, dtype, shape):
    skip_if_heavy_interpreted(backend, *shape)
    check_gather_grad(backend, dtype, idx_dtype, *shape, device=DEV)
    check_scatter_grad(backend, dtype, idx_dtype, *shape, device=DEV)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x = make_x((2, 6, 3), torch.float64, DEV).requires_grad_()
    y = make_x((2, 4, 3), torch.float64, DEV).requires_grad_()
    ids = make_ids(2, 6, 4, device=DEV, seed=9)
    assert torch.autograd.gradcheck(lambda t: ops.gather_rows(t, ids, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.scatter_rows(t, ids, 6, backend=backend), (y,))


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_roundtrip_and_masking(backend, dtype):
    skip_if_heavy_interpreted(backend, 8, 197, 49, 768)
    check_roundtrip(backend, dtype, 8, 197, 49, 768, device=DEV)
    check_with_masking(backend, dtype, 8, 197, 49, 768, device=DEV, seed=3)
    check_with_masking(backend, dtype, 2, 16, 16, 8, device=DEV, seed=4)


@pytest.mark.parametrize("kind", ["transposed", "last_dim_strided", "rows_strided", "batch_strided", "expanded_batch", "offset"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend, kind):
    B, L, K, D = 4, 197, 49, 96
    x = make_noncontig(make_x((B, L, D), torch.float16, DEV), kind)
    y = make_noncontig(make_x((B, K, D), torch.float16, DEV), kind)
    ids = make_noncontig(make_ids(B, L, K, device=DEV), "transposed" if kind != "expanded_batch" else kind)
    assert_bitwise_equal(ops.gather_rows(x, ids, backend=backend), ref_gather(x.contiguous(), ids.contiguous()))
    assert_bitwise_equal(
        ops.scatter_rows(y, ids, L, backend=backend), ref_scatter_index_put(y.contiguous(), ids.contiguous(), L)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_indices_detected_on_cuda(backend):
    x = make_x((2, 10, 4), torch.float32, DEV)
    for bad in ([[1, 4, 10], [0, 9, 2]], [[1, -1, 7], [0, 9, 2]], [[1, 4, 1], [0, 9, 2]]):
        ids = torch.tensor(bad, device=DEV)
        with pytest.raises(ValueError, match=r"\bids\b"):
            ops.gather_rows(x, ids, backend=backend)
        with pytest.raises(ValueError, match=r"\bids\b"):
            ops.scatter_rows(x[:, :3], ids, 10, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_devices_rejected(backend):
    x = make_x((2, 10, 4), torch.float32, DEV)
    ids = torch.tensor([[1, 4, 7], [0, 9, 2]])  # on CPU
    with pytest.raises((ValueError, TypeError), match=r"\bids\b"):
        ops.gather_rows(x, ids, backend=backend)
    with pytest.raises((ValueError, TypeError), match=r"\bids\b"):
        ops.scatter_rows(x[:, :3], ids, 10, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_rows(backend):
    x = make_x((2, 12, 8), torch.float32, DEV).requires_grad_()
    y = make_x((2, 5, 8), torch.float32, DEV).requires_grad_()
    ids = make_ids(2, 12, 5, device=DEV)
    torch.library.opcheck(torch.ops.mvmae_fast.gather_rows.default, (x, ids, True, backend))
    torch.library.opcheck(torch.ops.mvmae_fast.scatter_rows.default, (y, ids, 12, True, backend))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_torch_compile_fullgraph(backend):
    skip_if_heavy_interpreted(backend, 8, 197, 49, 256)
    torch._dynamo.reset()
    B, L, K, D = 8, 197, 49, 256
    ids = make_ids(B, L, K, device=DEV, seed=12)
    w = make_x((B, K, D), torch.float32, DEV, seed=13)

    def f(x, ids, w):
        return (ops.gather_rows(x, ids, backend=backend) * w).sum()

    x_eager = make_x((B, L, D), torch.float32, DEV).requires_grad_()
    x_comp = x_eager.detach().clone().requires_grad_()
    f(x_eager, ids, w).backward()
    torch.compile(f, fullgraph=True)(x_comp, ids, w).backward()
    assert_bitwise_equal(x_comp.grad, x_eager.grad, "compiled x.grad")
    assert_bitwise_equal(x_eager.grad, ref_scatter_index_put(w, ids, L), "eager x.grad")
