"""The run folder's layout, in one place: every name a run, a sweep or an evaluation writes.

    RUN/   outputs/<task>/runs/<time>/, or a sweep's <sweep>/<job#>_<overrides>/
      .hydra/overrides.yaml .hydra/hydra.yaml   Hydra's record of the job (overrides, group choices)
      config.yaml                                the resolved config
      run.json                                   overrides, group choices, versions, device, commit, resumes
      metrics.json                               final values, wall time, the validation history
      train.log                                  everything the run printed
      tb/<name>/                                 TensorBoard
      checkpoints/last.pt best.pt step_XXXXXXXX.pt
      eval.json eval-NAME.json                   test evaluations (trainer.test, metamm compare --eval[-set])
      RUNNING                                    the claim of the live process
      failed.json                                a sweep job that failed, and why
      ensemble.json                              a per-modality ensemble (metamm compare builds it)
    SWEEP/ outputs/<task>/multiruns/<time>/
      summary.md summary.json failed.jsonl       the sweep's table, its failed jobs
      optuna.db search.json                      a search's study and its trials
    outputs/evals/<time>_<task>_<run>_<best|last>/eval.json eval.log   one `metamm eval`
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

HYDRA = ".hydra"
OVERRIDES = "overrides.yaml"  # in .hydra/
HYDRA_CONFIG = "hydra.yaml"  # in .hydra/
CONFIG = "config.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.json"
LOG = "train.log"
EVAL_LOG = "eval.log"
TB = "tb"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
CLAIM = "RUNNING"
FAILED = "failed.json"
ENSEMBLE = "ensemble.json"
FAILURES = "failed.jsonl"  # sweep folder
SUMMARY_MD = "summary.md"  # sweep folder
SUMMARY_JSON = "summary.json"  # sweep folder
STUDY = "optuna.db"  # sweep folder
SEARCH = "search.json"  # sweep folder


def eval_file(name: str = "") -> str:
    """``eval.json`` (the run's own test setting) or ``eval-NAME.json`` (an eval set)."""
    return f"eval-{name}.json" if name else "eval.json"


def eval_name(path: Path) -> Optional[str]:
    """The eval set a report file holds: ``""`` for ``eval.json``, ``NAME`` for
    ``eval-NAME.json``, None for any other file."""
    name = Path(path).name
    if name == eval_file():
        return ""
    return name[len("eval-"):-len(".json")] if name.startswith("eval-") and name.endswith(".json") else None


EVAL_GLOB = "eval*.json"


def checkpoint(run_dir: Path, which: str = BEST) -> Path:
    """``RUN/checkpoints/<which>``."""
    return Path(run_dir) / CHECKPOINTS / which


def run_name(ckpt: Path) -> str:
    """Which run a checkpoint is: ``TASK_RUNFOLDER_best`` (or the file's stem)."""
    ckpt = ckpt.expanduser().resolve()
    if ckpt.is_dir():
        return f"{ckpt.parent.parent.name}_{ckpt.name}" if ckpt.parent.name in ("runs", "multiruns") else ckpt.name
    if ckpt.parent.name == CHECKPOINTS:
        run = ckpt.parent.parent
        task = run.parent.parent.name if run.parent.name in ("runs", "multiruns") else run.parent.name
        return f"{task}_{run.name}_{ckpt.stem}"
    return ckpt.stem
