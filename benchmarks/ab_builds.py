"""Two builds of the C++ extension, one training step each per round, in one process.

A change to the CPU kernels that is worth 1-3% of a training step is invisible to runs in separate
processes on a shared virtual CPU (its speed drifts 10-20% within a minute). This loads the
extension built in another checkout beside this checkout's, and alternates them step by step on the
same model, optimizer and batch (swapping ``mvmae_fast._ext._C``; the order alternates every
round), so both see the same drift; the reference MAE steps in the same rounds for the ratio.

    git worktree add /tmp/base HEAD~1 && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/ab_builds.py /tmp/base                         # MAE, tiny preset, fp32
    python benchmarks/ab_builds.py /tmp/base --provider mvmae --precision bf16 --preset vit_micro_patch4_32

Only the compiled extension differs: both builds run this checkout's Python, so the functions the
Python side calls must take the same arguments in both (a changed signature fails on the first step).
"""

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_step import CASES, CPU_PRESETS, CPU_PROVIDERS, build, make_step  # noqa: E402

from mvmae_fast import _ext, runtime  # noqa: E402


def load_build(checkout):
    """The extension module built in checkout (``mvmae_fast/_C*.so``), loaded under another name."""
    found = sorted(glob.glob(os.path.join(checkout, "mvmae_fast", "_C*.so")))
    if not found:
        raise SystemExit(f"no built extension under {checkout}/mvmae_fast (run: python setup.py build_ext --inplace)")
    spec = importlib.util.spec_from_file_location("mvmae_fast_base._C", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, found[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a checkout whose extension is built in place")
    parser.add_argument("--provider", default="mae",
                        choices=[p for p in CPU_PROVIDERS if not p.startswith("reference")])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--preset", default="vit_tiny_patch4_32", choices=CPU_PRESETS)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if _ext._C is None:
        raise SystemExit("this checkout's extension is not built")
    runtime.retain_freed_memory()
    builds = {"base": load_build(args.base)[0], "this": _ext._C}
    batch = CASES[args.preset]  # the step suite's batch for the preset
    device = torch.device("cpu")
    torch.manual_seed(0)
    model, config = build(args.provider, args.preset, device)
    step = make_step(args.provider, model, device, batch, config, args.precision)
    torch.manual_seed(0)
    ref_model, ref_config = build("reference", args.preset, device)
    reference = make_step("reference", ref_model, device, batch, ref_config, args.precision)
    for module in builds.values():
        _ext._C = module
        for _ in range(args.warmup):
            step()
    for _ in range(args.warmup):
        reference()
    times = {"base": [], "this": [], "reference": []}
    for r in range(args.rounds):
        for name in ("base", "this") if r % 2 == 0 else ("this", "base"):
            _ext._C = builds[name]
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference()
        times["reference"].append(time.perf_counter() - start)
    _ext._C = builds["this"]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratios = sorted(t / b for t, b in zip(times["this"], times["base"]))
    quart = len(ratios) // 4
    print(f"{args.provider} {args.precision} {args.preset} batch {batch}, {args.rounds} rounds")
    print(f"  base {med['base']:.1f} ms (x{med['reference'] / med['base']:.3f} reference), "
          f"this {med['this']:.1f} ms (x{med['reference'] / med['this']:.3f}), reference {med['reference']:.1f} ms")
    print(f"  this / base per round: median {statistics.median(ratios):.3f}, "
          f"quartiles {ratios[quart]:.3f}-{ratios[-1 - quart]:.3f}")


if __name__ == "__main__":
    main()
