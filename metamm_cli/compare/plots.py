"""`metamm compare --plot FILE.png`: one figure of the compared rows (see compare.table):
(a) validation accuracy against the step, (b) test accuracy with its 95% CI and the chance level
(1/way of the test episodes), (c) accuracy against the missing rate of each modality (when
eval.json holds ``missing_sweep``).

A row's band or whisker is the table's interval (:mod:`metamm_cli.compare.stats`): the 95% CI of
the mean over its seeds, t(0.975, n-1) std / sqrt(n), or the single run's own CI. matplotlib is
an optional extra (``pip install "metamm[plot]"``), imported here only, drawing with the Agg
backend (no display, no global pyplot state).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from metamm_cli import ConfigError
from metamm_cli.compare.robustness import missing_sweep
from metamm_cli.compare.stats import INTERVAL, ci95

NEEDS = '--plot needs matplotlib: pip install "metamm[plot]"'


def check_matplotlib() -> None:
    """A one-line ConfigError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ConfigError(NEEDS) from e


def row_label(row: Dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "all runs"
    return text + (f" (n={row['n']})" if row["n"] > 1 else "")


def mean_band(points: Sequence[Tuple[float, Optional[float]]]) -> Tuple[float, float]:
    """(mean, half-width): the 95% CI of the mean over seeds (t, n-1), or one run's own CI (0 if none)."""
    values = [v for v, _ in points]
    if len(values) > 1:
        return statistics.fmean(values), ci95(values)
    return values[0], points[0][1] or 0.0


def curve(series: List[Dict[float, Tuple[float, Optional[float]]]]):
    """Per-run {x: (value, ci)} -> x, mean, band over the runs that have each x."""
    xs = sorted({x for s in series for x in s})
    stats = [mean_band([s[x] for s in series if x in s]) for x in xs]
    return xs, [m for m, _ in stats], [b for _, b in stats]


def val_curves(ax, rows: List[Dict], colors) -> None:
    for i, row in enumerate(rows):
        series = [{h["step"]: (h["val_acc"], h.get("val_acc_ci95")) for h in run["history"]
                   if h.get("step") is not None and h.get("val_acc") is not None} for run in row["runs"]]
        series = [s for s in series if s]
        if not series:
            continue
        xs, mean, band = curve(series)
        color = colors[i % len(colors)]
        ax.plot(xs, mean, marker="o", markersize=3, color=color, label=row_label(row))
        ax.fill_between(xs, [m - b for m, b in zip(mean, band)], [m + b for m, b in zip(mean, band)],
                        color=color, alpha=0.2, linewidth=0)
    ax.set_title(f"(a) validation accuracy (bands: {INTERVAL})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # below the axes: the curves stay readable
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    else:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)


def accuracy_bars(ax, rows: List[Dict], colors) -> None:
    metrics = [m for m in rows[0]["metrics"] if m == "test" or m.startswith("test:")]
    metrics = [m for m in metrics if any(r["metrics"][m]["n"] for r in rows)]
    if not metrics:
        ax.text(0.5, 0.5, "not evaluated on the test split\n(metamm compare --eval)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title("(b) test accuracy")
        return
    height = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        ys, means, errs = [], [], []
        for i, row in enumerate(rows):
            stat = row["metrics"][m]
            if stat["n"]:
                ys.append(i - 0.4 + height * (j + 0.5))
                means.append(stat["mean"])
                errs.append(stat["ci95"] or 0.0)
        color = ([colors[i % len(colors)] for i, r in enumerate(rows) if r["metrics"][m]["n"]] if len(metrics) == 1
                 else colors[j % len(colors)])  # one metric: the rows' colours of (a)
        ax.barh(ys, means, height=height, xerr=errs, capsize=3, color=color, alpha=0.85, label=m.replace(":", " "))
        chance_lines(ax, [(y, row["metrics"][m].get("chance")) for y, row in
                          zip(ys, [r for r in rows if r["metrics"][m]["n"]])], height)
    ax.set_yticks(range(len(rows)), [row_label(r) for r in rows], fontsize="small")
    ax.invert_yaxis()  # the table's best-first order, top down
    ax.set_xlabel(f"accuracy (%), mean ± {INTERVAL} over seeds")
    ax.set_title("(b) test accuracy")
    ax.grid(axis="x", alpha=0.3)
    if len(metrics) > 1:  # below the axes: never over a bar
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, len(metrics)))


def chance_lines(ax, bars: List[Tuple[float, Optional[float]]], height: float) -> None:
    """The chance level (1/way, in %) of the test bars: one dashed line across the axes when every
    bar shares it, else a dashed tick over each bar at its own; label ``chance``."""
    levels = {c for _, c in bars if c is not None}
    if not levels:
        return
    style = dict(color="0.3", linestyle="--", linewidth=1, zorder=3)
    if len(levels) == 1:
        level = levels.pop()
        if "chance" not in [ln.get_label() for ln in ax.lines]:  # one line for every metric
            ax.axvline(level, label="chance", **style)
            ax.annotate(f"chance {level:.4g}%", (level, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", fontsize="small", color="0.3")
        return
    ys = [y for y, c in bars if c is not None]
    drawn = "chance" in [c.get_label() for c in ax.collections]
    ax.vlines([c for _, c in bars if c is not None], [y - height / 2 for y in ys], [y + height / 2 for y in ys],
              label="_chance" if drawn else "chance", **style)


def curves(run: Dict) -> Dict[str, list]:
    """A run's missing-modality curves worth drawing: none for a run of one modality (its sweep
    holds only that modality, which a sample never loses: a flat line)."""
    sweep = missing_sweep(run)
    return sweep if len(sweep) > 1 or "all" in sweep else {}


def sweep_modalities(rows: List[Dict]) -> List[str]:
    return list(dict.fromkeys(m for row in rows for run in row["runs"] for m in curves(run)))


def robustness(ax, rows: List[Dict], modality: str, colors, letter: str = "c") -> None:
    for i, row in enumerate(rows):
        series = []
        for run in row["runs"]:
            points = curves(run).get(modality) or []
            series.append({p["rate"]: (p["accuracy"], p.get("ci95")) for p in points if p.get("accuracy") is not None})
        series = [s for s in series if s]
        if not series:
            continue
        xs, mean, band = curve(series)
        color = colors[i % len(colors)]
        baseline = row["status"] == "ensemble"  # the per-modality ensemble: dashed, the bar to clear
        ax.errorbar(xs, mean, yerr=band, marker="o", markersize=3, capsize=3, color=color,
                    linestyle="--" if baseline else "-", label=row_label(row))
    every = modality == "all"
    ax.set_title(f"({letter}) every modality missing at once" if every else f"({letter}) {modality} missing")
    ax.set_xlabel("rate at which each modality of a sample is missing (never its last)" if every
                  else f"rate of samples without {modality}")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def plot(rows: List[Dict], path: Path) -> Path:
    """Draw the rows of compare.table into ``path`` (PNG, or any format matplotlib writes)."""
    check_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ConfigError("--plot: no runs to draw")
    modalities = sweep_modalities(rows)
    panels = 2 + len(modalities)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(6 * ncols, 4.5 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    colors = [f"C{i}" for i in range(10)]
    val_curves(axes[0], rows, colors)
    accuracy_bars(axes[1], rows, colors)
    for k, (ax, modality) in enumerate(zip(axes[2:], modalities)):
        robustness(ax, rows, modality, colors, "cdefghij"[min(k, 7)])
    if modalities:
        axes[2].legend(fontsize="small")
    for ax in axes[panels:]:
        ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    except ValueError as e:  # an unknown extension
        raise ConfigError(f"--plot {path}: {e}") from e
    return path
