"""Tests for the pre-norm block's layers under CPU bfloat16 autocast (mvmae_fast/ops/mlp/autocast.py and
csrc/cpu/autocast.cpp): under ``torch.autocast("cpu", dtype=torch.bfloat16)``, with float32 CPU tensors, no
forced backend and in eager mode, ops.prenorm_mlp, ops.prenorm_linear and Block's first half run as autograd
Functions that keep autocast's bfloat16 GEMMs and do the elementwise work in the extension's kernels.

Three levels:

- the raw kernels (``_ext._C.*_cpu``, called with data pointers) against references computed independently
  with torch, in float64 where the reference is arithmetic (LayerNorm, GELU and its derivative, column sums)
  and bit for bit where the kernel's result is one correctly rounded operation (the bfloat16 casts, the
  gradient product, the residual add). Shapes cover 1 row, the 64-row blocks of the column sums (63, 64, 65,
  200) and the 16-wide vector tails (1, 7, 48, 130 columns);
- the Functions against the unfused autocast computation (plain torch ops under autocast) and float64:
  their relative error (norm of the difference over the float64 result's norm) in the output and in every
  gradient must be at most 1.5x the unfused path's (+ 1e-6), and their forward mostly bit-identical to it;
- dispatch (which calls take the path) and robustness (interleaved calls sharing the per-thread workspace,
  strided inputs, determinism, threads, the MV-MAE model).

test_generic_isa_variant reruns the kernel-level tests in a fresh process with MVMAE_FAST_CPU_ISA=generic,
which turns GELU's AVX-512 intrinsics path off.
"""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from mvmae_fast import _ext, ops, use_backend
from mvmae_fast.models import MVMAE, PRESETS, MVMAEConfig
from mvmae_fast._utils import new_output
from mvmae_fast.models.layers import Block
from autocast_helpers import assert_sum_accurate, block_by_hand, gelu64, gelu_grad64, make_block, mlp_inputs
from mvmae_helpers import graph_names, isa_probe, rerun_tests_under_isa, uses_kernel

C = _ext._C

EPS = torch.finfo(torch.float32).eps
GELU_SCALE = 16384.0  # gelu' is stored as float16 times 2^14
ROWS = (1, 63, 64, 65, 200)
COLS = (1, 7, 48, 130)
KERNEL_SHAPES = [(r, c) for r in ROWS for c in COLS]
# Values GELU's tails, zero and the vector lanes must get right, planted in every GELU input.
GELU_SPECIALS = (0.0, -0.0, 4.0, -4.0, 8.0, -8.0, 12.0, -12.0, 30.0, -30.0, 0.5, -0.75, float("nan"))


def shape_id(shape):
    return "x".join(map(str, shape))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def threads_of(threads):
    return torch.get_num_threads() if threads is None else threads


def autocast_names(t):
    """The autocast Functions in t's autograd graph."""
    return set(graph_names(t)) & {"_PrenormMlpBackward", "_PrenormLinearBackward", "_AttentionHalfBackward"}


def bf16_ulp(ref):
    """The spacing of bfloat16 numbers at |ref| (float64), normal range (subnormals: the smallest normal's)."""
    mag = ref.double().abs().clamp_min(2.0**-126)
    _, exponent = torch.frexp(mag)  # mag = m 2^e, m in [0.5, 1): the ulp is 2^(e - 8)
    return torch.ldexp(torch.ones_like(mag), exponent - 8)


def bits(t):
    """t's bit patterns (NaN compares equal to the same NaN)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def same_values(a, b):
    """Bit for bit the same, NaN for NaN (a NaN's sign and payload aside: the generic GELU loop's
    vectorised body and scalar tail quiet a NaN with different signs)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(bits(a[~nan]), bits(b[~nan]))


# --------------------------------------------------------------------------- #
# the raw kernels, called as autocast.py calls them
# --------------------------------------------------------------------------- #
def new(shape, dtype=torch.float32):
    """A kernel output, NaN-filled first (MVMAE_FAST_POISON=1, set by conftest): an element a kernel
    does not write fails the comparison."""
    return new_output(shape, dtype, "cpu")


def k_layer_norm(x, gamma, beta, eps, threads=None):
    rows, dim = x.shape
    out, mean, rstd = new((rows, dim), torch.bfloat16), new((rows,)), new((rows,))
    C.layer_norm_bf16_forward_cpu(x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), float(eps), out.data_ptr(),
                                  mean.data_ptr(), rstd.data_ptr(), rows, dim, threads_of(threads))
    return out, mean, rstd


def k_gelu(pre, threads=None):
    assert pre.dtype == torch.bfloat16 and pre.is_contiguous()
    act, deriv = new(pre.shape, torch.bfloat16), new(pre.shape, torch.float16)
    C.gelu_bf16_forward_cpu(pre.data_ptr(), act.data_ptr(), deriv.data_ptr(), pre.numel(), threads_of(threads))
    return act, deriv


def k_cast_colsum(g, threads=None):
    rows, cols = g.shape
    out, colsum = new((rows, cols), torch.bfloat16), new((cols,))
    C.cast_bf16_colsum_cpu(g.data_ptr(), out.data_ptr(), colsum.data_ptr(), rows, cols, threads_of(threads))
    return out, colsum


def k_gelu_backward(dact, deriv, threads=None):
    rows, cols = dact.shape
    dpre, colsum = new((rows, cols), torch.bfloat16), new((cols,))
    C.gelu_bf16_backward_cpu(dact.data_ptr(), deriv.data_ptr(), dpre.data_ptr(), colsum.data_ptr(), rows, cols,
                             threads_of(threads))
    return dpre, colsum


def k_layer_norm_backward(dy, x, mean, rstd, gamma, residual=None, threads=None):
    rows, dim = x.shape
    dx, dgamma, dbeta = new((rows, dim)), new((dim,)), new((dim,))
    C.layer_norm_bf16_backward_cpu(dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), gamma.data_ptr(),
                                   0 if residual is None else residual.data_ptr(), dx.data_ptr(), dgamma.data_ptr(),
                                   dbeta.data_ptr(), rows, dim, threads_of(threads))
    return dx, dgamma, dbeta


def k_colsum(g, threads=None):
    colsum = new((g.shape[1],))
    C.colsum_bf16_cpu(g.data_ptr(), colsum.data_ptr(), g.shape[0], g.shape[1], threads_of(threads))
    return colsum


def k_add(x, y, threads=None):
    out = new(x.shape)
    C.add_bf16_cpu(x.data_ptr(), y.data_ptr(), out.data_ptr(), out.numel(), threads_of(threads))
    return out


def ln_inputs(rows, dim, seed=0):
    """x (mean 3, std 2, so LayerNorm has work to do; row 1 constant when there is one: variance 0), gamma
    around 1, beta around 0."""
    g = gen(seed)
    x = torch.randn(rows, dim, generator=g) * 2 + 3
    if rows > 2:
        x[1] = 1.75
    return x, 1 + 0.5 * torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g)


def gelu_input(rows, cols, seed=0):
    """bfloat16 (rows, cols) of std 3 with GELU_SPECIALS planted every 5th element (cyclically)."""
    pre = torch.randn(rows * cols, generator=gen(seed)) * 3
    specials = torch.tensor(GELU_SPECIALS)
    idx = torch.arange(0, rows * cols, 5)
    pre[idx] = specials[torch.arange(len(idx)) % len(specials)]
    return pre.bfloat16().view(rows, cols)


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_kernel_layer_norm_forward(shape):
    rows, dim = shape
    eps = 1e-6 if dim % 2 == 0 else 1e-5
    x, gamma, beta = ln_inputs(rows, dim)
    out, mean, rstd = k_layer_norm(x, gamma, beta, eps)
    assert out.dtype == torch.bfloat16
    ref = F.layer_norm(x.double(), (dim,), gamma.double(), beta.double(), eps)
    # Within one bfloat16 ulp of the correctly rounded float64 result (half for the rounding, half for
    # float32's error), with a floor for outputs that cancel to near zero (beta ~ -xhat gamma).
    var, mu = torch.var_mean(x.double(), 1, correction=0)
    xhat = (x.double() - mu[:, None]) * (var + eps).rsqrt()[:, None]
    floor = 4 * EPS * ((xhat * gamma.double()).abs() + beta.double().abs())
    diff = (out.double() - ref.bfloat16().double()).abs()
    bad = diff > bf16_ulp(ref) + floor
    assert not bad.any(), f"{int(bad.sum())} outputs over one bf16 ulp, e.g. {out[bad][:4]} vs {ref[bad][:4]}"
    # And what autocast computes (torch's float32 LayerNorm, cast): nearly always the same bits.
    same = (out == F.layer_norm(x, (dim,), gamma, beta, eps).bfloat16()).float().mean().item()
    assert same >= 0.99, f"only {same:.2%} of outputs equal autocast's"
    torch.testing.assert_close(mean.double(), mu, rtol=1e-6, atol=1e-6 * x.abs().max().item())
    torch.testing.assert_close(rstd.double(), (var + eps).rsqrt(), rtol=2e-6, atol=0)
    if rows > 2:  # the constant row: exact mean, rstd = 1/sqrt(eps), outputs beta
        assert mean[1].item() == 1.75 and torch.equal(out[1], beta.bfloat16())


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_kernel_gelu_forward(shape):
    pre = gelu_input(*shape)
    act, deriv = k_gelu(pre)
    nan = pre.isnan()
    assert nan.any() or pre.numel() < 65
    assert act[nan].isnan().all() and deriv[nan].isnan().all(), "NaN in must give NaN out"
    p, a, d = pre[~nan], act[~nan].double(), deriv[~nan].double() / GELU_SCALE
    assert a.isfinite().all() and d.isfinite().all()
    # act: bf16(gelu(pre)), within half an ulp of float64 GELU at the same bf16 input, plus the erf
    # approximation's error (|erf error| <= 1.5e-7, times |x| / 2) for the far tails' tiny values.
    ref = gelu64(p)
    tol = 0.5 * torch.maximum(bf16_ulp(ref), bf16_ulp(a)) + 1e-7 * p.double().abs() + 1e-30
    bad = (a - ref).abs() > tol
    assert not bad.any(), f"gelu of {p[bad][:4]}: {a[bad][:4]} vs {ref[bad][:4]}"
    # deriv: gelu'(pre) * 2^14 in float16: float16's rounding (2^-11 relative) + the approximation's 1e-7.
    gref = gelu_grad64(p)
    bad = (d - gref).abs() > 2.0**-11 * gref.abs() + 1e-7
    assert not bad.any(), f"gelu' of {p[bad][:4]}: {d[bad][:4]} vs {gref[bad][:4]}"
    # Signs and exact values where GELU is exact in bfloat16: gelu(0) = 0, gelu(30) = 30, gelu'(30) = 1.
    for value, expected_act, expected_grad in ((0.0, 0.0, 0.5), (30.0, 30.0, 1.0), (12.0, 12.0, 1.0)):
        at = pre == value
        if at.any():
            assert (act[at].float() == expected_act).all() and (deriv[at].float() / GELU_SCALE == expected_grad).all()
    at = pre == -30.0
    if at.any():
        assert (act[at].float() <= 0).all() and (act[at].float().abs() < 1e-30).all()
    # torch's own bfloat16 GELU (autocast's): the same bits nearly everywhere above -3.5 (below, torch's
    # erf form loses the left tail's relative accuracy, and flushes it to -0 from about -6.5).
    body = pre.float() >= -3.5
    same = (act == F.gelu(pre))[body].float().mean().item()
    assert same >= 0.99, f"only {same:.2%} of GELU outputs equal torch's bfloat16 GELU"


def test_kernel_gelu_infinities_and_huge_values():
    """Past |x| = 13.19 (exp(-x^2/2) below float's normal range) GELU and its derivative are their limits,
    x or 0 and 1 or 0, infinities included, on every instruction-set path (vector body and scalar tail:
    17 values)."""
    values = [float("inf"), float("-inf"), 3e38, -3e38, 1e37, -1e37, 13.5, -13.5, 100.0, -100.0, 14.0, -14.0,
              1e20, -1e20, 20.0, -20.0, 3e38]
    pre = torch.tensor(values).bfloat16()
    act, deriv = k_gelu(pre)
    x = pre.float()
    assert torch.equal(act.float(), torch.where(x > 0, x, torch.zeros_like(x))), act
    assert torch.equal(deriv.float() / GELU_SCALE, (x > 0).float()), deriv


def test_kernel_gelu_forward_every_bfloat16():
    """Every finite bfloat16 in [-40, 40] (about 33k values: all lanes and every tail value), once."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    pre = bits[bits.isfinite() & (bits.float().abs() <= 40) & (bits.float().abs() >= 2.0**-100)].contiguous()
    act, deriv = k_gelu(pre)
    ref, gref = gelu64(pre), gelu_grad64(pre)
    tol = 0.5 * torch.maximum(bf16_ulp(ref), bf16_ulp(act)) + 1e-7 * pre.double().abs() + 1e-30
    bad = (act.double() - ref).abs() > tol
    assert not bad.any(), f"gelu of {pre[bad][:4]}: {act[bad][:4]} vs {ref[bad][:4]}"
    d = deriv.double() / GELU_SCALE
    bad = (d - gref).abs() > 2.0**-11 * gref.abs() + 1e-7
    assert not bad.any(), f"gelu' of {pre[bad][:4]}: {d[bad][:4]} vs {gref[bad][:4]}"


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_kernel_cast_colsum(shape):
    rows, cols = shape
    g = torch.randn(rows, cols, generator=gen(1)) * 0.3
    out, colsum = k_cast_colsum(g)
    assert out.dtype == torch.bfloat16
    assert torch.equal(bits(out), bits(g.bfloat16())), "not g.bfloat16() bit for bit"
    assert_sum_accurate(colsum, g, "colsum")


def test_kernel_cast_rounding_and_specials():
    """Round to nearest even at exact ties, overflow to inf, subnormals, signed zeros, inf and NaN, as
    torch's float -> bfloat16 cast (37 values: two full 16-lane vectors and a tail)."""
    tie = 2.0**-8  # half a bfloat16 ulp at 1
    values = [1 + tie, 1 + 3 * tie, -(1 + tie), -(1 + 3 * tie), 1 + tie + 2.0**-20, 1 + tie - 2.0**-20,
              2.0**100 * (1 + 3 * tie), 3.3895314e38, 3.4028235e38, -3.4028235e38, float("inf"), float("-inf"),
              1e-40, -1e-40, 2.0**-133, 2.0**-134, 3 * 2.0**-134, 1.1754942e-38, 0.0, -0.0, 65504.0, -7.25,
              0.1, 1 / 3, -2 / 3, 123456.789, 2.0**-126]
    g = torch.tensor(values + [1.0 + i * tie for i in range(37 - len(values))], dtype=torch.float32)
    assert g.numel() == 37
    out, _ = k_cast_colsum(g.view(1, -1))
    out = out.view(-1)
    assert torch.equal(bits(out), bits(g.bfloat16()))
    assert out.float()[1].item() == 1 + 4 * tie and out.float()[0].item() == 1.0  # ties to even
    assert out.float()[8].item() == float("inf")
    nan = torch.tensor([float("nan"), -float("nan"), 1.0] * 6).view(3, 6)
    out, _ = k_cast_colsum(nan)
    assert torch.equal(out.isnan(), nan.isnan())


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_kernel_gelu_backward(shape):
    rows, cols = shape
    pre = (torch.randn(rows, cols, generator=gen(2)) * 3).bfloat16()
    _, deriv = k_gelu(pre)
    dact = torch.randn(rows, cols, generator=gen(3)).bfloat16()
    dpre, colsum = k_gelu_backward(dact, deriv)
    # float32: dact * (deriv * 2^-14) (the scaling exact), one rounding to bfloat16.
    v = dact.float() * (deriv.float() * (1.0 / GELU_SCALE))
    assert torch.equal(bits(dpre), bits(v.bfloat16()))
    assert_sum_accurate(colsum, dact.double() * deriv.double() / GELU_SCALE, "colsum")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_kernel_layer_norm_backward(shape, residual):
    rows, dim = shape
    eps = 1e-6
    x, gamma, beta = ln_inputs(rows, dim, seed=4)
    _, mean, rstd = k_layer_norm(x, gamma, beta, eps)
    dy = torch.randn(rows, dim, generator=gen(5)).bfloat16()
    res = torch.randn(rows, dim, generator=gen(6)) if residual else None
    got = dict(zip(("dx", "dgamma", "dbeta"), k_layer_norm_backward(dy, x, mean, rstd, gamma, res)))

    def autograd_ln(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, gamma, beta)]
        out = F.layer_norm(leaves[0], (dim,), leaves[1], leaves[2], eps)
        dx, dg, db = torch.autograd.grad(out, leaves, dy.to(dtype))
        return {"dx": dx + (0 if res is None else res.to(dtype)), "dgamma": dg, "dbeta": db}

    exact, base = autograd_ln(torch.float64), autograd_ln(torch.float32)
    # dx = rstd (dy gamma - mean(dy gamma) - xhat mean(dy gamma xhat)): one rounding of dy gamma, times
    # rstd (1/sqrt(eps) = 1000 on a constant row, and on every row when D = 1, where dx is exactly 0).
    amplified = (rstd.double() * (dy.double() * gamma.double()).abs().amax(1)).max().item()
    for name, ref in exact.items():
        err = (got[name].double() - ref).abs().max().item()
        torch_err = (base[name].double() - ref).abs().max().item()
        floor = EPS * max(ref.abs().max().item(), 1.0) + 1e-6 + (EPS * amplified if name == "dx" else 0.0)
        assert err <= 2 * torch_err + floor, f"{name}: {err:.3e} > 2 x torch's {torch_err:.3e} + {floor:.3e}"


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
def test_kernel_colsum_and_add(shape):
    rows, cols = shape
    g = torch.randn(rows, cols, generator=gen(7)).bfloat16()
    assert_sum_accurate(k_colsum(g), g, "colsum_bf16")
    x, y = torch.randn(rows, cols, generator=gen(8)) * 4, torch.randn(rows, cols, generator=gen(9)).bfloat16()
    assert torch.equal(k_add(x, y), x + y.float())


def test_kernel_zero_rows():
    """No rows: nothing written, zero column sums (the partials' zero fill)."""
    z32, z16 = torch.empty(0, 9), torch.empty(0, 9, dtype=torch.bfloat16)
    assert torch.equal(k_cast_colsum(z32)[1], torch.zeros(9))
    assert torch.equal(k_colsum(z16), torch.zeros(9))
    assert torch.equal(k_gelu_backward(z16, torch.empty(0, 9, dtype=torch.float16))[1], torch.zeros(9))
    gamma = torch.ones(9)
    dx, dg, db = k_layer_norm_backward(z16, z32, torch.empty(0), torch.empty(0), gamma)
    assert dx.shape == (0, 9) and torch.equal(dg, torch.zeros(9)) and torch.equal(db, torch.zeros(9))


def test_kernel_long_column_sums():
    """5000 rows on one thread: the 64-row block sums keep the column sums as accurate as torch's
    (a single running float32 sum would be several times worse here)."""
    g = torch.randn(5000, 48, generator=gen(10)) + 0.5
    _, colsum = k_cast_colsum(g, threads=1)
    assert_sum_accurate(colsum, g, "cast_colsum")
    gb = g.bfloat16()
    assert_sum_accurate(k_colsum(gb, threads=1), gb, "colsum_bf16")


@pytest.mark.parametrize("shape", [(300, 130), (1000, 48), (777, 7), (130, 1)], ids=shape_id)
def test_kernel_thread_counts(shape):
    """1, 2, 3 and 4 threads: row outputs (and the LayerNorm statistics, dx) and the column sums (one
    partial per piece of rows, whichever thread takes it, added in piece order) bit for bit the same."""
    rows, cols = shape
    x, gamma, beta = ln_inputs(rows, cols, seed=11)
    pre = gelu_input(rows, cols, seed=12)
    g = torch.randn(rows, cols, generator=gen(13))
    dy = torch.randn(rows, cols, generator=gen(14)).bfloat16()
    res = torch.randn(rows, cols, generator=gen(15))

    def everything(threads):
        ln = k_layer_norm(x, gamma, beta, 1e-6, threads)
        act, deriv = k_gelu(pre, threads)
        cast, cast_sum = k_cast_colsum(g, threads)
        dpre, dpre_sum = k_gelu_backward(dy, deriv, threads)
        dx, dg, db = k_layer_norm_backward(dy, x, ln[1], ln[2], gamma, res, threads)
        rows_out = {"ln": ln[0], "mean": ln[1], "rstd": ln[2], "act": act, "deriv": deriv, "cast": cast,
                    "dpre": dpre, "dx": dx, "add": k_add(g, dy, threads)}
        sums = {"cast_sum": cast_sum, "dpre_sum": dpre_sum, "dgamma": dg, "dbeta": db,
                "colsum": k_colsum(dy, threads)}
        return rows_out, sums

    one_rows, one_sums = everything(1)
    for threads in (2, 3, 4):
        rows_out, sums = everything(threads)
        for name, t in [*rows_out.items(), *sums.items()]:
            assert same_values(t, {**one_rows, **one_sums}[name]), f"{name}, {threads} threads"


# --------------------------------------------------------------------------- #
# the Functions against the unfused autocast computation and float64
# --------------------------------------------------------------------------- #
def rel_error(t, exact):
    return ((t.double() - exact).norm() / exact.norm()).item()


def linear_inputs(shape, out_features, seed=0):
    inputs, _ = mlp_inputs(shape, out_features, seed)
    return inputs[:5], torch.randn(*shape[:-1], out_features, generator=gen(seed + 100))


def unfused_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6):
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], nw, nb, eps), w1, b1)), w2, b2)


def fused_mlp(x, nw, nb, w1, b1, w2, b2, eps=1e-6):
    return ops.prenorm_mlp(x, nw, nb, eps, w1, b1, w2, b2)


def unfused_linear(x, nw, nb, w, b, eps=1e-6):
    return F.linear(F.layer_norm(x, x.shape[-1:], nw, nb, eps), w, b)


def fused_linear(x, nw, nb, w, b, eps=1e-6):
    return ops.prenorm_linear(x, nw, nb, eps, w, b)


def run(fn, inputs, grad, use_autocast=True):
    """(out, [gradient of each input]) of fn(*inputs), under CPU bfloat16 autocast or not."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
        out = fn(*leaves)
    return out, list(torch.autograd.grad(out, leaves, grad.to(out.dtype)))


def check_relative_errors(names, got, base, exact):
    """Each of got's tensors at most 1.5x base's relative error against exact, + 1e-6."""
    failures = []
    for name, g, b, e in zip(names, got, base, exact, strict=True):
        assert g.dtype == b.dtype and g.shape == e.shape, name
        err, base_err = rel_error(g, e), rel_error(b, e)
        if not err <= 1.5 * base_err + 1e-6:
            failures.append(f"{name}: relative error {err:.3e} > 1.5 x unfused autocast's {base_err:.3e}")
    assert not failures, "; ".join(failures)


def check_mostly_identical(out, base_out):
    """The fused forward >= 99% bit-identical to the unfused autocast one (the GEMMs are the same calls on
    mostly the same bfloat16 operands; LayerNorm's statistics are summed in another order)."""
    assert out.dtype == base_out.dtype and out.shape == base_out.shape
    same = (out == base_out).float().mean().item()
    assert same >= 0.99, f"only {same:.2%} of the outputs equal unfused autocast's"


def compare_to_unfused(fused, unfused, inputs, grad, names, expected_fn):
    """The fused path (whose grad_fn must be expected_fn) against the unfused autocast one and float64:
    check_mostly_identical, check_relative_errors on out and every gradient. Returns the fused out."""
    exact_out, exact_grads = run(unfused, [t.double() for t in inputs], grad.double(), False)
    base_out, base_grads = run(unfused, inputs, grad)
    out, grads = run(fused, inputs, grad)
    assert type(out.grad_fn).__name__ == expected_fn, f"not the autocast path: {out.grad_fn}"
    check_mostly_identical(out, base_out)
    check_relative_errors(("out", *names), (out, *grads), (base_out, *base_grads), (exact_out, *exact_grads))
    return out


MLP_CASES = [((4, 65, 64), 256), ((2, 37, 48), 130), ((200, 130), 257)]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"{shape_id(c[0])}-Hd{c[1]}")
def test_prenorm_mlp_matches_unfused_autocast(case):
    inputs, grad = mlp_inputs(*case)
    out = compare_to_unfused(fused_mlp, unfused_mlp, inputs, grad, ("dx", "dnw", "dnb", "dw1", "db1", "dw2", "db2"),
                             "_PrenormMlpBackward")
    assert out.dtype == torch.float32


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"{shape_id(c[0])}-out{c[1]}")
def test_prenorm_linear_matches_unfused_autocast(case):
    inputs, grad = linear_inputs(*case)
    out = compare_to_unfused(fused_linear, unfused_linear, inputs, grad, ("dx", "dnw", "dnb", "dw", "db"),
                             "_PrenormLinearBackward")
    assert out.dtype == torch.bfloat16 and out.shape == (*case[0][:-1], case[1])


@pytest.mark.parametrize("case", [(2, 33, 64, 4), (3, 17, 48, 3)], ids=lambda c: "B{}-N{}-D{}-H{}".format(*c))
def test_block_matches_unfused_autocast(case):
    """Block's forward (both halves fused) and the gradients wrt x and all 12 parameters, against the
    block written out with torch ops (attention: the cpp kernel under autocast, torch's SDPA in float64)."""
    B, N, D, H = case
    block = make_block(D, H)
    names, params = zip(*block.named_parameters())
    x, grad = torch.randn(B, N, D, generator=gen(1)) * 2 + 1, torch.randn(B, N, D, generator=gen(2))

    def by_hand(attention_backend):
        return lambda x, *ps: block_by_hand(block, x, dict(zip(names, ps)), attention_backend)

    # The by-hand paths run on detached copies of the parameters (run()); the module on its own.
    exact_out, exact_grads = run(by_hand("torch"), [x.double(), *(p.detach().double() for p in params)],
                                 grad.double(), False)
    base_out, base_grads = run(by_hand("cpp"), [x, *params], grad)
    leaf = x.clone().requires_grad_(True)
    with autocast():
        out = block(leaf)
    grads = torch.autograd.grad(out, [leaf, *params], grad)
    graph = autocast_names(out)
    assert type(out.grad_fn).__name__ == "_PrenormMlpBackward" and "_AttentionHalfBackward" in graph, graph
    assert out.dtype == torch.float32
    check_mostly_identical(out, base_out)
    check_relative_errors(("out", "x", *names), (out, *grads), (base_out, *base_grads), (exact_out, *exact_grads))


# --------------------------------------------------------------------------- #
# dispatch
# --------------------------------------------------------------------------- #
def test_dispatch_prenorm_mlp(monkeypatch):
    inputs, _ = mlp_inputs((2, 17, 32), 64)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    cpp = fused_mlp(*inputs)  # no autocast: the float32 kernel
    assert uses_kernel(fused_mlp(*leaves), "prenorm_mlp")
    with autocast():
        auto = fused_mlp(*leaves)
        forced = ops.prenorm_mlp(*leaves[:3], 1e-6, *leaves[3:], backend="cpp")
        with use_backend("cpp"):
            forced_ctx = fused_mlp(*leaves)
        with use_backend("torch"):
            forced_torch = fused_mlp(*leaves)
        unfused = unfused_mlp(*leaves)
    assert type(auto.grad_fn).__name__ == "_PrenormMlpBackward" and auto.dtype == torch.float32
    for out in (forced, forced_ctx):  # forced cpp: the float32 fused kernel, as without autocast
        assert not autocast_names(out) and uses_kernel(out, "prenorm_mlp") and torch.equal(out, cpp)
    assert not autocast_names(forced_torch) and not uses_kernel(forced_torch, "prenorm_mlp")
    assert torch.equal(forced_torch, unfused)  # forced torch: autocast's own arithmetic
    for backend, expected in (("cpp", cpp), ("torch", unfused)):
        monkeypatch.setenv("MVMAE_FAST_BACKEND", backend)
        with autocast():
            out = fused_mlp(*leaves)
        assert not autocast_names(out) and torch.equal(out, expected), backend
    monkeypatch.delenv("MVMAE_FAST_BACKEND")
    # Not without autocast, not for float64 inputs, not under float16 autocast or with autocast disabled.
    assert not autocast_names(fused_mlp(*leaves))
    doubles = [t.double().requires_grad_(True) for t in inputs]
    with autocast():
        out = fused_mlp(*doubles)
    assert not autocast_names(out)
    torch.testing.assert_close(out, unfused_mlp(*doubles), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.float16):
        out, expected = fused_mlp(*leaves), unfused_mlp(*leaves)
    assert not autocast_names(out) and torch.equal(out, expected)
    with autocast(), torch.autocast("cpu", enabled=False):
        out = fused_mlp(*leaves)
    assert not autocast_names(out) and uses_kernel(out, "prenorm_mlp")


def test_dispatch_prenorm_linear_and_block():
    inputs, _ = linear_inputs((2, 17, 32), 40)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with autocast():
        auto = fused_linear(*leaves)
        forced = ops.prenorm_linear(*leaves[:3], 1e-6, *leaves[3:], backend="cpp")
        with use_backend("torch"):
            forced_torch = fused_linear(*leaves)
        unfused = unfused_linear(*leaves)
    assert type(auto.grad_fn).__name__ == "_PrenormLinearBackward" and auto.dtype == torch.bfloat16
    assert forced.dtype == torch.float32 and uses_kernel(forced, "prenorm_linear") and not autocast_names(forced)
    assert torch.equal(forced, fused_linear(*inputs))
    assert not autocast_names(forced_torch) and torch.equal(forced_torch, unfused)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not autocast_names(fused_linear(*leaves))
    # Block: both halves fused under autocast (nn.Parameter weights); forced backends run the modules' ops.
    block = make_block(32, 4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    with autocast():
        auto = block(x)
        with use_backend("cpp"):
            forced = block(x)
        with use_backend("torch"):
            forced_torch = block(x)
        expected_torch = block_by_hand(block, x, dict(block.named_parameters()), "torch")
    assert autocast_names(auto) == {"_AttentionHalfBackward", "_PrenormMlpBackward"}
    assert not autocast_names(forced) and uses_kernel(forced, "prenorm_mlp")
    assert not autocast_names(forced_torch) and torch.equal(forced_torch, expected_torch)
    assert not autocast_names(block(x)) and uses_kernel(block(x), "prenorm_mlp")


def test_dispatch_under_torch_dispatch_mode():
    """Under a TorchDispatchMode (here the flop counter) the custom ops run, which such modes understand."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs, _ = mlp_inputs((2, 9, 32), 64)
    with autocast():
        with FlopCounterMode(display=False) as counter:
            out = fused_mlp(*[t.clone().requires_grad_(True) for t in inputs])
        expected = unfused_mlp(*inputs)
    assert not autocast_names(out) and counter.get_total_flops() > 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    """torch.compile traces the plain torch path (no graph break, fullgraph=True) and matches eager's
    fused path within bfloat16 rounding, forward and backward."""
    inputs, grad = mlp_inputs((2, 9, 32), 64)

    def fn(*tensors):
        with autocast():
            return fused_mlp(*tensors)

    eager_out, eager_grads = run(fn, inputs, grad, use_autocast=False)
    assert type(eager_out.grad_fn).__name__ == "_PrenormMlpBackward"
    compiled_out, compiled_grads = run(torch.compile(fn, fullgraph=True), inputs, grad, use_autocast=False)
    assert not autocast_names(compiled_out)
    exact_out, exact_grads = run(unfused_mlp, [t.double() for t in inputs], grad.double(), False)
    names = ("out", "dx", "dnw", "dnb", "dw1", "db1", "dw2", "db2")
    for name, a, b, exact in zip(names, (compiled_out, *compiled_grads),
                                 (eager_out, *eager_grads), (exact_out, *exact_grads), strict=True):
        assert a.dtype == b.dtype, name
        # Both bfloat16 computations of the same function: close to each other and to float64.
        assert rel_error(a, b.double()) <= 1e-2, name
        assert rel_error(a, exact) <= 1e-2 and rel_error(b, exact) <= 1e-2, name


# --------------------------------------------------------------------------- #
# robustness
# --------------------------------------------------------------------------- #
def block_case(B, N, D, H, seed):
    block = make_block(D, H, seed)
    params = list(block.parameters())
    x = torch.randn(B, N, D, generator=gen(seed)) * 2 + 1

    def forward():
        leaf = x.clone().requires_grad_(True)
        with autocast():
            return block(leaf), [leaf, *params]

    return forward, torch.randn(B, N, D, generator=gen(seed + 1))


def function_case(fn, inputs):
    def forward():
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with autocast():
            return fn(*leaves), leaves

    return forward


def robustness_cases():
    """name -> (forward() -> (out, leaves), output gradient): sizes that grow and shrink the workspace."""
    mlp_a, grad_a = mlp_inputs((2, 40, 48), 130, seed=1)
    mlp_b, grad_b = mlp_inputs((3, 70, 64), 256, seed=2)
    lin, grad_l = linear_inputs((5, 30, 32), 96, seed=3)
    block_fwd, grad_blk = block_case(2, 50, 64, 4, seed=4)
    small_block, grad_sb = block_case(1, 7, 16, 2, seed=5)
    return {"mlp_a": (function_case(fused_mlp, mlp_a), grad_a), "block": (block_fwd, grad_blk),
            "mlp_b": (function_case(fused_mlp, mlp_b), grad_b), "linear": (function_case(fused_linear, lin), grad_l),
            "small_block": (small_block, grad_sb)}


def test_interleaved_calls_share_workspace_safely():
    """Forwards of five calls of different sizes, then their backwards in another order (each role's
    workspace buffer grows and is reused meanwhile): outputs and gradients bit for bit those of separate
    runs, and the outputs unchanged by the later calls."""
    cases = robustness_cases()
    separate = {}
    for name, (forward, grad) in cases.items():
        out, leaves = forward()
        assert autocast_names(out), name
        separate[name] = (out.detach().clone(), torch.autograd.grad(out, leaves, grad.to(out.dtype)))
    pending = {name: forward() for name, (forward, _) in cases.items()}
    for name in ("small_block", "mlp_a", "linear", "block", "mlp_b"):
        out, leaves = pending[name]
        assert torch.equal(out, separate[name][0]), f"{name}'s output changed by later calls"
        grads = torch.autograd.grad(out, leaves, cases[name][1].to(out.dtype))
        for i, (a, b) in enumerate(zip(grads, separate[name][1], strict=True)):
            assert torch.equal(a, b), f"{name}: gradient {i} differs when interleaved"


def test_concurrent_threads():
    """Two Python threads running forward and backward at once (the kernels release the GIL; each thread
    has its own workspace): the same results as serial runs."""
    cases = robustness_cases()
    picks = ["mlp_a", "mlp_b", "linear", "block"]

    def work(name):
        forward, grad = cases[name]
        out, leaves = forward()
        return out.detach(), torch.autograd.grad(out, leaves, grad.to(out.dtype))

    expected = {name: work(name) for name in picks}
    results, errors = {}, []

    def worker(names):
        try:
            for _ in range(3):
                for name in names:
                    results.setdefault(name, []).append(work(name))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(picks[:2],)), threading.Thread(target=worker, args=(picks[2:],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in picks:
        for out, grads in results[name]:
            assert torch.equal(out, expected[name][0]), name
            assert all(torch.equal(a, b) for a, b in zip(grads, expected[name][1], strict=True)), name


def test_deterministic():
    for name, (forward, grad) in robustness_cases().items():
        runs = []
        for _ in range(2):
            out, leaves = forward()
            runs.append((out.detach(), torch.autograd.grad(out, leaves, grad.to(out.dtype))))
        (out1, grads1), (out2, grads2) = runs
        assert torch.equal(out1, out2), name
        assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True)), name


def test_noncontiguous_inputs():
    """x a transposed view, the weights column-major, the norm weight and biases strided, the output
    gradient a transposed view: the same bits as contiguous inputs."""
    for fn, (inputs, grad) in ((fused_mlp, mlp_inputs((3, 25, 48), 130)),
                               (fused_linear, linear_inputs((3, 25, 48), 72))):
        expected_out, expected_grads = run(fn, inputs, grad)
        strided = [inputs[0].transpose(0, 1).contiguous().transpose(0, 1)]
        for t in inputs[1:]:
            if t.dim() == 2:
                strided.append(t.t().contiguous().t())
            else:
                strided.append(torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0])
        assert not any(t.is_contiguous() for t in strided)
        grad_t = grad.transpose(0, 1).contiguous().transpose(0, 1)
        leaves = [t.detach().requires_grad_(True) for t in strided]  # keeps the strides
        with autocast():
            out = fn(*leaves)
        assert autocast_names(out)
        grads = torch.autograd.grad(out, leaves, grad_t.to(out.dtype))
        assert torch.equal(out, expected_out)
        for i, (a, b) in enumerate(zip(grads, expected_grads, strict=True)):
            assert torch.equal(a, b), i
    # Block on a transposed x.
    block = make_block(32, 4)
    x = torch.randn(9, 2, 32, generator=gen(3))
    with autocast():
        a, b = block(x.transpose(0, 1)), block(x.transpose(0, 1).contiguous())
    assert autocast_names(a) and torch.equal(a, b)


def test_sum_and_zero_output_gradients():
    """out.sum() sends a stride-0 gradient; out * 0 exact zeros (the bias gradients are float32 sums)."""
    inputs, _ = mlp_inputs((2, 30, 32), 64)
    exact_out, exact_grads = run(unfused_mlp, [t.double() for t in inputs], torch.ones(2, 30, 32).double(), False)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with autocast():
        out = fused_mlp(*leaves)
    assert autocast_names(out)
    grads = torch.autograd.grad(out.sum(), leaves)
    _, base_grads = run(unfused_mlp, inputs, torch.ones(2, 30, 32))
    for i, (a, b, e) in enumerate(zip(grads, base_grads, exact_grads, strict=True)):
        assert rel_error(a, e) <= 1.5 * rel_error(b, e) + 1e-6, i
    with autocast():
        out = fused_mlp(*leaves)
    for leaf, g in zip(leaves, torch.autograd.grad((out * 0).sum(), leaves), strict=True):
        assert torch.equal(g, torch.zeros_like(leaf))


def test_zero_rows():
    """No rows under autocast: empty outputs, exactly zero parameter gradients."""
    inputs, _ = mlp_inputs((3, 0, 16), 32)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with autocast():
        out = fused_mlp(*leaves)
        lin = fused_linear(*leaves[:5])
    assert out.shape == (3, 0, 16) and lin.shape == (3, 0, 32)
    for result, params in ((out, leaves[1:]), (lin, leaves[1:5])):
        for param, g in zip(params, torch.autograd.grad(result.float().sum(), params), strict=True):
            assert torch.equal(g, torch.zeros_like(param))


def in_fresh_thread(fn):
    """fn() on a new thread (so a new, empty per-thread workspace), re-raising what it raised."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_after_inference_mode():
    """A forward under torch.inference_mode() (evaluation), then training steps, on one thread: the later
    calls must still work and give the same results (the workspace buffers, first made under inference
    mode, must be normal tensors). Run on a fresh thread, so that a failure, whose cause would persist
    in the thread's workspace, cannot leak into other tests."""
    inputs, grad = mlp_inputs((2, 9, 32), 64)
    expected = in_fresh_thread(lambda: run(fused_mlp, inputs, grad))

    def evaluate_then_train():
        with autocast(), torch.inference_mode():
            fused_mlp(*inputs)
        return run(fused_mlp, inputs, grad)

    out, grads = in_fresh_thread(evaluate_then_train)
    assert torch.equal(out, expected[0]) and all(torch.equal(a, b) for a, b in zip(grads, expected[1], strict=True))


def test_mvmae_training_step():
    """A tiny MV-MAE (two views, reconstruction loss) under autocast: the encoder and decoder blocks take
    the autocast path, the loss is finite and within bfloat16 rounding of float64's, and the gradients
    are as accurate as those of the same model with every op forced to torch (autocast's unfused
    arithmetic) and close to them. (The contrastive loss is off: through the projector's BatchNorm at
    temperature 0.1, bfloat16 autocast alone moves the encoder's gradients by ~10%.)"""
    assert "vit_micro_patch4_32" in PRESETS
    config = MVMAEConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, dec_dim=32, dec_depth=1,
                         dec_heads=4, proj_hidden=64, proj_out=16, w_con=0.0)
    torch.manual_seed(0)
    model = MVMAE(config)
    imgs = torch.randn(2, 2, 3, 32, 32, generator=gen(0))

    def step(model, backend, use_autocast=True, dtype=torch.float32):
        model.zero_grad(set_to_none=True)
        with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            out = model(imgs.to(dtype), seed=0)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, autocast_names(out.loss)

    loss, grads, graph = step(model, None)
    assert {"_AttentionHalfBackward", "_PrenormMlpBackward"} <= graph, graph
    ref_loss, ref_grads, ref_graph = step(model, "torch")
    assert not ref_graph
    exact_loss, exact_grads, _ = step(copy.deepcopy(model).double(), "torch", False, torch.float64)
    assert loss.isfinite() and abs(loss.item() - exact_loss.item()) <= 2.0**-8 * abs(exact_loss.item())
    assert grads.keys() == ref_grads.keys() == exact_grads.keys() and len(grads) > 20
    flat, ref_flat, exact_flat = (torch.cat([g[n].flatten() for n in grads]) for g in (grads, ref_grads, exact_grads))
    assert flat.isfinite().all()
    err, ref_err = rel_error(flat, exact_flat), rel_error(ref_flat, exact_flat)
    assert err <= 1.5 * ref_err + 1e-6, f"gradients' relative error {err:.3e} > 1.5 x unfused autocast's {ref_err:.3e}"
    for name, g in grads.items():
        assert rel_error(g, ref_grads[name].double()) <= 3e-2, name


# --------------------------------------------------------------------------- #
# the generic (non-AVX-512) GELU loop
# --------------------------------------------------------------------------- #
def test_generic_isa_variant():
    """GELU's forward has an AVX-512 intrinsics path; MVMAE_FAST_CPU_ISA=generic (read once per process)
    forces the generic loop: the kernel-level tests pass on it too, in a fresh process."""
    assert isa_probe("generic", "_ext._C.fused_layers_isa()") == "generic"
    rerun_tests_under_isa("generic", __file__, "test_kernel_")


# --------------------------------------------------------------------------- #
# the linears: own AVX512-BF16 GEMMs (tests/test_linear_bf16.py) or autocast's addmm / mm
# --------------------------------------------------------------------------- #
LINEAR_KERNELS = ("linear_bf16_cpu", "linear_bf16_backward_input_cpu", "linear_bf16_backward_weight_cpu")


def linear_calls(monkeypatch):
    """Runs a Block and prenorm_linear forward and backward under autocast; returns the number of calls
    of each LINEAR_KERNELS function and the aten matrix products the profiler saw."""
    calls = {name: 0 for name in LINEAR_KERNELS}
    for name in LINEAR_KERNELS:
        def counted(*args, _f=getattr(C, name), _name=name):
            calls[_name] += 1
            return _f(*args)
        monkeypatch.setattr(C, name, counted)
    block = make_block(32, 4)
    x = torch.randn(2, 9, 32, generator=gen(0), requires_grad=True)
    (inputs, _) = linear_inputs((2, 9, 32), 48)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with autocast():
            out, lin = block(x), fused_linear(*leaves)
        (out.sum() + lin.float().sum()).backward()
    products = {e.key for e in prof.key_averages()} & {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear"}
    return calls, products


@pytest.mark.skipif(C is None or not C.linear_bf16_preferred(),
                    reason="no AVX512-BF16, or AMX (oneDNN's GEMMs are faster): the layers call addmm / mm")
def test_own_linears_used(monkeypatch):
    """On AVX512-BF16 without AMX every linear of the block (qkv, proj, fc1, fc2) and of prenorm_linear
    runs on the extension's GEMMs, forward, input gradient and weight gradient: no aten mm / addmm."""
    monkeypatch.delenv("MVMAE_FAST_CPU_BF16_GEMM", raising=False)
    calls, products = linear_calls(monkeypatch)
    assert calls == {name: 5 for name in LINEAR_KERNELS} and not products, (calls, products)


@pytest.mark.skipif(C is None or not C.linear_bf16_supported(), reason="no AVX512-BF16: the layers call addmm / mm")
@pytest.mark.parametrize("choice", ["onednn", "own"])
def test_bf16_gemm_choice(monkeypatch, choice):
    """MVMAE_FAST_CPU_BF16_GEMM=onednn puts every linear back on aten's addmm / mm; =own takes the
    extension's GEMMs even where the default would not (AMX)."""
    monkeypatch.setenv("MVMAE_FAST_CPU_BF16_GEMM", choice)
    calls, products = linear_calls(monkeypatch)
    if choice == "onednn":
        assert not any(calls.values()) and products == {"aten::mm", "aten::addmm"}, (calls, products)
    else:
        assert calls == {name: 5 for name in LINEAR_KERNELS} and not products, (calls, products)


def test_bf16_gemm_choice_refuses_unknown_values(monkeypatch):
    """A misspelt MVMAE_FAST_CPU_BF16_GEMM is an error naming the variable, not a silent default."""
    monkeypatch.setenv("MVMAE_FAST_CPU_BF16_GEMM", "cublas")
    inputs, _ = mlp_inputs((2, 9, 32), 64)
    with autocast(), pytest.raises(ValueError, match="MVMAE_FAST_CPU_BF16_GEMM='cublas'"):
        fused_mlp(*inputs)


def test_addmm_path_under_avx512():
    """MVMAE_FAST_CPU_ISA=avx512 (AVX-512 without the BF16 instructions, as older Xeons) turns the own
    GEMMs off: the layers call autocast's addmm / mm and separate GELU and residual kernels. The layer
    tests pass on that path too, in a fresh process."""
    assert isa_probe("avx512", "_ext._C.linear_bf16_supported()") == "False"
    rerun_tests_under_isa("avx512", __file__, "matches_unfused or dispatch or zero_rows or noncontiguous or "
                          "deterministic or sum_and_zero or mvmae_training or interleaved")


@pytest.mark.parametrize("which", ["prenorm_mlp", "prenorm_linear", "block"])
def test_double_backward_refused(which):
    """The autocast Functions are once-differentiable: a second derivative through them raises rather
    than silently coming back without this layer's part."""
    if which == "block":
        block = Block(32, 4)
        fn, inputs = block, [torch.randn(2, 9, 32, generator=gen(0))]
    elif which == "prenorm_mlp":
        fn, (inputs, _) = fused_mlp, mlp_inputs((2, 9, 32), 64)
    else:
        fn, (inputs, _) = fused_linear, linear_inputs((2, 9, 32), 48)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with autocast():
        out = fn(*leaves)
    assert autocast_names(out), "the autocast path was not taken"
    (dx,) = torch.autograd.grad(out.float().square().sum(), leaves[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        dx.square().sum().backward()
