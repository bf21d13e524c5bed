"""Tests for the visible-patch gather / embedding, the table-row gather, the decoder unshuffle and
the row-scatter kernel's launch configuration (torch and triton backends, CPU; Triton runs under
its interpreter, so its shapes here are few and small).

Every reference is written here, from the official MAE code's operations (patchify by einsum,
conv2d patch embedding, gather with a ``.repeat``-ed index, cat with mask tokens), and compared on
the forward pass and every gradient. Outputs are poisoned (MVMAE_FAST_POISON=1, set by conftest),
so an element a kernel forgets to write fails.
"""

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mvmae_fast import _utils, ops  # noqa: E402
from mvmae_fast.ops import patch_embed as pe  # noqa: E402
from mvmae_fast.ops import unshuffle as un  # noqa: E402
from mvmae_fast.ops.patch_embed import embed_visible_patches, gather_table_rows, gather_visible_patches  # noqa: E402
from mvmae_fast.ops.unshuffle import decoder_unshuffle  # noqa: E402

from mvmae_helpers import assert_bitwise_equal, make_ids, make_x, param_id  # noqa: E402

BACKENDS = ("torch", "triton")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-12, atol=1e-12)}


# --------------------------------------------------------------------------- #
# independent references
# --------------------------------------------------------------------------- #
def ref_patchify(imgs, p):
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def mae_gather(x, ids):
    return torch.gather(x, 1, ids.long().unsqueeze(-1).repeat(1, 1, x.shape[2]))


def ref_embed(imgs, ids, weight, bias, pos):
    tokens = F.conv2d(imgs, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return mae_gather(tokens + pos[:, 1:], ids)


def ref_unshuffle(x, ids_restore, mask_token, pos):
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # cat promotes mixed dtypes, as in MAE under autocast
    x_ = mae_gather(x_, ids_restore)
    return torch.cat([x[:, :1], x_], dim=1) + pos


def assert_sum_close(actual, expected, dtype, what, slack=1.0):
    """For sums (gradients of broadcast or shared inputs): the tolerance scales with the largest
    value, since summation order differs and single elements can cancel to near zero."""
    atol = TOL[dtype]["rtol"] * slack * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def make_images(shape, dtype, kind="contiguous", seed=0):
    imgs = make_x(shape, dtype, seed=seed)
    if kind == "channels_last":
        return imgs.to(memory_format=torch.channels_last)
    if kind == "cropped":  # a window of a larger image: every stride differs from the dense one
        B, C, H, W = shape
        big = make_x((B + 1, C + 2, H + 5, W + 3), dtype, seed=seed)
        return big[1:, 1:-1, 2:2 + H, 3:3 + W]
    if kind == "expanded":  # one image broadcast over the batch (batch stride 0)
        return imgs[:1].expand(shape)
    return imgs


def make_ids_restore(B, L, seed=0, dtype=torch.int64):
    return make_ids(B, L, L, seed=seed).argsort(dim=1).to(dtype)


def test_outputs_are_poisoned():
    assert _utils.POISON_OUTPUTS, "tests/conftest.py must set MVMAE_FAST_POISON=1 before mvmae_fast is imported"


# --------------------------------------------------------------------------- #
# gather_visible_patches
# --------------------------------------------------------------------------- #
# (B, C, patch, grid_h, grid_w)
IMAGE_SHAPES = [(2, 3, 4, 7, 7), (1, 3, 16, 14, 14), (2, 3, 4, 5, 7)]


def _image_cases(backend):
    cases = []
    for B, C, p, gh, gw in IMAGE_SHAPES:
        L = gh * gw
        for K in (1, L - 1):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                if backend == "triton" and p == 16 and (dtype != torch.float32 or K == 1):
                    continue
                cases.append((B, C, p, gh, gw, K, dtype))
    return cases


@pytest.mark.parametrize("backend,case", [(b, c) for b in BACKENDS for c in _image_cases(b)], ids=param_id)
def test_gather_visible_patches(backend, case):
    B, C, p, gh, gw, K, dtype = case
    imgs = make_images((B, C, gh * p, gw * p), dtype)
    ids = make_ids(B, gh * gw, K, seed=K, dtype=torch.int32 if K == 1 else torch.int64)
    out = gather_visible_patches(imgs, ids, p, backend=backend)
    assert_bitwise_equal(out, mae_gather(ref_patchify(imgs, p), ids), "patches")


@pytest.mark.parametrize("kind", ["channels_last", "cropped", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_visible_patches_strided_images(backend, kind):
    B, C, p, g = 2, 3, 4, 5
    imgs = make_images((B, C, g * p, g * p), torch.float32, kind)
    assert not imgs.is_contiguous()
    ids = make_ids(B, g * g, 9, seed=1)
    out = gather_visible_patches(imgs, ids, p, backend=backend)
    assert_bitwise_equal(out, mae_gather(ref_patchify(imgs.contiguous(), p), ids), kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_visible_patches_backward(backend, dtype):
    B, C, p, gh, gw, K = 2, 3, 4, 5, 7, 12
    imgs = make_images((B, C, gh * p, gw * p), dtype, "cropped").requires_grad_()
    ids = make_ids(B, gh * gw, K, seed=2, dtype=torch.int32)
    grad = make_x((B, K, p * p * C), dtype, seed=3)
    (ours,) = torch.autograd.grad(gather_visible_patches(imgs, ids, p, backend=backend), imgs, grad)
    (ref,) = torch.autograd.grad(mae_gather(ref_patchify(imgs, p), ids), imgs, grad)
    assert_bitwise_equal(ours, ref, "imgs.grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_visible_patches_gradcheck(backend):
    imgs = make_x((2, 2, 4, 6), torch.float64).requires_grad_()
    ids = make_ids(2, 6, 3, seed=4)
    fn = lambda t: gather_visible_patches(t, ids, 2, backend=backend)  # noqa: E731
    fast = backend == "triton"  # one random direction instead of one evaluation per element
    assert torch.autograd.gradcheck(fn, (imgs,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (imgs,), fast_mode=fast)


# --------------------------------------------------------------------------- #
# gather_table_rows
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("shape", [(3, 50, 49, 61), (2, 197, 1, 40)], ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_table_rows(backend, shape, dtype):
    B, L, K, D = shape
    table = make_x((L, D), dtype).requires_grad_()
    ids = make_ids(B, L, K, seed=5, dtype=torch.int32)
    out = gather_table_rows(table, ids, backend=backend)
    assert_bitwise_equal(out, F.embedding(ids.long(), table), "rows")
    grad = make_x((B, K, D), dtype, seed=6)
    (ours,) = torch.autograd.grad(out, table, grad)
    expected = torch.zeros(L, D, dtype=torch.float64)
    for b in range(B):
        expected[ids[b].long()] += grad[b].double()
    assert_sum_close(ours, expected, dtype, "table.grad")


def test_table_grad_several_sample_chunks_deterministic():
    """More samples than one program sums (the last chunk partial); repeated runs agree bit for bit."""
    B, L, K, D = 20, 50, 45, 33
    ids = make_ids(B, L, K, seed=7, dtype=torch.int32)
    grad = make_x((B, K, D), torch.float32, seed=8)
    runs = [pe._scatter_add_table_rows_op(grad, ids, L, True, "triton") for _ in range(2)]
    assert_bitwise_equal(runs[0], runs[1], "repeated run")
    expected = torch.zeros(L, D, dtype=torch.float64).index_add_(0, ids.reshape(-1).long(), grad.reshape(-1, D).double())
    assert_sum_close(runs[0], expected, torch.float32, "table.grad")


# --------------------------------------------------------------------------- #
# embed_visible_patches
# --------------------------------------------------------------------------- #
def _embed_inputs(B, C, p, g, D, dtype, pos_grad=False, seed=0):
    imgs = make_images((B, C, g * p, g * p), dtype, seed=seed)
    weight = (make_x((D, C, p, p), torch.float64, seed=seed + 1) / (3 * (C * p * p) ** 0.5)).to(dtype)
    bias = make_x((D,), dtype, seed=seed + 2)
    pos = make_x((1, g * g + 1, D), dtype, seed=seed + 3)
    return imgs, weight.requires_grad_(), bias.requires_grad_(), pos.requires_grad_(pos_grad)


EMBED_CASES = [  # (B, C, p, grid, D, K, dtype)
    (2, 3, 4, 7, 24, 1, torch.float32), (2, 3, 4, 7, 24, 48, torch.float32), (1, 3, 16, 14, 32, 195, torch.float32),
    (2, 3, 4, 7, 24, 48, torch.float16), (1, 3, 16, 14, 32, 1, torch.float16),
]


@pytest.mark.parametrize("case", EMBED_CASES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_visible_patches(backend, case):
    B, C, p, g, D, K, dtype = case
    imgs, weight, bias, pos = _embed_inputs(B, C, p, g, D, dtype, pos_grad=True)
    imgs.requires_grad_(dtype == torch.float32)
    ids = make_ids(B, g * g, K, seed=9, dtype=torch.int32 if K == 1 else torch.int64)
    out = embed_visible_patches(imgs, ids, weight, bias, pos, backend=backend)
    params = (weight, bias, pos) + ((imgs,) if imgs.requires_grad else ())
    # The reference runs in float64 on the same (rounded) inputs; low precision gets its own tolerance.
    ref_weight, ref_bias, ref_pos, ref_imgs = (t.detach().double().requires_grad_() for t in (weight, bias, pos, imgs))
    ref_params = (ref_weight, ref_bias, ref_pos) + ((ref_imgs,) if imgs.requires_grad else ())
    ref = ref_embed(ref_imgs, ids, ref_weight, ref_bias, ref_pos)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    grad = make_x(out.shape, dtype, seed=10)
    ours = torch.autograd.grad(out, params, grad)
    refs = torch.autograd.grad(ref, ref_params, grad.double())
    for name, a, e in zip(("proj_weight", "proj_bias", "pos_embed", "imgs"), ours, refs):
        assert_sum_close(a, e, dtype, f"{name}.grad", slack=4 if dtype == torch.float16 else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_visible_patches_frozen_pos_no_bias(backend):
    imgs, weight, _, pos = _embed_inputs(2, 3, 4, 5, 16, torch.float32)
    ids = make_ids(2, 25, 6, seed=11)
    out = embed_visible_patches(imgs, ids, weight, None, pos, backend=backend)
    ref = ref_embed(imgs, ids, weight, None, pos)
    torch.testing.assert_close(out, ref)
    grad = make_x(out.shape, torch.float32, seed=12)
    torch.testing.assert_close(torch.autograd.grad(out, weight, grad)[0], torch.autograd.grad(ref, weight, grad)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_visible_patches_autocast(backend):
    """Under autocast the GEMM runs in bfloat16 and pos is added in float32, as conv2d + pos would."""
    imgs, weight, bias, pos = _embed_inputs(2, 3, 4, 5, 16, torch.float32)
    ids = make_ids(2, 25, 6, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = embed_visible_patches(imgs, ids, weight, bias, pos, backend=backend)
        ref = ref_embed(imgs, ids, weight, bias, pos)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grad = make_x(out.shape, torch.float32, seed=14)
    for a, e in zip(torch.autograd.grad(out, (weight, bias), grad), torch.autograd.grad(ref, (weight, bias), grad)):
        torch.testing.assert_close(a, e, rtol=3e-2, atol=3e-2)


def test_embed_matches_model_patch_embed():
    """What MVMAE._encode computes before the blocks (PatchEmbed + pos + gather_rows)."""
    from mvmae_fast.models.layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=24)
    pos = torch.randn(1, 65, 24)
    imgs = torch.randn(3, 3, 32, 32)
    masks = ops.random_masking(3, 64, 16, seed=3)
    expected = ops.gather_rows(embed(imgs) + pos[:, 1:], masks.ids_keep)
    ours = embed_visible_patches(imgs, masks.ids_keep, embed.proj.weight, embed.proj.bias, pos, check_indices=False)
    torch.testing.assert_close(ours, expected)


# --------------------------------------------------------------------------- #
# decoder_unshuffle
# --------------------------------------------------------------------------- #
TOKEN_SHAPES = [(2, 197, 61), (2, 197, 768), (3, 50, 61), (1, 50, 768)]
TRITON_TOKEN_SHAPES = [(2, 197, 61), (1, 50, 768)]
UNSHUFFLE_BACKENDS = ("torch", "cpp", "triton")


def _unshuffle_cases(backend):
    shapes = TRITON_TOKEN_SHAPES if backend == "triton" else TOKEN_SHAPES
    return [(B, L, D, K, dtype) for B, L, D in shapes for K in (1, L - 1) for dtype in (torch.float32, torch.float16)]


@pytest.mark.parametrize("backend,case", [(b, c) for b in UNSHUFFLE_BACKENDS for c in _unshuffle_cases(b)], ids=param_id)
def test_decoder_unshuffle(backend, case):
    B, L, D, K, dtype = case
    x = make_x((B, 1 + K, D), dtype, seed=K).requires_grad_()
    token = make_x((1, 1, D), dtype, seed=1).requires_grad_()
    pos = make_x((1, 1 + L, D), dtype, seed=2).requires_grad_()
    ids_restore = make_ids_restore(B, L, seed=K, dtype=torch.int32 if K == 1 else torch.int64)
    out = decoder_unshuffle(x, ids_restore, token, pos, backend=backend)
    ref = ref_unshuffle(x, ids_restore, token, pos)
    # one addition per element, rounded once from float32: the same bits as PyTorch's own add
    assert_bitwise_equal(out, ref, "out")
    grad = make_x(out.shape, dtype, seed=3)
    gx, gt, gp = torch.autograd.grad(out, (x, token, pos), grad)
    rx, rt, rp = torch.autograd.grad(ref, (x, token, pos), grad)
    assert_bitwise_equal(gx, rx, "x.grad")  # pure copies
    assert_sum_close(gt, rt, dtype, "mask_token.grad")
    assert_sum_close(gp, rp, dtype, "decoder_pos_embed.grad")


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
def test_decoder_unshuffle_mixed_precision(backend):
    """bfloat16 tokens from an autocast decoder_embed with float32 mask token and pos: float32 out."""
    B, L, D, K = 2, 50, 40, 12
    x = make_x((B, 1 + K, D), torch.bfloat16).requires_grad_()
    token = make_x((1, 1, D), torch.float32, seed=1).requires_grad_()
    pos = make_x((1, 1 + L, D), torch.float32, seed=2)
    ids_restore = make_ids_restore(B, L, seed=4)
    out = decoder_unshuffle(x, ids_restore, token, pos, backend=backend)
    ref = ref_unshuffle(x, ids_restore, token, pos)
    assert out.dtype == torch.float32
    assert_bitwise_equal(out, ref, "out")
    grad = make_x(out.shape, torch.float32, seed=3)
    gx, gt = torch.autograd.grad(out, (x, token), grad)
    rx, rt = torch.autograd.grad(ref, (x, token), grad)
    assert gx.dtype == torch.bfloat16
    # float32 -> bfloat16: the interpreter truncates where PyTorch rounds to nearest (1 ulp)
    torch.testing.assert_close(gx, rx, rtol=8e-3, atol=0)
    torch.testing.assert_close(gt, rt)


def test_decoder_unshuffle_cpp_bad_indices_and_threads():
    """The cpp kernels refuse an out-of-range index (even unchecked) rather than read past x, and give
    the same bits on 1 and 2 threads (the mask token's gradient is summed per sample, then in order)."""
    B, L, D, K = 4, 50, 40, 12
    x = make_x((B, 1 + K, D), torch.float32).requires_grad_()
    token = make_x((1, 1, D), torch.float32, seed=1).requires_grad_()
    pos = make_x((1, 1 + L, D), torch.float32, seed=2)
    bad = make_ids_restore(B, L, seed=4)
    bad[1, 3] = L
    with pytest.raises(IndexError, match="out of range"):
        decoder_unshuffle(x, bad, token, pos, check_indices=False, backend="cpp")
    with pytest.raises(IndexError, match="out of range"):
        un._decoder_unshuffle_backward_op(make_x((B, 1 + L, D)), bad, K, torch.float32, torch.float32, "cpp")
    ids_restore = make_ids_restore(B, L, seed=5)
    grad = make_x((B, 1 + L, D), torch.float32, seed=3)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = decoder_unshuffle(x, ids_restore, token, pos, backend="cpp")
            runs.append((out, *torch.autograd.grad(out, (x, token), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert_bitwise_equal(a, b, "1 vs 2 threads")


def test_cpp_kernels_are_cpu_only():
    """The extension's unshuffle and loss kernels take host pointers: on any other device the ops
    list no cpp backend, so it is never picked (no triton on a CUDA machine falls back to torch) and
    forcing it is refused with a reason rather than handing device pointers to a CPU kernel."""
    from mvmae_fast.ops import recon_loss as rl

    for module in (un, rl):
        assert "cpp" in module._implemented(torch.device("cpu"))
        assert "cpp" not in module._implemented(torch.device("cuda"))
        assert "cpp" not in module._implemented(torch.device("meta"))
    assert rl._implemented(torch.device("cuda"), True) == ("triton",)


def test_decoder_unshuffle_frozen_pos_and_determinism():
    B, L, D, K = 3, 50, 33, 10
    x = make_x((B, 1 + K, D), torch.float32).requires_grad_()
    token = make_x((1, 1, D), torch.float32, seed=1).requires_grad_()
    pos = make_x((1, 1 + L, D), torch.float32, seed=2)  # frozen, as in MAE
    ids_restore = make_ids_restore(B, L, seed=5)
    out = decoder_unshuffle(x, ids_restore, token, pos, backend="triton")
    grad = make_x(out.shape, torch.float32, seed=3)
    first = torch.autograd.grad(out, (x, token), grad, retain_graph=True)
    again = torch.autograd.grad(out, (x, token), grad)
    for a, b in zip(first, again):
        assert_bitwise_equal(a, b, "repeated backward")


def test_decoder_unshuffle_matches_model_decode():
    """Equals the scatter + where + cat the model used before this op, from random_masking's indices."""
    B, L, K, D = 3, 64, 16, 24
    masks = ops.random_masking(B, L, K, seed=8)
    x = make_x((B, 1 + K, D), torch.float32)
    token, pos = make_x((1, 1, D), torch.float32, seed=1), make_x((1, 1 + L, D), torch.float32, seed=2)
    visible = ops.scatter_rows(x[:, 1:], masks.ids_keep, L)
    tokens = torch.where(masks.mask.unsqueeze(-1) > 0, token, visible)
    expected = torch.cat([x[:, :1], tokens], dim=1) + pos
    for backend in UNSHUFFLE_BACKENDS:
        out = decoder_unshuffle(x, masks.ids_restore, token, pos, check_indices=False, backend=backend)
        assert_bitwise_equal(out, expected, backend)


@pytest.mark.parametrize("backend", UNSHUFFLE_BACKENDS)
def test_decoder_unshuffle_gradcheck(backend):
    B, L, D, K = 2, 6, 3, 2
    x = make_x((B, 1 + K, D), torch.float64).requires_grad_()
    token = make_x((1, 1, D), torch.float64, seed=1).requires_grad_()
    pos = make_x((1, 1 + L, D), torch.float64, seed=2).requires_grad_()
    ids_restore = make_ids_restore(B, L, seed=6)
    fn = lambda *t: decoder_unshuffle(t[0], ids_restore, t[1], t[2], backend=backend)  # noqa: E731
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, (x, token, pos), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x, token, pos), fast_mode=fast)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    imgs, weight, bias, pos = _embed_inputs(2, 3, 4, 4, 8, torch.float32)
    ids = make_ids(2, 16, 4, seed=15)
    ids_restore = make_ids_restore(2, 16, seed=15)
    token, dec_pos = make_x((1, 1, 8), torch.float32, seed=16).requires_grad_(), make_x((1, 17, 8), torch.float32)

    def step(imgs, weight, bias, token):
        latent = embed_visible_patches(imgs, ids, weight, bias, pos, check_indices=False, backend="torch")
        x = torch.cat([latent.new_zeros(2, 1, 8), latent], dim=1)
        return decoder_unshuffle(x, ids_restore, token, dec_pos, check_indices=False, backend="torch").square().sum()

    eager = torch.autograd.grad(step(imgs, weight, bias, token), (weight, bias, token))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(imgs, weight, bias, token), (weight, bias, token))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------- #
# one compiled kernel for every K: launch constants depend on p, C and D only
# --------------------------------------------------------------------------- #
class _LaunchRecorder:
    def __init__(self, kernel):
        self.kernel, self.constants = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.constants.append(tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _do_not_specialize(kernel):
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter's wrapper keeps the jit keywords
        names = kernel.kwargs.get("do_not_specialize")
    return set(names or ())


def _run_each_K(L, run):
    for K in (1, 2, 16, L - 1):
        run(K)


@pytest.mark.parametrize("module,kernel,run", [
    ("patch_embed", "_gather_patches_kernel",
     lambda K: gather_visible_patches(make_x((1, 3, 28, 28)), make_ids(1, 49, K), 4, backend="triton")),
    ("patch_embed", "_scatter_patches_kernel",
     lambda K: pe._scatter_visible_patches_op(make_x((1, K, 48)), make_ids(1, 49, K), 4, 28, 28, True, "triton")),
    ("patch_embed", "_gather_table_rows_kernel",
     lambda K: gather_table_rows(make_x((49, 8)), make_ids(1, 49, K), backend="triton")),
    ("patch_embed", "_table_rows_grad_kernel",
     lambda K: pe._scatter_add_table_rows_op(make_x((1, K, 8)), make_ids(1, 49, K), 49, True, "triton")),
    ("unshuffle", "_unshuffle_fwd_kernel",
     lambda K: decoder_unshuffle(make_x((1, K + 1, 8)), make_ids_restore(1, 49), make_x((1, 1, 8)),
                                 make_x((1, 50, 8)), backend="triton")),
    ("unshuffle", "_unshuffle_bwd_kernel",
     lambda K: un._decoder_unshuffle_backward_op(make_x((1, 50, 8)), make_ids_restore(1, 49), K, torch.float32,
                                                 torch.float32, "triton")),
    ("rows", "_scatter_rows_kernel",
     lambda K: ops.scatter_rows(make_x((1, K, 8)), make_ids(1, 49, K), 49, backend="triton")),
    ("rows", "_gather_rows_kernel",
     lambda K: ops.gather_rows(make_x((1, 49, 8)), make_ids(1, 49, K), backend="triton")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_no_recompilation_per_K(monkeypatch, module, kernel, run):
    impl = importlib.import_module(f"mvmae_fast.ops.{module}.triton_impl")
    recorder = _LaunchRecorder(getattr(impl, kernel))
    monkeypatch.setattr(impl, kernel, recorder)
    _run_each_K(49, run)
    assert len(recorder.constants) == 4 and len(set(recorder.constants)) == 1, recorder.constants
    if "K" in recorder.kernel.arg_names:
        assert "K" in _do_not_specialize(recorder.kernel), f"{kernel} specialises on K (K=1, K % 16 == 0 variants)"


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def _imgs(shape=(2, 3, 8, 8), dtype=torch.float32):
    return make_x(shape, dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)


IDS = torch.tensor([[0, 3], [1, 2]])
VE_TE = (ValueError, TypeError)

PATCH_BAD = [  # (id, structural?, call(backend, check_indices), exceptions, message regex)
    ("imgs_3d", True, lambda b, c: gather_visible_patches(_imgs((3, 8, 8)), IDS, 4, check_indices=c, backend=b), VE_TE, r"\bimgs\b"),
    ("imgs_int", True, lambda b, c: gather_visible_patches(_imgs(dtype=torch.int32), IDS, 4, check_indices=c, backend=b), TypeError, r"\bimgs\b"),
    ("imgs_not_divisible", True, lambda b, c: gather_visible_patches(_imgs((2, 3, 8, 10)), IDS, 4, check_indices=c, backend=b), ValueError, r"divisible"),
    ("patch_size_0", True, lambda b, c: gather_visible_patches(_imgs(), IDS, 0, check_indices=c, backend=b), ValueError, r"\bpatch_size\b"),
    ("ids_1d", True, lambda b, c: gather_visible_patches(_imgs(), IDS[0], 4, check_indices=c, backend=b), ValueError, r"\bids_keep\b"),
    ("ids_float", True, lambda b, c: gather_visible_patches(_imgs(), IDS.float(), 4, check_indices=c, backend=b), TypeError, r"\bids_keep\b"),
    ("ids_int16", True, lambda b, c: gather_visible_patches(_imgs(), IDS.short(), 4, check_indices=c, backend=b), TypeError, r"\bids_keep\b"),
    ("ids_batch", True, lambda b, c: gather_visible_patches(_imgs(), IDS[:1], 4, check_indices=c, backend=b), ValueError, r"\bids_keep\b"),
    ("ids_meta", True, lambda b, c: gather_visible_patches(_imgs(), IDS.to("meta"), 4, check_indices=c, backend=b), ValueError, r"\bids_keep\b"),
    ("K_gt_L", True, lambda b, c: gather_visible_patches(_imgs(), torch.arange(5).expand(2, 5), 4, check_indices=c, backend=b), ValueError, r"\bids_keep\b"),
    ("ids_negative", False, lambda b, c: gather_visible_patches(_imgs(), torch.tensor([[0, -1], [1, 2]]), 4, check_indices=c, backend=b), ValueError, r"\bids_keep\b"),
    ("ids_eq_L", False, lambda b, c: gather_visible_patches(_imgs(), torch.tensor([[0, 4], [1, 2]], dtype=torch.int32), 4, check_indices=c, backend=b), ValueError, r"\bids_keep\b"),
    ("ids_duplicate", False, lambda b, c: gather_visible_patches(_imgs(), torch.tensor([[3, 3], [1, 2]]), 4, check_indices=c, backend=b), ValueError, r"unique"),
    ("table_ids_duplicate", False, lambda b, c: gather_table_rows(make_x((4, 3)), torch.tensor([[1, 2], [0, 0]]), check_indices=c, backend=b), ValueError, r"unique"),
    ("table_ids_range", False, lambda b, c: gather_table_rows(make_x((4, 3)), torch.tensor([[1, 4], [0, 2]]), check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("table_1d", True, lambda b, c: gather_table_rows(make_x((4,)), IDS, check_indices=c, backend=b), ValueError, r"\btable\b"),
]


def _embed_call(**changes):
    def call(b, c):
        args = dict(imgs=_imgs(), ids_keep=IDS, proj_weight=make_x((6, 3, 4, 4)), proj_bias=make_x((6,)),
                    pos_embed=make_x((1, 5, 6)))
        args.update({k: (v() if callable(v) else v) for k, v in changes.items()})
        return embed_visible_patches(**args, check_indices=c, backend=b)
    return call


EMBED_BAD = [
    ("weight_3d", True, _embed_call(proj_weight=lambda: make_x((6, 3, 16))), ValueError, r"\bproj_weight\b"),
    ("weight_not_square", True, _embed_call(proj_weight=lambda: make_x((6, 3, 4, 2))), ValueError, r"\bproj_weight\b"),
    ("weight_channels", True, _embed_call(proj_weight=lambda: make_x((6, 1, 4, 4))), ValueError, r"\bproj_weight\b"),
    ("bias_shape", True, _embed_call(proj_bias=lambda: make_x((5,))), ValueError, r"\bproj_bias\b"),
    ("pos_no_cls_row", True, _embed_call(pos_embed=lambda: make_x((1, 4, 6))), ValueError, r"\bpos_embed\b"),
    ("pos_dim", True, _embed_call(pos_embed=lambda: make_x((1, 5, 7))), ValueError, r"\bpos_embed\b"),
    ("pos_dtype", True, _embed_call(pos_embed=lambda: make_x((1, 5, 6), torch.float64)), TypeError, r"\bpos_embed\b"),
    ("imgs_not_divisible", True, _embed_call(imgs=lambda: _imgs((2, 3, 8, 9))), ValueError, r"divisible"),
    ("ids_duplicate", False, _embed_call(ids_keep=torch.tensor([[0, 0], [1, 2]])), ValueError, r"unique"),
    ("ids_range", False, _embed_call(ids_keep=torch.tensor([[0, 9], [1, 2]])), ValueError, r"\bids_keep\b"),
]


def _unshuffle_call(**changes):
    def call(b, c):
        args = dict(x=make_x((2, 3, 4)), ids_restore=torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]]),
                    mask_token=make_x((1, 1, 4)), decoder_pos_embed=make_x((1, 5, 4)))
        args.update({k: (v() if callable(v) else v) for k, v in changes.items()})
        return decoder_unshuffle(**args, check_indices=c, backend=b)
    return call


UNSHUFFLE_BAD = [
    ("x_2d", True, _unshuffle_call(x=lambda: make_x((3, 4))), ValueError, r"\bx\b"),
    ("x_int", True, _unshuffle_call(x=lambda: torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, r"\bx\b"),
    ("ids_float", True, _unshuffle_call(ids_restore=torch.zeros(2, 4)), TypeError, r"\bids_restore\b"),
    ("ids_batch", True, _unshuffle_call(ids_restore=torch.tensor([[2, 0, 3, 1]])), ValueError, r"\bids_restore\b"),
    ("ids_meta", True, _unshuffle_call(ids_restore=lambda: torch.zeros(2, 4, dtype=torch.int64, device="meta")), ValueError, r"\bids_restore\b"),
    ("K_gt_L", True, _unshuffle_call(x=lambda: make_x((2, 6, 4))), ValueError, r"\bids_restore\b"),
    ("token_shape", True, _unshuffle_call(mask_token=lambda: make_x((1, 4))), ValueError, r"\bmask_token\b"),
    ("token_dim", True, _unshuffle_call(mask_token=lambda: make_x((1, 1, 5))), ValueError, r"\bmask_token\b"),
    ("pos_rows", True, _unshuffle_call(decoder_pos_embed=lambda: make_x((1, 4, 4))), ValueError, r"\bdecoder_pos_embed\b"),
    ("pos_int", True, _unshuffle_call(decoder_pos_embed=lambda: torch.ones(1, 5, 4, dtype=torch.int32)), TypeError, r"\bdecoder_pos_embed\b"),
    ("ids_out_of_range", False, _unshuffle_call(ids_restore=torch.tensor([[2, 0, 4, 1], [0, 1, 2, 3]])), ValueError, r"\bids_restore\b"),
    ("ids_negative", False, _unshuffle_call(ids_restore=torch.tensor([[2, 0, 3, 1], [0, -1, 2, 3]], dtype=torch.int32)), ValueError, r"\bids_restore\b"),
    ("ids_duplicate", False, _unshuffle_call(ids_restore=torch.tensor([[2, 0, 2, 1], [0, 1, 2, 3]])), ValueError, r"permutation"),
]


def _bad_params(cases):
    params = []
    for case_id, structural, fn, exc, pattern in cases:
        for backend in (None, *BACKENDS):
            params.append(pytest.param(fn, backend, True, exc, pattern, id=f"{case_id}-{backend}"))
            if structural:  # shape, dtype and device checks do not depend on check_indices
                params.append(pytest.param(fn, backend, False, exc, pattern, id=f"{case_id}-{backend}-nocheck"))
    return params


@pytest.mark.parametrize("fn,backend,check_indices,exc,pattern", _bad_params(PATCH_BAD + EMBED_BAD + UNSHUFFLE_BAD))
def test_bad_input(fn, backend, check_indices, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(backend, check_indices)


def test_forcing_cpp_raises():
    from mvmae_fast.backends import UnsupportedBackendError

    with pytest.raises(UnsupportedBackendError, match="no cpp implementation"):
        gather_visible_patches(_imgs(), IDS, 4, backend="cpp")
    with pytest.raises(UnsupportedBackendError, match="no cpp implementation"):
        gather_table_rows(make_x((49, 8)), IDS, backend="cpp")


# --------------------------------------------------------------------------- #
# torch.library.opcheck
# --------------------------------------------------------------------------- #
def _opcheck_cases():
    imgs = make_x((2, 3, 8, 12)).requires_grad_()
    ids = make_ids(2, 6, 4, dtype=torch.int32)
    patches = make_x((2, 4, 48)).requires_grad_()
    x, token = make_x((2, 5, 8)).requires_grad_(), make_x((1, 1, 8)).requires_grad_()
    pos = make_x((1, 7, 8)).requires_grad_()
    ids_restore = make_ids_restore(2, 6)
    m = torch.ops.mvmae_fast
    return {
        "gather_visible_patches": lambda b: (m.gather_visible_patches.default, (imgs, ids, 4, True, b)),
        "scatter_visible_patches": lambda b: (m.scatter_visible_patches.default, (patches, ids, 4, 8, 12, True, b)),
        "gather_table_rows": lambda b: (m.gather_table_rows.default, (make_x((6, 8)).requires_grad_(), ids, True, b)),
        "scatter_add_table_rows": lambda b: (m.scatter_add_table_rows.default, (make_x((2, 4, 8)).requires_grad_(), ids, 6, True, b)),
        "decoder_unshuffle": lambda b: (m.decoder_unshuffle.default, (x, ids_restore, token, pos, True, b)),
        "decoder_unshuffle_backward": lambda b: (m.decoder_unshuffle_backward.default,
                                                 (make_x((2, 7, 8)).requires_grad_(), ids_restore, 4, torch.float32, torch.float32, b)),
    }


@pytest.mark.parametrize("op", list(_opcheck_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, op):
    torch.library.opcheck(*_opcheck_cases()[op](backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unshuffle_eager_cpu_path_matches_the_custom_op(dtype):
    """Eager CPU calls run the cpp kernels from an autograd Function (no custom-op dispatch); the custom
    op gives the same bits for the output and every gradient, a double backward included; a traced call
    (make_fx) goes through the custom op."""
    from mvmae_fast.ops import decoder_unshuffle

    g = torch.Generator().manual_seed(5)
    B, L, K, D = 3, 12, 4, 8
    x = torch.randn(B, K + 1, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    token, pos = torch.randn(1, 1, D, generator=g), torch.randn(1, L + 1, D, generator=g)
    grad = torch.randn(B, L + 1, D, generator=g)
    results = []
    for eager in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, token, pos)]
        if eager:
            out = decoder_unshuffle(leaves[0], ids, leaves[1], leaves[2])
        else:
            out = torch.ops.mvmae_fast.decoder_unshuffle(leaves[0], ids, leaves[1], leaves[2], True, "cpp")
        assert ("_EagerCppUnshuffle" in type(out.grad_fn).__name__) == eager, type(out.grad_fn).__name__
        g_out = grad.to(out.dtype).requires_grad_(True)
        grads = torch.autograd.grad(out, leaves, g_out, create_graph=True)
        (second,) = torch.autograd.grad(sum(t.float().sum() for t in grads[:2]), g_out)
        results.append((out.detach(), *(t.detach() for t in grads), second))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda t: decoder_unshuffle(t, ids, token, pos))(x)
    assert "mvmae_fast.decoder_unshuffle" in str(graph.graph)


def test_patch_embed_eager_cpu_path_matches_the_custom_ops():
    """On the CPU gather_visible_patches / gather_table_rows run their torch code; eager calls run it
    from autograd Functions (no custom-op dispatch) with the same bits as the custom ops, forward,
    backward and double backward; a traced call (make_fx) goes through the custom ops."""
    g = torch.Generator().manual_seed(7)
    imgs = torch.randn(2, 3, 8, 12, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(2)])
    table = torch.randn(6, 5, generator=g)
    results = []
    for eager in (True, False):
        im, tb = imgs.clone().requires_grad_(True), table.clone().requires_grad_(True)
        if eager:
            patches, rows = gather_visible_patches(im, ids, 4), gather_table_rows(tb, ids)
        else:
            patches = torch.ops.mvmae_fast.gather_visible_patches(im, ids, 4, True, "")
            rows = torch.ops.mvmae_fast.gather_table_rows(tb, ids, True, "")
        for out, name in ((patches, "_EagerVisiblePatches"), (rows, "_EagerTableRows")):
            assert (name in type(out.grad_fn).__name__) == eager, type(out.grad_fn).__name__
        gp = torch.randn(patches.shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        gr = torch.randn(rows.shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        d_im, d_tb = torch.autograd.grad((patches, rows), (im, tb), (gp, gr), create_graph=True)
        second = torch.autograd.grad((d_im * d_im).sum() + (d_tb * d_tb).sum(), (gp, gr))
        results.append((patches.detach(), rows.detach(), d_im.detach(), d_tb.detach(), *second))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda t: gather_table_rows(t, ids))(table)
    assert "mvmae_fast.gather_table_rows" in str(graph.graph)
