"""``metamm compare``'s output: the table as Markdown, CSV or JSON, its legend, and the
robustness table."""
from __future__ import annotations

import csv
import io
import json
from typing import Dict, List, Optional, Sequence

from metamm_cli import ConfigError
from metamm_cli.compare.robustness import robust_curve
from metamm_cli.compare.stats import INTERVAL
from metamm_cli.compare.table import HEADERS, ROBUST_METRICS

def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def fmt_acc(stat: Dict, n: int) -> str:
    """``65.00 ± 7.07`` (mean ± the 95% CI of the mean over seeds, t with n-1 degrees of freedom),
    ``66.67 ± 14.08 (1 run)`` (one run: its own 95% CI over its episodes), ``[1/2]`` when only
    some of the row's runs have it."""
    if not stat["n"]:
        return "-"
    if stat["ci95"] is not None:
        text = f"{stat['mean']:.2f} ± {stat['ci95']:.2f}" + (" (1 run)" if stat["n"] == 1 else "")
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


NOT_ACC = ("steps", "wall_time_s", "paper", "time_to_paper_s", "episodes_per_s")  # cells without an interval


def header(metric: str, rows: Sequence[Dict] = (), interval: bool = False) -> str:
    """A metric's column title; an eval set scored by retrieval says so: ``test ret (class recall@1)``;
    ``interval``: an accuracy column says which interval its cells show (``best val ± 95% CI``)."""
    text = HEADERS.get(metric) or metric.replace(":", " ")
    what = {r["metrics"][metric].get("what") for r in rows} - {None, "accuracy"}
    text += f" ({', '.join(sorted(what))})" if what else ""
    return text + (" ± 95% CI" if interval and metric not in NOT_ACC else "")


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
    heads = [*cols, "n", "status", *(header(m, rows, interval=True) for m in metrics)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        values = [*row["settings"].values(), str(row["n"]), row["status"], *cells(row, metrics)]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    return "\n".join(lines)


def robustness_table(rows: List[Dict]) -> str:
    """The robustness curves as a Markdown table: per setting (with a curve), the accuracy with
    every modality missing at each rate (mean over its runs ± the 95% CI of that mean, t with n-1
    degrees of freedom; one run: its own CI), then the relative and effective robustness; '' when
    no run has a curve."""
    curves = [(row, [robust_curve(r) for r in row["runs"] if robust_curve(r)]) for row in rows]
    curves = [(row, c) for row, c in curves if c]
    if not curves:
        return ""
    from metamm_cli.compare.plots import curve

    rates = sorted({p["rate"] for _, cs in curves for c in cs for p in c})
    cols = list(rows[0]["settings"])
    heads = [*cols, "n", *(f"missing {r:g} ± 95% CI" for r in rates), "rel. robustness ± 95% CI",
             "eff. robustness ± 95% CI"]
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
            f"mean ± {INTERVAL} over seeds, t(0.975, n-1)·std/√n, or one run's own 95% CI over its "
            f"episodes (1 run); [k/n]: k of the n runs have it{paper}; "
            f"sorted by {header(rows[0]['sort'])}")


