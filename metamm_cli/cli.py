"""`metamm train | eval | data`: a thin dispatcher in front of Hydra.

Errors reach the user as one line naming the key or file (exit 2); ``HYDRA_FULL_ERROR=1``
shows the full traceback instead.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

USAGE = """usage: metamm <command> [options] [key=value ...]

commands:
  train   train a meta-learner        metamm train [+exp=NAME] [-m] [key=value ...]
  eval    evaluate a checkpoint       metamm eval --ckpt PATH [key=value ...]
  data    show what a dataset yields  metamm data [dataset=NAME] [key=value ...]

`metamm train --help` shows Hydra's help with the config groups and their options;
`metamm train --cfg job` prints the composed config. Outputs go to outputs/.
Set HYDRA_FULL_ERROR=1 for full tracebacks."""


_SHOW_TRACEBACK = False


def _report(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return 2


def _hydra_app(config_name: str, task: Callable, argv: List[str], prog: str) -> None:
    import functools

    import hydra

    from metamm_cli.config import config_dir, register_schemas

    @functools.wraps(task)
    def guarded(cfg):
        try:
            return task(cfg)
        except Exception as exc:  # noqa: BLE001 - reported here, before Hydra adds its own lines
            if _SHOW_TRACEBACK:
                raise
            raise SystemExit(_report(prog, exc))

    register_schemas()
    sys.argv = [prog] + argv
    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(guarded)()


def _train_task(cfg) -> Optional[float]:
    from metamm_cli.train import train

    return train(cfg)["val_acc"]


def _eval_task(cfg, state=None) -> Optional[float]:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from metamm_cli.evaluate import evaluate_checkpoint

    hc = HydraConfig.get()
    return evaluate_checkpoint(cfg, list(hc.overrides.task), Path(hc.runtime.output_dir),
                               state).get("accuracy")


def cmd_train(argv: List[str]) -> int:
    _hydra_app("train", _train_task, argv, "metamm train")
    return 0


def cmd_eval(argv: List[str]) -> int:
    from metamm_cli import ConfigError

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
    _hydra_app("eval", lambda cfg: _eval_task(cfg, state), out + [f"+ckpt={quoted}"], "metamm eval")
    return 0


def cmd_data(argv: List[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from metamm_cli.config import check_ranges, config_dir, register_schemas
    from metamm_cli.data.episodes import EpisodeSampler

    if any(a in ("-h", "--help") for a in argv):
        print("usage: metamm data [dataset=NAME] [dataset.KEY=VALUE ...] [episode.way=N ...]\n"
              "Prints each split's classes, samples and modality presence, and checks that the\n"
              "episode (way, shot + query) fits every split.")
        return 0
    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=argv)
    check_ranges(cfg)
    dataset = instantiate(cfg.dataset, _convert_="all")
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
        EpisodeSampler(d, E.way, E.shot, E.query, 1, split_name=split)  # checks feasibility
    print(f"episodes: {E.way}-way {E.shot}-shot {E.query}-query fit every split")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}


def one_line(exc: BaseException) -> str:
    """A one-line message for any error: ours as is, Hydra's and OmegaConf's condensed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from metamm_cli import ConfigError

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e)
    for e in chain:
        if isinstance(e, MissingConfigException) and e.options:
            first = str(e).strip().splitlines()[0]
            return f"{first}; available: {', '.join(sorted(e.options))}"
    first = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    message = first[0] if first else type(exc).__name__
    for e in chain[1:]:  # OmegaConf's reason behind a Hydra error
        if isinstance(e, OmegaConfBaseException) and "$" not in str(e):
            message += ": " + str(e).strip().splitlines()[0]
            break
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
    try:
        return COMMANDS[command](rest)
    except Exception as exc:  # noqa: BLE001 - every error becomes one line
        if _SHOW_TRACEBACK:
            raise
        return _report(f"metamm {command}", exc)


if __name__ == "__main__":
    sys.exit(main())
