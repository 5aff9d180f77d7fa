"""TensorBoard that compares at a glance, and speeds that compare: accuracy cards first (acc/train,
acc/val, acc/test side by side), one hparams table of what differs beside acc/val and acc/test,
runs named by what differs; episodes/s at steady state and the same threads for every job of a
sweep. Mechanisms only: no timing is asserted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOKE, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metamm_cli.runs.record import (WARMUP_STEPS, Throughput, shown_hparams, swept_keys,
                                    tb_folder)


def events(tb: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return acc


def hparams_data(acc: EventAccumulator, tag: str):
    from tensorboard.plugins.hparams import plugin_data_pb2

    return plugin_data_pb2.HParamsPluginData.FromString(acc.SummaryMetadata(tag).plugin_data.content)


def test_throughput_leaves_out_the_warm_up_steps():
    speed = Throughput(first_step=0)
    for step, seconds in enumerate([9.0, 5.0, 1.0, 1.0, 2.0], start=1):  # two slow first steps
        speed.add(step, 4, seconds)
    assert WARMUP_STEPS == 2 and speed.steps == 3 and speed.episodes == 12 and speed.per_second == 12 / 4
    resumed = Throughput(first_step=10)  # a resumed process warms up again
    resumed.add(11, 4, 9.0)
    resumed.add(12, 4, 9.0)
    assert resumed.per_second is None and resumed.steps == 0  # nothing steady yet: no number
    resumed.add(13, 4, 0.5)
    assert resumed.per_second == 8.0


def test_swept_keys_are_the_sweeps_not_the_fixed_values():
    overrides = ["+exp=smoke", "fusion=concat,attention", "seed=range(2)", "trainer.max_steps=4",
                 "trainer.resume=true", "hydra/launcher=joblib", "encoder/image=conv4,mlp"]
    assert swept_keys(overrides) == ["fusion", "seed", "encoder/image"]
    params = {"trainer.lr": "tag(log, interval(1e-4, 1e-2))", "encoder.dim": "choice(16, 32)", "episode.way": "5"}
    assert swept_keys(["fusion=mean", "search.trial=3,4"], params) == ["trainer.lr", "encoder.dim"]


def test_shown_hparams_a_group_by_its_option_a_key_with_the_keys_beneath():
    values = {"fusion": "attention", "fusion.dim": 16, "seed": 1, "missing.test.image": 0.5,
              "missing.test.audio": 0.0, "algorithm": "protonet", "dataset": "synthetic_small"}
    choices = {"fusion": "attention", "algorithm": "protonet", "dataset": "synthetic_small"}
    assert shown_hparams(values, ["fusion", "seed", "missing.test"], choices) == {
        "fusion": "attention", "seed": 1, "missing.test.image": 0.5, "missing.test.audio": 0.0}
    assert shown_hparams(values, [], choices) == {"algorithm": "protonet", "dataset": "synthetic_small",
                                                  "fusion": "attention"}  # no overrides: what the run is


def test_sweep_compares_at_a_glance_and_its_jobs_share_one_thread_count(tmp_path, monkeypatch, capsys):
    counts = iter(range(1, 100))  # the load-based count would change from one job to the next
    monkeypatch.setattr("metamm_cli.device.auto_threads", lambda: next(counts))
    code, _, err = run_cli(["train", "-m", *SMOKE, "fusion=concat,mean", "seed=0,1", "trainer.max_steps=4",
                            "trainer.test=true"], monkeypatch, capsys, tmp_path)
    assert code == 0, err
    jobs = sorted(p for p in next(tmp_path.glob("outputs/smoke/multiruns/*")).iterdir() if p.is_dir())
    assert len(jobs) == 4
    infos = [json.loads((j / "run.json").read_text()) for j in jobs]
    assert [i["threads"] for i in infos] == [1] * 4  # the first job's count, for every job
    # the TensorBoard name is what differs (not trainer.max_steps=4, which every job shares)
    assert [i["tb"] for i in infos] == ["fusion=concat,seed=0", "fusion=concat,seed=1",
                                        "fusion=mean,seed=0", "fusion=mean,seed=1"]
    assert all(i["compared"] == ["fusion", "seed"] for i in infos)
    metrics = json.loads((jobs[0] / "metrics.json").read_text())
    assert metrics["timed_steps"] == 4 - WARMUP_STEPS and metrics["episodes_per_s"] > 0
    for job, info in zip(jobs, infos):
        tb = tb_folder(job)
        assert tb == job / "tb" / info["tb"]
        acc = events(tb)
        tags = set(acc.Tags()["scalars"])
        assert {"acc/train", "acc/val", "acc/test", "acc_ci95/val", "acc_ci95/test", "loss/train",
                "speed/episodes_per_s"} <= tags
        assert not [t for t in tags if t.startswith(("hparam/", "val/", "train/")) or t == "test/acc"], tags
        # the groups TensorBoard sorts by name: accuracy first
        assert sorted({t.split("/")[0] for t in tags})[0] == "acc"
        test = json.loads((job / "eval.json").read_text())
        assert acc.Scalars("acc/test")[-1].value == pytest.approx(test["accuracy"], abs=1e-4)
        experiment = hparams_data(acc, "_hparams_/experiment").experiment
        assert [(h.name, h.differs) for h in experiment.hparam_infos] == [("fusion", True), ("seed", True)]
        assert [m.name.tag for m in experiment.metric_infos] == ["acc/val", "acc/test"]
        start = hparams_data(acc, "_hparams_/session_start_info").session_start_info.hparams
        assert start["fusion"].string_value == info["choices"]["fusion"] and start["algorithm"].string_value == "protonet"


def test_single_run_compares_by_its_command_line_overrides(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["train", *SMOKE, "episode.shot=2", "trainer.max_steps=2"], monkeypatch, capsys, tmp_path)
    assert code == 0, err
    run = next(tmp_path.glob("outputs/smoke/runs/*"))
    info = json.loads((run / "run.json").read_text())
    assert info["tb"] == "episode.shot=2,trainer.max_steps=2" and info["compared"] == ["exp", "episode.shot", "trainer.max_steps"]
    experiment = hparams_data(events(tb_folder(run)), "_hparams_/experiment").experiment
    assert [h.name for h in experiment.hparam_infos] == ["exp", "episode.shot", "trainer.max_steps"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["timed_steps"] == 0 and metrics["episodes_per_s"] is None  # only warm-up steps
