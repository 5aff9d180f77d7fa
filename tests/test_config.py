"""Every config option composes and builds; the wheel ships the configs."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD, compose_cfg

from metamm_cli.algorithms import MetaAlgorithm, build_algorithm
from metamm_cli.config import config_dir
from metamm_cli.data.base import build_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(config_dir())
OPTIONS = [f"{group}={p.stem}" for group in ("fusion", "algorithm")
           for p in sorted((CONFIGS / group).glob("*.yaml"))]
OPTIONS += [f"encoder/{m}={p.stem}" for m in ("image", "audio")
            for p in sorted((CONFIGS / "encoder" / m).glob("*.yaml"))]
OPTIONS += [f"+exp={p.stem}" for p in sorted((CONFIGS / "exp").glob("*.yaml"))]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_builds_and_runs(option):
    over = [option] if option.startswith("+exp") else ["+exp=smoke", option]
    small = [f"encoder.{m}.hidden=8" for m in ("image", "audio", "strokes")]  # presets at test size
    if option == "encoder/image=resnet12":  # no hidden width: four block widths, the last = encoder.dim
        small = ["~encoder.image.hidden", "encoder.image.widths=[4,4,8,16]"] + small[1:]  # (smoke sets one)
    cfg = compose_cfg(over + ["encoder.dim=16", *small])
    root = cfg.dataset.get("root")
    if root is not None and not Path(str(root)).exists():  # a real-data preset on a machine without it
        pytest.skip(f"{option}: dataset.root={root} is absent (set METAMM_DATA to the data folder)")
    dataset = build_dataset(cfg.dataset)
    algo = build_algorithm(cfg, dataset)
    assert isinstance(algo, MetaAlgorithm)
    from metamm_cli.data.episodes import EpisodeSampler
    E = cfg.episode
    ep = EpisodeSampler(dataset.split("val"), E.way, E.shot, E.query, 2).sample()
    loss, logits = algo(ep)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (2, E.way * E.query, E.way)


def test_defaults_are_the_documented_ones():
    cfg = compose_cfg()
    assert (cfg.episode.way, cfg.episode.shot, cfg.episode.query) == (5, 1, 15)
    assert cfg.trainer.device == "auto" and cfg.trainer.amp.value == "none"
    assert cfg.fusion._target_.endswith("Concat") and cfg.algorithm._target_.endswith("ProtoNet")
    assert "exp" not in cfg  # experiments are added with +exp=NAME


def test_wheel_ships_configs(tmp_path):
    """Build the wheel, unpack it elsewhere, and find the configs from the installed package."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=HANG_GUARD)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel offline here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("metamm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in ("train.yaml", "eval.yaml", "fusion/attention.yaml", "exp/smoke.yaml", "hydra/default.yaml"):
        assert f"metamm_cli/configs/{cfg}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run([sys.executable, "-c", "from metamm_cli.config import config_dir; print(config_dir())"],
                           cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=HANG_GUARD)
    assert probe.stdout.strip() == str(site / "metamm_cli" / "configs"), probe.stderr
    # the installed package trains: Hydra scans its hydra_plugins.metamm (an editable install's
    # tests never do), and a plugin module that breaks the scan breaks every command
    env = {**os.environ, "PYTHONPATH": str(site), "METAMM_DATA": str(tmp_path / "no-data")}
    env.pop("HYDRA_FULL_ERROR", None)
    step = subprocess.run([sys.executable, "-m", "metamm_cli", "train", "+exp=smoke", "trainer.max_steps=1",
                           "trainer.val_every=1", "trainer.val_episodes=1", "eval.episodes=1",
                           "trainer.tensorboard=false", "trainer.progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert step.returncode == 0 and "final validation accuracy" in step.stdout + step.stderr, step.stderr
    # run.json's commit: a wheel install run inside the project's clone still records it
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
                          capture_output=True, text=True, timeout=HANG_GUARD).stdout.strip()
    if not head:
        pytest.skip("not run from a git clone")
    probe = subprocess.run([sys.executable, "-c", "from metamm_cli.runs.record import git_commit; print(git_commit())"],
                           cwd=ROOT / "tests", env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=HANG_GUARD)
    assert probe.stdout.strip() == head, probe.stderr


def test_sweep_job_folder_names_stay_short():
    """Hydra names a sweep job's folder after its overrides; long sweeps exceeded 255 bytes."""
    from metamm_cli.config import job_dirname

    short = "fusion=concat,seed=0"
    assert job_dirname(short) == short
    long_a = ",".join(f"dataset.option_{i}=value_{i}" for i in range(40))
    long_b = long_a.replace("value_39", "value_x")
    a, b = job_dirname(long_a), job_dirname(long_b)
    assert len(a) == 120 and len(b) == 120 and a != b  # cut, and told apart by the hash
    assert a.startswith(long_a[:100])
