"""Training-step throughput on a CUDA GPU, one provider after another, with CUDA-event timing.

Same models, shapes, optimizer and bf16 autocast as benchmarks/test_step.py, outside pytest: quick
to run on a lent GPU, one line per provider as soon as it is measured (a failing provider prints its
error and the rest go on), and optionally a torch.profiler table of one provider's step.

    python benchmarks/cuda_step.py                                   # ViT-B/16 batch 256, eager providers
    python benchmarks/cuda_step.py --providers reference reference_sdpa_compiled mae mae_compiled
    python benchmarks/cuda_step.py --preset vit_large_patch16 --batch 128
    python benchmarks/cuda_step.py --profile mae                     # + the top CUDA kernels of one step

The default providers include mae_layers and mvmae_layers: mae / mvmae with
``MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1`` (the opt-in autocast layers with Triton elementwise kernels,
mvmae_fast/ops/mlp/autocast.py).
"""

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_step import PROVIDERS, build, make_step, mfu_percent  # noqa: E402


def measure(step, warmup, steps):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    begin = time.perf_counter()
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        times.append((start, end))
    # The host's time to issue a step: well under the step time when the GPU sets the pace (until the
    # launch queue fills), about equal to it when the host does. Whether the GPU idles shows best in
    # --profile's "Self CUDA time total" (kernel time of one step) against the step time.
    host_ms = (time.perf_counter() - begin) / steps * 1e3
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2], host_ms, torch.cuda.max_memory_allocated() / 2**30


def profile(step, rows):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows // 2, max_name_column_width=70))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        default=["reference", "mae", "mae_layers", "mvmae", "mvmae_layers"])
    parser.add_argument("--preset", default="vit_base_patch16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", choices=PROVIDERS, help="print a profiler table of this provider's step")
    parser.add_argument("--profile-rows", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    import triton

    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {args.preset} batch {args.batch} "
          f"{args.precision}, median of {args.steps} steps after {args.warmup} warm-up", flush=True)
    base = None
    for provider in args.providers:
        try:
            torch.manual_seed(0)
            begin = time.perf_counter()
            model, config = build(provider, args.preset, device)
            step = make_step(provider, model, device, args.batch, config, args.precision)
            ms, host_ms, mem = measure(step, args.warmup, args.steps)
            ips = args.batch / ms * 1e3
            base = base or ips
            mfu = mfu_percent(name, config, ips)
            mfu = f"MFU {mfu:5.1f}%" if mfu is not None else ""
            print(f"{provider:24s} {ms:8.2f} ms  {ips:8.1f} img/s  x{ips / base:.3f} vs {args.providers[0]}  "
                  f"peak {mem:5.1f} GiB  {mfu}  host {host_ms:.1f} ms/step  "
                  f"(setup+warm-up {time.perf_counter() - begin:.0f} s)", flush=True)
            if args.profile == provider:
                profile(step, args.profile_rows)
            del model, step
            torch.cuda.empty_cache()
        except Exception:  # one failing provider must not hide the others' numbers
            print(f"{provider:24s} FAILED", flush=True)
            traceback.print_exc()


if __name__ == "__main__":
    main()
