"""metamm's Slurm launcher, ``hydra/launcher=submitit_slurm`` (``hydra_plugins.metamm.slurm``: Hydra
instantiates launchers from the ``hydra_plugins`` package only). It submits as
hydra-submitit-launcher's SlurmLauncher does (one array through submitit) and then, instead of
blocking in submitit until every result exists, waits on Slurm itself: the jobs are read with ``squeue``
every ``hydra.launcher.poll_s`` seconds and a one-line summary is printed when it changes
(``slurm: 2 pending (Resources), 1 running, 3 done``). A job that pends for a reason that
cannot clear by waiting (``hydra.launcher.fatal_reasons``: its request exceeds the partition,
an account or QOS that does not exist, ...) gets the sweep's jobs cancelled (``scancel``) and one
line that quotes Slurm's reason and names the key to change. An interrupted wait
(SIGTERM, Ctrl-C) leaves the jobs to Slurm, where they go on, and says how to collect them.

Slurm without accounting (no ``sacct``) is enough: ``squeue --states=all`` shows a job for a
while after it ended (MinJobAge), and submitit's result files say which jobs returned.

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module without
registering it in ``sys.modules``, where a dataclass with string annotations looks itself up (an
installed wheel then failed every command with "'NoneType' object has no attribute '__dict__'")."""
import fnmatch
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf, open_dict

from metamm_cli import ConfigError
from metamm_cli.runs.signals import Interrupted

log = logging.getLogger(__name__)
# Reasons a pending job never leaves by waiting: the request itself is what the cluster refuses.
# (ReqNodeNotAvail, PartitionDown, JobHeld*, Resources, Priority clear when nodes return, an
# admin acts or other jobs end: they are shown and waited on.)
FATAL_REASONS = ["PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                 "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied", "QOSMax*PerJob*",
                 "AssocMax*PerJob*"]
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
           "RESIZING"}
GONE = "GONE"  # no longer listed by squeue (ended longer ago than MinJobAge)


def array_ids(job_ids: Sequence[str]) -> List[str]:
    """``["12_0", "12_1", "13"]`` -> ``["12", "13"]``: what squeue and scancel take for the sweep."""
    return list(dict.fromkeys(str(j).split("_")[0] for j in job_ids))


def squeue(job_ids: Sequence[str]) -> Optional[Dict[str, Tuple[str, str, str]]]:
    """{job id: (state, reason, partition)} of the given jobs (arrays expanded), or None when
    squeue cannot answer (not found, timed out: the next poll asks again)."""
    cmd = ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r|%P", "-j", ",".join(array_ids(job_ids))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:  # 'Invalid job id specified': every job aged out of squeue
        return {} if "Invalid job id" in proc.stderr else None
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            out[parts[0]] = (parts[1], parts[2], parts[3])
    return out


def reason_key(reason: str) -> str:
    """``ReqNodeNotAvail, UnavailableNodes:n1`` -> ``ReqNodeNotAvail``."""
    return reason.split(",")[0].split("(")[0].strip()


def is_fatal(reason: str, fatal: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(reason_key(reason), pattern) for pattern in fatal)


def summary(states: Dict[str, Tuple[str, str]]) -> str:
    """``slurm: 2 pending (Resources), 1 running, 3 done`` from {job id: (state, reason)}; jobs
    that ended otherwise than COMPLETED by their state (``1 timeout``)."""
    pending: Dict[str, int] = {}
    running, ended = 0, {}
    for state, reason in states.values():
        if state in PENDING:
            key = reason_key(reason) if reason and reason != "None" else ""
            pending[key] = pending.get(key, 0) + 1
        elif state in RUNNING:
            running += 1
        else:
            name = "done" if state in ("COMPLETED", GONE) else state.lower()
            ended[name] = ended.get(name, 0) + 1
    parts = []
    n_pending = sum(pending.values())
    if n_pending:
        why = [k for k in pending if k]
        detail = (why[0] if len(pending) == 1 else ", ".join(f"{pending[k]} {k}" for k in why)) if why else ""
        parts.append(f"{n_pending} pending" + (f" ({detail})" if detail else ""))
    if running:
        parts.append(f"{running} running")
    parts += [f"{n} {name}" for name, n in sorted(ended.items(), key=lambda kv: kv[0] != "done")]
    return "slurm: " + ", ".join(parts)


def partition_limits(partition: str) -> Dict[str, object]:
    """What one node of ``partition`` offers (sinfo): cpus, mem_mb, nodes, time ({} if unknown)."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%l"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.count("|") == 3]
    if proc.returncode != 0 or not rows:
        return {}

    def top(i):
        values = [int("".join(c for c in r[i] if c.isdigit()) or 0) for r in rows]
        return max(values) or None

    return {"cpus": top(1), "mem_mb": top(2), "nodes": len({r[0] for r in rows}), "time": rows[0][3]}


def what_to_change(reason: str, params: Dict, partition: str) -> str:
    """The hydra.launcher key behind a fatal reason, with what was asked and what is offered."""
    key = reason_key(reason)
    K = "hydra.launcher."
    fixed = {"InvalidAccount": f"set {K}account to an account of yours (sacctmgr show assoc user=$USER)",
             "InvalidQOS": f"set {K}qos to a QOS your account may use",
             "BadConstraints": f"change {K}constraint ({params.get('constraint')}) to features the nodes have (sinfo -o %f)",
             "DependencyNeverSatisfied": f"remove the dependency from {K}additional_parameters"}
    if key in fixed:
        return fixed[key]
    limits = partition_limits(partition)
    cpus_task, tasks = int(params.get("cpus_per_task") or 1), int(params.get("tasks_per_node") or 1)
    if limits.get("cpus") and cpus_task * tasks > limits["cpus"]:
        which = f"{K}cpus_per_task" if cpus_task > 1 or tasks == 1 else f"{K}tasks_per_node"
        return (f"lower {which}: a job asks {cpus_task * tasks} CPUs per node (cpus_per_task={cpus_task} x "
                f"tasks_per_node={tasks}), a node of partition {partition} has {limits['cpus']}")
    mem = params.get("mem_gb")
    if mem and limits.get("mem_mb") and float(mem) * 1024 > limits["mem_mb"]:
        return (f"lower {K}mem_gb: a job asks {mem} GB, a node of partition {partition} has "
                f"{limits['mem_mb'] / 1024:.0f} GB")
    nodes = int(params.get("nodes") or 1)
    if key == "PartitionNodeLimit" or (limits.get("nodes") and nodes > limits["nodes"]):
        return f"lower {K}nodes ({nodes}; partition {partition} has {limits.get('nodes', '?')} nodes)"
    if key == "PartitionTimeLimit":
        return (f"lower {K}timeout_min ({params.get('timeout_min')} minutes; partition {partition} allows "
                f"{limits.get('time', '?')})")
    return (f"change {K}cpus_per_task, mem_gb, gpus_per_node, nodes or timeout_min, or pick another "
            f"{K}partition (sinfo -p {partition} shows what it offers)")


class SlurmInterrupted(Interrupted):
    """The wait on a sweep's Slurm jobs was interrupted: the jobs stay with Slurm and go on."""

    def __init__(self, signum: int, job_ids: Sequence[str], sweep_dir: Path):
        super().__init__(signum)
        self.job_ids, self.sweep_dir = list(job_ids), Path(sweep_dir)

    def describe(self, argv: Sequence[str]) -> str:
        from metamm_cli.runs.resume import hydra_quote

        ids = array_ids(self.job_ids)
        shown = ", ".join(self.job_ids[:4]) + (", ..." if len(self.job_ids) > 4 else "")
        again = [a for a in argv if not a.lstrip("+").startswith("trainer.resume=")]
        where = str(self.sweep_dir.resolve())  # Hydra-quoted only where its grammar needs it
        again.append("trainer.resume=" + (where if re.fullmatch(r"[\w/.:+@-]+", where) else hydra_quote(where)))
        n = len(self.job_ids)
        return (f"interrupted while {n} Slurm job{'s' * (n != 1)} run or wait ({shown}); they go on in "
                f"Slurm (squeue -j {','.join(ids)}) and write into {self.sweep_dir}. When they have ended, "
                f"collect the sweep (finished jobs are skipped, stopped ones resume) with: metamm train "
                f"{shlex.join(again)}; or cancel them: scancel {' '.join(ids)}")


def wait(job_ids: Sequence[str], has_result: Callable[[str], bool], params: Dict, sweep_dir: Path,
         poll_s: float = 10.0, fatal: Sequence[str] = tuple(FATAL_REASONS), out=None) -> Dict[str, str]:
    """Wait until every job has ended; returns {job id: final state}. Prints the summary when it
    changes; a job pending for a fatal reason: scancel every job, then a one-line ConfigError;
    SIGTERM or Ctrl-C: :class:`SlurmInterrupted` (nothing is cancelled)."""
    out = out or sys.stderr
    states: Dict[str, Tuple[str, str]] = {j: ("PENDING", "") for j in job_ids}
    unseen = {j: 0 for j in job_ids}  # successive polls that did not list the job
    last = ""
    try:
        while True:
            listed = squeue(job_ids)
            for j in job_ids:
                if has_result(j):  # returned, whatever squeue still says
                    states[j] = ("COMPLETED", "")
                elif listed is not None and j in listed:
                    unseen[j] = 0
                    states[j] = listed[j][:2]
                elif listed is not None:
                    unseen[j] += 1
                    if unseen[j] >= 2:
                        states[j] = (GONE, "")
            line = summary(states)
            if line != last:
                print(line, file=out, flush=True)
                last = line
            stuck = [(j, r) for j, (s, r) in states.items() if s in PENDING and r and is_fatal(r, fatal)]
            if stuck:
                j, reason = stuck[0]
                partition = (listed or {}).get(j, ("", "", str(params.get("partition") or "")))[2]
                ids = array_ids(job_ids)
                subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
                raise ConfigError(
                    f"Slurm will never start job {j} of this sweep: squeue says Reason={reason}; "
                    f"cancelled its {len(job_ids)} job{'s' * (len(job_ids) != 1)} (scancel {' '.join(ids)}); "
                    f"{what_to_change(reason, params, partition)}")
            if all(s not in PENDING and s not in RUNNING for s, _ in states.values()):
                return {j: s for j, (s, _) in states.items()}
            time.sleep(poll_s)
    except KeyboardInterrupt as exc:
        waiting = [j for j, (s, _) in states.items() if s in PENDING or s in RUNNING]
        raise SlurmInterrupted(getattr(exc, "signum", signal.SIGINT), waiting or list(job_ids), sweep_dir) from None


# -- the Hydra launcher (only where hydra-submitit-launcher is installed: pip install "metamm[sweep]")

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
except ImportError:  # the plugin is an optional extra; check_plugins says what to install
    SlurmQueueConf = _SubmititSlurm = None

OWN_KEYS = ("poll_s", "fatal_reasons")  # metamm's keys, not submitit's

if _SubmititSlurm is not None:
    @dataclass
    class MetammSlurmConf(SlurmQueueConf):
        """The schema of configs/hydra/launcher/submitit_slurm.yaml: the plugin's keys and metamm's."""
        _target_: str = "hydra_plugins.metamm.slurm.SlurmLauncher"
        poll_s: float = 10.0  # seconds between two squeue calls while the sweep waits
        fatal_reasons: List[str] = field(default_factory=lambda: list(FATAL_REASONS))

    class SlurmLauncher(_SubmititSlurm):
        """hydra-submitit-launcher's SlurmLauncher that waits on Slurm with :func:`wait`."""

        def __init__(self, **params: Any) -> None:
            own = {k: params.pop(k) for k in OWN_KEYS if k in params}
            super().__init__(**params)
            self.poll_s = float(own.get("poll_s", 10.0))
            fatal = own.get("fatal_reasons", FATAL_REASONS)
            self.fatal_reasons = list(OmegaConf.to_container(fatal) if OmegaConf.is_config(fatal) else fatal)

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
            """The parent's submission (its executor and parameters, one array), then :func:`wait`,
            then the results; a job that ended without one is a failed job of the sweep."""
            import submitit
            from hydra.core.singleton import Singleton
            from hydra.core.utils import filter_overrides
            from submitit.core.utils import FailedJobError

            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            assert self.config is not None and len(job_overrides) > 0
            init_keys = {"submitit_folder", "max_num_timeout"}
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                             slurm_max_num_timeout=self.params["max_num_timeout"])
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                          for k, v in self.params.items() if k not in init_keys})
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            numbered = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
            for idx, overrides in numbered:
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            args = [(o, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()) for idx, o in numbered]
            try:
                jobs = executor.map_array(self, *zip(*args))
            except FailedJobError as e:  # sbatch refused: its own words
                said = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
                raise ConfigError(f"sbatch refused the sweep's jobs: {said[-1]} (see the hydra.launcher.* "
                                  f"keys: partition, account, qos, cpus_per_task, mem_gb, timeout_min)") from e
            by_id = {j.job_id: j for j in jobs}
            ids = ",".join(array_ids(list(by_id)))
            print(f"slurm: submitted {len(jobs)} job{'s' * (len(jobs) != 1)} (squeue -j {ids}) into {sweep_dir}",
                  file=sys.stderr, flush=True)
            try:
                states = wait(list(by_id), lambda j: has_result(by_id[j]), self.params, sweep_dir, self.poll_s,
                              self.fatal_reasons)
            except ConfigError:  # cancelled before any job ran: no sweep folder is left behind
                remove_unstarted(sweep_dir)
                raise
            return [self.result(j, states[j.job_id], overrides, idx) for j, (idx, overrides) in zip(jobs, numbered)]

        def result(self, job, state: str, overrides: List[str], idx: int):
            """The job's JobReturn; one that ended without a result (killed, timed out, its node
            lost) is recorded as a failed job, as a job's own error is, and the sweep goes on."""
            from hydra.core.utils import JobReturn, JobStatus

            for _ in range(int(30 / max(self.poll_s, 0.1)) + 1):  # a shared file system may lag
                if has_result(job):
                    return job.results()[0]
                time.sleep(min(self.poll_s, 30))
            log = job.paths.stderr
            message = (f"Slurm job {job.job_id} ended {state if state != GONE else ''} without a result"
                       f"{'' if state != GONE else ' (gone from squeue)'}; see {log}").replace("  ", " ")
            job_dir = self.job_dir(overrides, idx)
            print(f"metamm train: job {job_dir.name if job_dir else idx}: error: {message}", file=sys.stderr)
            if job_dir is not None:
                from metamm_cli.scale.callbacks import record_failure
                record_failure(job_dir, message)
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, task_name=str(self.config.hydra.job.name),
                             _return_value={"status": "failed", "error": message})

        def job_dir(self, overrides: List[str], idx: int) -> Optional[Path]:
            """The folder job ``idx`` runs in (the sweep config the job composes), None if unknown."""
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(cfg.hydra.job):
                    cfg.hydra.job.num = idx
                return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            except Exception:  # noqa: BLE001 - only for the record; the message says which job anyway
                return None


def remove_unstarted(sweep_dir: Path) -> None:
    """A sweep folder that holds only submitit's files and multirun.yaml (no job started) goes,
    and its empty parents (multiruns/, the task's folder, the output root) with it."""
    import shutil

    if not sweep_dir.is_dir() or any(p.name not in (".submitit", "multirun.yaml") for p in sweep_dir.iterdir()):
        return
    shutil.rmtree(sweep_dir, ignore_errors=True)
    for parent in list(sweep_dir.parents)[:3]:
        if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def has_result(job) -> bool:
    """Whether every task of a submitit job wrote its result file."""
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    return all(t.paths.result_pickle.exists() for t in tasks)
