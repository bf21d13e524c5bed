#!/usr/bin/env python
"""Pretrain MAE and MV-MAE with the same budget (epochs, batch, model, data) and seed, then print
both linear-probe and k-NN top-1 side by side.

    python train/compare.py                       # default dataset, micro preset, 30 epochs each
    python train/compare.py --epochs 100 --model tiny_patch4_32 --output-dir runs/compare

Any other flag is passed to both runs of train/pretrain.py.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join("runs", "compare"))
    args, passthrough = parser.parse_known_args(argv)
    results = {}
    for method in ("mae", "mvmae"):
        out = os.path.join(args.output_dir, method)
        cmd = [sys.executable, os.path.join(HERE, "pretrain.py"), "--method", method, "--output-dir", out,
               "--quiet", *passthrough]
        print(f"== {method}: {' '.join(cmd[1:])}", flush=True)
        code = subprocess.run(cmd).returncode
        if code != 0:
            print(f"compare: error: the {method} run failed (exit {code})", file=sys.stderr)
            return code
        with open(os.path.join(out, "results.json")) as f:
            results[method] = json.load(f)
    if "linprobe_top1" not in results["mae"]:
        print("compare: error: no linear-probe result (was --probe-epochs 0?)", file=sys.stderr)
        return 2
    print(f"\n{'method':<8} {'linear probe top-1':>20} {'k-NN top-1':>12}")
    for method, r in results.items():
        print(f"{method:<8} {r['linprobe_top1']:>19.2f}% {r['knn_top1']:>11.2f}%")
    print(json.dumps({m: {k: r[k] for k in ('linprobe_top1', 'knn_top1')} for m, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
