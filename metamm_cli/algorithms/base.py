"""The one interface every meta-algorithm implements: ``Episode -> (loss, query logits)``."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli.algorithms.functional import upcast
from metamm_cli.data.episodes import Episode
from metamm_cli.models.net import MultimodalNet


class MetaAlgorithm(nn.Module):
    """Subclasses implement :meth:`forward` for a whole meta-batch at once.

    ``forward(episode)`` returns the mean query loss over tasks and the query logits
    ``[T, N*Q, N]``. ``model`` is the multimodal embedding network; ``way`` is the training
    way, for algorithms with a way-sized head; ``num_classes`` the number of classes of the
    training split, for algorithms that classify over all of them (the transfer baseline).
    """

    def __init__(self, model: MultimodalNet, way: int, num_classes: Optional[int] = None):
        super().__init__()
        self.model, self.way, self.num_classes = model, way, num_classes

    def forward(self, episode: Episode) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def embed(self, inputs: Dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """Embed ``[*lead, ...]`` inputs of any leading shape in one call -> ``[*lead, D]``."""
        lead = present.shape[:-1]
        flat = {m: x.reshape(-1, *x.shape[len(lead):]) for m, x in inputs.items()}
        return self.model(flat, present.reshape(-1, present.shape[-1])).reshape(*lead, -1)

    def embed_episode(self, episode: Episode) -> Tuple[torch.Tensor, torch.Tensor]:
        """Support and query of every task embedded in one call -> ``[T, N*K, D]``, ``[T, N*Q, D]`` (float)."""
        nk = episode.support_labels.shape[1]
        inputs = {m: torch.cat([episode.support[m], episode.query[m]], 1) for m in episode.support}
        present = torch.cat([episode.support_present, episode.query_present], 1)
        z = upcast(self.embed(inputs, present))
        return z[:, :nk], z[:, nk:]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upcast(logits.flatten(0, -2)), labels.flatten())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy in percent, ``[T]``; stays on the device."""
    return (logits.argmax(-1) == labels).float().mean(-1) * 100
