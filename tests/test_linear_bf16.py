"""Tests for the linears' own bfloat16 GEMMs on AVX512-BF16 (csrc/cpu/autocast.cpp: linear_bf16_cpu,
linear_bf16_backward_input_cpu, linear_bf16_backward_weight_cpu), which the CPU autocast layers
(mvmae_fast/ops/mlp/autocast.py) call instead of torch.addmm / torch.mm where the CPU has the instruction.

Each product is checked two independent ways: against float64 arithmetic on the same bfloat16 operands
(every output within one bfloat16 ulp of the exact value, i.e. one correctly rounded float32 sum away)
and against autocast's own result (torch.addmm / torch.mm under bfloat16, oneDNN): at most one ulp apart
and at least 99% bit-identical (the float32 sums run in another order, so a sum that lands on a bfloat16
rounding boundary may round the other way). The epilogues are checked bit for bit against the separate
kernels they replace (gelu_bf16_forward / gelu_bf16_backward on the product, the residual add), which
tests/test_autocast_layers.py checks against float64. Shapes cover 1 row, the 6-row blocks' ragged ends
(5, 7, 13, 65), odd reductions (K 1, 3, 33; odd rows for the weight gradient), ragged output widths
(the 16- and 32-column tiles: 1, 7, 17, 48, 130, 257) and the tiny preset's encoder shapes.

On a CPU without AVX512-BF16 (or with MVMAE_FAST_CPU_ISA below avx512bf16) the kernels do not exist and
these tests are skipped; test_autocast_layers.py's layer tests then cover the addmm path, and
test_addmm_path_under_avx512 there reruns them with the cap on machines that do have it.
"""

import pytest
import torch

from mvmae_fast import _ext
from mvmae_fast._utils import new_output

C = _ext._C
pytestmark = pytest.mark.skipif(C is None or not C.linear_bf16_supported(),
                                reason="the CPU has no AVX512-BF16: the layers keep torch.addmm / torch.mm")

# (rows, K: the reduction of the forward, N: output features)
SHAPES = [(1, 1, 1), (5, 3, 7), (6, 32, 32), (7, 33, 17), (13, 48, 130), (65, 130, 48), (20, 64, 257),
          (136, 192, 576), (136, 768, 192)]


def shape_id(shape):
    return "x".join(map(str, shape))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bf16_ulp(t):
    """The spacing of bfloat16 numbers at |t| (normal range)."""
    mag = t.double().abs().clamp_min(2.0**-126)
    _, exponent = torch.frexp(mag)
    return torch.ldexp(torch.ones_like(mag), exponent - 8)


def assert_one_rounding(out, exact, magnitude, terms, name):
    """Every bfloat16 output within one ulp of the float64 result plus float32 summation's error bound
    (terms x 2^-24 x the sum of the terms' magnitudes: large only where the sum cancels): one rounding of
    a float32 sum of the exact products."""
    out = out.double()
    bad = (out - exact).abs() > bf16_ulp(exact) + terms * 2.0**-24 * magnitude + 1e-30
    assert not bad.any(), f"{name}: {out[bad][:4]} vs exact {exact[bad][:4]}"


def assert_like_autocast(out, ref, name, min_same=0.99):
    """At most one bfloat16 ulp from autocast's (oneDNN's) result and mostly the same bits."""
    assert out.shape == ref.shape, name
    o, r = out.bfloat16().view(torch.int16).int(), ref.bfloat16().view(torch.int16).int()
    assert (o - r).abs().max().item() <= 1, f"{name}: more than one ulp from autocast's"
    same = (o == r).float().mean().item()
    assert same >= min_same, f"{name}: only {same:.2%} the same bits as autocast's"


def forward(a, w, b, epilogue, residual=None, threads=2):
    rows, K = a.shape
    N = w.shape[0]
    wb = new_output((N, K), torch.bfloat16, "cpu")
    out = new_output((rows, N), torch.float32 if epilogue == 2 else torch.bfloat16, "cpu")
    deriv = new_output((rows, N), torch.float16, "cpu")
    C.linear_bf16_cpu(a.data_ptr(), w.data_ptr(), b.data_ptr(), wb.data_ptr(), rows, K, N, epilogue, out.data_ptr(),
                      deriv.data_ptr(), 0 if residual is None else residual.data_ptr(), threads)
    return out, wb, deriv


def backward_input(g, wb, deriv=None, threads=2):
    rows, N = g.shape
    K = wb.shape[1]
    out, colsum = new_output((rows, K), torch.bfloat16, "cpu"), new_output((K,), torch.float32, "cpu")
    C.linear_bf16_backward_input_cpu(g.data_ptr(), wb.data_ptr(), rows, N, K, out.data_ptr(), deriv is not None,
                                     0 if deriv is None else deriv.data_ptr(), colsum.data_ptr(), threads)
    return out, colsum


def backward_weight(g, x, threads=2):
    rows, N = g.shape
    K = x.shape[1]
    dw = new_output((N, K), torch.float32, "cpu")
    C.linear_bf16_backward_weight_cpu(g.data_ptr(), x.data_ptr(), rows, N, K, dw.data_ptr(), threads)
    return dw


def operands(rows, K, N, seed=0):
    a = (torch.randn(rows, K, generator=gen(seed)) * 2).bfloat16()
    w = torch.randn(N, K, generator=gen(seed + 1)) * max(K, 1) ** -0.5
    b = torch.randn(N, generator=gen(seed + 2))
    return a, w, b


def gelu_table_kernels(y):
    act, deriv = new_output(y.shape, torch.bfloat16, "cpu"), new_output(y.shape, torch.float16, "cpu")
    C.gelu_bf16_forward_cpu(y.data_ptr(), act.data_ptr(), deriv.data_ptr(), y.numel(), 2)
    return act, deriv


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_store(shape):
    rows, K, N = shape
    a, w, b = operands(rows, K, N)
    y, wb, _ = forward(a, w, b, 0)
    assert y.dtype == torch.bfloat16 and torch.equal(wb.view(torch.int16), w.bfloat16().view(torch.int16))
    wd, bd = w.bfloat16().double(), b.bfloat16().double()
    assert_one_rounding(y, a.double() @ wd.t() + bd, a.double().abs() @ wd.abs().t() + bd.abs(), K + 1, "y")
    assert_like_autocast(y, torch.addmm(b.bfloat16(), a, w.bfloat16().t()), "y")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_gelu_and_residual_epilogues(shape):
    """The fused epilogues give exactly what the separate kernels give on the stored product."""
    rows, K, N = shape
    a, w, b = operands(rows, K, N, seed=3)
    y, _, _ = forward(a, w, b, 0)
    act, _, deriv = forward(a, w, b, 1)
    ref_act, ref_deriv = gelu_table_kernels(y)
    assert torch.equal(act.view(torch.int16), ref_act.view(torch.int16))
    assert torch.equal(deriv.view(torch.int16), ref_deriv.view(torch.int16))
    residual = torch.randn(rows, N, generator=gen(9))
    out, _, _ = forward(a, w, b, 2, residual)
    assert out.dtype == torch.float32 and torch.equal(out, residual + y.float())


def test_gelu_epilogue_every_bfloat16():
    """The GELU epilogue on every bfloat16 pattern (the product is zero, so y is the bias), zeros,
    subnormals, infinities and NaN included, against gelu_bf16_forward on the stored y, bit for bit."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    b = patterns.float()
    a, w = torch.zeros(3, 2, dtype=torch.bfloat16), torch.zeros(b.numel(), 2)
    y, _, _ = forward(a, w, b, 0)
    expected = torch.where(b == 0, torch.zeros_like(b), b)  # y = b (0 + -0 = +0)
    torch.testing.assert_close(y[0].float(), expected, rtol=0, atol=0, equal_nan=True)
    act, _, deriv = forward(a, w, b, 1)
    for row in range(3):
        ref_act, ref_deriv = gelu_table_kernels(y[row].contiguous())
        assert torch.equal(act[row].view(torch.int16), ref_act.view(torch.int16))
        assert torch.equal(deriv[row].view(torch.int16), ref_deriv.view(torch.int16))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backward_input(shape):
    rows, K, N = shape  # forward's shape: the gradient g is (rows, N), wb (N, K)
    g = torch.randn(rows, N, generator=gen(4)).bfloat16()
    wb = (torch.randn(N, K, generator=gen(5)) * N**-0.5).bfloat16()
    dx, _ = backward_input(g, wb)
    assert_one_rounding(dx, g.double() @ wb.double(), g.double().abs() @ wb.double().abs(), N, "dx")
    assert_like_autocast(dx, torch.mm(g, wb), "dx")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backward_input_with_gelu(shape):
    """dpre and the bias gradient as gelu_bf16_backward computes them on the product."""
    rows, K, N = shape
    g = torch.randn(rows, N, generator=gen(6)).bfloat16()
    wb = (torch.randn(N, K, generator=gen(7)) * N**-0.5).bfloat16()
    _, deriv = gelu_table_kernels((torch.randn(rows, K, generator=gen(8)) * 3).bfloat16())
    dact, _ = backward_input(g, wb)
    dpre, colsum = backward_input(g, wb, deriv)
    ref, ref_colsum = new_output((rows, K), torch.bfloat16, "cpu"), new_output((K,), torch.float32, "cpu")
    C.gelu_bf16_backward_cpu(dact.data_ptr(), deriv.data_ptr(), ref.data_ptr(), ref_colsum.data_ptr(), rows, K, 2)
    assert torch.equal(dpre.view(torch.int16), ref.view(torch.int16))
    products = dact.double() * (deriv.double() / 16384.0)  # the unrounded products the sums are of
    scale = products.abs().sum(0) + 1e-30
    assert ((colsum.double() - products.sum(0)).abs() <= 1e-5 * scale).all()


# + several chunks of the rows' pairs (chunks of ~96k words of x's pairs: 128 pairs at K 768): 601 rows
# are 2 whole chunks and an odd part; 1088 rows of K 64 the tiny decoder's proportions.
@pytest.mark.parametrize("shape", SHAPES + [(601, 768, 40), (1088, 64, 48), (31, 24, 40)], ids=shape_id)
def test_backward_weight(shape):
    rows, K, N = shape  # dw (N, K) = g^T x over the rows (odd rows: a half-empty last pair)
    g = torch.randn(rows, N, generator=gen(10)).bfloat16()
    x = torch.randn(rows, K, generator=gen(11)).bfloat16()
    dw = backward_weight(g, x)
    assert dw.dtype == torch.float32
    assert torch.equal(dw.bfloat16().float(), dw), "not bfloat16 values (autocast's mm output, then .float())"
    assert_one_rounding(dw, g.double().t() @ x.double(), g.double().abs().t() @ x.double().abs(), rows, "dw")
    assert_like_autocast(dw, torch.mm(g.t(), x), "dw")


@pytest.mark.parametrize("rows, K, N", [(203, 72, 90), (1100, 190, 200)])
def test_thread_counts(rows, K, N):
    """The threads claim pieces of the rows (or of dw's rows) in whatever order they get to them: every
    product, and the bias gradient's column sums (one partial per piece, added in piece order), are the
    same bits for any thread count and any run. (1100, 190, 200): 62 pieces for y and for dpre, two
    chunks of row pairs of 34 pieces each for dw."""
    a, w, b = operands(rows, K, N, seed=12)
    g = torch.randn(rows, N, generator=gen(13)).bfloat16()
    _, deriv = gelu_table_kernels((torch.randn(rows, K, generator=gen(14)) * 3).bfloat16())

    def run(threads):
        y, wb, _ = forward(a, w, b, 0, threads=threads)
        act, _, d = forward(a, w, b, 1, threads=threads)
        dpre, colsum = backward_input(g, wb, deriv, threads=threads)
        bits = [t.view(torch.int16) for t in (y, act, d, dpre)]
        return bits + [backward_weight(g, a, threads=threads), colsum]

    first = run(1)
    for threads in (2, 3, 4, 2):
        assert all(torch.equal(t1, t2) for t1, t2 in zip(first, run(threads), strict=True)), threads


def test_nan_and_infinity_propagate():
    """A NaN or infinite operand reaches exactly the outputs whose sums include it, as in autocast's GEMM."""
    a, w, b = operands(13, 33, 40, seed=15)
    a[2, 5] = float("nan")
    a[7, 32] = float("inf")  # the odd K's last element: the single-element step
    y, wb, _ = forward(a, w, b, 0)
    ref = torch.addmm(b.bfloat16(), a, w.bfloat16().t())
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    g = torch.randn(13, 40, generator=gen(16)).bfloat16()
    g[4, 39] = float("nan")
    dx, _ = backward_input(g, wb)
    assert dx[4].isnan().all() and not dx[[3, 5]].isnan().any()
    dw = backward_weight(g, a)
    assert torch.equal(dw.isnan(), torch.mm(g.t(), a).float().isnan())


def test_no_input_features():
    """K = 0: every sum is empty, so y is the bias rounded to bfloat16 (as addmm), through each epilogue."""
    a, w, b = operands(7, 0, 20)
    y, wb, _ = forward(a, w, b, 0)
    assert wb.shape == (20, 0) and torch.equal(y, torch.addmm(b.bfloat16(), a, w.bfloat16().t()))
    assert torch.equal(y, b.bfloat16().expand(7, 20))
    act, _, deriv = forward(a, w, b, 1)
    ref_act, ref_deriv = gelu_table_kernels(y)
    assert torch.equal(act, ref_act) and torch.equal(deriv, ref_deriv)
    residual = torch.randn(7, 20, generator=gen(17))
    assert torch.equal(forward(a, w, b, 2, residual)[0], residual + y.float())
    dx, _ = backward_input(torch.randn(7, 20, generator=gen(18)).bfloat16(), wb)
    assert dx.shape == (7, 0)


def test_zero_rows():
    """No rows: the weight is still cast (the backward's operand), the weight gradient is zero."""
    a, w, b = operands(0, 24, 10)
    y, wb, _ = forward(a, w, b, 0)
    assert y.shape == (0, 10) and torch.equal(wb.view(torch.int16), w.bfloat16().view(torch.int16))
    g = torch.empty(0, 10, dtype=torch.bfloat16)
    _, colsum = backward_input(g, wb, torch.empty(0, 24, dtype=torch.float16))
    assert torch.equal(colsum, torch.zeros(24))
    assert torch.equal(backward_weight(g, a), torch.zeros(10, 24))
