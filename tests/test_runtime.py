"""mvmae_fast.runtime.retain_freed_memory: measured by page faults in a fresh process (it changes
process-wide malloc settings, so never in the test process itself)."""

import platform
import subprocess
import sys

import pytest

import mvmae_fast.runtime as runtime

# A fresh process does what a training step does to the heap, 20 times: allocates and writes 40
# blocks of 2 MiB (activations), then frees them all (the backward). It prints the minor page faults
# of the last 10 cycles.
_CHILD = """
import resource, sys, torch
import mvmae_fast.runtime as runtime
kwargs = {} if sys.argv[1] == "retain" else {"trim_threshold": 128 << 10, "mmap_threshold": 128 << 10}
print("applied", runtime.retain_freed_memory(**kwargs))
def cycle():
    blocks = [torch.empty(1 << 19) for _ in range(40)]  # 40 x 2 MiB
    for b in blocks:
        b.fill_(1.0)
for _ in range(10):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True, capture_output=True, text=True).stdout
    return int(out.split("faults")[-1]), out


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_retained_memory_is_not_faulted_in_again():
    # The control sets glibc's static defaults (128 KiB thresholds) through the same function: glibc's
    # own default adapts both thresholds to the sizes freed so far, so whether it trims this pattern
    # depends on the process's history; the static defaults always do.
    default, out = _faults("default")
    assert "applied True" in out
    retained, out = _faults("retain")
    assert "applied True" in out
    pages = 10 * 40 * (2 << 20) // 4096
    # With the defaults the freed blocks go back to the kernel and each cycle faults them in again,
    # one fault per page; retained, every cycle reuses the same heap memory.
    assert default > pages // 2, (default, retained)
    assert retained < pages // 20, (default, retained)


def test_bad_arguments_are_refused(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    with pytest.raises(ValueError, match="mmap_threshold"):
        runtime.retain_freed_memory(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match="trim_threshold"):
        runtime.retain_freed_memory(trim_threshold=0)
    assert runtime._applied is None  # nothing applied by a refused call
