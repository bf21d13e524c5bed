"""The fused CPU transformer layers against PyTorch's modules, forward + backward, float32.

Cases at the micro preset's shapes (batch 64): the encoder (17 tokens, D=128, MLP 512) and decoder
(65 tokens, D=64, MLP 256). ``prenorm_mlp``: x + fc2(gelu(fc1(LayerNorm(x)))), the pre-norm block's
second half; ``prenorm_linear``: LayerNorm(x) then the qkv projection (D -> 3D). The reference is the
same computation as nn.LayerNorm / nn.Linear / nn.GELU modules (what the reference MAE runs); the
provider ``cpp`` is mvmae_fast.ops' fused kernel (csrc/cpu/mlp.cpp). CPU only: on CUDA the ops are
the plain modules' computation. FLOPs: 2 x multiply-adds of the linears, x3 for forward + backward.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import SIZE
from mvmae_fast import ops

IMPLEMENTED = ("cpp",)
SHAPES = {"micro_encoder": (64, 17, 128), "micro_decoder": (64, 65, 64)}
TINY = {"micro_encoder": (2, 5, 16), "micro_decoder": (2, 7, 8)}


def make(device, shape, out_features):
    torch.manual_seed(0)
    B, N, D = TINY[shape] if SIZE == "tiny" else SHAPES[shape]
    hidden = 4 * D
    t = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).requires_grad_(True)  # noqa: E731
    x = t(B, N, D)
    norm = (t(D, scale=0.1).detach().add_(1).requires_grad_(True), t(D, scale=0.1))
    if out_features == "mlp":
        params = (t(hidden, D, scale=D**-0.5), t(hidden, scale=0.1), t(D, hidden, scale=hidden**-0.5), t(D, scale=0.1))
        flops = 2 * 2 * B * N * D * hidden
    else:
        params = (t(3 * D, D, scale=D**-0.5), t(3 * D, scale=0.1))
        flops = 2 * B * N * D * 3 * D
    return x, norm, params, flops


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["prenorm_mlp", "prenorm_linear"])
def test_fused_layer(timed, benchmark, device, provider, op, shape):
    if device.type != "cpu":
        pytest.skip("the fused layers are CPU kernels")
    x, (nw, nb), params, flops = make(device, shape, "mlp" if op == "prenorm_mlp" else "qkv")
    eps = 1e-6

    def reference():
        h = F.layer_norm(x, (x.shape[-1],), nw, nb, eps)
        if op == "prenorm_mlp":
            w1, b1, w2, b2 = params
            return x + F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
        return F.linear(h, *params)

    def fused():
        fn = ops.prenorm_mlp if op == "prenorm_mlp" else ops.prenorm_linear
        return fn(x, nw, nb, eps, *params, backend=provider)

    forward = reference if provider == "reference" else fused
    leaves = (x, nw, nb, *params)
    grad = torch.randn_like(forward())

    def step():
        return torch.autograd.grad(forward(), leaves, grad)

    result = timed(step)
    expected = torch.autograd.grad(reference(), leaves, grad)
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["GFLOP/s"] = round(3 * flops / stats.stats.median / 1e9, 1)
