"""Kernel-level tests of the autocast layers' Triton kernels (mvmae_fast/ops/mlp/autocast_triton.py), the
twins of the CPU C++ kernels tested at kernel level in tests/test_autocast_layers.py, for both activation
dtypes (bfloat16 and float16). The functions run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest) and write outputs allocated with ``new_output``, which NaN-fills them
(MVMAE_FAST_POISON=1): an element a kernel does not write fails the comparison.

References are independent of the kernels: float64 torch math where the result is arithmetic (LayerNorm
and its autograd gradients, the erfc form of GELU and its derivative, column sums) and torch's own float32
arithmetic, rounded once, where the kernel's result is one rounding of a float32 value (the casts of
cast_colsum, gelu_backward's product dact * deriv / 2^14). Column sums must be at most 2 x as far from the
float64 sum as torch's float32 sum is (+ a floor of one float32 epsilon at the sums' magnitude + 1e-6),
as in test_autocast_layers.py; several row groups (partial rows summed by torch) and several column blocks
are covered, also with MAX_SUM_GROUPS patched (to 3: each group loops over several row steps and the last
group is short; to 1 over 5000 rows: one group of long running sums).

The interpreter's conversions (checked when these tests were written, Triton 3.9 / numpy): float32 ->
float16 rounds to nearest even (numpy's cast: ties, subnormals and overflow included), so float16 stores are
compared bit for bit where the kernel's result is one rounding of a float32 value. float32 -> bfloat16
TRUNCATES (a GPU rounds to nearest even; /work/shared/docs/TOOLCHAIN.md), so bfloat16 stores must equal
either the round-to-nearest or the round-toward-zero value (within one bfloat16 ulp), and arithmetic
comparisons allow a full bfloat16 ulp for the store instead of half of one. The interpreter also converts
float32 subnormals to bfloat16 wrongly (its _convert_float normalises them and then clamps the exponent:
1e-40 -> 1.01e-39): the bfloat16 tests keep every value a kernel converts to bfloat16 normal.

test_negative_controls shows the criteria can fail: a LayerNorm reference with the wrong eps and a
LayerNorm backward reference without the residual are outside them, and so is a cast off by one ulp.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from mvmae_fast._utils import new_output
from mvmae_fast.ops.mlp import autocast_triton as at
from autocast_helpers import assert_sum_accurate, gelu64, gelu_grad64

# CPU tensors through the interpreter; on a GPU machine (TRITON_INTERPRET=0) the kernels are checked
# natively through the Functions by tests/test_autocast_triton_layers.py.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors: runs under the Triton interpreter only")

DTYPES = (torch.bfloat16, torch.float16)
EPS32 = torch.finfo(torch.float32).eps
GELU_SCALE = 16384.0  # gelu' is stored as float16 times 2^14
SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11}  # with the implicit bit
# The interpreter's float32 -> act conversion error, in act ulps: truncation (< 1 ulp) for bfloat16, round
# to nearest (<= 1/2 ulp) for float16.
STORE_ULPS = {torch.bfloat16: 1.0, torch.float16: 0.5}
ROWS = (1, 17, 65, 200)
COLS = (1, 7, 48, 130)
SHAPES = [(r, c) for r in ROWS for c in COLS]
# LayerNorm rows: D = 1 (every row constant), not powers of two, over 128 (BLOCK_D 256, 1024) and MAX_DIM.
LN_SHAPES = [(1, 48), (17, 1), (17, 7), (65, 48), (200, 130), (5, 768), (3, at.MAX_DIM)]
# Values GELU's tails, zero and the sign must get right, planted in every GELU input.
GELU_SPECIALS = (0.0, -0.0, 4.0, -4.0, 8.0, -8.0, 12.0, -12.0, 30.0, -30.0, 0.5, -0.75, float("nan"))


def shape_id(shape):
    return "x".join(map(str, shape))


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def new(shape, dtype=torch.float32):
    """A kernel output, NaN-filled (MVMAE_FAST_POISON=1)."""
    return new_output(shape, dtype, "cpu")


def bits(t):
    """t's bit patterns."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def act_ulp(ref, dtype):
    """The spacing of ``dtype`` numbers at |ref| (float64); below the normal range the subnormals'."""
    mag = ref.double().abs().clamp_min(torch.finfo(dtype).tiny)
    _, exponent = torch.frexp(mag)  # mag = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(mag), exponent - SIGNIFICAND_BITS[dtype])


def toward_zero_bf16(t):
    """float32 t -> bfloat16 rounded toward zero (the interpreter's conversion of normal numbers)."""
    return (bits(t.float().contiguous()) >> 16).to(torch.int16).view(torch.bfloat16)


def one_rounding(out, t):
    """Where out (act) is float32 t rounded once as the interpreter may: to nearest (float16: only that),
    or for bfloat16 also toward zero; NaN for NaN."""
    t = t.float()
    ok = bits(out) == bits(t.to(out.dtype))
    if out.dtype == torch.bfloat16:
        ok |= bits(out) == bits(toward_zero_bf16(t))
    return (ok & ~t.isnan()) | (out.isnan() & t.isnan())


def assert_one_rounding(out, t, name):
    ok = one_rounding(out, t)
    assert ok.all(), f"{name}: {int((~ok).sum())} stores not float32 rounded once, e.g. {out[~ok][:4]} vs {t[~ok][:4]}"


# --------------------------------------------------------------------------- #
# the kernels, called as autocast.py's _TritonKernels calls them
# --------------------------------------------------------------------------- #
def run_layer_norm(x, gamma, beta, eps, dtype):
    rows, dim = x.shape
    return at.layer_norm(x, gamma, beta, eps, new((rows, dim), dtype), new((rows,)), new((rows,)))


def run_layer_norm_backward(dh, x, mean, rstd, gamma, residual=None):
    return at.layer_norm_backward(dh, x, mean, rstd, gamma, residual, new(x.shape))


def run_gelu(pre):
    return at.gelu_forward(pre, new(pre.shape, pre.dtype), new(pre.shape, torch.float16))


def run_gelu_backward(dact, deriv):
    return at.gelu_backward(dact, deriv, new(dact.shape, dact.dtype))


def run_cast_colsum(g, dtype):
    return at.cast_colsum(g, new(g.shape, dtype))


# --------------------------------------------------------------------------- #
# inputs and float64 references
# --------------------------------------------------------------------------- #
def ln_inputs(rows, dim, seed=0):
    """x (mean 3, std 2; row 1 constant when there are more than 2 rows: variance 0), gamma around 1,
    beta around 0."""
    g = gen(seed)
    x = torch.randn(rows, dim, generator=g) * 2 + 3
    if rows > 2:
        x[1] = 1.75
    return x, 1 + 0.5 * torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g)


def ln_stats64(x, eps):
    """Each row's float64 mean and 1/std."""
    var, mean = torch.var_mean(x.double(), 1, correction=0)
    return mean, (var + eps).rsqrt()


def gelu_input(rows, cols, dtype, seed=0):
    """(rows, cols) in dtype, std 3, with GELU_SPECIALS planted every 5th element (cyclically)."""
    pre = torch.randn(rows * cols, generator=gen(seed)) * 3
    specials = torch.tensor(GELU_SPECIALS)
    idx = torch.arange(0, rows * cols, 5)
    pre[idx] = specials[torch.arange(len(idx)) % len(specials)]
    return pre.to(dtype).view(rows, cols)


def ln_forward_violations(h, x, gamma, beta, eps):
    """Where h is more than one act ulp from the float64 LayerNorm (eps), correctly rounded to act: half an
    ulp for the rounding and the rest for float32's error and the interpreter's truncation (bfloat16); the
    floor for outputs that cancel to near zero (beta ~ -xhat gamma), as test_autocast_layers'."""
    dim = x.shape[1]
    ref = F.layer_norm(x.double(), (dim,), gamma.double(), beta.double(), eps)
    mean, rstd = ln_stats64(x, eps)
    xhat = (x.double() - mean[:, None]) * rstd[:, None]
    floor = 4 * EPS32 * ((xhat * gamma.double()).abs() + beta.double().abs())
    diff = (h.double() - ref.to(h.dtype).double()).abs()
    return diff > act_ulp(ref, h.dtype) + floor


def ln_backward_errors(got, x, gamma, dh, residual, eps):
    """{name: (max error against float64 autograd of F.layer_norm (+ residual), allowed)}: allowed is 2 x
    torch's float32 autograd error + a floor (one float32 epsilon at the gradient's magnitude + 1e-6, and
    for dx the error of dh gamma amplified by rstd: 1/sqrt(eps) on a constant row), as
    test_autocast_layers'."""
    dim = x.shape[1]

    def autograd_ln(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, gamma, torch.zeros_like(gamma))]
        out = F.layer_norm(leaves[0], (dim,), leaves[1], leaves[2], eps)
        dx, dw, db = torch.autograd.grad(out, leaves, dh.to(dtype))
        return {"dx": dx + (0 if residual is None else residual.to(dtype)), "dweight": dw, "dbias": db}

    exact, base = autograd_ln(torch.float64), autograd_ln(torch.float32)
    _, rstd = ln_stats64(x, eps)
    amplified = (rstd * (dh.double() * gamma.double()).abs().amax(1)).max().item()
    errors = {}
    for name, ref in exact.items():
        err = (got[name].double() - ref).abs().max().item()
        torch_err = (base[name].double() - ref).abs().max().item()
        floor = EPS32 * max(ref.abs().max().item(), 1.0) + 1e-6
        errors[name] = (err, 2 * torch_err + floor + (EPS32 * amplified if name == "dx" else 0.0))
    return errors


def gelu_violations(pre, act, deriv):
    """(bad act, bad deriv) masks over the non-NaN inputs: act within the store's error (STORE_ULPS act ulps)
    of float64 GELU at the same input, plus the erf approximation's error (|erf error| <= 1.5e-7, times |x|/2)
    and float32's for the far tails' tiny values; deriv = gelu' * 2^14 in float16: float16's rounding
    (2^-11 relative) + 1e-7."""
    nan = pre.isnan()
    p, a, d = pre[~nan], act[~nan].double(), deriv[~nan].double() / GELU_SCALE
    ref, gref = gelu64(p), gelu_grad64(p)
    ulps = STORE_ULPS[act.dtype] * torch.maximum(act_ulp(ref, act.dtype), act_ulp(a, act.dtype))
    bad_act = (a - ref).abs() > ulps + 1e-7 * p.double().abs() + 1e-30
    bad_deriv = (d - gref).abs() > 2.0**-11 * gref.abs() + 1e-7
    return bad_act | ~a.isfinite(), bad_deriv | ~d.isfinite()


def assert_gelu_accurate(pre, act, deriv):
    assert act.dtype == pre.dtype and deriv.dtype == torch.float16
    nan = pre.isnan()
    assert act[nan].isnan().all() and deriv[nan].isnan().all(), "NaN in must give NaN out"
    bad_act, bad_deriv = gelu_violations(pre, act, deriv)
    p = pre[~nan]
    assert not bad_act.any(), f"gelu of {p[bad_act][:4]}: {act[~nan][bad_act][:4]} vs {gelu64(p[bad_act][:4])}"
    assert not bad_deriv.any(), (f"gelu' of {p[bad_deriv][:4]}: {deriv[~nan][bad_deriv][:4] / GELU_SCALE} vs "
                                 f"{gelu_grad64(p[bad_deriv][:4])}")


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=shape_id)
def test_layer_norm_forward(shape, dtype):
    rows, dim = shape
    eps = 1e-6 if dim % 2 == 0 else 1e-5
    x, gamma, beta = ln_inputs(rows, dim)
    h, mean, rstd = run_layer_norm(x, gamma, beta, eps, dtype)
    assert h.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    bad = ln_forward_violations(h, x, gamma, beta, eps)
    assert not bad.any(), f"{int(bad.sum())} outputs over one ulp of float64's, e.g. {h[bad][:4]}"
    # What autocast computes (torch's float32 LayerNorm, cast): nearly always the same stores.
    same = one_rounding(h, F.layer_norm(x, (dim,), gamma, beta, eps)).float().mean().item()
    assert same >= 0.99, f"only {same:.2%} of outputs equal autocast's"
    mu, rs = ln_stats64(x, eps)
    torch.testing.assert_close(mean.double(), mu, rtol=1e-6, atol=1e-6 * x.abs().max().item())
    torch.testing.assert_close(rstd.double(), rs, rtol=2e-6, atol=0)
    constant = range(rows) if dim == 1 else [1] if rows > 2 else []
    for r in constant:  # variance 0: the exact mean, rstd = 1/sqrt(eps), outputs beta rounded once
        assert mean[r].item() == x[r, 0].item(), (r, mean[r])
        assert_one_rounding(h[r], beta, f"constant row {r}")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=shape_id)
def test_layer_norm_backward(shape, dtype, residual):
    rows, dim = shape
    eps = 1e-6
    x, gamma, _ = ln_inputs(rows, dim, seed=4)
    mean, rstd = (s.float() for s in ln_stats64(x, eps))
    dh = torch.randn(rows, dim, generator=gen(5)).to(dtype)
    res = torch.randn(rows, dim, generator=gen(6)) if residual else None
    dx, dw, db = run_layer_norm_backward(dh, x, mean, rstd, gamma, res)
    assert dx.dtype == dw.dtype == db.dtype == torch.float32 and dw.shape == db.shape == (dim,)
    got = {"dx": dx, "dweight": dw, "dbias": db}
    for name, (err, allowed) in ln_backward_errors(got, x, gamma, dh, res, eps).items():
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gelu_forward(shape, dtype):
    pre = gelu_input(*shape, dtype)
    act, deriv = run_gelu(pre)
    assert pre.isnan().any() or pre.numel() < 65
    assert_gelu_accurate(pre, act, deriv)
    # Exact where GELU is exact in act: gelu(0) = 0, gelu'(0) = 1/2, gelu(30) = 30, gelu'(30) = 1, ...
    for value, expected_act, expected_grad in ((0.0, 0.0, 0.5), (30.0, 30.0, 1.0), (12.0, 12.0, 1.0)):
        at_value = pre == value
        if at_value.any():
            assert (act[at_value].float() == expected_act).all(), (value, act[at_value])
            assert (deriv[at_value].float() / GELU_SCALE == expected_grad).all(), (value, deriv[at_value])
    at_value = pre == -30.0
    if at_value.any():
        assert (act[at_value].float() <= 0).all() and (act[at_value].float().abs() < 1e-30).all()
        assert (deriv[at_value].float().abs() < 1e-30).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, for the interpreter's inf * inf and inf * 0
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gelu_infinities_and_huge_values(dtype):
    """Past x^2 = 174 GELU and its derivative are their limits, x or 0 and 1 or 0, infinities included."""
    big = 3e38 if dtype == torch.bfloat16 else 65504.0
    values = [float("inf"), float("-inf"), big, -big, big / 30, -big / 30, 13.25, -13.25, 13.5, -13.5, 100.0,
              -100.0, 14.0, -14.0, 20.0, -20.0, 1000.0, -1000.0]
    pre = torch.tensor(values).to(dtype)
    assert pre.isfinite().sum() == len(values) - 2
    act, deriv = run_gelu(pre)
    x = pre.float()
    assert torch.equal(act.float(), torch.where(x > 0, x, torch.zeros_like(x))), act
    assert torch.equal(deriv.float() / GELU_SCALE, (x > 0).float()), deriv


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gelu_forward_every_value(dtype):
    """Every finite act value in [-40, 40] once (bfloat16: from 2^-100 in magnitude, keeping GELU's
    outputs normal; float16: its subnormals too)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    keep = every.isfinite() & (every.float().abs() <= 40)
    if dtype == torch.bfloat16:
        keep &= every.float().abs() >= 2.0**-100
    pre = every[keep].contiguous()
    act, deriv = run_gelu(pre)
    assert_gelu_accurate(pre, act, deriv)
    # torch's float32 GELU rounded once (autocast's on a GPU): the same nearly everywhere above -3.5 (torch's
    # float32 erf differs from the interpreter's (math.erf rounded) by an ulp here and there, which moves
    # float16's rounding of about 0.2% of these values).
    body = pre.float() >= -3.5
    same = one_rounding(act, F.gelu(pre.float()))[body].float().mean().item()
    assert same >= 0.99, f"only {same:.2%} of GELU outputs equal torch's"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cast_colsum(shape, dtype):
    g = torch.randn(*shape, generator=gen(1)) * 0.3
    out, colsum = run_cast_colsum(g, dtype)
    assert out.dtype == dtype
    assert_one_rounding(out, g, "cast")
    assert_sum_accurate(colsum, g, "colsum")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, for the interpreter's overflowing casts
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cast_rounding_and_specials(dtype):
    """Ties, overflow, signed zeros, inf and NaN (float16: also ties to even checked and its subnormals),
    in three column blocks' worth of values. float32 subnormals only for float16 (see the docstring)."""
    tie = torch.finfo(dtype).eps / 2  # half an ulp at 1
    top = torch.finfo(dtype).max
    values = [1 + tie, 1 + 3 * tie, -(1 + tie), -(1 + 3 * tie), 1 + tie * (1 + 2.0**-10), 1 + tie * (1 - 2.0**-10),
              2.0**10 * (1 + 3 * tie), top, top * (1 + tie), top * (1 + 3 * tie), -top * (1 + 3 * tie), 3.4028235e38,
              -3.4028235e38, float("inf"), float("-inf"), 0.0, -0.0, -7.25, 0.1, 1 / 3, -2 / 3, 123.456,
              float("nan"), -float("nan"), torch.finfo(dtype).tiny, 2.0**-126]
    if dtype == torch.float16:  # float16 subnormals, its smallest's half (a tie to 0) and under it
        values += [2.0**-24, 3 * 2.0**-25, 2.0**-25, -(2.0**-25), 2.0**-26, 1e-40, -1e-40, 5e-6, -6e-7]
    g = torch.tensor(values + [1.0 + i * tie for i in range(300 - len(values))], dtype=torch.float32)
    out, colsum = run_cast_colsum(g.view(1, -1), dtype)
    out = out.view(-1)
    assert_one_rounding(out, g, "cast")
    assert colsum.isnan().sum() == 2 and torch.equal(colsum.isinf(), g.isinf())
    if dtype == torch.float16:
        assert torch.equal(bits(out), bits(g.half())), "float16: not g.half() bit for bit"
        assert out[0].item() == 1.0 and out[1].item() == 1 + 4 * tie, "ties to even"
        assert out[8].item() == float("inf") and out[7].item() == top


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gelu_backward(shape, dtype):
    rows, cols = shape
    pre = torch.randn(rows, cols, generator=gen(2)) * 3
    deriv = (gelu_grad64(pre) * GELU_SCALE).half()  # gelu_forward's format, from float64
    dact = torch.randn(rows, cols, generator=gen(3)).to(dtype)
    dpre, colsum = run_gelu_backward(dact, deriv)
    assert dpre.dtype == dtype
    # float32: dact * (deriv * 2^-14) (the scaling exact), rounded once to act.
    assert_one_rounding(dpre, dact.float() * (deriv.float() * (1.0 / GELU_SCALE)), "dpre")
    assert_sum_accurate(colsum, dact.double() * deriv.double() / GELU_SCALE, "colsum")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_colsum(shape, dtype):
    g = (torch.randn(*shape, generator=gen(7)) + 0.25).to(dtype)
    assert_sum_accurate(at.colsum(g), g, "colsum")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_zero_rows(dtype):
    """No rows: nothing to write, column sums and weight gradients zeros of the right length."""
    cols = 9
    z32, zact = torch.empty(0, cols), torch.empty(0, cols, dtype=dtype)
    h, mean, rstd = run_layer_norm(z32, torch.ones(cols), torch.zeros(cols), 1e-6, dtype)
    assert h.shape == (0, cols) and mean.shape == rstd.shape == (0,)
    dx, dw, db = run_layer_norm_backward(zact, z32, torch.empty(0), torch.empty(0), torch.ones(cols),
                                         torch.empty(0, cols))
    assert dx.shape == (0, cols)
    act, deriv = run_gelu(zact)
    assert act.shape == deriv.shape == (0, cols)
    out, cast_sum = run_cast_colsum(z32, dtype)
    assert out.shape == (0, cols)
    dpre, dpre_sum = run_gelu_backward(zact, torch.empty(0, cols, dtype=torch.float16))
    assert dpre.shape == (0, cols)
    for name, t in {"dweight": dw, "dbias": db, "cast_colsum": cast_sum, "gelu_backward": dpre_sum,
                    "colsum": at.colsum(zact)}.items():
        assert t.dtype == torch.float32 and torch.equal(t, torch.zeros(cols)), (name, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_several_groups_per_column_sum(dtype, monkeypatch):
    """MAX_SUM_GROUPS patched to 3: 203 rows make 3 row groups of several BLOCK_R steps (the last short and
    ending in a partial step), 300 columns 3 column blocks (the last partial); LayerNorm's backward
    (BLOCK_R 8 at D = 300) 3 groups too. Row outputs exact, sums accurate and deterministic."""
    monkeypatch.setattr(at, "MAX_SUM_GROUPS", 3)
    assert at._groups(203, at.SUM_BLOCK_R) == (3, 80) and at.SUM_BLOCK_C < 300 < 3 * at.SUM_BLOCK_C
    assert at._groups(203, 8) == (3, 72)
    rows, cols = 203, 300
    g = torch.randn(rows, cols, generator=gen(20)) + 0.5
    dact = torch.randn(rows, cols, generator=gen(21)).to(dtype)
    deriv = (gelu_grad64(torch.randn(rows, cols, generator=gen(22)) * 3) * GELU_SCALE).half()
    x, gamma, _ = ln_inputs(rows, cols, seed=23)
    mean, rstd = (s.float() for s in ln_stats64(x, 1e-6))
    res = torch.randn(rows, cols, generator=gen(24))

    def everything():
        out, cast_sum = run_cast_colsum(g, dtype)
        dpre, dpre_sum = run_gelu_backward(dact, deriv)
        dx, dw, db = run_layer_norm_backward(dact, x, mean, rstd, gamma, res)
        return {"out": out, "cast_sum": cast_sum, "dpre": dpre, "dpre_sum": dpre_sum, "colsum": at.colsum(dact),
                "dx": dx, "dweight": dw, "dbias": db}

    got = everything()
    assert_one_rounding(got["out"], g, "cast")
    assert_sum_accurate(got["cast_sum"], g, "cast_colsum")
    product = dact.float() * (deriv.float() * (1.0 / GELU_SCALE))
    assert_one_rounding(got["dpre"], product, "dpre")
    assert_sum_accurate(got["dpre_sum"], dact.double() * deriv.double() / GELU_SCALE, "gelu_backward")
    assert_sum_accurate(got["colsum"], dact, "colsum")
    for name, (err, allowed) in ln_backward_errors(got, x, gamma, dact, res, 1e-6).items():
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e}"
    again = everything()
    for name, t in got.items():
        assert torch.equal(bits(t), bits(again[name])), f"{name} differs between two runs"


@pytest.mark.parametrize("max_groups", [None, 1], ids=["default-groups", "one-group"])
def test_long_column_sums(max_groups, monkeypatch):
    """5000 rows (mean 0.5): 313 row groups of one BLOCK_R step (the default MAX_SUM_GROUPS), or one group
    whose BLOCK_R strands each sum 313 rows: as accurate as torch's float32 sums either way."""
    if max_groups is not None:
        monkeypatch.setattr(at, "MAX_SUM_GROUPS", max_groups)
    rows, cols = 5000, 48
    assert at._groups(rows, at.SUM_BLOCK_R)[0] == (313 if max_groups is None else 1)
    g = torch.randn(rows, cols, generator=gen(10)) + 0.5
    _, cast_sum = run_cast_colsum(g, torch.bfloat16)
    assert_sum_accurate(cast_sum, g, "cast_colsum")
    gb = g.bfloat16()
    assert_sum_accurate(at.colsum(gb), gb, "colsum")
    x, gamma, _ = ln_inputs(rows, cols, seed=11)
    mean, rstd = (s.float() for s in ln_stats64(x, 1e-6))
    dx, dw, db = run_layer_norm_backward(gb, x, mean, rstd, gamma)
    for name, (err, allowed) in ln_backward_errors({"dx": dx, "dweight": dw, "dbias": db}, x, gamma, gb, None,
                                                   1e-6).items():
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e}"


def test_check_dim():
    assert at.check_dim(1) is None and at.check_dim(768) is None and at.check_dim(at.MAX_DIM) is None
    message = at.check_dim(at.MAX_DIM + 1)
    assert isinstance(message, str) and str(at.MAX_DIM + 1) in message


def test_negative_controls():
    """The criteria above fail on wrong results: a LayerNorm reference with eps 0.1 instead of 1e-6 (rows of
    variance ~4: outputs ~1.2% off, about 3 bfloat16 ulps), a backward reference without the residual, and
    a bfloat16 cast one ulp off."""
    x, gamma, beta = ln_inputs(17, 48)
    h, mean, rstd = run_layer_norm(x, gamma, beta, 1e-6, torch.bfloat16)
    assert not ln_forward_violations(h, x, gamma, beta, 1e-6).any()
    assert ln_forward_violations(h, x, gamma, beta, 1e-1).float().mean() > 0.25
    dh = torch.randn(17, 48, generator=gen(5)).bfloat16()
    res = torch.randn(17, 48, generator=gen(6))
    dx, dw, db = run_layer_norm_backward(dh, x, mean, rstd, gamma, res)
    got = {"dx": dx, "dweight": dw, "dbias": db}
    err, allowed = ln_backward_errors(got, x, gamma, dh, res, 1e-6)["dx"]
    assert err <= allowed
    err, allowed = ln_backward_errors(got, x, gamma, dh, None, 1e-6)["dx"]
    assert err > 100 * allowed
    g = torch.randn(4, 7, generator=gen(1))
    out, _ = run_cast_colsum(g, torch.bfloat16)
    assert one_rounding(out, g).all()
    assert not one_rounding(out, g * (1 + 2.0**-7)).any()
