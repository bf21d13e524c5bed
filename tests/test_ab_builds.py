"""benchmarks/ab_builds.py: two builds of the extension alternated in one process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mvmae_fast import _ext

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the built extension")


def run_tool(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "benchmarks/ab_builds.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_load_build_gives_a_second_module_with_the_same_kernels():
    """In a fresh process (benchmarks/ has its own conftest module)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from ab_builds import load_build; "
            "from mvmae_fast import _ext; module, path = load_build('.'); "
            "assert module is not _ext._C and module.__name__ == 'mvmae_fast_base._C'; "
            "assert Path(path).resolve() == Path(_ext._C.__file__).resolve(); "
            "assert module.fused_layers_isa() == _ext._C.fused_layers_isa(); print('ok', module.fused_layers_isa())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok "), result.stderr[-2000:]


def test_alternates_both_builds_and_reports_ratios():
    """This checkout against itself: both builds step, and the ratios printed agree with the times."""
    result = run_tool(str(ROOT), "--preset", "vit_micro_patch4_32", "--rounds", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    m = re.search(r"base ([\d.]+) ms \(x([\d.]+) reference\), this ([\d.]+) ms \(x([\d.]+)\), reference ([\d.]+) ms",
                  result.stdout)
    assert m, result.stdout
    base, base_x, this, this_x, reference = map(float, m.groups())
    assert min(base, this, reference) > 0
    assert base_x == pytest.approx(reference / base, rel=5e-3) and this_x == pytest.approx(reference / this, rel=5e-3)
    assert re.search(r"this / base per round: median [\d.]+, quartiles [\d.]+-[\d.]+", result.stdout)


def test_refuses_a_checkout_without_a_build(tmp_path):
    result = run_tool(str(tmp_path))
    assert result.returncode != 0 and "no built extension" in result.stderr
