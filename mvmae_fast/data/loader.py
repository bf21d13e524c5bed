"""A DataLoader whose shuffling and augmentations are reproducible from one integer seed."""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

__all__ = ["SeededDataLoader", "build_loader"]


def _seed_worker(worker_id: int) -> None:
    # torch has already seeded this worker's torch RNG with base_seed + worker_id (base_seed comes
    # from the loader's generator). Seeding python's and numpy's RNGs from the same value makes
    # user transforms built on them reproducible as well, whatever torch's own defaults are.
    seed = get_worker_info().seed % 2**32
    random.seed(seed)
    np.random.seed(seed)


class SeededDataLoader(DataLoader):
    """A DataLoader that also makes in-process (num_workers=0) augmentation reproducible.

    With workers, torch seeds each worker's global RNG from the loader's generator. Without
    workers, transforms would draw from the caller's global RNG, so their output would depend on
    whatever the training loop drew before. Here each epoch instead runs the dataset on a private
    RNG state seeded from the loader's generator, swapped in around every batch, which also leaves
    the caller's global RNG stream untouched. Batches with and without workers are reproducible
    but not equal to each other.
    """

    def __iter__(self) -> Iterator:
        if self.num_workers > 0:
            return super().__iter__()
        seed = int(torch.randint(0, 2**62, (), generator=self.generator).item())
        return _isolated_rng(super().__iter__(), seed)


def _isolated_rng(batches: Iterator, seed: int) -> Iterator:
    state = torch.Generator().manual_seed(seed).get_state()
    while True:
        outer = torch.get_rng_state()
        torch.set_rng_state(state)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            state = torch.get_rng_state()
            torch.set_rng_state(outer)
        yield batch


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    device: str | torch.device = "cpu",
) -> DataLoader:
    """A DataLoader deterministic in ``seed`` (order and augmentations) for a fixed num_workers.

    Pins memory when ``device`` is a CUDA device (and CUDA is available); keeps workers alive
    across epochs when num_workers > 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the dataset size {len(dataset)} with drop_last=True: "
            "the loader would yield no batches"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return SeededDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        pin_memory=pin,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
