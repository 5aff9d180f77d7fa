"""How a job shares its machine with the other jobs of a sweep. Hydra's launchers run the jobs:
``basic`` one after another in this process, ``joblib`` side by side in worker processes,
``submitit_local`` as local processes and ``submitit_slurm`` as Slurm jobs (metamm schedules
nothing itself). A job running beside others takes its share of the CPUs (torch threads) and,
on a machine with several GPUs, a GPU of its own; Slurm jobs get theirs from Slurm
(``SLURM_CPUS_PER_TASK``, ``CUDA_VISIBLE_DEVICES``). Every job of a sweep gets the same threads."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from metamm_cli import ConfigError

# hydra/launcher and hydra/sweeper choices that need a plugin: (module, pip extra)
PLUGINS = {"joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
           "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
           "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")}


def check_plugins(argv: List[str]) -> None:
    """``hydra/launcher=NAME`` naming a plugin that is not installed: one line saying what to install."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in PLUGINS:
            module, package = PLUGINS[value]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"hydra/launcher={value} needs the {package} plugin: "
                                  f'pip install "metamm[sweep]"')


def register_plugins() -> None:
    """metamm's Optuna sweeper (``hydra/sweeper=optuna``) and population launcher
    (``hydra/launcher=population``): Hydra finds plugins by scanning the
    installed ``hydra_plugins`` package, which an editable install does not show it."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.metamm import OptunaSweeper
    from hydra_plugins.metamm.population import PopulationLauncher

    Plugins.instance().register(OptunaSweeper)
    Plugins.instance().register(PopulationLauncher)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_SWEEP_THREADS: Dict[str, int] = {}  # sweep folder -> the thread count of its jobs in this process


def job_share(deterministic: bool = False) -> Tuple[Optional[int], Optional[int]]:
    """(CPU threads, job number) for a job of a sweep, the same threads for every job of it so
    that their speeds compare: jobs side by side (joblib, submitit) get their share of the CPUs;
    jobs one after another (``basic``) all get the count chosen for the first one
    (:func:`~metamm_cli.device.auto_threads`, or every CPU with ``trainer.deterministic``),
    not one each from the load of its moment. (None, None) for a run that is no sweep's job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None, None
    target = str(hc.launcher.get("_target_", "")) if hc.launcher is not None else ""
    num = hc.job.get("num")
    if "Joblib" in target:
        n = int(hc.launcher.get("n_jobs") or -1)
        n = _cpus() + 1 + n if n < 0 else n
        return max(1, _cpus() // max(1, n)), num
    if "submitit" in target and os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return int(hc.launcher.get("cpus_per_task") or 1), num
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    from metamm_cli import device

    sweep = str(Path(hc.runtime.output_dir).resolve().parent)
    if sweep not in _SWEEP_THREADS:
        _SWEEP_THREADS[sweep] = _cpus() if deterministic else device.auto_threads()
    return _SWEEP_THREADS[sweep], None


def sweep_job() -> bool:
    """Whether this process runs a job of a sweep (``metamm train -m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False
