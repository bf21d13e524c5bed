"""Attention benchmarks at MAE's shapes: our kernels (Triton on CUDA, C++ on the CPU) against
PyTorch's SDPA, backend pinned.

Shapes (B, H, N, Dh): the ViT-B encoder on 40 (MV-MAE, 80% mask) and 50 (MAE, 75% mask) visible
tokens, and the 512/16 decoder on 197 tokens; B=256 on CUDA (float16, as MAE's autocast), B=8 on the
CPU (float32), tiny for CI. On the CPU also the micro and tiny presets' encoders (17 tokens) and
decoders (65 tokens) at batch 64, in float32 and bfloat16 (CPU autocast's dtype; the cpp kernel's
AVX512-BF16 products where the CPU has them). Every provider reads the fused (B, N, 3*H*Dh) qkv and returns
(B, N, H*Dh); forward+backward returns d qkv.

FLOPs: forward 4*B*H*N^2*Dh (two matmuls); forward+backward 3.5x that (the backward's five matmuls
count 2.5x; recomputation is not counted). Bytes (ideal, one pass): forward reads qkv and writes the
output, 4*B*N*H*Dh elements; forward+backward adds reading qkv, out and d out and writing d qkv,
12*B*N*H*Dh elements in all. At these lengths attention is bandwidth- and launch-bound (N/2 FLOP
per byte in fp16), so GB/s says more than TFLOP/s.
"""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import SIZE
from mvmae_fast import ops

try:
    import xformers.ops as xops
except Exception:  # not installed, or its compiled part does not load
    xops = None

SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
REFERENCE_PROVIDERS = (*SDPA_BACKENDS, *(("xformers",) if xops is not None else ()))
# Our backends to time: "torch" is SDPA unpinned, already covered by the pinned baselines.
IMPLEMENTED = ("cpp", "triton")

SHAPES = {"encoder_n40": (256, 12, 40, 64), "encoder_n50": (256, 12, 50, 64), "decoder_n197": (256, 16, 197, 32),
          "micro_encoder_n17": (64, 4, 17, 32), "micro_decoder_n65": (64, 4, 65, 16),
          "tiny_encoder_n17": (64, 3, 17, 64), "tiny_decoder_n65": (64, 4, 65, 32)}
CPU_ONLY = ("micro_encoder_n17", "micro_decoder_n65", "tiny_encoder_n17", "tiny_decoder_n65")
CPU_BATCH = 8
TINY = {"encoder_n40": (2, 2, 40, 64), "encoder_n50": (2, 2, 50, 64), "decoder_n197": (1, 2, 197, 32),
        "micro_encoder_n17": (2, 4, 17, 32), "micro_decoder_n65": (2, 4, 65, 16),
        "tiny_encoder_n17": (2, 3, 17, 64), "tiny_decoder_n65": (2, 4, 65, 32)}
FWD_BWD_FLOP_FACTOR = 3.5


def shape_for(device, name):
    if SIZE == "tiny":
        return TINY[name]
    B, H, N, Dh = SHAPES[name]
    return (B if device.type == "cuda" or name in CPU_ONLY else CPU_BATCH), H, N, Dh


def sdpa(qkv, num_heads):
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)


def xformers_attention(qkv, num_heads):
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).unbind(2)
    return xops.memory_efficient_attention(q, k, v).reshape(B, N, -1)


def provider_fn(provider, device):
    """(attention function, context manager to time it in) or a pytest.skip."""
    if provider in SDPA_BACKENDS:
        if device.type == "cpu" and provider == "sdpa_efficient":
            pytest.skip("SDPA's memory-efficient backend has no CPU kernel")
        return sdpa, sdpa_kernel(SDPA_BACKENDS[provider])
    if provider == "xformers":
        if device.type != "cuda":
            pytest.skip("xformers' memory_efficient_attention has no CPU path")
        return xformers_attention, contextlib.nullcontext()
    return (lambda qkv, num_heads: ops.attention(qkv, num_heads, backend=provider)), contextlib.nullcontext()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(timed, benchmark, device, provider, shape, mode, dtype):
    if device.type == "cuda" and (shape in CPU_ONLY or dtype == "float32"):
        pytest.skip("CUDA cases: the ViT-B shapes in float16 and bfloat16")
    if device.type == "cpu" and dtype == "float16":
        pytest.skip("CPU cases: float32 and bfloat16")
    if device.type == "cpu" and dtype == "bfloat16" and shape not in CPU_ONLY:
        pytest.skip("CPU bfloat16 cases: the micro and tiny presets' shapes")
    B, H, N, Dh = shape_for(device, shape)
    dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * Dh, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(B, N, H * Dh, device=device, dtype=dtype, generator=gen)
    attn, context = provider_fn(provider, device)
    backward = mode == "forward_backward"
    qkv.requires_grad_(backward)
    if backward:
        fn = lambda: torch.autograd.grad(attn(qkv, H), qkv, grad)[0]
    else:
        fn = lambda: attn(qkv, H)
    with context:
        try:
            fn()
        except RuntimeError as error:  # e.g. "No available kernel" for a pinned SDPA backend
            pytest.skip(f"{provider} cannot run here: {str(error).splitlines()[0]}")
        elements = B * N * H * Dh
        result = timed(fn, bytes_moved=(12 if backward else 4) * elements * qkv.element_size())

    flops = 4 * B * H * N * N * Dh * (FWD_BWD_FLOP_FACTOR if backward else 1)
    benchmark.extra_info["shape (B, H, N, Dh)"] = (B, H, N, Dh)
    benchmark.extra_info["dtype"] = str(dtype)
    benchmark.extra_info["flops_formula"] = "forward 4*B*H*N^2*Dh; forward+backward 3.5x forward"
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["TFLOP/s"] = round(flops / stats.stats.median / 1e12, 3)

    x = qkv.detach().float().requires_grad_(backward)
    expected = sdpa(x, H)
    if backward:
        expected = torch.autograd.grad(expected, x, grad.float())[0]
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 1e-1}.get(dtype, 1e-4)
    torch.testing.assert_close(result.float(), expected, rtol=tolerance, atol=tolerance)
