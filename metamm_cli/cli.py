"""`metamm train | eval | data`: a thin dispatcher in front of Hydra.

Errors reach the user as one line naming the key or file (exit 2); ``HYDRA_FULL_ERROR=1``
shows the full traceback instead.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

USAGE = """usage: metamm <command> [options] [key=value ...]

commands:
  train   train a meta-learner        metamm train [+exp=NAME] [-m] [key=value ...]
  eval    evaluate a checkpoint       metamm eval --ckpt PATH [key=value ...]
  data    show what a dataset yields  metamm data [dataset=NAME] [key=value ...]
  compare compare runs in one table   metamm compare PATH... [--eval] [--sort METRIC] [--plot FILE.png]

`metamm train --help` shows Hydra's help with the config groups and their options;
`metamm train --cfg job` prints the composed config. Outputs go to outputs/.
Set HYDRA_FULL_ERROR=1 for full tracebacks."""


_SHOW_TRACEBACK = False


def _report(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return 2


def _remove_failed_start(folder: Path) -> None:
    """A job that failed before its first checkpoint leaves only Hydra's files and start-up
    records: remove them (and the empty folders above, up to the output root) so that a failed
    start leaves no run folder behind. A folder some other process holds is left alone."""
    from metamm_cli.claim import running_pid

    if not folder.is_dir() or any(p.name not in _START_DEBRIS for p in folder.iterdir()):
        return
    if running_pid(folder) not in (None, os.getpid()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in list(folder.parents)[:3]:  # runs/, the task's folder, the output root
        if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


_START_DEBRIS = {".hydra", "train.log", "eval.log", "config.yaml", "run.json", "RUNNING"}


def _hydra_app(config_name: str, task: Callable, argv: List[str], prog: str) -> None:
    import functools

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metamm_cli.config import config_dir, register_schemas
    from metamm_cli.distributed import world

    @functools.wraps(task)
    def guarded(cfg):
        out = Path(HydraConfig.get().runtime.output_dir)
        sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM before training: nothing half-made stays
            if world().main:
                _remove_failed_start(out)
            if _SHOW_TRACEBACK:
                raise
            from metamm_cli.signals import exit_code
            print(f"{prog}: interrupted during start-up; nothing was saved", file=sys.stderr)
            raise SystemExit(exit_code(exc))
        except Exception as exc:  # noqa: BLE001 - reported here, before Hydra adds its own lines
            if _SHOW_TRACEBACK:
                raise
            if not sweep:
                w = world()
                if w.main:
                    _remove_failed_start(out)
                raise SystemExit(_report(prog if w.main else f"{prog} (rank {w.rank})", exc))
            # a sweep job: said in one line and recorded in its folder; the other jobs go on
            from metamm_cli.callbacks import record_failure
            message = one_line(exc)
            print(f"{prog}: job {out.name}: error: {message}", file=sys.stderr)
            record_failure(out, message)
            return {"status": "failed", "error": message}

    register_schemas()
    sys.argv = [prog] + argv
    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(guarded)()


def _train_task(cfg, ckpt=None) -> Dict:
    """A job's result: its metrics with a ``status`` (finished, or pruned by a search)."""
    from metamm_cli.train import train

    metrics = train(cfg, ckpt=ckpt)
    return {"status": "finished", **metrics}


def _eval_task(cfg, state=None) -> Optional[float]:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from metamm_cli.evaluate import evaluate_checkpoint

    hc = HydraConfig.get()
    if state is None and cfg.get("ckpt"):
        from metamm_cli.checkpoint import load_checkpoint
        state = load_checkpoint(cfg.ckpt, prefer="best.pt")
    return evaluate_checkpoint(cfg, list(hc.overrides.task), Path(hc.runtime.output_dir),
                               state).get("accuracy")


def _option(argv: List[str], *names: str) -> Optional[str]:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def check_yaml(config_dir: Optional[str]) -> None:
    """A YAML syntax error in a --config-dir file, named with its file and line (Hydra's own
    message names neither)."""
    import yaml

    from metamm_cli import ConfigError

    if not config_dir or not Path(config_dir).is_dir():
        return
    for path in sorted(Path(config_dir).rglob("*.yaml")):
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"--config-dir: YAML syntax error in {where}: "
                              f"{getattr(e, 'context', None) or ''} {getattr(e, 'problem', None) or e}".replace("  ", " "))


_INFO_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "--resolve")


def _resume_args(argv: List[str]):
    """For ``trainer.resume=...``: load the checkpoint before Hydra makes a folder and send the
    run back into its own folder; with ``-m``, send the sweep back into its sweep folder (each
    job then skips itself when finished, resumes from its last.pt when stopped). Returns (extra
    overrides, checkpoint)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from metamm_cli.claim import claim
    from metamm_cli.config import config_dir, register_schemas
    from metamm_cli.resume import find_sweep, hydra_quote, resume_state, run_dir_of

    given = [a for a in argv if a.lstrip("+").startswith("trainer.resume=")]
    if not given or given[-1].split("=", 1)[1] in ("", "null", "false", "False") or \
            any(a in _INFO_FLAGS for a in argv):
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
    user_dir = _option(argv, "--config-dir", "-cd")
    if user_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(user_dir).resolve()}]")
    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if multirun:
        sweep = find_sweep(value, Path(cfg.output_root) / cfg.task_name)
        return [f"hydra.sweep.dir={hydra_quote(sweep.resolve())}"], None
    ckpt = resume_state(cfg)
    run = run_dir_of(Path(ckpt["path"]))
    if run is None:  # a loose checkpoint file: the run continues in a new folder
        return [], ckpt
    claim(run, f"trainer.resume={value}")  # before any work: a second resume is refused
    return [f"hydra.run.dir={hydra_quote(run.resolve())}", "hydra.output_subdir=null"], ckpt


def _distributed_args(argv: List[str]):
    """Under torchrun: rank 0 picks the run folder (a new one, or the resumed run's) and every
    rank uses it; ranks > 0 log to ``train_rank<r>.log`` there and print only warnings."""
    import time

    from metamm_cli import ConfigError
    from metamm_cli.checkpoint import load_checkpoint
    from metamm_cli.distributed import broadcast, world
    from metamm_cli.resume import RESUMABLE

    w = world()
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("torchrun trains one run over several processes: drop -m (a sweep of "
                          "distributed jobs: hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=N)")
    picked = None
    if w.main:
        try:
            extra, ckpt = _resume_args(argv)
            if not extra and ckpt is None and not any(a.startswith("hydra.run.dir=") for a in argv):
                stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{int(time.time() * 1e6) % 1000000:06d}"
                extra = [f"hydra.run.dir=${{output_root}}/${{task_name}}/runs/{stamp}"]
            picked = {"extra": extra, "ckpt": ckpt["path"] if ckpt else None}
        except Exception as e:  # noqa: BLE001 - every rank must hear it, or they wait forever
            picked = {"error": one_line(e)}
            broadcast(picked, w)
            raise
    picked = broadcast(picked, w)
    if "error" in picked:
        raise ConfigError(f"rank 0: {picked['error']}")
    ckpt = load_checkpoint(picked["ckpt"], key="trainer.resume", versions=RESUMABLE) if picked["ckpt"] else None
    extra = list(picked["extra"])
    if not w.main:
        extra += ["hydra.output_subdir=null", f"hydra.job.name=train_rank{w.rank}",
                  "hydra.job_logging.root.level=WARNING"]
    return extra, ckpt


def cmd_train(argv: List[str]) -> int:
    from metamm_cli.callbacks import LAST_SWEEP
    from metamm_cli.distributed import world
    from metamm_cli.launch import check_plugins, register_plugins

    check_yaml(_option(argv, "--config-dir", "-cd"))
    check_plugins(argv)
    register_plugins()
    extra, ckpt = _distributed_args(argv) if world().distributed else _resume_args(argv)
    LAST_SWEEP.clear()
    _hydra_app("train", lambda cfg: _train_task(cfg, ckpt), argv + extra, "metamm train")
    failed = LAST_SWEEP.get("failed")
    if failed:  # each job already said why, in one line
        print(f"metamm train: {len(failed)} of {max(len(LAST_SWEEP['runs']), len(failed))} sweep jobs failed "
              f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); see {LAST_SWEEP['dir']}/summary.md",
              file=sys.stderr)
        return 1
    return 0


EVAL_USAGE = """usage: metamm eval --ckpt PATH [key=value ...]

Evaluates a checkpoint on fixed test episodes (eval.seed) and prints the mean accuracy with its
95% confidence interval; writes eval.json and eval.log to outputs/evals/<time>_<run>/.

  --ckpt PATH   a checkpoint (.pt) or a run folder (its checkpoints/best.pt). Required.
  key=value     changes the checkpoint's own config: episode.way=10, eval.split=val,
                eval.episodes=600, trainer.device=cpu, trainer.progress=false, ...
                (encoder, fusion and algorithm keys must match the weights).

`metamm train --help` lists the config groups and keys."""


def cmd_eval(argv: List[str]) -> int:
    from metamm_cli import ConfigError

    if any(a in ("-h", "--help") for a in argv):
        print(EVAL_USAGE)
        return 0
    out, ckpt, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--ckpt" or arg.startswith("--ckpt="):
            if arg == "--ckpt":
                if i + 1 >= len(argv) or not argv[i + 1] or argv[i + 1].startswith("-"):
                    raise ConfigError("--ckpt needs a path: metamm eval --ckpt PATH [key=value ...]")
                ckpt, i = argv[i + 1], i + 2
            else:
                ckpt, i = arg.split("=", 1)[1], i + 1
            continue
        if arg.startswith(("ckpt=", "+ckpt=")):
            ckpt = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    if any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info") for a in out):
        ckpt = ckpt or "null"  # help and config printing need no checkpoint
    elif not ckpt:
        raise ConfigError("--ckpt is required: metamm eval --ckpt PATH [key=value ...]")
    from metamm_cli.checkpoint import load_checkpoint

    # Load once, here: a bad file fails before Hydra makes an output folder.
    state = load_checkpoint(ckpt, prefer="best.pt") if ckpt != "null" else None
    # Hydra's grammar would read characters such as '=' or ',' in a path: quote it.
    quoted = "'" + ckpt.replace("\\", "\\\\").replace("'", "\\'") + "'"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in _run_name(Path(ckpt)))
    where = [f"hydra.run.dir=${{output_root}}/evals/${{now:%Y-%m-%d_%H-%M-%S_%f}}_{name}"] if state else []
    _hydra_app("eval", lambda cfg: _eval_task(cfg, state), out + [f"+ckpt={quoted}"] + where, "metamm eval")
    return 0


def _run_name(ckpt: Path) -> str:
    """Which run a checkpoint is: ``TASK_RUNFOLDER_best`` (or the file's stem)."""
    ckpt = ckpt.expanduser().resolve()
    if ckpt.is_dir():
        return f"{ckpt.parent.parent.name}_{ckpt.name}" if ckpt.parent.name in ("runs", "multiruns") else ckpt.name
    if ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
        task = run.parent.parent.name if run.parent.name in ("runs", "multiruns") else run.parent.name
        return f"{task}_{run.name}_{ckpt.stem}"
    return ckpt.stem


def cmd_data(argv: List[str]) -> int:
    from hydra import compose, initialize_config_dir
    from metamm_cli.config import check_ranges, config_dir, register_schemas
    from metamm_cli.data.base import build_dataset
    from metamm_cli.data.episodes import build_sampler

    if any(a in ("-h", "--help") for a in argv):
        print("usage: metamm data [dataset=NAME] [dataset.KEY=VALUE ...] [episode.way=N ...]\n"
              "Prints each split's classes, samples and modality presence, and checks that the\n"
              "episode (way, shot + query) fits every split.")
        return 0
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)  # progress lines
    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=argv)
    check_ranges(cfg)
    dataset = build_dataset(cfg.dataset)
    E = cfg.episode
    print(dataset.describe())
    names = list(dataset.modalities)
    print(f"{'split':<6} {'classes':>8} {'samples':>8} {'min/class':>9}  present: " + " ".join(names))
    for split in ("train", "val", "test"):
        d = dataset.split(split)
        counts = d.class_counts()
        share = " ".join(f"{100 * d.present[:, i].float().mean():.0f}%".rjust(len(m))
                         for i, m in enumerate(names))
        print(f"{split:<6} {d.num_classes:>8} {len(d.labels):>8} {int(counts.min()):>9}  "
              f"present: {share}")
        build_sampler(cfg, dataset, split, "cpu", 1, 0)  # checks feasibility (eval.* for val/test)
    print(f"episodes: {E.way}-way {E.shot}-shot {E.query}-query fit every split")
    return 0


def cmd_compare(argv: List[str]) -> int:
    from metamm_cli.compare import main as compare_main

    return compare_main(argv)  # its own argparse help: metamm compare --help


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "compare": cmd_compare}


def one_line(exc: BaseException) -> str:
    """A one-line message for any error: ours as is, Hydra's and OmegaConf's condensed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from metamm_cli import ConfigError

    from metamm_cli.device import is_oom

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e)
    if any(is_oom(e) for e in chain):
        return ("out of memory: lower trainer.meta_batch or set trainer.task_chunk (training), "
                "eval.tasks_per_batch (evaluation), or use a smaller dataset.* size")
    for e in chain:
        if isinstance(e, MissingConfigException) and e.options:
            first = str(e).strip().splitlines()[0]
            return f"{first}; available: {', '.join(sorted(e.options))}"
    from hydra.errors import InstantiationException

    def lines(e):  # every line of the message but OmegaConf's key-location trailer
        return [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()
                and not ln.strip().startswith(("full_key:", "reference_type=", "object_type="))]

    message = " ".join(lines(exc)) or type(exc).__name__
    if isinstance(exc, InstantiationException) and message.endswith(":") and chain[1:]:
        message += f" {type(chain[1]).__name__}: {' '.join(lines(chain[1]))}"
    for e in chain[1:]:  # OmegaConf's reason behind a Hydra error
        if isinstance(e, OmegaConfBaseException) and "$" not in str(e) and lines(e):
            if " ".join(lines(e)) not in message:
                message += ": " + " ".join(lines(e))
            break
        if isinstance(e, (OSError, TypeError, ValueError)) and str(e).strip() and str(e) not in message:
            message += f" ({' '.join(str(e).split())})"
            break
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in message:
        message += f" ({exc.filename})"
    return message


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from metamm_cli import __version__

        print(f"metamm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"metamm: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    global _SHOW_TRACEBACK
    _SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    from metamm_cli.signals import exit_code, startup_signals

    startup_signals()  # SIGTERM before training behaves as Ctrl-C: nothing half-made is left
    try:
        return COMMANDS[command](rest)
    except KeyboardInterrupt as exc:
        if _SHOW_TRACEBACK:
            raise
        print(f"metamm {command}: interrupted during start-up; nothing was saved", file=sys.stderr)
        return exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - every error becomes one line
        if _SHOW_TRACEBACK:
            raise
        return _report(f"metamm {command}", exc)


if __name__ == "__main__":
    sys.exit(main())
