"""benchmarks/report.py on a real (tiny) benchmark run."""

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
    assert any(l.startswith("| gather_rows") and "GB/s" not in l for l in table.splitlines())
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_report_rejects_a_file_without_results(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text('{"benchmarks": []}')
    result = subprocess.run([sys.executable, "benchmarks/report.py", str(empty)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("report: error:")
