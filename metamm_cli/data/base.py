"""The small base class every dataset implements: modality specs plus one SplitData per split,
the preprocessing state a checkpoint stores, and fingerprints of the files each split is built
from."""
from __future__ import annotations

from dataclasses import replace

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from metamm_cli import ConfigError
from metamm_cli.data.episodes import ModalitySpec, SplitData

log = logging.getLogger("metamm")

SPLITS = ("train", "val", "test")
_SHOWN = 3  # bad samples named in an error


class MultimodalDataset:
    """Subclasses set ``name`` and ``all_modalities`` and implement ``build_split`` (on the CPU).

    ``modalities`` (the config key ``dataset.modalities``) keeps a subset, e.g. ``[image]`` for a
    single-modality baseline; samples left with no modality present are dropped (one warning).

    Preprocessing learned from data (vocabularies, statistics, class lists, ...) is returned by
    :meth:`state_dict` and restored by :meth:`load_state_dict` (a checkpoint stores it, so
    evaluation does not depend on today's files); :meth:`fingerprint` summarises the files each
    split is built from; :meth:`describe_sample` names the files of one sample.
    """

    name = "dataset"
    all_modalities: Dict[str, ModalitySpec] = {}

    def __init__(self, modalities: Optional[Sequence[str]] = None):
        self._requested = list(modalities) if modalities else None
        self._select_modalities()
        self._cache: Dict[tuple, SplitData] = {}
        self._kept: Dict[str, Optional[torch.Tensor]] = {}

    # -- modalities ------------------------------------------------------------------------
    def modality_names(self) -> List[str]:
        """The names of ``all_modalities`` (a subclass that learns its specs lazily returns
        them without learning)."""
        return list(self.all_modalities)

    def _select_modalities(self) -> None:
        """``dataset.modalities``: names, or positions in the dataset's own list (``[1]``: its
        second modality, so one preset can ask for "each modality alone" on any dataset)."""
        names = self.modality_names()
        wanted = self._requested or names
        for w in wanted:
            if isinstance(w, int) and not isinstance(w, bool) and not 0 <= w < len(names):
                raise ConfigError(f"dataset.modalities={wanted}: position {w} is out of range; the dataset "
                                  f"has {len(names)} modalities ({', '.join(names)})")
        wanted = [names[w] if isinstance(w, int) and not isinstance(w, bool) else w for w in wanted]
        unknown = [m for m in wanted if m not in names]
        if unknown or len(set(wanted)) != len(wanted):
            raise ConfigError(f"dataset.modalities={wanted}: each must appear once and be one of {names}")
        self._wanted = list(wanted)

    @property
    def modalities(self) -> Dict[str, ModalitySpec]:
        """The kept modalities' specs, in the order asked for (``dataset.modalities``)."""
        return {m: self.spec(m) for m in self._wanted}

    def spec(self, modality: str) -> ModalitySpec:
        """The spec of one modality (a subclass that learns specs lazily learns only its own)."""
        return self.all_modalities[modality]

    # -- splits ----------------------------------------------------------------------------
    def build_split(self, split: str) -> SplitData:  # pragma: no cover - interface
        raise NotImplementedError

    def num_classes(self, split: str) -> int:
        """The number of classes of ``split`` (labels ``0..n-1``); datasets that know their class
        lists answer without decoding the split."""
        return self.split(split).num_classes

    def transform(self, split: str):
        """What turns the gathered inputs of ``split`` into encoder inputs (attached to the
        split as :attr:`SplitData.transform`, e.g. the image pipeline of
        :mod:`metamm_cli.data.augment`); None: used as gathered."""
        return None

    def class_names(self, split: str) -> Optional[List[str]]:
        """The names of ``split``'s classes in label order, for messages; None where unknown."""
        return None

    def decode(self, modality: str, path: str) -> torch.Tensor:
        """One file -> the tensor of ``modality`` for one sample, with this dataset's
        preprocessing (shape and dtype as stored in its splits); used by fixed-episode evaluation."""
        raise ConfigError(f"dataset {self.name} cannot decode files ({path}); fixed-episode "
                          f"evaluation needs a dataset that reads files")

    def split(self, split: str, device: torch.device | str = "cpu") -> SplitData:
        """The split on ``device`` (built once on the CPU, then copied). Samples left with none
        of the kept modalities are dropped with one warning; an empty split, and non-finite
        values in a floating modality (naming the first bad samples), are one-line errors."""
        if split not in SPLITS:
            raise ConfigError(f"split={split}: must be one of {list(SPLITS)}")
        if (split, "cpu") not in self._cache:
            self._cache[(split, "cpu")] = self._build_checked(split)
        key = (split, str(device))
        if key not in self._cache:
            self._cache[key] = self._cache[(split, "cpu")].to(device)
        return self._cache[key]

    def _build_checked(self, split: str) -> SplitData:
        full = self.build_split(split)
        total = len(full.labels)
        if total == 0:
            raise ConfigError(f"dataset {self.name}: the {split} split has no samples")
        names = list(self.modality_names())
        cols = [names.index(m) for m in self._wanted]
        present = full.present[:, cols]
        keep = present.any(dim=1)
        self._kept[split] = None
        if not bool(keep.all()):
            idx = torch.nonzero(keep).flatten()
            if len(idx) == 0:
                raise ConfigError(f"dataset {self.name}: the {split} split has no samples left: none "
                                  f"of its {total} samples has any of dataset.modalities={self._wanted}")
            log.warning(f"{total - len(idx)} of {total} samples of the {split} split have none of "
                        f"dataset.modalities={self._wanted}: left out")
            full = replace(full, data={m: x[idx] for m, x in full.data.items()}, present=full.present[idx],
                           labels=full.labels[idx])
            present = present[idx]
            self._kept[split] = idx
        data = {m: full.data[m] for m in self._wanted}
        for m, x in data.items():
            if x.is_floating_point() and len(x):
                bad = torch.nonzero(~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)).flatten()
                if len(bad):
                    shown = "; ".join(self.describe_sample(split, int(i)) for i in bad[:_SHOWN])
                    more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
                    raise ConfigError(f"dataset {self.name}: modality '{m}' of {len(bad)} samples of "
                                      f"the {split} split holds NaN or inf: {shown}{more}")
        return replace(full, data=data, present=present, transform=self.transform(split))

    # -- preprocessing state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """The preprocessing state learned from the data (vocabularies, statistics, class lists,
        shapes, ...), stored in every checkpoint; plain dicts, lists, str, int, float, bool, None
        and tensors, so ``torch.load(weights_only=True)`` reads it. Empty when nothing is learned."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Use a checkpoint's learned preprocessing state instead of learning it from today's
        files (called right after construction, before any split is built)."""

    def _check_state(self, state) -> bool:
        """False for an empty state (an old checkpoint: nothing to restore); refuses another
        dataset's state."""
        if not state:
            return False
        if not isinstance(state, dict) or state.get("dataset", self.name) != self.name:
            other = state.get("dataset") if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"the checkpoint's data state is for dataset {other}, not {self.name}")
        return True

    def class_list_state(self) -> dict:
        """The learned state of a dataset whose classes are tuples (``characters(split)``): the
        class lists per split, ``/``-joined."""
        return {"dataset": self.name, "format": 1,
                "classes": {s: ["/".join(c) for c in self.characters(s)] for s in SPLITS}}

    def load_class_lists(self, state: dict, check) -> None:
        """Use a :meth:`class_list_state`'s class lists; ``check(split, class_tuple)`` refuses
        a class today's files no longer have."""
        if not self._check_state(state) or state.get("classes") is None:
            return
        classes = {s: [tuple(str(c).split("/")) for c in state["classes"][s]] for s in SPLITS}
        for s in SPLITS:
            for c in classes[s]:
                check(s, c)
        self._classes = classes
        self._cache.clear()
        self._kept.clear()

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """``{split: {"files": int, "digest": str}}``: the files each split is built from, by
        name, size and modification time (no content is read); ``{}`` when unknown."""
        return {}

    # -- naming samples ----------------------------------------------------------------------
    def describe_sample(self, split: str, index: int) -> str:
        """A human name for row ``index`` of ``self.split(split)``, e.g. its files."""
        if split not in self._kept:
            self.split(split)
        kept = self._kept.get(split)
        row = int(kept[index]) if kept is not None else int(index)
        return self.describe_row(split, row)

    def describe_row(self, split: str, row: int) -> str:
        """A human name for row ``row`` of ``self.build_split(split)`` (before dropping)."""
        return f"{self.name} {split} sample {row}"

    def describe(self) -> str:
        parts = [f"{m}{list(s.shape)} {str(s.dtype).replace('torch.', '')}" for m, s in self.modalities.items()]
        return f"{self.name}: " + ", ".join(parts)


# -- helpers for subclasses --------------------------------------------------------------------
def require_path(value, key: str, what: str) -> Path:
    """``value`` of the config key ``key`` as a Path; unset (null, ``???``, empty) refused."""
    if value is None or str(value).strip() in ("", "???"):
        raise ConfigError(f"{key} is not set: set {key}=PATH ({what})")
    return Path(str(value)).expanduser()


def files_digest(files: Iterable[Path], root: Path, extra: object = None) -> Dict[str, object]:
    """``{"files": n, "digest": hex}`` of ``files``: their paths relative to ``root``, sizes
    and modification times (plus ``extra``, JSON-serialisable)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    n = 0
    rows = []
    for f in files:
        try:
            st = os.stat(f)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        try:
            rel = Path(f).relative_to(root).as_posix()
        except ValueError:
            rel = Path(f).as_posix()
        rows.append(f"{rel}\0{size}\0{mtime}\n")
        n += 1
    for r in sorted(rows):
        h.update(r.encode())
    return {"files": n, "digest": h.hexdigest()[:32]}


def settings_digest(settings: object) -> Dict[str, object]:
    """The fingerprint of generated data: a digest of its settings, no files."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return {"files": 0, "digest": h.hexdigest()[:32]}


def describe_changes(old: Optional[dict], new: Optional[dict]) -> Optional[str]:
    """One line saying which splits' files changed between two :meth:`fingerprint` s, e.g.
    ``the train split's files changed since this checkpoint was trained (1203 files now, 1202
    then)``; None when they agree or either is missing (old checkpoints have none)."""
    if not old or not new or not isinstance(old, dict) or not isinstance(new, dict):
        return None
    order = [s for s in SPLITS if s in old or s in new] + sorted((set(old) | set(new)) - set(SPLITS))
    changed = []
    for s in order:
        o, n = old.get(s), new.get(s)
        if o == n:
            continue
        k_new = n.get("files") if isinstance(n, dict) else None
        k_old = o.get("files") if isinstance(o, dict) else None
        now = f"{k_new} file{'' if k_new == 1 else 's'} now" if isinstance(k_new, int) else "none now"
        then = f"{k_old} then" if isinstance(k_old, int) else "none then"
        changed.append((s, f"{now}, {then}"))
    if not changed:
        return None
    if len(changed) == 1:
        s, counts = changed[0]
        return f"the {s} split's files changed since this checkpoint was trained ({counts})"
    listed = ", ".join(f"the {s} split ({c})" for s, c in changed[:-1])
    s, c = changed[-1]
    return f"the files of {listed} and the {s} split ({c}) changed since this checkpoint was trained"


def most_common(values: Sequence, describe=str):
    """The most frequent value (ties: the first in sorted order of ``describe``) and its count."""
    from collections import Counter

    counts = Counter(values)
    best = sorted(counts.items(), key=lambda kv: (-kv[1], describe(kv[0])))[0]
    return best


def build_dataset(node, state: Optional[dict] = None) -> MultimodalDataset:
    """The dataset of the config node ``dataset`` (keys checked against its constructor); with
    ``state`` (a checkpoint's ``data.state``), the preprocessing learned when the run was trained
    is used instead of being learned again from today's files."""
    from metamm_cli.config import instantiate_checked

    dataset = instantiate_checked(node, "dataset", convert="all")
    if state is not None:
        dataset.load_state_dict(state)
    return dataset
