"""Evaluating a pretrained encoder on frozen features: linear probe, k-NN, checkpoint loading.

* :func:`extract_features` runs the encoder once over a loader; both probes then work on the
  cached (N, D) features, so neither touches the ViT again.
* :func:`linear_probe` is MAE's linear-probing protocol (``main_linprobe.py``): a BatchNorm without
  affine parameters followed by a linear layer, SGD or LARS, no weight decay, cosine schedule
  with warmup.
* :func:`knn_accuracy` is the weighted k-NN classifier of DINO's ``eval_knn.py``.
* :func:`load_pretrained` rebuilds a model from a pretraining checkpoint.

Argument errors are raised as ``ValueError`` naming the argument, so a CLI can report them in one
line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LARS",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "load_pretrained",
]

POOLS = (None, "cls", "mean")
OPTIMIZERS = ("sgd", "lars")

# k-NN similarity matrices are built for a chunk of test rows at a time; this many float32
# elements per chunk (128 MiB) keeps memory bounded whatever the size of the train set.
_KNN_CHUNK_ELEMENTS = 2**25


# --------------------------------------------------------------------------- #
# argument checks
# --------------------------------------------------------------------------- #


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _as_features(x, name: str) -> torch.Tensor:
    """A float32 (N, D) tensor with N, D >= 1 and finite values (tensor or array-like input)."""
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 2-D tensor or array of features, got {type(x).__name__}") from None
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no feature dimensions")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must be real-valued, got {t.dtype}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


def _as_labels(y, name: str, n: int, x_name: str) -> torch.Tensor:
    """An int64 (N,) tensor of class indices >= 0, with N equal to the features' row count."""
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 1-D tensor or array of labels, got {type(y).__name__}") from None
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} labels but {x_name} has {n} rows")
    if t.is_floating_point():
        # Float labels that are whole numbers (e.g. read from a CSV) are accepted; 1.5 is not.
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer class indices")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got {t.dtype}")
    t = t.long()
    if bool((t < 0).any()):
        raise ValueError(f"{name} must hold class indices >= 0, got {int(t.min())}")
    return t


def _check_pair(x_name, x, y_name, y):
    xt = _as_features(x, x_name)
    return xt, _as_labels(y, y_name, xt.shape[0], x_name).to(xt.device)


def _check_dims(train_x: torch.Tensor, test_x: torch.Tensor) -> None:
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"test_x has {test_x.shape[1]} feature dimensions but train_x has {train_x.shape[1]}"
        )
    if train_x.device != test_x.device:
        raise ValueError(f"train_x is on {train_x.device} but test_x is on {test_x.device}")


# --------------------------------------------------------------------------- #
# feature extraction
# --------------------------------------------------------------------------- #


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(model: nn.Module, loader, pool: str | None = None, device=None):
    """Pooled encoder features and labels for every batch of ``loader``.

    ``model`` needs ``pooled_features(imgs, pool)`` (:class:`~mvmae_fast.models.MVMAE`) and must
    already be on ``device`` (default: the device of its parameters). ``loader`` yields
    ``(images, labels)``. ``pool``: ``"cls"``, ``"mean"`` or None for the model's configured pool.

    Runs in eval mode under ``torch.no_grad`` (bf16 autocast on CUDA) and puts the model back in
    its previous train/eval mode afterwards. Returns ``(features float32 (N, D) on the CPU,
    labels int64 (N,))``; features are kept on the CPU so a large set does not fill the GPU.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS[1:]} or None, got {pool!r}")
    if not callable(getattr(model, "pooled_features", None)):
        raise ValueError(f"model must have a pooled_features method, got {type(model).__name__}")
    device = _model_device(model) if device is None else torch.device(device)
    # Only CUDA gets autocast: bf16 on the CPU is slow on most hosts and would change the features
    # that CPU tests compare bit for bit.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    features, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("loader must yield (images, labels) batches")
            imgs, target = batch[0], batch[1]
            imgs = imgs.to(device, non_blocking=True)
            with autocast:
                feats = model.pooled_features(imgs, pool=pool)
            features.append(feats.float().cpu())
            labels.append(torch.as_tensor(target).long().cpu().reshape(-1))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


# --------------------------------------------------------------------------- #
# linear probe
# --------------------------------------------------------------------------- #


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's ``util/lars.py`` (SGD with momentum and a layer-wise trust ratio).

    Parameters with more than one dimension get ``grad + weight_decay * p`` rescaled by
    ``trust_coefficient * ||p|| / ||update||``; 1-D parameters (biases, norm scales) are updated
    with the plain gradient, because a trust ratio on a zero-initialised bias would freeze it.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        _check_positive("trust_coefficient", trust_coefficient)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                update = p.grad
                if update is None:
                    continue
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    one = torch.ones_like(param_norm)
                    # A zero weight or a zero update has no meaningful ratio: fall back to 1.
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        one,
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _lr_at(epoch: float, epochs: int, warmup: float, peak: float) -> float:
    """MAE's ``util/lr_sched.adjust_learning_rate``: linear warmup, then half-cosine to 0."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@torch.no_grad()
def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    correct = 0
    for start in range(0, x.shape[0], chunk):
        logits = head(x[start:start + chunk])
        correct += int((logits.argmax(dim=1) == y[start:start + chunk]).sum())
    return 100.0 * correct / x.shape[0]


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float = 0.1,
    optimizer: str = "sgd",
    seed: int = 0,
    warmup_epochs: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train a linear classifier on frozen features with MAE's linear-probe recipe.

    Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, num_classes)`` (weight
    trunc-normal std 0.01, bias 0), cross-entropy, no weight decay. ``optimizer="sgd"``: SGD with
    momentum 0.9 (the default, suited to small runs); ``"lars"``: :class:`LARS` (momentum 0.9,
    trust coefficient 0.001), MAE's choice for its 16384-image batches. ``lr`` is the peak
    learning rate as given (MAE's ``blr * batch_size / 256`` scaling is the caller's choice); it
    follows a per-iteration cosine schedule after ``warmup_epochs`` of linear warmup (default
    ``epochs / 9``: MAE's 10 of 90).

    Training runs on the features' device; each epoch visits a fresh permutation in full batches
    of ``min(batch_size, N)`` (the last partial batch is dropped, as in MAE). ``num_classes`` is
    ``1 + max label`` over both sets. The result is a deterministic function of the inputs and
    ``seed`` (the global RNG is not used). ``progress(epoch, mean_loss)`` is called after each
    epoch (1-based).

    Returns ``{"top1": test accuracy %, "train_top1": train accuracy %, "epochs": epochs,
    "loss": mean training loss of the last epoch}``.
    """
    train_x, train_y = _check_pair("train_x", train_x, "train_y", train_y)
    test_x, test_y = _check_pair("test_x", test_x, "test_y", test_y)
    _check_dims(train_x, test_x)
    if train_x.shape[0] < 2:
        raise ValueError("train_x needs at least 2 rows: BatchNorm cannot normalise a batch of one")
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 2)
    lr = _check_positive("lr", lr)
    seed = _check_int("seed", seed, 0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if warmup_epochs is None:
        warmup_epochs = epochs / 9
    if (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float))
            or not 0 <= warmup_epochs < epochs):
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable or None, got {type(progress).__name__}")

    device = train_x.device
    n, dim = train_x.shape
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    # A private CPU generator drives the init and the shuffling: the run is reproducible from
    # seed alone and leaves the caller's global RNG stream untouched.
    gen = torch.Generator().manual_seed(seed)

    # momentum=None makes the running statistics a plain average over all training batches.
    # The input features are frozen, so every batch samples the same distribution and the
    # average is exact even for a run of a few steps, where the default EMA (0.1) would still be
    # near its (0, 1) initialisation. On long runs both give the same statistics.
    # skip_init: nn.Linear's own init would draw from the global RNG only to be overwritten.
    head = nn.Sequential(
        nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None),
        torch.nn.utils.skip_init(nn.Linear, dim, num_classes),
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)
    nn.init.zeros_(head[1].bias)
    head.to(device)

    if optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    else:
        opt = LARS(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001)

    bs = min(batch_size, n)
    steps = n // bs
    loss_avg = float("nan")
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(epoch + step / steps, epochs, warmup_epochs, lr)
            idx = perm[step * bs:(step + 1) * bs]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        # One host sync per epoch rather than per step.
        loss_avg = float(total) / steps
        if not math.isfinite(loss_avg):
            raise FloatingPointError(f"linear probe diverged at epoch {epoch + 1} (loss {loss_avg}); lower lr")
        if progress is not None:
            progress(epoch + 1, loss_avg)

    head.eval()
    return {
        "top1": _accuracy(head, test_x, test_y),
        "train_top1": _accuracy(head, train_x, train_y),
        "epochs": epochs,
        "loss": loss_avg,
    }


# --------------------------------------------------------------------------- #
# k-NN
# --------------------------------------------------------------------------- #


def _knn_args(train_x, train_y, test_x, k, temperature, chunk_size):
    train_x, train_y = _check_pair("train_x", train_x, "train_y", train_y)
    test_x = _as_features(test_x, "test_x")
    _check_dims(train_x, test_x)
    k = _check_int("k", k, 1)
    temperature = _check_positive("temperature", temperature)
    if chunk_size is not None:
        chunk_size = _check_int("chunk_size", chunk_size, 1)
    return train_x, train_y, test_x, k, temperature, chunk_size


@torch.no_grad()
def _knn_predict(train_x, train_y, test_x, k, temperature, chunk_size):
    n_train = train_x.shape[0]
    k = min(k, n_train)
    num_classes = int(train_y.max()) + 1
    train_n = F.normalize(train_x, dim=1)
    test_n = F.normalize(test_x, dim=1)
    if chunk_size is None:
        chunk_size = max(1, _KNN_CHUNK_ELEMENTS // n_train)
    preds = []
    for start in range(0, test_n.shape[0], chunk_size):
        sim = test_n[start:start + chunk_size] @ train_n.T  # (chunk, n_train) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_y[top_idx], weights)
        # argmax returns the first maximum: an exact tie goes to the lowest class index.
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                chunk_size: int | None = None) -> torch.Tensor:
    """Weighted k-NN class predictions (int64, one per test row), as in DINO's ``eval_knn.py``.

    Features are L2-normalised; each test row takes its ``k`` most cosine-similar train rows
    (all of them if there are fewer than ``k``), each voting for its label with weight
    ``exp(similarity / temperature)``; the class with the largest total wins (ties: the lowest
    class index). Test rows are processed ``chunk_size`` at a time (default: as many as fit a
    (chunk, N_train) float32 matrix of 128 MiB), so memory stays bounded.
    """
    args = _knn_args(train_x, train_y, test_x, k, temperature, chunk_size)
    return _knn_predict(*args)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 chunk_size: int | None = None) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` on ``(test_x, test_y)``."""
    train_x, train_y, test_x, k, temperature, chunk_size = _knn_args(
        train_x, train_y, test_x, k, temperature, chunk_size)
    test_y = _as_labels(test_y, "test_y", test_x.shape[0], "test_x").to(test_x.device)
    preds = _knn_predict(train_x, train_y, test_x, k, temperature, chunk_size)
    return 100.0 * int((preds == test_y).sum()) / test_y.shape[0]


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #

# Wrappers that prefix every state-dict key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(state: Mapping) -> dict:
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(key, str) and key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _summarise_keys(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:3])
    return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_pretrained(path: str | os.PathLike):
    """The :class:`~mvmae_fast.models.MVMAE` saved in a pretraining checkpoint, on the CPU, in eval mode.

    The checkpoint is a ``torch.save``d dict with ``"model"`` (the state dict; ``module.`` /
    ``_orig_mod.`` prefixes from DDP or ``torch.compile`` are stripped) and ``"config"``
    (``dataclasses.asdict`` of the model's :class:`~mvmae_fast.models.MVMAEConfig`). It is
    unpickled with ``weights_only=False`` (the config may hold plain Python objects), so load
    only checkpoints you trust. Every failure is a one-line ``ValueError``.
    """
    from .models import MVMAE, MVMAEConfig  # deferred: keeps `import mvmae_fast.evaluation` light

    try:
        path = os.fspath(path)
    except TypeError:
        raise ValueError(f"path must be a file path, got {type(path).__name__}") from None
    if not os.path.exists(path):
        raise ValueError(f"checkpoint '{path}' does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint '{path}' is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    # Unpickling garbage raises many types (UnpicklingError, RuntimeError, EOFError, ...).
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"'{path}' is not a readable PyTorch checkpoint ({_one_line(exc)})") from None

    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint '{path}' holds a {type(ckpt).__name__}, expected a dict with 'model' and 'config'")
    missing = [key for key in ("model", "config") if key not in ckpt]
    if missing:
        raise ValueError(f"checkpoint '{path}' has no {' or '.join(repr(k) for k in missing)} entry")
    state, config = ckpt["model"], ckpt["config"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint '{path}': 'model' is a {type(state).__name__}, expected a state dict")
    if not isinstance(config, Mapping):
        raise ValueError(f"checkpoint '{path}': 'config' is a {type(config).__name__}, expected a dict")

    known = {f.name for f in dataclasses.fields(MVMAEConfig)}
    unknown = sorted(str(key) for key in config if key not in known)
    if unknown:
        raise ValueError(f"checkpoint '{path}': config has unknown fields {_summarise_keys(unknown)}")
    try:
        model = MVMAE(MVMAEConfig(**config))
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ValueError(f"checkpoint '{path}' has an invalid config ({_one_line(exc)})") from None

    try:
        result = model.load_state_dict(_strip_wrapper_prefixes(state), strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise ValueError(f"checkpoint '{path}': weights do not match its config ({_one_line(exc)})") from None
    if result.missing_keys:
        raise ValueError(f"checkpoint '{path}': state dict lacks {_summarise_keys(result.missing_keys)}")
    if result.unexpected_keys:
        raise ValueError(f"checkpoint '{path}': state dict has unexpected keys {_summarise_keys(result.unexpected_keys)}")
    return model.eval()
