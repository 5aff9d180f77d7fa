"""Which run ``trainer.resume`` continues, and how its config may change: the checkpoint's stored
config is the base and only the keys given on the command line change it (a key that changes
the model is refused); the command that resumes a run, quoted so that it can be pasted."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError
from metamm_cli.runs.claim import running_pid
from metamm_cli.runs import layout

MODEL_KEYS = ("encoder", "fusion", "algorithm", "dataset.modalities")  # their change breaks the weights
RESUMABLE = (2, 3)  # checkpoint format versions a run can continue from


def hydra_quote(value: str) -> str:
    """``value`` as one quoted Hydra override value: ``=``, ``,`` or spaces in a path stay literal."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def resume_command(run_dir: Path) -> str:
    """The shell command that continues ``run_dir``, quoted for the shell and for Hydra."""
    return "metamm train " + shlex.quote(f"trainer.resume={hydra_quote(Path(run_dir).resolve())}")


def run_dir_of(ckpt: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/x.pt``), else None."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == layout.CHECKPOINTS else None


def stopped_runs(root: Path) -> List[Path]:
    """The ``last.pt`` of every run under ``root`` (runs and sweep jobs) whose process is not
    running, oldest first."""
    found = [p for p in Path(root).glob("*runs/**/checkpoints/last.pt") if running_pid(p.parent.parent) is None]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _other_tasks(output_root: Path, task: str) -> str:
    """``; stopped runs of other tasks: smoke (2, newest ...)`` for the message of an empty search."""
    seen = []
    for folder in sorted(p for p in Path(output_root).glob("*") if p.is_dir() and p.name not in (task, "evals")):
        runs = stopped_runs(folder)
        if runs:
            seen.append(f"{folder.name} ({len(runs)}, newest {run_dir_of(runs[-1])})")
    if not seen:
        return f"; no stopped run of any task under {output_root}/"
    return (f"; stopped runs of other tasks: {', '.join(seen)}: give that task's preset (+exp=NAME) "
            f"or task_name=NAME, or trainer.resume=RUN_FOLDER")


def find_resume(resume: Any, runs_root: Path) -> Optional[Path]:
    """``trainer.resume``: null, true (the newest ``last.pt`` under ``runs_root`` whose run is not
    running) or a checkpoint/run path (refused while its run is running)."""
    if resume in (None, False, "", "false", "null"):
        return None
    if resume is True or resume == "true":
        found = stopped_runs(runs_root)
        if not found:
            busy = [(p.parent.parent, running_pid(p.parent.parent)) for p in Path(runs_root).glob("*runs/**/checkpoints/last.pt")]
            busy = [f"{run} (pid {pid})" for run, pid in busy if pid is not None]
            raise ConfigError(f"trainer.resume=true: no checkpoints/last.pt of a stopped run of task "
                              f"'{Path(runs_root).name}' under {runs_root}/"
                              + (f"; in use by a live process: {', '.join(busy)}" if busy else
                                 _other_tasks(Path(runs_root).parent, Path(runs_root).name)))
        return found[-1]
    path = Path(str(resume)).expanduser()
    run = path if path.is_dir() else path.parent.parent
    pid = running_pid(run)
    if pid is not None:
        raise ConfigError(f"trainer.resume={resume}: that run is still running (pid {pid}, see {run / layout.CLAIM}); "
                          f"stop it first, or delete {layout.CLAIM} if the process is gone")
    return path


def find_sweep(resume: Any, task_root: Path) -> Path:
    """``metamm train -m ... trainer.resume=true|SWEEP_FOLDER``: the sweep folder to continue
    (true: the task's newest)."""
    if resume is True or str(resume) == "true":
        found = sorted((p.parent for p in Path(task_root).glob("multiruns/*/multirun.yaml")),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"trainer.resume=true with -m: no sweep of task '{Path(task_root).name}' "
                              f"under {task_root}/multiruns/")
        return found[-1]
    path = Path(str(resume)).expanduser()
    if not (path / "multirun.yaml").is_file():
        raise ConfigError(f"trainer.resume={resume} with -m: not a sweep folder (no multirun.yaml); "
                          f"give a folder under outputs/<task>/multiruns/, or drop -m to resume one run")
    return path


def continue_job(run_dir: Path) -> Tuple[Optional[Dict], Optional[Dict]]:
    """A job of a continued sweep: (its metrics, None) when it finished, (None, its last.pt)
    when it stopped, (None, None) when it never started."""
    from metamm_cli.runs.checkpoint import load_checkpoint

    metrics, last = Path(run_dir) / layout.METRICS, Path(run_dir) / layout.CHECKPOINTS / layout.LAST
    if metrics.is_file():
        done = json.loads(metrics.read_text())
        if not done.get("interrupted"):
            return done, None
    if last.is_file():
        return None, load_checkpoint(last, key="trainer.resume", versions=RESUMABLE)
    return None, None


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already has a run's results (a new run there would overwrite them)."""
    return (Path(run_dir) / layout.METRICS).is_file() or (Path(run_dir) / layout.CHECKPOINTS).is_dir()


def resume_state(cfg: DictConfig) -> Optional[Dict]:
    """The checkpoint ``trainer.resume`` names (null: none)."""
    from metamm_cli.runs.checkpoint import load_checkpoint

    path = find_resume(cfg.trainer.resume, Path(cfg.output_root) / cfg.task_name)
    return None if path is None else load_checkpoint(path, key="trainer.resume", versions=RESUMABLE)


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


def finished(ckpt: Dict, cfg: DictConfig, overrides: List[str]) -> Optional[Dict]:
    """A resumed run that already reached its trainer.max_steps: says so, returns its metrics."""
    max_steps = merge_resume(ckpt["config"], cfg, overrides)[0].trainer.max_steps
    if ckpt["step"] < max(max_steps, 1):
        return None
    run = run_dir_of(Path(ckpt["path"])) or ckpt["path"]
    print(f"run {run} already finished at step {ckpt['step']}: nothing to train "
          f"(raise trainer.max_steps to continue it)")
    done = Path(ckpt["path"]).parent.parent / layout.METRICS
    return json.loads(done.read_text()) if done.is_file() else {"step": ckpt["step"], "val_acc": None}


def resume_overrides(argv: List[str]):
    """For ``trainer.resume=...``: load the checkpoint before Hydra makes a folder and send the
    run back into its own folder; with ``-m``, send the sweep back into its sweep folder (each
    job then skips itself when finished, resumes from its last.pt when stopped). Returns (extra
    overrides, checkpoint)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from metamm_cli.config import INFO_FLAGS, compose, option
    from metamm_cli.runs.claim import claim

    given = [a for a in argv if a.lstrip("+").startswith("trainer.resume=")]
    if not given or given[-1].split("=", 1)[1] in ("", "null", "false", "False") or \
            any(a in INFO_FLAGS for a in argv):
        return [], None
    value = given[-1].split("=", 1)[1]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"):
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    if multirun:  # the sweep's own values (a,b,c) are not one config: where it lives is enough
        overrides = [o.input_line for o in OverridesParser.create().parse_overrides(overrides)
                     if not o.is_sweep_override()]
    user_dir = option(argv, "--config-dir", "-cd")
    if user_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(user_dir).resolve()}]")
    cfg = compose(overrides)
    if multirun:
        sweep = find_sweep(value, Path(cfg.output_root) / cfg.task_name)
        return [f"hydra.sweep.dir={hydra_quote(sweep.resolve())}"], None
    ckpt = resume_state(cfg)
    run = run_dir_of(Path(ckpt["path"]))
    if run is None:  # a loose checkpoint file: the run continues in a new folder
        return [], ckpt
    claim(run, f"trainer.resume={value}")  # before any work: a second resume is refused
    return [f"hydra.run.dir={hydra_quote(run.resolve())}", "hydra.output_subdir=null"], ckpt
