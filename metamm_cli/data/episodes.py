"""The data contract: a split of per-modality tensors, and batched episodes sampled on its device."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Optional, Tuple

import torch

from metamm_cli import ConfigError


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality looks like per sample: ``kind`` picks a sensible encoder."""

    shape: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    kind: str = "vector"  # image | audio | tokens | strokes | vector
    vocab: Optional[int] = None  # tokens only


@dataclass
class SplitData:
    """One split of a dataset, held on the training device.

    ``data[m]``: ``[S, *shape_m]``; ``present``: ``[S, M]`` bool, modalities in ``order``;
    ``labels``: ``[S]`` class ids ``0..num_classes-1`` within the split.
    """

    data: Dict[str, torch.Tensor]
    present: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def to(self, device) -> "SplitData":
        return SplitData({m: x.to(device) for m, x in self.data.items()}, self.present.to(device),
                         self.labels.to(device), self.num_classes)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


@dataclass
class Episode:
    """A whole meta-batch of N-way K-shot tasks; tasks are the leading dimension ``T``.

    support[m]: ``[T, N*K, *shape_m]``, support_present: ``[T, N*K, M]``, support_labels:
    ``[T, N*K]`` in ``0..N-1``; the same for query with ``N*Q`` samples; classes: ``[T, N]``
    split class ids.
    """

    support: Dict[str, torch.Tensor]
    support_present: torch.Tensor
    support_labels: torch.Tensor
    query: Dict[str, torch.Tensor]
    query_present: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.classes.shape[0]

    @property
    def way(self) -> int:
        return self.classes.shape[1]

    def tasks(self, start: int, stop: int) -> "Episode":
        """The tasks ``start:stop`` of the meta-batch (for chunked forward/backward)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ({m: x[start:stop] for m, x in value.items()} if isinstance(value, dict)
                           else value[start:stop])
        return replace(self, **out)


class EpisodeSampler:
    """Draws ``tasks`` N-way K-shot episodes at once with index arithmetic on the split's device.

    Classes with fewer than ``shot + query`` samples are never drawn; an impossible request
    fails at construction with the key to change.
    """

    def __init__(self, split: SplitData, way: int, shot: int, query: int, tasks: int,
                 seed: int = 0, split_name: str = "train"):
        counts = split.class_counts()
        need = shot + query
        self.eligible = torch.nonzero(counts >= need).flatten()
        if way > split.num_classes:
            raise ConfigError(f"episode.way={way} is impossible: the {split_name} split has "
                              f"{split.num_classes} classes")
        if len(self.eligible) < way:
            raise ConfigError(
                f"episode.shot+episode.query={need} is impossible: {len(self.eligible)} classes of "
                f"the {split_name} split have that many samples (largest: {int(counts.max())}), "
                f"episode.way={way} needs {way}")
        self.split, self.way, self.shot, self.query, self.tasks = split, way, shot, query, tasks
        device = split.labels.device
        order = torch.argsort(split.labels, stable=True)
        max_n = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        col = torch.arange(max_n, device=device)
        # table[c, j] = index of the j-th sample of class c (padding repeats a valid index)
        self.table = order[(starts[:, None] + torch.minimum(col[None], counts[:, None] - 1))]
        self.pad = col[None] >= counts[:, None]  # [C, max_n]
        self.generator = torch.Generator(device=device)
        self.seed = seed
        self.reset()

    def reset(self, seed: Optional[int] = None) -> None:
        self.generator.manual_seed(self.seed if seed is None else seed)

    def sample(self, tasks: Optional[int] = None) -> Episode:
        T, N, K, Q = tasks or self.tasks, self.way, self.shot, self.query
        g, device = self.generator, self.table.device
        scores = torch.rand(T, len(self.eligible), generator=g, device=device)
        classes = self.eligible[scores.topk(N, dim=1).indices]  # [T, N] distinct classes
        keys = torch.rand(T, N, self.table.shape[1], generator=g, device=device)
        keys = keys.masked_fill(self.pad[classes], 2.0)  # padding sorts last
        pick = keys.argsort(dim=-1)[..., : K + Q]  # [T, N, K+Q]
        idx = torch.gather(self.table[classes], 2, pick)
        labels = torch.arange(N, device=device)
        s_idx, q_idx = idx[..., :K].reshape(T, N * K), idx[..., K:].reshape(T, N * Q)
        d = self.split
        return Episode(
            support={m: x[s_idx] for m, x in d.data.items()},
            support_present=d.present[s_idx],
            support_labels=labels.repeat_interleave(K).expand(T, -1),
            query={m: x[q_idx] for m, x in d.data.items()},
            query_present=d.present[q_idx],
            query_labels=labels.repeat_interleave(Q).expand(T, -1),
            classes=classes,
        )
