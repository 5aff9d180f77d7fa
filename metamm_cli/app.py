"""Running a Hydra app the metamm way: every error becomes one line (a sweep job's is recorded
and the other jobs go on), and a start that fails leaves no folder behind."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, List

from metamm_cli.errors import one_line
from metamm_cli.runs import layout

SHOW_TRACEBACK = False  # HYDRA_FULL_ERROR=1 (cli.main sets it): tracebacks instead of one line


def report(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return 2


def remove_failed_start(folder: Path) -> None:
    """A job that failed before its first checkpoint leaves only Hydra's files and start-up
    records: remove them (and the empty folders above, up to the output root) so that a failed
    start leaves no run folder behind. A folder some other process holds is left alone."""
    from metamm_cli.runs.claim import running_pid

    if not folder.is_dir() or any(p.name not in START_DEBRIS for p in folder.iterdir()):
        return
    if running_pid(folder) not in (None, os.getpid()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in list(folder.parents)[:3]:  # runs/, the task's folder, the output root
        if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


START_DEBRIS = {layout.HYDRA, layout.LOG, layout.EVAL_LOG, layout.CONFIG, layout.RUN_INFO, layout.CLAIM}


def hydra_app(config_name: str, task: Callable, argv: List[str], prog: str) -> None:
    import functools

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metamm_cli.config import config_dir, register_schemas
    from metamm_cli.scale.distributed import world

    @functools.wraps(task)
    def guarded(cfg):
        out = Path(HydraConfig.get().runtime.output_dir)
        sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM before training: nothing half-made stays
            if world().main:
                remove_failed_start(out)
            if SHOW_TRACEBACK:
                raise
            from metamm_cli.runs.signals import exit_code
            print(f"{prog}: interrupted during start-up; nothing was saved", file=sys.stderr)
            raise SystemExit(exit_code(exc))
        except Exception as exc:  # noqa: BLE001 - reported here, before Hydra adds its own lines
            if SHOW_TRACEBACK:
                raise
            if not sweep:
                w = world()
                if w.main:
                    remove_failed_start(out)
                raise SystemExit(report(prog if w.main else f"{prog} (rank {w.rank})", exc))
            # a sweep job: said in one line and recorded in its folder; the other jobs go on
            from metamm_cli.scale.callbacks import record_failure
            message = one_line(exc)
            print(f"{prog}: job {out.name}: error: {message}", file=sys.stderr)
            record_failure(out, message)
            return {"status": "failed", "error": message}

    register_schemas()
    sys.argv = [prog] + argv
    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(guarded)()
