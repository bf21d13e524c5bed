"""Row gather and scatter in plain PyTorch: the spec for the other backends."""

import torch


def _expand(ids, width):
    return ids.long().unsqueeze(-1).expand(-1, -1, width)


def gather_rows(x, ids):
    return torch.gather(x, 1, _expand(ids, x.shape[2]))


def scatter_rows(y, ids, num_rows):
    out = y.new_zeros(y.shape[0], num_rows, y.shape[2])
    return out.scatter_(1, _expand(ids, y.shape[2]), y)
