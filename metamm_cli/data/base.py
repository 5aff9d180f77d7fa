"""The small base class every dataset implements: modality specs plus one SplitData per split."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from metamm_cli import ConfigError
from metamm_cli.data.episodes import ModalitySpec, SplitData

SPLITS = ("train", "val", "test")


class MultimodalDataset:
    """Subclasses set ``name`` and ``all_modalities`` and implement ``build_split`` (on the CPU).

    ``modalities`` (the config key ``dataset.modalities``) keeps a subset, e.g. ``[image]`` for a
    single-modality baseline; samples left with no modality present are dropped.
    """

    name = "dataset"
    all_modalities: Dict[str, ModalitySpec] = {}

    def __init__(self, modalities: Optional[Sequence[str]] = None):
        wanted = list(modalities) if modalities else list(self.all_modalities)
        unknown = [m for m in wanted if m not in self.all_modalities]
        if unknown or len(set(wanted)) != len(wanted):
            raise ConfigError(f"dataset.modalities={wanted}: each must appear once and be one of "
                              f"{list(self.all_modalities)}")
        self.modalities = {m: self.all_modalities[m] for m in wanted}
        self._cache: Dict[tuple, SplitData] = {}

    def build_split(self, split: str) -> SplitData:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, modality: str, path: str) -> torch.Tensor:
        """One file -> the tensor of ``modality`` for one sample, with this dataset's
        preprocessing (shape and dtype as stored in its splits); used by fixed-episode evaluation."""
        raise ConfigError(f"dataset {self.name} cannot decode files ({path}); fixed-episode "
                          f"evaluation needs a dataset that reads files")

    def split(self, split: str, device: torch.device | str = "cpu") -> SplitData:
        if split not in SPLITS:
            raise ConfigError(f"split={split}: must be one of {list(SPLITS)}")
        key = (split, str(device))
        if key not in self._cache:
            full = self.build_split(split)
            cols = [list(self.all_modalities).index(m) for m in self.modalities]
            present = full.present[:, cols]
            keep = present.any(dim=1)
            if not bool(keep.all()):
                idx = torch.nonzero(keep).flatten()
                full = SplitData({m: x[idx] for m, x in full.data.items()}, full.present[idx],
                                 full.labels[idx], full.num_classes)
                present = present[idx]
            data = {m: full.data[m] for m in self.modalities}
            self._cache[key] = SplitData(data, present, full.labels, full.num_classes).to(device)
        return self._cache[key]

    def state_dict(self) -> dict:
        """The preprocessing state learned from the data (vocabularies, statistics, class lists,
        ...), stored in every checkpoint; empty when nothing is learned."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Use a checkpoint's learned preprocessing state instead of today's data's."""

    def describe(self) -> str:
        parts = [f"{m}{list(s.shape)} {str(s.dtype).replace('torch.', '')}" for m, s in self.modalities.items()]
        return f"{self.name}: " + ", ".join(parts)


def build_dataset(node, state: Optional[dict] = None) -> MultimodalDataset:
    """The dataset of the config node ``dataset`` (keys checked against its constructor); with
    ``state`` (a checkpoint's ``data.state``), the preprocessing learned when the run was trained
    is used instead of being learned again from today's files."""
    from metamm_cli.config import instantiate_checked

    dataset = instantiate_checked(node, "dataset", convert="all")
    if state is not None:
        dataset.load_state_dict(state)
    return dataset
