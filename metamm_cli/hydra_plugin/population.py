"""metamm's Hydra launcher ``hydra/launcher=population``: the jobs of a sweep that differ only in
population-safe keys (:func:`metamm_cli.scale.population.population_safe`: seed, learning rates,
weight decay, temperature, missing rates) are trained in this process as one vmapped program
(:mod:`metamm_cli.scale.population`); jobs that differ in anything else form separate groups.
Every job still gets its normal folder (``<sweep>/<num>_<overrides>``, ``.hydra/``, its config,
records and checkpoints) and its own JobReturn, in order, so the sweep's summary and ``metamm
compare`` see normal runs. A group of one runs as the basic launcher runs it."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger("metamm")


def group_jobs(job_overrides: Sequence[Sequence[str]]) -> Tuple[List[List[int]], List[str]]:
    """Job indices grouped by their overrides other than population-safe keys (first-seen order),
    and the keys that split groups."""
    from metamm_cli.scale.population import population_safe

    groups: Dict[Tuple[str, ...], List[int]] = {}
    for i, overrides in enumerate(job_overrides):
        rest = tuple(o for o in overrides if not population_safe(o.split("=", 1)[0]))
        groups.setdefault(rest, []).append(i)
    rests = list(groups)
    split = sorted({o.split("=", 1)[0] for r in rests for o in r if any(o not in other for other in rests)})
    return list(groups.values()), split


class PopulationLauncher(Launcher):
    def __init__(self, max_members: Optional[int] = None) -> None:
        super().__init__()
        self.max_members = max_members
        self.config: Optional[DictConfig] = None
        self.task_function = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from metamm_cli.scale.population import refuse

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        groups, split = group_jobs(job_overrides)
        if self.max_members:
            groups = [g[i:i + self.max_members] for g in groups for i in range(0, len(g), self.max_members)]
        sizes = ", ".join(str(len(g)) for g in groups)
        log.info(f"population: {len(job_overrides)} jobs in {len(groups)} group{'s' if len(groups) > 1 else ''} "
                 f"({sizes} members)"
                 + (f"; {', '.join(split)} {'is' if len(split) == 1 else 'are'} not population-safe "
                    f"(changes shapes or code): separate groups" if split else ""))
        returns: Dict[int, JobReturn] = {}
        for group in groups:
            if len(group) > 1:
                refuse(self.job_config(job_overrides[group[0]], initial_job_idx + group[0]))
        for group in groups:
            if len(group) == 1:
                i = group[0]
                self.log_job(job_overrides[i], initial_job_idx + i)
                returns[i] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                     config=self.job_config(job_overrides[i], initial_job_idx + i),
                                     job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            else:
                returns.update(self.launch_group(job_overrides, group, initial_job_idx))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [returns[i] for i in range(len(job_overrides))]

    def log_job(self, overrides, idx: int) -> None:
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")

    def launch_group(self, job_overrides, group: List[int], initial_job_idx: int) -> Dict[int, JobReturn]:
        """Each member's folder and Hydra files as run_job makes them (its task function only
        records what it would train), then the whole group trained as one population."""
        from metamm_cli.scale.population import Member, train_population

        members, rets = [], {}
        for i in group:
            self.log_job(job_overrides[i], initial_job_idx + i)

            def prepare(cfg):
                hc = HydraConfig.get()
                members.append(Member(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task),
                                      copy.deepcopy(HydraConfig.instance().cfg)))
                return None

            rets[i] = run_job(hydra_context=self.hydra_context, task_function=prepare,
                              config=self.job_config(job_overrides[i], initial_job_idx + i),
                              job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if any(r.status != JobStatus.COMPLETED for r in rets.values()):  # a member Hydra could not start
            return rets
        results = train_population(members)
        for i, result in zip(group, results):
            rets[i].return_value = result
        return rets
