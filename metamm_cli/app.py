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
HELP_HYDRA_GROUPS = ("hydra/launcher", "hydra/sweeper")  # the Hydra groups a user picks from (sweeps)


def help_groups() -> str:
    """The config groups of `metamm train --help` (``${metamm_help_groups:}`` in hydra.help.template,
    configs/hydra/default.yaml), one ``group: option, ...`` line each: metamm's groups (a user's
    --config-dir included) and Hydra's launcher and sweeper groups, without the options whose
    name starts with ``_`` (a preset family's shared base, such as ``exp/paper/_maml``: not one
    to pick)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    if not GlobalHydra.instance().is_initialized():
        return ""
    loader = GlobalHydra.instance().config_loader()

    def groups(parent: str):
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group == "hydra":
                yield from HELP_HYDRA_GROUPS
            elif not name.startswith("_"):
                yield group
                yield from groups(group)

    lines = []
    for group in sorted(set(groups(""))):
        options = sorted(o for o in loader.get_group_options(group, ObjectType.CONFIG) if not o.startswith("_"))
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


SHIPPED_LAUNCHERS = ("joblib", "submitit_local", "submitit_slurm")  # configs/hydra/launcher/NAME.yaml


def register_launchers() -> None:
    """The shipped launcher configs, validated the Hydra 1.1+ way. A plugin stores its schema as
    ``hydra/launcher/NAME``, the name of metamm's YAML with metamm's defaults; Hydra would match
    the two by name (deprecated "automatic schema matching": a warning per composition, every
    job). So, as Hydra's migration guide says, the schema is renamed (``_NAME_schema``; ``_``: not
    an option to pick) and each YAML names it in its defaults list. submitit_slurm's schema is
    metamm's launcher's, which extends the plugin's with its own keys; the launcher class is
    registered as Hydra plugins are (an editable install does not show it to Hydra's scan)."""
    import importlib.util

    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's plugin scan stores the plugins' configs: done now, not later over these
    cs = ConfigStore.instance()
    group = cs.repo.get("hydra", {}).get("launcher", {})
    for name in SHIPPED_LAUNCHERS:
        node = group.pop(f"{name}.yaml", None)
        if node is not None:
            cs.store(group="hydra/launcher", name=f"_{name}_schema", node=node.node, provider=node.provider)
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        from hydra_plugins.metamm.slurm import MetammSlurmConf, SlurmLauncher

        Plugins.instance().register(SlurmLauncher)
        cs.store(group="hydra/launcher", name="_submitit_slurm_schema", node=MetammSlurmConf, provider="metamm")


def register_help() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("metamm_help_groups"):
        OmegaConf.register_new_resolver("metamm_help_groups", help_groups, use_cache=False)


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
    register_help()
    register_launchers()
    sys.argv = [prog] + argv
    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(guarded)()
