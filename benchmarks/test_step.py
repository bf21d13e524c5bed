"""Whole training steps (forward + backward + AdamW step): the reference MAE against mvmae_fast.

Providers, at identical shapes, dtype, batch and (for the MAE cases) mask ratio:
  reference         the official MAE's semantics (mvmae_fast.reference_mae): explicit attention as
                    timm 0.3.2 computed it, .repeat-indexed gathers, loss over all patches
  reference_sdpa_compiled   the same model with SDPA attention, under torch.compile: the strongest
                    plain-PyTorch peer (skipped on CPU at tiny size: compiling costs ~1 min)
  mae               mvmae_fast's MAE as train/pretrain.py runs it (MVMAE with views=1, w_con=0, mask
                    0.75; prediction head on removed patches only; default backends)
  mvmae             mvmae_fast's MV-MAE: two views, 80% mask, projector + InfoNCE (the goal: images/s
                    at least the reference's single-view MAE at 75%)
  mae_compiled, mvmae_compiled   the same under torch.compile, as `train/pretrain.py --compile` runs
                    them (our kernels stay custom ops; inductor fuses the glue around them; skipped
                    on CPU at tiny size like the compiled peer)
  mae_layers, mvmae_layers   CUDA only: mae / mvmae eager with MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1 (the
                    opt-in autocast layers with Triton elementwise kernels; mae and mvmae run with it 0)

CUDA: bf16 autocast, GPU-resident synthetic batches, ViT-B/16 at 224 px batch 256 (and ViT-L).
CPU: the micro preset (32 px, 4 px patches, D=128, depth 4), batch 64, and the tiny preset (D=192,
depth 12, decoder 128 x 4: GEMMs are most of its step, where MKL / oneDNN and our kernels run at
about the same rate), batch 64, in fp32 and under bf16 autocast (the official recipe's mixed
precision; CPUs with AMX or AVX512-BF16 run its matmuls several times faster). The compiled
providers skip the tiny preset on the CPU (compiling it costs minutes).
Every provider steps torch's fused AdamW (CUDA and CPU). extra_info records images/s, the ratio
to the reference in this run, on the CPU also the ratio with reference steps interleaved (below),
peak memory (CUDA), MFU = training FLOPs per image (mvmae_fast.training:
3 x forward, forward = 2 x MACs of linears and attention matmuls) x images/s / 989 TFLOP/s on an
H100/H200, device, torch and triton versions.
"""

import os
import statistics
import time
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import conftest
from conftest import SIZE, RESULTS
from mvmae_fast import reference_mae, training
from mvmae_fast.models import MVMAE, MVMAEConfig, PRESETS
from mvmae_fast.ops.mlp.autocast import CUDA_LAYERS_ENV

PROVIDERS = ["reference", "reference_sdpa_compiled", "mae", "mvmae", "mae_compiled", "mvmae_compiled", "mae_layers",
             "mvmae_layers"]
CPU_PROVIDERS = [p for p in PROVIDERS if not p.endswith("_layers")]  # the *_layers ones are CUDA only
LAYERS_ENV = CUDA_LAYERS_ENV
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def mfu_percent(device_name, config, images_per_s):
    """Model FLOP utilisation of a step at ``images_per_s`` on ``device_name`` (None: peak unknown)."""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
    return 100 * training.training_flops_per_image(config) * images_per_s / peak if peak else None


CASES = {"vit_base_patch16": 256, "vit_large_patch16": 128, "vit_micro_patch4_32": 64, "vit_tiny_patch4_32": 64}
CPU_PRESETS = ("vit_micro_patch4_32", "vit_tiny_patch4_32")


def batch_for(device, preset):
    """The batch of ``preset`` on ``device``, or None when the case does not run there."""
    if (preset in CPU_PRESETS) == (device.type == "cuda" and SIZE != "tiny"):
        return None
    return 4 if SIZE == "tiny" else CASES[preset]


def sdpa_forward(self, x):
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def build(provider, preset, device):
    p = PRESETS[preset]
    kwargs = dict(img_size=p["img_size"], patch_size=p["patch_size"], embed_dim=p["embed_dim"], depth=p["depth"],
                  num_heads=p["num_heads"], decoder_embed_dim=p["dec_dim"], decoder_depth=p["dec_depth"],
                  decoder_num_heads=p["dec_heads"], norm_pix_loss=True)
    if provider.startswith("reference"):
        model = reference_mae.MaskedAutoencoderViT(**kwargs).to(device)
        if provider == "reference_sdpa_compiled":
            for block in [*model.blocks, *model.decoder_blocks]:
                block.attn.forward = types.MethodType(sdpa_forward, block.attn)
        config = MVMAEConfig(**p, views=1, w_con=0.0, mask_ratio=0.75)
    elif provider.startswith("mae"):
        config = MVMAEConfig(**p, views=1, w_con=0.0, mask_ratio=0.75)
        model = MVMAE(config).to(device)
    else:
        model = MVMAE(MVMAEConfig(**p)).to(device)
        config = model.config
    return model, config


def make_step(provider, model, device, batch, config, precision="bf16"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    shape = (batch, 2, 3, config.img_size, config.img_size) if provider.startswith("mvmae") else (
        batch, 3, config.img_size, config.img_size)
    imgs = torch.randn(shape, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    forward = torch.compile(model) if provider.endswith("_compiled") else model
    counter = {"step": 0}
    layers = "1" if provider.endswith("_layers") else "0"

    def step():
        counter["step"] += 1
        with amp, mock.patch.dict(os.environ, {LAYERS_ENV: layers}):
            if provider.startswith("reference"):
                loss = forward(imgs, mask_ratio=0.75)[0]
            else:
                loss = forward(imgs, seed=counter["step"], return_pred=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


# A shared virtual CPU drifts 10-20% in speed within a minute, so the ratio of two cases timed one
# after the other (ratio_to_reference) moves by that much from run to run. On the CPU each case also
# alternates steps of its provider with steps of the reference in the same process, after its own
# timing, and records the ratio of the medians: both see the same drift (as
# benchmarks/interleaved_step.py measures it).
INTERLEAVED_ROUNDS = {"vit_micro_patch4_32": 10, "vit_tiny_patch4_32": 6}


def interleaved_ratio(step, preset, device, batch, precision, rounds):
    """Median reference step time over median ``step`` time, steps alternated (order swapped every
    round) for ``rounds`` rounds after two warm-up steps of the reference."""
    torch.manual_seed(0)
    ref_model, ref_config = build("reference", preset, device)
    ref_step = make_step("reference", ref_model, device, batch, ref_config, precision)
    for _ in range(2):
        ref_step()
    times = {"reference": [], "provider": []}
    for r in range(rounds):
        order = [("reference", ref_step), ("provider", step)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["reference"]) / statistics.median(times["provider"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", list(CASES))
@pytest.mark.parametrize("variant", PROVIDERS)
def test_training_step(benchmark, device, variant, preset, precision):
    batch = batch_for(device, preset)
    if batch is None:
        pytest.skip(f"{preset} runs on {'the CPU' if preset in CPU_PRESETS else 'CUDA'} only")
    if device.type == "cuda" and precision == "fp32":
        pytest.skip("CUDA steps run under bf16 autocast")
    if variant not in CPU_PROVIDERS and device.type != "cuda":
        pytest.skip("the autocast layers' Triton kernels are CUDA-only (on the CPU mae and mvmae have theirs)")
    if variant.endswith("_compiled") and device.type == "cpu" and SIZE == "tiny":
        pytest.skip("compiling on the CPU takes about a minute; run at full size")
    if variant.endswith("_compiled") and device.type == "cpu" and preset == "vit_tiny_patch4_32":
        pytest.skip("compiling the tiny preset on the CPU takes minutes; the micro preset has the compiled cases")
    torch.manual_seed(0)
    model, config = build(variant, preset, device)
    step = make_step(variant, model, device, batch, config, precision)
    for _ in range(2 if SIZE == "tiny" else 5):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            step()
        end.record()
        torch.cuda.synchronize()
        event_ms = start.elapsed_time(end) / 10

        def timed_step():
            loss = step()
            torch.cuda.synchronize()
            return loss
    else:
        timed_step = step
    loss = benchmark.pedantic(timed_step, rounds=3 if SIZE == "tiny" else 10, iterations=1)
    assert torch.isfinite(loss.detach()).item()

    info = benchmark.extra_info
    info.update(case=f"{preset} batch {batch} {precision}", provider=variant, malloc=conftest.MALLOC,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **conftest.versions())
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: each case ran once as a plain test
        return
    seconds = event_ms / 1e3 if device.type == "cuda" else stats.stats.median
    ips = batch / seconds
    info["images_per_s"] = round(ips, 1)
    key = (device.type, preset, batch, precision)
    if variant == "reference":
        RESULTS[key] = ips
    if key in RESULTS:
        info["ratio_to_reference"] = round(ips / RESULTS[key], 3)
    if device.type == "cpu" and variant != "reference":
        info["ratio_to_reference_interleaved"] = round(
            interleaved_ratio(step, preset, device, batch, precision,
                              2 if SIZE == "tiny" else INTERLEAVED_ROUNDS[preset]), 3)
    if device.type == "cuda":
        info["cuda_event_ms"] = round(event_ms, 3)
        info["peak_memory_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        mfu = mfu_percent(info["device"], config, ips)
        if mfu is not None:
            info["MFU_percent"] = round(mfu, 1)
            info["flops_formula"] = "3 x 2 x MACs(linears + attention matmuls) per image, all views"
