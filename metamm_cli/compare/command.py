"""``metamm compare PATH...``: one table of runs (sweep jobs, single runs, or everything under a
folder), the settings that differ as columns, runs that differ only in ``seed`` grouped (mean ±
the 95% CI over seeds, t with n-1 degrees of freedom), optionally evaluated on the same test
episodes (``--eval``) and plotted with the same interval."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from metamm_cli import ConfigError
from metamm_cli.compare.evaluate import evaluate_runs, parse_eval_set, unpaired
from metamm_cli.compare.render import legend, render, robustness_table
from metamm_cli.compare.table import table
from metamm_cli.runs.reader import find_runs, load_run

USAGE = "metamm compare PATH... [--sort METRIC] [--format md|csv|json] [--out FILE] [--eval] " \
        "[--eval-set NAME=OVERRIDES] [--plot FILE.png]"
DESCRIPTION = """One table of runs: PATH is a run, a sweep, or any folder above them (a task
folder, outputs/). Columns: the overrides that differ between the runs (a config group by the
option chosen), best and final validation accuracy, test accuracy ± 95% CI (eval.json, see
--eval), steps, wall time, episodes/s and status (finished/stopped/running/failed). Runs that
differ only in seed form one row: mean ± 95% CI over seeds (t(0.975, n-1) std/sqrt(n)) and n
(one seed: its own 95% CI over its episodes, marked (1 run)); --plot draws the same interval. Runs of a preset that records its paper's result (preset.paper.accuracy, the +exp=paper/*
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
        from metamm_cli.compare.plots import check_matplotlib
        check_matplotlib()  # before any evaluation: a missing extra fails at once
    folders = find_runs(args.paths)
    problems = []
    if args.eval or sets:
        problems = evaluate_runs(folders, {"": [], **sets})
        from metamm_cli.compare.robustness import make_ensembles

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
                print("\nrobustness: accuracy with every modality missing at each rate (mean ± 95% CI (t, n-1); "
                      "rel. robustness: its mean over the rates; eff. robustness: above late fusion's "
                      "curve shifted to the same clean accuracy; accuracy points)\n" + robust)
    if args.plot:
        from metamm_cli.compare.plots import plot
        print(f"wrote {plot(rows, Path(args.plot))}")
    for line in problems:
        print(f"metamm compare: error: {line}", file=sys.stderr)
    return 1 if problems else 0
