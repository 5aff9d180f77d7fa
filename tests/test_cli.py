"""End-to-end through the real `metamm` executable: train -> checkpoint -> eval -> JSON,
multirun, resume, data, help, user experiment folders, TensorBoard output."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import SMOKE, run_dir_of, run_metamm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metamm_cli.config import config_dir


def test_train_writes_run_folder(smoke_run):
    run = smoke_run["run_dir"]
    assert run.parent.parent == smoke_run["cwd"] / "outputs" / "smoke"
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", "train.log",
                 ".hydra/config.yaml", "config.yaml", "run.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["overrides"] == ["+exp=smoke"] and info["torch"] == torch.__version__ and info["device"]
    assert [h["step"] for h in json.loads((run / "metrics.json").read_text())["history"]] == [4, 8]
    assert not (run / "RUNNING").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 8 and 0 <= metrics["val_acc"] <= 100
    assert f"{metrics['val_acc']:.2f}" in smoke_run["proc"].stdout  # printed at the end
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 8 and state["config"]["episode"]["way"] == 3
    assert {"model", "optimizer", "rng", "scaler"} <= set(state)


def test_tensorboard_scalars_and_hparams(smoke_run):
    tb = smoke_run["run_dir"] / "tb" / "smoke"  # TensorBoard's run name: the overrides, else the task
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "acc/train", "acc/val", "acc_ci95/val", "speed/episodes_per_s"} <= tags
    assert [e.step for e in acc.Scalars("acc/val")] == [4, 8]
    # the hparams table went into the run's own event file: no sub-folder, no hparam/* cards
    assert not [p for p in tb.iterdir() if p.is_dir()] and not [t for t in tags if t.startswith("hparam/")]
    assert acc.SummaryMetadata("_hparams_/experiment").plugin_data.plugin_name == "hparams"


def test_eval_checkpoint_with_overrides(smoke_run):
    ckpt = smoke_run["run_dir"] / "checkpoints" / "best.pt"
    proc = run_metamm(["eval", "--ckpt", ckpt, "episode.way=4", "eval.episodes=30",
                       "eval.split=val"], smoke_run["cwd"])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("accuracy: ")]
    # the setting in words and the chance level: 4-way here
    assert line and line[0].endswith("(95% CI, 30 episodes of the val split; 4-way 1-shot 3-query, chance 25.00%)")
    out = sorted((smoke_run["cwd"] / "outputs" / "evals").glob("*/eval.json"))[-1]
    report = json.loads(out.read_text())
    assert report["episodes"] == 30 and report["split"] == "val"
    assert report["config"]["episode"]["way"] == 4  # override applied ...
    assert report["config"]["episode"]["shot"] == 1 and report["config"]["encoder"]["dim"] == 16  # ... on the checkpoint's config
    assert line[0].startswith(f"accuracy: {report['accuracy']:.2f} +- {report['ci95']:.2f} (95% CI, 30 episodes")
    assert out.parent.name.endswith(f"_smoke_{smoke_run['run_dir'].name}_best")  # says which run
    assert line[0] in (out.parent / "eval.log").read_text()


def test_eval_starts_from_the_runs_own_eval_settings(smoke_run):
    """+exp=smoke stores eval.episodes: 20 (an Omniglot preset: 1000): `metamm eval` runs that
    many, as the run's other keys, unless the command line says otherwise."""
    run = smoke_run["run_dir"]
    stored = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["config"]["eval"]
    proc = run_metamm(["eval", "--ckpt", run, "missing.test.audio=0.5"], smoke_run["cwd"])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("accuracy: "))
    assert f"95% CI, {stored['episodes']} episodes of the {stored['split']} split" in line, line
    assert "missing audio 0.5, chance 33.33%" in line, line


def test_eval_is_reproducible(smoke_run):
    """Same episodes every time (eval.seed); a run folder means its checkpoints/best.pt."""
    ckpt = smoke_run["run_dir"] / "checkpoints" / "best.pt"
    a = run_metamm(["eval", f"--ckpt={ckpt}", "eval.episodes=20"], smoke_run["cwd"])
    b = run_metamm(["eval", "--ckpt", smoke_run["run_dir"], "eval.episodes=20"], smoke_run["cwd"])
    acc = [ln for ln in a.stdout.splitlines() if ln.startswith("accuracy")]
    assert acc and acc == [ln for ln in b.stdout.splitlines() if ln.startswith("accuracy")]


def test_resume_continues_in_its_folder(tmp_path):
    """8 steps, then resume to 12 in the same folder, the change printed; `trainer.resume=true`
    then finds it finished. (Bit-identical to an uninterrupted run: tests/test_resume.py.)"""
    base = ["train", *SMOKE, "trainer.val_every=100", "trainer.ckpt_every=100", "trainer.threads=1"]
    first = run_dir_of(run_metamm(base, tmp_path))
    resumed = run_metamm(base + ["trainer.max_steps=12", f"trainer.resume={first}"], tmp_path)
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    assert "resume: trainer.max_steps: 8 -> 12" in resumed.stdout
    assert run_dir_of(resumed) == first  # one run, one folder
    assert torch.load(first / "checkpoints" / "last.pt", weights_only=True)["step"] == 12
    again = run_metamm(base + ["trainer.max_steps=12", "trainer.resume=true"], tmp_path)
    assert "finished at step 12" in again.stdout  # true: the newest last.pt of this task


def test_multirun_three_jobs(tmp_path):
    proc = run_metamm(["train", "-m", *SMOKE, "fusion=concat,attention,weighted",
                       "trainer.max_steps=2", "trainer.val_every=2"], tmp_path)
    sweeps = list((tmp_path / "outputs" / "smoke" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.split(",")[0] for j in jobs] == ["0000_fusion=concat", "0001_fusion=attention",
                                               "0002_fusion=weighted"], proc.stdout  # sorted
    for job in jobs:
        assert (sweeps[0] / job / "metrics.json").is_file()
        assert list((sweeps[0] / job / "tb").glob("*/events.out.tfevents.*"))
    summary = (sweeps[0] / "summary.md").read_text()  # the sweep-end table, one row per setting
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert sorted(r.split("|")[1].strip() for r in rows) == ["attention", "concat", "weighted"]
    assert "best val" in summary
    assert "sweep summary" in proc.stdout
    configs = [(sweeps[0] / j / ".hydra" / "config.yaml").read_text() for j in jobs]
    assert [c.count("models.fusion.") for c in configs] == [1, 1, 1]
    assert "fusion.Concat" in configs[0] and "fusion.Attention" in configs[1] and "fusion.Weighted" in configs[2]


def test_train_argument_forms(tmp_path):
    assert "train" in run_metamm(["--help"], tmp_path).stdout
    assert "eval" in run_metamm(["--help"], tmp_path).stdout
    assert "--ckpt PATH" in run_metamm(["eval", "--help"], tmp_path).stdout
    hydra_help = run_metamm(["train", "--help"], tmp_path).stdout
    fusions = sorted(p.stem for p in Path(config_dir()).glob("fusion/*.yaml"))
    assert f"fusion: {', '.join(fusions)}" in hydra_help
    job = run_metamm(["train", *SMOKE, "fusion=attention", "--cfg", "job"], tmp_path).stdout
    assert "Attention" in job and "way: 3" in job
    assert not (tmp_path / "outputs").exists()  # printing the config runs nothing


def test_data_command(tmp_path):
    out = run_metamm(["data", *SMOKE], tmp_path).stdout
    assert "image[1, 28, 28]" in out and "tokens[12] int64" in out
    train_row = next(ln for ln in out.splitlines() if ln.startswith("train"))
    assert train_row.split()[1:3] == ["125", "1000"]  # 5**3 classes x 8 samples
    assert "fit every split" in out


def test_user_experiment_folder(tmp_path):
    mine = tmp_path / "my_configs" / "exp"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\n"
                                    "task_name: mine\ntrainer: {max_steps: 2, val_every: 2}\n")
    proc = run_metamm(["train", "--config-dir", tmp_path / "my_configs", "+exp=tiny"], tmp_path)
    assert "/outputs/mine/runs/" in proc.stdout and "step 2)" in proc.stdout


def test_single_modality_and_missing(tmp_path):
    proc = run_metamm(["train", *SMOKE, "dataset.modalities=[audio]", "fusion=weighted",
                       "missing.train.audio=0.3", "trainer.max_steps=2",
                       "trainer.val_every=2"], tmp_path)
    assert "audio[1, 128]" in proc.stdout and "image[" not in proc.stdout


def test_sweep_preset(tmp_path):
    run_metamm(["train", "-m", *SMOKE, "+sweep=fusions", "hydra.sweeper.params.seed=0",
                "trainer.max_steps=1", "trainer.val_every=1", "trainer.val_episodes=2"], tmp_path)
    sweep = next((tmp_path / "outputs" / "smoke" / "multiruns").iterdir())
    jobs = sorted(p.name.split(",")[0] for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert jobs == ["0000_fusion=concat", "0001_fusion=attention", "0002_fusion=weighted", "0003_fusion=gated"]
