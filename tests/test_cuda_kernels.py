"""GPU checks of the Triton kernels added for the encoder input, the decoder unshuffle, the fused
losses and attention: each against its torch reference on the same CUDA tensors, in fp32, fp16 and
bf16, forward and gradients, at MAE shapes. Run by benchmarks/gpu.sh (native Triton: TRITON_INTERPRET=0)."""

import os

import pytest
import torch
import torch.nn.functional as F

from mvmae_fast import ops
from mvmae_fast.models import MVMAE, MVMAEConfig

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="native Triton only (TRITON_INTERPRET=0)"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=2e-3, atol=2e-3), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    diff = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, diff, grad_out)


def compare(fn_ref, fn_fast, inputs, dtype):
    out_ref = fn_ref(*inputs)
    grad_out = torch.randn_like(out_ref)
    ref, ref_grads = grads(fn_ref, inputs, grad_out)
    got, got_grads = grads(fn_fast, inputs, grad_out)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", [49, 39, 1])
def test_embed_visible_patches(dtype, keep):
    B, D, p = 16, 768, 16
    imgs = torch.randn(B, 3, 224, 224, device="cuda", dtype=dtype)
    ids = ops.random_masking(B, 196, keep, device="cuda", seed=keep).ids_keep
    w = torch.randn(D, 3, p, p, device="cuda", dtype=dtype) * 0.02
    b = torch.randn(D, device="cuda", dtype=dtype)
    pos = torch.randn(1, 197, D, device="cuda", dtype=dtype)
    f = lambda backend: (lambda w, b: ops.embed_visible_patches(imgs, ids, w, b, pos, backend=backend))  # noqa: E731
    compare(f("torch"), f("triton"), [w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_unshuffle(dtype):
    B, L, K, D = 32, 196, 39, 512
    masks = ops.random_masking(B, L, K, device="cuda", seed=1)
    x = torch.randn(B, 1 + K, D, device="cuda", dtype=dtype)
    token = torch.randn(1, 1, D, device="cuda", dtype=dtype)
    pos = torch.randn(1, 1 + L, D, device="cuda", dtype=dtype)
    f = lambda backend: (lambda x, t: ops.decoder_unshuffle(x, masks.ids_restore, t, pos, backend=backend))  # noqa: E731
    compare(f("torch"), f("triton"), [x, token], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_masked_recon_loss_rows_two_views(dtype, norm):
    V, B, L, K = 2, 16, 196, 39
    imgs = torch.randn(V, B, 3, 224, 224, device="cuda", dtype=dtype)
    masks = ops.random_masking(V * B, L, K, device="cuda", seed=2)
    from mvmae_fast.models.mae import removed_ids

    ids_removed = removed_ids(masks.ids_restore, K)
    pred = torch.randn(V * B, L - K, 768, device="cuda", dtype=dtype)
    f = lambda backend: (lambda p: ops.masked_recon_loss_rows(p, imgs, ids_removed, 16, norm, views=V,  # noqa: E731
                                                              backend=backend))
    compare(f("torch"), f("triton"), [pred], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,t", [(512, 128, 0.1), (1024, 256, 0.05), (130, 17, 0.1)])
def test_info_nce(dtype, n, d, t):
    z = F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype)
    f = lambda backend: (lambda z: ops.info_nce(z[: n // 2], z[n // 2:], t, backend=backend))  # noqa: E731
    compare(f("torch"), f("triton"), [z], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,H,Dh", [(32, 50, 12, 64), (32, 40, 12, 64), (16, 197, 16, 32), (4, 257, 16, 80)])
def test_attention(dtype, B, N, H, Dh):
    qkv = torch.randn(B, N, 3 * H * Dh, device="cuda", dtype=dtype)
    f = lambda backend: (lambda q: ops.attention(q, H, backend=backend))  # noqa: E731
    compare(f("torch"), f("triton"), [qkv], dtype)


def test_training_step_triton_equals_torch_backends():
    """A whole MV-MAE step with every op on triton gives the loss and gradients of the torch backends."""
    from mvmae_fast import use_backend

    torch.manual_seed(0)
    model = MVMAE(MVMAEConfig(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3, dec_dim=128,
                              dec_depth=1, dec_heads=4, proj_hidden=256)).cuda()
    imgs = torch.randn(8, 2, 3, 64, 64, device="cuda")
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            out = model(imgs, seed=3, return_pred=False)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_t, grads_t), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_t, rtol=2e-3, atol=2e-3)
    for a, b in zip(grads_f, grads_t):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
