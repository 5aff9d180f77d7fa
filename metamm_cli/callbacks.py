"""Hydra callback: at the end of a sweep, one table of every job and of every setting over seeds."""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("metamm")


def summarize_sweep(sweep_dir: Path) -> Dict[str, Any]:
    """Read each job's ``metrics.json`` and ``.hydra/overrides.yaml`` under ``sweep_dir``; group
    jobs that differ only in ``seed``; write ``summary.json`` and ``summary.md`` there."""
    jobs: List[Dict[str, Any]] = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        metrics = json.loads(metrics_file.read_text())
        jobs.append({"job": job.name, "overrides": list(overrides), **{
            k: metrics.get(k) for k in ("val_acc", "val_acc_ci95", "best_val_acc", "step", "episodes_per_s")}})
    groups: Dict[str, List[float]] = {}
    for job in jobs:
        key = " ".join(o for o in job["overrides"] if not o.lstrip("+").startswith("seed=")) or "(defaults)"
        groups.setdefault(key, []).append(job["val_acc"])
    settings = [{"setting": k, "runs": len(v), "val_acc_mean": statistics.mean(v),
                 "val_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0} for k, v in groups.items()]
    settings.sort(key=lambda s: -s["val_acc_mean"])
    lines = ["| setting | runs | val acc (mean ± std over seeds) |", "|---|---|---|"]
    lines += [f"| {s['setting']} | {s['runs']} | {s['val_acc_mean']:.2f} ± {s['val_acc_std']:.2f} |"
              for s in settings]
    summary = {"sweep_dir": str(sweep_dir), "settings": settings, "jobs": jobs, "table": lines}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = summarize_sweep(sweep_dir)
        if summary["jobs"]:
            log.info("sweep summary (%s):\n%s", sweep_dir / "summary.md", "\n".join(summary["table"]))
