"""Hyper-parameter search with Optuna (``pip install "metamm[search]"``), driven through its
ask/tell API by metamm's Hydra sweeper (:mod:`metamm_cli.optuna_sweeper`, registered as
``hydra/sweeper=optuna``): ``metamm train -m +sweep=search_metric``.

- The study lives in ``<sweep folder>/optuna.db`` (SQLite), so an interrupted search continues
  where it stopped (``metamm train -m +sweep=NAME trainer.resume=true``): finished trials are
  kept, trials that were running resume from their job's ``last.pt``.
- The objective is a key of the job's ``metrics.json`` (``best_val_acc`` by default, maximised).
- A failed trial is recorded (state FAIL, its error in the job's ``failed.json``) and the search
  goes on. While a trial trains, every validation is reported to the study and the configured
  Optuna pruner stops trials that are clearly worse than the others at the same step.
- The search space: ``params`` of the sweeper config (Hydra's sweep syntax): ``choice(a, b)``
  (categorical), ``range(1, 5)`` (integers), ``interval(1e-4, 1e-2)`` (float),
  ``tag(log, interval(1e-4, 1e-2))`` (log scale); plain ``a,b`` on the command line is a choice.
  ``enqueue``: parameter sets to try first (known good settings, a baseline), before sampling.

This module is what a job needs (reporting, pruning); the sweeper itself is in optuna_sweeper.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, Optional

from metamm_cli import ConfigError
from metamm_cli.runs import layout

PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")


class Pruned(Exception):
    """The study's pruner stopped this trial (not a failure)."""


def require_optuna() -> None:
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError('hydra/sweeper=optuna needs Optuna: pip install "metamm[search]"')


def storage_url(sweep_dir: Path, storage: Optional[str] = None) -> str:
    return storage or f"sqlite:///{Path(sweep_dir).resolve() / layout.STUDY}"


def _build(kind, spec: Dict[str, Any], key: str):
    """``kind(**spec)`` with the keys ``kind`` does not take left out (the config's defaults are
    the median pruner's: ``pruner.name=threshold +pruner.lower=80`` drops ``n_startup_trials``)."""
    import inspect

    taken = inspect.signature(kind).parameters
    try:
        return kind(**{k: v for k, v in spec.items() if k in taken})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {kind.__name__}({', '.join(f'{k}={v}' for k, v in spec.items() if k in taken)}): "
                          f"{' '.join(str(e).split())}") from e


def make_pruner(spec: Optional[Dict[str, Any]]):
    """``{name: median, n_startup_trials: 5, n_warmup_steps: 0, ...}`` -> an Optuna pruner."""
    import optuna

    spec = dict(spec or {})
    name = spec.pop("name", "median")
    kinds = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
             "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
             "hyperband": optuna.pruners.HyperbandPruner, "threshold": optuna.pruners.ThresholdPruner,
             "none": optuna.pruners.NopPruner}
    if name not in kinds:
        raise ConfigError(f"hydra.sweeper.pruner.name={name}: must be one of {', '.join(PRUNERS)}")
    return _build(kinds[name], spec, "hydra.sweeper.pruner")


def make_sampler(spec: Optional[Dict[str, Any]]):
    """``{name: tpe, seed: 0, ...}`` -> an Optuna sampler."""
    import optuna

    spec = dict(spec or {})
    name = spec.pop("name", "tpe")
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
             "cmaes": optuna.samplers.CmaEsSampler}
    if name not in kinds:
        raise ConfigError(f"hydra.sweeper.sampler.name={name}: must be one of tpe, random, cmaes")
    return _build(kinds[name], spec, "hydra.sweeper.sampler")


class TrialReporter:
    """In a search job: reports each validation to the trial and raises :class:`Pruned` when the
    study's pruner says so. ``trial`` is the Optuna trial id the sweeper gave the job
    (``search.trial``); the study and pruner come from the sweeper's config."""

    def __init__(self, trial_id: int):
        import optuna
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        sweeper = hc.sweeper
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.load_study(study_name=str(sweeper.study_name),
                                       storage=storage_url(Path(hc.sweep.dir), sweeper.get("storage")),
                                       pruner=make_pruner(sweeper.get("pruner")))
        self.trial = optuna.trial.Trial(self.study, int(trial_id))

    def report(self, value: float, step: int) -> None:
        self.trial.report(float(value), int(step))
        if self.trial.should_prune():
            raise Pruned(f"pruned at step {step} (validation {value:.2f})")


def reporter(cfg) -> Optional[TrialReporter]:
    """The job's :class:`TrialReporter`, or None outside a search."""
    trial = cfg.get("search", {}).get("trial") if hasattr(cfg, "get") else None
    return TrialReporter(trial) if trial is not None else None
