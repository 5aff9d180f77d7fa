"""Decode once, then load the decoded arrays from a cache folder.

An entry is one ``torch.save`` file of a dict (tensors, lists of names) whose file name is a
hash of the source files (name, size, modification time) and of the preprocessing settings,
so editing a source file or changing a setting (image size, mel bins, ...) makes a new entry.
Writes are atomic (a temporary file renamed into place), so an interrupted or concurrent run
never leaves a half-written entry. Folder: ``cache_dir`` (the dataset key ``dataset.cache_dir``),
else ``$METAMM_CACHE``, else ``~/.cache/metamm``; ``dataset.cache=false`` turns caching off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

import torch

log = logging.getLogger("metamm")

FORMAT = 1  # bump when the layout of cached entries changes


def cache_dir(explicit: Optional[str] = None) -> Path:
    """The cache folder: ``explicit``, else ``$METAMM_CACHE``, else ``~/.cache/metamm``."""
    path = explicit or os.environ.get("METAMM_CACHE") or Path.home() / ".cache" / "metamm"
    return Path(path).expanduser()


def fingerprint(files: Iterable[Path], settings: Dict[str, Any]) -> str:
    """A hex digest of the files' names, sizes and mtimes (not their contents: stat is fast)
    and of ``settings`` (JSON-serialisable)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cached(name: str, files: Iterable[Path], settings: Dict[str, Any],
           build: Callable[[], Dict[str, Any]], folder: Optional[str] = None,
           enabled: bool = True) -> Dict[str, Any]:
    """``build()``'s result, from ``<folder>/<name>-<fingerprint>.pt`` when present, else built
    and stored there (a failure to write the cache, for any reason, only logs a warning; an
    unreadable entry is rebuilt)."""
    if not enabled:
        return build()
    path = cache_dir(folder) / f"{name}-{fingerprint(files, settings)}.pt"
    if path.is_file():
        try:
            value = torch.load(path, weights_only=True)
            if isinstance(value, dict):
                return value
            raise ValueError("not a dict")
        except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
            log.warning(f"cache entry {path} unreadable ({type(e).__name__}): rebuilding it")
    value = build()
    store(path, value)
    return value


def mapped(name: str, files: Iterable[Path], settings: Dict[str, Any],
           build: Callable[[Callable[[tuple], Any]], Dict[str, Any]], folder: Optional[str] = None,
           enabled: bool = True) -> Dict[str, Any]:
    """As :func:`cached`, for a split too large for memory: ``build(alloc)`` fills the uint8
    array ``alloc(shape)`` (a file in the cache folder, written as it decodes) and returns the
    entry's other values plus ``"images"``: that array. The entry is two files,
    ``<name>-<fingerprint>.u8`` (the raw array) and ``.pt`` (the rest, with its shape), both
    renamed into place only once the build has finished: an interrupted or failed decode leaves
    no entry. The array is memory-mapped copy-on-write (``np.memmap`` mode ``c``): pages are
    read from disk as episodes touch them. Disabled: the array is built in memory."""
    import numpy as np

    if not enabled:
        value = build(lambda shape: np.empty(shape, dtype=np.uint8))
        return {**value, "images": torch.from_numpy(value["images"])}
    base = cache_dir(folder) / f"{name}-{fingerprint(files, settings)}"
    meta_path, raw_path = Path(f"{base}.pt"), Path(f"{base}.u8")
    if meta_path.is_file() and raw_path.is_file():
        try:
            meta = torch.load(meta_path, weights_only=True)
            shape = tuple(meta["shape"])
            if raw_path.stat().st_size == int(np.prod(shape)):
                images = np.memmap(raw_path, dtype=np.uint8, mode="c", shape=shape)
                return {**meta, "images": torch.from_numpy(images)}
            raise ValueError("size differs from its shape")
        except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
            log.warning(f"cache entry {raw_path} unreadable ({type(e).__name__}): rebuilding it")
    tmp: list = []

    def alloc(shape: tuple):
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=raw_path.parent, prefix=raw_path.name, suffix=".tmp")
        os.close(fd)
        tmp.append(path)
        return np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)

    try:
        value = build(alloc)
        images = value.pop("images")
        images.flush()
        shape = tuple(images.shape)
        if store(meta_path.with_name(meta_path.name + ".next"), {**value, "shape": list(shape)}):
            os.replace(tmp[0], raw_path)
            os.replace(meta_path.with_name(meta_path.name + ".next"), meta_path)
            tmp.clear()
            images = np.memmap(raw_path, dtype=np.uint8, mode="c", shape=shape)
        return {**value, "images": torch.from_numpy(np.asarray(images) if tmp else images)}
    finally:
        for path in tmp:  # failed: no entry (a still-mapped array stays readable until closed)
            try:
                os.unlink(path)
            except OSError:
                pass


def _reason(e: BaseException) -> str:
    """A short cause for a warning: the OS's words, else the exception's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__


def store(path: Path, value: Dict[str, Any]) -> bool:
    """Write ``value`` to ``path`` atomically (a temporary file renamed into place). Any failure
    (a full disk makes ``torch.save`` raise RuntimeError, not OSError) logs one warning line and
    returns False: the cache only saves time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save(value, fh)
        os.replace(tmp, path)
        tmp = None
        return True
    except Exception as e:  # noqa: BLE001 - any reason: warn, carry on without the cache
        log.warning(f"could not write the data cache {path} ({_reason(e)}); carrying on without "
                    f"it (set dataset.cache_dir or METAMM_CACHE to a writable folder with space)")
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
