"""Readers of the on-disk layouts in which the few-shot benchmarks circulate (learn2learn's,
MetaOptNet's and CloserLook's files, Ravi & Larochelle's CSVs, class folders with split lists).

A :class:`Layout` knows its files per split (:meth:`Layout.split_files`: cheap, the cache key and
the fingerprint; a missing file is a one-line error naming it) and reads a split
(:meth:`Layout.read` -> :class:`Source`): the class names, each image's label, and either the
decoded arrays (pickles, ``.npz``) or the image files to decode. Classes are numbered by their
names in sorted order whatever the layout, so one checkpoint reads every layout of a set alike.

Pickles are read with an unpickler that builds only numpy arrays and plain containers (no other
code runs); Python 2 pickles (MetaOptNet's) are read as latin-1. Every malformed input is a
one-line :class:`metamm_cli.ConfigError` naming the file, the key, the row or the class.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from metamm_cli import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
Item = Tuple[str, Union[Path, bytes]]  # (name for messages, file or encoded bytes)


@dataclass
class Source:
    """One split as its files hold it. ``labels [N]`` index ``names``; the images are either
    ``arrays()`` (chunks ``[n, H, W, 3]`` or ``[n, H, W]`` uint8, in row order) or ``items``
    (one encoded image per row); ``origin`` names row ``i`` for messages (``{"file", "key"}``:
    item ``i`` of an array in a file, or ``{"paths": [...]}``)."""

    names: List[str]
    labels: np.ndarray
    origin: dict
    arrays: Optional[Callable[[], Iterator[np.ndarray]]] = None
    items: Optional[Sequence[Item]] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def describe_origin(origin: dict, row: int) -> str:
    if "paths" in origin:
        return str(origin["paths"][row])
    return f"{origin['file']}: {origin['key']}[{row}]"


class Layout:
    """One layout: ``name``, the files it reads (``doc``), per split ``split_files`` and ``read``."""

    name = "layout"
    doc = ""

    def split_files(self, root: Path, split: str) -> List[Path]:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, root: Path, split: str) -> Source:  # pragma: no cover - interface
        raise NotImplementedError

    def marker(self, root: Path) -> Path:
        """The file whose presence says ``root`` holds this layout (the train split's first)."""
        return self.split_files(root, "train")[0]

    def detect(self, root: Path) -> bool:
        try:
            return self.marker(root).is_file()
        except ConfigError:
            return False


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{path}: missing ({what})")
    return path


# -- pickles -----------------------------------------------------------------------------------
_SAFE = {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
         ("copyreg", "_reconstructor")}
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
             "complex", "bool", "slice", "object", "range"}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, scalars and dtypes and Python's plain containers; any other class
    (code a pickle could run) is refused."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" or (module, name) in _SAFE or \
                (module in ("builtins", "__builtin__") and name in _BUILTINS):
            return super().find_class("builtins" if module == "__builtin__" else module, name)
        raise pickle.UnpicklingError(f"refused class {module}.{name}")


def load_pickle(path: Path, what: str):
    """A pickle of arrays -> its object; Python 2 pickles (bytes as latin-1) too."""
    need_file(path, what)
    data = path.read_bytes()
    last = None
    for encoding in ("ASCII", "latin1"):
        try:
            return _ArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
        except pickle.UnpicklingError as e:
            if "refused class" in str(e):
                raise ConfigError(f"{path}: not a pickle of arrays ({e}); expected {what}") from None
            last = e
        except UnicodeDecodeError as e:
            last = e
        except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError,
                MemoryError, OverflowError, struct.error) as e:
            last = e
    raise ConfigError(f"{path}: not a readable pickle (corrupt or cut short: {type(last).__name__}); "
                      f"expected {what}") from None


def pickle_dict(path: Path, keys: Sequence[str], what: str, layout: str) -> dict:
    """The pickle at ``path``, which must be a dict holding ``keys``."""
    obj = load_pickle(path, what)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: holds a {type(obj).__name__}, not the dict of {layout}'s layout "
                          f"(keys {list(keys)}); a pickle of another layout?")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ConfigError(f"{path}: no key '{missing[0]}' (it holds {sorted(map(str, obj))[:8]}); "
                          f"{layout}'s layout has {list(keys)}: a pickle of another layout?")
    return obj


def image_array(x, path: Path, key: str) -> np.ndarray:
    """``x`` as a uint8 ``[N, H, W, 3]`` or ``[N, H, W]`` array, else a one-line refusal."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception:  # noqa: BLE001 - reported below
            raise ConfigError(f"{path}: '{key}' is a {type(x).__name__}, not an image array") from None
    if x.dtype != np.uint8:
        raise ConfigError(f"{path}: '{key}' holds {x.dtype} pixels; expected uint8 images "
                          f"[N, H, W, 3] (16-bit or float arrays are not these sets' files)")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ConfigError(f"{path}: '{key}' has shape {list(x.shape)}; expected images [N, H, W, 3]")
    return x


def label_array(x, n: int, path: Path, key: str) -> np.ndarray:
    try:
        y = np.asarray(x)
    except Exception:  # noqa: BLE001
        y = np.zeros(0)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ConfigError(f"{path}: '{key}' is not a list of integer labels (shape {list(np.shape(y))}, "
                          f"{getattr(y, 'dtype', '?')})")
    if len(y) != n:
        raise ConfigError(f"{path}: '{key}' has {len(y)} labels for {n} images")
    return y.astype(np.int64)


def by_name(names_of_rows: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """Per-row class names -> (sorted distinct names, each row's index into them)."""
    names, labels = np.unique(np.asarray(names_of_rows, dtype=object).astype(str), return_inverse=True)
    return [str(n) for n in names], labels.astype(np.int64)


def relabel(y: np.ndarray, name_of: Callable[[int], str]) -> Tuple[List[str], np.ndarray]:
    """Integer labels -> (the sorted names of the distinct labels, each row's index into them)."""
    ids, inverse = np.unique(y, return_inverse=True)
    names = [name_of(int(i)) for i in ids]
    order = np.argsort(np.asarray(names, dtype=object).astype(str), kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return [names[i] for i in order], rank[inverse.reshape(-1)]


def chunks(x: np.ndarray, size: int = 2048) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (x[i:i + size] for i in range(0, len(x), size))


class ClassDictPickle(Layout):
    """learn2learn's miniImageNet: ``mini-imagenet-cache-{train,validation,test}.pkl``, a dict of
    ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (class -> image indices)."""

    name = "l2l"

    def __init__(self, pattern: str, splits: Dict[str, str]):
        self.pattern, self.splits = pattern, splits
        self.doc = pattern.format(split="{" + ",".join(splits.values()) + "}")

    def split_files(self, root, split):
        return [root / self.pattern.format(split=self.splits[split])]

    def read(self, root, split):
        path = need_file(self.split_files(root, split)[0], f"learn2learn's {split} pickle")
        d = pickle_dict(path, ("image_data", "class_dict"), "image_data and class_dict", "learn2learn")
        x = image_array(d["image_data"], path, "image_data")
        row_class = np.full(len(x), "", dtype=object)
        if not isinstance(d["class_dict"], dict):
            raise ConfigError(f"{path}: 'class_dict' is a {type(d['class_dict']).__name__}, not a dict")
        for name, rows in d["class_dict"].items():
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            bad = rows[(rows < 0) | (rows >= len(x))]
            if len(bad):
                raise ConfigError(f"{path}: class_dict['{name}'] lists image {int(bad[0])}, but "
                                  f"image_data has {len(x)} images")
            row_class[rows] = str(name)
        orphans = np.nonzero(row_class == "")[0]
        if len(orphans):
            raise ConfigError(f"{path}: image {int(orphans[0])} of image_data is in no class of class_dict "
                              f"({len(orphans)} such images)")
        names, labels = by_name(row_class)
        return Source(names, labels, {"file": str(path), "key": "image_data"}, arrays=chunks(x))


class DataLabelsPickle(Layout):
    """MetaOptNet's pickles: a dict of ``data`` (uint8 ``[N, H, W, 3]``) and ``labels`` (ints),
    with ``catname2label`` (class name -> label) where the file has it (miniImageNet's), else
    names from ``label_names(label)``."""

    name = "metaoptnet"

    def __init__(self, files: Dict[str, str], label_names: Callable[[int], str] = lambda i: f"label_{i:03d}"):
        self.files, self.label_names = files, label_names
        self.doc = ", ".join(files.values())

    def split_files(self, root, split):
        return [root / self.files[split]]

    def read(self, root, split):
        path = need_file(self.split_files(root, split)[0], f"MetaOptNet's {split} pickle")
        d = pickle_dict(path, ("data", "labels"), "data and labels", "MetaOptNet")
        x = image_array(d["data"], path, "data")
        y = label_array(d["labels"], len(x), path, "labels")
        named = {}
        if isinstance(d.get("catname2label"), dict):
            named = {int(v): str(k) for k, v in d["catname2label"].items()}
        names, labels = relabel(y, lambda i: named.get(i) or self.label_names(i))
        return Source(names, labels, {"file": str(path), "key": "data"}, arrays=chunks(x))


class CsvImages(Layout):
    """Ravi & Larochelle's ``{train,val,test}.csv`` (header ``filename,label``) with the images
    in ``images/`` (the LibFewShot layout)."""

    name = "csv"
    doc = "{train,val,test}.csv (filename,label) + images/"

    def marker(self, root):
        return root / "train.csv"

    def rows(self, root: Path, split: str) -> List[Tuple[int, Path, str]]:
        path = need_file(root / f"{split}.csv", f"Ravi & Larochelle's {split} split list")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a readable UTF-8 CSV ({type(e).__name__})") from None
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if [h.strip() for h in header or []] != ["filename", "label"]:
            raise ConfigError(f"{path}: header {header}, expected filename,label (Ravi & Larochelle's CSV)")
        out = []
        for i, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise ConfigError(f"{path}: row {i} has {len(row)} fields, expected filename,label")
            out.append((i, root / "images" / row[0].strip(), row[1].strip()))
        return out

    def split_files(self, root, split):
        rows = self.rows(root, split)
        for i, f, _ in rows:
            if not f.is_file():
                raise ConfigError(f"{root / f'{split}.csv'}: row {i}: {f} not found")
        return [root / f"{split}.csv"] + [f for _, f, _ in rows]

    def read(self, root, split):
        rows = self.rows(root, split)
        names, labels = by_name([c for _, _, c in rows])
        return Source(names, labels, {"paths": [str(f) for _, f, _ in rows]},
                      items=[(str(f), f) for _, f, _ in rows])


class JsonLists(Layout):
    """CloserLook's ``base.json``, ``val.json``, ``novel.json``: ``label_names`` (every class),
    ``image_names`` (paths, often absolute on the machine that wrote them) and ``image_labels``
    (indices into ``label_names``). A path that does not exist is looked up under ``root`` by its
    last two parts (``class/file``, also in ``root/images/``), then as ``root/images/<file>``."""

    name = "closer"
    FILES = {"train": "base.json", "val": "val.json", "test": "novel.json"}
    doc = "base.json, val.json, novel.json (label_names, image_names, image_labels) + the images"

    def marker(self, root):
        return root / "base.json"

    def load(self, root: Path, split: str):
        path = need_file(root / self.FILES[split], f"CloserLook's {split} list")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not readable JSON ({type(e).__name__})") from None
        keys = ("label_names", "image_names", "image_labels")
        if not isinstance(d, dict) or any(k not in d for k in keys):
            have = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"{path}: expected the keys {list(keys)} (CloserLook's lists), found {have}")
        names, files, labels = d["label_names"], d["image_names"], d["image_labels"]
        if len(files) != len(labels):
            raise ConfigError(f"{path}: {len(files)} image_names but {len(labels)} image_labels")
        rows = []
        for i, (f, y) in enumerate(zip(files, labels)):
            if not isinstance(y, int) or not 0 <= y < len(names):
                raise ConfigError(f"{path}: image_labels[{i}]={y} is not an index into label_names "
                                  f"({len(names)} names)")
            rows.append((i, self.resolve(root, str(f)), str(names[y]), str(f)))
        return path, rows

    @staticmethod
    def resolve(root: Path, name: str) -> Path:
        p = Path(name)
        tail = Path(*p.parts[-2:]) if len(p.parts) >= 2 else Path(p.name)
        for cand in (p if p.is_absolute() else root / p, root / tail, root / "images" / tail, root / "images" / p.name):
            if cand is not None and cand.is_file():
                return cand
        return p if p.is_absolute() else root / p

    def split_files(self, root, split):
        path, rows = self.load(root, split)
        for i, f, _, given in rows:
            if not f.is_file():
                raise ConfigError(f"{path}: image_names[{i}] = {given} not found (nor under {root})")
        return [path] + [f for _, f, _, _ in rows]

    def read(self, root, split):
        _, rows = self.load(root, split)
        names, labels = by_name([c for _, _, c, _ in rows])
        return Source(names, labels, {"paths": [str(f) for _, f, _, _ in rows]},
                      items=[(str(f), f) for _, f, _, _ in rows])


class ClassFolders(Layout):
    """Class folders ``<data>/<class>/<image>`` with the split's class names, one per line, in
    ``<lists>/{train,val,test}.txt`` (Bertinetto et al.'s CIFAR-FS: ``data/`` and
    ``splits/bertinetto/``)."""

    name = "folders"

    def __init__(self, data: str = "data", lists: str = "splits/bertinetto"):
        self.data, self.lists = data, lists
        self.doc = f"{data}/<class>/<image> + {lists}/{{train,val,test}}.txt"

    def marker(self, root):
        return root / self.lists / "train.txt"

    def classes(self, root: Path, split: str) -> Tuple[Path, List[str]]:
        path = need_file(root / self.lists / f"{split}.txt", f"the {split} split's class list")
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return path, names

    def files_of(self, root: Path, split: str) -> List[Tuple[Path, str]]:
        path, names = self.classes(root, split)
        out = []
        for name in names:
            d = root / self.data / name
            if not d.is_dir():
                raise ConfigError(f"{path}: class '{name}' of the {split} split has no folder {d}")
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not files:
                raise ConfigError(f"{d}: no image files (class '{name}' of the {split} split)")
            out += [(f, name) for f in files]
        return out

    def split_files(self, root, split):
        return [self.classes(root, split)[0]] + [f for f, _ in self.files_of(root, split)]

    def read(self, root, split):
        rows = self.files_of(root, split)
        names, labels = by_name([c for _, c in rows])
        return Source(names, labels, {"paths": [str(f) for f, _ in rows]}, items=[(str(f), f) for f, _ in rows])


class PngPickle(Layout):
    """Ren et al.'s tieredImageNet as learn2learn reads it: ``{split}_images_png.pkl`` (a list of
    PNG-encoded images) with ``{split}_labels.pkl`` (``label_specific``, and the class names in
    ``label_specific_str`` where present)."""

    name = "l2l"
    doc = "{train,val,test}_images_png.pkl + {split}_labels.pkl"

    def split_files(self, root, split):
        return [root / f"{split}_images_png.pkl", root / f"{split}_labels.pkl"]

    def read(self, root, split):
        ipath, lpath = self.split_files(root, split)
        images = load_pickle(ipath, "a list of PNG-encoded images")
        if isinstance(images, dict) or not hasattr(images, "__len__"):
            raise ConfigError(f"{ipath}: holds a {type(images).__name__}, not the list of PNG images of "
                              f"learn2learn's tieredImageNet layout; a pickle of another layout?")
        y, names = tiered_labels(lpath, len(images))
        items = [(f"{ipath}: [{i}]", as_bytes(b, ipath, i)) for i, b in enumerate(images)]
        return Source(names, y, {"file": str(ipath), "key": "images"}, items=items)


def as_bytes(b, path: Path, i: int) -> bytes:
    if isinstance(b, (bytes, bytearray)):
        return bytes(b)
    if isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1:
        return b.tobytes()
    raise ConfigError(f"{path}: image {i} is a {type(b).__name__}, not PNG-encoded bytes")


def tiered_labels(path: Path, n: int) -> Tuple[np.ndarray, List[str]]:
    """``{split}_labels.pkl``: per-image labels (``label_specific``) -> (labels into sorted
    names, sorted names); names from ``label_specific_str`` when it lists one per label."""
    d = pickle_dict(path, ("label_specific",), "label_specific (and label_specific_str)", "tieredImageNet")
    y = label_array(d["label_specific"], n, path, "label_specific")
    strs = d.get("label_specific_str")
    known = strs is not None and len(y) and len(strs) > int(y.max())
    names, labels = relabel(y, lambda i: str(strs[i]) if known else f"label_{i:03d}")
    return labels, names


class NpzImages(Layout):
    """MetaOptNet's tieredImageNet: ``{split}_images.npz`` (array ``images``, uint8
    ``[N, 84, 84, 3]``) with ``{split}_labels.pkl``; the array is streamed from the archive in
    chunks (never whole in memory)."""

    name = "metaoptnet"
    doc = "{train,val,test}_images.npz (images) + {split}_labels.pkl"

    def split_files(self, root, split):
        return [root / f"{split}_images.npz", root / f"{split}_labels.pkl"]

    def header(self, path: Path):
        need_file(path, "MetaOptNet's tieredImageNet images")
        try:
            z = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ConfigError(f"{path}: not a readable .npz archive ({type(e).__name__})") from None
        if "images.npy" not in z.namelist():
            raise ConfigError(f"{path}: no array 'images' (it holds {[n[:-4] for n in z.namelist()]}); "
                              f"MetaOptNet's layout has images")
        f = z.open("images.npy")
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{path}: array 'images' is unreadable ({type(e).__name__})") from None
        image_array(np.zeros((0,) + tuple(shape[1:]), dtype=dtype), path, "images")
        if fortran:
            raise ConfigError(f"{path}: array 'images' is Fortran-ordered; save it C-ordered")
        return z, f, tuple(shape)

    def read(self, root, split):
        ipath, lpath = self.split_files(root, split)
        z, f, shape = self.header(ipath)
        f.close(), z.close()
        y, names = tiered_labels(lpath, shape[0])

        def arrays(size: int = 1024):
            z, f, shape = self.header(ipath)
            row = int(np.prod(shape[1:]))
            try:
                for start in range(0, shape[0], size):
                    n = min(size, shape[0] - start)
                    buf = f.read(n * row)
                    if len(buf) != n * row:
                        raise ConfigError(f"{ipath}: array 'images' is cut short at image {start + len(buf) // row}")
                    yield np.frombuffer(buf, dtype=np.uint8).reshape((n,) + shape[1:])
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ConfigError(f"{ipath}: array 'images' is unreadable ({type(e).__name__})") from None
            finally:
                f.close(), z.close()
        return Source(names, y, {"file": str(ipath), "key": "images"}, arrays=arrays)
