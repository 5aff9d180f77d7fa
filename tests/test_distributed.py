"""Multi-process training on torchrun (CPU, gloo): 2 processes give the same model as 1 process
with the whole meta-batch; one run is one folder written by rank 0; SIGTERM on one rank stops
every rank after the same step with one consistent checkpoint, which resumes on another number
of processes; the BatchNorm statistics of the ranks combine to one process's, by definition."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD, SMOKE, run_dir_of, run_metamm, wait_for

ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}
# A well-conditioned model, so that rounding differences (another summation order: the
# all-reduce) stay rounding differences: SGD (Adam scales the rounding noise of a parameter with
# no real gradient, such as a shift ProtoNet's distances ignore, up to lr-sized steps) and MLP
# encoders (max-pooling ties and BatchNorm on the synthetic images turn a 1e-7 difference into
# 1e-3 within two steps, between 1 and 2 threads of one process alike). The BatchNorm statistics
# are checked against their definition below.
SAME = [*SMOKE, "trainer.meta_batch=4", "trainer.optimizer=sgd", "trainer.lr=0.05", "trainer.deterministic=true",
        "trainer.device=cpu", "trainer.tensorboard=false", "trainer.max_steps=12", "trainer.threads=1",
        "encoder/image=mlp", "encoder/audio=mlp"]


def torchrun(nproc, args, cwd, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "metamm_cli", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def state(run: Path):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def assert_same_model(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def runs(cwd):
    return sorted(p for p in (cwd / "outputs" / "smoke" / "runs").iterdir())


def test_two_processes_train_the_model_of_one(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_dir_of(run_metamm(["train", *SAME], tmp_path / "one"))
    p = torchrun(2, ["train", *SAME], tmp_path / "two")
    out, err = p.communicate(timeout=HANG_GUARD)
    assert p.returncode == 0, (out, err)
    (two,) = runs(tmp_path / "two")  # one run, one folder
    a, b = state(tmp_path / "one" / one), state(two)
    assert_same_model(a, b)  # weights and BatchNorm running statistics
    assert [h["val_acc"] for h in a["history"]] == pytest.approx([h["val_acc"] for h in b["history"]], abs=1e-4)
    assert (two / "train_rank1.log").is_file() and "rank 0 of 2" in (two / "train.log").read_text()
    assert out.count("final validation accuracy") == 1  # only rank 0 prints


def worker(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank``."""
    for child in Path("/proc").iterdir():
        try:
            stat = (child / "stat").read_text()
            env = (child / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent.pid and f"RANK={rank}".encode() in env:
            return int(child.name)
    raise AssertionError(f"no worker of rank {rank}")


def test_sigterm_on_one_rank_checkpoints_once_and_resumes_on_another_world_size(tmp_path):
    long = [a for a in SAME if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=100000",
                                                                          "trainer.ckpt_every=1000"]
    p = torchrun(2, ["train", *long], tmp_path)
    wait_for(lambda: list(tmp_path.glob("outputs/smoke/runs/*/train.log"))
             and "step 4:" in next(tmp_path.glob("outputs/smoke/runs/*/train.log")).read_text(), p)
    os.kill(worker(p, 1), signal.SIGTERM)  # only rank 1 gets the signal
    out, err = p.communicate(timeout=HANG_GUARD)
    (run,) = runs(tmp_path)
    stopped = state(run)
    step = stopped["step"]
    assert 4 <= step < 100000 and "SIGTERM at step" in out + err, (out, err)
    assert "resume with: metamm train" in out + err
    # resume on ONE process to a few steps later; compare with one uninterrupted process
    resumed = run_metamm(["train", f"trainer.resume={run}", f"trainer.max_steps={step + 4}"], tmp_path)
    assert f"at step {step}" in resumed.stdout and run_dir_of(resumed) == run
    (tmp_path / "straight").mkdir()
    straight = run_dir_of(run_metamm(["train", *[a for a in long if not a.startswith("trainer.max_steps")],
                                      f"trainer.max_steps={step + 4}"], tmp_path / "straight"))
    assert_same_model(state(run), state(tmp_path / "straight" / straight))


def test_running_statistics_combine_to_one_process_by_definition():
    """The closed form all_reduce_step uses, checked without processes: ranks holding tasks
    0-1 and 2-4 of five, each starting from the same statistics, combine to the statistics one
    BatchNorm reaches after the five tasks in order (momentum 0.1 and None)."""
    from metamm_cli.scale.distributed import _contribution

    torch.manual_seed(0)
    batches = [torch.randn(6, 3) * (t + 1) + t for t in range(5)]
    for momentum in (0.1, None):
        one = torch.nn.BatchNorm1d(3, momentum=momentum)
        one.running_mean.uniform_(), one.num_batches_tracked.fill_(7)
        start = (one.running_mean.clone(), one.running_var.clone(), int(one.num_batches_tracked))
        for x in batches:
            one(x)
        total = 0
        for first, tasks in ((True, batches[:2]), (False, batches[2:])):
            rank = torch.nn.BatchNorm1d(3, momentum=momentum)
            rank.running_mean.copy_(start[0]), rank.running_var.copy_(start[1])
            rank.num_batches_tracked.fill_(start[2])
            for x in tasks:
                rank(x)
            after = 0 if not first else len(batches) - len(tasks)
            total = total + _contribution(rank, start[:2], len(tasks), after, first)
        if momentum is None:
            total = total / (start[2] + len(batches))
        torch.testing.assert_close(total, torch.cat([one.running_mean, one.running_var]))
