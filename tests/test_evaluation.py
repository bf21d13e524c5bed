"""Tests for mvmae_fast.evaluation (linear probe, k-NN, feature extraction, checkpoints) and the
train/linprobe.py CLI. All CPU, a few seconds in total."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mvmae_fast.evaluation import (
    LARS,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    load_pretrained,
)
from mvmae_fast.models import MVMAE, create_model

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train" / "linprobe.py"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def clusters(n, num_classes=5, dim=32, seed=0, spread=1.0, offset=10.0):
    """Gaussian blobs around well-separated random centres (linearly separable in practice).

    The offset moves every feature far from zero, so the probe's BatchNorm has real work to do.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3.0
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centres[y] + spread * torch.randn(n, dim, generator=g) + offset
    return x, y


def knn_reference(train_x, train_y, test_x, k, temperature):
    """Brute-force weighted k-NN, one test row at a time in float64 with python-level voting."""
    train = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    test = test_x.double() / test_x.double().norm(dim=1, keepdim=True)
    num_classes = int(train_y.max()) + 1
    preds = []
    for row in test:
        sims = [(float(row @ train[j]), j) for j in range(train.shape[0])]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


def tiny_model(**overrides):
    """An untrained micro MV-MAE, shrunk further so a whole digits pass takes about a second."""
    torch.manual_seed(0)
    kwargs = dict(proj_hidden=64)
    kwargs.update(overrides)
    return create_model("mvmae_vit_micro_patch4_32", **kwargs)


def save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), "args": {}}, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = tiny_model(img_size=16, embed_dim=32, depth=1, num_heads=2, dec_dim=32, dec_depth=1, dec_heads=2)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="module")
def linprobe_cli():
    spec = importlib.util.spec_from_file_location("linprobe_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- #
# linear probe
# --------------------------------------------------------------------------- #


# LARS scales each weight update to 0.001 * ||w||, so it needs a far larger lr than SGD: 6.4 is
# MAE's (0.1 * 16384 / 256).
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("lars", 6.4)])
def test_linear_probe_separable_clusters(optimizer, lr):
    train_x, train_y = clusters(1000, seed=0)
    test_x, test_y = clusters(500, seed=1)
    out = linear_probe(train_x, train_y, test_x, test_y, epochs=30, lr=lr, optimizer=optimizer)
    assert set(out) >= {"top1", "train_top1", "epochs"}
    assert out["epochs"] == 30
    assert out["top1"] > 95.0, out
    assert out["train_top1"] > 95.0, out


def test_linear_probe_random_labels_is_chance():
    train_x, _ = clusters(1000, seed=0)
    test_x, _ = clusters(500, seed=1)
    g = torch.Generator().manual_seed(7)
    train_y = torch.randint(0, 5, (1000,), generator=g)
    test_y = torch.randint(0, 5, (500,), generator=g)
    out = linear_probe(train_x, train_y, test_x, test_y, epochs=30)
    # Chance is 20%; the binomial std over 500 rows is ~1.8%.
    assert 10.0 < out["top1"] < 30.0, out


def test_linear_probe_deterministic_and_seeded():
    train_x, _ = clusters(300, seed=0)
    test_x, test_y = clusters(100, seed=1)
    train_y = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(3))
    rng_before = torch.get_rng_state()
    a = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=64, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "the probe must not consume the global RNG"
    b = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=64, seed=0)
    c = linear_probe(train_x, train_y, test_x, test_y, epochs=5, batch_size=64, seed=1)
    assert a == b
    assert a["loss"] != c["loss"]


def test_linear_probe_accepts_numpy_and_small_sets():
    train_x, train_y = clusters(40, seed=0)
    test_x, test_y = clusters(10, seed=1)
    # batch_size larger than the set: one full batch per epoch.
    out = linear_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), epochs=3)
    assert 0.0 <= out["top1"] <= 100.0
    # A single test row: evaluation must use the BatchNorm's running statistics (eval mode),
    # not the statistics of the evaluated batch.
    out = linear_probe(train_x, train_y, test_x[:1], test_y[:1], epochs=20)
    assert out["top1"] == 100.0


def test_linear_probe_progress_callback():
    train_x, train_y = clusters(100, seed=0)
    seen = []
    linear_probe(train_x, train_y, train_x, train_y, epochs=4, batch_size=32,
                 progress=lambda epoch, loss: seen.append((epoch, loss)))
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in seen)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(train_y=torch.zeros(9, dtype=torch.long)), "train_y"),
        (dict(test_x=torch.zeros(0, 8)), "test_x"),
        (dict(train_x=torch.zeros(10, 8, 2)), "train_x"),
        (dict(test_x=torch.zeros(5, 7)), "test_x"),
        (dict(train_y=torch.full((10,), -1)), "train_y"),
        (dict(test_y=torch.full((5,), 0.5)), "test_y"),
        (dict(train_x=torch.full((10, 8), float("nan"))), "train_x"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=1), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(warmup_epochs=5), "warmup_epochs"),
    ],
)
def test_linear_probe_validation(kwargs, name):
    args = dict(train_x=torch.randn(10, 8), train_y=torch.zeros(10, dtype=torch.long),
                test_x=torch.randn(5, 8), test_y=torch.zeros(5, dtype=torch.long), epochs=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        linear_probe(**args)


def test_lars_matches_mae_update_rule():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.5, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.0, 2.0]])  # ||g|| = 2
    b.grad = torch.tensor([0.2, 0.4])
    opt.step()
    # 2-D: scaled by trust * ||w|| / ||g|| = 0.025; 1-D: the plain gradient (no trust ratio).
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.5 * 0.025 * 2.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.5 * 0.2, -1.0 - 0.5 * 0.4]))
    # Second step: the momentum buffer (first update) decays by 0.9 and adds the new update.
    w_before = w.detach().clone()
    trust = 0.01 * w_before.norm() / 2.0
    opt.step()
    torch.testing.assert_close(w.detach(), w_before - 0.5 * (0.9 * torch.tensor([[0.0, 0.05]])
                                                               + trust * torch.tensor([[0.0, 2.0]])))


# --------------------------------------------------------------------------- #
# k-NN
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (200, 0.07)])
def test_knn_matches_brute_force(k, temperature):
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(60, 16, generator=g), torch.randn(25, 16, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    test_y = torch.randint(0, 4, (25,), generator=g)
    expected = knn_reference(train_x, train_y, test_x, k, temperature)  # k=200 > 60: all neighbours
    # A chunk size that does not divide the test set exercises the chunking.
    preds = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, chunk_size=7)
    assert preds.dtype == torch.int64
    assert torch.equal(preds, expected)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature)
    assert acc == pytest.approx(100.0 * (expected == test_y).float().mean().item())


def test_knn_self_match_is_perfect():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randint(0, 7, (50,), generator=g)
    assert knn_accuracy(x, y, x, y, k=1) == 100.0


def test_knn_separable_and_chunk_invariant():
    train_x, train_y = clusters(400, seed=0, offset=0.0)
    test_x, test_y = clusters(100, seed=1, offset=0.0)
    assert knn_accuracy(train_x, train_y, test_x, test_y) > 95.0
    assert torch.equal(knn_predict(train_x, train_y, test_x, chunk_size=1),
                       knn_predict(train_x, train_y, test_x))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(k=0), "k"),
        (dict(temperature=0.0), "temperature"),
        (dict(train_y=torch.zeros(3, dtype=torch.long)), "train_y"),
        (dict(test_y=torch.zeros(3, dtype=torch.long)), "test_y"),
        (dict(train_x=torch.zeros(0, 4), train_y=torch.zeros(0, dtype=torch.long)), "train_x"),
        (dict(test_x=torch.zeros(6, 5)), "test_x"),
    ],
)
def test_knn_validation(kwargs, name):
    args = dict(train_x=torch.randn(10, 4), train_y=torch.zeros(10, dtype=torch.long),
                test_x=torch.randn(6, 4), test_y=torch.zeros(6, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        knn_accuracy(**args)


# --------------------------------------------------------------------------- #
# feature extraction and checkpoints
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("pool", [None, "cls", "mean"])
def test_extract_features_matches_pooled_features(pool):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(13, 3, 32, 32, generator=g), torch.arange(13) % 4
    loader = DataLoader(TensorDataset(images, labels), batch_size=5, shuffle=False)

    model.train()
    feats, ys = extract_features(model, loader, pool=pool)
    assert model.training, "extract_features must restore train mode"
    assert feats.shape == (13, model.config.embed_dim) and feats.dtype == torch.float32
    assert ys.dtype == torch.int64 and torch.equal(ys, labels)

    model.eval()
    with torch.no_grad():
        expected = torch.cat([model.pooled_features(x, pool=pool) for x, _ in loader])
    assert torch.equal(feats, expected)
    extract_features(model, loader, pool=pool)
    assert not model.training, "extract_features must leave an eval-mode model in eval mode"


def test_extract_features_validation():
    model = tiny_model()
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, empty)
    with pytest.raises(ValueError, match="pool"):
        extract_features(model, empty, pool="max")


def test_load_pretrained_round_trip(tmp_path):
    model = tiny_model()
    path = save_checkpoint(model, tmp_path / "ckpt.pth")
    loaded = load_pretrained(path)
    assert isinstance(loaded, MVMAE) and not loaded.training
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A DDP-wrapped state dict loads too.
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": wrapped, "config": dataclasses.asdict(model.config)}, tmp_path / "ddp.pth")
    assert torch.equal(load_pretrained(tmp_path / "ddp.pth").cls_token, model.cls_token)


def test_load_pretrained_errors(tmp_path):
    model = tiny_model()
    cfg = dataclasses.asdict(model.config)
    (tmp_path / "garbage.pth").write_bytes(b"definitely not a checkpoint")
    torch.save({"model": model.state_dict()}, tmp_path / "noconfig.pth")
    torch.save({"model": model.state_dict(), "config": {**cfg, "embed_dim": 64, "num_heads": 2}},
               tmp_path / "mismatch.pth")
    torch.save({"model": model.state_dict(), "config": {**cfg, "bogus": 1}}, tmp_path / "unknown.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases = {
        tmp_path / "missing.pth": "does not exist",
        tmp_path: "not a file",
        tmp_path / "garbage.pth": "not a readable PyTorch checkpoint",
        tmp_path / "noconfig.pth": "'config'",
        tmp_path / "mismatch.pth": "do not match",
        tmp_path / "unknown.pth": "unknown fields bogus",
        tmp_path / "list.pth": "expected a dict",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            load_pretrained(path)
        assert "\n" not in str(info.value), str(info.value)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def test_cli_in_process(tiny_checkpoint, linprobe_cli, capsys):
    rc = linprobe_cli.main(["--checkpoint", str(tiny_checkpoint), "--epochs", "2", "--knn-k", "5"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = out.out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"linprobe_top1", "knn_top1"}
    assert all(0.0 <= v <= 100.0 for v in result.values())
    assert any(line.startswith("linear probe top-1:") for line in lines)
    assert any(line.startswith("k-NN top-1:") for line in lines)


def test_cli_script_end_to_end(tiny_checkpoint):
    # As a user runs it: a separate process, from the repository root, train/ not a package.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.relative_to(REPO)), "--checkpoint", str(tiny_checkpoint),
         "--epochs", "2", "--pool", "cls", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout  # --quiet: the two result lines and the JSON line
    assert set(json.loads(lines[-1])) == {"linprobe_top1", "knn_top1"}


def _assert_one_line_error(rc, err, fragment):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("linprobe: error: ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--checkpoint", "{tmp}/missing.pth"], "does not exist"),
        (["--checkpoint", "{tmp}/garbage.pth"], "not a readable PyTorch checkpoint"),
        (["--checkpoint", "{ckpt}", "--data", "{tmp}/no_such_dir"], "unknown dataset"),
        (["--checkpoint", "{ckpt}", "--epochs", "0"], "--epochs"),
        (["--epochs", "2"], "--checkpoint"),
    ],
)
def test_cli_user_errors(argv, fragment, tmp_path, tiny_checkpoint, linprobe_cli, capsys):
    (tmp_path / "garbage.pth").write_bytes(os.urandom(64))
    argv = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint) for a in argv]
    rc = linprobe_cli.main(argv)
    out = capsys.readouterr()
    _assert_one_line_error(rc, out.err, fragment)


def test_cli_wrong_config_is_a_user_error(tmp_path, linprobe_cli, capsys):
    # A 1-channel model cannot take the RGB digits images.
    model = tiny_model(img_size=16, embed_dim=32, depth=1, num_heads=2, dec_dim=32, dec_depth=1, dec_heads=2,
                       in_chans=1)
    path = save_checkpoint(model, tmp_path / "grey.pth")
    rc = linprobe_cli.main(["--checkpoint", str(path), "--epochs", "1", "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err, "in_chans=1")


def test_cli_script_error_has_no_traceback(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(garbage)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    _assert_one_line_error(proc.returncode, proc.stderr, "not a readable PyTorch checkpoint")
