"""metamm's Hydra sweeper ``hydra/sweeper=optuna``: current Optuna through its ask/tell API
(hydra-optuna-sweeper 1.3 still pins optuna<3). Shipped in the wheel as the Hydra plugin package
``hydra_plugins.metamm`` (Hydra only instantiates plugins from ``hydra_plugins``); metamm's CLI
registers it. What a search does is told in :mod:`metamm_cli.scale.search`.

Each batch asks the study for ``n_jobs`` trials, turns their parameters into overrides
(plus ``search.trial=<id>`` so that the job reports its validations) and hands them to the
configured launcher (``basic``, ``joblib``, ``submitit_*``); each job's returned metrics are
told back (its objective, or FAIL, or PRUNED). Job numbers are trial numbers, so a trial's
folder is ``<sweep>/<number>_<overrides>`` and a trial interrupted with its search is run again
in its own folder, where it resumes from ``last.pt``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from metamm_cli import ConfigError
from metamm_cli.scale.search import make_pruner, make_sampler, require_optuna, storage_url
from metamm_cli.runs import layout

log = logging.getLogger("metamm")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def distribution(override):
    """A Hydra sweep override -> an Optuna distribution."""
    import optuna.distributions as D

    sweep, key = override.value(), override.get_key_element()
    if isinstance(sweep, ChoiceSweep):
        return D.CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            return D.IntDistribution(sweep.start, sweep.stop - sweep.step, step=sweep.step)
        return D.CategoricalDistribution([float(v) for v in override.sweep_iterator()])
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in (sweep.tags or set())
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return D.IntDistribution(sweep.start, sweep.end, log=log_scale)
        return D.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ConfigError(f"{key}: not a search dimension (use choice(...), range(...), interval(...))")


def as_override(key: str, value: Any) -> str:
    if isinstance(value, str) and any(c in value for c in " ,=()[]{}'\"\\"):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"{key}={value}"


class OptunaSweeper(Sweeper):
    def __init__(self, objective: str = "best_val_acc", direction: str = "maximize", n_trials: int = 20,
                 n_jobs: int = 1, study_name: Optional[str] = None, storage: Optional[str] = None,
                 sampler: Optional[Dict] = None, pruner: Optional[Dict] = None,
                 params: Optional[Dict[str, str]] = None, enqueue: Optional[Sequence[Dict]] = None):
        super().__init__()
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction}: must be maximize or minimize")
        if n_trials < 1 or n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials} and n_jobs={n_jobs} must be >= 1")
        self.objective, self.direction, self.n_trials, self.n_jobs = objective, direction, n_trials, n_jobs
        self.study_name, self.storage = study_name, storage
        self.sampler, self.pruner, self.params = sampler, pruner, dict(params or {})
        self.enqueue = [dict(p) for p in enqueue or []]

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def space(self, arguments: List[str]):
        """(search dimensions {key: distribution}, fixed overrides): the config's params, then the
        command line's (a command-line value replaces the config's)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = {}
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)):
            lines[o.get_key_element()] = o
        dims = {k: distribution(o) for k, o in lines.items() if o.is_sweep_override()}
        fixed = [o.input_line for o in lines.values() if not o.is_sweep_override()]
        if not dims:
            raise ConfigError("hydra/sweeper=optuna: nothing to search; give hydra.sweeper.params "
                              "(a +sweep=search_* preset) or KEY=interval(a,b) / choice(a,b)")
        return dims, fixed

    def sweep(self, arguments: List[str]) -> Any:
        require_optuna()
        import optuna
        from optuna.trial import TrialState

        dims, fixed = self.space(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=storage_url(sweep_dir, self.storage), study_name=self.study_name,
                                    direction=self.direction, sampler=make_sampler(self.sampler),
                                    pruner=make_pruner(self.pruner), load_if_exists=True)
        if not study.trials:  # a new study: the given settings first
            for params in self.enqueue:
                unknown = sorted(set(params) - set(dims))
                if unknown:
                    raise ConfigError(f"hydra.sweeper.enqueue: {unknown} are not search parameters ({sorted(dims)})")
                study.enqueue_trial(params)
        interrupted = [t for t in study.trials if t.state == TrialState.RUNNING]
        if interrupted:
            log.info(f"search: {len(interrupted)} trials were running when the search stopped: run again")
        returns = []
        for frozen in interrupted:  # one launch each: its job number (= trial number) names its folder
            returns.append(self.run(study, [(frozen.number, frozen._trial_id, frozen.params)], dims, fixed))
        while True:
            done = sum(t.state.name in FINISHED for t in study.trials)
            n = min(self.n_jobs, self.n_trials - done)
            if n <= 0:
                break
            asked = [study.ask(dims) for _ in range(n)]
            returns.append(self.run(study, [(t.number, t._trial_id, t.params) for t in asked], dims, fixed))
        self.report(study, sweep_dir)
        return returns

    def run(self, study, trials: Sequence, dims, fixed) -> Sequence:
        """Launch one batch of trials (consecutive numbers) and tell the study their outcome."""
        from optuna.trial import TrialState

        jobs = [list(fixed) + [as_override(k, params[k]) for k in dims] + [f"search.trial={tid}"]
                for _, tid, params in trials]
        results = self.launcher.launch(jobs, initial_job_idx=trials[0][0])
        for (number, _, _), result in zip(trials, results):
            try:
                ret = result.return_value
            except Exception as e:  # noqa: BLE001 - a job that crashed outside metamm's own handling
                log.warning(f"search: trial {number} failed ({type(e).__name__}: {e})")
                study.tell(number, state=TrialState.FAIL)
                continue
            status = ret.get("status") if isinstance(ret, dict) else None
            value = ret.get(self.objective) if isinstance(ret, dict) else None
            if status == "pruned":
                study.tell(number, state=TrialState.PRUNED)
            elif status == "finished" and value is not None:
                study.tell(number, float(value))
            else:
                why = (ret or {}).get("error") if isinstance(ret, dict) else None
                log.warning(f"search: trial {number} failed ({why or f'no {self.objective} in its metrics'})")
                study.tell(number, state=TrialState.FAIL)
        return results

    def report(self, study, sweep_dir: Path) -> None:
        """search.json (every trial) in the sweep folder, and the best trial on the console."""
        trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                   "intermediate": {str(k): v for k, v in t.intermediate_values.items()}}
                  for t in study.trials]
        best = None
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            pass
        summary = {"study": study.study_name, "storage": storage_url(sweep_dir, self.storage),
                   "objective": self.objective, "direction": self.direction, "trials": trials,
                   "best": {"number": best.number, "value": best.value, "params": best.params} if best else None}
        (sweep_dir / layout.SEARCH).write_text(json.dumps(summary, indent=2, default=str))
        states = {s: sum(t["state"] == s for t in trials) for s in FINISHED}
        log.info(f"search: {len(trials)} trials ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
                 f"{states['FAIL']} failed); "
                 + (f"best: trial {best.number}, {self.objective} {best.value:.2f} with "
                    + " ".join(as_override(k, v) for k, v in best.params.items()) if best else "no trial completed")
                 + f"; {sweep_dir / 'search.json'}")
