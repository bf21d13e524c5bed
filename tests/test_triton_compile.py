"""Every Triton kernel of the package compiles for the GPU, here on a CPU (tests/triton_aot.py).

The other tests run the kernels under Triton's interpreter, which accepts code that compiled Triton
refuses (a plain Python global read in a kernel, for one, which a lent H100 found first). So each
kernel is compiled ahead of time for sm_90 (the autocast layers' also for sm_80) with Triton's own
ptxas, no GPU needed, in a fresh process without TRITON_INTERPRET, at the tile sizes its launcher
picks. Where Triton ships cuobjdump, the cubins' resource use is checked too: no register spills in
the kernels with fixed launch configurations (the attention kernels are autotuned over tiles, some of
which spill in float32: the autotuner times them and picks), and at most 128 registers a thread in
the LayerNorm backward and column sums (two or more programs per SM: at 240-255 registers, one).
"""

import functools
import os
import re
import subprocess
import sys

import pytest

import triton_aot

RUNS = [("autocast", act, (80, 90)) for act in ("bf16", "fp16")] + [
    (group, dtype, (90,)) for group in ("attention", "ops") for dtype in ("fp32", "fp16", "bf16")]
MAX_REGISTERS = {"_layer_norm_backward_kernel": 128, "_colsum_kernel": 128}


@functools.lru_cache(maxsize=None)
def compile_group(group, dtype, archs):
    """[(arch, kernel name, registers or None, spill bytes or None)] of one triton_aot.py run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns without it; the launch default
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    result = subprocess.run([sys.executable, script, group, dtype, *map(str, archs)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = re.findall(r"^ok (\d+) (\w+) regs=(\d+|\?) spill=(\d+|\?)$", result.stdout, re.MULTILINE)
    return [(int(arch), name, _count(regs), _count(spill)) for arch, name, regs, spill in lines]


def _count(text):
    return None if text == "?" else int(text)


@pytest.mark.parametrize("group,dtype,archs", RUNS, ids=[f"{g}-{d}" for g, d, _ in RUNS])
def test_kernels_compile_for_the_gpu(group, dtype, archs):
    compiled = compile_group(group, dtype, archs)
    expected = len(list(triton_aot.GROUPS[group](dtype))) * len(archs)
    assert len(compiled) == expected, compiled


@pytest.mark.parametrize("group,dtype,archs", [r for r in RUNS if r[0] != "attention"],
                         ids=[f"{g}-{d}" for g, d, _ in RUNS if g != "attention"])
def test_fixed_launches_keep_to_the_registers(group, dtype, archs):
    compiled = compile_group(group, dtype, archs)
    if any(regs is None for _, _, regs, _ in compiled):
        pytest.skip("this Triton ships no cuobjdump: resource use unknown")
    spilled = [c for c in compiled if c[3]]
    assert not spilled, f"register spills (arch, kernel, registers, bytes): {spilled}"
    over = [c for c in compiled if c[2] > MAX_REGISTERS.get(c[1], 255)]
    assert not over, f"over the register budget {MAX_REGISTERS}: {over}"
