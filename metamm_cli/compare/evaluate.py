"""``metamm compare --eval / --eval-set``: every run's ``best.pt`` evaluated in one process on
the same test episodes, each report kept while newer than its checkpoint."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from metamm_cli import ConfigError
from metamm_cli.runs.reader import is_running, label, read_json
from metamm_cli.runs import layout

def split_overrides(text: str) -> List[str]:
    """``a=1,b=[x,y],c='p,q'`` -> ``['a=1', 'b=[x,y]', "c='p,q'"]``: commas inside brackets,
    braces or quotes stay."""
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [o.strip() for o in out if o.strip()]


def parse_eval_set(text: str) -> Tuple[str, List[str]]:
    """``NAME=KEY=VALUE,KEY=VALUE`` -> (NAME, overrides)."""
    name, _, rest = text.partition("=")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"--eval-set {text}: give NAME=KEY=VALUE[,KEY=VALUE...] with a NAME of letters, "
                          f"digits, '-', '_' or '.'")
    overrides = split_overrides(rest)
    if not overrides or any("=" not in o for o in overrides):
        raise ConfigError(f"--eval-set {text}: give NAME=KEY=VALUE[,KEY=VALUE...] "
                          f"(e.g. missing50=missing.test.image=0.5,missing.test.audio=0.5)")
    return name, overrides


def is_fresh(run_dir: Path, name: str, overrides: List[str]) -> bool:
    """An eval report newer than ``best.pt``, made with the same overrides."""
    report_path, ckpt = Path(run_dir) / layout.eval_file(name), Path(run_dir) / layout.CHECKPOINTS / layout.BEST
    report = read_json(report_path)
    if report is None or report_path.stat().st_mtime < ckpt.stat().st_mtime:
        return False
    return report.get("eval_overrides", overrides) == overrides


def evaluate_runs(folders: List[Path], sets: Dict[str, List[str]], log=sys.stderr) -> List[str]:
    """Evaluate every run's ``checkpoints/best.pt`` once per eval set (``""``: the run's own eval
    settings, ``eval.json``; NAME: with those overrides, ``eval-NAME.json``), in this process, on
    the episodes of each run's ``eval.seed``. A report newer than the checkpoint with the same
    overrides is kept; running runs are skipped. Returns one line per run that failed."""
    from metamm_cli.config import compose
    from metamm_cli.errors import one_line
    from metamm_cli.evaluate import evaluate_checkpoint
    from metamm_cli.runs.record import write_json

    problems = []
    todo = [(f, n, o) for f in folders for n, o in sets.items()]
    for i, (folder, name, overrides) in enumerate(todo, 1):
        what = f"[{i}/{len(todo)}] {label(folder)} {layout.eval_file(name)}"
        ckpt = folder / layout.CHECKPOINTS / layout.BEST
        if not ckpt.is_file():
            print(f"{what}: skipped (no checkpoints/best.pt yet)", file=log)
            continue
        if is_running(folder):
            print(f"{what}: skipped (still running)", file=log)
            continue
        if is_fresh(folder, name, overrides):
            print(f"{what}: up to date", file=log)
            continue
        quoted = "'" + str(ckpt).replace("\\", "\\\\").replace("'", "\\'") + "'"
        try:
            cfg = compose([*overrides, f"+ckpt={quoted}"], name="eval")
        except Exception as e:  # noqa: BLE001 - a bad override fails for every run: stop here
            raise ConfigError(f"--eval-set {name}={','.join(overrides)}: {one_line(e)}" if name
                              else f"--eval: {one_line(e)}") from e
        tmp = f".{layout.eval_file(name)}.{os.getpid()}.compare.tmp"
        print(what, file=log)
        try:
            with contextlib.redirect_stdout(log):  # evaluate's own lines: not into the table
                report = evaluate_checkpoint(cfg, list(overrides), folder, filename=tmp)
        except Exception as e:  # noqa: BLE001 - one run's failure is reported, the others go on
            problems.append(f"{label(folder)} {layout.eval_file(name)}: {one_line(e)}")
            print(f"{what}: error: {one_line(e)}", file=log)
            continue
        finally:
            (folder / tmp).unlink(missing_ok=True)
        write_json(folder / layout.eval_file(name), {**report, "eval_overrides": list(overrides)})
    return problems


def unpaired(runs: List[Dict], name: str = "") -> Optional[str]:
    """Why the runs' ``name`` evaluations are not on the same episodes, or None. Runs of different
    presets (``preset.name``: different protocols by design, e.g. the paper presets) are not
    expected to share episodes; runs of one preset, or without one, are."""
    by_preset: Dict[str, set] = {}
    for r in runs:
        t = r["tests"].get(name)
        if t:
            preset = ((r["config"].get("preset") or {}).get("name") or "") if isinstance(r["config"], dict) else ""
            by_preset.setdefault(preset, set()).add(
                (t.get("episodes"), t.get("split"), t.get("setting"), t.get("eval_seed")))
    seen = max(by_preset.values(), key=len, default=set())
    if len(seen) <= 1:
        return None
    return (f"the {layout.eval_file(name)} reports differ in episodes/split/setting/eval.seed "
            f"({len(seen)} variants): their test accuracies are not paired")


