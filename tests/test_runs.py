"""Runs cannot collide and never half-exist: the RUNNING claim (two resumes started together),
clean-up that spares live processes, SIGTERM and SIGINT alike during start-up, copy-pasteable
resume commands, a resume that finds nothing saying what it saw, out-of-memory in one line."""
from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import HANG_GUARD, METAMM, run_dir_of, run_metamm, wait_for

from metamm_cli import ConfigError
from metamm_cli.runs.checkpoint import clean_orphans
from metamm_cli.runs.layout import CLAIM as RUNNING
from metamm_cli.runs.claim import claim, release, running_pid

ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}


def start(args, cwd, **popen):
    return subprocess.Popen(METAMM + [str(a) for a in args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)



def sleeper():
    """A live python process that is not this one."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_claim_is_exclusive_and_takes_over_stale_markers(tmp_path):
    other = sleeper()
    try:
        (tmp_path / RUNNING).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                    "since": "then"}))
        with pytest.raises(ConfigError, match=rf"trainer.resume=x: run .* is in use by pid {other.pid}"):
            claim(tmp_path, "trainer.resume=x")
    finally:
        other.kill()
        other.wait()
    claim(tmp_path)  # the holder is gone: a stale marker is taken over
    assert running_pid(tmp_path) == os.getpid()
    claim(tmp_path)  # idempotent for the holder
    release(tmp_path)
    assert not (tmp_path / RUNNING).exists()


def test_clean_up_spares_live_writers(tmp_path):
    host = socket.gethostname().replace(".", "_")
    live = sleeper()
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        files = {name: tmp_path / name for name in (f".last.pt.{host}.{live.pid}.ab12.tmp",
                                                     f".last.pt.{host}.{dead.pid}.cd34.tmp",
                                                     f".last.pt.otherhost.{dead.pid}.ef56.tmp")}
        for f in files.values():
            f.write_bytes(b"x")
        gone = clean_orphans(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert gone == [files[f".last.pt.{host}.{dead.pid}.cd34.tmp"]]
    assert files[f".last.pt.{host}.{live.pid}.ab12.tmp"].exists()  # a live writer's: kept
    assert files[f".last.pt.otherhost.{dead.pid}.ef56.tmp"].exists()  # another host's: kept


def test_two_resumes_started_together_one_refuses(tmp_path):
    run = run_dir_of(run_metamm(["train", "+exp=smoke", "trainer.tensorboard=false"], tmp_path))
    resume = ["train", "+exp=smoke", "trainer.resume=true", "trainer.max_steps=100000"]
    procs = [start(resume, tmp_path), start(resume, tmp_path)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs))
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read().strip()
        assert loser.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        # refused by the claim, or (when the winner had claimed first) by the search
        assert f"is in use by pid {winner.pid}" in err or f"in use by a live process: {run.relative_to(tmp_path)} (pid {winner.pid})" in err, err
        wait_for(lambda: "resumed from" in (run / "train.log").read_text(), winner)
        assert running_pid(run) == winner.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            p.communicate(timeout=HANG_GUARD)
    assert (run / "train.log").read_text().count("resumed from") == 1  # only one trained the run
    assert not (run / RUNNING).exists()


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_start_up_leaves_nothing(tmp_path, signum, code):
    """A big synthetic set takes seconds to generate: the signal lands while the data is built."""
    p = start(["train", "+exp=smoke", "dataset.codes={train: 40, val: 4, test: 4}"], tmp_path)
    wait_for(lambda: list(tmp_path.glob("outputs/smoke/runs/*/.hydra")), p)  # Hydra made the folder
    time.sleep(0.3)
    p.send_signal(signum)
    out, err = p.communicate(timeout=HANG_GUARD)
    assert p.returncode == code, (out, err)
    assert "interrupted during start-up; nothing was saved" in err and "Traceback" not in err, err
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.log"))


def test_interrupted_sweep_job_prints_a_resume_command_that_works(tmp_path):
    """A sweep job's folder holds '=' and ',' (``1_seed=1,trainer.device=cpu``): the printed
    command is quoted for the shell and for Hydra, and runs as printed."""
    p = start(["train", "-m", "+exp=smoke", "seed=1", "trainer.device=cpu", "trainer.max_steps=100000",
               "trainer.log_every=1", "trainer.tensorboard=false"], tmp_path)
    wait_for(lambda: list(tmp_path.glob("outputs/smoke/multiruns/*/*/checkpoints/last.pt")), p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=HANG_GUARD)
    assert p.returncode == 143, (out, err)
    line = next(ln for ln in (out + err).splitlines() if "resume with: " in ln)
    command = shlex.split(line.split("resume with: ", 1)[1])
    job = next(tmp_path.glob("outputs/smoke/multiruns/*/*/"))
    assert command[:2] == ["metamm", "train"] and "seed=1,trainer.device=cpu" in job.name
    step = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["step"]
    again = run_metamm(command[1:] + [f"trainer.max_steps={step + 2}"], tmp_path)  # as printed
    assert f"at step {step}" in again.stdout and run_dir_of(again) == job
    assert json.loads((job / "metrics.json").read_text())["step"] == step + 2


def test_resume_true_that_finds_nothing_lists_other_tasks(tmp_path):
    run = run_dir_of(run_metamm(["train", "+exp=smoke", "trainer.tensorboard=false"], tmp_path))
    proc = run_metamm(["train", "trainer.resume=true"], tmp_path, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "no checkpoints/last.pt of a stopped run of task 'default'" in err
    assert f"stopped runs of other tasks: smoke (1, newest {run.relative_to(tmp_path)})" in err, err


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_out_of_memory_is_one_line_and_leaves_no_folder(tmp_path):
    proc = subprocess.run(METAMM + ["train", "+exp=smoke", "trainer.meta_batch=20000", "trainer.threads=1"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD,
                          preexec_fn=_limit_memory)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "out of memory" in err and "trainer.meta_batch (20000)" in err and "trainer.task_chunk" in err, err
    assert not list(tmp_path.glob("outputs/smoke/runs/*"))


def test_threads_setting_is_recorded(tmp_path, monkeypatch):
    from metamm_cli.device import auto_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert 1 <= auto_threads() <= len(os.sched_getaffinity(0))
    run = run_dir_of(run_metamm(["train", "+exp=smoke", "trainer.threads=1", "trainer.tensorboard=false"],
                                tmp_path))
    assert json.loads((run / "run.json").read_text())["threads"] == 1
    assert "1 CPU thread)" in (run / "train.log").read_text()
