"""The ops. Each is a ``torch.library.custom_op`` (namespace ``mvmae_fast``) with a fake
implementation for ``torch.compile``, registered autograd, and three backends."""

from .attention import attention
from .info_nce import info_nce
from .masking import MaskingResult, masking_from_noise, random_masking
from .masking.block import block_masking
from .recon_loss import masked_recon_loss, patchify, unpatchify
from .rows import gather_rows, scatter_rows

__all__ = [
    "MaskingResult",
    "attention",
    "block_masking",
    "gather_rows",
    "info_nce",
    "masked_recon_loss",
    "masking_from_noise",
    "patchify",
    "random_masking",
    "scatter_rows",
    "unpatchify",
]
