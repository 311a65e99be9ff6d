"""Batches that are a pure function of (seed, epoch, step, rank): the basis of exact resume.

A run killed at step k and resumed from its checkpoint must see the same images, with the
same augmentations, as an uninterrupted run. So nothing here depends on iterator state:

* :class:`StepBatches` yields, for steps ``start..end`` of an epoch, the dataset indices of
  this rank's batch, from a permutation seeded by (seed, stream, epoch); resuming mid-epoch
  just starts at a later step.
* each index travels with its own augmentation seed, and :class:`SeededItems` seeds torch's
  RNG with it before calling the dataset, so random crops and flips are reproducible whether
  the item is loaded in a worker process or not.

The auxiliary outlier stream has no epoch of its own: it draws ``per_rank`` items per rank
per step from a concatenation of fresh permutations, wrapping as often as needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser on a running hash)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


def permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Index batches for steps ``[start, end)`` of one epoch, for one rank.

    ``wrap=False`` (the ID stream): every step takes the next ``per_rank * world`` indices
    of one permutation, so an epoch visits each item at most once. ``wrap=True`` (the
    outlier stream): indices continue into further permutations when one runs out.
    """

    def __init__(self, num_items: int, per_rank: int, *, seed: int, stream: int, epoch: int,
                 start: int, end: int, rank: int = 0, world: int = 1, wrap: bool = False):
        if num_items <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if not wrap and end * per_rank * world > num_items:
            raise ValueError(f"{end} steps of {per_rank * world} exceed {num_items} items")
        self.n, self.per_rank, self.world, self.rank = num_items, per_rank, world, rank
        self.seed, self.stream, self.epoch = seed, stream, epoch
        self.start, self.end = start, end
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, cycle: int) -> torch.Tensor:
        if cycle not in self._perms:
            self._perms = {cycle: permutation(self.n, mix_seed(self.seed, self.stream,
                                                               self.epoch, cycle))}
        return self._perms[cycle]

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            first = (step * self.world + self.rank) * self.per_rank
            batch = []
            for slot, position in enumerate(range(first, first + self.per_rank)):
                cycle, offset = divmod(position, self.n)
                index = int(self._perm(cycle)[offset])
                aug_seed = mix_seed(self.seed, self.stream, self.epoch, step, self.rank, slot)
                batch.append((index, aug_seed))
            yield batch


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is loaded with torch's RNG seeded."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        torch.manual_seed(seed)
        return self.base[index]


def stratified_split(targets: Sequence[int], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, held-out) keeping ``fraction`` of every class held out.

    The held-out part is the ID validation set that threshold calibration uses; it is a pure
    function of the labels, the fraction and the seed, and is also saved with the run.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, held = [], []
    for label, indices in sorted(by_class.items()):
        order = permutation(len(indices), mix_seed(seed, label))
        k = round(fraction * len(indices))
        held += [indices[i] for i in order[:k].tolist()]
        train += [indices[i] for i in order[k:].tolist()]
    return sorted(train), sorted(held)


def random_split(num_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(num_items)`` into (train, held-out) with ``fraction`` held out at random.

    For unlabelled sets (the auxiliary outliers), where there is no class to stratify by. The
    held-out part is a pure function of the size, the fraction and the seed.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = permutation(num_items, seed).tolist()
    k = round(fraction * num_items)
    return sorted(order[k:]), sorted(order[:k])
