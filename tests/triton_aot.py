"""Compile mvmae_fast's Triton kernels ahead of time for a GPU, on a machine without one.

    python tests/triton_aot.py GROUP DTYPE [ARCH ...]     (run WITHOUT TRITON_INTERPRET=1)

GROUP is ``autocast`` (the CUDA autocast layers' kernels at their launchers' own configurations, for
row widths of real ViTs and the limits), ``attention`` (forward and backward, a few of the
autotuner's tile configurations per head dimension) or ``ops`` (row gather/scatter, reconstruction
loss, decoder unshuffle, visible patches, table rows, InfoNCE, masking). DTYPE is the activation
dtype (fp32, fp16, bf16). Prints one line per compiled kernel,
``ok <arch> <name> regs=<registers or ?> spill=<bytes or ?>``; a kernel that fails to compile raises.

Triton's interpreter (the CPU tests) runs code that compiled Triton refuses (a plain Python global
read in a kernel, for one), and a lent GPU machine is rare: this catches those before one is.
Registers and spills come from ``cuobjdump -res-usage`` of the cubin (Triton's bundled copy; ``?``
without one).
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mvmae_fast.ops.attention import triton_impl as att
from mvmae_fast.ops.info_nce import triton_impl as nce
from mvmae_fast.ops.masking import triton_impl as mk
from mvmae_fast.ops.mlp import autocast_triton as at
from mvmae_fast.ops.patch_embed import triton_impl as pe
from mvmae_fast.ops.recon_loss import triton_impl as rl
from mvmae_fast.ops.rows import triton_impl as rows
from mvmae_fast.ops.unshuffle import triton_impl as un

# Row widths of the autocast layers: ViT-Ti/S/B/L/H widths, an MLP hidden width, the limit.
AUTOCAST_WIDTHS = (192, 384, 768, 1024, 1280, 3072, at.MAX_DIM)
HEAD_DIMS = (32, 64, 80)
TYPED = ("i32", "i64", "fp32")


def _cuobjdump():
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return found[0] if found else None


def resources(cubin):
    """(registers, spill bytes) of a cubin, or ('?', '?') without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    return int(usage.group(1)), int(usage.group(2)) + int(usage.group(3))


def compile_kernel(kernel, args, arch, num_warps=4, num_stages=3):
    """Compile ``kernel`` (a JITFunction or an Autotuner around one); ``args`` gives every argument
    either a type ('*bf16', 'i32', 'fp32', ...) or a constexpr value (1 for a stride Triton specialises)."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    if set(args) != set(kernel.arg_names):
        raise ValueError(f"{kernel.__name__}: arguments {sorted(set(args) ^ set(kernel.arg_names))} differ")
    typed = {name: value for name, value in args.items()
             if isinstance(value, str) and (value.startswith("*") or value in TYPED)}
    signature = {name: typed.get(name, "constexpr") for name in kernel.arg_names}
    constexprs = {name: value for name, value in args.items() if name not in typed}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*")}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, spill = resources(compiled.asm["cubin"])
    print(f"ok {arch} {kernel.__name__} regs={regs} spill={spill}", flush=True)


def _split(launch):
    launch = dict(launch)
    return launch.pop("num_warps"), launch


def autocast_cases(act):
    p = f"*{act}"
    for D in AUTOCAST_WIDTHS:
        warps, meta = _split(at.layer_norm_launch(D))
        yield at._layer_norm_kernel, dict(x_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32", h_ptr=p, mean_ptr="*fp32",
                                          rstd_ptr="*fp32", rows="i32", D="i32", eps="fp32", **meta), warps
        warps, meta = _split(at.layer_norm_backward_launch(D))
        for residual in (True, False):
            yield at._layer_norm_backward_kernel, dict(
                dh_ptr=p, x_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32", w_ptr="*fp32", res_ptr="*fp32",
                dx_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", rows="i32", D="i32", rows_per_group="i32",
                HAS_RESIDUAL=residual, **meta), warps
    warps, meta = _split(at.gelu_launch())
    yield at._gelu_forward_kernel, dict(pre_ptr=p, act_ptr=p, deriv_ptr="*fp16", n="i32", **meta), warps
    warps, meta = _split(at.column_sum_launch())
    for mode in (0, 1, 2):
        yield at._colsum_kernel, dict(g_ptr="*fp32" if mode == 1 else p, deriv_ptr="*fp16", out_ptr=p,
                                      partial_ptr="*fp32", rows="i32", C="i32", rows_per_group="i32", MODE=mode,
                                      **meta), warps


def attention_cases(dtype):
    p = f"*{dtype}"
    for head_dim in HEAD_DIMS:
        for block_m, block_n, warps in ((64, 64, 4), (128, 64, 8)):
            meta = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=att.head_dim_block(head_dim),
                        UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            yield att._attn_fwd_kernel, dict(qkv_ptr=p, out_ptr=p, lse_ptr="*fp32", N="i32", H="i32", s_qkv_b="i32",
                                             s_qkv_n="i32", s_qkv_c=1, s_out_b="i32", s_out_n="i32", s_out_c=1,
                                             qk_scale="fp32", **meta), warps
            backward = dict(qkv_ptr=p, dout_ptr=p, lse_ptr="*fp32", delta_ptr="*fp32", dqkv_ptr=p, N="i32", H="i32",
                            s_qkv_b="i32", s_qkv_n="i32", s_qkv_c=1, s_do_b="i32", s_do_n="i32", s_do_c=1,
                            s_dqkv_b="i32", s_dqkv_n="i32", s_dqkv_c=1, sm_scale="fp32", qk_scale="fp32", **meta)
            yield att._attn_bwd_dkdv_kernel, backward, warps
            yield att._attn_bwd_dq_kernel, backward, warps
    yield att._attn_bwd_delta_kernel, dict(out_ptr=p, dout_ptr=p, delta_ptr="*fp32", N="i32", H="i32", s_out_b="i32",
                                           s_out_n="i32", s_out_c=1, s_do_b="i32", s_do_n="i32", s_do_c="i32",
                                           HEAD_DIM=64, BLOCK_M=64, BLOCK_D=64), 4


def ops_cases(dtype):
    """The other ops' kernels at the tile sizes their launchers pick for ViT-B/16 shapes (D = 768 or
    512, 16 x 16 x 3 pixel patches)."""
    p = f"*{dtype}"
    yield rows._gather_rows_kernel, dict(x_ptr=p, ids_ptr="*i64", out_ptr=p, L="i32", K="i32", D="i32",
                                         BLOCK_D=1024), 4
    yield rows._scatter_rows_kernel, dict(y_ptr=p, ids_ptr="*i64", out_ptr=p, L="i32", K="i32", D="i32",
                                          row_tiles="i32", BLOCK_L=rows.SCATTER_BLOCK_L, BLOCK_K=rows.SCATTER_BLOCK_K,
                                          BLOCK_D=256), 4
    for P in (48, 768):  # 4 x 4 and 16 x 16 RGB patches
        block_r, block_p, warps = rl.launch_config(P)
        for backward in (False, True):
            for norm in (False, True):
                yield rl._recon_rows_kernel, dict(
                    pred_ptr=p, img_ptr=p, ids_ptr="*i64", partial_ptr=p if backward else "*fp32",
                    grad_losses_ptr="*fp32" if backward else p, grad_ptr=p, rows_per_view="i32", M="i32", P="i32",
                    C="i32", p="i32", grid_w="i32", s_v="i32", s_b="i32", s_c="i32", s_h="i32", s_w=1,
                    grad_scale="fp32", NORM=norm, BACKWARD=backward, BLOCK_R=block_r, BLOCK_P=block_p), warps
    yield un._unshuffle_fwd_kernel, dict(x_ptr=p, ids_ptr="*i64", token_ptr=p, pos_ptr="*fp32", out_ptr="*fp32",
                                         K="i32", L="i32", D="i32", row_tiles="i32", ACC=tl.float32,
                                         BLOCK_R=un.BLOCK_R, BLOCK_D=un._block_d(512)), 4
    yield un._unshuffle_bwd_kernel, dict(grad_ptr=p, ids_ptr="*i64", grad_x_ptr=p, partial_ptr="*fp32", K="i32",
                                         L="i32", D="i32", ACC=tl.float32, BLOCK_R=un.BLOCK_R,
                                         BLOCK_D=un._block_d(512)), 4
    patch_block = pe._block(16 * 16 * 3)
    yield pe._gather_patches_kernel, dict(img_ptr=p, ids_ptr="*i64", out_ptr=p, K="i32", grid_w="i32", s_b="i32",
                                          s_c="i32", s_h="i32", s_w=1, PATCH=16, CHANNELS=3, BLOCK=patch_block), 4
    yield pe._scatter_patches_kernel, dict(patches_ptr=p, ids_ptr="*i64", img_ptr=p, K="i32", L="i32",
                                           grid_w="i32", height="i32", width="i32", PATCH=16, CHANNELS=3,
                                           BLOCK_K=pe.BLOCK_K, BLOCK=patch_block), 4
    yield pe._gather_table_rows_kernel, dict(table_ptr=p, ids_ptr="*i64", out_ptr=p, D="i32",
                                             BLOCK_D=pe._block(768)), 4
    yield pe._table_rows_grad_kernel, dict(y_ptr=p, ids_ptr="*i64", partial_ptr="*fp32", B="i32", K="i32", L="i32",
                                           D="i32", SAMPLES=pe.TABLE_SAMPLES, BLOCK_L=pe.TABLE_BLOCK_L,
                                           BLOCK_K=pe.BLOCK_K, BLOCK_D=128), 4
    dot = dict(UPCAST=False, PRECISION=nce.FP32_DOT_PRECISION if dtype == "fp32" else None)
    for d in (128, 256):  # projection widths (the backward keeps up to 256 output columns per program)
        warps, meta = _split(nce.forward_launch(d))
        yield nce._info_nce_fwd_kernel, dict(q_ptr=p, k_ptr=p, lse_ptr="*fp32", loss_ptr="*fp32", n="i32", N="i32",
                                             d="i32", offset="i32", scale2="fp32", **meta, **dot), warps
        warps, meta = _split(nce.backward_launch(d, 4 if dtype == "fp32" else 2))
        for role in (nce.ANCHOR, nce.KEY, nce.BOTH):
            yield nce._info_nce_bwd_kernel, dict(
                x_ptr=p, y_ptr=p, lse_ptr="*fp32", grad_ptr="*fp32", dx_ptr=p, n_x="i32", n_y="i32", n="i32",
                d="i32", offset="i32", scale2="fp32", coef="fp32", ROLE=role, **meta, **dot), warps
    if dtype == "fp32":  # masking has no activation dtype
        yield mk._random_masking_kernel, dict(ids_keep_ptr="*i64", ids_restore_ptr="*i64", mask_ptr="*fp32",
                                              L="i32", K="i32", s0="i32", s1="i32", BLOCK_I=mk.BLOCK_I,
                                              BLOCK_J=mk.BLOCK_J), 4


GROUPS = {"autocast": autocast_cases, "attention": attention_cases, "ops": ops_cases}


def main(argv):
    group, dtype, *archs = argv
    for arch in [int(a) for a in archs] or [90]:
        for kernel, args, warps in GROUPS[group](dtype):
            compile_kernel(kernel, args, arch, num_warps=warps)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    main(sys.argv[1:])
