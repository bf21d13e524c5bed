"""benchmarks/report.py on a real (tiny) benchmark run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_report_renders_a_real_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MVMAE_FAST_BENCH_SIZE"] = "tiny"
    out = tmp_path / "run.json"
    bench = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_step.py", "benchmarks/test_ops.py",
                            "-q", "--benchmark-only", f"--benchmark-json={out}", "-p", "no:cacheprovider"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stdout[-2000:]
    import json

    import torch
    import triton

    for case in json.loads(out.read_text())["benchmarks"]:  # every result says what it ran on
        info = case["extra_info"]
        assert (info["device"], info["torch"], info["triton"]) == ("cpu", torch.__version__, triton.__version__)
    result = subprocess.run([sys.executable, "benchmarks/report.py", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "run.md").read_text()
    assert table.startswith("Machine: cpu")
    lines = [l for l in table.splitlines() if l.startswith("| training_step")]
    providers = {l.split("|")[3].strip() for l in lines}
    assert {"reference", "mae", "mvmae"} <= providers
    for line in lines:
        cells = [c.strip() for c in line.split("|")]
        assert float(cells[5]) > 0  # images/s
    reference = [l for l in lines if l.split("|")[3].strip() == "reference"][0]
    assert reference.split("|")[6].strip() == "1.0"  # the reference's ratio to itself
    header = [c.strip() for c in table.splitlines()[2].split("|")]
    interleaved = header.index("x reference, interleaved")
    assert reference.split("|")[interleaved].strip() == ""  # not timed against itself
    for line in lines:  # every other CPU step also timed alternately with reference steps
        if line.split("|")[3].strip() != "reference":
            assert float(line.split("|")[interleaved]) > 0
    assert any(l.startswith("| gather_rows") and "GB/s" not in l for l in table.splitlines())
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_report_rejects_a_file_without_results(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text('{"benchmarks": []}')
    result = subprocess.run([sys.executable, "benchmarks/report.py", str(empty)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("report: error:")


def test_report_names_the_dtype_a_case_ran_in(tmp_path):
    """A case whose extra_info records the dtype it ran in is reported in that dtype, not its parameter's."""
    import json

    bench = {"name": "test_attention[cuda-triton-encoder_n40-forward-float32]",
             "params": {"device": "UNSERIALIZABLE[device(type='cuda')]", "provider": "triton", "shape": "encoder_n40",
                        "mode": "forward", "dtype": "float32"},
             "stats": {"median": 1.15e-4},
             "extra_info": {"device": "Some GPU", "torch": "2.11", "dtype": "torch.float16", "TFLOP/s": 12.5}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"benchmarks": [bench], "machine_info": {}}))
    result = subprocess.run([sys.executable, "benchmarks/report.py", str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    row = [l for l in (tmp_path / "gpu.md").read_text().splitlines() if l.startswith("| attention")][0]
    cells = [c.strip() for c in row.split("|")]
    assert cells[2] == "cuda: shape=encoder_n40, mode=forward, dtype=float16"
    assert cells[4] == "115.0 us" and cells[5] == "12.5"


def test_layers_providers_switch_the_cuda_autocast_layers_per_step():
    """benchmarks/test_step.py: a *_layers provider's steps run with MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1, the
    others' with 0, whatever the environment says, which is restored after each step (in a fresh process:
    test_step imports benchmarks/conftest.py, which this suite's conftest shadows)."""
    code = """
import json, os, sys
sys.path.insert(0, "benchmarks")
import torch
from test_step import LAYERS_ENV, build, make_step
os.environ[LAYERS_ENV] = "outside"
seen = {}
for provider in ("mae", "mae_layers", "mvmae_layers"):
    model, config = build(provider, "vit_micro_patch4_32", torch.device("cpu"))
    model.register_forward_pre_hook(lambda *_, p=provider: seen.setdefault(p, os.environ[LAYERS_ENV]) and None)
    make_step(provider, model, torch.device("cpu"), 2, config, "fp32")()
print(json.dumps([seen, os.environ[LAYERS_ENV]]))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen, after = json.loads(result.stdout.splitlines()[-1])
    assert seen == {"mae": "0", "mae_layers": "1", "mvmae_layers": "1"} and after == "outside"
