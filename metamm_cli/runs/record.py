"""What a run folder records besides checkpoints: ``config.yaml``, ``run.json`` (versions,
device, git commit, overrides, one entry per resume), ``metrics.json`` (always valid JSON), the
TensorBoard writer; and the JSON helpers they share."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from metamm_cli import __version__
from metamm_cli.runs.checkpoint import clean_orphans, write_atomic
from metamm_cli.runs import layout


def finite_json(value: Any) -> Any:
    """``value`` with NaN/inf replaced by None, so that json.dumps writes valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(finite_json(value), indent=2).encode()))


def flat(cfg: Dict, prefix: str = "") -> Dict[str, Any]:
    """A nested config as ``{"a.b": value}`` with TensorBoard-friendly values."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def hparams(config: Dict, choices: Dict[str, str]) -> Dict[str, Any]:
    """The run's hyper-parameters as TensorBoard shows them: each config group by the option
    chosen (``fusion: attention``, not ``fusion._target_: metamm_cli.models.fusion.Attention``),
    then every other key flattened; bookkeeping keys left out."""
    out = {group.replace("/", "."): name for group, name in sorted(choices.items())
           if not group.startswith("hydra") and name is not None}
    for key, value in flat(config).items():
        if key.endswith("._target_") or key.split(".")[0] in HPARAM_SKIP or key in HPARAM_SKIP:
            continue
        out[key] = value
    return out


HPARAM_SKIP = {"output_root", "task_name", "preset", "search", "trainer.resume", "trainer.progress",
               "trainer.tensorboard", "trainer.test"}


def job_identity(task_name: str) -> Dict[str, Any]:
    """This job's Hydra group choices and its name for TensorBoard: the overrides that make it
    (``fusion=attention,seed=1``), or its task name; {} outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    choices = {k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items() if not k.startswith("hydra")}
    from metamm_cli.config import job_dirname

    name = hc.job.override_dirname or task_name
    return {"choices": choices, "tb": job_dirname(name.replace("/", "_"))}


def _git(where: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    """The commit (``-dirty`` when modified) of the metamm clone that runs, or of the one the
    working directory is in (a wheel installed from a clone and run inside it); else None."""
    for where in (Path(__file__).resolve().parent, Path(cwd or Path.cwd())):
        top = _git(where, "rev-parse", "--show-toplevel") if where.is_dir() else None
        if top and (Path(top) / "metamm_cli").is_dir() and (Path(top) / "pyproject.toml").is_file():
            return _git(Path(top), "describe", "--always", "--dirty", "--abbrev=40")
    return None


def record_run(run_dir: Path, overrides: List[str], device: torch.device, resumed_at: Optional[int],
               changes: List[str], extra: Optional[Dict] = None) -> None:
    """run.json: versions, device, git commit, overrides; a resume appends to its 'resumes'."""
    path = Path(run_dir) / layout.RUN_INFO
    entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "overrides": list(overrides),
             "metamm": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
             "device": str(device), "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "threads": torch.get_num_threads(), "git": git_commit(), "host": socket.gethostname(),
             **(extra or {})}
    info = read_json(path) if resumed_at is not None else None
    if not info:
        info = {**entry, "resumes": []}
    else:
        info.setdefault("resumes", []).append({**entry, "at_step": resumed_at, "changes": changes})
    write_json(path, info)


def open_folder(run, overrides: List[str], changes: List[str], resumed: bool) -> None:
    """The run folder: orphan temporaries removed, config.yaml, run.json (a resumed run keeps its
    first TensorBoard name and group choices)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    clean_orphans(run.ckpt_dir)
    write_atomic(run.run_dir / layout.CONFIG, lambda f: f.write(OmegaConf.to_yaml(run.stored_config()).encode()))
    first = read_json(run.run_dir / layout.RUN_INFO) if resumed else {}
    identity = {k: first[k] for k in ("choices", "tb") if k in first} if first else job_identity(run.cfg.task_name)
    record_run(run.run_dir, overrides, run.device, run.state.step if resumed else None, changes, identity)
    run.identity = identity
    run.purge_step = run.state.step + 1 if resumed else None


def tb_folder(run_dir: Path, identity: Optional[Dict] = None) -> Path:
    """``RUN/tb/<name>``: TensorBoard names a run by its folder, so the name is the job's
    overrides (``fusion=attention,seed=1``); runs from before this layout log into ``RUN/tb``."""
    name = (identity if identity is not None else read_json(Path(run_dir) / layout.RUN_INFO)).get("tb")
    return Path(run_dir) / layout.TB / name if name else Path(run_dir) / layout.TB


def tensorboard(run):
    """The run's TensorBoard writer, made at the first point logged (so a run that fails before
    it leaves no event file), or None with trainer.tensorboard=false. A resumed run drops the
    points logged after its checkpoint."""
    if run.writer is None and run.cfg.trainer.tensorboard and (run.world is None or run.world.main):
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(tb_folder(run.run_dir, run.identity)), purge_step=run.purge_step)
    return run.writer


def profiler(run):
    """``trainer.profile=true``: a ``torch.profiler`` trace of three training steps (after one to
    wait and one to warm up) into the run's TensorBoard folder (TensorBoard's profiler tab,
    torch-tb-profiler); a context whose ``step()`` the loop calls after each step. A null
    context otherwise, and on every rank but 0."""
    import contextlib


    if not run.cfg.trainer.profile or not (run.world is None or run.world.main):
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    folder = tb_folder(run.run_dir, run.identity)
    return profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(folder)))


def read_json(path: Path) -> Dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_metrics(run, val: Optional[Dict], **extra) -> Dict[str, Any]:
    S = run.state
    last = run.last or {}
    metrics = finite_json({
        "step": S.step, "val_acc": val["accuracy"] if val else None,
        "val_acc_ci95": val["ci95"] if val else None, "val_episodes": val["episodes"] if val else None,
        "best_val_acc": S.best if S.history else None, "best_step": S.best_step,
        "train_loss": last.get("train/loss"), "train_acc": last.get("train/acc"),
        "episodes_per_s": run.episodes / run.train_time if run.train_time else None, "train_time_s": run.train_time,
        "wall_time_s": S.wall,
        "skipped_steps": int(S.bad), "device": str(run.device), "run_dir": str(run.run_dir),
        "resumed_from": run.resumed_from, "history": S.history, **extra})
    write_json(run.run_dir / layout.METRICS, metrics)
    return metrics
