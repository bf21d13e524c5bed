#!/usr/bin/env python
"""Pretrain MV-MAE (default) or MAE.

    python train/pretrain.py                      # MV-MAE, micro preset, default dataset, any device
    python train/pretrain.py --method mae --model base_patch16 --data /path/to/imagenet --epochs 800
    torchrun --nproc_per_node 2 train/pretrain.py  # data parallel (InfoNCE negatives from every rank)

Leaves in the run directory: checkpoint-last.pt (atomic; --resume continues bit-exactly on CPU),
metrics.jsonl (one line per optimizer step, plus epoch and final records), reconstructions.png
(original / masked / reconstructed for each view) and results.json (final linear-probe and k-NN
top-1 on the dataset's labels).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from mvmae_fast import evaluation, runtime, training
from mvmae_fast.data import EvalTransform, PretrainTransform, build_dataset
from mvmae_fast.models import MVMAE, PRESETS, MVMAEConfig

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
CHECKPOINT = "checkpoint-last.pt"


class UserError(Exception):
    """A problem with the command line, the data or the files: reported in one line, exit 2."""


# -- command line -------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("method (defaults per METHOD.md; unset = the method's default)")
    m.add_argument("--method", choices=("mvmae", "mae"), default="mvmae")
    m.add_argument("--model", default="micro_patch4_32",
                   help=f"preset: {', '.join(k[4:] for k in PRESETS)}")
    m.add_argument("--mask-ratio", type=float, help="default 0.8 (mvmae) / 0.75 (mae)")
    m.add_argument("--views", type=int, choices=(1, 2), help="default 2 (mvmae) / 1 (mae)")
    m.add_argument("--view-mode", choices=("two_crops", "one_crop"))
    m.add_argument("--w-rec", type=float)
    m.add_argument("--w-con", type=float, help="default 1.0 (mvmae) / 0 (mae)")
    m.add_argument("--temperature", type=float)
    m.add_argument("--pool", choices=("mean", "cls"))
    m.add_argument("--masking", choices=("random", "block", "attention"))
    m.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--dec-depth", type=int)
    m.add_argument("--dec-dim", type=int)
    m.add_argument("--dec-heads", type=int)
    m.add_argument("--proj-hidden", type=int)
    m.add_argument("--proj-out", type=int)
    m.add_argument("--proj-layers", type=int)

    t = p.add_argument_group("training")
    t.add_argument("--data", default="digits", help="'digits' (ships with scikit-learn), 'shapes', or an ImageFolder dir")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64, help="per process")
    t.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--base-lr", type=float,
                   help="lr = base_lr * effective batch / 256; default MAE's 1.5e-4 for the 224 px presets, "
                        "1.5e-3 for the small-image presets (short runs on small data)")
    t.add_argument("--lr", type=float, help="absolute lr (overrides --base-lr)")
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--warmup-epochs", type=float, default=3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-batches-per-epoch", type=int, help="cap an epoch's length (quick runs)")
    t.add_argument("--num-workers", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in the process between steps (glibc malloc settings; "
                        "mvmae_fast.runtime.retain_freed_memory): no page faults on each step's activations")
    t.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many non-finite losses in a row")

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help="default runs/<method>-<model>-<time>")
    o.add_argument("--resume", help="a checkpoint, or 'auto' for the output dir's checkpoint-last.pt")
    o.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps")
    o.add_argument("--log-every", type=int, default=10, help="log (and print, when not a terminal) every N steps")
    o.add_argument("--quiet", action="store_true", help="no progress bar; one line per epoch")
    o.add_argument("--probe-epochs", type=int, default=50, help="linear-probe epochs at the end (0: skip)")
    o.add_argument("--knn-every", type=int, default=10, help="k-NN monitor on the labels every N epochs (0: off)")
    return p


def model_config(args):
    key = f"vit_{args.model}"
    if key not in PRESETS:
        raise UserError(f"unknown --model {args.model!r}; known: {', '.join(k[4:] for k in PRESETS)}")
    fields = dict(PRESETS[key])
    if args.method == "mae":
        fields.update(views=1, w_con=0.0, mask_ratio=0.75)
    overrides = {"mask_ratio": args.mask_ratio, "views": args.views, "view_mode": args.view_mode,
                 "masking": args.masking, "w_rec": args.w_rec, "w_con": args.w_con, "temperature": args.temperature, "pool": args.pool,
                 "norm_pix_loss": args.norm_pix_loss, "dec_depth": args.dec_depth, "dec_dim": args.dec_dim,
                 "dec_heads": args.dec_heads, "proj_hidden": args.proj_hidden, "proj_out": args.proj_out,
                 "proj_layers": args.proj_layers}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return MVMAEConfig(**fields)
    except (ValueError, NotImplementedError) as err:
        raise UserError(str(err)) from None


def check_args(args):
    for name in ("epochs", "batch_size", "accum_iter", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("num_workers", "save_every_steps", "probe_epochs", "knn_every", "max_nonfinite"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_batches_per_epoch is not None and args.max_batches_per_epoch < 1:
        raise UserError("--max-batches-per-epoch must be >= 1")
    if not 0 <= args.seed < 2**31:
        raise UserError(f"--seed must be in [0, 2**31), got {args.seed}")


# -- data: order and augmentation are pure functions of (seed, epoch, index) ---------------------
class AugmentedDataset(Dataset):
    """Applies the random transform with a generator seeded from (seed, epoch, index), so a sample's
    views do not depend on workers, ranks or where a resumed run started."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
        return self.transform(img, generator=g), label


class EpochSampler(Sampler):
    """This rank's share of a (seed, epoch)-seeded permutation, from batch ``start_batch`` on."""

    def __init__(self, size, seed, epoch, rank, world, batch_size, num_batches, start_batch=0):
        self.size, self.seed, self.epoch = size, seed, epoch
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.num_batches, self.start_batch = num_batches, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.size, generator=g)[self.rank::self.world]
        begin, end = self.start_batch * self.batch_size, self.num_batches * self.batch_size
        return iter(order[begin:end].tolist())

    def __len__(self):
        return (self.num_batches - self.start_batch) * self.batch_size


# -- progress -------------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on a terminal; plain lines every --log-every steps otherwise."""

    def __init__(self, total_steps, quiet, log_every, enabled):
        self.total, self.quiet, self.log_every, self.enabled = total_steps, quiet, log_every, enabled
        self.tty = sys.stdout.isatty()
        self.start = time.time()
        self.done_at_start = None

    def update(self, step, epoch, epochs, fields):
        if not self.enabled or self.quiet:
            return
        if self.done_at_start is None:
            self.done_at_start = step - 1
        elapsed = time.time() - self.start
        rate = (step - self.done_at_start) / max(elapsed, 1e-9)
        eta = datetime.timedelta(seconds=int((self.total - step) / max(rate, 1e-9)))
        text = f"epoch {epoch + 1}/{epochs} step {step}/{self.total} " + " ".join(fields) + f" ETA {eta}"
        if self.tty:
            width = 20
            filled = int(width * step / self.total)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K", end="", flush=True)
        elif step % self.log_every == 0 or step == self.total:
            print(text, flush=True)

    def line(self, text):
        if not self.enabled:
            return
        if self.tty and not self.quiet:
            print("\r\033[K", end="")
        print(text, flush=True)


# -- setup ----------------------------------------------------------------------------------------
def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            raise UserError(f"--device {device_arg!r} is not a device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda but CUDA is not available")
    if world == 1:
        return device, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def prepare_output_dir(args, rank):
    if args.output_dir is None:
        if args.resume and args.resume != "auto":
            args.output_dir = os.path.dirname(os.path.abspath(args.resume))
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            args.output_dir = os.path.join("runs", f"{args.method}-{args.model}-{stamp}")
    if rank == 0:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            probe = os.path.join(args.output_dir, ".write-test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as err:
            raise UserError(f"output dir {args.output_dir!r} is not writable ({err.strerror})") from None


def load_data(args, config):
    try:
        base = build_dataset(args.data, None, split="train", size=config.img_size)
        base[0]  # fails now, in one line, when no image is readable
    except (ValueError, RuntimeError, OSError) as err:
        raise UserError(f"--data {args.data}: {err}") from None
    views = 1 if config.view_mode == "one_crop" else config.views
    transform = PretrainTransform(config.img_size, view_mode=config.view_mode, views=views)
    return AugmentedDataset(base, transform, args.seed)


def load_checkpoint(args, config):
    path = os.path.join(args.output_dir, CHECKPOINT) if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: any unpickling error
        raise UserError(f"--resume: {path!r} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "optimizer", "epoch"} <= set(ckpt):
        raise UserError(f"--resume: {path!r} is not a mvmae_fast pretraining checkpoint")
    diffs = training.config_differences(ckpt["config"], training.config_dict(config))
    if diffs:
        raise UserError(f"--resume: {path!r} was trained with another config ({'; '.join(diffs)})")
    return ckpt


# -- the run --------------------------------------------------------------------------------------
def run(args):
    check_args(args)
    if args.retain_memory:
        runtime.retain_freed_memory()
    config = model_config(args)
    device, rank, world = setup_distributed(args.device)
    is_main = rank == 0
    prepare_output_dir(args, rank)
    torch.manual_seed(args.seed)
    dataset = load_data(args, config)
    ckpt = load_checkpoint(args, config) if args.resume else None

    model = MVMAE(config).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    eff_batch = args.batch_size * args.accum_iter * world
    if args.base_lr is None:
        args.base_lr = 1.5e-4 if config.img_size >= 224 else 1.5e-3
    lr = args.lr if args.lr is not None else args.base_lr * eff_batch / 256
    optimizer, optimizer_name = training.make_optimizer(model, lr, args.weight_decay, device_type=device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        training.set_rng_state(ckpt["rng"])

    train_model = model
    if world > 1:
        if device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    per_rank = len(dataset) // world
    batches = per_rank // args.batch_size
    if args.max_batches_per_epoch:
        batches = min(batches, args.max_batches_per_epoch)
    batches -= batches % args.accum_iter
    if batches < 1:
        raise UserError(f"the dataset ({len(dataset)} images) is too small for batch {args.batch_size} x "
                        f"accum {args.accum_iter} x {world} processes")
    updates_per_epoch = batches // args.accum_iter
    total_updates = updates_per_epoch * args.epochs
    start_epoch = ckpt["epoch"] if ckpt else 0
    start_batch = ckpt["next_batch"] if ckpt else 0

    flops = training.training_flops_per_image(config)
    peak = next((v for k, v in PEAK_TFLOPS_BF16.items()
                 if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    progress = Progress(total_updates, args.quiet, args.log_every, is_main)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    progress.line(f"{args.method} {args.model}: {params / 1e6:.2f}M params, {len(dataset)} images from {args.data}, "
                  f"{args.epochs} epochs x {updates_per_epoch} steps, batch {eff_batch}, lr {lr:.2e}, {precision} on "
                  f"{device} x {world}, {optimizer_name}; run dir {args.output_dir}")
    progress.line(f"training FLOPs per image: {flops / 1e9:.3f} GFLOP (3 x forward; forward = 2 x MACs of the "
                  f"linear layers and attention matmuls over {config.views} view(s))")
    if ckpt:
        progress.line(f"resumed from epoch {start_epoch}, batch {start_batch} (step {ckpt['step']})")

    writer = None
    if is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(args.output_dir)
        except ImportError:
            pass
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if is_main else None

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def save(epoch, next_batch, step):
        if not is_main:
            return
        training.save_checkpoint(
            os.path.join(args.output_dir, CHECKPOINT), model=model.state_dict(), optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(), epoch=epoch, next_batch=next_batch, step=step, rng=training.rng_state(),
            nonfinite_total=nonfinite_total,
            config=training.config_dict(config), args=vars(args))

    step = ckpt["step"] if ckpt else 0
    nonfinite_total = ckpt["nonfinite_total"] if ckpt else 0
    nonfinite_run = 0
    try:
        for epoch in range(start_epoch, args.epochs):
            dataset.epoch = epoch
            first = start_batch if epoch == start_epoch else 0
            sampler = EpochSampler(len(dataset), args.seed, epoch, rank, world, args.batch_size, batches, first)
            loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                num_workers=args.num_workers, pin_memory=device.type == "cuda")
            train_model.train()
            t_epoch, seen, loss_sum, loss_count = time.time(), 0, 0.0, 0
            for batch_idx, (imgs, _) in enumerate(loader, start=first):
                micro = epoch * batches + batch_idx
                if batch_idx % args.accum_iter == 0:
                    current_lr = training.learning_rate(epoch + batch_idx / batches, lr, args.min_lr,
                                                        args.warmup_epochs, args.epochs)
                    training.set_lr(optimizer, current_lr)
                imgs = imgs.to(device, non_blocking=True)
                last_micro = (batch_idx + 1) % args.accum_iter == 0
                sync = contextlib.nullcontext() if last_micro or world == 1 else train_model.no_sync()
                with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = train_model(imgs, seed=training.mask_seed(args.seed, micro, rank, world), return_pred=False)
                    finite = torch.isfinite(out.loss.detach()).float()
                    if world > 1:
                        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                    loss_ok = finite.item() == 1.0  # the same verdict on every rank
                    if loss_ok:
                        scaler.scale(out.loss / args.accum_iter).backward()
                if not loss_ok:
                    nonfinite_run += 1
                    nonfinite_total += 1
                    progress.line(f"step {step + 1}: non-finite loss ({out.loss.item()}), skipped "
                                  f"({nonfinite_run} in a row)")
                    if nonfinite_run >= args.max_nonfinite > 0:
                        raise UserError(f"stopping: {nonfinite_run} non-finite losses in a row "
                                        f"(lower the lr or check the data); last checkpoint kept")
                else:
                    nonfinite_run = 0
                seen += imgs.shape[0] * world
                if not last_micro:
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss = out.loss.item()
                if math.isfinite(loss):
                    loss_sum, loss_count = loss_sum + loss, loss_count + 1
                ips = seen / max(time.time() - t_epoch, 1e-9)
                fields = [f"loss {loss:.4f}", f"{ips:.0f} img/s", f"lr {current_lr:.2e}"]
                if peak:
                    fields.append(f"MFU {100 * flops * ips / (peak * 1e12):.1f}%")
                progress.update(step, epoch, args.epochs, fields)
                if is_main:
                    record = {"step": step, "epoch": epoch, "loss": loss, "loss_rec": out.loss_rec.mean().item(),
                              "loss_con": out.loss_con.item(), "lr": current_lr, "img_per_s": round(ips, 1)}
                    metrics.write(json.dumps(record) + "\n")
                    if step % args.log_every == 0:
                        metrics.flush()
                    if writer:
                        for k in ("loss", "loss_rec", "loss_con", "lr", "img_per_s"):
                            writer.add_scalar(f"train/{k}", record[k], step)
                if stop["signal"] is not None:
                    save(epoch, batch_idx + 1, step)
                    name = signal.Signals(stop["signal"]).name
                    progress.line(f"{name}: saved {os.path.join(args.output_dir, CHECKPOINT)} at step {step}; "
                                  f"continue with --resume auto --output-dir {args.output_dir}")
                    return 128 + stop["signal"]
                if args.save_every_steps and step % args.save_every_steps == 0:
                    save(epoch, batch_idx + 1, step)
            save(epoch + 1, 0, step)
            mean_loss = loss_sum / max(loss_count, 1)
            progress.line(f"epoch {epoch + 1}/{args.epochs}: loss {mean_loss:.4f}, "
                          f"{seen / (time.time() - t_epoch):.0f} img/s, {nonfinite_total} non-finite skipped")
            if is_main:
                record = {"epoch_end": epoch + 1, "loss": mean_loss, "step": step}
                if args.knn_every and (epoch + 1) % args.knn_every == 0 and epoch + 1 < args.epochs:
                    features = labelled_features(args, model, device, progress)
                    if features is not None:
                        record["knn_top1"] = evaluation.knn_accuracy(*features)
                        progress.line(f"k-NN monitor after epoch {epoch + 1}: top-1 {record['knn_top1']:.2f}%")
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if metrics:
            metrics.flush()

    if is_main:
        finish(args, model, dataset, device, metrics, progress)
        metrics.close()
    if world > 1:
        dist.barrier()
    return 0


def labelled_features(args, model, device, progress):
    """Frozen features (train_x, train_y, test_x, test_y) of the dataset's labelled splits, or None
    (with a note) when the dataset has no test split."""
    size = model.config.img_size
    crop = 1.0 if args.data in ("digits", "shapes") else 0.875
    try:
        splits = [build_dataset(args.data, EvalTransform(size, crop_pct=crop), s, size=size) for s in ("train", "test")]
    except ValueError as err:
        progress.line(f"evaluation skipped: {err}")
        return None
    loaders = [DataLoader(s, batch_size=256, num_workers=args.num_workers) for s in splits]
    (train_x, train_y), (test_x, test_y) = (evaluation.extract_features(model, l, device=device) for l in loaders)
    return train_x, train_y, test_x, test_y


def finish(args, model, dataset, device, metrics, progress):
    """Reconstruction grid and the final linear probe / k-NN on the dataset's labels."""
    model.eval()
    imgs = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]).to(device)
    with torch.no_grad():
        out = model(imgs, seed=training.mask_seed(args.seed, 0))
    grid_path = os.path.join(args.output_dir, "reconstructions.png")
    # Enlarged so that small (e.g. 32 px) images stay visible.
    training.save_png(training.reconstruction_grid(model, imgs, out), grid_path, scale=max(1, 128 // model.config.img_size))
    results = {"reconstructions": grid_path}
    if args.probe_epochs > 0:
        features = labelled_features(args, model, device, progress)
        if features is not None:
            probe = evaluation.linear_probe(*features, epochs=args.probe_epochs, seed=args.seed)
            knn = evaluation.knn_accuracy(*features)
            results.update(linprobe_top1=probe["top1"], knn_top1=knn)
            progress.line(f"linear probe top-1 {probe['top1']:.2f}%, k-NN top-1 {knn:.2f}% ({len(features[0])} train / "
                          f"{len(features[2])} test images, {model.config.pool} features, {args.probe_epochs} epochs)")
    metrics.write(json.dumps({"final": results}) + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    progress.line(f"done: {args.output_dir}")


def one_line_warning(message, category, *args, **kwargs):
    return f"{category.__name__}: {message}\n"


def main(argv=None):
    warnings.formatwarning = one_line_warning
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
