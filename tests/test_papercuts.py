"""Papercuts a new user met, each fixed and kept fixed: `metamm compare` shows one named interval
(the t-based 95% CI over seeds) in its table and its plot, and the chance level on the test bars;
`metamm eval` names the key the user typed; `metamm train --help` lists what a user picks (no
internal `_` presets; the launcher and sweeper groups); the shipped launcher configs compose
without Hydra's schema-matching warning. (Slurm's papercuts: tests/test_slurm.py.)"""
from __future__ import annotations

import json
import math
import re
import statistics

import pytest
import yaml
from conftest import SMOKE, run_metamm

from metamm_cli.compare.render import legend, render
from metamm_cli.compare.stats import INTERVAL, ci95, t975
from metamm_cli.compare.table import table
from metamm_cli.runs.reader import find_runs, load_run


# -- metamm compare: one interval, named; the chance level ----------------------------------------

def test_t_quantile_against_the_table():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(4) == pytest.approx(2.776, abs=1e-3)
    assert t975(30) == pytest.approx(2.042, abs=1e-3)
    assert t975(31) == pytest.approx(2.0395, abs=1e-4)  # past the table: Cornish-Fisher
    assert t975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t975(10 ** 6) == pytest.approx(1.96, abs=1e-3)  # large n: the normal quantile
    qs = [t975(d) for d in range(1, 200)]
    assert all(a > b for a, b in zip(qs, qs[1:]))  # narrower with every degree of freedom
    assert ci95([60.0, 70.0]) == pytest.approx(12.706 * statistics.stdev([60, 70]) / math.sqrt(2), rel=1e-4)
    assert ci95([60.0]) is None


def fake_run(folder, fusion, seed, best, test, way=5, test_ci=1.5):
    """A finished run folder as metamm writes it, with an eval.json of a ``way``-way test."""
    folder.mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "fusion": {"_target_": fusion},
                                                        "trainer": {"max_steps": 8}, "episode": {"way": way}}))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"fusion={fusion}", f"episode.way={way}",
                                                                      f"seed={seed}"]))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"fusion": fusion}}}}))
    hist = [{"step": 4, "val_acc": best - 5, "val_acc_ci95": 2.0}, {"step": 8, "val_acc": best, "val_acc_ci95": 2.0}]
    (folder / "metrics.json").write_text(json.dumps({"step": 8, "val_acc": best, "val_acc_ci95": 2.0, "best_val_acc": best,
                                                     "best_step": 8, "wall_time_s": 3.0, "episodes_per_s": 9.0,
                                                     "history": hist}))
    (folder / "eval.json").write_text(json.dumps({
        "accuracy": test, "ci95": test_ci, "episodes": 600, "split": "test", "step": 8,
        "setting": f"{way}-way 1-shot 15-query, chance {100 / way:.2f}%"}))


@pytest.fixture
def rows(tmp_path):
    """concat over seeds 0 and 1, attention one run: both 5-way."""
    fake_run(tmp_path / "a0", "concat", 0, 60.0, 50.0)
    fake_run(tmp_path / "a1", "concat", 1, 70.0, 58.0)
    fake_run(tmp_path / "b0", "attention", 0, 65.0, 40.0, test_ci=2.5)
    return table([load_run(f) for f in find_runs([tmp_path])], sort="fusion")


def error_halfwidths(ax):
    """The half-widths of the whiskers of every barh on ``ax``, top to bottom as drawn."""
    out = []
    for c in ax.containers:
        if getattr(c, "errorbar", None) is not None:
            for (x0, _), (x1, _) in c.errorbar.lines[2][0].get_segments():
                out.append((x1 - x0) / 2)
    return out


def test_table_and_plot_show_the_same_named_interval(rows):
    concat = next(r for r in rows if r["settings"]["fusion"] == "concat")
    attention = next(r for r in rows if r["settings"]["fusion"] == "attention")
    best = concat["metrics"]["best_val"]
    assert best["ci95"] == pytest.approx(t975(1) * statistics.stdev([60, 70]) / math.sqrt(2))  # t, n-1 = 1
    assert best["std"] == pytest.approx(statistics.stdev([60, 70]))  # still in the JSON and CSV
    assert attention["metrics"]["test"]["ci95"] == 2.5  # one run: its own CI over its episodes
    md = render(rows, "md").splitlines()
    assert md[0] == ("| fusion | n | status | best val ± 95% CI | final val ± 95% CI | test ± 95% CI | steps "
                     "| wall time | episodes/s |")
    assert f"| {best['mean']:.2f} ± {best['ci95']:.2f} |" in md[3]  # concat: mean ± the t interval
    assert "| 40.00 ± 2.50 (1 run) |" in md[2]
    assert f"mean ± {INTERVAL} over seeds" in legend(rows) and "std" not in legend(rows).replace("·std/", "")

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from metamm_cli.compare.plots import accuracy_bars, mean_band

    ax = Figure().subplots()
    accuracy_bars(ax, rows, [f"C{i}" for i in range(10)])
    assert error_halfwidths(ax) == pytest.approx([r["metrics"]["test"]["ci95"] for r in rows])  # the table's
    assert INTERVAL in ax.get_xlabel()
    assert mean_band([(60.0, 2.0), (70.0, 2.0)]) == pytest.approx((65.0, best["ci95"]))  # (a)'s bands too


def test_the_chance_level_is_drawn_on_the_test_bars(rows, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from metamm_cli.compare.plots import accuracy_bars, plot

    assert all(r["metrics"]["test"]["chance"] == 20.0 for r in rows)
    ax = Figure().subplots()
    accuracy_bars(ax, rows, ["C0", "C1"])
    (line,) = [ln for ln in ax.lines if ln.get_label() == "chance"]
    assert list(line.get_xdata()) == [20.0, 20.0]  # a vertical line at 1/way

    fake_run(tmp_path / "more" / "c0", "mean", 0, 50.0, 30.0, way=10)  # another way: a tick per bar
    mixed = table([load_run(f) for f in find_runs([tmp_path / "more", *(r["runs"][0]["path"] for r in rows)])])
    ax = Figure().subplots()
    accuracy_bars(ax, mixed, ["C0", "C1", "C2"])
    (ticks,) = [c for c in ax.collections if c.get_label() == "chance"]
    assert sorted(seg[0][0] for seg in ticks.get_segments()) == [10.0, 20.0, 20.0]
    assert plot(rows, tmp_path / "fig.png").stat().st_size > 0


# -- metamm eval: the key as the user typed it ----------------------------------------------------

def test_eval_names_the_key_the_user_typed(smoke_run):
    run, cwd = smoke_run["run_dir"], smoke_run["cwd"]
    # the smoke run's test split has 64 classes
    for typed, said in (("episode.way=65", "episode.way=65 is impossible: the test split has 64 classes"),
                        ("eval.way=65", "eval.way=65 is impossible: the test split has 64 classes"),
                        ("episode.shot=9", "episode.shot+episode.query=12 is impossible: ")):
        proc = run_metamm(["eval", "--ckpt", run, typed], cwd, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"metamm eval: error: {said}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "eval.shot" not in proc.stderr


# -- metamm train --help --------------------------------------------------------------------------

def test_train_help_lists_what_a_user_picks(tmp_path):
    out = run_metamm(["train", "--help"], tmp_path).stdout
    groups = dict(ln.split(": ", 1) for ln in out.split("== Config ==")[0].splitlines() if re.match(r"^[\w/]+: ", ln))
    assert groups["hydra/launcher"] == "basic, joblib, population, submitit_local, submitit_slurm"
    assert groups["hydra/sweeper"] == "basic, optuna"
    assert "maml_5w1s" in groups["exp/paper"].split(", ")
    internal = [(g, o) for g, opts in groups.items() for o in opts.split(", ") if o.startswith("_")]
    assert not internal, internal  # _finn, _maml, _closer, the renamed launcher schemas: none
    assert "hydra/job_logging" not in groups and "fusion" in groups
    assert "metamm train [+exp=NAME]" in out and "Examples:" in out  # header and footer kept


# -- the shipped launcher configs: no schema-matching warning --------------------------------------

WARNING = "validated against ConfigStore schema with the same name"


def test_a_joblib_sweep_has_no_schema_matching_warning(tmp_path):
    proc = run_metamm(["train", "-m", *SMOKE, "hydra/launcher=joblib", "seed=0,1", "trainer.tensorboard=false"], tmp_path)
    assert WARNING not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr
    assert len(list(tmp_path.glob("outputs/smoke/multiruns/*/000[01]_*/metrics.json"))) == 2
    # still validated against the plugins' schemas: a key they do not have is refused in one line
    bad = run_metamm(["train", "-m", *SMOKE, "hydra/launcher=joblib", "hydra.launcher.n_jobz=2"], tmp_path, check=False)
    assert bad.returncode == 2 and "Key 'n_jobz' not in 'JobLibLauncherConf'" in bad.stderr, bad.stderr


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_the_submitit_configs_compose_without_the_warning(tmp_path, launcher):
    proc = run_metamm(["train", *SMOKE, f"hydra/launcher={launcher}", "--cfg", "hydra"], tmp_path)
    assert WARNING not in proc.stderr, proc.stderr
    composed = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert composed["cpus_per_task"] == 1  # runs on any node
    if launcher == "submitit_slurm":
        assert composed["_target_"] == "hydra_plugins.metamm.slurm.SlurmLauncher"
        assert "PartitionConfig" in composed["fatal_reasons"] and composed["poll_s"] == 10


def test_an_interrupted_local_sweep_says_how_to_continue():
    """A local sweep (-m) interrupted while its jobs train has saved their last.pt: the line says
    so and how to continue, instead of "nothing was saved"; a single run's start-up keeps it."""
    import signal

    from metamm_cli.runs.signals import Interrupted, interrupted_line

    sweep = interrupted_line(Interrupted(signal.SIGTERM), ["-m", "+exp=smoke", "seed=0,1"])
    assert "last.pt" in sweep and "trainer.resume=true" in sweep and "nothing was saved" not in sweep
    assert interrupted_line(KeyboardInterrupt(), ["+exp=smoke"]) == "interrupted during start-up; nothing was saved"


def test_a_one_modality_run_draws_no_missing_curve():
    """A single-modality run's sweep holds only its own modality (never lost: a flat line), so
    the plot draws no panel for it; a fused run's curves stay."""
    from metamm_cli.compare.plots import curves, sweep_modalities

    flat = {"tests": {"curve": {"missing_sweep": {"image": [{"rate": 0.0, "accuracy": 90.0}]}}}}
    fused = {"tests": {"curve": {"missing_sweep": {"all": [{"rate": 0.0, "accuracy": 91.0}]}}}}
    assert curves(flat) == {} and list(curves(fused)) == ["all"]
    assert sweep_modalities([{"runs": [flat]}, {"runs": [fused]}]) == ["all"]
