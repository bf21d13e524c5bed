"""``attention``: non-causal multi-head self-attention straight from the fused qkv projection.

Input ``qkv`` (B, N, 3*H*Dh) laid out as (B, N, 3, H, Dh), the output of ``Linear(D, 3D)``; output
(B, N, H*Dh), ready for the output projection. The ``torch`` backend (PyTorch's
``scaled_dot_product_attention``) is the reference; faster backends register here.
"""

import torch
import torch.nn.functional as F

from ... import backends
from ..._utils import check_int, check_tensor

IMPLEMENTED = ("torch",)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(qkv, num_heads):
    check_tensor("qkv", qkv, 3, _DTYPES, "(B, N, 3*H*Dh)")
    check_int("num_heads", num_heads, minimum=1)
    if qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"qkv's last dimension ({qkv.shape[2]}) must be a multiple of 3 * num_heads ({3 * num_heads})")


def reference(qkv, num_heads):
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, -1)


def attention(qkv, num_heads, *, backend=None):
    """softmax(q k^T / sqrt(Dh)) v per head, from the fused (B, N, 3*H*Dh) qkv tensor."""
    _check(qkv, num_heads)
    backends.select_backend("attention", qkv.device, backend or "", IMPLEMENTED)
    return reference(qkv, num_heads)
