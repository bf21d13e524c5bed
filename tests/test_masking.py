"""Tests for mvmae_fast.ops.random_masking (all backends, CPU)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mvmae_fast  # noqa: E402
from mvmae_fast import ops  # noqa: E402

from mvmae_helpers import (  # noqa: E402
    BACKENDS,
    assert_masking_equal,
    check_masking_result,
    kept_count_test,
    pair_test,
    rank_of_patch_test,
    rank_test,
    sampler_cyclic_window,
    sampler_first_k,
    sampler_mae_reference,
    sampler_sorted,
    sampler_weighted,
)

SHAPES = [(3, 197, 49), (2, 50, 1), (2, 50, 49), (1, 1, 1), (4, 16, 16)]
SEEDS = [0, 1, 2**40 + 3, 2**63 - 1]
P_MIN = 1e-4


def masking(B, L, K, backend, **kw):
    return ops.random_masking(B, L, K, backend=backend, **kw)


# --------------------------------------------------------------------------- #
# public surface
# --------------------------------------------------------------------------- #
def test_backends_tuple():
    assert mvmae_fast.BACKENDS == ("torch", "cpp", "triton")


def test_unsupported_backend_error_is_not_implemented_error():
    assert issubclass(mvmae_fast.UnsupportedBackendError, NotImplementedError)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_available_backends_cpu(device):
    # conftest sets TRITON_INTERPRET=1 and the extension is built by `pip install -e .`
    avail = mvmae_fast.available_backends(device)
    assert isinstance(avail, list), type(avail)
    assert set(avail) == set(BACKENDS), f"available_backends({device!r}) = {avail}"


def test_result_is_named_tuple():
    res = ops.random_masking(2, 10, 3, seed=0)
    ids_keep, ids_restore, mask = res  # unpackable
    assert res.ids_keep is ids_keep and res.ids_restore is ids_restore and res.mask is mask


# --------------------------------------------------------------------------- #
# invariants
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L,K", SHAPES)
def test_invariants(backend, B, L, K):
    res = masking(B, L, K, backend, seed=1234 + B * 1000 + L * 10 + K)
    check_masking_result(res, B, L, K)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_argument(backend, device):
    res = masking(2, 20, 5, backend, seed=3, device=device)
    check_masking_result(res, 2, 20, 5, device="cpu")


@pytest.mark.parametrize("B,L,K", [(1, 1, 1), (3, 7, 7), (5, 9, 1)])
def test_degenerate_cases_fully_determined(B, L, K):
    """K == L: nothing masked; L == 1: the only permutation; K == 1: one kept patch."""
    res = ops.random_masking(B, L, K, seed=11)
    check_masking_result(res, B, L, K)
    if K == L:
        assert torch.equal(res.mask, torch.zeros(B, L))
        assert torch.equal(res.ids_restore.gather(1, res.ids_keep), torch.arange(K).expand(B, K))


# --------------------------------------------------------------------------- #
# determinism across backends / calls
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,L,K", [(3, 197, 49), (2, 50, 12), (4, 16, 16)])
def test_bit_identical_to_torch_backend(backend, seed, B, L, K):
    ref = masking(B, L, K, "torch", seed=seed)
    out = masking(B, L, K, backend, seed=seed)
    assert_masking_equal(out, ref, f"{backend} vs torch, seed={seed}")


@pytest.mark.parametrize("seed", SEEDS)
def test_automatic_backend_matches_torch(seed):
    ref = masking(3, 197, 49, "torch", seed=seed)
    out = ops.random_masking(3, 197, 49, seed=seed)
    assert_masking_equal(out, ref, f"auto vs torch, seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_twice_identical(backend):
    a = masking(3, 197, 49, backend, seed=77)
    b = masking(3, 197, 49, backend, seed=77)
    assert_masking_equal(a, b, "same seed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seeds_differ(backend):
    results = [masking(2, 197, 49, backend, seed=s) for s in (0, 1, 2, 2**40 + 3, 2**63 - 1)]
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert not torch.equal(results[i].mask, results[j].mask), f"seed #{i} and #{j} give the same mask"
            assert not torch.equal(results[i].ids_keep, results[j].ids_keep)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_rows_unrelated_across_seeds_and_batch(backend):
    """No two rows (over nearby seeds and batch positions) may coincide.

    Catches e.g. a counter-based RNG keyed on (seed + b), where row b of seed s
    equals row b-1 of seed s+1.  With L=197 a chance collision is impossible.
    """
    rows = torch.cat([masking(8, 197, 49, backend, seed=s).ids_keep for s in range(10)])
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0], "identical ids_keep rows across seeds/batch"


def test_rows_within_batch_differ():
    res = ops.random_masking(64, 49, 12, seed=5)
    assert torch.unique(res.ids_keep, dim=0).shape[0] == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_reproducible(backend):
    g1 = torch.Generator().manual_seed(2024)
    g2 = torch.Generator().manual_seed(2024)
    a1 = masking(3, 50, 12, backend, generator=g1)
    b1 = masking(3, 50, 12, backend, generator=g2)
    assert_masking_equal(a1, b1, "same generator seed")
    # the generator advances: the next draw gives a different mask, again reproducibly
    a2 = masking(3, 50, 12, backend, generator=g1)
    b2 = masking(3, 50, 12, backend, generator=g2)
    assert_masking_equal(a2, b2, "same generator seed, 2nd call")
    assert not torch.equal(a1.ids_keep, a2.ids_keep), "generator did not advance between calls"
    check_masking_result(a1, 3, 50, 12)


def test_generator_same_on_every_backend():
    outs = {b: masking(3, 50, 12, b, generator=torch.Generator().manual_seed(99)) for b in BACKENDS}
    for b in ("cpp", "triton"):
        assert_masking_equal(outs[b], outs["torch"], f"generator: {b} vs torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_rng_reproducible(backend):
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(31337)
        a1 = masking(3, 50, 12, backend)
        a2 = masking(3, 50, 12, backend)
        torch.manual_seed(31337)
        b1 = masking(3, 50, 12, backend)
        b2 = masking(3, 50, 12, backend)
    finally:
        torch.random.set_rng_state(state)
    assert_masking_equal(a1, b1, "torch.manual_seed, 1st call")
    assert_masking_equal(a2, b2, "torch.manual_seed, 2nd call")
    assert not torch.equal(a1.ids_keep, a2.ids_keep), "global RNG did not advance between calls"


def test_custom_op_matches_python_api():
    for backend in ("",) + BACKENDS:
        out = torch.ops.mvmae_fast.random_masking(2, 50, 12, 123, torch.device("cpu"), backend)
        assert len(out) == 3
        ref = ops.random_masking(2, 50, 12, seed=123, backend="torch")
        for name, t, r in zip(("ids_keep", "ids_restore", "mask"), out, ref):
            torch.testing.assert_close(t, r, rtol=0, atol=0, msg=f"custom op backend={backend!r} {name}")


# --------------------------------------------------------------------------- #
# statistics: the chi-square helpers themselves (must be able to fail)
# --------------------------------------------------------------------------- #
def test_chi2_helpers_accept_correct_reference_sampler():
    ik = sampler_mae_reference(4000, 49, 12, seed=0)
    assert kept_count_test(ik, 49)[2] > P_MIN
    assert rank_test(ik, 49)[2] > P_MIN
    assert rank_of_patch_test(ik, 0)[2] > P_MIN
    assert pair_test(sampler_mae_reference(40000, 8, 3, seed=0), 8)[2] > P_MIN


@pytest.mark.parametrize(
    "sampler,test,expect_reject",
    [
        (sampler_first_k, "kept", True),
        (sampler_weighted, "kept", True),  # patches 0..4 only 1.25x as likely
        (sampler_sorted, "kept", False),  # subset is uniform ...
        (sampler_sorted, "rank", True),  # ... but the order is not
        (sampler_sorted, "rank_of_patch", True),
        (sampler_cyclic_window, "kept", False),  # marginals uniform ...
        (sampler_cyclic_window, "pair", True),  # ... pairs are not
        (sampler_weighted, "pair", True),
    ],
)
def test_chi2_helpers_reject_biased_samplers(sampler, test, expect_reject):
    if test == "pair":
        p = pair_test(sampler(40000, 8, 3, 0), 8)[2]
    else:
        ik = sampler(4000, 49, 12, 0)
        p = {
            "kept": lambda: kept_count_test(ik, 49)[2],
            "rank": lambda: rank_test(ik, 49)[2],
            "rank_of_patch": lambda: rank_of_patch_test(ik, 20)[2],
        }[test]()
    if expect_reject:
        assert p < 1e-8, f"{sampler.__name__}: {test} test failed to reject (p={p})"
    else:
        assert p > P_MIN, f"{sampler.__name__}: {test} test rejected a correct marginal (p={p})"


# --------------------------------------------------------------------------- #
# statistics: the library
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_uniform_kept_frequency(backend):
    res = masking(4000, 49, 12, backend, seed=20240601)
    stat, df, p = kept_count_test(res.ids_keep, 49)
    assert p > P_MIN, f"kept frequencies not uniform: chi2={stat:.1f} df={df} p={p:.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_uniform_rank_within_ids_keep(backend):
    res = masking(4000, 49, 12, backend, seed=777)
    stat, df, p = rank_test(res.ids_keep, 49)
    assert p > P_MIN, f"(patch, rank) table not uniform: chi2={stat:.1f} df={df} p={p:.3g}"
    for patch in (0, 24, 48):
        stat, df, p = rank_of_patch_test(res.ids_keep, patch)
        assert p > P_MIN, f"rank of patch {patch} not uniform: chi2={stat:.1f} df={df} p={p:.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_uniform_pairs(backend):
    res = masking(40000, 8, 3, backend, seed=4242)
    stat, df, p = pair_test(res.ids_keep, 8)
    assert p > P_MIN, f"co-kept pair frequencies not uniform: chi2={stat:.1f} df={df} p={p:.3g}"


def test_uniform_across_seeds():
    """First row of consecutive seeds: checks the seed -> stream mixing, not just within one stream."""
    ik = torch.cat([ops.random_masking(1, 49, 12, seed=s, backend="cpp").ids_keep for s in range(1500)])
    stat, df, p = kept_count_test(ik, 49)
    assert p > P_MIN, f"kept frequencies over consecutive seeds not uniform: chi2={stat:.1f} p={p:.3g}"
    stat, df, p = rank_test(ik, 49)
    assert p > P_MIN, f"(patch, rank) over consecutive seeds not uniform: chi2={stat:.1f} p={p:.3g}"


def test_uniform_kept_frequency_triton_small():
    res = masking(300, 49, 12, "triton", seed=20240601)
    stat, df, p = kept_count_test(res.ids_keep, 49)
    assert p > P_MIN, f"triton: kept frequencies not uniform: chi2={stat:.1f} df={df} p={p:.3g}"


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
VALUE_ERRORS = [
    (dict(batch=2, num_patches=10, keep=11), "keep"),
    (dict(batch=2, num_patches=10, keep=0), "keep"),
    (dict(batch=2, num_patches=10, keep=-1), "keep"),
    (dict(batch=0, num_patches=10, keep=3), "batch"),
    (dict(batch=-1, num_patches=10, keep=3), "batch"),
    (dict(batch=2, num_patches=0, keep=1), "num_patches"),
    (dict(batch=2, num_patches=-5, keep=1), "num_patches"),
]


@pytest.mark.parametrize("backend", [None] + list(BACKENDS))
@pytest.mark.parametrize("kwargs,name", VALUE_ERRORS, ids=lambda v: str(v))
def test_bad_values(backend, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ops.random_masking(kwargs["batch"], kwargs["num_patches"], kwargs["keep"], seed=0, backend=backend)


TYPE_ERRORS = []
for _arg in ("batch", "num_patches", "keep"):
    for _bad in (3.0, True, "3", None):
        TYPE_ERRORS.append((_arg, _bad))


@pytest.mark.parametrize("backend", [None] + list(BACKENDS))
@pytest.mark.parametrize("arg,bad", TYPE_ERRORS)
def test_bad_types(backend, arg, bad):
    kwargs = dict(batch=2, num_patches=10, keep=3)
    kwargs[arg] = bad
    with pytest.raises(TypeError, match=rf"\b{arg}\b"):
        ops.random_masking(kwargs["batch"], kwargs["num_patches"], kwargs["keep"], seed=0, backend=backend)


def test_seed_and_generator_both_given():
    with pytest.raises(ValueError):
        ops.random_masking(2, 10, 3, seed=1, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- #
# opcheck
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.library.opcheck(
        torch.ops.mvmae_fast.random_masking.default, (2, 50, 12, 123, torch.device("cpu"), backend)
    )
