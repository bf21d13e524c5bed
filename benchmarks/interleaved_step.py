"""Training-step throughput on the CPU, providers interleaved step by step in one process.

On a shared (virtual) CPU the machine's speed drifts by 10-20% over a minute, so providers timed one
after another (as pytest-benchmark does) can disagree by that much between runs. Alternating one step
of each provider, round after round, exposes all of them to the same drift; the medians' ratios are
the CPU numbers to quote. Same models, shapes and optimizer as benchmarks/test_step.py.

    python benchmarks/interleaved_step.py                      # fp32 and bf16 autocast, MAE providers
    python benchmarks/interleaved_step.py --precision bf16 --providers reference mae mvmae
    python benchmarks/interleaved_step.py --providers reference reference_sdpa_compiled mae mae_compiled \
        mvmae mvmae_compiled                                   # everything (~2 min on 2 cores)
    python benchmarks/interleaved_step.py --isolated 3         # each provider alone in its own process,
                                                               # processes alternated, 3 rounds
    python benchmarks/interleaved_step.py --preset vit_tiny_patch4_32 --rounds 10   # the larger preset
    python benchmarks/interleaved_step.py --preset vit_tiny_patch4_32 --precision bf16 --breakdown
                                                               # + where each step's time goes (below)

Interleaving puts several models' memory in one process; ``--isolated N`` instead runs each provider
alone in a fresh process (as training would), N rounds of alternating processes, and reports the
median of each process's median step.

``--breakdown`` then profiles a few more steps of each provider (torch.profiler) and splits the step
into aten's matrix products (mm, addmm, bmm, baddbmm, convolution: the BLAS / oneDNN calls that run a
provider's FLOPs unless the provider runs its own GEMMs, as mvmae_fast's float32 fused layers and,
on AVX512-BF16 without AMX, its bf16 linears do) and the rest, and says what that means for the
first provider's ratio: a
provider that ran the same products at the same speed and nothing else would be at most
step / products faster, and a target ratio leaves (step / target - products) ms for everything else.
On a CPU whose products dominate the reference's step (bf16 on a 2-core AVX512-BF16 machine) that, not
the fused kernels, is what bounds the speed-up.

Every process keeps freed memory between steps (mvmae_fast.runtime.retain_freed_memory, as
train/pretrain.py does by default) for every provider alike; ``--default-malloc`` keeps glibc's
defaults (then each step faults its activations in anew: slower for every provider).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_step import CPU_PRESETS, CPU_PROVIDERS, build, make_step  # noqa: E402

from mvmae_fast import runtime  # noqa: E402

BATCH = 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", choices=CPU_PROVIDERS,
                        default=["reference", "mae"])
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--preset", default="vit_micro_patch4_32",
                        choices=CPU_PRESETS)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--isolated", type=int, default=0, metavar="N",
                        help="run each provider alone in a fresh process, N alternating rounds")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile each provider's step: matrix products vs the rest, and the ratio bound")
    parser.add_argument("--target", type=float, default=1.3,
                        help="the ratio --breakdown budgets the rest of the step for (default 1.3)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc defaults (no mvmae_fast.runtime.retain_freed_memory)")
    parser.add_argument("--child", nargs=2, metavar=("PROVIDER", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    malloc = "default" if args.default_malloc or not runtime.retain_freed_memory() else "retain_freed_memory"
    if args.child:
        return child(*args.child, args.preset, args.warmup, args.rounds)
    if args.isolated:
        return isolated(args, malloc)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} batch {BATCH}, "
          f"{args.rounds} interleaved rounds, malloc: {malloc}")
    for precision in args.precision:
        steps = {}
        for provider in args.providers:
            torch.manual_seed(0)
            model, config = build(provider, args.preset, device)
            steps[provider] = make_step(provider, model, device, BATCH, config, precision)
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        times = {p: [] for p in steps}
        for _ in range(args.rounds):
            for provider, step in steps.items():
                start = time.perf_counter()
                step()
                times[provider].append(time.perf_counter() - start)
        base = None
        for provider, t in times.items():
            median = sorted(t)[len(t) // 2]
            base = base or median
            print(f"{precision:5s} {provider:24s} {median * 1e3:7.1f} ms  {BATCH / median:7.1f} img/s  "
                  f"x{base / median:.3f} vs {args.providers[0]}")
        if args.breakdown:
            breakdown(steps, precision, args.target)


# aten's matrix products (oneDNN / BLAS on the CPU). Self time, so a composite op (linear, matmul)
# counts through the product it calls.
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward", "aten::_mkldnn_linear_pointwise", "mkldnn::_linear_pointwise")


def products_ms(step, steps=3):
    """(whole step, matrix products) in ms per step, from torch.profiler over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - start) / steps
    products = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS) / steps
    return total * 1e3, products / 1e3


def breakdown(steps, precision, target):
    """Prints each provider's step split into aten's matrix products and the rest (profiled, so a little
    slower than the timed steps above), and the first provider's ceiling. mvmae_fast's own GEMMs (the
    float32 fused layers, csrc/cpu/mlp.cpp; the bf16 linears on AVX512-BF16, csrc/cpu/autocast.cpp)
    count as "rest"."""
    rows = {p: products_ms(step) for p, step in steps.items()}
    base, (base_total, base_products) = next(iter(rows.items()))
    for provider, (total, products) in rows.items():
        print(f"{precision:5s} {provider:24s} profiled {total:7.1f} ms = aten matrix products {products:7.1f} ms "
              f"({products / total:4.0%}) + rest {total - products:7.1f} ms")
    print(f"{precision:5s} {base}'s products are {base_products / base_total:.0%} of its step: the same products at "
          f"the same speed and nothing else would be x{base_total / max(base_products, 1e-9):.2f}; x{target:g} "
          f"leaves {base_total / target - base_products:.1f} ms (profiled) per step for everything else")


def child(provider, precision, preset, warmup, rounds):
    """One provider alone: print its median step time in seconds."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, config = build(provider, preset, device)
    step = make_step(provider, model, device, BATCH, config, precision)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(statistics.median(times))


def isolated(args, malloc):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} batch {BATCH}, each provider "
          f"alone in its own process, {args.isolated} alternating rounds of {args.rounds} steps, malloc: {malloc}")
    for precision in args.precision:
        medians = {p: [] for p in args.providers}
        for _ in range(args.isolated):
            for provider in args.providers:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", provider, precision,
                                      "--preset", args.preset, "--warmup", str(args.warmup),
                                      "--rounds", str(args.rounds),
                                      *(["--default-malloc"] if args.default_malloc else [])],
                                     check=True, capture_output=True, text=True).stdout
                medians[provider].append(float(out.split()[-1]))
        base = statistics.median(medians[args.providers[0]])
        for provider, m in medians.items():
            median = statistics.median(m)
            ratios = ", ".join(f"{base / t:.2f}" for t in m)
            print(f"{precision:5s} {provider:24s} {median * 1e3:7.1f} ms  {BATCH / median:7.1f} img/s  "
                  f"x{base / median:.3f} vs {args.providers[0]} (per round: {ratios})")


if __name__ == "__main__":
    main()
