"""What a run is beyond its weights: the state a checkpoint holds and restores (RunState), which
run ``trainer.resume`` continues and how its config may change, the 'running' marker, the
reproducibility record, and stop signals (SIGINT/SIGTERM) taken between steps."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError, __version__
from metamm_cli.checkpoint import clean_orphans, mismatch, write_atomic

log = logging.getLogger("metamm")
MODEL_KEYS = ("encoder", "fusion", "algorithm", "dataset.modalities")  # their change breaks the weights
RUNNING = "RUNNING"


class RunState:
    """Everything that makes a resumed run continue bit-identically: the modules' states, the
    step, the best validation, the history, the partial log sums and every RNG."""

    def __init__(self, modules: Dict[str, Any], sampler, device: torch.device):
        self.modules, self.sampler, self.device = modules, sampler, device
        self.step, self.best, self.best_step, self.history = 0, float("-inf"), 0, []
        self.sums = torch.zeros(3, device=device)  # loss, acc (tasks), good steps since the last log
        self.tasks = 0  # tasks since the last log
        self.bad = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps (all time)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, loss: torch.Tensor, acc: torch.Tensor, bad: torch.Tensor, tasks: int) -> None:
        """After a step, on the device (no host sync): the log sums without non-finite steps."""
        self.step += 1
        self.sums += torch.stack([torch.where(bad, 0, loss), torch.where(bad, 0, acc),
                                  (~bad).to(loss.dtype) * tasks]).float()
        self.tasks += tasks
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step, self.first_bad)
        self.bad += bad.long()

    def take_log(self, seconds: float) -> Dict[str, float]:
        """The mean train loss/accuracy since the last log point (one host sync); resets them."""
        loss, acc, good = self.sums.tolist()
        nan = float("nan")
        out = {"train/loss": loss / good if good else nan, "train/acc": acc / good if good else nan,
               "episodes_per_s": self.tasks / seconds if seconds > 0 else nan}
        self.sums.zero_()
        self.tasks = 0
        return out

    def state_dict(self, config: Dict) -> Dict[str, Any]:
        return {"step": self.step, "best_val_acc": self.best, "best_step": self.best_step,
                "history": self.history, "config": config, "log_sums": self.sums.cpu(),
                "log_tasks": self.tasks, "bad": self.bad.cpu(), "first_bad": self.first_bad.cpu(),
                **{name: m.state_dict() for name, m in self.modules.items()},
                "rng": {"torch": torch.get_rng_state(), "sampler": self.sampler.generator.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                        "python": random.getstate(), "numpy": _np_state()}}

    def load(self, state: Dict[str, Any]) -> None:
        for name, m in self.modules.items():
            if state.get(name) is not None:
                m.load_state_dict(state[name])
        self.step, self.best, self.best_step = state["step"], state["best_val_acc"], state["best_step"]
        self.history = list(state.get("history", []))
        self.sums = state["log_sums"].to(self.device)
        self.tasks = state["log_tasks"]
        self.bad, self.first_bad = state["bad"].to(self.device), state["first_bad"].to(self.device)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        try:
            self.sampler.generator.set_state(rng["sampler"])
        except RuntimeError:  # a CUDA generator's state does not fit a CPU one (or back)
            log.warning("resuming on another device: episodes will differ from an uninterrupted run")
        random.setstate(_tuples(rng["python"]))
        kind, keys, pos, gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, gauss, cached))


def _np_state():
    kind, keys, pos, gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(gauss), float(cached))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- a run: its modules, samplers, folder and state

@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    algo: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_sampler: Any
    val_sampler: Any
    val_tasks: int
    autocast: Any
    state: RunState
    writer: Any = None
    bar: Any = None
    saved_step: int = -1
    last: Optional[Dict[str, float]] = None
    train_time: float = 0.0
    window: float = 0.0  # training seconds since the last log point
    episodes: int = 0  # training episodes (tasks) logged by this process
    val: Optional[Dict[str, float]] = None  # the last validation
    resumed_from: Optional[str] = None

    def timed(self, seconds: float) -> None:
        self.window += seconds
        self.train_time += seconds

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def stored_config(self) -> Dict:
        return OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)


def restore(run: Run, ckpt: Dict, changes: List[str]) -> None:
    try:
        run.state.load(ckpt)
    except (RuntimeError, ValueError, KeyError) as e:
        why = mismatch(run.algo, ckpt["model"])
        changed = ", ".join(c.split(": ")[1] for c in changes)
        raise ConfigError(f"trainer.resume={ckpt['path']}: the checkpoint does not fit this config "
                          f"({why}{f'; changed: {changed}' if changed else ''})") from e
    for line in changes:
        log.info(line)
    log.info(f"resumed from {ckpt['path']} at step {run.state.step}")
    run.resumed_from = ckpt["path"]
    old_best = Path(ckpt["path"]).parent / "best.pt"
    if old_best.is_file() and old_best.parent.resolve() != run.ckpt_dir.resolve():  # another folder: complete on its own
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old_best, run.ckpt_dir / "best.pt")


def open_folder(run: Run, overrides: List[str], changes: List[str], resumed: bool) -> None:
    """The run folder: orphan temporaries removed, the 'running' marker, config.yaml, run.json,
    TensorBoard (a resumed run drops the points logged after its checkpoint)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    clean_orphans(run.ckpt_dir)
    mark_running(run.run_dir)
    write_atomic(run.run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(run.stored_config()).encode()))
    record_run(run.run_dir, overrides, run.device, run.state.step if resumed else None, changes)
    if run.cfg.trainer.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=run.state.step + 1 if resumed else None)


def write_metrics(run: Run, val: Optional[Dict], **extra) -> Dict[str, Any]:
    S = run.state
    last = run.last or {}
    metrics = finite_json({
        "step": S.step, "val_acc": val["accuracy"] if val else None,
        "val_acc_ci95": val["ci95"] if val else None, "val_episodes": val["episodes"] if val else None,
        "best_val_acc": S.best if S.history else None, "best_step": S.best_step,
        "train_loss": last.get("train/loss"), "train_acc": last.get("train/acc"),
        "episodes_per_s": run.episodes / run.train_time if run.train_time else None, "train_time_s": run.train_time,
        "skipped_steps": int(S.bad), "device": str(run.device), "run_dir": str(run.run_dir),
        "resumed_from": run.resumed_from, "history": S.history, **extra})
    write_atomic(run.run_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    return metrics



def resume_state(cfg: DictConfig) -> Optional[Dict]:
    """The checkpoint ``trainer.resume`` names (null: none)."""
    from metamm_cli.checkpoint import VERSION, load_checkpoint

    path = find_resume(cfg.trainer.resume, Path(cfg.output_root) / cfg.task_name)
    return None if path is None else load_checkpoint(path, key="trainer.resume", versions=(VERSION,))


def finished(ckpt: Dict, cfg: DictConfig, overrides: List[str]) -> Optional[Dict]:
    """A resumed run that already reached its trainer.max_steps: says so, returns its metrics."""
    max_steps = merge_resume(ckpt["config"], cfg, overrides)[0].trainer.max_steps
    if ckpt["step"] < max(max_steps, 1):
        return None
    run = run_dir_of(Path(ckpt["path"])) or ckpt["path"]
    print(f"run {run} already finished at step {ckpt['step']}: nothing to train "
          f"(raise trainer.max_steps to continue it)")
    done = Path(ckpt["path"]).parent.parent / "metrics.json"
    return json.loads(done.read_text()) if done.is_file() else {"step": ckpt["step"], "val_acc": None}


class Diverged(ConfigError):
    """A non-finite loss or gradient under trainer.on_nan=stop."""


def stop_now(run: Run, signum: int) -> None:
    name = signal.Signals(signum).name
    write_metrics(run, None, interrupted=name)
    log.warning(f"{name} at step {run.state.step}: checkpoint saved to {run.ckpt_dir / 'last.pt'}; "
                f"resume with: metamm train trainer.resume={run.run_dir}")
    raise SystemExit(128 + signum)



# -- which run to resume --------------------------------------------------------------------------

def running_pid(run_dir: Path) -> Optional[int]:
    """The pid of the live process training in ``run_dir``, or None (no marker, or a stale one)."""
    try:
        mark = json.loads((Path(run_dir) / RUNNING).read_text())
    except (OSError, ValueError):
        return None
    if mark.get("host") != socket.gethostname():
        return mark.get("pid", -1)  # another machine's run: assume alive
    try:
        os.kill(mark["pid"], 0)
        cmd = Path(f"/proc/{mark['pid']}/cmdline").read_bytes() if Path("/proc").is_dir() else b"metamm"
    except (OSError, KeyError, TypeError):
        return None
    return mark["pid"] if b"metamm" in cmd or b"python" in cmd else None  # pid reused otherwise


def mark_running(run_dir: Path) -> None:
    (Path(run_dir) / RUNNING).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}))


def find_resume(resume: Any, runs_root: Path) -> Optional[Path]:
    """``trainer.resume``: null, true (the newest resumable ``last.pt`` under ``runs_root`` whose
    run is not still running) or a checkpoint/run path (refused while its run is running)."""
    if resume in (None, False, "", "false", "null"):
        return None
    if resume is True or resume == "true":
        found = sorted((p for p in Path(runs_root).glob("*runs/**/checkpoints/last.pt")
                        if running_pid(p.parent.parent) is None), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"trainer.resume=true: no checkpoints/last.pt of a stopped run under {runs_root}/")
        return found[-1]
    path = Path(str(resume)).expanduser()
    run = path if path.is_dir() else path.parent.parent
    pid = running_pid(run)
    if pid is not None:
        raise ConfigError(f"trainer.resume={resume}: that run is still running (pid {pid}, see {run / RUNNING}); "
                          f"stop it first, or delete {RUNNING} if the process is gone")
    return path


def run_dir_of(ckpt: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/x.pt``), else None."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def merge_resume(stored: Dict, cfg: DictConfig, overrides: List[str]) -> Tuple[DictConfig, List[str]]:
    """The checkpoint's config with only the keys given on the command line taken from ``cfg``;
    returns it and one line per change. A change that alters the model is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from metamm_cli.config import TrainConfig

    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), stored)
    changes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.package or o.key_or_group.replace("/", ".")
        if key in ("trainer.resume", "exp", "task_name", "output_root") or key.startswith(("hydra", "_global_")):
            continue  # a preset only says where trainer.resume=true looks: the experiment is the run's
        if o.is_delete():
            raise ConfigError(f"{o.input_line}: a resumed run's keys can be changed, not deleted")
        old, new = OmegaConf.select(merged, key), OmegaConf.select(cfg, key)
        plain = [OmegaConf.to_container(v, resolve=True, enum_to_str=True) if OmegaConf.is_config(v)
                 else getattr(v, "value", v) for v in (old, new)]
        if plain[0] == plain[1]:
            continue
        if key in MODEL_KEYS or key.startswith(tuple(k + "." for k in MODEL_KEYS)) or \
                any(k.startswith(key + ".") for k in MODEL_KEYS):
            raise ConfigError(f"{o.input_line}: changes the model of the resumed run ({key}: {plain[0]} -> "
                              f"{plain[1]}); start a new run instead (drop trainer.resume)")
        OmegaConf.update(merged, key, new, merge=False)
        changes.append(f"resume: {key}: {plain[0]} -> {plain[1]}")
    merged.trainer.resume = cfg.trainer.resume
    return merged, changes


# -- the reproducibility record -------------------------------------------------------------------

def git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def record_run(run_dir: Path, overrides: List[str], device: torch.device, resumed_at: Optional[int],
               changes: List[str]) -> None:
    """run.json: versions, device, git commit, overrides; a resume appends to its 'resumes'."""
    path = Path(run_dir) / "run.json"
    entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "overrides": list(overrides),
             "metamm": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
             "device": str(device), "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "git": git_commit(), "host": socket.gethostname()}
    try:
        info = json.loads(path.read_text()) if resumed_at is not None else None
    except (OSError, ValueError):
        info = None
    if info is None:
        info = {**entry, "resumes": []}
    else:
        info.setdefault("resumes", []).append({**entry, "at_step": resumed_at, "changes": changes})
    write_atomic(path, lambda f: f.write(json.dumps(info, indent=2).encode()))


def flat(cfg: Dict, prefix: str = "") -> Dict[str, Any]:
    """A nested config as ``{"a.b": value}`` with TensorBoard-friendly values (hparams)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def finite_json(value: Any) -> Any:
    """``value`` with NaN/inf replaced by None, so that json.dumps writes valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


# -- stop signals ---------------------------------------------------------------------------------

class StopSignals:
    """SIGINT/SIGTERM set ``signum``; the loop checks it between steps, so a checkpoint never
    holds a half-done step. A second Ctrl-C exits at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def _handle(self, signum, frame):
        # os.write, not logging or print: the signal may arrive while the main thread is inside
        # a logging call or a buffered write, which are not reentrant (a "Logging error" traceback)
        if self.signum is not None and signum == signal.SIGINT:
            os.write(2, b"\nsecond Ctrl-C: exiting now, without a checkpoint\n")
            os._exit(130)
        self.signum = signum
        os.write(2, f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                    f"(Ctrl-C again to exit at once)\n".encode())

    def __enter__(self) -> "StopSignals":
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
