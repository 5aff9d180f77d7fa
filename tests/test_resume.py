"""Faithful resume, preemption and divergence: a run killed at any moment (SIGKILL, also during a
checkpoint write; SIGTERM; Ctrl-C) and resumed ends bit-identical to an uninterrupted one, in
its own folder, with continuous TensorBoard curves and metrics history."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD, METAMM, compose_cfg, run_dir_of, run_metamm, wait_for
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metamm_cli import ConfigError
from metamm_cli.runs.layout import CLAIM as RUNNING
from metamm_cli.runs.claim import running_pid
from metamm_cli.runs.resume import find_resume, merge_resume, resume_command
from metamm_cli.runs.signals import StopSignals

BASE = ["train", "+exp=smoke", "trainer.max_steps=12", "trainer.val_every=2", "trainer.log_every=3",
        "trainer.ckpt_every=5", "trainer.val_episodes=4", "trainer.deterministic=true",
        "trainer.device=cpu"]
RESUME = ["train", "+exp=smoke", "trainer.resume=true"]


def start(args, cwd, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **env})
    return subprocess.Popen(METAMM + [str(a) for a in args], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(proc, needle):
    """Lines of ``proc`` up to the first one holding ``needle`` (all of them if it never comes)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            break
    return "".join(lines)



def finish(proc):
    out = proc.stdout.read()
    return proc.wait(timeout=HANG_GUARD), out


def scalars(run, tag):
    from metamm_cli.runs.record import tb_folder

    acc = EventAccumulator(str(tb_folder(run)))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_killed_at_any_moment_resumes_bit_identical(tmp_path):
    (tmp_path / "a").mkdir()
    reference = start(BASE, tmp_path / "a")  # the uninterrupted run, alongside
    cwd = tmp_path / "b"
    cwd.mkdir()
    # 1. SIGKILL during the second write of last.pt (step 10; the hook pauses inside the write)
    p = start(BASE, cwd, METAMM_TEST_SAVE_PAUSE="2")
    ckpts = lambda: list(cwd.glob("outputs/smoke/runs/*/checkpoints"))  # noqa: E731
    wait_for(lambda: ckpts() and (ckpts()[0] / "last.pt").exists() and list(ckpts()[0].glob(".last.pt.*.tmp")), p)
    p.kill()
    p.wait()
    killed = p.pid
    run = ckpts()[0].parent
    assert list(run.glob(f"checkpoints/.last.pt.*.{killed}.*.tmp")) and (run / RUNNING).exists()  # debris
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 5  # the old one, whole
    # 2. SIGKILL at an arbitrary moment (right after step 6's validation line)
    p = start(RESUME, cwd)
    out = read_until(p, "step 6:")
    assert "resumed from" in out and "at step 5" in out and "step 6:" in out, out
    assert not list(run.glob(f"checkpoints/.*.{killed}.*.tmp"))  # the dead writer's orphan is gone
    assert running_pid(run) == p.pid
    with pytest.raises(ConfigError, match="stopped run"):  # resume=true never picks a running run
        find_resume(True, cwd / "outputs" / "smoke")
    p.kill()
    p.wait()
    assert running_pid(run) is None  # a stale marker: the pid is gone
    # 3. SIGTERM (what Slurm sends): the step finishes, a checkpoint is saved, the command is printed
    p = start(RESUME, cwd)
    read_until(p, "step 6:")
    p.send_signal(signal.SIGTERM)
    rc, out = finish(p)
    assert rc == 143 and f"resume with: {resume_command(run)}" in out, out
    assert "Traceback" not in out
    # 4. Ctrl-C, resuming by the folder's path
    p = start(["train", f"trainer.resume={run}"], cwd)
    read_until(p, "resumed from")
    read_until(p, "val acc")
    p.send_signal(signal.SIGINT)
    rc, out = finish(p)
    assert rc == 130 and "SIGINT at step" in out and "Traceback" not in out, out
    # 5. to the end
    last = run_metamm(RESUME, cwd)
    assert run_dir_of(last) == run and len(list(cwd.glob("outputs/smoke/runs/*"))) == 1  # one run, one folder
    rc, out = finish(reference)
    assert rc == 0, out
    straight = next((tmp_path / "a").glob("outputs/smoke/runs/*"))
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in b["optimizer"]["state"].items():
        assert all(torch.equal(v[n], a["optimizer"]["state"][k][n]) for n in v), k
    for tag in ("acc/val", "loss/train", "acc/train"):  # continuous, no duplicates, same values
        assert scalars(run, tag) == scalars(straight, tag), tag
    assert [s for s, _ in scalars(run, "acc/val")] == [2, 4, 6, 8, 10, 12]
    history = lambda r: [(h["step"], h["val_acc"]) for h in json.loads((r / "metrics.json").read_text())["history"]]  # noqa: E731
    assert history(run) == history(straight)
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumes"]) == 4 and info["torch"] == torch.__version__
    assert not (run / RUNNING).exists()


def test_resume_takes_the_runs_config_and_refuses_model_changes():
    stored = OmegaConf.to_container(compose_cfg(["+exp=smoke", "episode.way=4", "trainer.lr=0.01"]),
                                    resolve=True, enum_to_str=True)
    over = ["+exp=smoke", "trainer.resume=true", "trainer.max_steps=12"]
    merged, changes = merge_resume(stored, compose_cfg(over), over)
    assert merged.episode.way == 4 and merged.trainer.lr == 0.01  # the run's, not the defaults
    assert changes == ["resume: trainer.max_steps: 8 -> 12"]
    for bad in ("fusion=attention", "encoder.dim=8", "dataset.modalities=[audio]", "algorithm=maml",
                "encoder/image=mlp"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace("/", "[/.]")):
            merge_resume(stored, compose_cfg(["+exp=smoke", bad]), ["+exp=smoke", bad])


def test_resume_true_skips_running_runs_and_detects_stale_markers(tmp_path):
    root = tmp_path / "outputs" / "t"
    runs = []
    for name in ("old", "new"):
        ck = root / "runs" / name / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "last.pt").write_bytes(b"x")
        runs.append(ck.parent)
        time.sleep(0.02)
    mark = {"pid": os.getpid(), "host": socket.gethostname()}
    (runs[1] / RUNNING).write_text(json.dumps(mark))  # this very process: alive
    assert find_resume(True, root) == runs[0] / "checkpoints" / "last.pt"
    with pytest.raises(ConfigError, match="still running"):
        find_resume(str(runs[1]), root)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (runs[1] / RUNNING).write_text(json.dumps({**mark, "pid": dead.pid}))  # stale: the newest again
    assert find_resume(True, root) == runs[1] / "checkpoints" / "last.pt"


def test_second_ctrl_c_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopSignals() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.signum == signal.SIGINT and not exits
        stop._handle(signal.SIGINT, None)
    assert exits == [130]


def _poison_step(monkeypatch, at):
    """meta_backward returns a NaN loss and NaN gradients at step ``at``."""
    import metamm_cli.train as tr

    real, calls = tr.meta_backward, {"n": 0}

    def poisoned(algo, episode, *a, **k):
        calls["n"] += 1
        loss, acc = real(algo, episode, *a, **k)
        if calls["n"] == at:
            next(p for p in algo.parameters() if p.grad is not None).grad.fill_(float("nan"))
            loss = loss * float("nan")
        return loss, acc

    monkeypatch.setattr(tr, "meta_backward", poisoned)


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_nan_stop_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    from metamm_cli.train import Diverged, train

    _poison_step(monkeypatch, at=3)
    over = ["+exp=smoke", "trainer.tensorboard=false", "trainer.ckpt_every=2", "trainer.log_every=4"]
    with pytest.raises(Diverged, match=r"at step 3 .*last good checkpoint is .*last\.pt"):
        train(compose_cfg(over), run_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values()
                                      if t.is_floating_point())


def test_nan_skip_skips_the_update(tmp_path, monkeypatch):
    from metamm_cli.train import train

    _poison_step(monkeypatch, at=3)
    over = ["+exp=smoke", "trainer.tensorboard=false", "trainer.on_nan=skip"]
    metrics = train(compose_cfg(over), run_dir=tmp_path)
    assert metrics["step"] == 8 and metrics["skipped_steps"] == 1
    saved = _strict_json(tmp_path / "metrics.json")
    assert saved["skipped_steps"] == 1 and [h["step"] for h in saved["history"]] == [4, 8]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert all(int(s["step"]) == 7 for s in state["optimizer"]["state"].values())  # 8 steps, 1 skipped


def test_diverging_cli_run_stops_with_one_line(tmp_path):
    proc = run_metamm(["train", "+exp=smoke", "trainer.lr=1e6", "trainer.tensorboard=false"], tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "non-finite loss or gradient at step" in proc.stderr
    for ck in tmp_path.glob("outputs/smoke/runs/*/checkpoints/*.pt"):  # never a non-finite checkpoint
        state = torch.load(ck, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
