"""``features``: precomputed embeddings (e.g. from a large pretrained model) in one ``.npz``.

The file holds ``labels`` (``[S]``, class names or ids), optionally ``split`` (``[S]``, each
``train``/``val``/``test`` or 0/1/2) and one numeric array ``[S, ...]`` per modality, named by the
modality (its key in ``encoder.<name>``; ``+encoder/vector@encoder.NAME=mlp`` adds an MLP for
any name); a 1-D array ``[S]`` is one feature per sample (``[S, 1]``); bool and integer arrays
become float32. A sample whose row of a modality is all NaN lacks that modality (masked); any
other NaN or inf is refused naming the array, the row and its label. Without ``split``, the
classes are split by ``seed`` in the proportions ``split_fractions``. ``standardize``: each
feature minus its mean, divided by its std, both over the train split's present rows.

The class lists per split, the arrays' shapes and the statistics are the :meth:`state_dict`; a
checkpoint's state restores them (rows of classes it does not list are ignored).
"""
from __future__ import annotations

import zipfile
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset, files_digest, require_path
from metamm_cli.data.decode import as_float_array
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.folder import split_classes

RESERVED = ("labels", "split")
FORMAT = 1  # of state_dict()


class FeaturesDataset(MultimodalDataset):
    name = "features"

    def __init__(self, path: str, modalities: Optional[Sequence[str]] = None,
                 split_fractions: Mapping[str, float] = None, seed: int = 0,
                 standardize: bool = False):
        file = require_path(path, "dataset.path", "the .npz file of features")
        key = self.key = f"dataset.path={path}"
        if not file.is_file():
            raise ConfigError(f"{key}: no such file")
        if not isinstance(standardize, bool):
            raise ConfigError(f"dataset.standardize={standardize}: must be true or false")
        arrays = {}
        try:
            with np.load(file, allow_pickle=False) as npz:
                for k in npz.files:
                    try:
                        arrays[k] = npz[k]
                    except ValueError as e:
                        if "allow_pickle" in str(e):
                            raise ConfigError(f"{key}: array '{k}' holds Python objects (dtype object); "
                                              f"save numbers, or labels as strings (np.asarray(x, dtype=str))") from None
                        raise
        except ConfigError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise ConfigError(f"{key}: not a readable .npz file (corrupt or cut short)") from None
        if "labels" not in arrays:
            raise ConfigError(f"{key}: the .npz has no 'labels' array (found {sorted(arrays)}); "
                              f"it needs labels [S] plus one array [S, ...] per modality")
        labels = arrays["labels"]
        if labels.ndim != 1:
            raise ConfigError(f"{key}: labels must be one-dimensional [S], got shape {list(labels.shape)}")
        S = len(labels)
        if S == 0:
            raise ConfigError(f"{key}: labels is empty: the file holds no samples")
        names = np.array([str(x) for x in labels])
        self.path, self.names = file.resolve(), names
        feats = {k: v for k, v in arrays.items() if k not in RESERVED}
        if not feats:
            raise ConfigError(f"{key}: no modality arrays besides {list(RESERVED)}")
        self.arrays: Dict[str, torch.Tensor] = {}
        absent_everywhere = np.ones(S, dtype=bool)
        for k, v in feats.items():
            what = f"{key}: array '{k}'"
            if v.ndim == 0 or len(v) != S:
                raise ConfigError(f"{what} must have {S} rows (as labels), got shape {list(v.shape)}")
            x = as_float_array(v, what)
            if x.ndim == 1:
                x = x[:, None]  # one feature per sample
            if x[0].size == 0:
                raise ConfigError(f"{what} has no values per row (shape {list(v.shape)})")
            flat = x.reshape(S, -1)
            nan, inf = np.isnan(flat), np.isinf(flat)
            absent = nan.all(1)
            bad = np.nonzero((nan.any(1) & ~absent) | inf.any(1))[0]
            if len(bad):
                r = int(bad[0])
                n_nan, n_inf = int(nan[r].sum()), int(inf[r].sum())
                counted = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "",
                                                   f"{n_inf} infinite" if n_inf else "") if p)
                more = f" ({len(bad) - 1} more rows too)" if len(bad) > 1 else ""
                raise ConfigError(f"{what} row {r} (label '{names[r]}') has {counted} of {flat.shape[1]} "
                                  f"values{more}; a row must be all finite, or all NaN to mark the "
                                  f"modality absent")
            absent_everywhere &= absent
            self.arrays[k] = torch.from_numpy(x)
        if absent_everywhere.all():
            raise ConfigError(f"{key}: every row of every modality array ({', '.join(feats)}) is all "
                              f"NaN, so no sample has any modality (an all-NaN row marks one "
                              f"modality absent for one sample)")
        if "split" in arrays:
            split = np.array([str(x) for x in arrays["split"]])
            split = np.array([SPLITS[int(x)] if x in ("0", "1", "2") else x for x in split])
            bad_split = sorted(set(split) - set(SPLITS))
            if len(split) != S or bad_split:
                raise ConfigError(f"{key}: split must have {S} entries among {list(SPLITS)} or 0/1/2"
                                  + (f", got {bad_split[:3]}" if bad_split else ""))
            self._classes = {s: sorted({str(c) for c in names[split == s]}) for s in SPLITS}
            self.split_of = split
        else:
            parts = split_classes(sorted({str(c) for c in names}), split_fractions or {"train": 0.6, "val": 0.2, "test": 0.2},
                                  seed, "dataset.split_fractions")
            self._classes = {s: [str(c) for c in parts[s]] for s in SPLITS}
            self.split_of = None
        self.standardize = standardize
        self._shapes = {k: tuple(v.shape[1:]) for k, v in self.arrays.items()}
        self._stats: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
        self._rows: Dict[str, np.ndarray] = {}
        super().__init__(modalities)

    @property
    def all_modalities(self) -> Dict[str, ModalitySpec]:  # type: ignore[override]
        return {k: ModalitySpec(shape, torch.float32, "vector") for k, shape in self._shapes.items()}

    def num_classes(self, split: str) -> int:
        return len(self._classes[split])

    def rows(self, split: str) -> np.ndarray:
        """The file's row numbers of ``split``: rows of the split's classes (and, with a split
        array, marked as that split), in file order."""
        if split not in self._rows:
            classes = set(self._classes[split])
            mask = np.array([c in classes for c in self.names], dtype=bool)
            if self.split_of is not None:
                mask &= self.split_of == split
            self._rows[split] = np.nonzero(mask)[0]
        return self._rows[split]

    def stats(self) -> Optional[Dict[str, Dict[str, torch.Tensor]]]:
        """Per modality ``{"mean", "std"}`` over the train split's present rows (standardize)."""
        if self.standardize and self._stats is None:
            idx = torch.from_numpy(self.rows("train"))
            self._stats = {}
            for m, x in self.arrays.items():
                x = x[idx].double()
                x = x[~torch.isnan(x.reshape(len(x), -1)).all(1)]
                if len(x) == 0:
                    raise ConfigError(f"dataset.standardize=true: no row of the train split has "
                                      f"array '{m}' of {self.path} to learn its mean and std from")
                std = x.std(0, unbiased=False)
                self._stats[m] = {"mean": x.mean(0).float(),
                                  "std": torch.where(std > 1e-12, std, torch.ones_like(std)).float()}
        return self._stats

    def build_split(self, split: str) -> SplitData:
        rows = self.rows(split)
        if len(rows) == 0:
            raise ConfigError(f"{self.key}: the {split} split has no samples")
        index = {c: i for i, c in enumerate(self._classes[split])}
        idx = torch.from_numpy(rows)
        stats = self.stats()
        data, present = {}, []
        for m in self.modality_names():
            x = self.arrays[m][idx]
            absent = torch.isnan(x.reshape(len(x), -1)).all(1)
            if stats is not None:
                x = (x - stats[m]["mean"]) / stats[m]["std"]
            data[m] = x.masked_fill(absent.reshape((-1,) + (1,) * (x.dim() - 1)), 0)
            present.append(~absent)
        labels = torch.tensor([index[c] for c in self.names[rows]], dtype=torch.int64)
        return SplitData(data, torch.stack(present, 1), labels, len(self._classes[split]))

    def describe_row(self, split: str, row: int) -> str:
        r = int(self.rows(split)[row])
        return f"row {r} (label '{self.names[r]}') of {self.path}"

    def decode(self, modality: str, path: str) -> torch.Tensor:
        raise ConfigError(f"dataset features cannot decode files ({path}): it reads precomputed "
                          f"arrays from {self.path.name}; fixed-episode files need a file-based "
                          f"dataset (folder, omniglot, ...)")

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        stats = self.stats()
        return {"dataset": self.name, "format": FORMAT,
                "classes": {s: list(v) for s, v in self._classes.items()},
                "shapes": {m: list(s) for m, s in self._shapes.items()},
                "stats": None if stats is None else {m: {k: t.clone() for k, t in v.items()}
                                                     for m, v in stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not self._check_state(state):
            return
        classes = state.get("classes")
        if classes is not None:
            for s in SPLITS:
                have = set(self.names if self.split_of is None else self.names[self.split_of == s])
                gone = [c for c in classes[s] if c not in have]
                if gone:
                    raise ConfigError(f"{self.key}: class '{gone[0]}' of the {s} split has no rows in "
                                      f"the file any more; the checkpoint was trained with it")
            self._classes = {s: [str(c) for c in classes[s]] for s in SPLITS}
        shapes = state.get("shapes")
        if shapes is not None:
            for m, shape in shapes.items():
                if m not in self._shapes:
                    raise ConfigError(f"{self.key}: array '{m}' is gone; the checkpoint was trained "
                                      f"with it (shape {list(shape)})")
                if list(self._shapes[m]) != list(shape):
                    raise ConfigError(f"{self.key}: array '{m}' has shape {list(self._shapes[m])} per "
                                      f"row, the checkpoint was trained with {list(shape)}")
            self._shapes = {m: tuple(shapes[m]) for m in shapes}  # other arrays: ignored
        if "stats" in state:
            self.standardize = state["stats"] is not None
            self._stats = None if state["stats"] is None else {
                m: {k: t.float() for k, t in v.items()} for m, v in state["stats"].items()}
        self._rows.clear()
        self._cache.clear()
        self._kept.clear()
        self._select_modalities()

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """The .npz by name, size and modification time, for every split (all are read from it)."""
        fp = files_digest([self.path], self.path.parent)
        return {s: dict(fp) for s in SPLITS}
