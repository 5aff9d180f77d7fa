"""`metamm compare`: real run folders from the real CLI (a +exp=smoke sweep over two fusions and two
seeds, plus a single run of a third fusion), compared as tables (md, csv, json), evaluated in
process on the same test episodes (--eval, --eval-set) and plotted; running, stopped and killed
runs show their status."""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD, METAMM, SMOKE, run_metamm

from metamm_cli import ConfigError
from metamm_cli.runs.reader import find_runs, load_run
from metamm_cli.compare.command import main
from metamm_cli.compare.evaluate import parse_eval_set, split_overrides
from metamm_cli.compare.render import render
from metamm_cli.compare.table import table

QUIET = ["trainer.tensorboard=false"]
MISSING50 = "missing50=missing.test.image=0.5,missing.test.audio=0.5"
ROBUST = "robust=eval.missing_sweep=[0,1]"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """outputs/ holding a 2 fusions x 2 seeds sweep and one run of a third fusion."""
    cwd = tmp_path_factory.mktemp("compare")
    run_metamm(["train", "-m", *SMOKE, "fusion=concat,mean", "seed=0,1", *QUIET], cwd)
    run_metamm(["train", *SMOKE, "fusion=attention", *QUIET], cwd)
    return cwd / "outputs"


@pytest.fixture(scope="module")
def sweep(outputs):
    (sweep_dir,) = (outputs / "smoke" / "multiruns").iterdir()
    return sweep_dir


@pytest.fixture(scope="module")
def evaluated(outputs, tmp_path_factory):
    """`metamm compare outputs --eval --eval-set missing50 --eval-set robust --format json`."""
    out = tmp_path_factory.mktemp("evaluated") / "table.json"
    started = time.perf_counter()
    assert main([str(outputs), "--eval", "--eval-set", MISSING50, "--eval-set", ROBUST,
                 "--format", "json", "--out", str(out)]) == 0
    return {"table": json.loads(out.read_text()), "seconds": time.perf_counter() - started}


def compare(capsys, *args) -> str:
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def as_json(capsys, *args) -> dict:
    return json.loads(compare(capsys, *args, "--format", "json"))


def row_of(table_json, fusion):
    return next(r for r in table_json["rows"] if r["settings"]["fusion"] == fusion)


def metrics_of(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def test_finds_every_run_below_a_folder(outputs, sweep):
    runs = find_runs([outputs])
    assert len(runs) == 5 and all((r / "config.yaml").is_file() for r in runs)
    in_sweep = [r for r in runs if sweep in r.parents]
    assert find_runs([sweep, in_sweep[0]]) == in_sweep  # once each


def test_seeds_are_grouped_and_only_differing_columns_show(capsys, outputs):
    data = as_json(capsys, outputs)
    assert data["columns"] == ["fusion"]  # not seed, exp, trainer.tensorboard: same or bookkeeping
    assert sorted(r["settings"]["fusion"] for r in data["rows"]) == ["attention", "concat", "mean"]
    for row in data["rows"]:
        runs = row["runs"]
        assert row["n"] == len(runs) == (1 if row["settings"]["fusion"] == "attention" else 2)
        assert row["status"] == "finished"
        best = [metrics_of(r["path"])["best_val_acc"] for r in runs]
        stat = row["metrics"]["best_val"]
        assert stat["mean"] == pytest.approx(statistics.mean(best)) and stat["n"] == len(runs)
        if len(runs) > 1:
            assert sorted(row["seeds"]) == [0, 1]
            assert stat["std"] == pytest.approx(statistics.stdev(best))
        else:  # one seed: its own validation CI, no std
            metrics = metrics_of(runs[0]["path"])
            ci = next(h["val_acc_ci95"] for h in metrics["history"] if h["step"] == metrics["best_step"])
            assert stat["std"] is None and stat["ci95"] == pytest.approx(ci)
    md = compare(capsys, outputs, "--sort", "fusion")
    lines = md.splitlines()
    assert lines[0].startswith("| fusion | n | status | best val ± 95% CI | final val ± 95% CI | test ± 95% CI |")
    attention, concat = lines[2], lines[3]
    assert attention.startswith("| attention | 1 | finished |") and "(1 run)" in attention
    row = row_of(data, "concat")["metrics"]["best_val"]  # two seeds: the t-based CI of the mean, as plotted
    assert f"| {row['mean']:.2f} ± {row['ci95']:.2f} |" in concat and "(1 run)" not in concat


def test_readable_values_and_fallback_columns(sweep):
    runs = [load_run(r) for r in find_runs([sweep])]
    rows = table(runs)
    assert {r["settings"]["fusion"] for r in rows} == {"concat", "mean"}  # the option, not a class path
    # Two runs that no override tells apart but whose configs differ: the differing key is shown.
    a = next(r for r in runs if r["choices"]["fusion"] == "concat" and r["seed"] == 0)
    b = copy.deepcopy(a)
    b["config"]["episode"]["query"] += 2
    b["path"] += "-copy"
    rows = table([a, b])
    assert [list(r["settings"]) for r in rows] == [["episode.query"]] * 2 and all(r["n"] == 1 for r in rows)
    assert "| episode.query |" in render(rows, "md")


def test_sort_order(capsys, outputs):
    for key, descending in (("best_val", True), ("final_val", True), ("episodes_per_s", True),
                            ("wall_time_s", False)):
        means = [r["metrics"][key]["mean"] for r in as_json(capsys, outputs, "--sort", key)["rows"]]
        assert means == sorted(means, reverse=descending), key
    by_name = as_json(capsys, outputs, "--sort", "fusion")["rows"]
    assert [r["settings"]["fusion"] for r in by_name] == ["attention", "concat", "mean"]
    with pytest.raises(ConfigError, match=r"^--sort nope: choose one of best_val, .*fusion$"):
        main([str(outputs), "--sort", "nope"])


def test_md_csv_json_agree(tmp_path, capsys, outputs):
    for fmt in ("md", "csv", "json"):
        compare(capsys, outputs, "--format", fmt, "--out", tmp_path / f"t.{fmt}")
    data = json.loads((tmp_path / "t.json").read_text())
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    md = [ln for ln in (tmp_path / "t.md").read_text().splitlines()[2:] if ln.startswith("|")]
    assert len(rows) == len(md) == len(data["rows"]) == 3
    for j, c, m in zip(data["rows"], rows, md):
        assert c["fusion"] == j["settings"]["fusion"] and m.startswith(f"| {c['fusion']} | {c['n']} |")
        assert int(c["n"]) == j["n"] and c["status"] == j["status"]
        for key in ("best_val", "final_val", "wall_time_s", "episodes_per_s"):
            assert float(c[key]) == pytest.approx(j["metrics"][key]["mean"])
        stat = j["metrics"]["best_val"]
        assert float(c["best_val_ci95"]) == pytest.approx(stat["ci95"])
        assert f"{stat['mean']:.2f} ± {stat['ci95']:.2f}" in m
        assert len(j["runs"]) == j["n"] and all("best_val" in r and "history" in r for r in j["runs"])


def test_eval_writes_paired_reports_in_every_run(evaluated, outputs):
    runs = find_runs([outputs])
    reports = [json.loads((r / "eval.json").read_text()) for r in runs]
    missing = [json.loads((r / "eval-missing50.json").read_text()) for r in runs]
    episodes = json.loads((runs[0] / "eval.json").read_text())["config"]["eval"]["episodes"]
    for group in (reports, missing):  # the same episodes for every run: paired comparisons
        assert {(r["episodes"], r["split"], r["setting"], r["config"]["eval"]["seed"]) for r in group} == \
            {(episodes, "test", group[0]["setting"], 0)}
        assert all(r["ckpt"].endswith("checkpoints/best.pt") for r in group)
    assert "missing image 0.5 audio 0.5" in missing[0]["setting"] and "missing" not in reports[0]["setting"]
    data = evaluated["table"]
    assert data["sort"] == "test"  # default once a run has a test accuracy
    tests = [r["metrics"]["test"]["mean"] for r in data["rows"]]
    assert tests == sorted(tests, reverse=True)
    assert "test:missing50" in data["metrics"] and "test:robust" in data["metrics"]
    for row in data["rows"]:
        assert row["metrics"]["test"]["n"] == row["metrics"]["test:missing50"]["n"] == row["n"]
        for run in row["runs"]:
            report = json.loads((Path(run["path"]) / "eval.json").read_text())
            assert run["tests"][""]["value"] == pytest.approx(report["accuracy"])
            assert set(run["tests"]["robust"]["missing_sweep"]) == {"all", "image", "audio", "tokens"}
    print(f"compare --eval, 2 sets + a missing sweep, {len(runs)} runs: {evaluated['seconds']:.1f} s")


def test_eval_set_column_and_reuse(evaluated, capsys, outputs, sweep):
    md = compare(capsys, outputs)
    assert "| test ± 95% CI | test missing50 ± 95% CI | test robust ± 95% CI |" in md.splitlines()[0]
    run = find_runs([sweep])[0]
    report, stamp = run / "eval.json", (run / "eval.json").stat().st_mtime_ns
    accuracy = json.loads(report.read_text())["accuracy"]
    compare(capsys, sweep, "--eval")  # up to date: kept
    assert report.stat().st_mtime_ns == stamp
    ckpt = run / "checkpoints" / "best.pt"
    later = time.time() + 5
    os.utime(ckpt, (later, later))  # a newer checkpoint: evaluated again, on the same episodes
    compare(capsys, run, "--eval")
    assert report.stat().st_mtime_ns != stamp and json.loads(report.read_text())["accuracy"] == accuracy


def test_eval_set_parsing():
    assert split_overrides("a=1,b=[x,y],c='p,q',d={u: 1, v: 2}") == ["a=1", "b=[x,y]", "c='p,q'", "d={u: 1, v: 2}"]
    assert parse_eval_set("img2aud=episode.support_modalities=[image],episode.query_modalities=[audio]") == \
        ("img2aud", ["episode.support_modalities=[image]", "episode.query_modalities=[audio]"])
    for bad in ("=a=1", "x", "x=", "a b=c=1", "x=a"):
        with pytest.raises(ConfigError, match="^--eval-set "):
            parse_eval_set(bad)


def test_plot_is_a_real_image(evaluated, tmp_path, capsys, outputs):
    pytest.importorskip("matplotlib")  # the optional extra: pip install "metamm[plot]"
    from PIL import Image

    from metamm_cli.compare.plots import sweep_modalities

    png = tmp_path / "figure.png"
    assert f"wrote {png}" in compare(capsys, outputs, "--plot", png)
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
        gray = image.convert("L")
        assert gray.getextrema()[0] < 128 < gray.getextrema()[1]  # ink on paper, not blank
        assert len(gray.getcolors(maxcolors=1 << 16)) > 20
    rows = table([load_run(r) for r in find_runs([outputs])])
    assert sweep_modalities(rows) == ["all", "image", "audio", "tokens"]  # (c): one panel each, all first


def test_plot_without_matplotlib_is_one_line(monkeypatch, outputs, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ConfigError) as e:
        main([str(outputs), "--plot", str(tmp_path / "x.png")])
    assert str(e.value) == '--plot needs matplotlib: pip install "metamm[plot]"'
    assert not (tmp_path / "x.png").exists()


def test_bad_path_and_empty_folder_are_one_line(tmp_path):
    cases = {tmp_path / "nope": "no such file or folder", tmp_path / "empty": "no run folder found",
             tmp_path / "file.txt": "not a folder"}
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    for path, why in cases.items():
        with pytest.raises(ConfigError) as e:
            main([str(path)])
        assert str(e.value).startswith(f"{path}: {why}") and "\n" not in str(e.value)


@pytest.mark.skipif("compare" not in __import__("metamm_cli.cli").cli.COMMANDS,
                    reason="metamm compare is not wired into cli.py yet")
def test_cli_error_is_one_line(tmp_path):
    proc = run_metamm(["compare", tmp_path / "nope"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"metamm compare: error: {tmp_path / 'nope'}: no such file or folder"


def _start(cwd, seed):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(METAMM + ["train", *SMOKE, *QUIET, "trainer.max_steps=1000000", f"seed={seed}"],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run_of(cwd, pid):
    for marker in (cwd / "outputs").glob("smoke/runs/*/RUNNING"):
        try:
            if json.loads(marker.read_text())["pid"] == pid and (marker.parent / "checkpoints" / "last.pt").is_file():
                return marker.parent
        except (OSError, ValueError):
            pass
    return None


def test_running_stopped_and_killed_runs_show_their_status(tmp_path, capsys):
    procs = [_start(tmp_path, seed) for seed in (0, 1)]
    try:
        deadline, folders = time.monotonic() + HANG_GUARD, [None, None]
        while None in folders:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read() for p in procs if p.poll() is not None]
            folders = [f or _run_of(tmp_path, p.pid) for f, p in zip(folders, procs)]
            time.sleep(0.2)
        data = as_json(capsys, tmp_path, "--eval")  # running runs are not evaluated
        assert [r["status"] for r in data["rows"][0]["runs"]] == ["running", "running"]
        assert data["rows"][0]["status"] == "running" and data["rows"][0]["n"] == 2
        assert not any((f / "eval.json").exists() for f in folders)
        procs[0].send_signal(signal.SIGTERM)  # a clean stop: metrics.json says "interrupted"
        procs[1].send_signal(signal.SIGKILL)  # killed: a stale RUNNING marker, no metrics.json
        assert procs[0].wait(HANG_GUARD) == 128 + signal.SIGTERM and procs[1].wait(HANG_GUARD) == -signal.SIGKILL
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    data = as_json(capsys, tmp_path)
    status = {r["path"]: r["status"] for r in data["rows"][0]["runs"]}
    assert status == {str(folders[0]): "stopped", str(folders[1]): "failed"}
    assert data["rows"][0]["status"] == "1 failed, 1 stopped"
    md = compare(capsys, tmp_path).splitlines()
    assert md[2].startswith("| 2 | 1 failed, 1 stopped |")  # no column differs: the runs differ in seed only
    assert f"/{1000000} |" in md[2]  # steps done / trainer.max_steps
