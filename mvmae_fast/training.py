"""The pieces of the pretraining recipe that train/pretrain.py puts together (MAE's recipe, which
MV-MAE follows): optimizer parameter groups, the per-iteration learning rate, FLOP counts for MFU,
atomic checkpoints with everything needed to resume bit-exactly, and the reconstruction grid."""

import dataclasses
import math
import os
import random
import tempfile

import numpy as np
import torch

from . import ops
from .data import IMAGENET_MEAN, IMAGENET_STD


def param_groups(model, weight_decay):
    """AdamW groups: no decay on biases, norms and other 1-D parameters; frozen ones left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
    """apex's FusedAdam when installed (CUDA), else torch's fused AdamW (CUDA and CPU; plain AdamW on
    other devices). Returns (opt, name)."""
    groups = param_groups(model, weight_decay)
    if device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True), "apex FusedAdam"
        except ImportError:
            pass
    if device_type in ("cuda", "cpu"):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, lr=lr, betas=betas), "torch AdamW"


def learning_rate(epoch_float, lr, min_lr, warmup_epochs, epochs):
    """Linear warmup, then half-cycle cosine to min_lr; ``epoch_float`` = epoch + step / steps."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    progress = (epoch_float - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, value):
    for group in optimizer.param_groups:
        group["lr"] = value


def mask_seed(seed, micro_step, rank=0, world=1):
    """The masking seed of one micro-step on one rank: a pure function, so a resumed run masks alike."""
    return ((seed & 0x7FFFFFFF) << 32) | ((micro_step * world + rank) & 0xFFFFFFFF)


def _block_macs(tokens, dim, mlp_ratio):
    # qkv + output projection + MLP, plus q k^T and attn v.
    return tokens * dim * dim * (4 + 2 * mlp_ratio) + 2 * tokens * tokens * dim


def training_flops_per_image(config, mask_ratio=None):
    """FLOPs of one image's training step: 3 x forward (backward ~ 2 x forward), forward = 2 x MACs
    of every Linear/conv and the two attention matmuls, summed over the views. Norms, activations,
    softmax and the loss are not counted."""
    c = config
    L = c.num_patches
    K = int(L * (1 - (c.mask_ratio if mask_ratio is None else mask_ratio)))
    pixels = c.patch_size**2 * c.in_chans
    enc = K * pixels * c.embed_dim + c.depth * _block_macs(1 + K, c.embed_dim, c.mlp_ratio)
    dec = ((1 + K) * c.embed_dim * c.dec_dim + c.dec_depth * _block_macs(1 + L, c.dec_dim, c.mlp_ratio)
           + (1 + L) * c.dec_dim * pixels)
    proj = 0
    if c.contrastive:
        widths = [c.embed_dim] + [c.proj_hidden] * (c.proj_layers - 1) + [c.proj_out]
        proj = sum(a * b for a, b in zip(widths, widths[1:]))
    return 3 * 2 * (c.views * (enc + dec + proj))


# -- RNG state and checkpoints -------------------------------------------------------------------
def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **payload):
    """torch.save to a temporary file in the same directory, then an atomic rename: a crash leaves
    either the old checkpoint or the new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_differences(saved, current):
    """Fields where two MVMAEConfig dicts differ, as 'name: saved -> current' strings."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def config_dict(config):
    return dataclasses.asdict(config)


# -- visualisation --------------------------------------------------------------------------------
def reconstruction_grid(model, imgs, out, max_images=8):
    """A (3, H', W') image in [0, 1]: per sample and view, the original, the masked input and the
    reconstruction (predicted patches de-normalised with the true patch statistics when
    norm_pix_loss, visible patches pasted back), as MAE's visualisation does."""
    c = model.config
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    imgs = imgs.detach().float().cpu()
    if imgs.dim() == 4:
        imgs = imgs.unsqueeze(1)
    pred, mask = out.pred.detach().float().cpu(), out.mask.detach().float().cpu()
    n = min(max_images, imgs.shape[0])
    tiles = []
    for i in range(n):
        row = []
        for v in range(pred.shape[0]):
            img = imgs[i, min(v, imgs.shape[1] - 1)]
            target = ops.patchify(img[None], c.patch_size)[0]
            p = pred[v, i]
            if c.norm_pix_loss:
                p = p * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
            m = mask[v, i].unsqueeze(-1)
            masked = ops.unpatchify((target * (1 - m))[None], c.patch_size, c.in_chans)[0]
            recon = ops.unpatchify((target * (1 - m) + p * m)[None], c.patch_size, c.in_chans)[0]
            row += [img, masked, recon]
        tiles.append(torch.cat([(t * std + mean).clamp(0, 1) for t in row], dim=2))
    return torch.cat(tiles, dim=1)


def save_png(image, path, scale=1):
    """Writes a (3, H, W) image in [0, 1], enlarged ``scale`` times (nearest neighbour)."""
    from PIL import Image

    image = image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
