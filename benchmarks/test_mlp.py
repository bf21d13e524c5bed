"""The fused CPU transformer layers against PyTorch's modules, forward + backward, float32 and under
CPU bfloat16 autocast.

Cases at the micro preset's shapes (batch 64): the encoder (17 tokens, D=128, MLP 512) and decoder
(65 tokens, D=64, MLP 256). ``prenorm_mlp``: x + fc2(gelu(fc1(LayerNorm(x)))), the pre-norm block's
second half; ``prenorm_linear``: LayerNorm(x) then the qkv projection (D -> 3D); ``attention_half``:
x + proj(attention(qkv(LayerNorm(x)))), the block's first half (4 heads), as one node
(ops.mlp.fused_attention_half) against the reference MAE's explicit attention. The reference is the
same computation as nn.LayerNorm / nn.Linear / nn.GELU modules (what the reference MAE runs); the
provider ``cpp`` is mvmae_fast.ops' fused kernel (csrc/cpu/mlp.cpp). Under bf16 autocast both run
inside ``torch.autocast("cpu", dtype=torch.bfloat16)``: the reference is autocast's unfused
arithmetic, ``cpp`` the ops' automatic choice there, the autocast layers (ops/mlp/autocast.py: on
AVX512-BF16 without AMX the extension's own bf16 GEMMs with the work around them in their epilogues,
elsewhere autocast's oneDNN GEMMs with the elementwise work in csrc/cpu/autocast.cpp); the bf16
baseline ``cpp_onednn_gemms`` is the same layers with MVMAE_FAST_CPU_BF16_GEMM=onednn (oneDNN's
GEMMs and separate passes), so the two show what the own GEMMs are worth. CPU only: on CUDA the ops
are the plain modules' computation. FLOPs: 2 x multiply-adds of the linears, x3 for forward + backward.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import SIZE
from mvmae_fast import ops
from mvmae_fast.ops.mlp import fused_attention_half
from mvmae_fast.ops.mlp.autocast import BF16_GEMM_ENV

IMPLEMENTED = ("cpp",)
REFERENCE_PROVIDERS = ("reference", "cpp_onednn_gemms")
SHAPES = {"micro_encoder": (64, 17, 128), "micro_decoder": (64, 65, 64)}
TINY = {"micro_encoder": (2, 5, 16), "micro_decoder": (2, 7, 8)}
HEADS = 4  # the micro preset's, encoder and decoder


def make(device, shape, out_features):
    torch.manual_seed(0)
    B, N, D = TINY[shape] if SIZE == "tiny" else SHAPES[shape]
    hidden = 4 * D
    t = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).requires_grad_(True)  # noqa: E731
    x = t(B, N, D)
    norm = (t(D, scale=0.1).detach().add_(1).requires_grad_(True), t(D, scale=0.1))
    if out_features == "attention":  # qkv and proj; linears' and attention matmuls' multiply-adds
        params = (t(3 * D, D, scale=D**-0.5), t(3 * D, scale=0.1), t(D, D, scale=D**-0.5), t(D, scale=0.1))
        flops = 2 * B * N * D * 4 * D + 2 * 2 * B * N * N * D
    elif out_features == "mlp":
        params = (t(hidden, D, scale=D**-0.5), t(hidden, scale=0.1), t(D, hidden, scale=hidden**-0.5), t(D, scale=0.1))
        flops = 2 * 2 * B * N * D * hidden
    else:
        params = (t(3 * D, D, scale=D**-0.5), t(3 * D, scale=0.1))
        flops = 2 * B * N * D * 3 * D
    return x, norm, params, flops


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["prenorm_mlp", "prenorm_linear", "attention_half"])
def test_fused_layer(timed, benchmark, device, provider, op, shape, precision, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the fused layers are CPU kernels")
    if provider == "cpp_onednn_gemms":
        if precision != "bf16":
            pytest.skip("cpp_onednn_gemms: the bf16 autocast layers on oneDNN's GEMMs")
        monkeypatch.setenv(BF16_GEMM_ENV, "onednn")
    kind = {"prenorm_mlp": "mlp", "attention_half": "attention"}.get(op, "qkv")
    x, (nw, nb), params, flops = make(device, shape, kind)
    eps = 1e-6

    def reference():
        h = F.layer_norm(x, (x.shape[-1],), nw, nb, eps)
        if op == "prenorm_mlp":
            w1, b1, w2, b2 = params
            return x + F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
        if op == "attention_half":  # the reference MAE's attention (timm 0.3.2): explicit softmax(q k^T) v
            w_qkv, b_qkv, w_proj, b_proj = params
            B, N, D = x.shape
            q, k, v = F.linear(h, w_qkv, b_qkv).reshape(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(dim=-1)
            return x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), w_proj, b_proj)
        return F.linear(h, *params)

    def fused():
        if op == "attention_half":  # the Block's first half as one node (automatic choice only)
            out = fused_attention_half(x, nw, nb, eps, *params, HEADS)
            assert out is not None, "the fused first half did not run"
            return out
        fn = ops.prenorm_mlp if op == "prenorm_mlp" else ops.prenorm_linear
        # Under autocast the automatic choice (the autocast layers); a forced cpp would run float32.
        return fn(x, nw, nb, eps, *params, backend=provider if precision == "fp32" else None)

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward(fn):
        with amp:
            return fn()

    chosen = reference if provider == "reference" else fused  # cpp_onednn_gemms: fused, env set above
    leaves = (x, nw, nb, *params)
    grad = torch.randn_like(forward(chosen))

    def step():
        return torch.autograd.grad(forward(chosen), leaves, grad)

    result = timed(step)
    expected = torch.autograd.grad(forward(reference), leaves, grad)
    for got, want in zip(result, expected):
        if precision == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:  # autocast's own gradients carry bf16 roundings (its bias gradients are bf16 sums)
            assert (got - want).norm() <= 2e-2 * want.norm()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["GFLOP/s"] = round(3 * flops / stats.stats.median / 1e9, 1)
