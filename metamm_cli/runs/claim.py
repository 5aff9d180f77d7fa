"""One live process per run folder: the ``RUNNING`` claim.

A process claims a run folder before any work on it (a new run at start-up, a resumed one before
its data is loaded) and releases it when it ends. The claim is taken atomically: the check and
the write happen under an exclusive ``flock`` of the folder, and a fresh marker is created with
``O_EXCL``, so of two resumes of the same run started together exactly one proceeds and the
other is refused in one line. A marker whose process is gone (a killed run) is stale and is
taken over. Markers written on another host are assumed live.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, Optional

from metamm_cli import ConfigError
from metamm_cli.runs import layout

_HELD: set = set()  # run folders this process holds


def _read(run_dir: Path) -> Optional[Dict]:
    try:
        mark = json.loads((Path(run_dir) / layout.CLAIM).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process of this host that could be metamm (python)."""
    try:
        os.kill(pid, 0)
    except (OSError, TypeError, ValueError, OverflowError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.is_dir():  # no /proc: trust the signal test
        return True
    try:
        cmd = cmdline.read_bytes()
        if not cmd:  # a process starting (before exec) or a zombie
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
    return b"metamm" in cmd or b"python" in cmd  # otherwise the pid was reused


def _live(mark: Optional[Dict]) -> bool:
    if not mark:
        return False
    if mark.get("host") != socket.gethostname():
        return True  # another machine's run: assume alive
    return alive(mark.get("pid", -1))


def running_pid(run_dir: Path) -> Optional[int]:
    """The pid of the live process holding ``run_dir``, or None (no marker, or a stale one)."""
    mark = _read(run_dir)
    return mark.get("pid", -1) if _live(mark) else None


def _ours(mark: Optional[Dict]) -> bool:
    return bool(mark) and mark.get("pid") == os.getpid() and mark.get("host") == socket.gethostname()


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive flock of the folder itself (released on close, also when the process dies).
    On a file system without flock the O_EXCL create below still separates the common case."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(run_dir: Path, key: str = "run") -> None:
    """Take ``run_dir`` for this process; a live holder is a one-line error naming it (``key`` is
    what the user asked for, e.g. ``trainer.resume=...``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    with _locked(run_dir):
        mark = _read(run_dir)
        if not _ours(mark):
            if _live(mark):
                raise ConfigError(f"{key}: run {run_dir} is in use by pid {mark.get('pid')} on "
                                  f"{mark.get('host')} (since {mark.get('since')}); wait for it or stop "
                                  f"it first; delete {run_dir / layout.CLAIM} only if that process is gone")
            path = run_dir / layout.CLAIM
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # stale marker: replace it whole
                tmp = run_dir / f".{layout.CLAIM}.{os.getpid()}.tmp"
                tmp.write_bytes(body)
                os.replace(tmp, path)
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
    if not _HELD:
        atexit.register(release_all)
    _HELD.add(run_dir.resolve())


def release(run_dir: Path) -> None:
    """Drop this process's claim on ``run_dir`` (another process's marker is left alone)."""
    run_dir = Path(run_dir)
    _HELD.discard(run_dir.resolve())
    if _ours(_read(run_dir)):
        (run_dir / layout.CLAIM).unlink(missing_ok=True)


def release_all() -> None:
    for run_dir in list(_HELD):
        release(run_dir)
