"""`metamm compare PATH...`: one table of runs (sweep jobs, single runs, or everything under a
folder), the settings that differ as columns, runs that differ only in ``seed`` grouped (mean ±
std over seeds), optionally evaluated on the same test episodes (``--eval``) and plotted.

The pieces are reusable: ``find_runs(paths)`` -> folders, ``load_run(folder)`` -> a dict of what
the folder records, ``table(runs, sort)`` -> rows (one per setting), ``render(rows, fmt)`` -> text.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from metamm_cli import ConfigError
from metamm_cli.robustness import ENSEMBLE_FILE

# Override keys that say where or how a run was recorded, not what was trained.
BOOKKEEPING = {"exp", "sweep", "trainer.resume", "trainer.progress", "trainer.tensorboard", "output_root", "search.trial", "trainer.test",
               "task_name"}
SEED = "seed"
# Accuracy metrics (percent, shown with ± std or the run's CI) then plain numbers; "test:NAME" per eval set.
ACC_METRICS = ("best_val", "final_val", "test")
PLAIN_METRICS = ("steps", "wall_time_s", "episodes_per_s")
# Summaries of the robustness curve (eval.missing_sweep's "all": every modality missing at each
# rate), in accuracy points (robustness.py): relative, and effective against the late-fusion row.
ROBUST_METRICS = ("robustness", "effective_robustness")
# Runs of a preset that records its paper's result (preset.paper.accuracy): that number, and the
# wall time of the first validation at or above it.
PAPER_METRICS = ("paper", "time_to_paper_s")
HEADERS = {"best_val": "best val", "final_val": "final val", "test": "test", "steps": "steps",
           "wall_time_s": "wall time", "episodes_per_s": "episodes/s", "paper": "paper",
           "time_to_paper_s": "time to paper", "robustness": "rel. robustness",
           "effective_robustness": "eff. robustness"}
ASCENDING = {"wall_time_s", "time_to_paper_s"}  # sort keys where smaller is better
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: hydra.yaml is long
SKIP_DIRS = {"__pycache__", "node_modules", "checkpoints", "tb"}


# -- finding and reading run folders

def is_run(folder: Path) -> bool:
    """A run folder: ``config.yaml`` and ``metrics.json``, ``checkpoints/`` or a ``RUNNING`` claim;
    or a sweep job that failed (``failed.json``), even before its config was written."""
    folder = Path(folder)
    return (folder / "failed.json").is_file() or (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("metrics.json", "checkpoints", "RUNNING"))


def find_runs(paths: Iterable) -> List[Path]:
    """Every run folder at or beneath each path (sweep, task or output folders), sorted, once each.
    A missing path, or one with no run beneath, is a one-line ConfigError naming it."""
    found: Dict[Path, None] = {}
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise ConfigError(f"{given}: no such file or folder")
        if not path.is_dir():
            raise ConfigError(f"{given}: not a folder (give a run, sweep or output folder)")
        here = []
        for dirpath, dirnames, _ in os.walk(path):
            if is_run(Path(dirpath)):
                here.append(Path(dirpath))
                dirnames[:] = []
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        if not here:
            raise ConfigError(f"{given}: no run folder found there (a run folder holds config.yaml and "
                              f"metrics.json or checkpoints/)")
        found.update((p.resolve(), None) for p in sorted(here))
    return list(found)


def _read_json(path: Path) -> Optional[Dict]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(Path(path).read_text(), Loader=_LOADER)
    except (OSError, yaml.YAMLError):
        return None


def label(folder: Path) -> str:
    """A run folder relative to the working directory where possible."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def is_running(folder: Path) -> bool:
    """A live process holds the folder (its ``RUNNING`` claim; a stale one, of a killed run, is not)."""
    from metamm_cli.claim import running_pid

    return (Path(folder) / "RUNNING").exists() and running_pid(Path(folder)) is not None


def status_of(folder: Path, metrics: Optional[Dict], config: Dict) -> str:
    """running (a live ``RUNNING`` claim), stopped (a signal stopped it, or it ended before
    ``trainer.max_steps``), finished, or failed (no final metrics and no live process: it crashed
    or was killed)."""
    if is_running(folder):
        return "running"
    if (Path(folder) / ENSEMBLE_FILE).is_file():  # robustness.make_ensembles: nothing was trained
        return "ensemble"
    if metrics is None or (Path(folder) / "failed.json").is_file():
        return "failed"
    if metrics.get("status") == "pruned":
        return "pruned"
    max_steps = (config.get("trainer") or {}).get("max_steps")
    if metrics.get("early_stopped"):
        return "finished early"
    if metrics.get("interrupted") or (max_steps is not None and (metrics.get("step") or 0) < max_steps):
        return "stopped"
    return "finished"


def eval_score(report: Optional[Dict]) -> Tuple[Optional[float], Optional[float], Optional[str]]:
    """(value, 95% CI, what) of an eval report: few-shot accuracy, or class recall@1 for retrieval."""
    if not report:
        return None, None, None
    if report.get("accuracy") is not None:
        return report["accuracy"], report.get("ci95"), "accuracy"
    if report.get("task") == "retrieval" and report.get("class"):
        return report["class"].get("recall@1"), None, "class recall@1"
    return None, None, None


def load_run(folder: Path) -> Dict[str, Any]:
    """What a run folder records: overrides, Hydra's group choices, the resolved config, status,
    the metrics the table shows, the validation history and every eval report (``eval.json`` as
    ``tests[""]``, ``eval-NAME.json`` as ``tests["NAME"]``)."""
    folder = Path(folder)
    config = _read_yaml(folder / "config.yaml") or {}
    overrides = _read_yaml(folder / ".hydra" / "overrides.yaml")
    if not isinstance(overrides, list):
        overrides = (_read_json(folder / "run.json") or {}).get("overrides") or []
    hydra_cfg = _read_yaml(folder / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    metrics = _read_json(folder / "metrics.json")
    m = metrics or {}
    history = [h for h in m.get("history") or [] if isinstance(h, dict)]
    best_ci = next((h.get("val_acc_ci95") for h in history if h.get("step") == m.get("best_step")), None)
    final = {"val_acc": m.get("val_acc"), "val_acc_ci95": m.get("val_acc_ci95")}
    if final["val_acc"] is None and history:  # a stopped run: its last validation
        final = history[-1]
    tests = {}
    for path in sorted(folder.glob("eval*.json")):
        name = "" if path.name == "eval.json" else path.stem[len("eval-"):] if path.stem.startswith("eval-") else None
        report = _read_json(path)
        if name is None or report is None:
            continue
        value, ci, what = eval_score(report)
        tests[name] = {"value": value, "ci95": ci, "metric": what, "episodes": report.get("episodes"),
                       "split": report.get("split"), "setting": report.get("setting"),
                       "eval_seed": ((report.get("config") or {}).get("eval") or {}).get("seed"),
                       "step": report.get("step"), "overrides": report.get("eval_overrides"),
                       "missing_sweep": report.get("missing_sweep")}
    return {"path": str(folder), "name": label(folder), "overrides": [str(o) for o in overrides],
            "choices": {k: v for k, v in choices.items() if isinstance(k, str)}, "config": config,
            "seed": config.get(SEED), "status": status_of(folder, metrics, config),
            "step": m.get("step"), "max_steps": (config.get("trainer") or {}).get("max_steps"),
            "best_val": m.get("best_val_acc"), "best_val_ci95": best_ci,
            "final_val": final.get("val_acc"), "final_val_ci95": final.get("val_acc_ci95"),
            "wall_time_s": m.get("wall_time_s"), "episodes_per_s": m.get("episodes_per_s"),
            "history": history, "tests": tests, **paper_of(config, history)}


def paper_of(config: Dict, history: List[Dict]) -> Dict[str, Any]:
    """The paper's reported accuracy of the run's preset (``preset.paper.accuracy``, percent)
    and its source, and the time to reach it: ``time_to_paper_s``, the wall time (``time_s``,
    seconds since the run started) of the first validation at or above it; ``paper_reached``:
    True, False (no validation reached it), or None (no paper number, or a history without
    times)."""
    paper = ((config.get("preset") or {}) if isinstance(config, dict) else {}).get("paper")
    accuracy = paper.get("accuracy") if isinstance(paper, dict) else None
    out = {"paper": float(accuracy) if isinstance(accuracy, (int, float)) else None,
           "paper_source": paper.get("source") if isinstance(paper, dict) else None,
           "time_to_paper_s": None, "time_to_paper_step": None, "paper_reached": None}
    if out["paper"] is None:
        return out
    for h in history:
        if h.get("val_acc") is not None and h["val_acc"] >= out["paper"]:
            out.update(time_to_paper_s=h.get("time_s"), time_to_paper_step=h.get("step"),
                       paper_reached=True if h.get("time_s") is not None else None)
            return out
    if history:
        out["paper_reached"] = False
    return out


# -- which settings differ

def override_key(override: str) -> str:
    """``+fusion@x=attention`` -> ``fusion``; ``~trainer.lr`` -> ``trainer.lr``."""
    return override.split("=", 1)[0].lstrip("~+").split("@", 1)[0]


def ignored(key: str) -> bool:
    return key in BOOKKEEPING or key == SEED or key.replace("/", ".").split(".")[0] == "hydra"


def _select(config: Dict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def fmt_value(value: Any) -> str:
    """A config value as one would type it: ``[image,audio]``, ``0.001``, ``true``, ``-`` for none;
    a config node by its target's class name."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        target = value.get("_target_")
        if target:
            return str(target).rsplit(".", 1)[-1]
        return "{" + ",".join(f"{k}:{fmt_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def setting_value(run: Dict, key: str) -> str:
    """A run's value for an override key: the option chosen for a config group (``attention``),
    else the key's value in its resolved config."""
    if key in run["choices"]:
        return fmt_value(run["choices"][key])
    value = _select(run["config"], key.replace("/", "."))
    if value is None and not run["config"]:  # a job that failed before its config was written
        value = next((o.split("=", 1)[1] for o in run["overrides"] if override_key(o) == key), None)
    return fmt_value(value)


def _flat(config: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(config, dict) or not config:
        return {prefix[:-1]: config} if prefix else {}
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def fingerprint(run: Dict) -> str:
    """The run's resolved config without its seed and bookkeeping keys: runs that share it are
    the same setting (seeds of one experiment)."""
    if not run["config"]:  # a job that failed before writing its config: a setting of its own
        return run["path"]
    flat = {k: v for k, v in _flat(run["config"]).items() if not ignored(k)}
    return json.dumps(flat, sort_keys=True, default=str)


def _distinguishes(groups: List[List[Dict]], cols: List[str]) -> bool:
    return len({tuple(setting_value(g[0], c) for c in cols) for g in groups}) == len(groups)


def columns(runs: List[Dict], groups: List[List[Dict]]) -> List[str]:
    """The override keys whose values differ between the runs (bookkeeping keys and seed aside).
    Where they do not tell the settings apart (runs of different presets, or differences that no
    override names), ``exp`` and then the differing config keys are added."""
    keys = list(dict.fromkeys(override_key(o) for r in runs for o in r["overrides"]))

    def differ(key):
        return len({setting_value(r, key) for r in runs}) > 1

    cols = [k for k in keys if not ignored(k) and differ(k)]
    if _distinguishes(groups, cols):
        return cols
    if differ("exp"):
        cols.append("exp")
        if _distinguishes(groups, cols):
            return cols
    covered = tuple(c.replace("/", ".") for c in cols)
    flats = [_flat(r["config"]) for r in runs]
    for key in dict.fromkeys(k for f in flats for k in f):
        if ignored(key) or any(key == c or key.startswith(c + ".") for c in covered):
            continue
        if len({fmt_value(f.get(key)) for f in flats}) > 1:
            cols.append(key)
    return cols


# -- the table

def summarize(values: Sequence[Optional[float]], cis: Sequence[Optional[float]] = ()) -> Dict[str, Any]:
    """mean, std over seeds (n > 1), ci95 (one run: its own 95% CI; several: the CI of the mean over
    seeds, 1.96 std / sqrt(n)), n (runs with a value)."""
    pairs = [(v, c) for v, c in zip(values, list(cis) + [None] * (len(values) - len(cis))) if v is not None]
    n = len(pairs)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    vals = [float(v) for v, _ in pairs]
    std = statistics.stdev(vals) if n > 1 else None
    ci = 1.96 * std / math.sqrt(n) if n > 1 else pairs[0][1]
    return {"mean": statistics.fmean(vals), "std": std, "ci95": ci, "n": n}


def metric_names(runs: List[Dict]) -> List[str]:
    sets = sorted({name for r in runs for name in r["tests"] if name})
    paper = PAPER_METRICS if any(r.get("paper") is not None for r in runs) else ()
    robust = ROBUST_METRICS if any(robust_curve(r) for r in runs) else ()
    return ["best_val", "final_val", "test", *(f"test:{s}" for s in sets), *robust, *paper, *PLAIN_METRICS]


def missing_sweep(run: Dict) -> Dict[str, list]:
    """The run's ``missing_sweep`` curves: from eval.json, else the first eval-NAME.json with one."""
    for name in sorted(run["tests"]):  # "" (eval.json) sorts first
        sweep = (run["tests"][name] or {}).get("missing_sweep")
        if sweep:
            return sweep
    return {}


def robust_curve(run: Dict) -> List[Dict]:
    """The run's robustness curve: accuracy against the rate of every modality missing at once."""
    return missing_sweep(run).get("all") or []


def is_late(run: Dict) -> bool:
    """A late-fusion run (``fusion=late``): the reference of effective robustness."""
    return str(((run.get("config") or {}).get("fusion") or {}).get("_target_", "")).endswith(".Late")


def add_effective_robustness(runs: List[Dict]) -> None:
    """Each run's effective robustness against the mean late-fusion curve of the same dataset
    (``effective_robustness`` in the run dict; None without exactly one late-fusion setting)."""
    from metamm_cli.robustness import effective_robustness, relative_robustness

    late: Dict[str, List[Dict]] = {}
    for r in runs:
        if is_late(r) and robust_curve(r):
            late.setdefault(str((r["config"].get("dataset") or {}).get("_target_")), []).append(r)
    for r in runs:
        curve = robust_curve(r)
        r["robustness"] = relative_robustness(curve) if curve else None
        refs = late.get(str((r["config"].get("dataset") or {}).get("_target_")), [])
        r["effective_robustness"] = None
        if curve and refs and len({fingerprint(x) for x in refs}) == 1:
            rates = sorted({p["rate"] for x in refs for p in robust_curve(x)})
            mean = [{"rate": q, "accuracy": statistics.fmean(p["accuracy"] for x in refs for p in robust_curve(x)
                                                             if p["rate"] == q and p.get("accuracy") is not None)}
                    for q in rates]
            r["effective_robustness"] = effective_robustness(curve, mean)


def metric_of(run: Dict, metric: str) -> Tuple[Optional[float], Optional[float]]:
    if metric == "test" or metric.startswith("test:"):
        t = run["tests"].get(metric[5:] if ":" in metric else "") or {}
        return t.get("value"), t.get("ci95")
    if metric == "steps":
        return run["step"], None
    return run.get(metric), run.get(f"{metric}_ci95")


def group_status(runs: List[Dict]) -> str:
    counts = Counter(r["status"] for r in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def run_entry(run: Dict, cols: List[str]) -> Dict[str, Any]:
    """A run as the JSON output shows it: its settings and every number (no config)."""
    skip = {"config", "choices"}
    return {"settings": {c: setting_value(run, c) for c in cols},
            **{k: v for k, v in run.items() if k not in skip}}


def sort_key(metric: str, metrics: List[str], cols: List[str]) -> str:
    """``--sort`` as a metric or column name: test, test:NAME (or 'test NAME'), best_val, final_val,
    steps, wall_time_s, episodes_per_s, or a column."""
    aliases = {"best_val_acc": "best_val", "val": "final_val", "val_acc": "final_val", "final_val_acc": "final_val",
               "test_acc": "test", "wall_time": "wall_time_s", "time": "wall_time_s", "episodes/s": "episodes_per_s",
               "step": "steps", "time_to_paper": "time_to_paper_s"}
    key = aliases.get(metric, metric)
    if key.startswith("test ") or (key.startswith("test_") and f"test:{key[5:]}" in metrics):
        key = "test:" + key[5:].strip()
    if key in metrics or key in cols:
        return key
    raise ConfigError(f"--sort {metric}: choose one of {', '.join(metrics + cols)}")


def table(runs: List[Dict], sort: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per setting (runs that differ only in ``seed`` together), best first by ``sort``
    (default: test accuracy if any run has one, else best validation accuracy). A row:
    ``settings`` {column: value}, ``n``, ``seeds``, ``status``, ``metrics`` {name: summarize(...)},
    ``runs`` (each run's own numbers), ``sort``."""
    add_effective_robustness(runs)
    groups: Dict[str, List[Dict]] = {}
    for run in runs:
        groups.setdefault(fingerprint(run), []).append(run)
    grouped = [sorted(g, key=lambda r: (str(r["seed"]), r["path"])) for g in groups.values()]
    cols = columns(runs, grouped)
    metrics = metric_names(runs)
    rows = []
    for g in grouped:
        stats = {}
        for m in metrics:
            values = [metric_of(r, m) for r in g]
            stats[m] = summarize([v for v, _ in values], [c for _, c in values])
            if m.startswith("test"):  # accuracy, or class recall@1 for a retrieval evaluation
                t = [r["tests"].get(m[5:] if ":" in m else "") for r in g]
                stats[m]["what"] = next((x["metric"] for x in t if x and x["metric"]), None)
        if "time_to_paper_s" in stats:  # runs that never reached the paper's accuracy
            stats["time_to_paper_s"]["not_reached"] = sum(r.get("paper_reached") is False for r in g)
        if g[0]["max_steps"] is not None:
            stats["steps"]["max_steps"] = max(r["max_steps"] or 0 for r in g)
        stats["steps"]["range"] = [min((r["step"] for r in g if r["step"] is not None), default=None),
                                   max((r["step"] for r in g if r["step"] is not None), default=None)]
        rows.append({"settings": {c: setting_value(g[0], c) for c in cols}, "n": len(g),
                     "seeds": [r["seed"] for r in g], "status": group_status(g), "metrics": stats,
                     "runs": [run_entry(r, cols) for r in g]})
    if sort is None:
        sort = "test" if any(r["metrics"]["test"]["n"] for r in rows) else "best_val"
    key = sort_key(sort, metrics, cols)

    def order(row):
        if key in cols:  # numbers by value (0.01 before 0.1 before 1), then text
            value = row["settings"][key]
            try:
                return (0, float(value), "")
            except ValueError:
                return (0, math.inf, value)
        mean = row["metrics"][key]["mean"]
        if mean is None:
            return (1, 0.0, "")
        return (0, mean if key in ASCENDING else -mean, "")

    rows.sort(key=order)  # stable: ties keep their order
    for row in rows:
        row["sort"] = key
    return rows


# -- rendering

def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def fmt_acc(stat: Dict, n: int) -> str:
    """``65.00 ± 7.07`` (mean ± std over seeds), ``66.67 ± 14.08 (CI)`` (one run: its 95% CI),
    ``[1/2]`` when only some of the row's runs have it."""
    if not stat["n"]:
        return "-"
    if stat["n"] > 1:
        text = f"{stat['mean']:.2f} ± {stat['std']:.2f}"
    elif stat["ci95"] is not None:
        text = f"{stat['mean']:.2f} ± {stat['ci95']:.2f} (CI)"
    else:
        text = f"{stat['mean']:.2f}"
    return text + (f" [{stat['n']}/{n}]" if stat["n"] < n else "")


def fmt_steps(stat: Dict) -> str:
    lo, hi = stat.get("range") or (None, None)
    if lo is None:
        return "-"
    text = str(lo) if lo == hi else f"{lo}-{hi}"
    return text + (f"/{stat['max_steps']}" if stat.get("max_steps") and hi < stat["max_steps"] else "")


def fmt_time_to_paper(stat: Dict, n: int) -> str:
    """``4m 10s`` (mean over the runs that reached the paper's accuracy; ``[k/n]`` when only k of
    the n did), ``not reached`` when none did, ``-`` when unknown."""
    if stat["n"]:
        return fmt_seconds(stat["mean"]) + (f" [{stat['n']}/{n}]" if stat["n"] < n else "")
    return "not reached" if stat.get("not_reached") else "-"


def per_second(rate: float) -> str:
    """evaluate.per_second's format (three significant digits), without importing torch."""
    return f"{rate:.3g}" if abs(rate) < 1000 else f"{rate:,.0f}"


def cells(row: Dict, metrics: List[str]) -> List[str]:
    out = []
    for m in metrics:
        stat = row["metrics"][m]
        if m == "steps":
            out.append(fmt_steps(stat))
        elif m == "wall_time_s":
            out.append(fmt_seconds(stat["mean"]))
        elif m == "paper":
            out.append("-" if stat["mean"] is None else f"{stat['mean']:.2f}")
        elif m == "time_to_paper_s":
            out.append(fmt_time_to_paper(stat, row["n"]))
        elif m == "episodes_per_s":
            out.append(per_second(stat["mean"]) if stat["mean"] is not None else "-")
        else:
            out.append(fmt_acc(stat, row["n"]))
    return out


def header(metric: str, rows: Sequence[Dict] = ()) -> str:
    """A metric's column title; an eval set scored by retrieval says so: ``test ret (class recall@1)``."""
    text = HEADERS.get(metric) or metric.replace(":", " ")
    what = {r["metrics"][metric].get("what") for r in rows} - {None, "accuracy"}
    return text + (f" ({', '.join(sorted(what))})" if what else "")


def render(rows: List[Dict], fmt: str = "md") -> str:
    """The rows as a Markdown table (``md``), CSV (``csv``: per metric its mean, std, ci95 and n)
    or JSON (``json``: every row with every run and all numbers)."""
    if not rows:
        return ""
    cols = list(rows[0]["settings"])
    metrics = list(rows[0]["metrics"])
    if fmt == "json":
        return json.dumps({"columns": cols, "metrics": metrics, "sort": rows[0]["sort"], "rows": rows},
                          indent=2, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*cols, "n", "seeds", "status", *(f"{m}{s}" for m in metrics for s in ("", "_std", "_ci95", "_n"))])
        for row in rows:
            w.writerow([*row["settings"].values(), row["n"], " ".join(map(str, row["seeds"])), row["status"],
                        *("" if row["metrics"][m][k] is None else row["metrics"][m][k]
                          for m in metrics for k in ("mean", "std", "ci95", "n"))])
        return buf.getvalue().rstrip("\n")
    if fmt != "md":
        raise ConfigError(f"--format {fmt}: choose md, csv or json")
    heads = [*cols, "n", "status", *(header(m, rows) for m in metrics)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        values = [*row["settings"].values(), str(row["n"]), row["status"], *cells(row, metrics)]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    return "\n".join(lines)


def robustness_table(rows: List[Dict]) -> str:
    """The robustness curves as a Markdown table: per setting (with a curve), the accuracy with
    every modality missing at each rate (mean over its runs ± the 95% CI of that mean; one run:
    its own CI), then the relative and effective robustness; '' when no run has a curve."""
    curves = [(row, [robust_curve(r) for r in row["runs"] if robust_curve(r)]) for row in rows]
    curves = [(row, c) for row, c in curves if c]
    if not curves:
        return ""
    from metamm_cli.plots import curve

    rates = sorted({p["rate"] for _, cs in curves for c in cs for p in c})
    cols = list(rows[0]["settings"])
    heads = [*cols, "n", *(f"missing {r:g}" for r in rates), "rel. robustness", "eff. robustness"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row, cs in curves:
        xs, mean, band = curve([{p["rate"]: (p["accuracy"], p.get("ci95")) for p in c if p.get("accuracy") is not None}
                                for c in cs])
        at = dict(zip(xs, zip(mean, band)))
        cells_ = [f"{at[r][0]:.2f} ± {at[r][1]:.2f}" if r in at else "-" for r in rates]
        rob = [fmt_acc(row["metrics"][m], row["n"]) if m in row["metrics"] else "-" for m in ROBUST_METRICS]
        lines.append("| " + " | ".join([*row["settings"].values(), str(len(cs)), *cells_, *rob]) + " |")
    return "\n".join(lines)


def legend(rows: List[Dict]) -> str:
    if not rows:
        return ""
    runs = sum(r["n"] for r in rows)
    paper = ("; paper: the accuracy its paper reports (preset.paper), time to paper: wall time of the "
             "first validation at or above it" if "paper" in rows[0]["metrics"] else "")
    return (f"{len(rows)} setting{'s' * (len(rows) != 1)}, {runs} run{'s' * (runs != 1)}; accuracies in %: "
            f"mean ± std over seeds, or one run's 95% CI (CI); [k/n]: k of the n runs have it{paper}; "
            f"sorted by {header(rows[0]['sort'])}")


# -- evaluation (in process, on the same episodes)

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


def eval_file(name: str) -> str:
    return "eval.json" if not name else f"eval-{name}.json"


def is_fresh(run_dir: Path, name: str, overrides: List[str]) -> bool:
    """An eval report newer than ``best.pt``, made with the same overrides."""
    report_path, ckpt = Path(run_dir) / eval_file(name), Path(run_dir) / "checkpoints" / "best.pt"
    report = _read_json(report_path)
    if report is None or report_path.stat().st_mtime < ckpt.stat().st_mtime:
        return False
    return report.get("eval_overrides", overrides) == overrides


def evaluate_runs(folders: List[Path], sets: Dict[str, List[str]], log=sys.stderr) -> List[str]:
    """Evaluate every run's ``checkpoints/best.pt`` once per eval set (``""``: the run's own eval
    settings, ``eval.json``; NAME: with those overrides, ``eval-NAME.json``), in this process, on
    the episodes of each run's ``eval.seed``. A report newer than the checkpoint with the same
    overrides is kept; running runs are skipped. Returns one line per run that failed."""
    from hydra import compose, initialize_config_dir

    from metamm_cli.cli import one_line
    from metamm_cli.config import config_dir, register_schemas
    from metamm_cli.evaluate import evaluate_checkpoint
    from metamm_cli.record import write_json

    register_schemas()
    problems = []
    todo = [(f, n, o) for f in folders for n, o in sets.items()]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for i, (folder, name, overrides) in enumerate(todo, 1):
            what = f"[{i}/{len(todo)}] {label(folder)} {eval_file(name)}"
            ckpt = folder / "checkpoints" / "best.pt"
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
                cfg = compose("eval", overrides=[*overrides, f"+ckpt={quoted}"])
            except Exception as e:  # noqa: BLE001 - a bad override fails for every run: stop here
                raise ConfigError(f"--eval-set {name}={','.join(overrides)}: {one_line(e)}" if name
                                  else f"--eval: {one_line(e)}") from e
            tmp = f".{eval_file(name)}.{os.getpid()}.compare.tmp"
            print(what, file=log)
            try:
                with contextlib.redirect_stdout(log):  # evaluate's own lines: not into the table
                    report = evaluate_checkpoint(cfg, list(overrides), folder, filename=tmp)
            except Exception as e:  # noqa: BLE001 - one run's failure is reported, the others go on
                problems.append(f"{label(folder)} {eval_file(name)}: {one_line(e)}")
                print(f"{what}: error: {one_line(e)}", file=log)
                continue
            finally:
                (folder / tmp).unlink(missing_ok=True)
            write_json(folder / eval_file(name), {**report, "eval_overrides": list(overrides)})
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
    return (f"the {eval_file(name)} reports differ in episodes/split/setting/eval.seed "
            f"({len(seen)} variants): their test accuracies are not paired")


# -- the command

USAGE = "metamm compare PATH... [--sort METRIC] [--format md|csv|json] [--out FILE] [--eval] " \
        "[--eval-set NAME=OVERRIDES] [--plot FILE.png]"
DESCRIPTION = """One table of runs: PATH is a run, a sweep, or any folder above them (a task
folder, outputs/). Columns: the overrides that differ between the runs (a config group by the
option chosen), best and final validation accuracy, test accuracy ± 95% CI (eval.json, see
--eval), steps, wall time, episodes/s and status (finished/stopped/running/failed). Runs that
differ only in seed form one row: mean ± std over seeds and n (one seed: its own 95% CI, marked
(CI)). Runs of a preset that records its paper's result (preset.paper.accuracy, the +exp=paper/*
presets) add the columns paper (that accuracy) and time to paper (wall time of the first
validation at or above it, or "not reached")."""
EPILOG = """examples:
  metamm compare outputs/smoke/multiruns/2026-12-01_15-37-40_851667
  metamm compare outputs/ --eval --sort test --format csv --out runs.csv
  metamm compare SWEEP --eval-set "missing50=missing.test.image=0.5,missing.test.audio=0.5"
  metamm compare SWEEP --eval-set "img2aud=episode.support_modalities=[image],episode.query_modalities=[audio]"
  metamm compare SWEEP --eval --plot sweep.png"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metamm compare", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run, sweep, task or output folders")
    p.add_argument("--sort", metavar="METRIC",
                   help="test (default when a run has one), test:NAME, best_val (default otherwise), "
                        "final_val, steps, wall_time_s, episodes_per_s, or a column; best first")
    p.add_argument("--format", default="md", choices=("md", "csv", "json"), help="output format (default md)")
    p.add_argument("--out", metavar="FILE", help="write the table to FILE instead of printing it")
    p.add_argument("--eval", action="store_true",
                   help="evaluate every run's checkpoints/best.pt on the test split, same episodes for all "
                        "(eval.seed, the run's own eval settings), into RUN/eval.json; a report newer than "
                        "the checkpoint is kept")
    p.add_argument("--eval-set", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="also evaluate with these overrides into RUN/eval-NAME.json, column 'test NAME' "
                        "(repeatable; implies --eval; commas inside [...] stay)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="validation curves, test accuracy bars and missing-modality curves in one figure "
                        "(needs matplotlib: pip install \"metamm[plot]\")")
    return p


def main(argv: List[str]) -> int:
    """`metamm compare`; bad input raises ConfigError (the CLI prints it as one line)."""
    args = parser().parse_args(argv)
    sets: Dict[str, List[str]] = {}
    for text in args.eval_set:
        name, overrides = parse_eval_set(text)
        if name in sets:
            raise ConfigError(f"--eval-set {name}: given twice")
        sets[name] = overrides
    if args.plot:
        from metamm_cli.plots import check_matplotlib
        check_matplotlib()  # before any evaluation: a missing extra fails at once
    folders = find_runs(args.paths)
    problems = []
    if args.eval or sets:
        problems = evaluate_runs(folders, {"": [], **sets})
        from metamm_cli.robustness import make_ensembles

        made = make_ensembles([load_run(f) for f in folders], out=sys.stderr)
        if made:  # the single-modality runs' ensemble: the baseline of the robustness curves
            problems += evaluate_runs(made, {"": [], **sets})
            folders += [f.resolve() for f in made if f.resolve() not in folders]
    runs = [load_run(f) for f in folders]
    rows = table(runs, args.sort)
    for name in ["", *sets] if (args.eval or sets) else []:
        why = unpaired(runs, name)
        if why:
            print(f"metamm compare: warning: {why}", file=sys.stderr)
    text = render(rows, args.format)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
        if args.format == "md":
            print("\n" + legend(rows))
            robust = robustness_table(rows)
            if robust:
                print("\nrobustness: accuracy with every modality missing at each rate (mean ± 95% CI; "
                      "rel. robustness: its mean over the rates; eff. robustness: above late fusion's "
                      "curve shifted to the same clean accuracy; accuracy points)\n" + robust)
    if args.plot:
        from metamm_cli.plots import plot
        print(f"wrote {plot(rows, Path(args.plot))}")
    for line in problems:
        print(f"metamm compare: error: {line}", file=sys.stderr)
    return 1 if problems else 0
