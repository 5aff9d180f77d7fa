"""``features``: precomputed embeddings (e.g. from a large pretrained model) in one ``.npz``.

The file holds ``labels`` (``[S]``, class names or ids), optionally ``split`` (``[S]``, each
``train``/``val``/``test`` or 0/1/2) and one float array ``[S, ...]`` per modality, named by the
modality (its key in ``encoder.<name>``; ``+encoder/vector@encoder.NAME=mlp`` adds an MLP for
any name). A sample whose row of a modality is all NaN lacks that modality (masked). Without
``split``, the classes are split by ``seed`` in the proportions ``split_fractions``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.folder import split_classes

RESERVED = ("labels", "split")


class FeaturesDataset(MultimodalDataset):
    name = "features"

    def __init__(self, path: str, modalities: Optional[Sequence[str]] = None,
                 split_fractions: Mapping[str, float] = None, seed: int = 0):
        file = Path(str(path)).expanduser()
        key = f"dataset.path={path}"
        if not file.is_file():
            raise ConfigError(f"{key}: no such file")
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{key}: not a readable .npz file ({type(e).__name__})") from None
        if "labels" not in arrays:
            raise ConfigError(f"{key}: the .npz has no 'labels' array (found {sorted(arrays)}); "
                              f"it needs labels [S] plus one array [S, ...] per modality")
        labels = arrays["labels"]
        if labels.ndim != 1:
            raise ConfigError(f"{key}: labels must be one-dimensional [S], got shape {list(labels.shape)}")
        S = len(labels)
        feats = {k: v for k, v in arrays.items() if k not in RESERVED}
        if not feats:
            raise ConfigError(f"{key}: no modality arrays besides {list(RESERVED)}")
        for k, v in feats.items():
            if len(v) != S or not np.issubdtype(v.dtype, np.number):
                raise ConfigError(f"{key}: array '{k}' must be numeric with {S} rows (as labels), "
                                  f"got {v.dtype} shape {list(v.shape)}")
        names = np.array([str(x) for x in labels])
        if "split" in arrays:
            split = np.array([str(x) for x in arrays["split"]])
            split = np.array([SPLITS[int(x)] if x in ("0", "1", "2") else x for x in split])
            bad = sorted(set(split) - set(SPLITS))
            if len(split) != S or bad:
                raise ConfigError(f"{key}: split must have {S} entries among {list(SPLITS)} or 0/1/2"
                                  + (f", got {bad[:3]}" if bad else ""))
        else:
            parts = split_classes(sorted(set(names)), split_fractions or {"train": 0.6, "val": 0.2, "test": 0.2},
                                  seed, "dataset.split_fractions")
            where = {c: s for s, cs in parts.items() for c in cs}
            split = np.array([where[c] for c in names])
        self.path, self.names, self.split_of = file, names, split
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in feats.items()}
        self.all_modalities = {k: ModalitySpec(tuple(v.shape[1:]), torch.float32, "vector")
                               for k, v in self.arrays.items()}
        super().__init__(modalities)

    def build_split(self, split: str) -> SplitData:
        rows = np.nonzero(self.split_of == split)[0]
        if len(rows) == 0:
            raise ConfigError(f"dataset.path={self.path}: the {split} split has no samples")
        classes = sorted(set(self.names[rows]))
        index = {c: i for i, c in enumerate(classes)}
        idx = torch.from_numpy(rows)
        data, present = {}, []
        for m, x in self.arrays.items():
            x = x[idx]
            absent = torch.isnan(x.reshape(len(x), -1)).all(1)
            data[m] = torch.nan_to_num(x.masked_fill(absent.reshape((-1,) + (1,) * (x.dim() - 1)), 0))
            present.append(~absent)
        labels = torch.tensor([index[c] for c in self.names[rows]], dtype=torch.int64)
        return SplitData(data, torch.stack(present, 1), labels, len(classes))

    def decode(self, modality: str, path: str) -> torch.Tensor:
        raise ConfigError(f"dataset features cannot decode files ({path}): it reads precomputed "
                          f"arrays from {self.path.name}; fixed-episode files need a file-based "
                          f"dataset (folder, omniglot, ...)")
