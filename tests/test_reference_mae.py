"""Tests for mvmae_fast.reference_mae (the official-MAE oracle).

Every check compares the reference against an INDEPENDENT computation (explicit loops, math.sin /
math.cos, hand-written sums, other torch ops) rather than against code copied from the module, so
a bug in the oracle cannot hide behind the same bug in its test.
"""

import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mvmae_fast import reference_mae as R

# The tiny test configuration from the brief: 8x8 grid of 4x4 patches (L = 64).
TINY = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


@pytest.fixture(autouse=True)
def _single_thread():
    # These tensors are tiny: intra-op threading buys nothing, and on a busy shared CPU thread
    # hand-offs made the 20-step training test swing from 0.2 s to >10 s. Restore afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**over):
    torch.manual_seed(0)
    return R.MaskedAutoencoderViT(**{**TINY, **over})


# ------------------------------------------------------------------ (a) patchify / unpatchify
def test_patchify_layout_and_round_trip():
    p, C, H = 2, 3, 6  # 3x3 grid of 2x2 patches: small enough for a full loop check
    model = R.MaskedAutoencoderViT(img_size=H, patch_size=p, in_chans=C, embed_dim=8, depth=1,
                                   num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    img = torch.randn(2, C, H, H)
    x = model.patchify(img)
    h = w = H // p
    assert x.shape == (2, h * w, p * p * C)
    for n in range(2):
        for i in range(h):
            for j in range(w):
                for a in range(p):
                    for b in range(p):
                        for c in range(C):
                            assert x[n, i * w + j, (a * p + b) * C + c] == img[n, c, i * p + a, j * p + b]
    assert torch.equal(model.unpatchify(x), img)
    # The inverse direction too: any (N, L, p*p*C) tensor survives unpatchify -> patchify.
    y = torch.randn(2, h * w, p * p * C)
    assert torch.equal(model.patchify(model.unpatchify(y)), y)


# ------------------------------------------------------------------ (b) position embedding
def _pos_by_hand(D, row, col, d):
    """Official layout: dims [0, D/2) encode the column, [D/2, D) the row; sin then cos per half."""
    quarter = D // 4
    half, k = divmod(d, D // 2)          # half 0 -> column, half 1 -> row
    coord = col if half == 0 else row
    use_cos, k = divmod(k, quarter)      # first quarter of each half sin, second cos
    omega = 1.0 / 10000 ** (k / quarter)
    return math.cos(coord * omega) if use_cos else math.sin(coord * omega)


@pytest.mark.parametrize("D,g", [(16, 4), (64, 8), (768, 14)])
def test_pos_embed_values_by_hand(D, g):
    pe = R.get_2d_sincos_pos_embed(D, g, cls_token=True)
    assert pe.shape == (1 + g * g, D)
    assert (pe[0] == 0).all()  # cls row
    triples = [(0, 0, 0), (0, 0, D // 4), (0, 1, 0), (1, 0, 0), (1, 0, D // 2), (1, 0, 3 * D // 4),
               (g - 1, 2, 1), (2, g - 1, D // 4 + 1), (g - 1, g - 1, D - 1), (3, 1, D // 2 + 1),
               (1, 3, D // 2 - 1)]
    for row, col, d in triples:
        want = _pos_by_hand(D, row, col, d)
        got = float(pe[1 + row * g + col, d])
        assert abs(got - want) < 2e-6, (row, col, d, got, want)
    # Without cls: the same table minus the zero row.
    assert (R.get_2d_sincos_pos_embed(D, g, cls_token=False) == pe[1:]).all()


def test_model_pos_embeds_are_frozen_sincos():
    m = tiny()
    g = 8
    for name, D in (("pos_embed", 64), ("decoder_pos_embed", 32)):
        p = getattr(m, name)
        assert isinstance(p, nn.Parameter) and not p.requires_grad
        assert p.shape == (1, 1 + g * g, D) and p.dtype == torch.float32
        assert torch.all(p[0, 0] == 0)
        for row, col, d in [(0, 1, 0), (5, 2, D // 2 + 3), (7, 7, D - 1)]:
            assert abs(float(p[0, 1 + row * g + col, d]) - _pos_by_hand(D, row, col, d)) < 2e-6


# ------------------------------------------------------------------ (c) random masking
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_random_masking_with_noise(mask_ratio):
    m = tiny()
    N, L, D = 3, 64, 5
    torch.manual_seed(1)
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    K = int(L * (1 - mask_ratio))
    x_masked, mask, ids_restore = m.random_masking(x, mask_ratio, noise)
    assert x_masked.shape == (N, K, D) and mask.shape == (N, L) and ids_restore.shape == (N, L)
    for n in range(N):
        # Rank of each patch's noise, by counting (noise values are distinct with probability 1).
        rank = [sum(1 for l2 in range(L) if noise[n, l2] < noise[n, l]) for l in range(L)]
        # ids_restore is the inverse of the ascending-noise permutation: it maps patch -> rank.
        assert ids_restore[n].tolist() == rank
        # Exactly the K smallest-noise patches are kept, in ascending-noise order.
        order = sorted(range(L), key=lambda l: float(noise[n, l]))
        for k in range(K):
            assert torch.equal(x_masked[n, k], x[n, order[k]])
        for l in range(L):
            assert mask[n, l] == (1.0 if rank[l] >= K else 0.0)
        assert mask[n].sum() == L - K


def test_random_masking_without_noise_is_valid():
    m = tiny()
    x = torch.randn(2, 64, 4)
    x_masked, mask, ids_restore = m.random_masking(x, 0.75)
    assert x_masked.shape == (2, 16, 4)
    assert torch.all(mask.sum(1) == 48)
    for n in range(2):
        assert sorted(ids_restore[n].tolist()) == list(range(64))


# ------------------------------------------------------------------ (d) loss
@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_loss_zero_and_masked_only(norm_pix):
    m = tiny(norm_pix_loss=norm_pix)
    torch.manual_seed(2)
    imgs = torch.randn(2, 3, 32, 32)
    target = m.patchify(imgs)
    if norm_pix:  # hand-normalise with the unbiased variance: sum of squares / (n - 1)
        n = target.shape[-1]
        mu = target.sum(-1, keepdim=True) / n
        var = ((target - mu) ** 2).sum(-1, keepdim=True) / (n - 1)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    mask = (torch.rand(2, 64) < 0.75).float()
    assert m.forward_loss(imgs, target, mask).abs() < 1e-10

    pred = torch.randn_like(target)
    base = m.forward_loss(imgs, pred, mask)
    pred2 = pred.clone()
    pred2[mask == 0] += 100.0  # change only the visible patches
    assert torch.equal(m.forward_loss(imgs, pred2, mask), base)
    pred3 = pred.clone()
    pred3[mask == 1] += 1.0  # changing a removed patch does change it
    assert m.forward_loss(imgs, pred3, mask) != base


def test_norm_pix_loss_uses_unbiased_variance_by_hand():
    m = R.MaskedAutoencoderViT(img_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    imgs = torch.tensor([[[[1., 2., 0., 0.],
                           [3., 5., 0., 4.],
                           [2., 2., -1., 1.],
                           [2., 6., 3., 1.]]]], dtype=torch.float64)
    # Patches (row-major, 1 channel): [1,2,3,5], [0,0,0,4], [2,2,2,6], [-1,1,3,1].
    patches = [[1, 2, 3, 5], [0, 0, 0, 4], [2, 2, 2, 6], [-1, 1, 3, 1]]
    pred = torch.tensor([[[0.5, -0.5, 0.0, 1.0]] * 4], dtype=torch.float64)
    mask = torch.tensor([[1., 0., 1., 1.]], dtype=torch.float64)
    total, count = 0.0, 0
    for l, patch in enumerate(patches):
        mu = sum(patch) / 4
        var = sum((v - mu) ** 2 for v in patch) / 3  # unbiased: divide by n - 1
        t = [(v - mu) / math.sqrt(var + 1e-6) for v in patch]
        per_patch = sum((float(pred[0, l, k]) - t[k]) ** 2 for k in range(4)) / 4
        total += per_patch * float(mask[0, l])
        count += float(mask[0, l])
    got = float(m.forward_loss(imgs, pred, mask))
    assert abs(got - total / count) < 1e-9


# ------------------------------------------------------------------ (e) patch embed == linear
def test_patch_embed_equals_linear_on_patchified_rows():
    m = tiny()
    torch.manual_seed(3)
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m = m.double()
    conv = m.patch_embed(imgs)
    wt = m.patch_embed.proj.weight  # (D, C, p, p) -> (D, p*p*C) in patchify's (a, b, c) order
    w_lin = wt.permute(0, 2, 3, 1).reshape(wt.shape[0], -1)
    lin = m.patchify(imgs) @ w_lin.T + m.patch_embed.proj.bias
    assert torch.allclose(conv, lin, atol=1e-12, rtol=0)


def test_patch_embed_rejects_wrong_size():
    m = tiny()
    with pytest.raises(ValueError, match="doesn't match"):
        m.patch_embed(torch.randn(1, 3, 16, 32))
    with pytest.raises(AssertionError):  # timm raised AssertionError; keep that contract too
        m(torch.randn(1, 3, 36, 36))


# ------------------------------------------------------------------ state dict / init / blocks
def _expected_keys(depth, dec_depth):
    blk = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
           "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
           "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in blk]
    keys += ["norm.weight", "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight",
             "decoder_embed.bias"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(dec_depth) for k in blk]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


def test_state_dict_keys_shapes_and_init():
    m = tiny()
    sd = m.state_dict()
    assert sorted(sd) == sorted(_expected_keys(2, 1))
    assert len(list(m.buffers())) == 0
    D, Dd, L, P = 64, 32, 64, 4 * 4 * 3
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + L, D), "patch_embed.proj.weight": (D, 3, 4, 4),
              "blocks.0.attn.qkv.weight": (3 * D, D), "blocks.1.mlp.fc1.weight": (4 * D, D),
              "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, 1 + L, Dd),
              "decoder_embed.weight": (Dd, D), "decoder_blocks.0.mlp.fc2.weight": (Dd, 4 * Dd),
              "decoder_pred.weight": (P, Dd), "decoder_pred.bias": (P,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    # Init: LayerNorm 1/0 with eps 1e-6, zero Linear biases, xavier bounds, tokens ~ N(0, .02).
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            assert mod.eps == 1e-6 and torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
        if isinstance(mod, nn.Linear):
            assert torch.all(mod.bias == 0)
            bound = math.sqrt(6.0 / (mod.in_features + mod.out_features))
            assert mod.weight.abs().max() <= bound
    pw = m.patch_embed.proj.weight
    assert pw.abs().max() <= math.sqrt(6.0 / (D + 3 * 16))  # xavier as a (D, C*p*p) Linear
    assert 0 < m.cls_token.std() < 0.05 and 0 < m.mask_token.std() < 0.05


def test_factories_match_official_configs():
    # Built on the meta device: checks the architecture without allocating hundreds of MB.
    with torch.device("meta"):
        cfgs = [(R.mae_vit_base_patch16_dec512d8b, 768, 12, 12, 16),
                (R.mae_vit_large_patch16_dec512d8b, 1024, 24, 16, 16),
                (R.mae_vit_huge_patch14_dec512d8b, 1280, 32, 16, 14)]
        for fn, D, depth, heads, p in cfgs:
            m = fn()
            L = (224 // p) ** 2
            sd = m.state_dict()
            assert sorted(sd) == sorted(_expected_keys(depth, 8))
            assert sd["pos_embed"].shape == (1, 1 + L, D)
            assert sd["decoder_pred.weight"].shape == (p * p * 3, 512)
            assert m.blocks[0].attn.num_heads == heads
            assert m.decoder_blocks[0].attn.num_heads == 16
    assert R.mae_vit_base_patch16 is R.mae_vit_base_patch16_dec512d8b


def test_attention_and_block_match_independent_computation():
    torch.manual_seed(4)
    blk = R.Block(32, 4, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).double()
    for p in blk.parameters():  # non-trivial biases / norm params so every term is exercised
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    # Independent: fused SDPA on manually split heads, exact erf GELU, explicit pre-norm residuals.
    h = F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(32, dim=-1)
    heads = lambda t: t.view(2, 7, 4, 8).transpose(1, 2)  # noqa: E731
    a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, 7, 32)
    x1 = x + a @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h2 = F.layer_norm(x1, (32,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    u = h2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    want = x1 + u @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    assert torch.allclose(blk(x), want, atol=1e-10, rtol=0)


def test_forward_shapes_and_noise_determinism():
    m = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    loss, pred, mask = m(imgs, mask_ratio=0.75, noise=noise)
    assert loss.shape == () and pred.shape == (2, 64, 48) and mask.shape == (2, 64)
    loss2, pred2, mask2 = m(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(pred, pred2) and torch.equal(mask, mask2)
    latent, _, _ = m.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + 16, 64)


# ------------------------------------------------------------------ (f) tiny training run
def test_tiny_model_trains():
    m = tiny()
    torch.manual_seed(5)
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)  # fixed masks so the loss is comparable step to step
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    pos_before = m.pos_embed.detach().clone()
    losses = []
    for _ in range(20):
        loss, _, _ = m(imgs, mask_ratio=0.75, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert m.pos_embed.grad is None and torch.equal(m.pos_embed, pos_before)  # stays frozen
    assert m.cls_token.grad is not None and m.mask_token.grad is not None
