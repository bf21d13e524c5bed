"""The model against the official MAE semantics (mvmae_fast.reference_mae) and the method's
definitions, on a tiny configuration (32 px images, 4 px patches, L = 64)."""

import math

import pytest
import torch

from mvmae_fast import ops, reference_mae
from mvmae_fast.models import MVMAE, MaskedAutoencoderViT, MVMAEConfig, create_model
from mvmae_helpers import run_distributed_info_nce

TINY = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0)
TINY_CONFIG = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, dec_dim=32, dec_depth=1,
                   dec_heads=4, proj_hidden=64, proj_out=16)
L = 64


def pair(norm_pix_loss=True, seed=0):
    torch.manual_seed(seed)
    ref = reference_mae.MaskedAutoencoderViT(**TINY, norm_pix_loss=norm_pix_loss)
    ours = MaskedAutoencoderViT(**TINY, norm_pix_loss=norm_pix_loss)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_state_dict_keys_and_shapes_match_official():
    torch.manual_seed(0)
    ref = reference_mae.MaskedAutoencoderViT(**TINY)
    ours = MaskedAutoencoderViT(**TINY)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert [n for n, p in ours.named_parameters() if not p.requires_grad] == ["pos_embed", "decoder_pos_embed"]


def test_initial_pos_embeds_equal_official():
    ref, ours = reference_mae.MaskedAutoencoderViT(**TINY), MaskedAutoencoderViT(**TINY)
    torch.testing.assert_close(ours.pos_embed, ref.pos_embed, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.decoder_pos_embed, ref.decoder_pos_embed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.8])
def test_forward_and_gradients_equal_reference(norm_pix_loss, mask_ratio):
    ref, ours = pair(norm_pix_loss)
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, L)
    loss_r, pred_r, mask_r = ref(imgs, mask_ratio=mask_ratio, noise=noise)
    loss_o, pred_o, mask_o = ours(imgs, mask_ratio=mask_ratio, noise=noise)
    assert torch.equal(mask_o, mask_r)
    torch.testing.assert_close(pred_o, pred_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_o, loss_r, rtol=1e-5, atol=1e-6)
    loss_r.backward()
    loss_o.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_official_methods_equal_reference():
    ref, ours = pair()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, L)
    lat_r, mask_r, restore_r = ref.forward_encoder(imgs, 0.75, noise=noise)
    lat_o, mask_o, restore_o = ours.forward_encoder(imgs, 0.75, noise=noise)
    assert torch.equal(restore_o, restore_r) and torch.equal(mask_o, mask_r)
    torch.testing.assert_close(lat_o, lat_r, rtol=1e-5, atol=1e-5)
    pred_r = ref.forward_decoder(lat_r, restore_r)
    torch.testing.assert_close(ours.forward_decoder(lat_r, restore_r), pred_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.forward_loss(imgs, pred_r, mask_r), ref.forward_loss(imgs, pred_r, mask_r))
    torch.testing.assert_close(ours.unpatchify(ours.patchify(imgs)), imgs, rtol=0, atol=0)
    assert torch.equal(ours.patchify(imgs), ref.patchify(imgs))


def test_patchify_layout_and_round_trip():
    imgs = torch.randn(2, 3, 8, 12)
    x = ops.patchify(imgs, 4)
    w = 3
    for n, i, j, a, b, c in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 2), (0, 1, 1, 2, 3, 1)]:
        assert x[n, i * w + j, (a * 4 + b) * 3 + c] == imgs[n, c, i * 4 + a, j * 4 + b]
    assert torch.equal(ops.unpatchify(x, 4, 3, height=2), imgs)


def test_pos_embed_values_at_named_positions():
    model = MaskedAutoencoderViT(**TINY)
    D, grid = TINY["embed_dim"], 8
    pe = model.pos_embed[0]
    assert torch.count_nonzero(pe[0]) == 0
    for row, col, m in [(0, 0, 0), (3, 5, 1), (7, 2, 15), (6, 6, 7)]:
        w = 10000 ** (-m / (D / 4))
        token = pe[1 + row * grid + col]
        expected = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
        got = [token[m], token[D // 4 + m], token[D // 2 + m], token[3 * D // 4 + m]]
        for g, e in zip(got, expected):
            assert abs(float(g) - e) < 1e-6


def test_mask_statistics():
    model = MaskedAutoencoderViT(**TINY)
    _, _, mask = model(torch.randn(64, 3, 32, 32), mask_ratio=0.75, seed=3)
    keep = int(L * 0.25)
    assert torch.all(mask.sum(1) == L - keep)
    # Over many samples every patch is removed about 75% of the time.
    freq = mask.mean(0)
    assert float(freq.min()) > 0.5 and float(freq.max()) < 0.95


def test_recon_loss_zero_for_perfect_prediction_and_ignores_visible():
    imgs = torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, 16) < 0.75).float()
    mask[:, 0] = 1.0
    for norm in (True, False):
        target = ops.patchify(imgs, 4)
        if norm:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
        assert float(ops.masked_recon_loss(target, imgs, mask, 4, norm)) == 0.0
        noisy = target + torch.randn_like(target) * (1 - mask).unsqueeze(-1)  # visible patches only
        assert float(ops.masked_recon_loss(noisy, imgs, mask, 4, norm)) == 0.0
        wrong = target + 1.0
        assert float(ops.masked_recon_loss(wrong, imgs, mask, 4, norm)) == pytest.approx(1.0)


def brute_force_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2]).double()
    n, B = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + B) % n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n


@pytest.mark.parametrize("B,d,t", [(2, 5, 0.1), (5, 17, 0.5), (3, 8, 0.05)])
def test_info_nce_equals_brute_force_and_is_symmetric(B, d, t):
    z1 = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
    loss = ops.info_nce(z1, z2, t)
    assert float(loss) == pytest.approx(brute_force_nt_xent(z1, z2, t), rel=1e-5)
    assert float(ops.info_nce(z2, z1, t)) == pytest.approx(float(loss), rel=1e-6)


def test_mvmae_one_view_without_contrast_equals_mae():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**TINY, norm_pix_loss=True)
    mv = MVMAE(MVMAEConfig(**TINY_CONFIG, views=1, w_con=0.0, mask_ratio=0.75))
    mv.load_state_dict(mae.state_dict(), strict=True)
    imgs = torch.randn(4, 3, 32, 32)
    loss, pred, mask = mae(imgs, seed=11)
    out = mv(imgs, seed=11)
    assert torch.equal(out.loss, loss) and torch.equal(out.pred[0], pred) and torch.equal(out.mask[0], mask)
    assert float(out.loss_con) == 0.0


def test_mvmae_two_views_outputs_and_contrastive_part():
    torch.manual_seed(0)
    model = MVMAE(MVMAEConfig(**TINY_CONFIG))
    imgs = torch.randn(4, 2, 3, 32, 32)
    out = model(imgs, seed=5)
    assert out.pred.shape == (2, 4, L, 48) and out.mask.shape == (2, 4, L)
    assert torch.all(out.mask.sum(-1) == L - int(L * 0.2))
    # Each view reconstructs its own crop.
    for v in range(2):
        expected = ops.masked_recon_loss(out.pred[v], imgs[:, v], out.mask[v], 4, True)
        torch.testing.assert_close(out.loss_rec[v], expected)
    torch.testing.assert_close(out.loss, out.loss_rec.mean() + out.loss_con)
    out.loss.backward()
    assert model.projector.net[0].weight.grad.abs().sum() > 0
    # The two views are masked independently.
    assert not torch.equal(out.mask[0], out.mask[1])


def test_one_crop_mode_shares_the_target():
    torch.manual_seed(0)
    model = MVMAE(MVMAEConfig(**TINY_CONFIG, view_mode="one_crop"))
    imgs = torch.randn(3, 3, 32, 32)
    out = model(imgs, seed=1)
    assert not torch.equal(out.mask[0], out.mask[1])
    for v in range(2):
        torch.testing.assert_close(out.loss_rec[v], ops.masked_recon_loss(out.pred[v], imgs, out.mask[v], 4, True))


def test_forward_features_and_timm_export():
    model = create_model("mae_vit_micro_patch4_32")
    imgs = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(imgs)
    assert feats.shape == (2, 65, 128)
    torch.testing.assert_close(model.encoder.forward_features(imgs), feats)
    # Features with every patch visible equal the masked encoder path given all patches.
    latent = model._encode(imgs, torch.arange(64).expand(2, 64))
    torch.testing.assert_close(latent, feats, rtol=1e-5, atol=1e-5)

    state = model.export_timm_state_dict()
    expected = {"cls_token": (1, 1, 128), "pos_embed": (1, 65, 128), "patch_embed.proj.weight": (128, 3, 4, 4),
                "patch_embed.proj.bias": (128,), "norm.weight": (128,), "norm.bias": (128,)}
    for i in range(4):
        p = f"blocks.{i}."
        expected.update({p + "norm1.weight": (128,), p + "norm1.bias": (128,), p + "attn.qkv.weight": (384, 128),
                         p + "attn.qkv.bias": (384,), p + "attn.proj.weight": (128, 128), p + "attn.proj.bias": (128,),
                         p + "norm2.weight": (128,), p + "norm2.bias": (128,), p + "mlp.fc1.weight": (512, 128),
                         p + "mlp.fc1.bias": (512,), p + "mlp.fc2.weight": (128, 512), p + "mlp.fc2.bias": (128,)})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    avg = model.export_timm_state_dict(global_pool="avg")
    assert "fc_norm.weight" in avg and "norm.weight" not in avg
    try:
        import timm
    except ImportError:
        return
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=4,
                                                           num_heads=4, num_classes=0)
    vit.load_state_dict(state, strict=True)
    torch.testing.assert_close(vit.forward_features(imgs), feats, rtol=1e-4, atol=1e-4)


def test_presets_exist_with_method_dimensions():
    for name, (dim, depth, heads, patch) in {"tiny": (192, 12, 3, 16), "small": (384, 12, 6, 16),
                                             "base": (768, 12, 12, 16), "large": (1024, 24, 16, 16),
                                             "huge": (1280, 32, 16, 14)}.items():
        for prefix in ("mae", "mvmae"):
            with torch.device("meta"):
                model = create_model(f"{prefix}_vit_{name}_patch{patch}")
            c = model.config
            assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.dec_dim, c.dec_depth, c.dec_heads) == (
                dim, depth, heads, patch, 512, 8, 16)
            assert c.views == (2 if prefix == "mvmae" else 1)
    defaults = MVMAEConfig()
    assert (defaults.mask_ratio, defaults.w_con, defaults.temperature, defaults.pool, defaults.view_mode,
            defaults.norm_pix_loss, defaults.proj_hidden, defaults.proj_out) == (0.8, 1.0, 0.1, "mean", "two_crops",
                                                                                 True, 2048, 128)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=30), "img_size"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(mask_ratio=0.999), "mask_ratio"),
    (dict(views=3), "views"),
    (dict(view_mode="three_crops"), "view_mode"),
    (dict(pool="max"), "pool"),
    (dict(views=1), "views"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MVMAEConfig(**{**TINY_CONFIG, **kwargs})


def test_bad_inputs():
    model = MVMAE(MVMAEConfig(**TINY_CONFIG))
    mae = MaskedAutoencoderViT(**TINY)
    with pytest.raises(ValueError, match="channels"):
        mae(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="non-square"):
        mae(torch.randn(2, 3, 32, 28))
    with pytest.raises(ValueError, match="img_size"):
        mae(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae(torch.randn(2, 3, 32, 32), mask_ratio=1.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae(torch.randn(2, 3, 32, 32), mask_ratio=0.99)
    bad = torch.randn(2, 3, 32, 32)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad[1, 0, 3, 3] = value
        with pytest.raises(ValueError, match="NaN"):
            mae(bad)
    bad[1, 0, 3, 3] = 3.4e38  # finite extremes pass the check (which must not overflow)
    bad[0, 2, 1, 1] = -3.4e38
    mae(bad)
    with pytest.raises(ValueError, match="at least 2"):
        model(torch.randn(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="two_crops"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="noise"):
        mae(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 10))
    with pytest.raises(ValueError, match="at least 2"):
        ops.info_nce(torch.randn(1, 4), torch.randn(1, 4))


def test_tiny_model_learns_on_default_dataset():
    from mvmae_fast.data import DigitsDataset, PretrainTransform, build_loader

    torch.manual_seed(0)
    data = DigitsDataset(transform=PretrainTransform(32), split="train")
    loader = build_loader(data, batch_size=32, seed=0)
    model = MVMAE(MVMAEConfig(**TINY_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    batches = iter(loader)
    for step in range(30):
        imgs, _ = next(batches)
        out = model(imgs, seed=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_distributed_info_nce_equals_single_process(tmp_path):
    world = 2
    results, z1, z2 = run_distributed_info_nce(tmp_path, 8, 16, 0.1, world=world)
    loss = ops.info_nce(z1, z2, 0.1)
    loss.backward()
    b = 8 // world
    for r, res in enumerate(results):
        torch.testing.assert_close(res["mean_loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        # DDP averages gradients over ranks; all_gather's backward sums every rank's contribution.
        torch.testing.assert_close(res["g1"] / world, z1.grad[r * b:(r + 1) * b], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["g2"] / world, z2.grad[r * b:(r + 1) * b], rtol=1e-4, atol=1e-6)


def _masked_neighbour_fraction(mask, grid):
    m = mask.view(-1, grid, grid)
    neighbours = torch.zeros_like(m)
    neighbours[:, 1:] += m[:, :-1]
    neighbours[:, :-1] += m[:, 1:]
    neighbours[:, :, 1:] += m[:, :, :-1]
    neighbours[:, :, :-1] += m[:, :, 1:]
    count = torch.ones_like(m) * 4
    count[:, 0] -= 1
    count[:, -1] -= 1
    count[:, :, 0] -= 1
    count[:, :, -1] -= 1
    return float((neighbours / count)[m > 0].mean())


def test_block_masking_removes_exact_counts_in_blocks():
    grid, keep = 14, 49
    result = ops.block_masking(200, grid, keep, seed=3)
    L = grid * grid
    assert torch.all(result.mask.sum(1) == L - keep)
    rows = torch.arange(200)[:, None]
    assert torch.equal(result.ids_restore[rows, result.ids_keep], torch.arange(keep).expand(200, -1))
    assert torch.all(result.mask[rows, result.ids_keep] == 0)
    assert torch.equal(ops.block_masking(200, grid, keep, seed=3).ids_keep, result.ids_keep)
    # Removed patches cluster: far more of their neighbours are removed than under random masking.
    random = ops.random_masking(200, L, keep, seed=3)
    assert _masked_neighbour_fraction(result.mask, grid) > _masked_neighbour_fraction(random.mask, grid) + 0.08


def test_model_with_block_masking_trains():
    torch.manual_seed(0)
    model = MVMAE(MVMAEConfig(**TINY_CONFIG, masking="block"))
    out = model(torch.randn(3, 2, 3, 32, 32), seed=2)
    assert torch.all(out.mask.sum(-1) == L - int(L * 0.2))
    out.loss.backward()
    with pytest.raises(NotImplementedError, match="attention"):
        MVMAEConfig(masking="attention")


@pytest.mark.parametrize("stock", [True, False], ids=["fused", "custom-attention"])
def test_block_forward_rows_equals_gathered_forward(stock):
    """Block.forward_rows (MAE's last decoder block on the removed rows only) = forward, then the rows;
    values and every gradient. A non-stock attention module falls back to forward + gather."""
    from mvmae_fast.models.layers import Block

    torch.manual_seed(0)
    block = Block(32, 4)
    if not stock:
        inner = block.attn
        block.attn = torch.nn.Sequential(inner)  # same function, not the stock Attention type
    x = torch.randn(3, 17, 32)
    rows = torch.stack([torch.randperm(17)[:11] for _ in range(3)])
    grad = torch.randn(3, 11, 32)

    def run(fn):
        block.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        out.backward(grad)
        return [out.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()]

    full = run(lambda t: block(t).gather(1, rows.unsqueeze(-1).expand(-1, -1, 32)))
    part = run(lambda t: block.forward_rows(t, rows))
    for a, b in zip(full, part):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)


def test_training_forward_matches_full_prediction_path():
    """return_pred=False (the last decoder block on the removed rows only) gives the loss and the
    gradients of the full path (every token decoded, then the removed rows gathered)."""
    torch.manual_seed(0)
    model = MVMAE(MVMAEConfig(**{**TINY_CONFIG, "dec_depth": 2}))
    imgs = torch.randn(4, 2, 3, 32, 32)
    results = []
    for return_pred in (False, True):
        model.zero_grad()
        out = model(imgs, seed=5, return_pred=return_pred)
        out.loss.backward()
        results.append([out.loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Shifted(torch.nn.Linear):
    """A replaced linear (as an adapter would be): its own forward adds a constant to nn.Linear's."""

    shift = 0.25

    def forward(self, x):
        return super().forward(x) + self.shift


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_replaced_linears_run_their_own_forward(bf16):
    """Linears that are not plain nn.Linear modules (an adapter's, say) run their own forward, not the
    fused ops on their weights: replacing the qkv, projection, fc1 and fc2 of an encoder block and of
    the (last) decoder block, and the prediction head, with _Shifted equals raising their biases by its
    shift."""
    ref, ours = pair(seed=3)
    shifted = MaskedAutoencoderViT(**TINY, norm_pix_loss=True)
    shifted.load_state_dict(ours.state_dict(), strict=True)
    def linears(model):
        blocks = (model.blocks[0], model.decoder_blocks[0])
        return [*((b.attn, n) for b in blocks for n in ("qkv", "proj")),
                *((b.mlp, n) for b in blocks for n in ("fc1", "fc2")), (model, "decoder_pred")]

    for owner, name in linears(shifted):
        old = getattr(owner, name)
        new = _Shifted(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        setattr(owner, name, new)
    with torch.no_grad():
        for owner, name in linears(ours):
            getattr(owner, name).bias += _Shifted.shift
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss_s, pred_s, _ = shifted(imgs, noise=noise)
        loss_o, pred_o, _ = ours(imgs, noise=noise)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred_s.float(), pred_o.float(), **tol)
    torch.testing.assert_close(loss_s.float(), loss_o.float(), **tol)


def test_hooked_linear_runs_its_own_forward():
    """A forward hook on a linear the blocks would fuse (here the prediction head, run as LayerNorm +
    linear in one op) fires: the module then runs itself, and the hook's change to its output shows."""
    _, ours = pair(seed=4)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
    _, pred, _ = ours(imgs, noise=noise)
    calls = []
    ours.decoder_pred.register_forward_hook(lambda module, args, out: calls.append(1) or out + 1.0)
    _, hooked, _ = ours(imgs, noise=noise)
    assert calls == [1]
    torch.testing.assert_close(hooked, pred + 1.0, rtol=1e-5, atol=1e-5)
