"""``metamm compare``'s table: which settings differ between runs (the columns), runs that
differ only in ``seed`` grouped, and every metric summarised per row."""
from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from metamm_cli import ConfigError
from metamm_cli.compare.robustness import effective_robustness, is_late, relative_robustness, robust_curve
from metamm_cli.compare.stats import ci95

# Override keys that say where or how a run was recorded, not what was trained.
BOOKKEEPING = {"exp", "sweep", "trainer.resume", "trainer.progress", "trainer.tensorboard", "output_root", "search.trial", "trainer.test",
               "task_name"}
SEED = "seed"
# Accuracy metrics (percent, shown as mean ± the 95% CI over seeds, or the run's own CI) then plain
# numbers; "test:NAME" per eval set.
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


def summarize(values: Sequence[Optional[float]], cis: Sequence[Optional[float]] = ()) -> Dict[str, Any]:
    """mean, std over seeds (n > 1), ci95 (several runs: the 95% CI of the mean over seeds with the
    t quantile of n-1 degrees of freedom, :mod:`metamm_cli.compare.stats`; one run: its own 95%
    CI over its episodes), n (runs with a value)."""
    pairs = [(v, c) for v, c in zip(values, list(cis) + [None] * (len(values) - len(cis))) if v is not None]
    n = len(pairs)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    vals = [float(v) for v, _ in pairs]
    std = statistics.stdev(vals) if n > 1 else None
    ci = ci95(vals) if n > 1 else pairs[0][1]
    return {"mean": statistics.fmean(vals), "std": std, "ci95": ci, "n": n}


def chance_level(reports: Sequence[Optional[Dict]]) -> Optional[float]:
    """The chance accuracy (%, 1/way) of a row's eval reports, read from their setting (``...,
    chance 20.00%``), when they share one; None otherwise (retrieval, fixed episodes files)."""
    levels = set()
    for t in reports:
        found = re.search(r"chance ([0-9.]+)%", str((t or {}).get("setting") or ""))
        if t and t.get("metric") == "accuracy" and found:
            levels.add(float(found.group(1)))
    return levels.pop() if len(levels) == 1 else None


def metric_names(runs: List[Dict]) -> List[str]:
    sets = sorted({name for r in runs for name in r["tests"] if name})
    paper = PAPER_METRICS if any(r.get("paper") is not None for r in runs) else ()
    robust = ROBUST_METRICS if any(robust_curve(r) for r in runs) else ()
    return ["best_val", "final_val", "test", *(f"test:{s}" for s in sets), *robust, *paper, *PLAIN_METRICS]


def add_effective_robustness(runs: List[Dict]) -> None:
    """Each run's effective robustness against the mean late-fusion curve of the same dataset
    (``effective_robustness`` in the run dict; None without exactly one late-fusion setting)."""
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
                stats[m]["chance"] = chance_level(t)
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


