"""What every dataset hands the harness (:class:`DataBundle`) and the seeded loader over it (:func:`make_loader`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    info: dict[str, Any]


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                distributed: Optional[tuple[int, int]] = None) -> DataLoader:
    """Seeded loader; ``distributed=(rank, world_size)`` shards it with a ``DistributedSampler``."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed is not None:
        rank, world = distributed
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                     drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, drop_last=False,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
