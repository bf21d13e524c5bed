"""Tests for mvmae_fast.ops.mlp: fc2(gelu(fc1(x))) with the exact (erf) GELU, the torch backend and the
fused float32 C++ CPU kernel (csrc/cpu/mlp.cpp), and the model's Mlp layer that calls it; and for
mvmae_fast.ops.prenorm_mlp, x + mlp(layer_norm(x)) in one kernel, and the model's Block that calls it.

Accuracy criterion (as in test_attention.py): against a float64 reference, the kernel's maximum error in
the output (and prenorm's row statistics) and in each gradient must be at most twice that of PyTorch's own
float32 F.linear / F.gelu on the same inputs, plus a floor of one float32 epsilon at the reference's
largest magnitude (at least 1) plus 1e-6. The vector gradients are summed per 96-row chunk and then
chunk by chunk, so they meet the criterion on long inputs too (test_bias_gradients_on_long_inputs).

The shapes cover the kernel's edges: 96-row chunks (1, 95, 96, 97 and several chunks), 12/8/4/2/1-row
tiles, D and Hd off the 16/32-column panels, and the micro preset's encoder and decoder MLPs.
prenorm_mlp is held to the same criterion for its output, pre, the rows' mean and 1/std and all seven
gradients, on inputs LayerNorm has to move (mean 3, std 2) and with a non-trivial norm weight and bias.
mvmae_fast.ops.prenorm_linear, linear(layer_norm(x)) (the Block's qkv projection), likewise for its
output, mean, 1/std and five gradients, with out_features off the 16/32-column panels.
"""

import contextlib
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvmae_fast import UnsupportedBackendError, use_backend
from mvmae_fast.models.layers import Block, Mlp
from mvmae_fast.ops import attention, mlp, prenorm_linear, prenorm_mlp
from mvmae_fast.ops.mlp import reference
from mvmae_helpers import graph_names, isa_probe, rerun_tests_under_isa, uses_kernel

mlp_pkg = importlib.import_module("mvmae_fast.ops.mlp")  # the package: the attribute is the function

NAMES = ("out", "dx", "dw1", "db1", "dw2", "db2")
PRENORM_NAMES = ("out", "mean", "rstd", "dx", "dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2")
LINEAR_NAMES = ("out", "mean", "rstd", "dx", "dnorm_weight", "dnorm_bias", "dw", "db")
EPS = torch.finfo(torch.float32).eps

# (x's shape, Hd)
SHAPES = [((1, 3), 1), ((95, 17), 7), ((96, 48), 100), ((97, 130), 257), ((2, 101, 32), 64), ((250, 16), 33),
          ((64, 17, 128), 512), ((64, 65, 64), 256)]


def shape_id(case):
    shape, hidden, *eps = case  # prenorm cases carry the LayerNorm's eps
    return "x{}-Hd{}".format("x".join(map(str, shape)), hidden) + "".join(f"-eps{e:g}" for e in eps)


def make_inputs(shape, hidden, scale=1.0, seed=0):
    """[x, w1, b1, w2, b2] (float32, weights scaled like nn.Linear's outputs) and an output gradient."""
    dim = shape[-1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    w1 = torch.randn(hidden, dim, generator=g) * dim**-0.5
    b1 = torch.randn(hidden, generator=g)
    w2 = torch.randn(dim, hidden, generator=g) * hidden**-0.5
    b2 = torch.randn(dim, generator=g)
    return [x, w1, b1, w2, b2], torch.randn(shape, generator=g)


def ref_mlp(x, w1, b1, w2, b2):
    """(out,) with plain torch ops, in the inputs' precision."""
    return (F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),)


def cpp_mlp(x, w1, b1, w2, b2):
    """(out,) through ops.mlp (autograd)."""
    return (mlp(x, w1, b1, w2, b2, backend="cpp"),)


def make_prenorm_inputs(shape, hidden, seed=0):
    """[x, norm_weight, norm_bias, w1, b1, w2, b2] with x of mean 3 and std 2 (so LayerNorm has work to
    do), the norm's weight around 1 and bias around 0, and an output gradient."""
    (x, w1, b1, w2, b2), grad = make_inputs(shape, hidden, scale=2.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    norm_weight, norm_bias = 1 + 0.5 * torch.randn(shape[-1], generator=g), 0.5 * torch.randn(shape[-1], generator=g)
    return [x + 3, norm_weight, norm_bias, w1, b1, w2, b2], grad


def ref_prenorm(x, norm_weight, norm_bias, w1, b1, w2, b2, eps=1e-6):
    """(out, mean, rstd) with plain torch ops, in the inputs' precision."""
    var, mean = torch.var_mean(x, -1, correction=0)
    (out,) = ref_mlp(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), w1, b1, w2, b2)
    return x + out, mean, (var + eps).rsqrt()


def cpp_prenorm(x, norm_weight, norm_bias, w1, b1, w2, b2, eps=1e-6):
    """(out, mean, rstd): out through ops.prenorm_mlp (autograd), the rest from the raw custom op."""
    out = prenorm_mlp(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, backend="cpp")
    with torch.no_grad():
        _, mean, rstd = torch.ops.mvmae_fast.prenorm_mlp(x.reshape(-1, x.shape[-1]), norm_weight, norm_bias, eps,
                                                         w1, b1, w2, b2)
    lead = x.shape[:-1]
    return out, mean.view(lead), rstd.view(lead)


def prenorm_case(shape, hidden, eps=1e-6, seed=0):
    """make_prenorm_inputs's (inputs, grad), then check_accuracy's fn, ref and names at this eps."""
    return (*make_prenorm_inputs(shape, hidden, seed), functools.partial(cpp_prenorm, eps=eps),
            functools.partial(ref_prenorm, eps=eps), PRENORM_NAMES)


def make_linear_inputs(shape, out_features, seed=0):
    """[x, norm_weight, norm_bias, w, b] (make_prenorm_inputs's first five: x of mean 3 and std 2, w as
    (out_features, D)) and an output gradient of shape (..., out_features)."""
    inputs, _ = make_prenorm_inputs(shape, out_features, seed)
    g = torch.Generator().manual_seed(seed + 2)
    return inputs[:5], torch.randn(*shape[:-1], out_features, generator=g)


def ref_linear(x, norm_weight, norm_bias, w, b, eps=1e-6):
    """(out, mean, rstd) with plain torch ops, in the inputs' precision."""
    var, mean = torch.var_mean(x, -1, correction=0)
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), w, b), mean, (var + eps).rsqrt()


def cpp_linear(x, norm_weight, norm_bias, w, b, eps=1e-6):
    """(out, mean, rstd): out through ops.prenorm_linear (autograd), the rest from the raw custom op."""
    out = prenorm_linear(x, norm_weight, norm_bias, eps, w, b, backend="cpp")
    with torch.no_grad():
        _, mean, rstd = torch.ops.mvmae_fast.prenorm_linear(x.reshape(-1, x.shape[-1]), norm_weight, norm_bias, eps,
                                                            w, b)
    return out, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def linear_case(shape, out_features, eps=1e-6, seed=0):
    """As prenorm_case, for ops.prenorm_linear."""
    return (*make_linear_inputs(shape, out_features, seed), functools.partial(cpp_linear, eps=eps),
            functools.partial(ref_linear, eps=eps), LINEAR_NAMES)


def op_case(op, shape, hidden):
    """(inputs, grad, kernel fn, reference fn, names) for ops.mlp, ops.prenorm_mlp or ops.prenorm_linear
    (hidden: its out_features), the LayerNorm's eps 1e-6."""
    if op == "mlp":
        return (*make_inputs(shape, hidden), cpp_mlp, ref_mlp, NAMES)
    return (prenorm_case if op == "prenorm_mlp" else linear_case)(shape, hidden)


def run(fn, inputs, grad, names=NAMES):
    """{'out', 'dx', 'dw1', 'db1', 'dw2', 'db2'} for fn(*inputs) -> (out,); with PRENORM_NAMES, fn
    returns (out, mean, rstd) and there are seven gradients."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]  # keeps the inputs' strides
    outputs = fn(*leaves)
    grads = torch.autograd.grad(outputs[0], leaves, grad.to(outputs[0].dtype))
    return dict(zip(names, (*(t.detach() for t in outputs), *grads), strict=True))


def errors(kernel, baseline, exact, names=NAMES):
    """The names that break the accuracy criterion, with their numbers (empty: all accurate)."""
    failures = []
    for name in names:
        ref = exact[name]
        assert kernel[name].dtype == torch.float32 and not kernel[name].isnan().any(), f"{name}: NaN or dtype"
        err = (kernel[name].double() - ref).abs().max().item()
        base = (baseline[name].double() - ref).abs().max().item()
        floor = EPS * max(ref.abs().max().item(), 1.0) + 1e-6
        if not err <= 2 * base + floor:
            failures.append(f"{name}: max error {err:.3e} > 2 x torch's {base:.3e} + floor {floor:.3e}")
    return failures


def check_accuracy(inputs, grad, fn=cpp_mlp, ref=ref_mlp, names=NAMES):
    exact = run(ref, [t.double() for t in inputs], grad.double(), names)
    baseline = run(ref, inputs, grad, names)
    kernel = run(fn, inputs, grad, names)
    failures = errors(kernel, baseline, exact, names)
    assert not failures, f"x {tuple(inputs[0].shape)}: " + "; ".join(failures)
    return kernel


def with_threads(count, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- #
# accuracy
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_cpp_matches_reference(case):
    check_accuracy(*make_inputs(*case))


@pytest.mark.parametrize("case", [((97, 130), 257), ((3, 70, 48), 100)], ids=shape_id)
def test_cpp_gelu_tails(case):
    """Wide inputs (std 3) and fc1 biases spanning [-12, 12]: every row reaches both GELU tails."""
    inputs, grad = make_inputs(*case, scale=3.0, seed=1)
    inputs[2] = torch.linspace(-12, 12, case[1])
    check_accuracy(inputs, grad)
    pre = F.linear(inputs[0], inputs[1], inputs[2])
    assert pre.min() < -10 and pre.max() > 10


@pytest.mark.parametrize("op, vectors", [("mlp", ("db1", "db2")),
                                        ("prenorm_linear", ("dnorm_weight", "dnorm_bias", "db"))])
def test_bias_gradients_on_long_inputs(op, vectors):
    """4160 rows on one thread: a single running float32 sum would be 4-10x torch's error here."""
    inputs, grad, fn, ref, names = op_case(op, (64, 65, 64), 256)
    exact = run(ref, [t.double() for t in inputs], grad.double(), names)
    kernel = with_threads(1, lambda: run(fn, inputs, grad, names))  # one thread: every row in one sum
    failures = errors(kernel, run(ref, inputs, grad, names), exact, names=vectors)
    assert not failures, "; ".join(failures)


def test_torch_backend_is_the_reference():
    inputs, _ = make_inputs((2, 9, 16), 24)
    leaves = [t.double().requires_grad_(True) for t in inputs]
    out = mlp(*leaves, backend="torch")
    assert torch.equal(out, reference.mlp(*leaves)) and torch.equal(out, ref_mlp(*leaves)[0])
    assert not uses_kernel(out) and "mvmae_fast" not in type(out.grad_fn).__name__
    assert torch.autograd.gradcheck(lambda *a: mlp(*a, backend="torch"), leaves)
    assert uses_kernel(mlp(*[t.float() for t in leaves], backend="cpp"))


# --------------------------------------------------------------------------- #
# determinism, threads, layouts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("op", ["mlp", "prenorm_mlp", "prenorm_linear"])
def test_backward_is_deterministic(op):
    inputs, grad, fn, _, names = op_case(op, (2, 150, 48), 100)
    first, second = run(fn, inputs, grad, names), run(fn, inputs, grad, names)
    for name in names:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


@pytest.mark.parametrize("op", ["mlp", "prenorm_mlp", "prenorm_linear"])
def test_independent_of_thread_count(op):
    """Rows are split evenly between threads (at multiples of 12 rows, so every row runs through the
    same tiles): out (mean, rstd) and dx are bit for bit the same; the weight and vector gradients
    are sums over rows grouped differently per thread, so they agree to float32 rounding of sums of
    terms as large as the largest gradient (a few ulps of it), not to each element's own ulp."""
    inputs, grad, fn, _, names = op_case(op, (3, 100, 40), 72)
    one = with_threads(1, lambda: run(fn, inputs, grad, names))
    two = with_threads(2, lambda: run(fn, inputs, grad, names))
    for name in names:
        if name == "dx" or not name.startswith("d"):
            assert torch.equal(one[name], two[name]), name
        else:
            scale = float(one[name].abs().max())
            torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=2e-6 * scale, msg=name)
            assert not torch.equal(one[name], torch.zeros_like(one[name])), name


def test_noncontiguous_inputs_match_contiguous():
    inputs, grad = make_inputs((2, 33, 24), 40)
    expected = run(cpp_mlp, inputs, grad)
    x, w1, b1, w2, b2 = inputs
    strided_x = torch.stack([x, torch.full_like(x, float("nan"))], dim=-2)[..., 0, :]  # rows 2 * D apart
    views = [strided_x, w1.t().contiguous().t(), torch.stack([b1, b1 * 0 + float("nan")], -1)[:, 0],
             w2.t().contiguous().t(), b2]
    grad_t = grad.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in views[:4]) and not grad_t.is_contiguous()
    got = run(cpp_mlp, views, grad_t)
    for name in NAMES:
        assert torch.equal(got[name], expected[name]), name


def test_expanded_and_zero_output_gradients():
    """out.sum() sends a stride-0 gradient; out * 0 gives exact zeros."""
    inputs, _ = make_inputs((2, 50, 24), 40)
    ones = torch.ones_like(inputs[0])
    exact = run(ref_mlp, [t.double() for t in inputs], ones.double())
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    mlp(*leaves, backend="cpp").sum().backward()
    for name, leaf in zip(NAMES[1:], leaves):
        torch.testing.assert_close(leaf.grad.double(), exact[name], rtol=1e-5, atol=1e-4, msg=name)
        leaf.grad = None
    (mlp(*leaves, backend="cpp") * 0).sum().backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


# --------------------------------------------------------------------------- #
# fc1's output kept (eager) or recomputed (custom ops)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("case", [((95, 17), 7), ((97, 130), 257), ((64, 17, 128), 512), ((2, 101, 32), 64)],
                         ids=shape_id)
@pytest.mark.parametrize("prenorm", [False, True], ids=["mlp", "prenorm_mlp"])
def test_kept_fc1_output_gives_the_recomputed_bits(case, prenorm):
    """In eager mode the MLP nodes keep fc1's output for the backward; the custom ops (what
    torch.compile runs) recompute it there. Outputs and every gradient: the same bits."""
    inputs, grad = (make_prenorm_inputs if prenorm else make_inputs)(*case)
    results = []
    for eager in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        x2d = leaves[0].reshape(-1, leaves[0].shape[-1])
        if prenorm:
            norm_weight, norm_bias, w1, b1, w2, b2 = leaves[1:]
            if eager:
                out = prenorm_mlp(x2d, norm_weight, norm_bias, 1e-6, w1, b1, w2, b2, backend="cpp")
            else:
                out = torch.ops.mvmae_fast.prenorm_mlp(x2d, norm_weight, norm_bias, 1e-6, w1, b1, w2, b2)[0]
        else:
            out = mlp(x2d, *leaves[1:], backend="cpp") if eager else torch.ops.mvmae_fast.mlp(x2d, *leaves[1:])
        names = graph_names(out)
        assert any("Eager" in name for name in names) == eager, names
        out.backward(grad.reshape(out.shape))
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    for kept, recomputed in zip(*results):
        assert torch.equal(kept, recomputed)


@pytest.mark.parametrize("prenorm", [False, True], ids=["mlp", "prenorm_mlp"])
def test_eager_backward_reads_the_kept_fc1_output(prenorm):
    """The eager node's backward takes fc1's output from what the forward kept: overwriting the kept
    tensor with NaN makes the weight gradients NaN (the recomputing path would not notice)."""
    inputs, grad = (make_prenorm_inputs if prenorm else make_inputs)((40, 24), 48)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = prenorm_mlp(leaves[0], *leaves[1:3], 1e-6, *leaves[3:]) if prenorm else mlp(*leaves)
    node = next(n for n in _graph_nodes(out) if "Eager" in type(n).__name__)
    kept = node.saved_tensors[-1]
    assert kept.shape == (40, 48)
    kept.detach().numpy().fill(float("nan"))  # behind autograd's version counter
    out.backward(grad)
    w1 = leaves[3] if prenorm else leaves[1]
    assert w1.grad.isnan().all()


def _graph_nodes(t):
    seen, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            seen.append(node)
            todo.extend(n for n, _ in node.next_functions)
    return seen


# --------------------------------------------------------------------------- #
# dispatch
# --------------------------------------------------------------------------- #
def test_default_dispatch(monkeypatch):
    inputs, _ = make_inputs((2, 17, 32), 64)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    cpp = mlp(*inputs, backend="cpp")
    torch_out = mlp(*inputs, backend="torch")
    default = mlp(*leaves)
    assert torch.equal(default, cpp) and uses_kernel(default)
    with use_backend("torch"):
        forced = mlp(*leaves)
    assert torch.equal(forced, torch_out) and not uses_kernel(forced)
    with use_backend("triton"), pytest.raises(UnsupportedBackendError, match="no triton implementation"):
        mlp(*inputs)
    # Under CPU autocast the default takes torch's bfloat16 linears (mlp has no autocast layer); a forced
    # cpp still runs, in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, forced = mlp(*leaves), mlp(*leaves, backend="cpp")
    assert auto.dtype == torch.bfloat16 and not uses_kernel(auto)
    assert forced.dtype == torch.float32 and torch.equal(forced, cpp) and uses_kernel(forced)
    # float64: the default falls back to torch, a forced cpp raises.
    doubles = [t.double() for t in inputs]
    assert torch.equal(mlp(*doubles), reference.mlp(*doubles))
    for context, kwargs in ((contextlib.nullcontext(), {"backend": "cpp"}), (use_backend("cpp"), {})):
        with context, pytest.raises(UnsupportedBackendError, match="float32 only, got float64"):
            mlp(*doubles, **kwargs)
    with pytest.raises(UnsupportedBackendError, match="float32 only, got float64"):
        torch.ops.mvmae_fast.mlp(doubles[0].view(-1, 32), *doubles[1:])
    # A backward scratch over MAX_CPP_WORKSPACE_BYTES: the default takes torch, a forced cpp still runs.
    monkeypatch.setattr(mlp_pkg, "MAX_CPP_WORKSPACE_BYTES", 0)
    fallback = mlp(*leaves)
    assert torch.equal(fallback, torch_out) and not uses_kernel(fallback)
    forced = mlp(*leaves, backend="cpp")
    assert torch.equal(forced, cpp) and uses_kernel(forced)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_validation(backend):
    (x, w1, b1, w2, b2), _ = make_inputs((2, 5, 8), 12)
    cases = [((x, w1, b1, w2.t(), b2), ValueError, r"w2 must have shape \(8, 12\)"),
             ((x, w1, b1[:5], w2, b2), ValueError, r"b1 must have shape \(12,\)"),
             ((x, w1, b1, w2, b1), ValueError, r"b2 must have shape \(8,\)"),
             ((x[..., :7], w1, b1, w2, b2), ValueError, "x's last dimension must be D = 8"),
             ((x.tolist(), w1, b1, w2, b2), TypeError, "x must be a torch.Tensor, got list"),
             ((x, w1.numpy(), b1, w2, b2), TypeError, "w1 must be a torch.Tensor"),
             ((x, w1[0], b1, w2, b2), ValueError, "w1 must have 2 dimensions"),
             ((x.int(), w1, b1, w2, b2), TypeError, "x must be a floating-point tensor"),
             ((x, w1[:0], b1[:0], w2[:, :0], b2), ValueError, "w1 has an empty dimension")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            mlp(*args, backend=backend)


def test_custom_op_validation():
    (x, w1, b1, w2, b2), grad = make_inputs((10, 8), 12)
    with pytest.raises(ValueError, match=r"takes x as \(M, D\), got shape \(2, 5, 8\)"):
        torch.ops.mvmae_fast.mlp(x.view(2, 5, 8), w1, b1, w2, b2)
    bad = [((grad[:9], x, w1, b1, w2), r"grad_out must have shape \(10, 8\)"),
           ((grad, x, w1, b1[:11], w2), r"b1 must have shape \(12,\)"),
           ((grad, x, w1, b1, w2[:7]), r"w2 must have shape \(8, 12\)"),
           ((grad, x, w1[:11], b1, w2), r"b1 must have shape \(11,\)")]
    for args, message in bad:
        with pytest.raises(ValueError, match="mlp_backward: " + message):
            torch.ops.mvmae_fast.mlp_backward(*args)


# --------------------------------------------------------------------------- #
# registration
# --------------------------------------------------------------------------- #
def test_opcheck():
    (x, w1, b1, w2, b2), grad = make_inputs((37, 20), 45)
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    torch.library.opcheck(torch.ops.mvmae_fast.mlp.default, tuple(leaves))
    torch.library.opcheck(torch.ops.mvmae_fast.mlp_backward.default, (grad, x, w1, b1, w2))


def test_torch_compile_fullgraph():
    inputs, grad = make_inputs((2, 7, 16), 24)
    got = run(torch.compile(cpp_mlp, fullgraph=True), inputs, grad)
    expected = run(cpp_mlp, inputs, grad)
    for name in NAMES:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------- #
# the model's layer
# --------------------------------------------------------------------------- #
def test_model_mlp_layer():
    torch.manual_seed(0)
    layer = Mlp(64, 256)
    assert list(layer.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    x = torch.randn(2, 65, 64) * 2
    grad = torch.randn(2, 65, 64)
    params = [layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias]

    def grads(fn):
        x_ = x.clone().requires_grad_(True)
        out = fn(x_)
        return out, torch.autograd.grad(out, [x_, *params], grad)

    fused, fused_grads = grads(layer)
    assert uses_kernel(fused)
    unfused, unfused_grads = grads(lambda y: layer.fc2(layer.act(layer.fc1(y))))
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", *NAMES[3:]), fused_grads, unfused_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)
    # Another activation (or GELU's tanh form) is not ops.mlp's function: the layer runs it unfused.
    for act, fn in ((nn.ReLU(), F.relu), (nn.GELU(approximate="tanh"), lambda h: F.gelu(h, approximate="tanh"))):
        layer.act = act
        out = layer(x.requires_grad_(True))
        assert torch.equal(out, layer.fc2(fn(layer.fc1(x)))) and not uses_kernel(out)


# --------------------------------------------------------------------------- #
# prenorm_mlp: x + mlp(layer_norm(x)) in one kernel, and the model's Block
# --------------------------------------------------------------------------- #
# (x's shape, Hd, the LayerNorm's eps)
PRENORM_SHAPES = [((1, 3), 1, 1e-5), ((97, 130), 257, 1e-6), ((2, 101, 32), 64, 1e-5), ((64, 17, 128), 512, 1e-6),
                  ((64, 65, 64), 256, 1e-6)]


def prenorm(tensors, eps=1e-5, **kwargs):
    """ops.prenorm_mlp on make_prenorm_inputs's list."""
    x, norm_weight, norm_bias, *weights = tensors
    return prenorm_mlp(x, norm_weight, norm_bias, eps, *weights, **kwargs)


@pytest.mark.parametrize("case", PRENORM_SHAPES, ids=shape_id)
def test_prenorm_cpp_matches_reference(case):
    """out, the rows' mean and 1/std, and the seven gradients, against float64."""
    check_accuracy(*prenorm_case(*case))


@pytest.mark.parametrize("op", ["prenorm_mlp", "prenorm_linear"])
def test_prenorm_constant_rows(op):
    """Rows of one value (exact float32 mean, variance 0): rstd = 1/sqrt(eps), the normalised row is the
    norm's bias (so those rows' output is that of the bias alone, plus the residual); every output and gradient
    finite and as accurate as elsewhere."""
    inputs, grad, fn, ref, names = op_case(op, (97, 130), 257)  # eps 1e-6
    rows, levels = [0, 1, 50, 95, 96], torch.tensor([0.0, 1.5, -3.0, 7.25, 1.5])
    inputs[0][rows] = levels[:, None]
    kernel = check_accuracy(inputs, grad, fn, ref, names)
    assert all(t.isfinite().all() for t in kernel.values())
    assert torch.equal(kernel["mean"][rows], levels)
    torch.testing.assert_close(kernel["rstd"][rows], torch.full((5,), 1e3), rtol=1e-6, atol=0)
    x, _, norm_bias, w, b, *rest = inputs
    # The constant rows' normalised input is the norm's bias: their output is that of the bias alone.
    projected = F.linear(norm_bias, w, b)
    if op == "prenorm_mlp":
        projected = F.linear(F.gelu(projected), *rest)
    expected = projected.expand(5, -1) + (x[rows] if op == "prenorm_mlp" else 0)
    torch.testing.assert_close(kernel["out"][rows], expected, rtol=1e-5, atol=1e-5)


def test_prenorm_torch_backend_is_the_formula():
    inputs, _ = make_prenorm_inputs((2, 9, 16), 24)
    leaves = [t.double().requires_grad_(True) for t in inputs]
    x, norm_weight, norm_bias, w1, b1, w2, b2 = leaves
    out = prenorm(leaves, backend="torch")
    assert torch.equal(out, x + F.linear(F.gelu(F.linear(F.layer_norm(x, (16,), norm_weight, norm_bias, 1e-5), w1, b1)),
                                         w2, b2))
    assert not uses_kernel(out, "prenorm_mlp") and not uses_kernel(out)
    cpp = prenorm([t.float() for t in leaves], backend="cpp")
    assert uses_kernel(cpp, "prenorm_mlp") and not uses_kernel(cpp)


def check_float64_refused(fn, raw_op, inputs, expected):
    """float64 inputs (x of last dim 32, LayerNorm eps 1e-5): fn's default falls back to torch and
    gives ``expected(doubles)``; a forced cpp (backend= or use_backend) and the raw op raise."""
    doubles = [t.double() for t in inputs]
    assert torch.equal(fn(doubles), expected(doubles))
    for context, kwargs in ((contextlib.nullcontext(), {"backend": "cpp"}), (use_backend("cpp"), {})):
        with context, pytest.raises(UnsupportedBackendError, match="float32 only, got float64"):
            fn(doubles, **kwargs)
    x, norm_weight, norm_bias, *weights = doubles
    with pytest.raises(UnsupportedBackendError, match="float32 only, got float64"):
        raw_op(x.view(-1, 32), norm_weight, norm_bias, 1e-5, *weights)


def test_prenorm_default_dispatch(monkeypatch):
    inputs, _ = make_prenorm_inputs((2, 17, 32), 64)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    cpp, torch_out = prenorm(inputs, backend="cpp"), prenorm(inputs, backend="torch")
    default = prenorm(leaves)
    assert torch.equal(default, cpp) and uses_kernel(default, "prenorm_mlp")
    with use_backend("torch"):
        forced = prenorm(leaves)
    assert torch.equal(forced, torch_out) and not uses_kernel(forced, "prenorm_mlp")
    # Under CPU autocast the default takes the autocast layers (autocast's bits, tests/test_autocast_layers.py),
    # not the float32 kernel; a forced cpp runs in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, forced, expected = prenorm(leaves), prenorm(leaves, backend="cpp"), prenorm(inputs, backend="torch")
    assert torch.equal(auto, expected) and not torch.equal(auto, torch_out) and not uses_kernel(auto, "prenorm_mlp")
    assert forced.dtype == torch.float32 and torch.equal(forced, cpp) and uses_kernel(forced, "prenorm_mlp")
    check_float64_refused(prenorm, torch.ops.mvmae_fast.prenorm_mlp, inputs,
                          lambda doubles: ref_prenorm(*doubles, eps=1e-5)[0])
    monkeypatch.setattr(mlp_pkg, "MAX_CPP_WORKSPACE_BYTES", 0)  # as mlp's: too much scratch -> torch
    fallback = prenorm(leaves)
    assert torch.equal(fallback, torch_out) and not uses_kernel(fallback, "prenorm_mlp")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_prenorm_validation(backend):
    (x, norm_weight, norm_bias, w1, b1, w2, b2), _ = make_prenorm_inputs((2, 5, 8), 12)
    cases = [((x, norm_weight[:7], norm_bias, 1e-6, w1, b1, w2, b2),
              r"norm_weight must have shape \(8,\) to match x of shape \(2, 5, 8\), got \(7,\)"),
             ((x, norm_weight, norm_bias[None], 1e-6, w1, b1, w2, b2), r"norm_bias must have 1 dimensions"),
             ((x, norm_weight, torch.zeros(9), 1e-6, w1, b1, w2, b2), r"norm_bias must have shape \(8,\)"),
             ((x, norm_weight, norm_bias, -1e-5, w1, b1, w2, b2), "eps must be a number >= 0, got -1e-05"),
             ((x, norm_weight, norm_bias, float("nan"), w1, b1, w2, b2), "eps must be a number >= 0, got nan"),
             ((x, norm_weight, norm_bias, 1e-6, w1, b1, w2.t(), b2), r"w2 must have shape \(8, 12\)")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            prenorm_mlp(*args, backend=backend)


def test_prenorm_custom_op_validation():
    (x, norm_weight, norm_bias, w1, b1, w2, b2), grad = make_prenorm_inputs((10, 8), 12)
    with pytest.raises(ValueError, match=r"takes x as \(M, D\), got shape \(2, 5, 8\)"):
        torch.ops.mvmae_fast.prenorm_mlp(x.view(2, 5, 8), norm_weight, norm_bias, 1e-6, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        torch.ops.mvmae_fast.prenorm_mlp(x, norm_weight, norm_bias, -1.0, w1, b1, w2, b2)
    _, mean, rstd = torch.ops.mvmae_fast.prenorm_mlp(x, norm_weight, norm_bias, 1e-6, w1, b1, w2, b2)
    bad = [((grad, x, mean[:9], rstd, norm_weight, norm_bias, w1, b1, w2),
            r"prenorm_mlp_backward: mean must have shape \(10,\), got \(9,\)"),
           ((grad, x, mean, torch.ones(11), norm_weight, norm_bias, w1, b1, w2),
            r"prenorm_mlp_backward: rstd must have shape \(10,\), got \(11,\)"),
           ((grad, x, mean, rstd[:, None], norm_weight, norm_bias, w1, b1, w2), r"rstd must have 1 dimensions \(M,\)"),
           ((grad, x, mean, rstd, norm_weight, norm_bias[:7], w1, b1, w2), r"norm_bias must have shape \(8,\)"),
           ((grad, x, mean, rstd, norm_weight, norm_bias, w1, b1[:11], w2),
            r"prenorm_mlp_backward: b1 must have shape \(12,\)")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            torch.ops.mvmae_fast.prenorm_mlp_backward(*args)


def test_prenorm_opcheck():
    (x, norm_weight, norm_bias, w1, b1, w2, b2), grad = make_prenorm_inputs((37, 20), 45)
    leaves = [t.clone().requires_grad_(True) for t in (x, norm_weight, norm_bias, w1, b1, w2, b2)]
    torch.library.opcheck(torch.ops.mvmae_fast.prenorm_mlp.default, (*leaves[:3], 1e-5, *leaves[3:]))
    _, mean, rstd = torch.ops.mvmae_fast.prenorm_mlp(x, norm_weight, norm_bias, 1e-5, w1, b1, w2, b2)
    torch.library.opcheck(torch.ops.mvmae_fast.prenorm_mlp_backward.default,
                          (grad, x, mean, rstd, norm_weight, norm_bias, w1, b1, w2))


def test_prenorm_torch_compile_fullgraph():
    inputs, grad, fn, _, names = prenorm_case((2, 7, 16), 24, eps=1e-5)
    got = run(torch.compile(fn, fullgraph=True), inputs, grad, names)
    expected = run(fn, inputs, grad, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@contextlib.contextmanager
def swapped(model, attr, module):
    """model's submodule at the dotted path attr replaced by module for the duration."""
    owner, _, name = attr.rpartition(".")
    owner = model.get_submodule(owner)
    original = getattr(owner, name)
    setattr(owner, name, module)
    try:
        yield
    finally:
        setattr(owner, name, original)


def test_model_block():
    """Block's fused halves (prenorm_linear into attend, then prenorm_mlp) against the same block with
    every op on torch, and the conditions on norm1 / attn.qkv and on norm2 / mlp under which each half
    falls back to the modules themselves."""
    torch.manual_seed(0)
    block = Block(64, 4)
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_(1, 0.5)
            norm.bias.normal_(0, 0.5)
    x, grad = torch.randn(2, 17, 64) * 2 + 1, torch.randn(2, 17, 64)
    names, params = zip(*block.named_parameters())

    def grads(fn):
        x_ = x.clone().requires_grad_(True)
        out = fn(x_)
        return out, torch.autograd.grad(out, [x_, *params], grad)

    def by_hand(y):  # the pre-norm block written out
        y = y + block.attn(block.norm1(y))
        mlp_, norm = block.mlp, block.norm2
        return y + mlp_.fc2(F.gelu(mlp_.fc1(F.layer_norm(y, (64,), norm.weight, norm.bias, norm.eps))))

    fused, fused_grads = grads(block)
    assert uses_kernel(fused, "prenorm_linear") and uses_kernel(fused, "prenorm_mlp")
    # The first half is one node (ops.mlp.fused_attention_half). Its projection is the fused layers'
    # GEMM, not torch's, so it agrees with the pieces to float32 rounding (its accuracy against
    # float64: test_attention_half_matches_reference).
    assert "_EagerAttentionHalfBackward" in graph_names(fused)
    attn, norm1 = block.attn, block.norm1

    def pieces(y):
        qkv = prenorm_linear(y, norm1.weight, norm1.bias, norm1.eps, attn.qkv.weight, attn.qkv.bias)
        y = y + attn.attend(qkv)
        norm, fc1, fc2 = block.norm2, block.mlp.fc1, block.mlp.fc2
        return prenorm_mlp(y, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)

    separate, separate_grads = grads(pieces)
    assert "_EagerAttentionHalfBackward" not in graph_names(separate)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", *names), fused_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)
    with use_backend("torch"):
        unfused, unfused_grads = grads(block)
        assert torch.equal(unfused, by_hand(x)) and not uses_kernel(unfused, "prenorm_mlp")
        assert not uses_kernel(unfused, "prenorm_linear")
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", *names), fused_grads, unfused_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)
    # First half: norm1 not a LayerNorm with weight and bias, or qkv without a bias: Block runs
    # x + attn(norm1(x)), then the (still fused) second half.
    norm, fc1, fc2 = block.norm2, block.mlp.fc1, block.mlp.fc2
    for attr, module in (("norm1", nn.Identity()), ("norm1", nn.LayerNorm(64, bias=False)),
                         ("attn.qkv", nn.Linear(64, 192, bias=False))):
        with swapped(block, attr, module):
            out = block(x)
            x1 = x + block.attn(block.norm1(x))
            expected = prenorm_mlp(x1, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        assert torch.equal(out, expected), attr
        assert not uses_kernel(out, "prenorm_linear") and uses_kernel(out, "prenorm_mlp"), attr
    # Second half: not a LayerNorm with weight and bias, or not ops.mlp's function: Block runs
    # x1 + mlp(norm2(x1)), with x1 the first half's output (norm2's input, caught by a hook: the fused
    # path never calls norm2).
    swaps = [("norm2", nn.Identity(), lambda y: y + block.mlp(y), True),
             ("norm2", nn.LayerNorm(64, bias=False), lambda y: y + block.mlp(block.norm2(y)), True),
             ("mlp.act", nn.ReLU(), lambda y: y + block.mlp.fc2(F.relu(block.mlp.fc1(block.norm2(y)))), False)]
    for attr, module, expected, mlp_fused in swaps:
        with swapped(block, attr, module):
            seen = []
            hook = block.norm2.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
            out = block(x)
            hook.remove()
            assert len(seen) == 1 and torch.equal(out, expected(seen[0])), attr
        assert not uses_kernel(out, "prenorm_mlp") and uses_kernel(out) == mlp_fused, attr
        assert uses_kernel(out, "prenorm_linear"), attr


def test_fused_attention_half_validation():
    """ops.mlp.fused_attention_half checks every argument (naming it) before any pointer reaches a kernel,
    under autocast too; valid arguments give the Block's first half."""
    torch.manual_seed(0)
    D, H = 16, 2
    x, nw, nb = torch.randn(2, 5, D), torch.ones(D), torch.zeros(D)
    wq, bq, wp, bp = torch.randn(3 * D, D), torch.randn(3 * D), torch.randn(D, D), torch.randn(D)
    good = (x, nw, nb, 1e-6, wq, bq, wp, bp, H)
    cases = [((x[0], *good[1:]), ValueError, r"x must have 3 dimensions"),
             ((x, nw, nb, 1e-6, wq[:, :8], bq, wp, bp, H), ValueError, r"w_qkv has shape \(48, 8\)|x's last dimension"),
             ((x, nw, nb, 1e-6, wq[:40], bq[:40], wp, bp, H), ValueError, r"w_qkv must have shape \(48, 16\)"),
             ((x, nw, nb, 1e-6, wq, bq[:5], wp, bp, H), ValueError, r"b_qkv must have shape \(48,\)"),
             ((x, nw, nb, 1e-6, wq, bq, wp[:8], bp[:8], H), ValueError, r"w_proj must have shape \(16, 16\)"),
             ((x, nw, nb, 1e-6, wq, bq, wp, bp[:3], H), ValueError, r"b_proj must have shape \(16,\)"),
             ((x, nw[:3], nb, 1e-6, wq, bq, wp, bp, H), ValueError, r"norm_weight must have shape \(16,\)"),
             ((x, nw, nb, -1.0, wq, bq, wp, bp, H), ValueError, r"eps must be a number >= 0"),
             ((x, nw, nb, 1e-6, wq, bq, wp, bp, 3), ValueError, r"multiple of num_heads \(3\)"),
             ((x, nw, nb, 1e-6, wq, bq, wp, bp, 0), ValueError, r"num_heads must be >= 1"),
             ((x, nw, nb, 1e-6, wq[0], bq, wp, bp, H), ValueError, r"w_qkv must have 2 dimensions")]
    for autocast in (False, True):
        for args, exc, pattern in cases:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), pytest.raises(exc, match=pattern):
                mlp_pkg.fused_attention_half(*args)
    block = Block(D, H)
    with torch.no_grad():
        for (_, p), value in zip(block.named_parameters(), (nw, nb, wq, bq, wp, bp)):
            p.copy_(value)
    out = mlp_pkg.fused_attention_half(*good)
    assert out is not None
    torch.testing.assert_close(out, x + block.attn.attend(prenorm_linear(x, nw, nb, 1e-6, wq, bq)), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------------- #
# the block's first half as one node: LayerNorm + qkv, attention, projection + residual
# --------------------------------------------------------------------------- #
HALF_NAMES = ("out", "dx", "dnorm_weight", "dnorm_bias", "dw_qkv", "db_qkv", "dw_proj", "db_proj")
# (x's shape, heads): D off the 16/32-column panels, row counts off the 12-row tiles and 96-row chunks,
# the micro preset's encoder and decoder
HALF_SHAPES = [((1, 1, 8), 1), ((3, 7, 20), 2), ((2, 50, 48), 3), ((5, 33, 40), 4), ((4, 17, 128), 4),
               ((4, 65, 64), 4)]


def make_half_inputs(shape, heads, seed=0):
    """[x, norm_weight, norm_bias, w_qkv, b_qkv, w_proj, b_proj] (x of mean 3 and std 2, weights scaled
    like nn.Linear's outputs) and an output gradient."""
    dim = shape[-1]
    (x, norm_weight, norm_bias, w_qkv, b_qkv), _ = make_linear_inputs(shape, 3 * dim, seed)
    g = torch.Generator().manual_seed(seed + 3)
    w_proj, b_proj = torch.randn(dim, dim, generator=g) * dim**-0.5, torch.randn(dim, generator=g)
    return [x, norm_weight, norm_bias, w_qkv, b_qkv, w_proj, b_proj], torch.randn(shape, generator=g)


def ref_half(x, norm_weight, norm_bias, w_qkv, b_qkv, w_proj, b_proj, heads, eps=1e-6):
    """(out,): x + proj(softmax(q k^T / sqrt(Dh)) v) with plain torch ops, in the inputs' precision."""
    B, N, D = x.shape
    qkv = F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), w_qkv, b_qkv)
    q, k, v = qkv.view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * (D // heads) ** -0.5
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return (x + F.linear(attended, w_proj, b_proj),)


def cpp_half(x, norm_weight, norm_bias, w_qkv, b_qkv, w_proj, b_proj, heads, eps=1e-6):
    """(out,) through ops.mlp.fused_attention_half's float32 node (checked to be the one that ran)."""
    out = mlp_pkg.fused_attention_half(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, w_proj, b_proj, heads)
    assert out is not None and type(out.grad_fn).__name__ == "_EagerAttentionHalfBackward"
    return (out,)


def separate_half(x, norm_weight, norm_bias, w_qkv, b_qkv, w_proj, b_proj, heads, eps=1e-6):
    """(out,) from the separate ops: cpp prenorm_linear and attention, torch's projection and add."""
    qkv = prenorm_linear(x, norm_weight, norm_bias, eps, w_qkv, b_qkv, backend="cpp")
    return (x + F.linear(attention(qkv, heads, backend="cpp"), w_proj, b_proj),)


@pytest.mark.parametrize("case", HALF_SHAPES, ids=shape_id)
def test_attention_half_matches_reference(case):
    """The node's output and its seven gradients against float64 (the projection with its bias and
    residual in one GEMM's epilogue; in the backward, dA, dW and db of the projection in one pass and
    the residual's gradient added in the LayerNorm's backward), on one, two and three threads. The
    allowance is twice the larger error of two float32 baselines: torch's ops, and the separate ops
    (whose cpp attention backward errs up to ~4x torch's explicit softmax on db_qkv here, as
    test_attention.py allows against SDPA's; the fusion must not add to that)."""
    shape, heads = case
    inputs, grad = make_half_inputs(shape, heads)
    ref = functools.partial(ref_half, heads=heads)
    exact = run(ref, [t.double() for t in inputs], grad.double(), HALF_NAMES)
    baselines = [run(ref, inputs, grad, HALF_NAMES),
                 run(functools.partial(separate_half, heads=heads), inputs, grad, HALF_NAMES)]
    baseline = {name: max((b[name] for b in baselines), key=lambda t: (t.double() - exact[name]).abs().max().item())
                for name in HALF_NAMES}
    for threads in (1, 2, 3):
        kernel = with_threads(threads, lambda: run(functools.partial(cpp_half, heads=heads), inputs, grad, HALF_NAMES))
        failures = errors(kernel, baseline, exact, HALF_NAMES)
        assert not failures, f"x {shape}, {threads} threads: " + "; ".join(failures)


# --------------------------------------------------------------------------- #
# prenorm_linear: linear(layer_norm(x)), the pre-norm block's qkv projection
# --------------------------------------------------------------------------- #
# (x's shape, out_features, the LayerNorm's eps): out_features off the 16/32-column panels, the micro
# preset's encoder and decoder qkv projections
LINEAR_SHAPES = [((1, 3), 5, 1e-5), ((95, 17), 7, 1e-6), ((250, 16), 33, 1e-5), ((97, 130), 257, 1e-6),
                 ((2, 101, 32), 96, 1e-5), ((64, 17, 128), 384, 1e-6), ((64, 65, 64), 192, 1e-6)]


def linear(tensors, eps=1e-5, **kwargs):
    """ops.prenorm_linear on make_linear_inputs's list."""
    x, norm_weight, norm_bias, w, b = tensors
    return prenorm_linear(x, norm_weight, norm_bias, eps, w, b, **kwargs)


def linear_formula(x, norm_weight, norm_bias, w, b, eps=1e-5):
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), w, b)


@pytest.mark.parametrize("case", LINEAR_SHAPES, ids=shape_id)
def test_prenorm_linear_cpp_matches_reference(case):
    """out, the rows' mean and 1/std, and the five gradients, against float64."""
    check_accuracy(*linear_case(*case))


def test_prenorm_linear_torch_backend_is_the_formula():
    inputs, _ = make_linear_inputs((2, 9, 16), 24)
    for tensors in (inputs, [t.double().requires_grad_(True) for t in inputs]):
        out = linear(tensors, backend="torch")
        assert out.shape == (2, 9, 24) and torch.equal(out, linear_formula(*tensors))
        assert not uses_kernel(out, "prenorm_linear") and "mvmae_fast" not in type(out.grad_fn).__name__
    cpp = linear([t.clone().requires_grad_(True) for t in inputs], backend="cpp")
    assert cpp.shape == (2, 9, 24) and uses_kernel(cpp, "prenorm_linear") and not uses_kernel(cpp, "prenorm_mlp")


def test_prenorm_linear_default_dispatch(monkeypatch):
    inputs, _ = make_linear_inputs((2, 17, 32), 40)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    cpp, torch_out = linear(inputs, backend="cpp"), linear(inputs, backend="torch")
    default = linear(leaves)
    assert torch.equal(default, cpp) and uses_kernel(default, "prenorm_linear")
    with use_backend("torch"):
        forced = linear(leaves)
    assert torch.equal(forced, torch_out) and not uses_kernel(forced, "prenorm_linear")
    with use_backend("triton"), pytest.raises(UnsupportedBackendError, match="no triton implementation"):
        linear(inputs)
    # Under CPU autocast the default takes the autocast layers (a bfloat16 linear, autocast's bits), not the
    # float32 kernel; a forced cpp runs in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, forced, expected = linear(leaves), linear(leaves, backend="cpp"), linear_formula(*inputs)
    assert auto.dtype == torch.bfloat16 and torch.equal(auto, expected) and not uses_kernel(auto, "prenorm_linear")
    assert forced.dtype == torch.float32 and torch.equal(forced, cpp) and uses_kernel(forced, "prenorm_linear")
    check_float64_refused(linear, torch.ops.mvmae_fast.prenorm_linear, inputs,
                          lambda doubles: linear_formula(*doubles))
    # The backward's scratch (linear_workspace_bytes, not mlp's workspace_bytes) against the limit.
    need = mlp_pkg.linear_workspace_bytes(32, 40, torch.get_num_threads(), 34)
    assert need < mlp_pkg.workspace_bytes(32, 40, torch.get_num_threads(), 34)
    for limit, kernel in ((need, True), (need - 1, False), (0, False)):
        monkeypatch.setattr(mlp_pkg, "MAX_CPP_WORKSPACE_BYTES", limit)
        out = linear(leaves)
        assert torch.equal(out, cpp if kernel else torch_out) and uses_kernel(out, "prenorm_linear") == kernel, limit
    forced = linear(leaves, backend="cpp")  # still runs with the limit at 0
    assert torch.equal(forced, cpp) and uses_kernel(forced, "prenorm_linear")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_prenorm_linear_validation(backend):
    (x, norm_weight, norm_bias, w, b), _ = make_linear_inputs((2, 5, 8), 12)
    cases = [((x, norm_weight, norm_bias, 1e-6, w[0], b), ValueError, r"w must have 2 dimensions"),
             ((x, norm_weight, norm_bias, 1e-6, w, b[:5]), ValueError,
              r"b must have shape \(12,\) to match w of shape \(12, 8\), got \(5,\)"),
             ((x, norm_weight, norm_bias, 1e-6, w, b[None]), ValueError, r"b must have 1 dimensions"),
             ((x, norm_weight, norm_bias, 1e-6, w[:, :7], b), ValueError,
              r"x's last dimension must be D = 7 \(w has shape \(12, 7\)\), got shape \(2, 5, 8\)"),
             ((x[..., :7], norm_weight, norm_bias, 1e-6, w, b), ValueError, "x's last dimension must be D = 8"),
             ((x, norm_weight[:7], norm_bias, 1e-6, w, b), ValueError,
              r"norm_weight must have shape \(8,\) to match x of shape \(2, 5, 8\), got \(7,\)"),
             ((x, norm_weight, norm_bias[None], 1e-6, w, b), ValueError, "norm_bias must have 1 dimensions"),
             ((x, norm_weight, torch.zeros(9), 1e-6, w, b), ValueError, r"norm_bias must have shape \(8,\)"),
             ((x, norm_weight, norm_bias, -1e-5, w, b), ValueError, "eps must be a number >= 0, got -1e-05"),
             ((x.tolist(), norm_weight, norm_bias, 1e-6, w, b), TypeError, "x must be a torch.Tensor, got list"),
             ((x, norm_weight, norm_bias, 1e-6, w.numpy(), b), TypeError, "w must be a torch.Tensor"),
             ((x.int(), norm_weight, norm_bias, 1e-6, w, b), TypeError, "x must be a floating-point"),
             ((x, norm_weight, norm_bias, 1e-6, w[:0], b[:0]), ValueError, "w has an empty dimension")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            prenorm_linear(*args, backend=backend)


def test_prenorm_linear_custom_op_validation():
    (x, norm_weight, norm_bias, w, b), grad = make_linear_inputs((10, 8), 12)
    with pytest.raises(ValueError, match=r"prenorm_linear takes x as \(M, D\), got shape \(2, 5, 8\)"):
        torch.ops.mvmae_fast.prenorm_linear(x.view(2, 5, 8), norm_weight, norm_bias, 1e-6, w, b)
    _, mean, rstd = torch.ops.mvmae_fast.prenorm_linear(x, norm_weight, norm_bias, 1e-6, w, b)
    args = (grad, x, mean, rstd, norm_weight, norm_bias, w)
    bad = [((grad[:9], *args[1:]), r"prenorm_linear_backward: grad_out must have shape \(10, 12\), got \(9, 12\)"),
           ((grad[:, :8], *args[1:]), r"prenorm_linear_backward: grad_out must have shape \(10, 12\), got \(10, 8\)"),
           ((*args[:2], mean[:9], *args[3:]), r"prenorm_linear_backward: mean must have shape \(10,\), got \(9,\)"),
           ((*args[:3], torch.ones(11), *args[4:]),
            r"prenorm_linear_backward: rstd must have shape \(10,\), got \(11,\)"),
           ((*args[:3], rstd[:, None], *args[4:]), r"rstd must have 1 dimensions \(M,\)"),
           ((*args[:5], norm_bias[:7], w), r"norm_bias must have shape \(8,\)"),
           ((*args[:6], w[:, :7]), "x's last dimension must be D = 7"),
           ((grad, x.view(2, 5, 8), *args[2:]), r"x must have 2 dimensions \(M, D\)")]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            torch.ops.mvmae_fast.prenorm_linear_backward(*call)


def test_prenorm_linear_opcheck():
    (x, norm_weight, norm_bias, w, b), grad = make_linear_inputs((37, 20), 45)
    leaves = [t.clone().requires_grad_(True) for t in (x, norm_weight, norm_bias, w, b)]
    torch.library.opcheck(torch.ops.mvmae_fast.prenorm_linear.default, (*leaves[:3], 1e-5, *leaves[3:]))
    _, mean, rstd = torch.ops.mvmae_fast.prenorm_linear(x, norm_weight, norm_bias, 1e-5, w, b)
    torch.library.opcheck(torch.ops.mvmae_fast.prenorm_linear_backward.default,
                          (grad, x, mean, rstd, norm_weight, norm_bias, w))


def test_prenorm_linear_torch_compile_fullgraph():
    """The kernel under torch.compile (out, mean, rstd, gradients) bit for bit as eager; and the default
    dispatch traces without a graph break and still picks the kernel."""
    inputs, grad, fn, _, names = linear_case((2, 7, 16), 24, eps=1e-5)
    got = run(torch.compile(fn, fullgraph=True), inputs, grad, names)
    expected = run(fn, inputs, grad, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    default = torch.compile(lambda *tensors: linear(tensors), fullgraph=True)(*inputs)
    torch.testing.assert_close(default, linear(inputs, backend="cpp"), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["mlp", "prenorm_mlp", "prenorm_linear"])
def test_no_rows(op):
    """Zero rows: an empty output and exactly zero parameter gradients (the kernel's accumulators are
    never touched by a chunk, so nothing but its zero fill may reach the outputs)."""
    D, H = 8, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 0, D, generator=g).requires_grad_(True)
    norm = [torch.randn(D, generator=g).requires_grad_(True) for _ in range(2)]
    w1, b1 = torch.randn(H, D, generator=g).requires_grad_(True), torch.randn(H, generator=g).requires_grad_(True)
    w2, b2 = torch.randn(D, H, generator=g).requires_grad_(True), torch.randn(D, generator=g).requires_grad_(True)
    if op == "mlp":
        params = [w1, b1, w2, b2]
        out = mlp(x, *params, backend="cpp")
    elif op == "prenorm_mlp":
        params = [*norm, w1, b1, w2, b2]
        out = prenorm_mlp(x, *norm, 1e-6, w1, b1, w2, b2, backend="cpp")
    else:
        params = [*norm, w1, b1]
        out = prenorm_linear(x, *norm, 1e-6, w1, b1, backend="cpp")
    assert out.shape == (3, 0, H if op == "prenorm_linear" else D)
    grads = torch.autograd.grad(out.sum(), params)
    for grad, param in zip(grads, params):
        assert torch.equal(grad, torch.zeros_like(param))


def test_block_under_forced_triton_uses_plain_modules():
    """The fused layer ops have no triton backend: with triton forced (attention then runs its Triton
    kernel, here under the interpreter), Block runs its plain modules instead of raising."""
    torch.manual_seed(0)
    block = Block(16, 2)
    x = torch.randn(1, 5, 16, requires_grad=True)
    with use_backend("triton"):
        out = block(x)
    names = graph_names(out)
    assert not any(op in name for name in names for op in ("mlp_default", "prenorm_mlp", "prenorm_linear"))
    with use_backend("torch"):
        expected = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with use_backend("triton"), pytest.raises(UnsupportedBackendError, match="no triton implementation"):
        mlp(x, block.mlp.fc1.weight, block.mlp.fc1.bias, block.mlp.fc2.weight, block.mlp.fc2.bias)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_instruction_set_variants(isa):
    """The AVX2 build of the fused layers (4 x 16 tiles on 16-wide panels) and the baseline one, which an
    AVX-512 CPU never picks by itself, forced with MVMAE_FAST_CPU_ISA in a fresh process: the accuracy,
    edge-case and threading tests pass on them too."""
    runs = isa_probe(isa, "_ext._C.fused_layers_isa()")
    if runs != isa:
        pytest.skip(f"this CPU cannot run the {isa} variant (it runs {runs})")
    rerun_tests_under_isa(isa, __file__, "matches_reference or gelu_tails or constant_rows or no_rows or long_inputs "
                          "or thread_count or deterministic or noncontiguous")
