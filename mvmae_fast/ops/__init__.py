"""The ops. Each is a ``torch.library.custom_op`` (namespace ``mvmae_fast``) with a fake
implementation for ``torch.compile``, registered autograd, and three backends."""

from .masking import MaskingResult, random_masking
from .rows import gather_rows, scatter_rows

__all__ = ["MaskingResult", "gather_rows", "random_masking", "scatter_rows"]
