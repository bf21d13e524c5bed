"""Linear-probe and k-NN evaluation of a pretraining checkpoint on frozen features.

    python train/linprobe.py --checkpoint out/checkpoint.pth --data digits

Loads the checkpoint, extracts pooled encoder features of the train and test splits once, trains
MAE's linear probe on them and runs DINO's weighted k-NN. Prints one line per result, then a JSON
line ``{"linprobe_top1": ..., "knn_top1": ...}``. A user error (missing or unreadable checkpoint,
bad data path, a config the data does not fit, a bad flag) prints one ``linprobe: error: ...``
line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import mvmae_fast  # noqa: F401
except ImportError:
    # Running from a source checkout without `pip install -e .`: the script's own directory
    # (train/) is on sys.path, the repository root is not.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from mvmae_fast.data import EvalTransform, build_dataset, build_loader
from mvmae_fast.evaluation import extract_features, knn_accuracy, linear_probe, load_pretrained

PROG = "linprobe"
# Built-in datasets are generated at the model's input size, so cropping would only drop pixels;
# ImageFolder images get the usual resize-then-center-crop.
BUILTIN_DATASETS = ("digits", "shapes")


class UsageError(Exception):
    """A bad command line, reported like every other user error (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the usage block and exit; raise instead so main() reports every
        # user error the same way and tests can call main() in-process.
        raise UsageError(f"{message} (see --help)")


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Linear probe and k-NN accuracy of a (MV-)MAE checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by the pretraining script")
    p.add_argument("--data", default="digits",
                   help="'digits' (default), 'shapes', or an ImageFolder directory with train/ and val/ or test/")
    p.add_argument("--pool", choices=("cls", "mean"), default=None,
                   help="feature pooling (default: the checkpoint's config)")
    p.add_argument("--epochs", type=_int_at_least(1), default=90, help="linear-probe epochs (default 90)")
    p.add_argument("--batch-size", type=_int_at_least(2), default=256, help="linear-probe batch size")
    p.add_argument("--lr", type=_positive_float, default=0.1,
                   help="peak linear-probe learning rate (default 0.1; LARS usually wants a larger one, "
                        "MAE uses 0.1 * batch_size / 256 with batches of 16384)")
    p.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd")
    p.add_argument("--knn-k", type=_int_at_least(1), default=20, help="neighbours for k-NN (default 20)")
    p.add_argument("--knn-temperature", type=_positive_float, default=0.07)
    p.add_argument("--crop-pct", type=_positive_float, default=None,
                   help="eval center-crop fraction (default: 1.0 for built-in datasets, 0.875 for folders)")
    p.add_argument("--eval-batch-size", type=_int_at_least(1), default=256, help="feature-extraction batch size")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--num-workers", type=_int_at_least(0), default=0)
    p.add_argument("--quiet", action="store_true", help="print only the results")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    return torch.device(name)


def run(args) -> dict:
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    device = _resolve_device(args.device)

    model = load_pretrained(args.checkpoint).to(device)
    cfg = model.config
    pool = args.pool or cfg.pool
    log(f"checkpoint {args.checkpoint}: embed_dim={cfg.embed_dim} depth={cfg.depth} img_size={cfg.img_size} "
        f"pool={pool} device={device}")

    if args.crop_pct is not None and args.crop_pct > 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    crop_pct = args.crop_pct or (1.0 if args.data in BUILTIN_DATASETS else 0.875)
    transform = EvalTransform(cfg.img_size, crop_pct=crop_pct)

    features = {}
    start = time.perf_counter()
    for split in ("train", "test"):
        dataset = build_dataset(args.data, transform, split, size=cfg.img_size)
        loader = build_loader(dataset, args.eval_batch_size, shuffle=False, num_workers=args.num_workers,
                              seed=args.seed, drop_last=False, device=device)
        features[split] = extract_features(model, loader, pool=pool, device=device)
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    log(f"features: train {tuple(train_x.shape)}, test {tuple(test_x.shape)} "
        f"({time.perf_counter() - start:.1f} s)")

    # The probe and k-NN run on the features' device: move them once (they are small).
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    every = max(1, args.epochs // 10)

    def progress(epoch, loss):
        if epoch % every == 0 or epoch == args.epochs:
            log(f"  epoch {epoch}/{args.epochs}  loss {loss:.4f}")

    probe = linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, optimizer=args.optimizer, seed=args.seed, progress=progress)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=args.knn_k, temperature=args.knn_temperature)

    print(f"linear probe top-1: {probe['top1']:.2f}% (train {probe['train_top1']:.2f}%, {args.optimizer}, "
          f"{probe['epochs']} epochs)")
    print(f"k-NN top-1: {knn:.2f}% (k={args.knn_k}, T={args.knn_temperature})")
    result = {"linprobe_top1": round(probe["top1"], 4), "knn_top1": round(knn, 4)}
    print(json.dumps(result), flush=True)
    return result


def _fail(exc: BaseException) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    """Run the evaluation; returns the exit status (0, or 2 after a one-line error on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(exc)
    try:
        run(args)
    # The library reports bad inputs as ValueError; OSError covers unreadable files and folders.
    except (ValueError, OSError) as exc:
        return _fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
