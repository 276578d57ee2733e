"""Length-grouped shuffling: batches of clips with similar packed decoder lengths, to cut padding."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """A seeded random order in which each run of ``batch_size`` indices has similar lengths.

    As in Hugging Face's sampler of the same name: shuffle (seed + epoch), cut into mega-batches of
    ``batch_size * group_batches`` indices, sort each mega-batch by length (longest first). Then the
    batches themselves are shuffled, so a small data set (one mega-batch) is not seen longest-first
    every epoch. Each batch's rows pad to a similar length. ``set_epoch`` gives a new order per epoch,
    the same one on every process and after a resume.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_batches: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.group_batches
        grouped = []
        for start in range(0, len(order), size):
            grouped += sorted(order[start : start + size], key=lambda i: -self.lengths[i])
        batches = [grouped[start : start + self.batch_size] for start in range(0, len(grouped), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of decoder positions that are padding when ``order`` is cut into batches of ``batch_size``."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded
