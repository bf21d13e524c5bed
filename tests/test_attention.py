"""Tests for mvmae_fast.ops.attention: the torch backend, the C++ CPU kernel and the Triton kernels
(under the interpreter). Every kernel test runs for both kernel backends.

Accuracy criterion (flash-attention's): against a float64 reference, the kernel's maximum error in the
output and in each of dq, dk, dv must be at most twice that of PyTorch's own attention (SDPA, math
backend) in the same precision, plus a floor of one epsilon of the dtype at the reference's largest
magnitude (at least 1) plus 1e-6. On the CPU PyTorch's math backend computes half precision in
float32 and rounds once, a stricter baseline than any tiled kernel that rounds probabilities to
fp16 before the second matmul, hence the floor.
"""

import os
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from mvmae_fast import UnsupportedBackendError, _ext, backends, use_backend
from mvmae_fast.models.layers import Attention
from mvmae_fast.ops import attention
from mvmae_fast.ops.attention import IMPLEMENTED, KERNEL_BACKENDS, MAX_CPP_SEQ_LEN, triton_impl
from mvmae_helpers import isa_probe, rerun_tests_under_isa

kernel_backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)

# (B, H, N, Dh): odd sequence lengths (1 row, under one tile, several tiles with a ragged last one)
# and head dims 32, 64, 80 (padded to 128) and 128.
SHAPES = [(1, 2, 1, 32), (2, 3, 17, 64), (2, 2, 50, 32), (1, 3, 50, 64), (2, 1, 40, 80), (1, 2, 197, 64),
          (1, 1, 65, 128)]


def shape_id(shape):
    return "B{}-H{}-N{}-Dh{}".format(*shape)


def make_qkv(B, H, N, Dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).to(dtype)
    grad = torch.randn(B, N, H * Dh, generator=g).to(dtype)
    return qkv, grad


def ref_attention(qkv, num_heads):
    """Float64 attention written out: softmax(q k^T / sqrt(Dh)) v."""
    B, N, _ = qkv.shape
    q, k, v = qkv.double().view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)


def sdpa_math(qkv, num_heads):
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, -1)


def run(fn, qkv, grad):
    """fn's output and its gradient w.r.t. qkv, as {'out', 'dq', 'dk', 'dv'}."""
    x = qkv.detach().requires_grad_(True)  # keeps qkv's strides
    out = fn(x)
    (dqkv,) = torch.autograd.grad(out, x, grad.to(out.dtype))
    B, N, C = qkv.shape
    dq, dk, dv = dqkv.view(B, N, 3, C // 3).unbind(2)
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


def kernel_attention(num_heads, backend):
    return lambda x: attention(x, num_heads, backend=backend)


def assert_accurate(kernel, baseline, reference, dtype, context=""):
    for name, ref in reference.items():
        err = (kernel[name].double() - ref).abs().max().item()
        base_err = (baseline[name].double() - ref).abs().max().item()
        floor = torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0) + 1e-6
        assert err <= 2 * base_err + floor, (
            f"{context} {name}: max error {err:.3e} > 2 x PyTorch's {base_err:.3e} + floor {floor:.3e}")
        assert not torch.isnan(kernel[name]).any(), f"{context} {name} has NaNs"


def check_against_reference(shape, dtype, backend, seed=0):
    B, H, N, Dh = shape
    qkv, grad = make_qkv(B, H, N, Dh, dtype, seed)
    reference = run(lambda x: ref_attention(x, H), qkv.double(), grad.double())
    baseline = run(lambda x: sdpa_math(x, H), qkv, grad)
    kernel = run(kernel_attention(H, backend), qkv, grad)
    assert kernel["out"].dtype == dtype and kernel["dq"].dtype == dtype
    assert_accurate(kernel, baseline, reference, dtype, f"{backend} {dtype} {shape_id(shape)}")


# --------------------------------------------------------------------------- #
# accuracy
# --------------------------------------------------------------------------- #
@kernel_backends
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_reference(dtype, shape, backend):
    check_against_reference(shape, dtype, backend)


@kernel_backends
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (2, 1, 40, 80), (3, 4, 65, 16)], ids=shape_id)
def test_matches_reference_bfloat16(shape, backend):
    """The interpreter computes bf16 in float32 and truncates on store: within the same floor."""
    check_against_reference(shape, torch.bfloat16, backend)


# The bfloat16 heads on AVX512-BF16 products (where the CPU has them; else the float32 heads): the
# preset steps' encoder and decoder shapes, one row, an even row count that fills its vectors (16),
# pairs left over along keys and queries (odd N), ViT-B/16's 197 tokens, head dims of one pair (2),
# of 16 pairs + 1 (34, a ragged word block), 80 (padded output lanes) and an odd one (33: the float32
# heads instead).
BF16_CPP_SHAPES = [(3, 3, 17, 64), (2, 4, 65, 32), (2, 2, 1, 32), (1, 2, 16, 64), (1, 2, 197, 64), (2, 1, 31, 2),
                   (1, 2, 47, 34), (1, 1, 50, 80), (2, 1, 9, 33)]


@pytest.mark.parametrize("shape", BF16_CPP_SHAPES, ids=shape_id)
def test_cpp_bfloat16(shape):
    check_against_reference(shape, torch.bfloat16, "cpp", seed=2)


def test_cpp_bfloat16_dot_dispatch():
    """attention_bf16_dot: even head dims only, and only where the CPU has AVX512-BF16."""
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    has = " avx512_bf16" in flags and os.environ.get("MVMAE_FAST_CPU_ISA") not in ("avx512", "avx2", "generic")
    assert _ext._C.attention_bf16_dot(64) == has and _ext._C.attention_bf16_dot(2) == has
    assert not _ext._C.attention_bf16_dot(33)


def bf16_dot_emulation(qkv, grad, num_heads, round_products):
    """What the bf16 heads compute, in float64 from the same bf16 inputs: softmax of the exact scaled
    scores, and when ``round_products`` the operands of the products rounded to bfloat16 as the heads
    round them (the forward's unnormalised exp(s - max), the backward's P and dS); outputs rounded to
    bfloat16 once. Returns {'out', 'dq', 'dk', 'dv'}."""
    B, N, C = qkv.shape
    q, k, v = qkv.double().view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    scale = q.shape[-1] ** -0.5
    rnd = (lambda t: t.to(torch.bfloat16).double()) if round_products else (lambda t: t)
    scores = q @ k.transpose(-1, -2) * scale
    e = (scores - scores.amax(-1, keepdim=True)).exp()  # the forward rounds these, largest 1, before P v
    o = ((rnd(e) @ v) / e.sum(-1, keepdim=True)).to(torch.bfloat16)
    p = scores.softmax(-1)  # the backward recomputes P from lse: normalised, then rounded
    do = grad.double().view(B, N, num_heads, -1).transpose(1, 2)
    delta = (do * o.double()).sum(-1, keepdim=True)
    ds = p * (do @ v.transpose(-1, -2) - delta)
    grads = {"dq": scale * (rnd(ds) @ k), "dk": scale * (rnd(ds).transpose(-1, -2) @ q),
             "dv": rnd(p).transpose(-1, -2) @ do, "out": o}
    return {name: t.transpose(1, 2).reshape(B, N, -1).to(torch.bfloat16) for name, t in grads.items()}


@pytest.mark.skipif(_ext._C is None or not _ext._C.attention_bf16_dot(32),
                    reason="the CPU has no AVX512-BF16: the bfloat16 heads do not run here")
def test_cpp_bfloat16_products_round_as_autocast():
    """The bf16 heads' outputs are, bit for bit in nearly every element, a float64 emulation that rounds P
    and dS to bfloat16 before their products (float32 accumulation moves a few elements across a
    rounding boundary), and clearly not the same emulation without those roundings."""
    B, H, N, Dh = 2, 4, 65, 32
    qkv, grad = make_qkv(B, H, N, Dh, torch.bfloat16, seed=5)
    qkv = qkv * 2  # peakier softmax rows: P's rounding shows
    got = run(kernel_attention(H, "cpp"), qkv, grad)
    rounded = bf16_dot_emulation(qkv, grad, H, round_products=True)
    exact = bf16_dot_emulation(qkv, grad, H, round_products=False)
    for name in ("out", "dq", "dk", "dv"):
        same = (got[name] == rounded[name]).double().mean().item()
        same_exact = (got[name] == exact[name]).double().mean().item()
        assert same >= 0.98, f"{name}: {same:.4f} of the elements equal the rounding emulation's"
        assert same_exact <= same - 0.05, f"{name}: {same_exact:.4f} equal the unrounded emulation's vs {same:.4f}"


@pytest.mark.skipif(_ext._C is None or not _ext._C.attention_bf16_dot(64),
                    reason="the CPU has no AVX512-BF16: the float32 heads already run everywhere")
def test_cpp_float32_heads_for_bfloat16():
    """MVMAE_FAST_CPU_ISA=avx512 (read once per process) keeps AVX-512 but not its BF16 products: the
    cpp tests pass on the float32 heads too, in a fresh process."""
    assert isa_probe("avx512", "_ext._C.attention_bf16_dot(64)") == "False"
    rerun_tests_under_isa("avx512", __file__, "cpp and not float32_heads")


@pytest.mark.parametrize("shape", [(1, 1, 3, 1), (2, 2, 7, 17), (1, 1, 33, 200)], ids=shape_id)
def test_cpp_odd_head_dims(shape):
    """The cpp kernel pads head dims to 16 floats and sequences to 16 columns: odd sizes, no limit."""
    check_against_reference(shape, torch.float32, "cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpp_conversions_are_exact(dtype):
    """One key: out == v bit for bit (the dtype round trip, subnormals, inf and NaN included).
    Two identical keys: out == (v1 + v2) / 2 rounded once to nearest even, as torch rounds."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny, -info.tiny / 4, info.max, -info.max, float("inf"),
                            float("-inf"), 1.0 + info.eps, 3.0]).to(dtype)
    v = torch.cat([special, torch.randn(22).to(dtype)])
    qkv = torch.cat([torch.randn(32).to(dtype), torch.randn(32).to(dtype), v]).view(1, 1, 96)  # 1 head, Dh 32
    out = attention(qkv, 1, backend="cpp")
    assert torch.equal(out.view(-1).isnan(), v.isnan())
    keep = ~v.isnan()
    expected = v
    if dtype == torch.bfloat16 and _ext._C.attention_bf16_dot(32):
        # AVX512-BF16 products read subnormal bfloat16 as zero (as oneDNN's bfloat16 GEMMs do).
        expected = torch.where(v.abs() < info.tiny, torch.zeros_like(v), v)
        assert not torch.equal(expected, v)  # the special values include one
    assert torch.equal(out.view(-1)[keep], expected[keep])

    # Two tokens with identical keys: each probability is exactly 1/2.
    v1, v2 = torch.randn(2, 32).to(dtype).unbind(0)
    q, k = torch.randn(2, 32).to(dtype), torch.randn(32).to(dtype)
    qkv = torch.stack([torch.cat([q[0], k, v1]), torch.cat([q[1], k, v2])]).unsqueeze(0)
    out = attention(qkv, 1, backend="cpp")
    expected = ((v1.float() + v2.float()) * 0.5).to(dtype)
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 1], expected)


# (B, H, N, Dh) with heads big enough that each is worth a thread: one sample and three (ranges of
# (sample, head) tasks that split samples between threads), and seven (ranges uneven for 2 and 3
# threads), from which a thread that finishes first takes the others' last tasks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 33, 32), (1, 3, 65, 64), (3, 2, 65, 64), (7, 2, 65, 64)], ids=shape_id)
def test_cpp_independent_of_thread_count(shape, dtype):
    """The same bits for every thread count and schedule; more threads than cores (4 here) get
    descheduled mid-call, so the others take over their samples."""
    qkv, grad = make_qkv(*shape, dtype)
    threads = torch.get_num_threads()
    results = []
    for count in (1, 2, 3, 4):
        torch.set_num_threads(count)
        try:
            for _ in range(3 if count > 2 else 1):
                results.append(run(kernel_attention(shape[1], "cpp"), qkv, grad))
        finally:
            torch.set_num_threads(threads)
    one = results[0]
    for other in results[1:]:
        for name in one:
            assert torch.equal(one[name], other[name]), name
    expected = run(lambda x: ref_attention(x, shape[1]), qkv.double(), grad.double())
    if dtype == torch.bfloat16:
        assert_accurate(one, run(lambda x: sdpa_math(x, shape[1]), qkv, grad), expected, dtype)
        return
    for name in one:
        torch.testing.assert_close(one[name].double(), expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)], ids=str)
def test_small_tiles(monkeypatch, blocks):
    """Many ragged tiles, unequal query and key tiles: the loop bounds and masks at every edge."""
    monkeypatch.setattr(triton_impl, "interpreter_blocks", lambda seq_len: blocks)
    check_against_reference((1, 2, 50, 80), torch.float32, "triton", seed=1)


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("triton", torch.float32), ("cpp", torch.bfloat16)])
def test_log_sum_exp_saved_for_backward(backend, dtype):
    """lse against float64 logsumexp of the same (bf16-valued) inputs: the bf16 heads' products are exact."""
    B, H, N, Dh = 2, 3, 50, 32
    qkv, _ = make_qkv(B, H, N, Dh, dtype)
    out, lse = torch.ops.mvmae_fast.attention(qkv, H, backend)
    q, k, _ = qkv.double().view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) * Dh**-0.5, dim=-1)
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected, rtol=0, atol=1e-5)
    atol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # outputs are within 1 of |v|
    torch.testing.assert_close(out.double(), ref_attention(qkv, H), rtol=0, atol=atol)


@kernel_backends
def test_scores_far_from_zero(backend):
    """Large logits (online-softmax rescaling) and a single dominant key per row."""
    B, H, N, Dh = 1, 2, 40, 64
    qkv, grad = make_qkv(B, H, N, Dh, torch.float32, seed=3)
    qkv = qkv * 4
    reference = run(lambda x: ref_attention(x, H), qkv.double(), grad.double())
    assert_accurate(run(kernel_attention(H, backend), qkv, grad), run(lambda x: sdpa_math(x, H), qkv, grad), reference,
                    torch.float32)


# --------------------------------------------------------------------------- #
# determinism, layouts
# --------------------------------------------------------------------------- #
@kernel_backends
def test_backward_is_deterministic(backend):
    qkv, grad = make_qkv(2, 2, 197, 32, torch.float16)
    first = run(kernel_attention(2, backend), qkv, grad)
    second = run(kernel_attention(2, backend), qkv, grad)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("triton", torch.float32), ("cpp", torch.bfloat16)])
def test_noncontiguous_inputs_match_contiguous(backend, dtype):
    B, H, N, Dh = 2, 2, 17, 32
    qkv, grad = make_qkv(B, H, N, Dh, dtype)
    expected = run(kernel_attention(H, backend), qkv, grad)
    # (N, B, C) storage seen as (B, N, C); a last dimension with stride 2; a transposed gradient.
    transposed = qkv.transpose(0, 1).contiguous().transpose(0, 1)
    strided = torch.stack([qkv, torch.full_like(qkv, float("nan"))], dim=-1)[..., 0]
    grad_t = grad.transpose(0, 1).contiguous().transpose(0, 1)
    assert not transposed.is_contiguous() and strided.stride(2) == 2 and not grad_t.is_contiguous()
    for x, g in ((transposed, grad), (strided, grad_t)):

        def fn(y, strides=x.stride()):
            assert y.stride() == strides
            return attention(y, H, backend=backend)

        got = run(fn, x, g)
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


@kernel_backends
def test_expanded_output_gradient(backend):
    """out.sum() backpropagates a stride-0 gradient."""
    B, H, N, Dh = 1, 2, 17, 32
    qkv, _ = make_qkv(B, H, N, Dh, torch.float32)
    ones = torch.ones(B, N, H * Dh)
    x = qkv.clone().requires_grad_(True)
    attention(x, H, backend=backend).sum().backward()
    expected = run(lambda y: ref_attention(y, H), qkv.double(), ones.double())
    got = x.grad.view(B, N, 3, -1).unbind(2)
    for name, value in zip(("dq", "dk", "dv"), got):
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- #
# registration
# --------------------------------------------------------------------------- #
@kernel_backends
def test_opcheck(backend):
    qkv, grad = make_qkv(2, 2, 17, 32, torch.float32)
    torch.library.opcheck(torch.ops.mvmae_fast.attention.default, (qkv.requires_grad_(True), 2, backend))
    out, lse = torch.ops.mvmae_fast.attention(qkv.detach(), 2, backend)
    torch.library.opcheck(torch.ops.mvmae_fast.attention_backward.default,
                          (grad, qkv.detach(), out, lse, 2, backend))


@kernel_backends
def test_torch_compile_fullgraph(backend):
    qkv, grad = make_qkv(1, 2, 17, 32, torch.float32)
    compiled = torch.compile(lambda x: attention(x, 2, backend=backend), fullgraph=True)
    got = run(compiled, qkv, grad)
    expected = run(kernel_attention(2, backend), qkv, grad)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# dispatch
# --------------------------------------------------------------------------- #
def test_default_dispatch():
    assert IMPLEMENTED == ("torch", "cpp", "triton")
    assert backends.select_backend("attention", "cuda", "", ("torch", "triton")) == "triton"
    assert backends.select_backend("attention", "cpu", "", IMPLEMENTED) == "cpp"
    qkv, _ = make_qkv(2, 2, 17, 32, torch.float32)
    assert torch.equal(attention(qkv, 2), attention(qkv, 2, backend="cpp"))
    with use_backend("triton"):
        forced = attention(qkv, 2)
    assert torch.equal(forced, attention(qkv, 2, backend="triton"))
    with use_backend("torch"):
        forced = attention(qkv, 2)
    assert torch.equal(forced, attention(qkv, 2, backend="torch"))
    # float64 is beyond the kernels: the automatic choice falls back to torch, a forced one raises.
    assert torch.equal(attention(qkv.double(), 2), attention(qkv.double(), 2, backend="torch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_cpp_refuses_cuda_tensors():
    qkv = torch.randn(1, 5, 3 * 2 * 8, device="cuda")
    with pytest.raises(UnsupportedBackendError, match="no cpp implementation"):
        attention(qkv, 2, backend="cpp")
    with pytest.raises(UnsupportedBackendError, match="CPU-only"):
        torch.ops.mvmae_fast.attention(qkv, 2, "cpp")


def test_torch_backend_is_plain_autograd():
    qkv, _ = make_qkv(1, 2, 9, 16, torch.float64)
    x = qkv.requires_grad_(True)
    # The kernels in eager mode: an autograd Function calling them directly; traced (make_fx here),
    # the custom op.
    for backend in KERNEL_BACKENDS:
        assert type(attention(x.float(), 2, backend=backend).grad_fn).__name__ == "_EagerKernelAttentionBackward"
        traced = make_fx(lambda y: attention(y, 2, backend=backend))(x.detach().float())
        assert any("mvmae_fast.attention" in str(node.target) for node in traced.graph.nodes)
    assert "mvmae_fast" not in type(attention(x, 2, backend="torch").grad_fn).__name__
    assert "Eager" not in type(attention(x, 2, backend="torch").grad_fn).__name__
    assert torch.autograd.gradcheck(lambda y: attention(y, 2, backend="torch"), (x,))


REFUSED = {"float64": (lambda: torch.randn(1, 5, 3 * 2 * 16, dtype=torch.float64), 2, "float64", KERNEL_BACKENDS),
           "head_dim_136": (lambda: torch.randn(1, 5, 3 * 136), 1, "head dim 136", ("triton",)),
           "long_sequence": (lambda: torch.randn(1, MAX_CPP_SEQ_LEN + 1, 3 * 2), 1,
                             f"sequence length {MAX_CPP_SEQ_LEN + 1}", ("cpp",))}


@pytest.mark.parametrize("case,backend", [(c, b) for c, v in REFUSED.items() for b in v[3]])
def test_inputs_the_kernels_refuse(monkeypatch, case, backend):
    make, heads, message, _ = REFUSED[case]
    qkv = make()
    with pytest.raises(UnsupportedBackendError, match=message):
        attention(qkv, heads, backend=backend)
    with pytest.raises(UnsupportedBackendError, match=message):
        torch.ops.mvmae_fast.attention(qkv, heads, backend)
    # The automatic choice of that backend takes torch instead.
    monkeypatch.setattr(backends, "select_backend", lambda *args, **kwargs: backend)
    torch.testing.assert_close(attention(qkv, heads), ref_attention(qkv, heads).to(qkv.dtype))


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", IMPLEMENTED)
def test_validation(backend):
    good = torch.randn(2, 5, 3 * 2 * 8)
    with pytest.raises(ValueError, match="qkv must have 3 dimensions"):
        attention(good[0], 2, backend=backend)
    with pytest.raises(TypeError, match="qkv must have dtype"):
        attention(good.to(torch.int32), 2, backend=backend)
    with pytest.raises(ValueError, match="multiple of 3 \\* num_heads"):
        attention(good, 5, backend=backend)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        attention(good, 0, backend=backend)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        attention(good, True, backend=backend)
    for empty in (good[:0], good[:, :0], torch.randn(2, 5, 0)):
        with pytest.raises(ValueError, match="qkv has an empty dimension"):
            attention(empty, 2, backend=backend)


@kernel_backends
def test_backward_op_validation(backend):
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    out, lse = torch.ops.mvmae_fast.attention(qkv, 2, backend)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.mvmae_fast.attention_backward(out[:, :4], qkv, out, lse, 2, backend)
    with pytest.raises(ValueError, match="lse must have shape"):
        torch.ops.mvmae_fast.attention_backward(out, qkv, out, lse[:1], 2, backend)
    with pytest.raises(TypeError, match="grad_out must have dtype float32"):
        torch.ops.mvmae_fast.attention_backward(out.half(), qkv, out, lse, 2, backend)


def test_model_attention_layer():
    layer = Attention(64, num_heads=2)
    x = torch.randn(2, 17, 64)
    grad = torch.randn(2, 17, 64)
    results = []
    for name in IMPLEMENTED:
        layer.zero_grad()
        x_ = x.clone().requires_grad_(True)
        with use_backend(name):
            layer(x_).backward(grad)
        results.append((x_.grad, layer.qkv.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_eager_path_equals_custom_op(backend, dtype):
    """The eager autograd Function and the custom ops run the same kernels: same output and gradient
    bits, for a non-contiguous qkv and an expanded (stride-0) output gradient."""
    qkv = torch.randn(2, 19, 3 * 3 * 24, dtype=torch.float64).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    grad = torch.randn(1, 1, 3 * 24, dtype=dtype).expand(2, 19, -1)
    x1, x2 = qkv.clone().requires_grad_(True), qkv.clone().requires_grad_(True)
    eager = attention(x1, 3, backend=backend)
    assert type(eager.grad_fn).__name__ == "_EagerKernelAttentionBackward"
    op = torch.ops.mvmae_fast.attention(x2, 3, backend)[0]
    assert "mvmae_fast" in type(op.grad_fn).__name__
    assert torch.equal(eager, op)
    eager.backward(grad)
    op.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    # ... and both match the reference (so the equality above is not two identical mistakes).
    x3 = qkv.double().requires_grad_(True)
    ref = attention(x3, 3, backend="torch")
    ref.backward(grad.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(eager.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x1.grad.double(), x3.grad, rtol=tol, atol=tol)
