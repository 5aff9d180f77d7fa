"""Beyond one process, through the real CLI: parallel sweeps on Hydra's joblib and submitit
launchers (Slurm: tests/test_slurm.py), the Optuna search (a failing trial, an
interrupted search continued from its SQLite study), sweep folders that sort, never overwrite
and continue, and TensorBoard that compares (run names, readable hparams, test accuracy)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import HANG_GUARD, METAMM, SMOKE, run_metamm, wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.tensorboard=false"]
ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}


def jobs(tmp_path):
    sweeps = list(tmp_path.glob("outputs/smoke/multiruns/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0], sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))


def metrics(job):
    return json.loads((job / "metrics.json").read_text())



def test_joblib_sweep_runs_jobs_side_by_side_without_oversubscribing(tmp_path):
    run_metamm(["train", "-m", *SMOKE, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                "fusion=concat,mean,weighted", *FAST], tmp_path)
    sweep, folders = jobs(tmp_path)
    assert [f.name.split("_")[0] for f in folders] == ["0000", "0001", "0002"]  # zero-padded: they sort
    cpus = len(os.sched_getaffinity(0))
    for f in folders:
        assert metrics(f)["step"] == 8
        threads = json.loads((f / "run.json").read_text())["threads"]
        assert threads == max(1, cpus // 2)  # two jobs at once share the CPUs
    assert "fusion" in (sweep / "summary.md").read_text()


def test_submitit_local_sweep(tmp_path):
    run_metamm(["train", "-m", *SMOKE, "hydra/launcher=submitit_local", "seed=0,1", *FAST], tmp_path)
    _, folders = jobs(tmp_path)
    assert len(folders) == 2 and all(metrics(f)["step"] == 8 for f in folders)
    assert all(json.loads((f / "run.json").read_text())["threads"] == 1 for f in folders)  # cpus_per_task


def test_optuna_search_records_a_failing_trial_and_continues_after_an_interruption(tmp_path):
    """Three enqueued trials: 0 fails on purpose (a 200-way episode on 125 classes), 1 is stopped
    by SIGTERM mid-training; continuing the search (its SQLite study) resumes trial 1 from its
    last.pt and runs trial 2."""
    search = ["train", "-m", *SMOKE, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
              "episode.way=choice(3,200)", "trainer.lr=tag(log,interval(1e-4,1e-2))",
              "hydra.sweeper.enqueue=[{episode.way: 200, trainer.lr: 0.001}, {episode.way: 3, trainer.lr: 0.001},"
              " {episode.way: 3, trainer.lr: 0.003}]", "trainer.max_steps=120", "trainer.ckpt_every=4", *FAST]
    p = subprocess.Popen(METAMM + search, cwd=tmp_path, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: list(tmp_path.glob("outputs/smoke/multiruns/*/0001_*/checkpoints/last.pt")), p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=HANG_GUARD)
    assert p.returncode == 143, (out, err)
    assert "job 0000_episode.way=200" in err and "episode.way=200 is impossible" in err  # one line, then on
    run_metamm(search + ["trainer.resume=true"], tmp_path)  # a search does not retry a failed trial
    sweep, folders = jobs(tmp_path)
    assert "| failed |" in (sweep / "summary.md").read_text()  # trial 0, still recorded
    assert "resumed from" in (folders[1] / "train.log").read_text()  # trial 1 went on from its last.pt
    report = json.loads((sweep / "search.json").read_text())
    assert [t["state"] for t in report["trials"]] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert report["best"]["value"] == max(metrics(f)["best_val_acc"] for f in folders[1:])
    assert (sweep / "optuna.db").is_file() and metrics(folders[1])["step"] == 120
    assert json.loads((folders[0] / "failed.json").read_text())["error"].startswith("episode.way=200")
    assert all(t["intermediate"] for t in report["trials"][1:])  # every validation reported to the study


def test_optuna_pruner_stops_a_trial_that_is_clearly_worse(tmp_path):
    """A threshold pruner (prune below 101% validation accuracy) stops every trial at its first
    validation: recorded as PRUNED, the job's metrics say so, the search still succeeds."""
    proc = run_metamm(["train", "-m", *SMOKE, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                       "trainer.lr=tag(log,interval(1e-4,1e-2))", "trainer.max_steps=40",
                       "hydra.sweeper.pruner.name=threshold", "+hydra.sweeper.pruner.lower=101.0", *FAST], tmp_path)
    sweep, folders = jobs(tmp_path)
    report = json.loads((sweep / "search.json").read_text())
    assert [t["state"] for t in report["trials"]] == ["PRUNED", "PRUNED"], proc.stdout
    assert all(metrics(f)["status"] == "pruned" and metrics(f)["step"] == 4 for f in folders)


def test_sweep_folders_never_overwrite_and_continue(tmp_path):
    sweep_args = ["train", "-m", *SMOKE, "seed=0,1", *FAST]
    run_metamm(sweep_args, tmp_path)
    sweep, folders = jobs(tmp_path)
    # a re-run into the same folder is refused by every job, nothing is overwritten
    before = [metrics(f) for f in folders]
    again = run_metamm(sweep_args + [f"hydra.sweep.dir={sweep}"], tmp_path, check=False)
    assert again.returncode == 1 and "already holds a run" in again.stderr and "trainer.resume" in again.stderr
    assert [metrics(f) for f in folders] == before
    assert not list(sweep.glob("*/failed.json"))  # the refused jobs left the folders as they were
    # continue: a finished job is skipped, a stopped one resumes, a missing one runs
    shutil.rmtree(folders[1])
    cont = run_metamm(sweep_args + ["trainer.resume=true"], tmp_path)
    assert "finished before, skipped" in cont.stdout and metrics(folders[1])["step"] == 8
    assert metrics(folders[0]) == before[0]


def _hparams(tb: Path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb))
    acc.Reload()
    data = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    return {k: v.string_value or v.number_value for k, v in data.session_start_info.hparams.items()}


def test_tensorboard_names_runs_by_overrides_with_readable_hparams_and_test_accuracy(tmp_path):
    run_metamm(["train", "-m", *SMOKE, "fusion=attention,mean", "trainer.test=true"], tmp_path)
    _, folders = jobs(tmp_path)
    tb = folders[0] / "tb" / "fusion=attention"  # TensorBoard's run name: the overrides
    assert tb.is_dir(), sorted(p.name for p in (folders[0] / "tb").iterdir())
    hp = _hparams(tb)
    assert hp["fusion"] == "attention" and hp["algorithm"] == "protonet" and "fusion._target_" not in hp
    acc = EventAccumulator(str(tb))
    acc.Reload()
    test = json.loads((folders[0] / "eval.json").read_text())
    assert acc.Scalars("acc/test")[-1].value == pytest.approx(test["accuracy"], abs=1e-4)
    assert "hparam/test_acc" not in acc.Tags()["scalars"]  # the table's test column reads acc/test
    # metamm eval writes its test accuracy and missing-modality curve into the run's TensorBoard
    run_metamm(["eval", "--ckpt", folders[1], "eval.missing_sweep=[0,1]"], tmp_path)
    acc = EventAccumulator(str(folders[1] / "tb" / "fusion=mean"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/missing/audio")] == [0, 100]
