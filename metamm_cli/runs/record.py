"""What a run folder records besides checkpoints: ``config.yaml``, ``run.json`` (versions,
device, git commit, overrides, one entry per resume), ``metrics.json`` (always valid JSON), the
TensorBoard writer and its hparams table; and the JSON helpers they share."""
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

# TensorBoard tags are "<metric>/<split>": its time series dashboard groups cards by the part
# before '/' and sorts the groups by name, so accuracy comes first, train, val and test side by
# side (acc, acc_ci95, loss, speed, test/missing). The hparams table's metrics are the last
# acc/val and acc/test of each run.
TAGS = {"train/acc": "acc/train", "train/loss": "loss/train", "episodes_per_s": "speed/episodes_per_s"}
VAL_ACC, VAL_CI95, TEST_ACC, TEST_CI95 = "acc/val", "acc_ci95/val", "acc/test", "acc_ci95/test"
HPARAM_METRICS = (VAL_ACC, TEST_ACC)
NOT_COMPARED = HPARAM_SKIP | {"sweep", "search.trial"}  # overrides that name no setting
SHOWN_WITHOUT_OVERRIDES = ("algorithm", "dataset", "fusion")  # a run with no overrides: what it is


def override_key(override: str) -> str:
    """``+exp=smoke`` -> ``exp``; ``fusion@x=attention`` -> ``fusion``; ``~trainer.lr`` -> ``trainer.lr``."""
    return override.split("=", 1)[0].lstrip("~+").split("@", 1)[0]


def compared(key: str) -> bool:
    """Whether an override key names a setting (not ``hydra.*``, ``trainer.resume``, ...)."""
    dotted = key.replace("/", ".")
    return not (dotted in NOT_COMPARED or dotted.split(".")[0] in NOT_COMPARED or dotted.split(".")[0] == "hydra")


def swept_keys(overrides: List[str], params: Optional[Dict] = None) -> List[str]:
    """The keys a sweep varies: its sweeper's ``params`` and its command-line overrides that are
    sweeps (``fusion=concat,attention``, ``seed=range(3)``, ``trainer.lr=interval(...)``), in
    order, each once; bookkeeping keys left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, keys = OverridesParser.create(), []
    for line in [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides):
        try:
            sweep = parser.parse_override(line).is_sweep_override()
        except Exception:  # noqa: BLE001 - Hydra refused it before the job started; not a sweep here
            sweep = False
        key = override_key(line)
        if sweep and compared(key) and key not in keys:
            keys.append(key)
    return keys


def sweep_overrides(output_dir: Path) -> Optional[List[str]]:
    """The command-line overrides of the sweep a job belongs to, from the ``multirun.yaml`` that
    Hydra's sweepers write into the sweep folder before any job starts (a job's own
    ``hydra.overrides.task`` holds its values, not the sweep's); None where none is found."""
    from metamm_cli.runs.reader import read_yaml

    for folder in list(Path(output_dir).parents)[:3]:
        if (folder / "multirun.yaml").is_file():
            cfg = read_yaml(folder / "multirun.yaml") or {}
            task = ((cfg.get("hydra") or {}).get("overrides") or {}).get("task")
            return [str(o) for o in task] if isinstance(task, list) else None
    return None


def job_identity(task_name: str) -> Dict[str, Any]:
    """This job's Hydra group choices, the override keys its hparams table shows (``compared``:
    a sweep's swept keys; a single run's command-line overrides) and its TensorBoard name: a
    sweep job's swept values (``fusion=attention,seed=1``), a single run's overrides or its task
    name; {} outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    choices = {k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items() if not k.startswith("hydra")}
    from metamm_cli.config import job_dirname

    task = [str(o) for o in hc.overrides.task]
    keys: List[str] = []
    if hc.mode == RunMode.MULTIRUN:
        sweep = sweep_overrides(Path(hc.runtime.output_dir))
        params = hc.sweeper.get("params")
        keys = swept_keys(sweep if sweep is not None else task,
                          OmegaConf.to_container(params) if OmegaConf.is_config(params) else params)
    mine = sorted(o.lstrip("+") for o in task if "=" in o and override_key(o) in keys)
    if mine:
        name = ",".join(mine)
    else:  # a single run, or a sweep of one job: its own overrides
        keys = [override_key(o) for o in task if "=" in o and compared(override_key(o))]
        name = hc.job.override_dirname or task_name
    return {"choices": choices, "compared": list(dict.fromkeys(keys)), "tb": job_dirname(name.replace("/", "_"))}


def shown_hparams(values: Dict[str, Any], keys: Optional[List[str]], choices: Dict[str, str]) -> Dict[str, Any]:
    """The hparams table's columns: of :func:`hparams`' ``values``, those of the override
    ``keys`` (a config group by its option, any other key with the keys beneath it), else the
    algorithm, dataset and fusion."""
    out = {}
    for key in keys or []:
        dotted = key.replace("/", ".")
        group = key in choices
        out.update({k: v for k, v in values.items() if k == dotted or not group and k.startswith(dotted + ".")})
    return out or {k: values[k] for k in SHOWN_WITHOUT_OVERRIDES if k in values}


def write_hparams(writer, values: Dict[str, Any], shown: Dict[str, Any], step: int) -> None:
    """One hparams table for a sweep: every run declares the same columns, the keys ``shown``
    (what differs, marked so: TensorBoard ticks the first five of those it is told differ), and
    the metrics acc/val and acc/test, read from the run's own scalars (no extra cards); the
    session itself records all of ``values``. Written into the run's event file."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as summaries

    _, start, end = summaries(values, dict.fromkeys(HPARAM_METRICS, 0.0))
    kind = lambda v: api_pb2.DATA_TYPE_STRING if isinstance(v, str) else api_pb2.DATA_TYPE_FLOAT64  # noqa: E731
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=kind(v), differs=True) for k, v in shown.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t), display_name=t) for t in HPARAM_METRICS])
    content = plugin_data_pb2.HParamsPluginData(experiment=experiment, version=metadata.PLUGIN_DATA_VERSION)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                  content=content.SerializeToString()))
    for summary in (Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=meta)]), start, end):
        writer.file_writer.add_summary(summary, step)
    writer.flush()


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
    identity = ({k: first[k] for k in ("choices", "compared", "tb") if k in first} if first
                else job_identity(run.cfg.task_name))
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


WARMUP_STEPS = 2  # a process's first steps: first forward passes, allocator, autotuning, compilation


class Throughput:
    """Steady-state training speed, ``episodes_per_s``: the episodes and seconds of this
    process's training steps after its first :data:`WARMUP_STEPS` (validation, checkpoints
    and start-up are never timed), so that jobs of a sweep compare by what they compute, not by
    which one ran first. None until a step after the warm-up."""

    def __init__(self, first_step: int, warmup: int = WARMUP_STEPS):
        self.counted_from = first_step + warmup  # steps after this one count
        self.episodes, self.seconds, self.steps = 0, 0.0, 0

    def add(self, step: int, episodes: int, seconds: float) -> None:
        """One training step (``step``: its number, 1-based) of ``episodes`` tasks, ``seconds`` long."""
        if step > self.counted_from:
            self.episodes, self.seconds, self.steps = self.episodes + episodes, self.seconds + seconds, self.steps + 1

    @property
    def per_second(self) -> Optional[float]:
        return self.episodes / self.seconds if self.seconds > 0 else None


def write_metrics(run, val: Optional[Dict], **extra) -> Dict[str, Any]:
    """metrics.json: the final (or last) values, ``episodes_per_s`` at steady state
    (:class:`Throughput`; ``timed_steps`` of them), ``train_time_s`` (every training step) and
    ``wall_time_s`` (everything, start-up included)."""
    S = run.state
    last = run.last or {}
    speed = getattr(run, "throughput", None)
    metrics = finite_json({
        "step": S.step, "val_acc": val["accuracy"] if val else None,
        "val_acc_ci95": val["ci95"] if val else None, "val_episodes": val["episodes"] if val else None,
        "best_val_acc": S.best if S.history else None, "best_step": S.best_step,
        "train_loss": last.get("train/loss"), "train_acc": last.get("train/acc"),
        "episodes_per_s": speed.per_second if speed else None, "timed_steps": speed.steps if speed else 0,
        "train_time_s": run.train_time,
        "wall_time_s": S.wall,
        "skipped_steps": int(S.bad), "device": str(run.device), "run_dir": str(run.run_dir),
        "resumed_from": run.resumed_from, "history": S.history, **extra})
    write_json(run.run_dir / layout.METRICS, metrics)
    return metrics
