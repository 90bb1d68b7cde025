"""Samplers for training that can restart part-way through an epoch, and for evaluation without padding."""

import itertools
from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler, Sampler

__all__ = ["ResumableSampler", "ShardSampler"]


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (also for one process) that can skip the first samples of an epoch.

    The order of epoch e depends on `seed` and e only, so a run resumed part-way through an epoch sees exactly the
    samples the interrupted run had not reached yet.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch `epoch`'s order, starting at this rank's sample `start`."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Every `num_replicas`-th index from `rank`, in order: shards that cover the dataset exactly once."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
