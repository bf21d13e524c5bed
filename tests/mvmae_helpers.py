"""Shared helpers for the mvmae_fast test-suite.

Everything in here is an *independent* re-implementation of the semantics in the
spec (no code from mvmae_fast is used), so that the tests can compare against it.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import subprocess
import sys

import torch

BACKENDS = ("torch", "cpp", "triton")

# --------------------------------------------------------------------------- #
# exact comparisons
# --------------------------------------------------------------------------- #
_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Exact (bit-for-bit) equality, including shape, dtype and device.

    gather/scatter are pure copies, so nothing but bit-identity is acceptable;
    NaN "poison" left in an unwritten element is reported as a mismatch.
    """
    prefix = f"{what}: " if what else ""
    assert isinstance(actual, torch.Tensor), f"{prefix}expected a Tensor, got {type(actual)}"
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{prefix}dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{prefix}device {actual.device} != {expected.device}"
    if actual.dtype in _INT_VIEW:
        a = actual.detach().view(_INT_VIEW[actual.dtype])
        e = expected.detach().view(_INT_VIEW[expected.dtype])
    else:
        a, e = actual.detach(), expected.detach()
    bad = a != e
    if bool(bad.any()):
        idx = bad.nonzero()
        first = tuple(idx[0].tolist())
        raise AssertionError(
            f"{prefix}{int(bad.sum())} of {bad.numel()} elements differ (bitwise); "
            f"first at {first}: actual={actual[first].item()!r} expected={expected[first].item()!r}; "
            f"actual has {int(torch.isnan(actual.float()).sum()) if actual.is_floating_point() else 0} NaNs"
        )


# --------------------------------------------------------------------------- #
# references for gather / scatter
# --------------------------------------------------------------------------- #
def ref_gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    bidx = torch.arange(B, device=x.device)[:, None]
    return x.detach()[bidx, ids.long()].clone()


def ref_scatter(y: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    B, K, D = y.shape
    out = torch.zeros(B, num_rows, D, dtype=y.dtype, device=y.device)
    ids_l = ids.long().cpu()
    yd = y.detach()
    for b in range(B):
        for k in range(K):
            out[b, int(ids_l[b, k])] = yd[b, k]
    return out


def make_ids(B: int, L: int, K: int, dtype=torch.int64, device="cpu", seed: int = 0) -> torch.Tensor:
    """Random ids (B, K), values in [0, L), unique within each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(B, L, generator=g).argsort(dim=1)[:, :K]
    return ids.to(dtype=dtype, device=device).contiguous()


def make_x(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # use a varied distribution so that any mixing of rows is visible
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3.0
    return x.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- #
# masking checker
# --------------------------------------------------------------------------- #
def check_masking_result(res, B: int, L: int, K: int, device="cpu") -> None:
    """Independent checker of every invariant of ops.random_masking."""
    ids_keep, ids_restore, mask = res[0], res[1], res[2]
    # named-tuple access must agree with positional access
    assert res.ids_keep is ids_keep and res.ids_restore is ids_restore and res.mask is mask
    device = torch.device(device)
    for name, t, shape, dtype in (
        ("ids_keep", ids_keep, (B, K), torch.int64),
        ("ids_restore", ids_restore, (B, L), torch.int64),
        ("mask", mask, (B, L), torch.float32),
    ):
        assert tuple(t.shape) == shape, f"{name}.shape {tuple(t.shape)} != {shape}"
        assert t.dtype == dtype, f"{name}.dtype {t.dtype} != {dtype}"
        assert t.device.type == device.type, f"{name}.device {t.device} != {device}"
    ids_keep, ids_restore, mask = ids_keep.cpu(), ids_restore.cpu(), mask.cpu()
    ar = torch.arange(L).expand(B, L)

    # ids_restore is a permutation of range(L) in every row
    assert bool(((ids_restore >= 0) & (ids_restore < L)).all()), "ids_restore out of [0, L)"
    assert torch.equal(ids_restore.sort(dim=1).values, ar), "ids_restore rows are not permutations"
    # shuffle = inverse of ids_restore; ids_keep must be its first K entries
    shuffle = torch.empty_like(ids_restore)
    shuffle.scatter_(1, ids_restore, ar.contiguous())
    assert torch.equal(shuffle.gather(1, ids_restore), ar), "inverse permutation mismatch"
    assert bool(((ids_keep >= 0) & (ids_keep < L)).all()), "ids_keep out of [0, L)"
    assert torch.equal(ids_keep, shuffle[:, :K]), "ids_keep != first K entries of the shuffle (inverse of ids_restore)"
    # ids_keep unique per row
    if K > 1:
        s = ids_keep.sort(dim=1).values
        assert bool((s[:, 1:] != s[:, :-1]).all()), "duplicate entries in an ids_keep row"
    # ids_restore[b, ids_keep[b, r]] == r
    assert torch.equal(ids_restore.gather(1, ids_keep), torch.arange(K).expand(B, K)), (
        "ids_restore[b, ids_keep[b, r]] != r"
    )
    # removed patches have ids_restore in [K, L)
    kept = torch.zeros(B, L, dtype=torch.bool)
    kept.scatter_(1, ids_keep, True)
    assert bool((ids_restore[~kept] >= K).all()), "a removed patch has ids_restore < K"
    # mask: exactly 0/1, 1 where removed
    assert bool(((mask == 0) | (mask == 1)).all()), "mask values are not exactly 0.0/1.0"
    assert torch.equal(mask, (ids_restore >= K).to(torch.float32)), "mask != (ids_restore >= K)"
    assert torch.equal(mask, (~kept).to(torch.float32)), "mask inconsistent with ids_keep"
    assert torch.equal(mask.sum(dim=1), torch.full((B,), float(L - K))), "mask row sums != L - K"


def assert_masking_equal(a, b, what: str = "") -> None:
    for name in ("ids_keep", "ids_restore", "mask"):
        assert_bitwise_equal(getattr(a, name), getattr(b, name), f"{what} {name}".strip())


# --------------------------------------------------------------------------- #
# chi-square machinery
# --------------------------------------------------------------------------- #
def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail P(chi2_df >= stat) = Q(df/2, stat/2)."""
    return float(
        torch.special.gammaincc(
            torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0, dtype=torch.float64)
        )
    )


def kept_count_test(ids_keep: torch.Tensor, L: int):
    """Are all patches kept equally often?

    Counts c_i = #samples keeping patch i.  For a uniform K-subset per sample the
    exact covariance of the count vector is B p (1-p) L/(L-1) (I - J/L) with
    p = K/L, so  T = sum_i (c_i - B p)^2 / (B p (1-p) L/(L-1))  ~ chi2(L-1).
    (= Pearson's statistic times (L-1)/(L-K); the plain Pearson statistic would be
    conservative because per-sample draws are without replacement.)
    Returns (stat, df, p_value).
    """
    B, K = ids_keep.shape
    assert 0 < K < L
    counts = torch.bincount(ids_keep.reshape(-1).cpu(), minlength=L).to(torch.float64)
    p = K / L
    var = B * p * (1 - p) * L / (L - 1)
    stat = float(((counts - B * p) ** 2).sum() / var)
    df = L - 1
    return stat, df, chi2_pvalue(stat, df)


def rank_table(ids_keep: torch.Tensor, L: int) -> torch.Tensor:
    """C[i, r] = #samples with ids_keep[b, r] == i   (shape (L, K))."""
    B, K = ids_keep.shape
    flat = ids_keep.cpu() * K + torch.arange(K)
    return torch.bincount(flat.reshape(-1), minlength=L * K).reshape(L, K).to(torch.float64)


def rank_test(ids_keep: torch.Tensor, L: int):
    """Is the order inside ids_keep uniformly random (independently of which patches)?

    With D = C - B/L (C from rank_table) and m_i = mean_r D[i, r], the exact
    covariance of C (a Kronecker product (I - J/L) x M) gives the statistic
        T = (L-1) * ||D - m 1^T||^2 / B  ~ chi2((L-1)(K-1))
    for the "rank given patch" part (the remaining part is kept_count_test).
    Rejects e.g. a sampler that returns the kept ids sorted.
    """
    B, K = ids_keep.shape
    assert 2 <= K <= L
    C = rank_table(ids_keep, L)
    D = C - B / L
    m = D.mean(dim=1, keepdim=True)
    stat = float((L - 1) * ((D - m) ** 2).sum() / B)
    df = (L - 1) * (K - 1)
    return stat, df, chi2_pvalue(stat, df)


def rank_of_patch_test(ids_keep: torch.Tensor, patch: int):
    """For one fixed patch: its rank r in ids_keep (when kept) is uniform on [0, K).

    Plain Pearson chi-square over K bins (the ranks of different samples are iid).
    """
    B, K = ids_keep.shape
    hit = ids_keep.cpu() == patch
    ranks = hit.nonzero()[:, 1]
    n = ranks.numel()
    assert n > 5 * K, "too few samples for the rank test"
    counts = torch.bincount(ranks, minlength=K).to(torch.float64)
    stat = float(((counts - n / K) ** 2).sum() / (n / K))
    df = K - 1
    return stat, df, chi2_pvalue(stat, df)


def _subset_features_pairs(kept: torch.Tensor, pairs) -> torch.Tensor:
    """kept (N, L) bool -> (N, P) float64 co-kept indicators for each pair."""
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    return (kept[:, i] & kept[:, j]).to(torch.float64)


def pair_test(ids_keep: torch.Tensor, L: int):
    """Is every pair {i, j} co-kept equally often?

    Uses the exact mean/covariance of the pair-indicator vector under a uniform
    K-subset (computed by enumerating all C(L, K) subsets, so L must be small) and
    the Mahalanobis statistic  T = B (f - mu)^T Sigma^+ (f - mu) ~ chi2(rank Sigma).
    Rejects e.g. "keep a random cyclic window", whose single-patch marginals are
    uniform.
    """
    B, K = ids_keep.shape
    assert math.comb(L, K) <= 20000, "pair_test enumerates all subsets; keep L small"
    pairs = list(itertools.combinations(range(L), 2))
    subsets = torch.tensor(list(itertools.combinations(range(L), K)))
    all_kept = torch.zeros(len(subsets), L, dtype=torch.bool)
    all_kept.scatter_(1, subsets, True)
    F = _subset_features_pairs(all_kept, pairs)
    mu = F.mean(0)
    Fc = F - mu
    sigma = Fc.T @ Fc / F.shape[0]
    evals, evecs = torch.linalg.eigh(sigma)
    keep = evals > 1e-10 * evals.max()
    df = int(keep.sum())

    kept = torch.zeros(B, L, dtype=torch.bool)
    kept.scatter_(1, ids_keep.cpu(), True)
    fbar = _subset_features_pairs(kept, pairs).mean(0)
    z = evecs[:, keep].T @ (fbar - mu)
    stat = float(B * (z * z / evals[keep]).sum())
    return stat, df, chi2_pvalue(stat, df)


# --------------------------------------------------------------------------- #
# (deliberately good and bad) reference samplers, returning ids_keep (B, K)
# --------------------------------------------------------------------------- #
def sampler_mae_reference(B, L, K, seed):
    """The official MAE way: argsort of uniform noise.  Correct."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, L, generator=g).argsort(dim=1)[:, :K]


def sampler_first_k(B, L, K, seed):
    """Always keep the first K patches.  Maximally biased."""
    return torch.arange(K).expand(B, K).clone()


def sampler_weighted(B, L, K, seed, heavy=5, weight=1.25):
    """The first `heavy` patches are `weight` times as likely to be drawn."""
    g = torch.Generator().manual_seed(seed)
    w = torch.ones(B, L, dtype=torch.float64)
    w[:, :heavy] = weight
    return torch.multinomial(w, K, replacement=False, generator=g)


def sampler_sorted(B, L, K, seed):
    """A uniform subset, but returned sorted (order is not random)."""
    return sampler_mae_reference(B, L, K, seed).sort(dim=1).values


def sampler_cyclic_window(B, L, K, seed):
    """Keep K consecutive patches (mod L) at a uniform offset, in random order.

    Single-patch marginals and ranks are uniform; pairs are not.
    """
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, L, (B, 1), generator=g)
    win = (start + torch.arange(K)) % L
    perm = torch.rand(B, K, generator=g).argsort(dim=1)
    return win.gather(1, perm)


# --------------------------------------------------------------------------- #
# subprocess helpers
# --------------------------------------------------------------------------- #
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env_remove=(), env_set=None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k in env_remove:
        env.pop(k, None)
    if env_set:
        env.update(env_set)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def isa_probe(isa: str, expression: str) -> str:
    """What ``expression`` (with mvmae_fast's ``_ext`` imported) prints in a fresh process under
    MVMAE_FAST_CPU_ISA=isa, which the extension reads once per process."""
    env = {**os.environ, "MVMAE_FAST_CPU_ISA": isa}
    probe = subprocess.run([sys.executable, "-c", f"from mvmae_fast import _ext; print({expression})"], env=env,
                           capture_output=True, text=True, check=True)
    return probe.stdout.strip()


def rerun_tests_under_isa(isa: str, test_file: str, selection: str) -> None:
    """Runs ``pytest test_file -k selection`` in a fresh process under MVMAE_FAST_CPU_ISA=isa and
    asserts that it passed (and ran something)."""
    env = {**os.environ, "MVMAE_FAST_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider", "-k",
                             selection], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


_DIST_INFO_NCE_WORKER = """
import sys, torch, torch.distributed as dist
from mvmae_fast.ops.info_nce import info_nce
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
n, d, temperature, backend = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), sys.argv[8] or None
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
z1 = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
z2 = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
b = n // world
a1 = z1[rank * b:(rank + 1) * b].clone().requires_grad_()
a2 = z2[rank * b:(rank + 1) * b].clone().requires_grad_()
loss = info_nce(a1, a2, temperature, backend=backend)
loss.backward()
mean_loss = loss.detach().clone()
dist.all_reduce(mean_loss)
torch.save({"loss": loss.detach(), "mean_loss": mean_loss / world, "g1": a1.grad, "g2": a2.grad},
           f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def run_distributed_info_nce(tmp_path, n, d, temperature, backend=None, world=2):
    """``info_nce`` on ``world`` gloo processes, rank r holding rows [r*n/world, (r+1)*n/world) of two
    seeded, normalised (n, d) batches. Returns (per-rank dicts with the local loss, the ranks' mean
    loss and the local gradients; z1; z2), z1 and z2 being the whole batches as leaf tensors."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_DIST_INFO_NCE_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    args = [str(world), str(port), str(tmp_path), str(n), str(d), str(temperature), backend or ""]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), *args], env=env) for r in range(world)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    g = torch.Generator().manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)], z1, z2


# --------------------------------------------------------------------------- #
# op-level checks shared by test_rows.py and test_cuda.py
# --------------------------------------------------------------------------- #
def ref_scatter_index_put(y: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    B, K, D = y.shape
    out = torch.zeros(B, num_rows, D, dtype=y.dtype, device=y.device)
    out[torch.arange(B, device=y.device)[:, None], ids.long()] = y.detach()
    return out


def check_gather(backend, dtype, idx_dtype, B, L, K, D, device="cpu", seed=0, check_indices=True):
    from mvmae_fast import ops

    x = make_x((B, L, D), dtype, device, seed)
    ids = make_ids(B, L, K, idx_dtype, device, seed + 1)
    x0, ids0 = x.clone(), ids.clone()
    out = ops.gather_rows(x, ids, check_indices=check_indices, backend=backend)
    assert_bitwise_equal(out, ref_gather(x, ids), f"gather_rows[{backend}]")
    assert_bitwise_equal(x, x0, "gather_rows modified x")
    assert torch.equal(ids, ids0), "gather_rows modified ids"
    return out


def check_scatter(backend, dtype, idx_dtype, B, L, K, D, device="cpu", seed=0, check_indices=True):
    from mvmae_fast import ops

    y = make_x((B, K, D), dtype, device, seed)
    ids = make_ids(B, L, K, idx_dtype, device, seed + 1)
    y0, ids0 = y.clone(), ids.clone()
    out = ops.scatter_rows(y, ids, L, check_indices=check_indices, backend=backend)
    expected = ref_scatter_index_put(y, ids, L)
    if device == "cpu" and B * K <= 4096:
        # cross-check the two independent references against each other
        assert torch.equal(expected, ref_scatter(y, ids, L))
    assert_bitwise_equal(out, expected, f"scatter_rows[{backend}]")
    assert_bitwise_equal(y, y0, "scatter_rows modified y")
    assert torch.equal(ids, ids0), "scatter_rows modified ids"
    return out


def check_gather_grad(backend, dtype, idx_dtype, B, L, K, D, device="cpu", seed=0):
    from mvmae_fast import ops

    x = make_x((B, L, D), dtype, device, seed).requires_grad_()
    ids = make_ids(B, L, K, idx_dtype, device, seed + 1)
    g = make_x((B, K, D), dtype, device, seed + 2)
    out = ops.gather_rows(x, ids, backend=backend)
    assert out.requires_grad and out.grad_fn is not None, "gather_rows output is not differentiable"
    out.backward(g)
    assert_bitwise_equal(x.grad, ref_scatter_index_put(g, ids, L), f"gather_rows[{backend}] x.grad")


def check_scatter_grad(backend, dtype, idx_dtype, B, L, K, D, device="cpu", seed=0):
    from mvmae_fast import ops

    y = make_x((B, K, D), dtype, device, seed).requires_grad_()
    ids = make_ids(B, L, K, idx_dtype, device, seed + 1)
    g = make_x((B, L, D), dtype, device, seed + 2)
    out = ops.scatter_rows(y, ids, L, backend=backend)
    assert out.requires_grad and out.grad_fn is not None, "scatter_rows output is not differentiable"
    out.backward(g)
    assert_bitwise_equal(y.grad, ref_gather(g, ids), f"scatter_rows[{backend}] y.grad")


def check_roundtrip(backend, dtype, B, L, K, D, device="cpu", seed=0):
    from mvmae_fast import ops

    x = make_x((B, L, D), dtype, device, seed)
    ids = make_ids(B, L, K, torch.int64, device, seed + 1)
    back = ops.scatter_rows(ops.gather_rows(x, ids, backend=backend), ids, L, backend=backend)
    kept = torch.zeros(B, L, 1, dtype=torch.bool, device=device)
    kept[torch.arange(B, device=device)[:, None], ids] = True
    assert_bitwise_equal(back, torch.where(kept, x, torch.zeros_like(x)), f"roundtrip[{backend}]")


def check_with_masking(backend, dtype, B, L, K, D, device="cpu", seed=0):
    """Use random_masking's ids with gather/scatter and compare to the official MAE code."""
    from mvmae_fast import ops

    res = ops.random_masking(B, L, K, device=device, seed=seed, backend=backend)
    x = make_x((B, L, D), dtype, device, seed)
    # MAE: x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    x_masked_ref = torch.gather(x, 1, res.ids_keep.unsqueeze(-1).repeat(1, 1, D))
    x_masked = ops.gather_rows(x, res.ids_keep, backend=backend)
    assert_bitwise_equal(x_masked, x_masked_ref, f"gather_rows[{backend}] with ids_keep")
    # MAE decoder: x_ = cat([x, mask_tokens]); x_ = torch.gather(x_, 1, ids_restore...)
    mask_tokens = torch.zeros(B, L - K, D, dtype=dtype, device=device)
    x_ = torch.cat([x_masked_ref, mask_tokens], dim=1)
    restored_ref = torch.gather(x_, 1, res.ids_restore.unsqueeze(-1).repeat(1, 1, D))
    restored = ops.scatter_rows(x_masked, res.ids_keep, L, backend=backend)
    assert_bitwise_equal(restored, restored_ref, f"scatter_rows[{backend}] vs MAE unshuffle")
    # mask marks exactly the rows that scatter left at zero (x has no exact zeros)
    zero_rows = (restored == 0).all(dim=-1).to(torch.float32)
    assert torch.equal(zero_rows, res.mask)


def make_noncontig(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous view holding (roughly) the values of the 3-D or 2-D tensor t."""
    if kind == "transposed":  # last dim not unit-stride
        buf = torch.empty(t.shape[::-1], dtype=t.dtype, device=t.device)
        v = buf.permute(*reversed(range(t.dim())))
        v.copy_(t)
    elif kind == "last_dim_strided":
        buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        v = buf[..., ::2]
        v.copy_(t)
        buf[..., 1::2] = -7 if not t.is_floating_point() else float("nan")
    elif kind == "rows_strided":  # dim 1 strided (sliced view)
        buf = torch.empty(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
        v = buf[:, 1::2]
        v.copy_(t)
        buf[:, ::2] = -7 if not t.is_floating_point() else float("nan")
    elif kind == "batch_strided":
        buf = torch.empty(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        v = buf[::2]
        v.copy_(t)
        buf[1::2] = -7 if not t.is_floating_point() else float("nan")
    elif kind == "expanded_batch":  # stride 0 over the batch
        v = t[:1].expand(t.shape)
    elif kind == "offset":  # contiguous strides but non-zero storage offset
        buf = torch.empty(t.numel() + 5, dtype=t.dtype, device=t.device)
        v = buf[5:].view(t.shape)
        v.copy_(t)
    else:
        raise ValueError(kind)
    return v


def param_id(v):
    """Readable pytest ids for dtypes and shape tuples."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


# --------------------------------------------------------------------------- #
# which kernels computed a tensor (autograd graph inspection)
# --------------------------------------------------------------------------- #
def graph_names(t):
    """Type names of every node in t's autograd graph."""
    seen, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            seen.append(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return seen


# The eager autograd Functions that call each fused layer's float32 cpp kernel directly (prenorm_linear's
# also runs inside the block's fused first half).
_EAGER_FUNCTIONS = {"mlp": {"_EagerMlpBackward"}, "prenorm_mlp": {"_EagerPrenormMlpBackward"},
                    "prenorm_linear": {"_EagerPrenormLinearBackward", "_EagerAttentionHalfBackward"}}


def uses_kernel(t, op="mlp"):
    """Whether the float32 cpp kernel of fused layer ``op`` computed t: through its custom op
    mvmae_fast::op (compiled, traced) or an eager autograd Function calling the same kernel."""
    return any(f"mvmae_fast_{op}_default" in name or name in _EAGER_FUNCTIONS[op] for name in graph_names(t))
