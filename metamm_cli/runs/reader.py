"""Reading run folders back: which folders are runs, and what each records (its overrides,
group choices, config, status, metrics, validation history and evaluation reports), for
``metamm compare`` and the sweep-end summary. Torch-free: tables are read without it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

from metamm_cli import ConfigError
from metamm_cli.runs import layout

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: hydra.yaml is long
SKIP_DIRS = {"__pycache__", "node_modules", layout.CHECKPOINTS, layout.TB}


def is_run(folder: Path) -> bool:
    """A run folder: ``config.yaml`` and ``metrics.json``, ``checkpoints/`` or a ``RUNNING`` claim;
    or a sweep job that failed (``failed.json``), even before its config was written."""
    folder = Path(folder)
    return (folder / layout.FAILED).is_file() or (folder / layout.CONFIG).is_file() and any(
        (folder / name).exists() for name in (layout.METRICS, layout.CHECKPOINTS, layout.CLAIM))


def find_runs(paths: Iterable) -> List[Path]:
    """Every run folder at or beneath each path (sweep, task or output folders), sorted, once each.
    A missing path, or one with no run beneath, is a one-line ConfigError naming it."""
    found: Dict[Path, None] = {}
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise ConfigError(f"{given}: no such file or folder")
        if not path.is_dir():
            raise ConfigError(f"{given}: not a folder (give a run, sweep or output folder)")
        here = []
        for dirpath, dirnames, _ in os.walk(path):
            if is_run(Path(dirpath)):
                here.append(Path(dirpath))
                dirnames[:] = []
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        if not here:
            raise ConfigError(f"{given}: no run folder found there (a run folder holds config.yaml and "
                              f"metrics.json or checkpoints/)")
        found.update((p.resolve(), None) for p in sorted(here))
    return list(found)


def read_json(path: Path) -> Optional[Dict]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_yaml(path: Path) -> Any:
    try:
        return yaml.load(Path(path).read_text(), Loader=_LOADER)
    except (OSError, yaml.YAMLError):
        return None


def label(folder: Path) -> str:
    """A run folder relative to the working directory where possible."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def is_running(folder: Path) -> bool:
    """A live process holds the folder (its ``RUNNING`` claim; a stale one, of a killed run, is not)."""
    from metamm_cli.runs.claim import running_pid

    return (Path(folder) / layout.CLAIM).exists() and running_pid(Path(folder)) is not None


def status_of(folder: Path, metrics: Optional[Dict], config: Dict) -> str:
    """running (a live ``RUNNING`` claim), stopped (a signal stopped it, or it ended before
    ``trainer.max_steps``), finished, or failed (no final metrics and no live process: it crashed
    or was killed)."""
    if is_running(folder):
        return "running"
    if (Path(folder) / layout.ENSEMBLE).is_file():  # robustness.make_ensembles: nothing was trained
        return "ensemble"
    if metrics is None or (Path(folder) / layout.FAILED).is_file():
        return "failed"
    if metrics.get("status") == "pruned":
        return "pruned"
    max_steps = (config.get("trainer") or {}).get("max_steps")
    if metrics.get("early_stopped"):
        return "finished early"
    if metrics.get("interrupted") or (max_steps is not None and (metrics.get("step") or 0) < max_steps):
        return "stopped"
    return "finished"


def eval_score(report: Optional[Dict]) -> Tuple[Optional[float], Optional[float], Optional[str]]:
    """(value, 95% CI, what) of an eval report: few-shot accuracy, or class recall@1 for retrieval."""
    if not report:
        return None, None, None
    if report.get("accuracy") is not None:
        return report["accuracy"], report.get("ci95"), "accuracy"
    if report.get("task") == "retrieval" and report.get("class"):
        return report["class"].get("recall@1"), None, "class recall@1"
    return None, None, None


def load_run(folder: Path) -> Dict[str, Any]:
    """What a run folder records: overrides, Hydra's group choices, the resolved config, status,
    the metrics the table shows, the validation history and every eval report (``eval.json`` as
    ``tests[""]``, ``eval-NAME.json`` as ``tests["NAME"]``)."""
    folder = Path(folder)
    config = read_yaml(folder / layout.CONFIG) or {}
    overrides = read_yaml(folder / layout.HYDRA / layout.OVERRIDES)
    if not isinstance(overrides, list):
        overrides = (read_json(folder / layout.RUN_INFO) or {}).get("overrides") or []
    hydra_cfg = read_yaml(folder / layout.HYDRA / layout.HYDRA_CONFIG) or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    metrics = read_json(folder / layout.METRICS)
    m = metrics or {}
    history = [h for h in m.get("history") or [] if isinstance(h, dict)]
    best_ci = next((h.get("val_acc_ci95") for h in history if h.get("step") == m.get("best_step")), None)
    final = {"val_acc": m.get("val_acc"), "val_acc_ci95": m.get("val_acc_ci95")}
    if final["val_acc"] is None and history:  # a stopped run: its last validation
        final = history[-1]
    tests = {}
    for path in sorted(folder.glob(layout.EVAL_GLOB)):
        name = layout.eval_name(path)
        report = read_json(path)
        if name is None or report is None:
            continue
        value, ci, what = eval_score(report)
        tests[name] = {"value": value, "ci95": ci, "metric": what, "episodes": report.get("episodes"),
                       "split": report.get("split"), "setting": report.get("setting"),
                       "eval_seed": ((report.get("config") or {}).get("eval") or {}).get("seed"),
                       "step": report.get("step"), "overrides": report.get("eval_overrides"),
                       "missing_sweep": report.get("missing_sweep")}
    return {"path": str(folder), "name": label(folder), "overrides": [str(o) for o in overrides],
            "choices": {k: v for k, v in choices.items() if isinstance(k, str)}, "config": config,
            "seed": config.get("seed"), "status": status_of(folder, metrics, config),
            "step": m.get("step"), "max_steps": (config.get("trainer") or {}).get("max_steps"),
            "best_val": m.get("best_val_acc"), "best_val_ci95": best_ci,
            "final_val": final.get("val_acc"), "final_val_ci95": final.get("val_acc_ci95"),
            "wall_time_s": m.get("wall_time_s"), "episodes_per_s": m.get("episodes_per_s"),
            "history": history, "tests": tests, **paper_of(config, history)}


def paper_of(config: Dict, history: List[Dict]) -> Dict[str, Any]:
    """The paper's reported accuracy of the run's preset (``preset.paper.accuracy``, percent)
    and its source, and the time to reach it: ``time_to_paper_s``, the wall time (``time_s``,
    seconds since the run started) of the first validation at or above it; ``paper_reached``:
    True, False (no validation reached it), or None (no paper number, or a history without
    times)."""
    paper = ((config.get("preset") or {}) if isinstance(config, dict) else {}).get("paper")
    accuracy = paper.get("accuracy") if isinstance(paper, dict) else None
    out = {"paper": float(accuracy) if isinstance(accuracy, (int, float)) else None,
           "paper_source": paper.get("source") if isinstance(paper, dict) else None,
           "time_to_paper_s": None, "time_to_paper_step": None, "paper_reached": None}
    if out["paper"] is None:
        return out
    for h in history:
        if h.get("val_acc") is not None and h["val_acc"] >= out["paper"]:
            out.update(time_to_paper_s=h.get("time_s"), time_to_paper_step=h.get("step"),
                       paper_reached=True if h.get("time_s") is not None else None)
            return out
    if history:
        out["paper_reached"] = False
    return out


