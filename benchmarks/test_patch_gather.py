"""Encoder input (visible-patch embedding) and decoder input (unshuffle): the official MAE's way
against mvmae_fast's ops, forward and forward + backward ("train").

Providers:
  reference   the official code: conv2d patch embedding of all L patches + pos_embed, then
              ``torch.gather`` with an index ``.repeat``-ed to (B, K, D); for the decoder,
              ``cat([x[:, 1:], mask_token.repeat(...)])``, gather with a ``.repeat``-ed ids_restore,
              ``cat`` with the cls row, ``+ decoder_pos_embed``. Autograd backward (zero-fill +
              scatter-add for the gathers, the conv's weight gradient over all L patches).
  compiled    ``torch.compile`` of the reference (skipped on the CPU at tiny size: compiling costs
              more than the whole tiny suite).
  torch, triton   ``embed_visible_patches`` (gather K patches, K-row GEMM with the gathered
              pos + bias rows added in its epilogue) and ``decoder_unshuffle`` (one pass).

CUDA: MAE ViT-B/16 at 224 px, batch 256, K = 49 (75% mask) and 39 (MV-MAE's 80%), D 768, decoder
512, under bf16 autocast as training runs (float32 parameters, so both sides return float32).
CPU: batch 16, D 384 / 256, float32. GB/s counts the bytes an ideal kernel reads and writes.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import SIZE
from mvmae_fast import ops
from mvmae_fast.ops.patch_embed import embed_visible_patches
from mvmae_fast.ops.unshuffle import decoder_unshuffle

REFERENCE_PROVIDERS = ("reference", "compiled")
IMPLEMENTED = ("torch", "cpp", "triton")  # cpp: the decoder unshuffle only
MASK_RATIOS = (0.75, 0.8)

# (B, image size, patch, encoder D, decoder D)
SHAPES = {"cuda": (256, 224, 16, 768, 512), "cpu": (16, 224, 16, 384, 256)}
TINY = (2, 32, 8, 16, 8)


def shape_for(device):
    return TINY if SIZE == "tiny" else SHAPES[device.type]


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def tolerance(device):
    return dict(rtol=5e-2, atol=5e-2) if device.type == "cuda" else dict(rtol=1e-4, atol=1e-4)


def skip_slow_compile(device, provider):
    if provider == "compiled" and device.type == "cpu" and SIZE == "tiny":
        pytest.skip("compiling on the CPU costs more than the tiny suite; run at full size")


def masks_for(device, mask_ratio):
    B, img, p, _, _ = shape_for(device)
    L = (img // p) ** 2
    return ops.random_masking(B, L, int(L * (1 - mask_ratio)), device=device, seed=0)


# -- encoder input ---------------------------------------------------------------------------------
def official_encoder_input(imgs, ids_keep, weight, bias, pos):
    x = F.conv2d(imgs, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2) + pos[:, 1:]
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))


def encoder_inputs(device):
    B, img, p, D, _ = shape_for(device)
    g = torch.Generator(device=device).manual_seed(0)
    imgs = torch.randn(B, 3, img, img, device=device, generator=g)
    weight = torch.randn(D, 3, p, p, device=device, generator=g) / (3 * p * p) ** 0.5
    bias = torch.randn(D, device=device, generator=g) * 0.02
    pos = torch.randn(1, (img // p) ** 2 + 1, D, device=device, generator=g)
    return imgs, weight.requires_grad_(), bias.requires_grad_(), pos


def encoder_fn(provider, train, imgs, ids_keep, weight, bias, pos, grad):
    if provider in REFERENCE_PROVIDERS:
        forward = official_encoder_input if provider == "reference" else torch.compile(official_encoder_input)
    else:
        def forward(*args):
            return embed_visible_patches(*args, check_indices=False, backend=provider)

    def fn():
        with autocast(imgs.device):
            out = forward(imgs, ids_keep, weight, bias, pos)
        return torch.autograd.grad(out, (weight, bias), grad) if train else out

    return fn


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("mask_ratio", MASK_RATIOS)
def test_encoder_input(timed, device, provider, mask_ratio, mode):
    skip_slow_compile(device, provider)
    if provider == "cpp":
        pytest.skip("the encoder input has no cpp kernels")
    imgs, weight, bias, pos = encoder_inputs(device)
    ids_keep = masks_for(device, mask_ratio).ids_keep
    B, K = ids_keep.shape
    D, P = weight.shape[0], weight[0].numel()
    grad = torch.randn(B, K, D, device=device)
    train = mode == "train"
    fn = encoder_fn(provider, train, imgs, ids_keep, weight, bias, pos, grad)
    fn()  # warm-up (and compilation) outside the timing
    # forward: read K patches' pixels and the weight, write (B, K, D); backward: read them again and
    # the output gradient, write the weight and bias gradients
    bytes_moved = 4 * (B * K * P + D * P + B * K * D) * (2 if train else 1)
    result = timed(fn, bytes_moved=bytes_moved)
    expected = encoder_fn("reference", train, imgs, ids_keep, weight, bias, pos, grad)()
    for got, want in zip(result if train else [result], expected if train else [expected]):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=tolerance(device)["rtol"], atol=tolerance(device)["atol"] * scale)


# -- decoder input ---------------------------------------------------------------------------------
def official_decoder_input(x, ids_restore, mask_token, pos):
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos


def decoder_inputs(device, K):
    B, img, p, _, Dd = shape_for(device)
    L = (img // p) ** 2
    g = torch.Generator(device=device).manual_seed(1)
    x_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # decoder_embed's output under autocast
    x = torch.randn(B, 1 + K, Dd, device=device, generator=g).to(x_dtype).requires_grad_()
    mask_token = (torch.randn(1, 1, Dd, device=device, generator=g) * 0.02).requires_grad_()
    pos = torch.randn(1, 1 + L, Dd, device=device, generator=g)
    return x, mask_token, pos


def decoder_fn(provider, train, x, ids_restore, mask_token, pos, grad):
    if provider in REFERENCE_PROVIDERS:
        forward = official_decoder_input if provider == "reference" else torch.compile(official_decoder_input)
    else:
        def forward(*args):
            return decoder_unshuffle(*args, check_indices=False, backend=provider)

    def fn():
        out = forward(x, ids_restore, mask_token, pos)
        return torch.autograd.grad(out, (x, mask_token), grad) if train else out

    return fn


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("mask_ratio", MASK_RATIOS)
def test_decoder_unshuffle(timed, device, provider, mask_ratio, mode):
    skip_slow_compile(device, provider)
    if provider == "cpp" and device.type != "cpu":
        pytest.skip("the decoder unshuffle's cpp kernels are CPU kernels")
    ids_restore = masks_for(device, mask_ratio).ids_restore
    B, L = ids_restore.shape
    K = int(L * (1 - mask_ratio))
    x, mask_token, pos = decoder_inputs(device, K)
    out_shape = (B, 1 + L, x.shape[2])
    grad = torch.randn(out_shape, device=device)
    train = mode == "train"
    fn = decoder_fn(provider, train, x, ids_restore, mask_token, pos, grad)
    fn()
    # forward: read x, pos and ids_restore, write the float32 output; backward: read the output
    # gradient and ids_restore, write the x gradient
    x_bytes, out_bytes = x.numel() * x.element_size(), 4 * B * (1 + L) * x.shape[2]
    bytes_moved = x_bytes + pos.numel() * 4 + out_bytes + ids_restore.numel() * 8
    if train:
        bytes_moved += out_bytes + x_bytes + ids_restore.numel() * 8
    result = timed(fn, bytes_moved=bytes_moved)
    expected = decoder_fn("reference", train, x, ids_restore, mask_token, pos, grad)()
    if train:
        torch.testing.assert_close(result[0], expected[0], rtol=0, atol=0)  # copies
        scale = max(1.0, expected[1].abs().max().item())
        torch.testing.assert_close(result[1], expected[1], rtol=1e-4, atol=1e-4 * scale)
    else:
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
