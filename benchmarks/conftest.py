"""Shared fixtures for the benchmark suite (pytest-benchmark).

Sizes: MVMAE_FAST_BENCH_SIZE=tiny (CI: every case once, tiny shapes) or unset (real shapes: MAE
ViT-B on CUDA, CPU-sized otherwise). Cases for CUDA run only where a GPU is present.

The process keeps freed memory between steps (mvmae_fast.runtime.retain_freed_memory, as
train/pretrain.py does by default), for every provider alike; MVMAE_FAST_BENCH_MALLOC=default keeps
glibc's defaults instead. Each result records which in extra_info["malloc"].
"""

import os

import pytest
import torch

from mvmae_fast import runtime

SIZE = os.environ.get("MVMAE_FAST_BENCH_SIZE", "full")
MALLOC = "default"  # set by pytest_configure (importing this module changes nothing)
# images/s of the reference provider per (device type, case), so later providers in the same run
# can record their ratio to it.
RESULTS = {}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def versions():
    """torch's and (where installed) Triton's versions, for each result's extra_info."""
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def pytest_configure(config):
    global MALLOC
    if os.environ.get("MVMAE_FAST_BENCH_MALLOC", "retain") != "default" and runtime.retain_freed_memory():
        MALLOC = "retain_freed_memory"


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"mvmae_fast benchmarks: size={SIZE}, torch {torch.__version__}, GPU: {gpu}, malloc: {MALLOC}"


def pytest_generate_tests(metafunc):
    """Parametrize ``device`` x ``provider`` over what can run here: the module's REFERENCE_PROVIDERS
    (plain-PyTorch baselines) and every mvmae_fast backend available on the device, out of the
    module's IMPLEMENTED (default: all three)."""
    if "device" not in metafunc.fixturenames:
        return
    if "provider" not in metafunc.fixturenames:
        metafunc.parametrize("device", [torch.device(d) for d in DEVICES], ids=DEVICES)
        return
    from mvmae_fast import available_backends

    baselines = getattr(metafunc.module, "REFERENCE_PROVIDERS", ("reference",))
    implemented = getattr(metafunc.module, "IMPLEMENTED", ("torch", "cpp", "triton"))
    cases = [(torch.device(d), p) for d in DEVICES for p in (*baselines, *available_backends(d, implemented))]
    metafunc.parametrize("device,provider", cases, ids=[f"{d}-{p}" for d, p in cases])


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, bytes_moved=None)``: benchmark ``fn`` (synchronising CUDA), record GB/s and device."""

    def run(fn, bytes_moved=None):
        if device.type == "cuda":
            def call():
                out = fn()
                torch.cuda.synchronize()
                return out
        else:
            call = fn
        result = benchmark(call)
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        benchmark.extra_info.update(versions())
        benchmark.extra_info["malloc"] = MALLOC
        stats = getattr(benchmark, "stats", None)
        if bytes_moved is not None and stats is not None:
            benchmark.extra_info["GB/s"] = round(bytes_moved / stats.stats.median / 1e9, 2)
        return result

    return run
