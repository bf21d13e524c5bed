"""MAE and MV-MAE in one model class (see shared METHOD.md for the method and every switch).

``MVMAE`` is configured by :class:`MVMAEConfig`: one view without the contrastive loss is exactly
MAE; two views add a projector and InfoNCE between the views' pooled encoder outputs.
``MaskedAutoencoderViT`` is a drop-in for the official MAE class: same constructor keywords, same
state-dict keys and shapes, ``forward(imgs, mask_ratio=0.75, noise=None) -> (loss, pred, mask)``.

Everything that touches masked tokens goes through :mod:`mvmae_fast.ops`, never through kernels.
"""

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .layers import Block, PatchEmbed, Projector, init_weights, prenorm_linear, xavier_patch_embed_
from .pos_embed import sincos_2d

VIEW_MODES = ("two_crops", "one_crop")
POOLS = ("mean", "cls")
MASKINGS = ("random", "block", "attention")


@dataclasses.dataclass
class MVMAEConfig:
    """Every switch of METHOD.md, with its default (MV-MAE, ViT-B/16 at 224 px)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    dec_dim: int = 512
    dec_depth: int = 8
    dec_heads: int = 16
    views: int = 2
    view_mode: str = "two_crops"
    mask_ratio: float = 0.8
    masking: str = "random"
    norm_pix_loss: bool = True
    w_rec: float = 1.0
    w_con: float = 1.0
    temperature: float = 0.1
    pool: str = "mean"
    proj_hidden: int = 2048
    proj_out: int = 128
    proj_layers: int = 3
    check_inputs: bool = True  # reject NaN/Inf images in eager mode (one reduction and a sync per step)

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "dec_dim",
                     "dec_depth", "dec_heads", "proj_hidden", "proj_out", "proj_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads or self.dec_dim % self.dec_heads:
            raise ValueError("embed_dim and dec_dim must be divisible by num_heads and dec_heads")
        if self.embed_dim % 4 or self.dec_dim % 4:
            raise ValueError("embed_dim and dec_dim must be multiples of 4 (2-D sin-cos position embeddings)")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views!r}")
        if self.view_mode not in VIEW_MODES:
            raise ValueError(f"view_mode must be one of {VIEW_MODES}, got {self.view_mode!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.masking == "attention":
            raise NotImplementedError("masking='attention' (AMT) is not implemented yet; use 'random' or 'block'")
        check_mask_ratio(self.mask_ratio, self.num_patches)
        if self.w_con < 0 or self.w_rec < 0:
            raise ValueError(f"w_rec and w_con must be >= 0, got {self.w_rec} and {self.w_con}")
        if self.w_con > 0 and self.views != 2:
            raise ValueError(f"the contrastive loss needs views=2 (w_con={self.w_con}, views={self.views})")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    @property
    def contrastive(self):
        return self.views == 2 and self.w_con > 0


def check_mask_ratio(mask_ratio, num_patches):
    """The number of kept patches, floor(L * (1 - mask_ratio)), after checking it is in [1, L)."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return keep


def _all_finite(t):
    """Whether t holds no NaN or +-Inf: its min and max (NaN propagates into both) are finite. One
    reduction pass without isfinite's temporaries (~10x faster on the CPU); one sync on CUDA."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def removed_ids(ids_restore, keep):
    """(B, L - keep) ids of the removed patches, from the inverse permutation (a scatter, no sort)."""
    return ops.invert_permutation(ids_restore)[:, keep:]


class MVMAEOutput(NamedTuple):
    loss: torch.Tensor  # w_rec * mean(loss_rec) + w_con * loss_con
    loss_rec: torch.Tensor  # (V,) reconstruction loss per view
    loss_con: torch.Tensor  # InfoNCE (0 without the contrastive loss)
    pred: torch.Tensor  # (V, B, L, p*p*C) predicted (normalised, with norm_pix_loss) patches, or None
    mask: torch.Tensor  # (V, B, L) 1 = removed


class MVMAE(nn.Module):
    """Masked autoencoder ViT for MAE (views=1, w_con=0) and MV-MAE (views=2)."""

    def __init__(self, config=None, **overrides):
        super().__init__()
        config = dataclasses.replace(config or MVMAEConfig(), **overrides)
        self.config = config
        D, Dd = config.embed_dim, config.dec_dim

        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, D)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=False)
        self.blocks = nn.ModuleList(Block(D, config.num_heads, config.mlp_ratio, config.norm_eps)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)

        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(Dd, config.dec_heads, config.mlp_ratio, config.norm_eps)
                                            for _ in range(config.dec_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=config.norm_eps)
        self.decoder_pred = nn.Linear(Dd, config.patch_size**2 * config.in_chans)

        if config.contrastive:
            self.projector = Projector(D, config.proj_hidden, config.proj_out, config.proj_layers)
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.config.embed_dim, grid).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_2d(self.config.dec_dim, grid).unsqueeze(0))
        xavier_patch_embed_(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_weights)

    # -- layout helpers, as in the official code --------------------------------------------------
    def patchify(self, imgs):
        return ops.patchify(imgs, self.config.patch_size)

    def unpatchify(self, x):
        return ops.unpatchify(x, self.config.patch_size, self.config.in_chans)

    # -- the pieces of a step -------------------------------------------------------------------
    def _check_images(self, imgs, name="imgs"):
        c = self.config
        if not isinstance(imgs, torch.Tensor) or not imgs.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(imgs, 'dtype', type(imgs))}")
        if imgs.dim() not in (4, 5):
            raise ValueError(f"{name} must be (B, C, H, W) or (B, V, C, H, W), got shape {tuple(imgs.shape)}")
        C, H, W = imgs.shape[-3:]
        if C != c.in_chans:
            raise ValueError(f"{name} has {C} channels, the model expects in_chans={c.in_chans}")
        if H != W:
            raise ValueError(f"{name} is {H}x{W}: non-square images are not supported")
        if H != c.img_size:
            raise ValueError(f"{name} is {H}x{W}, the model expects img_size={c.img_size}")
        if imgs.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        # A data-dependent check cannot be traced: compiled graphs skip it (check the data instead).
        if c.check_inputs and not torch.compiler.is_compiling() and not _all_finite(imgs):
            raise ValueError(f"{name} contains NaN or Inf values")

    def _split_views(self, imgs):
        """(V, B, C, H, W) encoder inputs and (V', B, C, H, W) reconstruction targets."""
        c = self.config
        if imgs.dim() == 4:
            imgs = imgs.unsqueeze(1)
        given = imgs.shape[1]
        views = imgs.transpose(0, 1)
        if c.view_mode == "one_crop" or c.views == 1:
            if given not in (1, c.views):
                raise ValueError(f"imgs holds {given} views; this model takes 1 (view_mode={c.view_mode!r})")
            first = views[:1]
            return first.expand(c.views, *first.shape[1:]), first
        if given != c.views:
            raise ValueError(f"view_mode='two_crops' needs imgs of shape (B, {c.views}, C, H, W), "
                             f"got {tuple(imgs.shape)}")
        return views, views

    def _masks(self, batch, mask_ratio, noise, seed, device):
        keep = check_mask_ratio(mask_ratio, self.patch_embed.num_patches)
        if noise is not None:
            noise = noise.reshape(batch, -1) if noise.numel() == batch * self.patch_embed.num_patches else noise
            if noise.shape != (batch, self.patch_embed.num_patches):
                raise ValueError(f"noise must have shape ({batch}, {self.patch_embed.num_patches}), "
                                 f"got {tuple(noise.shape)}")
            return ops.masking_from_noise(noise.to(device), keep)
        if self.config.masking == "block":
            seed = ops.masking.resolve_seed(seed)
            return ops.block_masking(batch, self.patch_embed.grid_size, keep, seed, device=device)
        return ops.random_masking(batch, self.patch_embed.num_patches, keep, device=device, seed=seed)

    def _encode(self, imgs, ids_keep):
        # Patch embedding on the kept patches only: their pixels are gathered straight from the
        # image and the pos-embed rows (plus the bias) are added in the GEMM's epilogue.
        x = ops.embed_visible_patches(imgs, ids_keep, self.patch_embed.proj.weight, self.patch_embed.proj.bias,
                                      self.pos_embed, check_indices=False)  # ids come from our own masking
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _decoder_tokens(self, latent, ids_restore, rows=None):
        """The decoder's output tokens (B, L, Dd) in patch order, cls dropped; with ``rows`` (B, M)
        (patch indices, ours), only those tokens (B, M, Dd): the last block then runs its
        projection and MLP on those rows alone."""
        x = ops.decoder_unshuffle(self.decoder_embed(latent), ids_restore, self.mask_token, self.decoder_pos_embed,
                                  check_indices=False)
        blocks = list(self.decoder_blocks)
        if rows is None or not blocks:
            for block in blocks:
                x = block(x)
            x = x[:, 1:]
            return x if rows is None else ops.gather_rows(x, rows, check_indices=False)
        for block in blocks[:-1]:
            x = block(x)
        return blocks[-1].forward_rows(x, rows + 1, check_indices=False)  # + 1: the cls token leads

    def _predict(self, tokens):
        return prenorm_linear(self.decoder_norm, self.decoder_pred, tokens)

    def _pool(self, latent):
        return latent[:, 0] if self.config.pool == "cls" else latent[:, 1:].mean(dim=1)

    def forward(self, imgs, mask_ratio=None, noise=None, seed=None, return_pred=True):
        """One training step's forward pass.

        imgs: (B, C, H, W) for one view (or for one_crop), or (B, V, C, H, W) with the views.
        mask_ratio: overrides the config's for this call. noise: (V*B, L) or (V, B, L) per-patch
        noise with MAE's argsort semantics, to reproduce a given mask; else a mask is drawn from
        ``seed`` (or torch's global RNG). ``return_pred=False`` runs the prediction head on the
        removed patches only (all the loss needs) and returns ``pred=None``: the training fast path.
        """
        c = self.config
        self._check_images(imgs)
        inputs, targets = self._split_views(imgs)
        V, B = inputs.shape[:2]
        if c.contrastive and B < 2:
            raise ValueError("the contrastive loss needs a batch of at least 2 images (one has no negatives)")
        masks = self._masks(V * B, c.mask_ratio if mask_ratio is None else mask_ratio, noise, seed, imgs.device)
        keep = masks.ids_keep.shape[1]
        latent = self._encode(inputs.reshape(V * B, *inputs.shape[2:]), masks.ids_keep)
        ids_removed = removed_ids(masks.ids_restore, keep)
        pred = None
        if return_pred:
            pred = self._predict(self._decoder_tokens(latent, masks.ids_restore))
            pred_rows = ops.gather_rows(pred, ids_removed, check_indices=False)
            pred = pred.view(V, B, *pred.shape[1:])
        else:
            pred_rows = self._predict(self._decoder_tokens(latent, masks.ids_restore, ids_removed))
        # Both views' losses in one launch; the target patches are read from the images directly.
        loss_rec = ops.masked_recon_loss_rows(pred_rows, targets.expand(V, *targets.shape[1:]), ids_removed,
                                              c.patch_size, c.norm_pix_loss, views=V, check_indices=False)
        loss = c.w_rec * loss_rec.mean()
        if c.contrastive:
            z = F.normalize(self.projector(self._pool(latent)).float(), dim=-1)
            # Negatives come from every rank while training under torch.distributed; in eval mode
            # they stay local, so one rank can evaluate alone without waiting on the others.
            loss_con = ops.info_nce(z[:B], z[B:], c.temperature, gather=self.training)
            loss = loss + c.w_con * loss_con
        else:
            loss_con = loss.new_zeros(())
        return MVMAEOutput(loss, loss_rec, loss_con, pred, masks.mask.view(V, B, -1))

    # -- evaluation and export ------------------------------------------------------------------
    def forward_features(self, imgs):
        """Encoder output (B, 1+L, D) on all patches, no masking (for probes and fine-tuning)."""
        self._check_images(imgs)
        if imgs.dim() == 5:
            raise ValueError("forward_features takes (B, C, H, W) images")
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pooled_features(self, imgs, pool=None):
        """(B, D) features: the cls token or the mean of the patch tokens."""
        latent = self.forward_features(imgs)
        return latent[:, 0] if (pool or self.config.pool) == "cls" else latent[:, 1:].mean(dim=1)

    @property
    def encoder(self):
        """The encoder as a separate module sharing these parameters (timm key names)."""
        return ViTEncoder(self)

    def export_timm_state_dict(self, global_pool="token"):
        """The encoder's weights with the keys and layout of timm's ``VisionTransformer``
        (``num_classes=0``); ``global_pool='avg'`` renames the final norm to ``fc_norm``."""
        return self.encoder.export_timm_state_dict(global_pool)


class ViTEncoder(nn.Module):
    """A view of a model's encoder (shares its modules and parameters)."""

    def __init__(self, model):
        super().__init__()
        self.patch_embed = model.patch_embed
        self.cls_token = model.cls_token
        self.pos_embed = model.pos_embed
        self.blocks = model.blocks
        self.norm = model.norm
        object.__setattr__(self, "_model", model)

    def forward_features(self, imgs):
        return self._model.forward_features(imgs)

    def forward(self, imgs):
        return self.forward_features(imgs)

    def export_timm_state_dict(self, global_pool="token"):
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if global_pool == "avg":
            state = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state.items()}
        return state


class MaskedAutoencoderViT(MVMAE):
    """Drop-in replacement for the official MAE ``MaskedAutoencoderViT`` (models_mae.py)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_layer=None,
                 norm_pix_loss=False, **overrides):
        eps = 1e-6
        if norm_layer is not None:
            probe = norm_layer(4)
            if not isinstance(probe, nn.LayerNorm):
                raise ValueError(f"norm_layer must build an nn.LayerNorm, got {type(probe).__name__}")
            eps = probe.eps
        config = MVMAEConfig(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, dec_dim=decoder_embed_dim, dec_depth=decoder_depth,
                             dec_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_eps=eps,
                             norm_pix_loss=norm_pix_loss, views=1, w_con=0.0, mask_ratio=0.75)
        super().__init__(config, **overrides)
        self.norm_pix_loss = norm_pix_loss

    def forward(self, imgs, mask_ratio=0.75, noise=None, seed=None):
        """(loss, pred (B, L, p*p*C), mask (B, L)) as the official model returns them."""
        out = super().forward(imgs, mask_ratio, noise, seed)
        return out.loss, out.pred[0], out.mask[0]

    def forward_encoder(self, imgs, mask_ratio, noise=None, seed=None):
        """(latent (B, 1+K, D), mask (B, L), ids_restore (B, L)), as the official method."""
        self._check_images(imgs)
        masks = self._masks(imgs.shape[0], mask_ratio, noise, seed, imgs.device)
        return self._encode(imgs, masks.ids_keep), masks.mask, masks.ids_restore

    def forward_decoder(self, latent, ids_restore):
        return self._predict(self._decoder_tokens(latent, ids_restore))

    def forward_loss(self, imgs, pred, mask):
        return ops.masked_recon_loss(pred, imgs, mask, self.config.patch_size, self.config.norm_pix_loss)


# -- presets -----------------------------------------------------------------------------------
# encoder (embed_dim, depth, num_heads, patch_size); decoder 512/8/16 unless overridden.
ENCODERS = {
    "tiny": (192, 12, 3, 16),
    "small": (384, 12, 6, 16),
    "base": (768, 12, 12, 16),
    "large": (1024, 24, 16, 16),
    "huge": (1280, 32, 16, 14),
}
# Small-image presets for CPU runs: 32 px images, 4 px patches (64 patches).
SMALL_IMAGE = {
    "micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                            dec_dim=64, dec_depth=2, dec_heads=4, proj_hidden=512),
    "tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                           dec_dim=128, dec_depth=4, dec_heads=4, proj_hidden=1024),
}


def _mae_kwargs(cfg):
    return dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                depth=cfg["depth"], num_heads=cfg["num_heads"], decoder_embed_dim=cfg["dec_dim"],
                decoder_depth=cfg["dec_depth"], decoder_num_heads=cfg["dec_heads"])


def _preset_configs():
    presets = {}
    for size, (dim, depth, heads, patch) in ENCODERS.items():
        presets[f"vit_{size}_patch{patch}"] = dict(img_size=224, patch_size=patch, embed_dim=dim, depth=depth,
                                                   num_heads=heads, dec_dim=512, dec_depth=8, dec_heads=16)
    for name, cfg in SMALL_IMAGE.items():
        presets[f"vit_{name}"] = dict(cfg)
    return presets


PRESETS = _preset_configs()


def _make_factories():
    factories = {}
    for name, cfg in PRESETS.items():
        def mae(_cfg=cfg, **kwargs):
            kwargs.setdefault("norm_pix_loss", True)
            mae_kwargs = {k: v for k, v in _mae_kwargs(_cfg).items() if k not in kwargs}
            return MaskedAutoencoderViT(**mae_kwargs, **kwargs)

        def mvmae(_cfg=cfg, **kwargs):
            return MVMAE(MVMAEConfig(**{**_cfg, **kwargs}))

        mae.__name__, mvmae.__name__ = f"mae_{name}", f"mvmae_{name}"
        mae.__doc__ = f"MAE {name} (norm_pix_loss on by default); keyword arguments as MaskedAutoencoderViT's."
        mvmae.__doc__ = f"MV-MAE {name}; keyword arguments override MVMAEConfig fields."
        factories[mae.__name__] = mae
        factories[mvmae.__name__] = mvmae
    # The official code's names, with its defaults (norm_pix_loss off unless asked for).
    for name in ("base", "large"):
        cfg = PRESETS[f"vit_{name}_patch16"]
        factories[f"mae_vit_{name}_patch16_dec512d8b"] = (
            lambda _cfg=cfg, **kw: MaskedAutoencoderViT(**{**_mae_kwargs(_cfg), **kw}))
    cfg = PRESETS["vit_huge_patch14"]
    factories["mae_vit_huge_patch14_dec512d8b"] = lambda _cfg=cfg, **kw: MaskedAutoencoderViT(**{**_mae_kwargs(_cfg), **kw})
    return factories


FACTORIES = _make_factories()
globals().update(FACTORIES)


def create_model(name, **kwargs):
    """Build a preset by name, e.g. ``create_model('mvmae_vit_base_patch16', mask_ratio=0.75)``."""
    if name not in FACTORIES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(FACTORIES))}")
    return FACTORIES[name](**kwargs)
