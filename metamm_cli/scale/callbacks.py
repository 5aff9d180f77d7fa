"""Hydra callback: at the end of a sweep, the table of its runs (metamm compare's) in
``summary.md`` / ``summary.json``, and which jobs failed (the command then exits non-zero)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metamm_cli import ConfigError
from metamm_cli.runs import layout

log = logging.getLogger("metamm")
LAST_SWEEP: Dict[str, Any] = {}  # the sweep that just ended: its folder, runs and failed jobs


def record_failure(job_dir: Path, message: str) -> None:
    """A sweep job failed: a line in the sweep's failed.jsonl, and the job's own failed.json
    unless its folder holds another run's results (a refused re-run leaves them alone)."""
    from metamm_cli.runs.record import write_json
    from metamm_cli.runs.resume import holds_a_run

    job_dir = Path(job_dir)
    line = json.dumps({"job": job_dir.name, "error": message, "time": time.time()}) + "\n"
    with open(job_dir.parent / layout.FAILURES, "a") as f:  # one short write: appends do not interleave
        f.write(line)
    if not holds_a_run(job_dir):
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json(job_dir / layout.FAILED, {"error": message})


def failures_since(sweep_dir: Path, since: float) -> list:
    try:
        lines = (Path(sweep_dir) / layout.FAILURES).read_text().splitlines()
    except OSError:
        return []
    return [e["job"] for e in map(json.loads, lines) if e.get("time", 0) >= since]


def summarize_sweep(sweep_dir: Path) -> Dict[str, Any]:
    """Write ``summary.md`` and ``summary.json`` (metamm compare's table of the sweep's runs)."""
    from metamm_cli.runs.reader import find_runs, load_run
    from metamm_cli.compare.render import legend, render
    from metamm_cli.compare.table import table

    try:
        runs = [load_run(f) for f in find_runs([sweep_dir])]
    except ConfigError:  # no job got as far as a run folder
        return {"runs": [], "table": ""}
    rows = table(runs)
    md = render(rows, "md") + "\n\n" + legend(rows) + "\n"
    (sweep_dir / layout.SUMMARY_MD).write_text(md)
    (sweep_dir / layout.SUMMARY_JSON).write_text(render(rows, "json") + "\n")
    return {"runs": runs, "table": md}


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = summarize_sweep(sweep_dir)
        LAST_SWEEP.clear()
        LAST_SWEEP.update(summary, dir=sweep_dir,
                          failed=failures_since(sweep_dir, getattr(self, "started", 0.0)))
        if summary["runs"]:
            log.info("sweep summary (%s):\n%s", sweep_dir / layout.SUMMARY_MD, summary["table"])


def failed_jobs_line() -> str:
    """The sweep that just ended, its failed jobs in one line."""
    failed = LAST_SWEEP.get("failed") or []
    return (f"{len(failed)} of {max(len(LAST_SWEEP.get('runs') or []), len(failed))} sweep jobs failed "
            f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); see "
            f"{LAST_SWEEP.get('dir')}/{layout.SUMMARY_MD}")
