"""What a run is: the state a checkpoint holds and restores (:class:`RunState`: weights, optimizer,
step, validation history, RNGs, the data's learned preprocessing) and the live objects of a
training run (:class:`Run`). Which run to resume is resume.py's; the folder's records are
record.py's."""
from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError
from metamm_cli.algorithms import mismatch
from metamm_cli.runs import layout

log = logging.getLogger("metamm")


class RunState:
    """Everything that makes a resumed run continue bit-identically: the modules' states, the
    step, the best validation, the history, the partial log sums and every RNG."""

    def __init__(self, modules: Dict[str, Any], sampler, device: torch.device, data: Optional[Dict] = None):
        self.modules, self.sampler, self.device = modules, sampler, device
        self.data = data or {}  # the dataset's learned preprocessing state and fingerprint
        self.step, self.best, self.best_step, self.history = 0, float("-inf"), 0, []
        self.sums = torch.zeros(3, device=device)  # loss, acc (tasks), good steps since the last log
        self.tasks = 0  # tasks since the last log
        self.bad = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps (all time)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad_index: Optional[torch.Tensor] = None  # the samples of the first bad step
        self.wall_base, self.clock = 0.0, time.perf_counter()  # wall seconds before this process, its start
        self.layout: Dict[str, Any] = {}  # trainer.memory_format / embed_chunk as resolved (a resume keeps them)

    @property
    def wall(self) -> float:
        """Wall-clock seconds of the run so far, over all its processes (resumes included)."""
        return self.wall_base + time.perf_counter() - self.clock

    def record(self, loss: torch.Tensor, acc: torch.Tensor, bad: torch.Tensor, tasks: int,
               index: Optional[torch.Tensor] = None) -> None:
        """After a step, on the device (no host sync): the log sums without non-finite steps;
        ``index`` (the step's sample rows) is kept for the first non-finite step."""
        self.step += 1
        self.sums += torch.stack([torch.where(bad, 0, loss), torch.where(bad, 0, acc),
                                  (~bad).to(loss.dtype) * tasks]).float()
        self.tasks += tasks
        first = bad & (self.first_bad < 0)
        if index is not None:
            if self.first_bad_index is None or self.first_bad_index.shape != index.shape:
                self.first_bad_index = torch.full_like(index, -1)
            self.first_bad_index = torch.where(first, index, self.first_bad_index)
        self.first_bad = torch.where(first, self.step, self.first_bad)
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
                "history": self.history, "config": config, "data": self.data, "wall_time_s": self.wall,
                "layout": self.layout,
                "log_sums": self.sums.cpu(),
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
        self.wall_base = float(state.get("wall_time_s", 0.0))
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
    writer: Any = None  # record.tensorboard(run) makes it
    purge_step: Optional[int] = None
    bar: Any = None
    saved_step: int = -1
    last: Optional[Dict[str, float]] = None
    train_time: float = 0.0
    window: float = 0.0  # training seconds since the last log point
    episodes: int = 0  # training episodes (tasks) logged by this process
    val: Optional[Dict[str, float]] = None  # the last validation
    resumed_from: Optional[str] = None
    dataset: Any = None
    trial: Any = None  # a search's TrialReporter (search.py), else None
    identity: Optional[Dict] = None  # Hydra group choices and TensorBoard name (record.py)
    world: Any = None  # distributed.World: this process's rank among the training processes
    early_stopped: Optional[int] = None  # the step trainer.patience stopped the run at

    def timed(self, seconds: float) -> None:
        self.window += seconds
        self.train_time += seconds

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / layout.CHECKPOINTS

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
    old_best = Path(ckpt["path"]).parent / layout.BEST
    if old_best.is_file() and old_best.parent.resolve() != run.ckpt_dir.resolve():  # another folder: complete on its own
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old_best, run.ckpt_dir / layout.BEST)


class Diverged(ConfigError):
    """A non-finite loss or gradient under trainer.on_nan=stop."""
