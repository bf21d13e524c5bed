"""Masked reconstruction loss on the removed rows, in Triton.

One program per (block of removed rows, view). Each row's target patch is read straight from the
image with strided loads in patchify order, normalised in registers and compared with the
prediction. The forward pass writes one fp32 partial sum per program (reduced in a fixed order
afterwards: deterministic); the backward pass recomputes the target the same way and writes
d(pred) = 2 (pred - target) / (p*p*C * B*M) * d(view loss), rounded once to pred's dtype. The
whole patch (p*p*C values) sits in one tile, so each pass reads the image and the prediction once.
"""

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # rows per program = TILE_ELEMENTS // next_pow2(p*p*C), at least 1
# Values a thread (num_warps = tile // (32 * this), 4 to 32). At 16 (8 warps a 4096-value tile) the
# sm_90 build took 190-210 registers at P = 48 and spilled in the float16 backward at P = 768; at 8,
# 32-114 and no spills (tests/test_triton_compile.py checks).
VALUES_PER_THREAD = 8


@triton.jit
def _recon_rows_kernel(pred_ptr, img_ptr, ids_ptr, partial_ptr, grad_losses_ptr, grad_ptr,
                       rows_per_view, M, P, C, p, grid_w,
                       s_v, s_b, s_c, s_h, s_w, grad_scale,
                       NORM: tl.constexpr, BACKWARD: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    blk = tl.program_id(0)
    v = tl.program_id(1).to(tl.int64)
    r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows_per_view
    flat_row = v * rows_per_view + r  # row of pred / ids, int64
    patch = tl.load(ids_ptr + flat_row, mask=row_ok, other=0).to(tl.int64)
    sample = (r // M).to(tl.int64)
    top = (patch // grid_w) * p
    left = (patch % grid_w) * p
    row_base = v * s_v + sample * s_b + top * s_h + left * s_w

    # Value k of a patch is (a*p + b)*C + c: row a, column b, channel c (channel last).
    k = tl.arange(0, BLOCK_P)
    k_ok = k < P
    c = k % C
    a = (k // C) // p
    b = (k // C) % p
    col_off = c.to(tl.int64) * s_c + a.to(tl.int64) * s_h + b.to(tl.int64) * s_w
    ok = row_ok[:, None] & k_ok[None, :]

    target = tl.load(img_ptr + row_base[:, None] + col_off[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(target, axis=1) / P
        dev = tl.where(ok, target - mean[:, None], 0.0)
        var = tl.sum(dev * dev, axis=1) / (P - 1)  # unbiased, as torch.var
        target = dev / tl.sqrt_rn(var + 1.0e-6)[:, None]

    pred_off = flat_row[:, None] * P + k[None, :]
    pred = tl.load(pred_ptr + pred_off, mask=ok, other=0.0).to(tl.float32)
    diff = tl.where(ok, pred - target, 0.0)
    if BACKWARD:
        scale = tl.load(grad_losses_ptr + v).to(tl.float32) * grad_scale
        tl.store(grad_ptr + pred_off, (diff * scale).to(grad_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(partial_ptr + v * tl.num_programs(0) + blk, tl.sum(tl.sum(diff * diff, axis=1), axis=0))


def _rows_per_program(P):
    return max(1, TILE_ELEMENTS // triton.next_power_of_2(P))


def launch_config(P):
    """(BLOCK_R, BLOCK_P, num_warps) for prediction rows of P values."""
    rows, block_p = _rows_per_program(P), triton.next_power_of_2(P)
    return rows, block_p, min(32, max(4, rows * block_p // (32 * VALUES_PER_THREAD)))


def _launch(pred, imgs, ids, patch_size, norm_pix_loss, *, partial=None, grad_losses=None, grad=None):
    """The forward pass (given partial) or the backward pass (given grad_losses and grad); pointer
    arguments a pass does not use get pred."""
    V, B, C, _, W = imgs.shape
    M, P = pred.shape[1], pred.shape[2]
    rows, block_p, warps = launch_config(P)
    backward = grad is not None
    _recon_rows_kernel[(triton.cdiv(B * M, rows), V)](
        pred, imgs, ids, pred if backward else partial, grad_losses if backward else pred, grad if backward else pred,
        B * M, M, P, C, patch_size, W // patch_size, *imgs.stride(), 2.0 / (P * B * M),
        NORM=norm_pix_loss, BACKWARD=backward, BLOCK_R=rows, BLOCK_P=block_p,
        num_warps=warps)


def squared_error_sums(pred, imgs, ids, patch_size, norm_pix_loss):
    """pred (V*B, M, P) and ids (V*B, M) contiguous, imgs (V, B, C, H, W) any strides -> the
    per-view sums of squared errors (V,), fp32."""
    V, B = imgs.shape[:2]
    programs = triton.cdiv(B * pred.shape[1], _rows_per_program(pred.shape[2]))
    partial = torch.empty(V, programs, dtype=torch.float32, device=pred.device)
    _launch(pred, imgs, ids, patch_size, norm_pix_loss, partial=partial)
    return partial.sum(dim=1)


def grad_pred(grad_losses, pred, imgs, ids, patch_size, norm_pix_loss, grad):
    """Writes grad (like pred) = d(sum_v grad_losses[v] * loss_v) / d(pred); grad_losses (V,)."""
    _launch(pred, imgs, ids, patch_size, norm_pix_loss, grad_losses=grad_losses, grad=grad)
