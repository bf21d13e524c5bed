"""Helpers shared by the autocast layers' tests (tests/test_autocast_layers.py for the CPU kernels,
tests/test_autocast_triton.py and tests/test_autocast_triton_layers.py for the Triton ones): the
column-sum accuracy criterion, the pre-norm block written out with torch ops, float64 GELU and
inputs for the layers."""

import math

import torch
import torch.nn.functional as F

from mvmae_fast import ops
from mvmae_fast.models.layers import Block

EPS32 = torch.finfo(torch.float32).eps


def sum_errors(kernel, values, dim=0):
    """(max |kernel - float64 sum|, the same for torch's float32 sum, the floor): the column-sum criterion
    is kernel <= 2 x torch + floor, the floor one float32 epsilon at the sums' magnitude (at least 1) +
    1e-6, as tests/test_mlp.py's."""
    exact = values.double().sum(dim)
    err = (kernel.double() - exact).abs().max().item()
    base = (values.float().sum(dim).double() - exact).abs().max().item()
    floor = EPS32 * max(exact.abs().max().item(), 1.0) + 1e-6
    return err, base, floor


def assert_sum_accurate(kernel, values, name):
    """kernel: float32 column sums of values (rows, cols), within the sum_errors criterion."""
    assert kernel.dtype == torch.float32 and kernel.shape == values.shape[1:], (name, kernel.dtype, kernel.shape)
    err, base, floor = sum_errors(kernel, values)
    assert err <= 2 * base + floor, f"{name}: max error {err:.3e} > 2 x torch's {base:.3e} + {floor:.3e}"


def make_block(dim, heads, seed=0):
    """A Block with LayerNorm weights around 1 and biases around 0 (not the identity init)."""
    torch.manual_seed(seed)
    block = Block(dim, heads)
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_(1, 0.5)
            norm.bias.normal_(0, 0.5)
    return block


def block_by_hand(block, x, params, attention_backend):
    """The pre-norm block with plain torch ops on params (name -> tensor), attention through ops.attention."""
    p, eps, dim = params, block.norm1.eps, x.shape[-1]
    qkv = F.linear(F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"], eps), p["attn.qkv.weight"],
                   p["attn.qkv.bias"])
    attended = ops.attention(qkv, block.attn.num_heads, backend=attention_backend)
    x = x + F.linear(attended, p["attn.proj.weight"], p["attn.proj.bias"])
    h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"], eps)
    return x + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                        p["mlp.fc2.bias"])


def gelu64(x):
    """The exact (erf) GELU in float64."""
    x = x.double()
    return x * 0.5 * torch.special.erfc(-x / math.sqrt(2))


def gelu_grad64(x):
    """GELU's derivative in float64."""
    x = x.double()
    return 0.5 * torch.special.erfc(-x / math.sqrt(2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def mlp_inputs(shape, hidden, seed=0):
    """[x, norm_weight, norm_bias, w1, b1, w2, b2] (x of mean 3, std 2) and an output gradient."""
    dim = shape[-1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 3
    nw, nb = 1 + 0.5 * torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g)
    w1, b1 = torch.randn(hidden, dim, generator=g) * dim**-0.5, torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(dim, hidden, generator=g) * hidden**-0.5, torch.randn(dim, generator=g)
    return [x, nw, nb, w1, b1, w2, b2], torch.randn(shape, generator=g)
