"""Decoder unshuffle in plain PyTorch: the spec for the other backends.

out[b, 0] = x[b, 0] + pos[0]; out[b, 1 + l] = (x[b, 1 + t] if t < K else mask_token) + pos[1 + l]
with t = ids_restore[b, l] and K = x.shape[1] - 1. Each value is rounded once, from float32
(float64 for float64) to the promoted dtype of x, mask_token and pos.
"""

import torch


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def decoder_unshuffle(x, ids_restore, mask_token, pos):
    B, K1, D = x.shape
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos.dtype)
    acc = _acc_dtype(out_dtype)
    t = ids_restore.long()
    visible = (t < K1 - 1).unsqueeze(-1)
    rows = torch.where(t < K1 - 1, t + 1, 0)
    tokens = x[torch.arange(B, device=x.device).unsqueeze(1), rows].to(acc)
    tokens = torch.where(visible, tokens, mask_token.reshape(1, 1, D).to(acc))
    full = torch.cat([x[:, :1].to(acc), tokens], dim=1) + pos.to(acc)
    return full.to(out_dtype)


def decoder_unshuffle_backward(grad, ids_restore, num_visible, x_dtype, token_dtype):
    B, _, D = grad.shape
    keep_order = torch.argsort(ids_restore, dim=1)[:, :num_visible]  # patch of visible token k
    grad_x = grad.new_empty(B, 1 + num_visible, D, dtype=x_dtype)
    grad_x[:, 0] = grad[:, 0]
    grad_x[:, 1:] = torch.gather(grad[:, 1:], 1, keep_order.unsqueeze(-1).expand(-1, -1, D))
    removed = (ids_restore >= num_visible).unsqueeze(-1)
    grad_token = torch.where(removed, grad[:, 1:], 0).sum(dim=(0, 1), dtype=_acc_dtype(grad.dtype))
    return grad_x, grad_token.reshape(1, 1, D).to(token_dtype)
