"""Plain minibatches over every class of a split, for algorithms that train by ordinary
classification (``algorithm=pretrain``) and still run in the one trainer loop.

A minibatch is handed over as an :class:`Episode` of ``tasks`` "tasks" (the trainer's
``meta_batch``: 1, or more to share a step across processes), each holding ``batch`` samples
drawn uniformly without replacement from the whole split, in the query (the support is empty);
the episode's way is the split's number of classes, its classes ``0..C-1``, so the query labels
are the samples' own class ids. Drawn from the sampler's generator (reproducible, and resumed
exactly: the generator's state is in every checkpoint); each step draws afresh (independent
minibatches, not epochs). The split's transform (the image pipeline) applies as to episodes.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from metamm_cli import ConfigError
from metamm_cli.data.episodes import Episode, Sampler, SplitData, drop_modalities, gather_modalities


class BatchSampler(Sampler):
    """See the module docstring; ``missing`` and ``warmup`` as every :class:`Sampler`'s (modality dropout)."""

    def __init__(self, split: SplitData, batch: int, tasks: int, seed: int = 0, split_name: str = "train",
                 missing: Optional[Mapping[str, float]] = None, key: str = "algorithm.batch_size", warmup: int = 0):
        n = len(split.labels)
        if batch < 1 or batch * tasks > n:
            raise ConfigError(f"{key}={batch} is out of range: {tasks} x {batch} samples per step, the "
                              f"{split_name} split has {n}")
        super().__init__(split, seed, split_name, missing, warmup)
        self.batch, self.tasks = batch, tasks

    def sample(self, tasks: Optional[int] = None, part: Optional[Tuple[int, int]] = None) -> Episode:
        T, B, d, g = tasks or self.tasks, self.batch, self.split, self.generator
        device = d.labels.device
        rows = torch.randperm(len(d.labels), generator=g, device=device)[:T * B].view(T, B)
        present = d.present[rows]
        noise = torch.rand(T, B, 2 * len(self.rates), generator=g, device=device)
        if self.dropping:
            present = drop_modalities(present, self.rates * self.scale, noise)
        full = (T, part[0] if part is not None else 0)
        if part is not None:
            rows, present = rows[part[0]:part[1]], present[part[0]:part[1]]
            T = rows.shape[0]
        empty = rows[:, :0]
        support, query = d.prepare_episode(gather_modalities(d.data, empty),
                                           gather_modalities(d.data, rows, present if self.dropping else None),
                                           g, full)
        C = d.num_classes
        return Episode(support, present[:, :0], empty, query, present, d.labels[rows],
                       torch.arange(C, device=device).expand(T, C), index=rows)
