"""Checkpoints: written atomically (temporary file, fsync, rename), never non-finite, validated on
load; a format version says what a file holds."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch

from metamm_cli import ConfigError
from metamm_cli.runs import layout

FORMAT = "metamm-checkpoint"
VERSION = 3  # 2: + numpy RNG, scheduler, validation history, partial log sums (exact resume)
#             3: + the data's learned preprocessing state and fingerprint ("data")
READABLE = (1, 2, 3)  # versions `metamm eval` reads
_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_prefix(path: Path) -> str:
    """``.NAME.HOST.PID.``: a temporary file says which process writes it."""
    return f".{path.name}.{_host()}.{os.getpid()}."


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def clean_orphans(folder: Path) -> List[Path]:
    """Remove the ``.NAME.HOST.PID.*.tmp`` left by a killed write of this host whose process is
    gone; a live process's temporaries (and other hosts') are left alone."""
    from metamm_cli.runs.claim import alive

    gone, host = [], _host()
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")  # '', NAME..., HOST, PID, random, 'tmp'
        pid = int(parts[-3]) if len(parts) >= 6 and parts[-3].isdigit() else None
        if pid is not None and (parts[-4] != host or pid == os.getpid() or alive(pid)):
            continue  # a writer that may be alive (no pid: an older metamm's, whose writer is gone)
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def write_failed(path: Path, exc: BaseException) -> ConfigError:
    """A write error as one line naming the file and the root cause (a full disk, no permission)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        reason = f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    else:  # torch.save reports a failed write as '[enforce fail at inline_container.cc] ...'
        reason = f"the write failed, is the disk full? ({' '.join(str(exc).split())})"
    return ConfigError(f"cannot write {path}: {reason}")


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename: ``path`` holds either
    the old or the new content, never half; a failure names ``path`` and its cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain write honours the umask
    except OSError as e:
        raise write_failed(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            pause = os.environ.get("METAMM_TEST_SAVE_PAUSE")  # tests: a kill during the write
            if pause and path.name == layout.LAST:
                time.sleep(float(pause))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def non_finite(tensors: Dict[str, Any]) -> List[str]:
    """Names of the floating tensors (nested dicts walked) holding NaN or inf."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, dict):
            bad += [f"{name}.{n}" for n in non_finite(t)]
        elif torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            bad.append(str(name))
    return bad


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` atomically; refuses non-finite model weights (a diverged run)."""
    bad = non_finite(state.get("model", {}))
    if bad:
        raise ConfigError(f"not writing {path}: {len(bad)} non-finite model tensors "
                          f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    clean_orphans(Path(path).parent)
    state = compact(state)
    write_atomic(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def compact(x: Any) -> Any:
    """``x`` with every tensor that is a view into a larger storage copied out: torch.save writes a
    view's whole storage (a population member's weights are views into the stacked tensors,
    scale/population.py), which would put every member's weights into each checkpoint."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.untyped_storage().nbytes() > x.nbytes else x
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in x):
        return type(x)(compact(v) for v in x)
    return x


def keep_last(folder: Path, step: int, keep: int) -> None:
    """``trainer.keep_last=N``: last.pt also as step_XXXXXXXX.pt, of which the N newest stay."""
    if not keep:
        return
    step_file = Path(folder) / f"step_{step:08d}.pt"
    step_file.unlink(missing_ok=True)
    try:
        step_file.hardlink_to(Path(folder) / layout.LAST)
    except OSError:
        shutil.copy2(Path(folder) / layout.LAST, step_file)
    for old in sorted(Path(folder).glob("step_*.pt"))[:-keep]:
        old.unlink()


def short(text: str, limit: int = 200) -> str:
    """First line of ``text``, cut at a word boundary (never mid-word), never empty."""
    line = " ".join(str(text).split())
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def load_checkpoint(path: str | Path, key: str = "--ckpt", prefer: str = layout.LAST,
                    versions: Iterable[int] = READABLE) -> Dict[str, Any]:
    """Load a metamm checkpoint on the CPU (tensors only, no arbitrary pickles). ``path`` may be
    a run folder, which means its ``checkpoints/<prefer>``."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / layout.CHECKPOINTS / prefer, path / prefer):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ConfigError(f"{key} {path}: a folder without checkpoints/{prefer}")
    if not path.is_file():
        raise ConfigError(f"{key} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything on a foreign file
        raise ConfigError(f"{key} {path}: not a readable metamm checkpoint "
                          f"({type(e).__name__}: {short(e, 160) or 'no reason given'})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{key} {path}: not a metamm checkpoint (no '{FORMAT}' marker)")
    version, versions = state.get("version"), tuple(versions)
    if version not in versions:
        if isinstance(version, int) and version > max(versions):
            todo = "it was written by a newer metamm: upgrade metamm to read it"
        else:
            todo = ("it was written by an older metamm: evaluate it with `metamm eval`, or retrain"
                    if key == "trainer.resume" and isinstance(version, int) and version in READABLE
                    else "it was written by an older metamm: re-create it with this version")
        raise ConfigError(f"{key} {path}: checkpoint format version {version} is not supported here "
                          f"(this metamm reads {', '.join(map(str, versions))}); {todo}")
    state["path"] = str(path)
    return state
