"""Loss benchmarks, forward + backward: our fused losses against the reference MAE's way.

Reconstruction: the reference runs on the prediction for every patch with a mask, as MAE does
(``masked_recon_loss``: patchify, normalise and square every patch, then mask); ours takes the
removed rows only and reads the targets from the image (``masked_recon_loss_rows``). GB/s counts
the bytes an ideal kernel moves: read the removed rows' predictions and target pixels, write their
gradient. InfoNCE: the reference builds the (2B, 2B) logits and calls ``cross_entropy``; ours keeps
one LSE per row. FLOPs of ours: forward 2 n^2 d, backward 4 n^2 d (the logits are recomputed).

Providers: ``reference`` (eager), ``compiled`` (torch.compile of the reference: CUDA, and CPU except
at tiny size), and our backends out of IMPLEMENTED (``torch``: the op's plain-PyTorch backend,
``triton`` on CUDA). extra_info records peak memory on CUDA (bytes allocated beyond the inputs).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import SIZE
from mvmae_fast.ops.info_nce import info_nce
from mvmae_fast.ops.recon_loss import masked_recon_loss, masked_recon_loss_rows

REFERENCE_PROVIDERS = ("reference", "compiled")
IMPLEMENTED = ("torch", "cpp", "triton")  # cpp: the reconstruction loss only

# (B, img, patch, removed): ViT-B/16 at 224 px, 80% (MV-MAE) and 75% (MAE) masking.
RECON_SHAPES = {"cuda": [(256, 224, 16, 157), (256, 224, 16, 147)], "cpu": [(8, 224, 16, 157)]}
RECON_TINY = [(2, 16, 4, 12)]
# (2B, d)
NCE_SHAPES = {"cuda": [(n, d) for n in (512, 1024, 8192) for d in (128, 256)], "cpu": [(256, 128), (512, 128)]}
NCE_TINY = [(6, 16)]


def shapes_for(device, full, tiny):
    return tiny if SIZE == "tiny" else full[device.type]


def skip_unsupported(device, provider, has_cpp=True):
    if provider == "cpp" and (not has_cpp or device.type != "cpu"):
        pytest.skip("no cpp kernels for this op on this device")
    if provider == "compiled" and device.type == "cpu" and SIZE == "tiny":
        pytest.skip("torch.compile on the CPU only at full size (compile time dwarfs tiny cases)")
    if provider == "triton" and device.type == "cpu" and SIZE != "tiny":
        pytest.skip("Triton on the CPU is the interpreter: tiny size only")


@pytest.fixture
def measure(timed, benchmark, device):
    """``measure(fn, bytes_moved=None, **info)``: one warm-up call (compiles), then ``timed(fn)``;
    records ``info`` and, on CUDA, the peak memory allocated beyond what existed before."""

    def run(fn, bytes_moved=None, **info):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        result = timed(fn, bytes_moved=bytes_moved)
        if device.type == "cuda":
            info["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        benchmark.extra_info.update(info)
        return result

    return run


def recon_case(device, B, img, patch, removed, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    L = (img // patch) ** 2
    imgs = torch.randn(B, 3, img, img, device=device, generator=g)
    ids = torch.rand(B, L, device=device, generator=g).argsort(dim=1)
    ids_removed = ids[:, L - removed:]
    mask = torch.zeros(B, L, device=device).scatter_(1, ids_removed, 1.0)
    pred_full = torch.randn(B, L, patch * patch * 3, device=device, generator=g).to(dtype).requires_grad_()
    pred_rows = torch.gather(pred_full.detach(), 1, ids_removed.unsqueeze(-1).expand(-1, -1, pred_full.shape[2]))
    return imgs, ids_removed, mask, pred_full, pred_rows.requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_index", [0, 1])
def test_recon_loss(measure, device, provider, shape_index, dtype):
    shapes = shapes_for(device, RECON_SHAPES, RECON_TINY)
    if shape_index >= len(shapes):
        pytest.skip("no such shape at this size")
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 predictions (autocast) are a CUDA case")
    skip_unsupported(device, provider)
    B, img, patch, removed = shapes[shape_index]
    imgs, ids_removed, mask, pred_full, pred_rows = recon_case(device, B, img, patch, removed, dtype)
    expected = masked_recon_loss(pred_full, imgs, mask, patch, True)

    if provider in REFERENCE_PROVIDERS:
        loss_fn = masked_recon_loss if provider == "reference" else torch.compile(masked_recon_loss)

        def fn():
            loss = loss_fn(pred_full, imgs, mask, patch, True)
            return loss, torch.autograd.grad(loss, pred_full)[0]
    else:
        def fn():
            loss = masked_recon_loss_rows(pred_rows, imgs, ids_removed, patch, True, check_indices=False,
                                          backend=provider)
            return loss, torch.autograd.grad(loss, pred_rows)[0]

    P = pred_full.shape[2]
    ideal = B * removed * P * (2 * pred_full.element_size() + imgs.element_size())
    loss, _ = measure(fn, bytes_moved=ideal, mode="fwd+bwd", B=B, removed=removed, P=P, dtype=str(dtype))
    torch.testing.assert_close(loss.float(), expected.float(), rtol=1e-3 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("temperature", [0.1])
@pytest.mark.parametrize("shape_index", range(6))
def test_info_nce(measure, device, provider, shape_index, temperature):
    skip_unsupported(device, provider, has_cpp=False)
    shapes = shapes_for(device, NCE_SHAPES, NCE_TINY)
    if shape_index >= len(shapes):
        pytest.skip("no such shape at this size")
    skip_unsupported(device, provider)
    n, d = shapes[shape_index]
    g = torch.Generator(device=device).manual_seed(0)
    z = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1).requires_grad_()
    B = n // 2
    expected = info_nce(z[:B], z[B:], temperature, backend="torch")

    if provider in REFERENCE_PROVIDERS:
        def reference(z):
            return info_nce(z[:B], z[B:], temperature, backend="torch")

        loss_fn = reference if provider == "reference" else torch.compile(reference)
    else:
        def loss_fn(z):
            return info_nce(z[:B], z[B:], temperature, backend=provider)

    def fn():
        loss = loss_fn(z)
        return loss, torch.autograd.grad(loss, z)[0]

    loss, _ = measure(fn, mode="fwd+bwd", n=n, d=d, GFLOP=round(6 * n * n * d / 1e9, 3))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
