"""The autocast layers with their Triton kernel set (mvmae_fast/ops/mlp/autocast.py's _TritonKernels and
autocast_triton.py): the pre-norm block's Functions (prenorm_mlp, prenorm_linear, attention_half) against
the unfused autocast computation (plain torch ops under autocast) and float64, in bfloat16 and float16.

Two devices:

- ``interpreter``: CPU tensors under CPU autocast with the Triton kernel set forced (autocast._kernels
  patched; the kernels run under TRITON_INTERPRET=1 and the attention is the Triton kernel too). Always run.
- ``cuda``: CUDA tensors under CUDA autocast, through the real dispatch with
  MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1 (ops.prenorm_mlp, ops.prenorm_linear, Block). Runs on a GPU with native
  Triton (benchmarks/gpu.sh), skipped elsewhere.

The criterion (as tests/test_autocast_layers.py's): the relative error (norm of the difference over the
float64 result's norm) of the output and of every gradient at most ``FACTOR`` x the unfused autocast path's
(+ 1e-6). FACTOR is 1.5, except for bfloat16 in the interpreter, whose float32 -> bfloat16 conversion
truncates instead of rounding to nearest (TOOLCHAIN.md), which roughly doubles a bfloat16 rounding's error:
3.0 there. The forward must also be mostly bit-identical to unfused autocast's where the conversions round
as the GPU's do (float16 anywhere, bfloat16 on CUDA).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from mvmae_fast import ops, use_backend
from mvmae_fast.ops.mlp import autocast
from autocast_helpers import block_by_hand, make_block, mlp_inputs
from mvmae_helpers import graph_names

DTYPES = [torch.bfloat16, torch.float16]
CUDA_MARKS = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="native Triton only (TRITON_INTERPRET=0)")]
EPS = 1e-6


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.fixture
def layers(request, monkeypatch):
    """(device type, act dtype): the Triton kernel set forced on the CPU, or switched on for CUDA."""
    where, dtype = request.param
    if where == "interpreter":
        monkeypatch.setattr(autocast, "_kernels", lambda device: autocast._TritonKernels(dtype))
        return "cpu", dtype
    monkeypatch.setenv(autocast.CUDA_LAYERS_ENV, "1")
    return "cuda", dtype


INTERPRETER_MARKS = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                        reason="CPU tensors: runs under the Triton interpreter only")]
PARAMS = ([pytest.param(("interpreter", d), id=f"interpreter-{dtype_id(d)}", marks=INTERPRETER_MARKS)
           for d in DTYPES]
          + [pytest.param(("cuda", d), id=f"cuda-{dtype_id(d)}", marks=CUDA_MARKS) for d in DTYPES])


def factor(device, dtype):
    return 3.0 if device == "cpu" and dtype == torch.bfloat16 else 1.5


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel_error(t, exact):
    return ((t.double() - exact).norm() / exact.norm()).item()


def run(fn, inputs, grad, device, dtype, use_autocast=True):
    """(out, [gradient of each input]) of fn(*inputs) on device, under its autocast or not."""
    leaves = [t.detach().to(device).clone().requires_grad_(True) for t in inputs]
    with torch.autocast(device, dtype=dtype, enabled=use_autocast):
        out = fn(*leaves)
    return out, list(torch.autograd.grad(out, leaves, grad.to(device, out.dtype)))


def check(names, got, base, exact, limit):
    failures = []
    for name, g, b, e in zip(names, got, base, exact, strict=True):
        assert g.dtype == b.dtype and g.shape == e.shape, name
        err, base_err = rel_error(g.cpu(), e.cpu()), rel_error(b.cpu(), e.cpu())
        if not err <= limit * base_err + 1e-6:
            failures.append(f"{name}: relative error {err:.3e} > {limit} x unfused autocast's {base_err:.3e}")
    assert not failures, "; ".join(failures)


def check_forward_bits(out, base_out, device, dtype):
    """>= 97% of the outputs bit-identical to unfused autocast's where the conversions round to nearest
    (the GEMMs are the same calls on mostly the same operands)."""
    if device == "cpu" and dtype == torch.bfloat16:
        return  # the interpreter truncates: covered by check's error bound instead
    same = (out == base_out).float().mean().item()
    assert same >= 0.97, f"only {same:.2%} of the outputs equal unfused autocast's"


def compare(fused, unfused, inputs, grad, names, expected_fn, device, dtype, exact=None, bits=True):
    """fused (whose graph must hold expected_fn) against unfused under autocast and exact (default:
    unfused) in float64 on the CPU; with bits, check_forward_bits too. Returns fused's output."""
    exact_out, exact_grads = run(exact or unfused, [t.double() for t in inputs], grad.double(), "cpu", dtype, False)
    base_out, base_grads = run(unfused, inputs, grad, device, dtype)
    out, grads = run(fused, inputs, grad, device, dtype)
    graph = set(graph_names(out))
    assert expected_fn in graph, f"not the autocast path: {graph}"
    if bits:
        check_forward_bits(out, base_out, device, dtype)
    check(("out", *names), (out, *grads), (base_out, *base_grads), (exact_out, *exact_grads),
          factor(device, dtype))
    return out


def unfused_mlp(x, nw, nb, w1, b1, w2, b2):
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], nw, nb, EPS), w1, b1)), w2, b2)


def unfused_linear(x, nw, nb, w, b):
    return F.linear(F.layer_norm(x, x.shape[-1:], nw, nb, EPS), w, b)


def fused_mlp(device):
    if device == "cpu":  # the Function directly: the CPU dispatch takes the extension's kernels
        return lambda x, nw, nb, w1, b1, w2, b2: autocast.prenorm_mlp(x, nw, nb, EPS, w1, b1, w2, b2)
    return lambda x, nw, nb, w1, b1, w2, b2: ops.prenorm_mlp(x, nw, nb, EPS, w1, b1, w2, b2)


def fused_linear(device):
    if device == "cpu":
        return lambda x, nw, nb, w, b: autocast.prenorm_linear(x, nw, nb, EPS, w, b)
    return lambda x, nw, nb, w, b: ops.prenorm_linear(x, nw, nb, EPS, w, b)


MLP_CASES = [((2, 33, 64), 256), ((65, 48), 130)]


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-Hd{c[1]}")
@pytest.mark.parametrize("layers", PARAMS, indirect=True)
def test_prenorm_mlp(layers, case):
    device, dtype = layers
    inputs, grad = mlp_inputs(*case)
    out = compare(fused_mlp(device), unfused_mlp, inputs, grad, ("dx", "dnw", "dnb", "dw1", "db1", "dw2", "db2"),
                  "_PrenormMlpBackward", device, dtype)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-out{c[1]}")
@pytest.mark.parametrize("layers", PARAMS, indirect=True)
def test_prenorm_linear(layers, case):
    device, dtype = layers
    inputs, grad = mlp_inputs(*case)
    inputs, grad = inputs[:5], torch.randn(*case[0][:-1], case[1], generator=gen(7))
    out = compare(fused_linear(device), unfused_linear, inputs, grad, ("dx", "dnw", "dnb", "dw", "db"),
                  "_PrenormLinearBackward", device, dtype)
    assert out.dtype == dtype and out.shape == (*case[0][:-1], case[1])


def fused_block(block, names, device):
    """The block with the autocast layers: on CUDA the module itself (real dispatch); in the interpreter
    its two halves through the Functions (the CPU dispatch would take the extension's kernels)."""
    if device == "cuda":
        return lambda x, *ps: torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    def by_functions(x, *ps):
        p = dict(zip(names, ps))
        x = autocast.attention_half(x, p["norm1.weight"], p["norm1.bias"], block.norm1.eps, p["attn.qkv.weight"],
                                    p["attn.qkv.bias"], p["attn.proj.weight"], p["attn.proj.bias"],
                                    block.attn.num_heads)
        return autocast.prenorm_mlp(x, p["norm2.weight"], p["norm2.bias"], block.norm2.eps, p["mlp.fc1.weight"],
                                    p["mlp.fc1.bias"], p["mlp.fc2.weight"], p["mlp.fc2.bias"])

    return by_functions


@pytest.mark.parametrize("case", [(2, 17, 32, 2), (1, 40, 48, 3)], ids=lambda c: "B{}-N{}-D{}-H{}".format(*c))
@pytest.mark.parametrize("layers", PARAMS, indirect=True)
def test_block(layers, case):
    """Both halves (attention_half with the Triton attention, then prenorm_mlp): the output and the
    gradients wrt x and all 12 parameters, against the block written out with torch ops (attention: the
    Triton kernel under autocast, torch's SDPA in float64). No bit-identity check: one LayerNorm output
    rounded the other way (their statistics are summed in another order) moves every attention output
    of its sample by an ulp."""
    device, dtype = layers
    B, N, D, H = case
    block = make_block(D, H).to(device)
    names, params = zip(*((n, p.detach().cpu()) for n, p in block.named_parameters()))
    x, grad = torch.randn(B, N, D, generator=gen(1)) * 2 + 1, torch.randn(B, N, D, generator=gen(2))

    def by_hand(backend):
        return lambda x, *ps: block_by_hand(block, x, dict(zip(names, ps)), backend)

    out = compare(fused_block(block, names, device), by_hand("triton"), [x, *params], grad, ("x", *names),
                  "_AttentionHalfBackward", device, dtype, exact=by_hand("torch"), bits=False)
    assert out.dtype == torch.float32


def test_switch_and_support_rules(monkeypatch):
    """supported(): CPU tensors need CPU bfloat16 autocast (not float16); the CUDA layers need the switch;
    float64 or mixed dtypes never; rows over MAX_DIM values are refused by the Triton set."""
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast.supported(x, torch.randn(8))
        assert not autocast.supported(x, torch.randn(8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not autocast.supported(x)
    assert not autocast.supported(x)
    for value, on in (("1", True), (" 1 ", True), ("0", False), ("", False), ("yes", False)):
        monkeypatch.setenv(autocast.CUDA_LAYERS_ENV, value)
        assert autocast.cuda_layers_enabled() is on, value
    from mvmae_fast.ops.mlp import autocast_triton

    assert autocast_triton.check_dim(autocast_triton.MAX_DIM) is None
    assert "8193" in autocast_triton.check_dim(autocast_triton.MAX_DIM + 1)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU with native Triton")
def test_cuda_dispatch(monkeypatch):
    """On CUDA the layers run only with the switch on, under CUDA autocast in bf16 or fp16, and never
    while torch.compile traces or under a forced backend."""
    block = make_block(64, 4).cuda()
    x = torch.randn(2, 17, 64, device="cuda")
    monkeypatch.setenv(autocast.CUDA_LAYERS_ENV, "0")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert "_PrenormMlpBackward" not in graph_names(block(x))
    monkeypatch.setenv(autocast.CUDA_LAYERS_ENV, "1")
    for dtype in DTYPES:
        with torch.autocast("cuda", dtype=dtype):
            names = set(graph_names(block(x)))
        assert {"_PrenormMlpBackward", "_AttentionHalfBackward"} <= names, names
    assert "_PrenormMlpBackward" not in graph_names(block(x))  # no autocast: float32 torch ops
    with torch.autocast("cuda", dtype=torch.bfloat16), use_backend("torch"):
        assert "_PrenormMlpBackward" not in graph_names(block(x))
