"""Reference MAE: a self-contained re-implementation of the official MAE pretraining model.

This module reproduces the semantics of facebookresearch/mae ``models_mae.py``
(``MaskedAutoencoderViT``), together with the pieces it borrows from timm 0.3.2
(``PatchEmbed``, ``Block``, ``Attention``, ``Mlp``) and ``util/pos_embed.py``.

It serves two purposes:

* the **benchmark baseline** -- the model as the official code runs it (explicit, non-fused
  attention, exact GELU, one ``gather`` per shuffle), so speed-ups are measured against it;
* the **correctness oracle** -- same parameter names, shapes, initialisation and numerics as the
  official model, so an official checkpoint loads with ``load_state_dict(strict=True)`` and the
  fast path can be compared against it output-for-output.

It deliberately imports nothing from :mod:`mvmae_fast`: the oracle must not share code (and hence
bugs) with the product path it checks. Only ``torch`` and ``numpy`` are used.

Deviations from the official code, all of which leave the official behaviour unchanged:

* ``random_masking``/``forward_encoder``/``forward`` take an optional ``noise`` tensor (N, L), as
  newer official versions do, so that masking can be made deterministic and shared with the fast
  path. ``noise=None`` draws ``torch.rand`` exactly like the official code.
* ``patchify``/``unpatchify`` use ``in_chans`` where the official code hard-codes 3 (identical for
  RGB; the official code simply breaks for other channel counts).
* The constructor's ``norm_layer`` default is ``partial(nn.LayerNorm, eps=1e-6)`` (the official
  class default is plain ``nn.LayerNorm``, eps=1e-5, but every official factory function passes
  eps=1e-6, so models built through the factories are identical).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "Attention",
    "Block",
    "ImageSizeError",
    "MaskedAutoencoderViT",
    "Mlp",
    "PatchEmbed",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "get_2d_sincos_pos_embed_from_grid",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
]


# --------------------------------------------------------------------------------------------
# 2-D sine-cosine position embedding (util/pos_embed.py)
# --------------------------------------------------------------------------------------------
# The arithmetic is done in numpy float32 exactly as the official code does it, so the frozen
# pos_embed buffers are bit-identical to those of an official model (and of official checkpoints).


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding for a ``grid_size`` x ``grid_size`` patch grid.

    Returns a numpy array of shape (grid_size**2, embed_dim), or (1 + grid_size**2, embed_dim) with
    an all-zero first row when ``cls_token`` is True. Row ``1 + i*grid_size + j`` (or ``i*grid_size
    + j`` without cls) is patch (row i, column j).

    Layout note (it is easy to get backwards): the official code builds the grid with
    ``np.meshgrid(grid_w, grid_h)``, so ``grid[0]`` holds the COLUMN index j and ``grid[1]`` the
    ROW index i. Hence the first ``embed_dim/2`` dims encode the column and the second half the row,
    even though the official variable names call the first half ``emb_h``.
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first: grid[0][i, j] == j, grid[1][i, j] == i
    grid = np.stack(grid, axis=0)

    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        # The cls token gets no positional signal. (np.zeros is float64, which promotes the result
        # to float64 as in the official code; the values were computed in float32 regardless.)
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """Concatenate a 1-D embedding of ``grid[0]`` (first half) and of ``grid[1]`` (second half)."""
    assert embed_dim % 2 == 0

    # With get_2d_sincos_pos_embed's grid, grid[0] is the column and grid[1] the row coordinate.
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)

    return np.concatenate([emb_first, emb_second], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding: ``[sin(pos * omega), cos(pos * omega)]`` with
    ``omega_k = 1 / 10000**(k / (embed_dim/2))`` for ``k < embed_dim/2``.

    pos: positions of any shape (flattened to (M,)); returns (M, embed_dim).
    """
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,), stays float32 like the official code

    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product

    emb_sin = np.sin(out)  # (M, D/2)
    emb_cos = np.cos(out)  # (M, D/2)

    return np.concatenate([emb_sin, emb_cos], axis=1)  # (M, D)


# --------------------------------------------------------------------------------------------
# timm 0.3.2 building blocks (only what MAE pretraining uses: no dropout, no drop path)
# --------------------------------------------------------------------------------------------


class ImageSizeError(ValueError, AssertionError):
    """Input image size does not match the model's ``img_size``.

    timm signals this with a bare ``assert`` (AssertionError); we raise explicitly so the check
    survives ``python -O``, and subclass both so callers catching either type keep working.
    """


def _to_2tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class PatchEmbed(nn.Module):
    """Image to patch embedding: a stride-p Conv2d, flattened to (B, L, D) in row-major patch order."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        img_size = _to_2tuple(img_size)
        patch_size = _to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        # Like timm 0.3.2, refuse other sizes: the fixed pos_embed only covers img_size.
        if H != self.img_size[0] or W != self.img_size[1]:
            raise ImageSizeError(
                f"Input image size ({H}*{W}) doesn't match model ({self.img_size[0]}*{self.img_size[1]})."
            )
        # (B, D, H/p, W/p) -> (B, D, L) -> (B, L, D); patch index = row * (W/p) + col.
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as timm 0.3.2 with drop=0."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention computed explicitly, exactly as timm 0.3.2 does.

    Deliberately not ``F.scaled_dot_product_attention``: the baseline must materialise the
    (B, H, N, N) attention matrix and apply the scale after q @ k^T, as the official model did.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        # qkv weight rows are laid out [q | k | v], each split into heads: (3, B, H, N, Dh).
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)

        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------------------------
# MAE (models_mae.py)
# --------------------------------------------------------------------------------------------


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT backbone (official MAE pretraining model)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False):
        super().__init__()
        # Kept for patchify/unpatchify (the official code hard-codes 3 channels there).
        self.in_chans = in_chans

        # ---- encoder ----
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos embedding. A frozen Parameter rather than a buffer so the state-dict key and
        # its behaviour (listed by parameters(), skipped by the optimiser's grads) match the official model.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)

        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # ---- decoder ----
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)

        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, qk_scale=None,
                  norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)  # decoder to patch

        self.norm_pix_loss = norm_pix_loss

        self.initialize_weights()

    # ---------------------------------------------------------------- init
    def initialize_weights(self):
        # Fixed 2-D sin-cos position embeddings (cls row = 0). The official code assumes a square grid.
        grid = int(self.patch_embed.num_patches**.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        decoder_pos_embed = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # Initialise patch_embed like an nn.Linear (fan_in = C*p*p) instead of Conv2d's default.
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) is effectively normal_(std=.02): its cutoff (2.) is ~100 sigma.
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)

        # nn.Linear: xavier_uniform + zero bias (following the official JAX ViT); LayerNorm: 1 / 0.
        # Note qkv is initialised as one (3D, D) matrix, as the official MAE does.
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ---------------------------------------------------------------- patches
    def patchify(self, imgs):
        """imgs: (N, C, H, W) -> x: (N, L, p*p*C).

        Patch index l = i*w + j (row-major over the patch grid); within a patch the element order is
        (a, b, c) -> (a*p + b)*C + c, i.e. pixel-row, pixel-column, then channel (channel fastest).
        """
        p = self.patch_embed.patch_size[0]
        c = self.in_chans
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0

        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], c, h, p, w, p))
        x = torch.einsum('nchpwq->nhwpqc', x)
        x = x.reshape(shape=(imgs.shape[0], h * w, p**2 * c))
        return x

    def unpatchify(self, x):
        """x: (N, L, p*p*C) -> imgs: (N, C, H, W); the exact inverse of patchify (square grids)."""
        p = self.patch_embed.patch_size[0]
        c = self.in_chans
        h = w = int(x.shape[1]**.5)
        assert h * w == x.shape[1]

        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum('nhwpqc->nchpwq', x)
        imgs = x.reshape(shape=(x.shape[0], c, h * p, h * p))
        return imgs

    # ---------------------------------------------------------------- masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by argsorting noise.

        x: (N, L, D). noise: optional (N, L); the ``int(L*(1-mask_ratio))`` patches with the smallest
        noise are kept (ties resolved by argsort). Returns:
          x_masked (N, len_keep, D) -- kept tokens, in ascending-noise order;
          mask (N, L) float -- 0 keep, 1 remove, in the original patch order;
          ids_restore (N, L) -- inverse of the shuffle, used by the decoder to unshuffle.
        """
        N, L, D = x.shape  # batch, length, dim
        len_keep = int(L * (1 - mask_ratio))

        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]

        # Sort noise for each sample: small is keep, large is remove.
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        # Keep the first subset.
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))

        # Binary mask in shuffled order (first len_keep are kept), then unshuffled to patch order.
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)

        return x_masked, mask, ids_restore

    # ---------------------------------------------------------------- encoder / decoder
    def forward_encoder(self, x, mask_ratio, noise=None):
        # Embed patches and add pos embed (without the cls row) BEFORE masking, so each kept token
        # carries its original position.
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]

        # Masking: length L -> len_keep.
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        # Prepend the cls token (with its all-zero pos embed row).
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)

        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)

        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)

        # Append mask tokens for the removed patches, then unshuffle to the original patch order
        # (the cls token is held aside so it is not permuted).
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token

        x = x + self.decoder_pos_embed

        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)

        x = self.decoder_pred(x)  # predictor projection to p*p*C pixels

        return x[:, 1:, :]  # remove cls token

    # ---------------------------------------------------------------- loss
    def forward_loss(self, imgs, pred, mask):
        """imgs: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 0 keep, 1 remove.

        Mean squared error per patch, averaged over the removed patches only. With norm_pix_loss the
        target patch is normalised by its own mean and UNBIASED variance (torch.var default), as the
        official code does.
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6)**.5

        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L), mean loss per patch

        loss = (loss * mask).sum() / mask.sum()  # mean loss on removed patches
        return loss

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# --------------------------------------------------------------------------------------------
# Official model factories
# --------------------------------------------------------------------------------------------


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# Recommended architectures (aliases, as in the official code): decoder 512 dim, 8 blocks.
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
