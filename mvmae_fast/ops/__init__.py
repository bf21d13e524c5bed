"""The ops. Each is a ``torch.library.custom_op`` (namespace ``mvmae_fast``) with a fake
implementation for ``torch.compile``, registered autograd, and three backends."""

from .attention import attention
from .info_nce import info_nce, info_nce_rows
from .masking import MaskingResult, masking_from_noise, random_masking
from .masking.block import block_masking
from .masking.reference import invert_permutation
from .mlp import mlp, prenorm_linear, prenorm_mlp
from .patch_embed import embed_visible_patches, gather_table_rows, gather_visible_patches
from .recon_loss import masked_recon_loss, masked_recon_loss_rows, patchify, unpatchify
from .rows import gather_rows, scatter_rows
from .unshuffle import decoder_unshuffle

__all__ = [
    "MaskingResult",
    "attention",
    "block_masking",
    "decoder_unshuffle",
    "embed_visible_patches",
    "gather_rows",
    "gather_table_rows",
    "gather_visible_patches",
    "info_nce",
    "info_nce_rows",
    "invert_permutation",
    "masked_recon_loss",
    "masked_recon_loss_rows",
    "masking_from_noise",
    "mlp",
    "patchify",
    "prenorm_linear",
    "prenorm_mlp",
    "random_masking",
    "scatter_rows",
    "unpatchify",
]
