"""Tests for the fused losses: ``masked_recon_loss_rows`` and the triton backend of ``info_nce``.

Both are compared, loss and gradients, with the plain-PyTorch references (``masked_recon_loss`` on
the full prediction with a mask; ``info_nce`` with ``backend="torch"``) and, for fp16, with an fp64
computation: the kernel's error must stay within twice the error of the reference run in fp16
(flash-attention's rule) plus a small floor. Triton runs under its interpreter here (CPU), so the
triton cases are few and small.
"""


import pytest
import torch
import torch.nn.functional as F

from mvmae_fast import backends
from mvmae_fast.ops.info_nce import info_nce, info_nce_rows
from mvmae_fast.ops.recon_loss import masked_recon_loss, masked_recon_loss_rows, patchify
from mvmae_helpers import run_distributed_info_nce


def assert_close_to_exact(actual, approx, exact, what, atol):
    """|actual - exact| <= 2 |approx - exact| + atol elementwise (approx: the reference in the same
    dtype), with a readable report of the worst element."""
    actual, approx, exact = (t.detach().double() for t in (actual, approx, exact))
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    err = (actual - exact).abs()
    bound = 2 * (approx - exact).abs() + atol
    bad = ~(err <= bound)
    if bool(bad.any()):
        worst = int(torch.argmax(torch.where(bad, err - bound, torch.zeros_like(err))))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} values out of tolerance; worst at flat index {worst}: "
            f"got {actual.flatten()[worst].item():.8g}, exact {exact.flatten()[worst].item():.8g}, "
            f"reference {approx.flatten()[worst].item():.8g} (bound {bound.flatten()[worst].item():.3g})")


# --------------------------------------------------------------------------- #
# masked reconstruction loss on removed rows
# --------------------------------------------------------------------------- #
def make_recon_case(views, B, C, H, W, p, M, pred_dtype=torch.float32, img_dtype=torch.float32, seed=0,
                    idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    L = (H // p) * (W // p)
    imgs = torch.randn(views * B, C, H, W, generator=g).to(img_dtype)
    ids = torch.stack([torch.randperm(L, generator=g)[:M] for _ in range(views * B)]).to(idx_dtype)
    pred = torch.randn(views * B, M, p * p * C, generator=g).to(pred_dtype)
    return imgs, ids, pred


def full_reference(pred, imgs, ids, p, norm, views, dtype=None):
    """Per-view losses from ``masked_recon_loss`` on a full (B, L, P) prediction and a mask, and the
    gradient of ``sum_v weight_v * loss_v`` wrt the removed rows. ``dtype``: compute in it."""
    dtype = dtype or pred.dtype
    N, M, P = pred.shape
    L = (imgs.shape[-2] // p) * (imgs.shape[-1] // p)
    B = N // views
    index = ids.long().unsqueeze(-1).expand(-1, -1, P)
    full = torch.zeros(N, L, P, dtype=dtype).scatter(1, index, pred.detach().to(dtype)).requires_grad_()
    mask = torch.zeros(N, L).scatter(1, ids.long(), 1.0)
    img = imgs.to(torch.promote_types(dtype, imgs.dtype) if dtype == torch.float64 else imgs.dtype)
    losses = torch.stack([masked_recon_loss(full[v * B:(v + 1) * B], img[v * B:(v + 1) * B],
                                            mask[v * B:(v + 1) * B], p, norm) for v in range(views)])
    weights = torch.arange(1, views + 1, dtype=losses.dtype) / views
    (losses * weights).sum().backward()
    return losses.detach(), torch.gather(full.grad, 1, index), weights


def run_rows(pred, imgs, ids, p, norm, views, backend, weights):
    pred = pred.detach().clone().requires_grad_()
    losses = masked_recon_loss_rows(pred, imgs, ids, p, norm, views=views, backend=backend)
    (losses * weights.to(losses.dtype)).sum().backward()
    return losses.detach(), pred.grad


# (views, B, C, H, W, p, M): M = 1 and M = 157 of 196, odd grids, two views in one launch.
RECON_CASES = [(1, 2, 3, 28, 28, 2, 157), (2, 3, 3, 16, 12, 4, 1), (2, 2, 3, 56, 56, 4, 157), (1, 1, 1, 10, 15, 5, 4)]


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", RECON_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_recon_rows_fp32_matches_full_reference(backend, case, norm):
    views, B, C, H, W, p, M = case
    imgs, ids, pred = make_recon_case(views, B, C, H, W, p, M, idx_dtype=torch.int32 if views == 2 else torch.int64)
    expected, expected_grad, weights = full_reference(pred, imgs, ids, p, norm, views)
    losses, grad = run_rows(pred, imgs, ids, p, norm, views, backend, weights)
    assert losses.shape == (views,) and losses.dtype == torch.float32
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("img_dtype", [torch.float32, torch.float16], ids=["img32", "img16"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_recon_rows_fp16(backend, img_dtype):
    views, B, C, H, W, p, M = 2, 2, 3, 28, 28, 2, 157
    imgs, ids, pred = make_recon_case(views, B, C, H, W, p, M, torch.float16, img_dtype, seed=1)
    approx, approx_grad, weights = full_reference(pred, imgs, ids, p, True, views)
    exact, exact_grad, _ = full_reference(pred, imgs, ids, p, True, views, dtype=torch.float64)
    losses, grad = run_rows(pred, imgs, ids, p, True, views, backend, weights)
    assert grad.dtype == torch.float16
    assert losses.dtype == torch.float32  # as masked_recon_loss with its float32 mask
    assert_close_to_exact(losses, approx, exact, "fp16 losses", atol=1e-4)
    assert_close_to_exact(grad, approx_grad, exact_grad, "fp16 grad", atol=1e-7)


def test_recon_rows_fp16_with_a_loss_scale():
    """Under fp16 AMP the upstream gradient is a large loss scale: d(pred) must be scaled before it
    is rounded to fp16 (unscaled, 2 (pred - target) / (P B M) is subnormal here)."""
    imgs, ids, pred = make_recon_case(1, 4, 3, 56, 56, 4, 157, torch.float16, seed=8)
    imgs, pred = imgs * 0.1, pred * 0.01  # small errors: tiny unscaled gradients
    scale = torch.tensor([8192.0])
    _, expected_grad, _ = full_reference(pred, imgs, ids, 4, False, 1, dtype=torch.float64)
    _, grad = run_rows(pred, imgs, ids, 4, False, 1, "triton", scale)
    assert float((expected_grad.abs() < 2 ** -14).double().mean()) > 0.9  # subnormal in fp16 unscaled
    torch.testing.assert_close(grad.double(), (expected_grad * 8192).to(torch.float16).double(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_recon_rows_zero_variance_patches(backend):
    """Constant patches: var = 0, so the normalised target is (x - mean) / sqrt(1e-6) ~ 0."""
    views, B, C, H, W, p, M = 1, 2, 3, 16, 16, 4, 12
    imgs, ids, pred = make_recon_case(views, B, C, H, W, p, M, seed=2)
    imgs[:, :, :8, :] = 0.37  # the top two patch rows of every image are constant
    imgs[1] = -2.5  # and all of the second image
    expected, expected_grad, weights = full_reference(pred, imgs, ids, p, True, views)
    losses, grad = run_rows(pred, imgs, ids, p, True, views, backend, weights)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # A perfect prediction of the constant patches costs nothing.
    flat = patchify(imgs, p)
    target = torch.gather(flat, 1, ids.unsqueeze(-1).expand(-1, -1, pred.shape[2]))
    zero_var = target.var(dim=-1) == 0
    assert zero_var.any()
    norm_target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    loss = masked_recon_loss_rows(norm_target, imgs, ids, p, True, backend=backend)
    assert float(loss) < 1e-10


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_recon_rows_strided_views_of_the_batch(backend):
    """(V, B, C, H, W) imgs read in place: a transposed (B, V, ...) batch and a shared, expanded target."""
    views, B, C, H, W, p, M = 2, 3, 3, 16, 16, 4, 9
    imgs, ids, pred = make_recon_case(views, B, C, H, W, p, M, seed=3)
    batch = imgs.view(views, B, C, H, W).transpose(0, 1).contiguous()  # (B, V, C, H, W), as a loader gives
    expected, _, _ = full_reference(pred, imgs, ids, p, True, views)
    got = masked_recon_loss_rows(pred, batch.transpose(0, 1), ids, p, True, views=views, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    shared = imgs[:B]
    expected, _, _ = full_reference(pred, shared.repeat(views, 1, 1, 1), ids, p, True, views)
    got = masked_recon_loss_rows(pred, shared.expand(views, -1, -1, -1, -1), ids, p, True, views=views,
                                 backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_recon_rows_scalar_form_and_no_grad():
    imgs, ids, pred = make_recon_case(1, 2, 3, 16, 16, 4, 6, seed=4)
    mask = torch.zeros(2, 16).scatter(1, ids, 1.0)
    full = torch.zeros(2, 16, 48).scatter(1, ids.unsqueeze(-1).expand(-1, -1, 48), pred)
    expected = masked_recon_loss(full, imgs, mask, 4, True)
    with torch.no_grad():
        got = masked_recon_loss_rows(pred.requires_grad_(), imgs, ids, 4, True, backend="triton")
    assert got.shape == () and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Wrong predictions must show up: the comparison above is not vacuous.
    wrong = masked_recon_loss_rows(pred.detach() + 0.1, imgs, ids, 4, True, backend="triton")
    assert abs(float(wrong) - float(expected)) > 1e-3


def test_recon_rows_is_deterministic():
    imgs, ids, pred = make_recon_case(2, 2, 3, 28, 28, 2, 157, seed=5)
    runs = [run_rows(pred, imgs, ids, 2, True, 2, "triton", torch.tensor([1.0, 0.5])) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_recon_rows_rejects_bad_arguments():
    imgs, ids, pred = make_recon_case(1, 2, 3, 16, 16, 4, 5)
    with pytest.raises(ValueError, match="lie in"):
        masked_recon_loss_rows(pred, imgs, ids + 16, 4, True, backend="triton")
    with pytest.raises(RuntimeError, match="out of bounds"):
        masked_recon_loss_rows(pred, imgs, ids - 16, 4, True, backend="torch")
    with pytest.raises(ValueError, match="values"):
        masked_recon_loss_rows(pred[..., :-1], imgs, ids, 4, True, backend="triton")
    with pytest.raises(ValueError, match="multiple of views"):
        masked_recon_loss_rows(pred, imgs[:1], ids, 4, True, views=2)
    with pytest.raises(IndexError, match="out of range"):  # the cpp kernels check even unchecked indices
        masked_recon_loss_rows(pred, imgs, ids + 16, 4, True, check_indices=False, backend="cpp")
    with pytest.raises(backends.UnsupportedBackendError, match="no cpp implementation"):
        info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.1, backend="cpp")
    with pytest.raises(NotImplementedError, match="not differentiable in imgs"):
        masked_recon_loss_rows(pred.requires_grad_(), imgs.requires_grad_(), ids, 4, True, backend="triton").backward()


def test_recon_rows_cpp_threads_loss_scale_and_float64():
    """cpp: the same bits on 1 and 2 threads (per-sample float64 sums, added in order); an fp16 loss
    scale applied before rounding; float64 inputs take the torch code (exact to float64)."""
    imgs, ids, pred = make_recon_case(2, 3, 3, 28, 28, 2, 157, seed=6)
    weights = torch.tensor([1.0, 0.5])
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(run_rows(pred, imgs, ids, 2, True, 2, "cpp", weights))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    imgs, ids, pred = make_recon_case(1, 4, 3, 56, 56, 4, 157, torch.float16, seed=8)
    imgs, pred = imgs * 0.1, pred * 0.01
    _, expected_grad, _ = full_reference(pred, imgs, ids, 4, False, 1, dtype=torch.float64)
    _, grad = run_rows(pred, imgs, ids, 4, False, 1, "cpp", torch.tensor([8192.0]))
    torch.testing.assert_close(grad.double(), (expected_grad * 8192).to(torch.float16).double(), rtol=2e-3, atol=1e-6)
    imgs, ids, pred = make_recon_case(2, 2, 3, 16, 16, 4, 9, torch.float64, torch.float64, seed=9)
    expected, expected_grad, weights = full_reference(pred, imgs, ids, 4, True, 2)
    losses, grad = run_rows(pred, imgs, ids, 4, True, 2, "cpp", weights)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


def test_recon_rows_opcheck():
    imgs, ids, pred = make_recon_case(2, 2, 3, 8, 8, 4, 3)
    imgs5 = imgs.view(2, 2, 3, 8, 8)
    for norm in (True, False):
        torch.library.opcheck(torch.ops.mvmae_fast.masked_recon_loss_rows.default,
                              (pred.requires_grad_(), imgs5, ids, 4, norm, norm))
    torch.library.opcheck(torch.ops.mvmae_fast.masked_recon_loss_rows.default,
                          (pred.detach(), imgs5.transpose(0, 1), ids, 4, True, False))
    for backend in ("cpp", "triton"):
        torch.library.opcheck(torch.ops.mvmae_fast.masked_recon_loss_rows.default,
                              (pred.detach().requires_grad_(), imgs5, ids, 4, True, False, backend))
    torch.library.opcheck(torch.ops.mvmae_fast.masked_recon_loss_rows_backward.default,
                          (torch.tensor([0.5, 2.0]), pred.detach(), imgs5.transpose(0, 1), ids, 4, True))


def test_recon_rows_default_backend_on_cpu_is_torch():
    assert backends.select_backend("masked_recon_loss_rows", "cpu", "", ("torch", "triton")) == "torch"
    assert backends.select_backend("masked_recon_loss_rows", "cuda", "", ("torch", "triton")) == "triton"


# --------------------------------------------------------------------------- #
# InfoNCE
# --------------------------------------------------------------------------- #
def normalised(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def nce_with_grads(z, B, t, backend, dtype=None):
    z = z.detach().to(dtype or z.dtype).requires_grad_()
    loss = info_nce(z[:B], z[B:], t, backend=backend)
    loss.backward()
    return loss.detach(), z.grad


def check_nce_fp32(z, B, t, expect_signal=True):
    loss, grad = nce_with_grads(z, B, t, "triton")
    ref_loss, ref_grad = nce_with_grads(z, B, t, "torch")
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # Gradient terms are O(1 / (2B t)) and cancel (sum_k p_ik z_k - z_j): absolute rounding scales so.
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 / (2 * B * t))
    if expect_signal:  # so that a wrong gradient cannot pass by being small
        assert float(ref_grad.abs().max()) > 1e-3


# 2B = 6, 130; d = 17, 128, 256 (the backward's 64- and 32-row programs); t = 0.1 and 0.05.
@pytest.mark.parametrize("B,d,t", [(3, 17, 0.1), (3, 128, 0.05), (65, 17, 0.1), (65, 17, 0.05), (65, 256, 0.1)])
def test_info_nce_fp32_matches_torch(B, d, t):
    check_nce_fp32(normalised(2 * B, d, seed=B + d), B, t)


@pytest.mark.parametrize("B,d", [(3, 128), (65, 17)])
def test_info_nce_fp16_error_within_twice_torch_error(B, d):
    z = normalised(2 * B, d, seed=7, dtype=torch.float16)
    loss, grad = nce_with_grads(z, B, 0.1, "triton")
    approx, approx_grad = nce_with_grads(z, B, 0.1, "torch")
    exact, exact_grad = nce_with_grads(z, B, 0.1, "torch", dtype=torch.float64)
    assert grad.dtype == torch.float16
    assert_close_to_exact(loss, approx, exact, "fp16 loss", atol=1e-3)
    assert_close_to_exact(grad, approx_grad, exact_grad, "fp16 grad", atol=2e-3)


def test_info_nce_identical_vectors():
    """All logits equal: the loss is log(2B - 1) and the gradient is zero up to rounding."""
    B, d = 3, 17
    z = F.normalize(torch.ones(2 * B, d), dim=1)
    loss, grad = nce_with_grads(z, B, 0.05, "triton")
    assert float(loss) == pytest.approx(torch.log(torch.tensor(2.0 * B - 1)).item(), rel=1e-5)
    assert float(grad.abs().max()) < 1e-4
    check_nce_fp32(z, B, 0.05, expect_signal=False)


def test_info_nce_nearly_orthogonal_and_small_temperature():
    """Nearly orthogonal rows (every logit ~0), then partners nearly parallel (positive logit ~20
    at t = 0.05, negatives ~0)."""
    B, d = 3, 17
    g = torch.Generator().manual_seed(0)
    base = torch.eye(d)[: 2 * B] + 1e-3 * torch.randn(2 * B, d, generator=g)
    z = F.normalize(base, dim=1)
    check_nce_fp32(z, B, 0.05)
    z = F.normalize(torch.cat([base[:B], base[:B] + 0.05 * base[B:]]), dim=1)  # partners nearly parallel
    check_nce_fp32(z, B, 0.05, expect_signal=False)  # saturated softmax: loss and gradients ~1e-8


@pytest.mark.parametrize("offset,d", [(0, 17), (2, 17), (4, 17), (2, 256)])
def test_info_nce_local_rows_against_a_global_set(offset, d):
    """The distributed path: 2B = 2 local rows against 6 keys (3 ranks' rows), offset = rank * 2B;
    gradients reach both the local rows (anchor role) and the global set (key role)."""
    everyone = normalised(6, d, seed=offset)
    results = {}
    for backend in ("torch", "triton"):
        keys = everyone.clone().requires_grad_()
        local = everyone[offset:offset + 2].clone().requires_grad_()
        loss = info_nce_rows(local, keys, offset, 0.05, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), local.grad, keys.grad)
    for got, want, what in zip(results["triton"], results["torch"], ("loss", "d local", "d everyone")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    assert float(results["torch"][2].abs().max()) > 1e-3


def test_info_nce_triton_under_torch_distributed(tmp_path):
    """2 ranks of 3 images each (2B = 6 local rows against 12): with DDP's averaging, the same loss
    and gradients as one process on the whole batch."""
    world = 2
    results, z1, z2 = run_distributed_info_nce(tmp_path, 6, 17, 0.05, backend="triton", world=world)
    loss = info_nce(z1, z2, 0.05, backend="torch")
    loss.backward()
    torch.testing.assert_close(sum(r["loss"] for r in results) / world, loss.detach(), rtol=1e-5, atol=1e-6)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["g1"] / world, z1.grad[3 * r:3 * r + 3], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["g2"] / world, z2.grad[3 * r:3 * r + 3], rtol=1e-4, atol=1e-6)


def test_info_nce_large_d_loops_over_blocks():
    """d = 300: several reduction chunks and several output column blocks in the backward pass."""
    check_nce_fp32(normalised(6, 300, seed=11), 3, 0.05)


def test_info_nce_is_deterministic():
    z = normalised(130, 17, seed=3)
    first, second = nce_with_grads(z, 65, 0.1, "triton"), nce_with_grads(z, 65, 0.1, "triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_info_nce_rejects_bad_arguments():
    z = normalised(2, 8, seed=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        info_nce(z[:1], z[1:], backend="triton")
    with pytest.raises(ValueError, match="do not fit"):
        info_nce_rows(normalised(4, 8, 0), normalised(6, 8, 1), 4, backend="triton")
    with pytest.raises(backends.UnsupportedBackendError, match="no cpp implementation"):
        info_nce(z, z, backend="cpp")


def test_info_nce_opcheck():
    z = normalised(6, 17, seed=1).requires_grad_()
    everyone = normalised(10, 17, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.mvmae_fast.info_nce.default, (z, None, 0, 0.1))
    torch.library.opcheck(torch.ops.mvmae_fast.info_nce.default, (z, everyone, 4, 0.1))
    lse = torch.ops.mvmae_fast.info_nce(z, everyone, 4, 0.1)[1]
    grad = torch.tensor(1.5)
    torch.library.opcheck(torch.ops.mvmae_fast.info_nce_backward.default,
                          (grad, z.detach(), everyone.detach(), lse, 4, 0.1))
    torch.library.opcheck(torch.ops.mvmae_fast.info_nce_backward.default,
                          (grad, z.detach(), None, torch.ops.mvmae_fast.info_nce(z, None, 0, 0.1)[1], 0, 0.1))


def test_info_nce_default_backend_on_cpu_is_torch():
    z = normalised(6, 8, seed=0).requires_grad_()
    loss = info_nce(z[:3], z[3:])
    assert "NllLoss" in type(loss.grad_fn).__name__  # the reference's cross_entropy, not the custom op


# --------------------------------------------------------------------------- #
# bfloat16 and torch.compile
# --------------------------------------------------------------------------- #
def test_bf16_inputs():
    """bf16 (the model's autocast dtype): compute in fp32 inside, gradients in bf16."""
    imgs, ids, pred = make_recon_case(2, 2, 3, 16, 16, 4, 11, torch.bfloat16, seed=6)
    exact, exact_grad, weights = full_reference(pred, imgs, ids, 4, True, 2, dtype=torch.float64)
    losses, grad = run_rows(pred, imgs, ids, 4, True, 2, "triton", weights)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(losses.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2 ** -7, atol=1e-7)  # bf16 rounding of the gradient

    z = normalised(6, 17, seed=4, dtype=torch.bfloat16)
    loss, grad = nce_with_grads(z, 3, 0.1, "triton")
    exact, exact_grad = nce_with_grads(z, 3, 0.1, "torch", dtype=torch.float64)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), exact.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2 ** -7, atol=1e-3)


def test_compiled_fullgraph():
    """Both wrappers trace without graph breaks (aot_eager: dynamo + AOT autograd, no codegen)."""
    imgs, ids, pred = make_recon_case(2, 2, 3, 8, 8, 4, 3, seed=7)
    z = normalised(6, 17, seed=5)

    def losses(pred, z):
        rec = masked_recon_loss_rows(pred, imgs, ids, 4, True, views=2, backend="triton")
        return rec.mean() + info_nce(z[:3], z[3:], 0.1, backend="triton")

    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (losses, compiled):
        p, w = pred.clone().requires_grad_(), z.clone().requires_grad_()
        loss = fn(p, w)
        loss.backward()
        results.append((loss.detach(), p.grad, w.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_recon_rows_eager_cpu_path_matches_the_custom_op(dtype):
    """Eager CPU calls run the cpp kernels from an autograd Function (no custom-op dispatch); the custom
    op (what torch.compile runs) gives the same bits for the losses and the gradient; imgs still may not
    require grad; a traced call (make_fx) goes through the custom op."""
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 3, 16, 16, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:11] for _ in range(6)])
    pred = torch.randn(6, 11, 48, generator=g).to(dtype)
    weights = torch.tensor([0.7, 1.3])
    results = []
    for eager in (True, False):
        leaf = pred.clone().requires_grad_(True)
        if eager:
            losses = masked_recon_loss_rows(leaf, imgs, ids, 4, True, views=2)
        else:
            losses = torch.ops.mvmae_fast.masked_recon_loss_rows(leaf, imgs, ids, 4, True, True, "cpp")
        assert ("_EagerCppReconRows" in type(losses.grad_fn).__name__) == eager, type(losses.grad_fn).__name__
        (losses * weights).sum().backward()
        results.append((losses.detach(), leaf.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="not differentiable in imgs"):
        masked_recon_loss_rows(pred.requires_grad_(), imgs.requires_grad_(), ids, 4, True, views=2).sum().backward()
    graph = torch.fx.experimental.proxy_tensor.make_fx(
        lambda p: masked_recon_loss_rows(p, imgs.detach(), ids, 4, True, views=2))(pred.detach())
    assert "mvmae_fast.masked_recon_loss_rows" in str(graph.graph)
