"""The training entrypoint: recipe pieces, artifacts, kill/resume exactness, signals, non-finite
losses, bad input, and data parallelism with 2 CPU processes."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvmae_fast import training
from mvmae_fast.models import create_model

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "train" / "pretrain.py"
QUICK = ["--batch-size", "16", "--probe-epochs", "0", "--log-every", "1", "--quiet"]


def load_pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_script", PRETRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env():
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e["OMP_NUM_THREADS"] = "1"  # the same arithmetic in every process, whatever else runs
    return e


def run(args, **kw):
    return subprocess.run([sys.executable, str(PRETRAIN), *args], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=600, **kw)


def losses(run_dir):
    """step -> loss, the last record of each step winning (a resumed run re-logs steps)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "epoch_end" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_learning_rate_schedule():
    lr, warm, epochs = 1.0, 2, 10
    assert training.learning_rate(0.0, lr, 0.0, warm, epochs) == 0.0
    assert training.learning_rate(1.0, lr, 0.0, warm, epochs) == pytest.approx(0.5)
    assert training.learning_rate(2.0, lr, 0.1, warm, epochs) == pytest.approx(1.0)
    assert training.learning_rate(6.0, lr, 0.1, warm, epochs) == pytest.approx(0.1 + 0.9 * 0.5)
    assert training.learning_rate(10.0, lr, 0.1, warm, epochs) == pytest.approx(0.1)


def test_param_groups_skip_decay_on_biases_norms_and_frozen():
    model = create_model("mvmae_vit_micro_patch4_32")
    decay, no_decay = training.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "cls_token" in decayed
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.bias", "projector.net.1.weight"} <= plain
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


def test_flop_count_matches_hand_count():
    model = create_model("mae_vit_base_patch16")
    # ViT-B/16, 75% mask, decoder 512/8: ~9.8 GMAC forward (PERFORMANCE.md) -> ~58.7 GFLOP per image.
    assert training.training_flops_per_image(model.config) / 1e9 == pytest.approx(58.7, rel=0.03)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    training.save_checkpoint(path, value=1)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        training.save_checkpoint(path, value=2)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_run_leaves_all_artifacts(tmp_path):
    out = tmp_path / "run"
    result = run(["--epochs", "2", "--max-batches-per-epoch", "4", "--batch-size", "16", "--probe-epochs", "3",
                  "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr
    assert "linear probe top-1" in result.stdout
    assert {"checkpoint-last.pt", "metrics.jsonl", "reconstructions.png", "results.json"} <= {
        p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["linprobe_top1"] <= 100 and 0 <= results["knn_top1"] <= 100
    assert sorted(losses(out)) == list(range(1, 9))
    ckpt = torch.load(out / "checkpoint-last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8 and {"model", "optimizer", "scaler", "rng", "config"} <= set(ckpt)
    from PIL import Image

    assert Image.open(out / "reconstructions.png").size[0] > 32 * 6


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    args = QUICK + ["--epochs", "2", "--max-batches-per-epoch", "30", "--save-every-steps", "3", "--seed", "7"]
    reference = tmp_path / "reference"
    assert run(args + ["--output-dir", str(reference)]).returncode == 0
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 61))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), *args, "--output-dir", str(killed)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(losses(killed)) >= 8 if metrics.exists() else False:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = max(losses(killed))
    assert 8 <= steps_before < 30, "the kill should land mid-epoch"
    ckpt = torch.load(killed / "checkpoint-last.pt", weights_only=False)
    assert ckpt["step"] % 3 == 0 and ckpt["epoch"] == 0 and ckpt["next_batch"] == ckpt["step"]

    resumed = run(args + ["--output-dir", str(killed), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    got = losses(killed)
    assert sorted(got) == list(range(1, 61))
    for step in range(ckpt["step"] + 1, 61):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = QUICK + ["--epochs", "1", "--max-batches-per-epoch", "40", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), *args], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saved" in stdout
    ckpt = torch.load(out / "checkpoint-last.pt", weights_only=False)
    assert ckpt["step"] == max(losses(out)) and ckpt["epoch"] == 0
    assert run(args + ["--resume", "auto"]).returncode == 0
    assert sorted(losses(out)) == list(range(1, 41))


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    pretrain = load_pretrain()
    original = pretrain.MVMAE.forward
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        out = original(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] in (2, 3) or calls["n"] >= 6:
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(pretrain.MVMAE, "forward", flaky)
    code = pretrain.main(QUICK + ["--epochs", "1", "--max-batches-per-epoch", "20", "--max-nonfinite", "3",
                                  "--output-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().startswith("pretrain: error: stopping: 3 non-finite losses in a row")
    assert captured.out.count("non-finite loss") == 5
    recorded = losses(tmp_path)
    assert math.isfinite(recorded[1]) and math.isfinite(recorded[4]) and math.isfinite(recorded[5])


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "output", "config", "model"])
def test_bad_input_is_one_line_error(tmp_path, case):
    args = QUICK + ["--epochs", "1", "--output-dir", str(tmp_path / "out")]
    if case == "missing":
        args += ["--data", str(tmp_path / "nope")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args += ["--data", str(tmp_path / "empty")]
    elif case == "unreadable":
        (tmp_path / "bad" / "cls").mkdir(parents=True)
        for i in range(3):
            (tmp_path / "bad" / "cls" / f"{i}.png").write_bytes(os.urandom(100))
        args += ["--data", str(tmp_path / "bad")]
    elif case == "output":
        (tmp_path / "file").write_text("x")
        args[-1] = str(tmp_path / "file" / "out")
    elif case == "config":
        first = QUICK + ["--epochs", "1", "--max-batches-per-epoch", "1", "--output-dir", str(tmp_path / "first")]
        assert run(first).returncode == 0
        args += ["--resume", str(tmp_path / "first" / "checkpoint-last.pt"), "--mask-ratio", "0.5"]
    elif case == "model":
        args += ["--model", "gigantic"]
    result = run(args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert len(lines) == 1 and lines[0].startswith("pretrain: error:"), result.stderr
    if case == "config":
        assert "mask_ratio: 0.8 -> 0.5" in lines[0]


def test_data_parallel_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(PRETRAIN), *QUICK, "--epochs", "1", "--max-batches-per-epoch", "4", "--output-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu x 2" in result.stdout
    recorded = losses(out)
    assert sorted(recorded) == [1, 2, 3, 4] and all(math.isfinite(v) for v in recorded.values())
    ckpt = torch.load(out / "checkpoint-last.pt", weights_only=False)
    assert ckpt["step"] == 4


def test_compare_prints_both_methods(tmp_path):
    cmd = [sys.executable, str(ROOT / "train" / "compare.py"), "--output-dir", str(tmp_path), "--epochs", "1",
           "--max-batches-per-epoch", "3", "--batch-size", "16", "--probe-epochs", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(table) == {"mae", "mvmae"} and all(0 <= v["linprobe_top1"] <= 100 for v in table.values())
