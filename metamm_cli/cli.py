"""`metamm train | eval | data | compare`: a thin dispatcher in front of Hydra. Each command
hands its arguments to the module whose job they are; errors reach the user as one line naming
the key or file (exit 2), ``HYDRA_FULL_ERROR=1`` shows the full traceback instead."""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

from metamm_cli import app

USAGE = """usage: metamm <command> [options] [key=value ...]

commands:
  train   train a meta-learner        metamm train [+exp=NAME] [-m] [key=value ...]
  eval    evaluate a checkpoint       metamm eval --ckpt PATH [key=value ...]
  data    show what a dataset yields  metamm data [dataset=NAME] [key=value ...]
  compare compare runs in one table   metamm compare PATH... [--eval] [--sort METRIC] [--plot FILE.png]

`metamm train --help` shows Hydra's help with the config groups and their options;
`metamm train --cfg job` prints the composed config. Outputs go to outputs/.
Set HYDRA_FULL_ERROR=1 for full tracebacks."""


def cmd_train(argv: List[str]) -> int:
    from metamm_cli.config import check_yaml, option
    from metamm_cli.runs.resume import resume_overrides
    from metamm_cli.scale.callbacks import LAST_SWEEP, failed_jobs_line
    from metamm_cli.scale.distributed import rank_overrides, world
    from metamm_cli.scale.launch import check_plugins, register_plugins
    from metamm_cli.train import train

    check_yaml(option(argv, "--config-dir", "-cd"))
    check_plugins(argv)
    from metamm_cli.scale.population import refuse_argv
    refuse_argv(argv)  # population under torchrun: refused before a process group is joined
    register_plugins()
    app.register_launchers()  # before the first composition (resume_overrides composes)
    extra, ckpt = rank_overrides(argv) if world().distributed else resume_overrides(argv)
    LAST_SWEEP.clear()
    app.hydra_app("train", lambda cfg: {"status": "finished", **train(cfg, ckpt=ckpt)}, argv + extra, "metamm train")
    if LAST_SWEEP.get("failed"):  # each job already said why, in one line
        print(f"metamm train: {failed_jobs_line()}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(argv: List[str]) -> int:
    from metamm_cli.evaluate import EVAL_USAGE, app_overrides, eval_task, parse_eval_args
    from metamm_cli.runs import layout
    from metamm_cli.runs.checkpoint import load_checkpoint

    if any(a in ("-h", "--help") for a in argv):
        print(EVAL_USAGE)
        return 0
    overrides, ckpt = parse_eval_args(argv)
    # Load once, here: a bad file fails before Hydra makes an output folder.
    state = load_checkpoint(ckpt, prefer=layout.BEST) if ckpt != "null" else None
    app.hydra_app("eval", lambda cfg: eval_task(cfg, state).get("accuracy"), overrides + app_overrides(ckpt, state),
                  "metamm eval")
    return 0


def cmd_data(argv: List[str]) -> int:
    import logging

    from metamm_cli.config import check_ranges, compose
    from metamm_cli.data.describe import USAGE as DATA_USAGE, describe

    if any(a in ("-h", "--help") for a in argv):
        print(DATA_USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)  # progress lines
    cfg = compose(argv)
    check_ranges(cfg)
    describe(cfg)
    return 0


def cmd_compare(argv: List[str]) -> int:
    from metamm_cli.compare.command import main as compare_main

    return compare_main(argv)  # its own argparse help: metamm compare --help


COMMANDS: Dict[str, object] = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "compare": cmd_compare}


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
    app.SHOW_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    from metamm_cli.runs.signals import exit_code, interrupted_line, startup_signals

    startup_signals()  # SIGTERM before training behaves as Ctrl-C: nothing half-made is left (or, for a
    # sweep waiting on Slurm, the jobs go on and the line says how to collect them)
    try:
        return COMMANDS[command](rest)
    except KeyboardInterrupt as exc:
        if app.SHOW_TRACEBACK:
            raise
        print(f"metamm {command}: {interrupted_line(exc, rest)}", file=sys.stderr)
        return exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - every error becomes one line
        if app.SHOW_TRACEBACK:
            raise
        return app.report(f"metamm {command}", exc)


if __name__ == "__main__":
    sys.exit(main())
