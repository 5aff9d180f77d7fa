"""hydra/launcher=population: a sweep's members that differ only in population-safe keys trained
as one vmapped program, each member still a normal run. Through the real CLI, every member's
weights after k steps equal the same job run alone (the basic launcher) for ProtoNet, MAML
(second order) and Matching Networks; chunked populations train the same; a stopped population
resumes; non-safe keys split groups; torchrun and non-vmappable algorithms are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD, METAMM, SMOKE, run_metamm

ENV = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}
# As tests/test_distributed.py: SGD and MLP encoders keep rounding differences (vmap's batched
# kernels sum in another order) rounding differences.
SAME = [*SMOKE, "trainer.optimizer=sgd", "trainer.lr=0.05", "trainer.deterministic=true", "trainer.device=cpu",
        "trainer.tensorboard=false", "trainer.threads=1", "encoder/image=mlp", "encoder/audio=mlp", "encoder.dim=8"]
POP = ["hydra/launcher=population"]
FAMILIES = {"protonet": [], "maml": ["algorithm=maml", "algorithm.inner_steps=1"], "matching": ["algorithm=matching"]}


def sweeps(cwd: Path):
    return sorted((cwd / "outputs" / "smoke" / "multiruns").iterdir())


def members(sweep: Path):
    """The sweep's run folders in job order (a folder name may hold '/': nested)."""
    return sorted((p.parent for p in sweep.rglob("metrics.json")), key=lambda p: str(p.relative_to(sweep)))


def last(run: Path):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


def assert_same_runs(a_sweep: Path, b_sweep: Path, rtol=1e-5, atol=1e-6):
    a_runs, b_runs = members(a_sweep), members(b_sweep)
    assert len(a_runs) == len(b_runs) > 1
    worst = 0.0
    for a_run, b_run in zip(a_runs, b_runs):
        assert a_run.relative_to(a_sweep) == b_run.relative_to(b_sweep)  # the folder named as today
        a, b = last(a_run), last(b_run)
        assert a["step"] == b["step"]
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=rtol, atol=atol, msg=k)
            worst = max(worst, float((a["model"][k].double() - b["model"][k].double()).abs().max()))
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()  # a normal torch state_dict
        assert [h["val_acc"] for h in a["history"]] == pytest.approx([h["val_acc"] for h in b["history"]], abs=1e-3)
        for f in ("config.yaml", "metrics.json", "checkpoints/best.pt", ".hydra/overrides.yaml"):
            assert (a_run / f).is_file(), f
        assert json.loads((a_run / "metrics.json").read_text())["step"] == a["step"]
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_each_member_equals_its_run_alone(tmp_path, family):
    args = ["train", "-m", *SAME, *FAMILIES[family], "seed=0,1",
            "algorithm.inner_lr=0.1,0.3" if family == "maml" else "trainer.lr=0.05,0.1"]
    out = run_metamm([*args, *POP], tmp_path).stdout
    assert "population: 2 members trained as one vmapped program" in out or "population: 4 members" in out
    run_metamm(args, tmp_path)  # the same sweep, one job after another
    pop, alone = sweeps(tmp_path)
    worst = assert_same_runs(pop, alone)
    print(f"{family} SGD: max |population - alone| = {worst:.3g}")


def test_adam_members_equal_their_runs_alone(tmp_path):
    """Adam: MAML and Matching nearly as tight as SGD (measured: 1.2e-7 after 8 steps on one
    machine, 2.0e-6 on another, 2026-12-07: Adam divides rounding noise by the small early second
    moments; lr x steps is 2.4e-2 here, so 1e-5 still tells a wrong member from a right one). ProtoNet's
    squared distances ignore a common shift of the embeddings, whose gradient is rounding noise
    that Adam scales up to lr-sized steps; its members then differ by up to lr * steps (measured
    4e-3 to 1e-2 at lr 1e-3 to 3e-3, 8 steps, conv encoders) with the same validation accuracies."""
    args = ["train", "-m", *SAME, "trainer.optimizer=adam", *FAMILIES["maml"], "seed=0,1", "trainer.lr=0.001,0.003"]
    run_metamm([*args, *POP], tmp_path)
    run_metamm(args, tmp_path)
    pop, alone = sweeps(tmp_path)
    assert_same_runs(pop, alone, rtol=1e-5, atol=1e-5)


def test_population_chunk_gives_the_same_members(tmp_path):
    args = ["train", "-m", *SAME, "seed=0,1,2", *POP]
    run_metamm(args, tmp_path)
    out = run_metamm([*args, "trainer.population_chunk=2"], tmp_path).stdout
    assert "population_chunk=2" in out
    whole, chunked = sweeps(tmp_path)
    for a, b in zip(members(whole), members(chunked)):
        for k, v in last(a)["model"].items():
            torch.testing.assert_close(v, last(b)["model"][k], rtol=1e-6, atol=1e-7, msg=k)


def test_non_safe_keys_split_groups_in_one_line(tmp_path):
    proc = run_metamm(["train", "-m", *SAME, "seed=0,1", "fusion=concat,mean", "trainer.max_steps=2", *POP], tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if "groups" in ln]
    assert len(lines) == 1 and "4 jobs in 2 groups (2, 2 members)" in lines[0], proc.stdout
    assert "fusion is not population-safe" in lines[0]
    (sweep,) = sweeps(tmp_path)
    assert len(members(sweep)) == 4


def test_compare_sees_the_same_table(tmp_path):
    args = ["train", "-m", *SAME, "seed=0,1", "trainer.lr=0.05,0.1", "trainer.max_steps=4"]
    run_metamm([*args, *POP], tmp_path)
    run_metamm(args, tmp_path)
    tables = []
    for sweep in sweeps(tmp_path):
        out = run_metamm(["compare", sweep, "--format", "json"], tmp_path).stdout
        rows = json.loads(out.replace(str(sweep), "SWEEP").replace(str(sweep.relative_to(tmp_path)), "SWEEP"))["rows"]
        tables.append(without_speed(rows))
    assert tables[0] == tables[1]


def without_speed(x):
    """The table without its speed columns (the launcher's, not the run's) (the sweep folder named SWEEP), accuracies rounded."""
    if isinstance(x, dict):
        return {k: without_speed(v) for k, v in x.items() if not any(w in k for w in ("time", "per_s"))}
    if isinstance(x, list):
        return [without_speed(v) for v in x]
    return round(x, 3) if isinstance(x, float) else x


def test_refusals_in_one_line(tmp_path):
    proc = run_metamm(["train", "-m", *SAME, "seed=0,1", *POP], tmp_path, check=False,
                      env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert proc.returncode == 2 and "cannot run under torchrun" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_metamm(["train", "-m", *SAME, "seed=0,1", "algorithm=reptile", *POP], tmp_path, check=False)
    assert proc.returncode == 2 and "Reptile" in proc.stderr and "cannot be vmapped" in proc.stderr, proc.stderr


def test_sigterm_saves_every_member_and_resume_continues_them(tmp_path):
    """SIGTERM mid-run: every member's last.pt at the same step and its metrics say so (exit 143);
    the same command with trainer.resume=SWEEP continues every member in its own folder to the
    weights of an uninterrupted population."""
    steps = 150
    args = ["train", "-m", *SAME, "seed=0,1", f"trainer.max_steps={steps}", "trainer.val_every=100000",
            "trainer.ckpt_every=100000", "trainer.log_every=100000", *POP]
    run_metamm(args, tmp_path)
    p = subprocess.Popen(METAMM + args, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    deadline = time.monotonic() + HANG_GUARD
    for line in p.stdout:  # training has started
        if "trained as one vmapped program" in line:
            break
        assert time.monotonic() < deadline
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=HANG_GUARD)[0]
    assert p.returncode == 128 + signal.SIGTERM, out
    whole, stopped = sweeps(tmp_path)
    runs = members(stopped)
    assert len(runs) == 2
    saved = {last(r)["step"] for r in runs}
    assert len(saved) == 1 and 0 < next(iter(saved)) < steps, saved  # the same step, every member saved
    for r in runs:
        assert json.loads((r / "metrics.json").read_text()).get("interrupted") == "SIGTERM"
    run_metamm([*args, f"trainer.resume={stopped}"], tmp_path)
    assert sweeps(tmp_path) == [whole, stopped] and members(stopped) == runs  # continued in its folders
    for a, b in zip(members(whole), runs):
        sa, sb = last(a), last(b)
        assert sb["step"] == steps and "interrupted" not in json.loads((b / "metrics.json").read_text())
        for k, v in sa["model"].items():
            torch.testing.assert_close(v, sb["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_diverged_member_is_masked_out_and_the_rest_go_on(tmp_path):
    """lr=1e9 diverges (trainer.on_nan=stop: that job fails in one line, as alone); the member
    beside it trains on, to the weights of its run alone."""
    args = ["train", "-m", *SAME, "seed=0", "trainer.lr=0.05,1e9"]
    proc = run_metamm([*args, *POP], tmp_path, check=False)
    assert proc.returncode == 1 and "non-finite loss or gradient" in proc.stdout + proc.stderr
    run_metamm(args, tmp_path, check=False)
    pop, alone = sweeps(tmp_path)
    (a,), (b,) = members(pop), members(alone)  # the finished job of each
    assert "trainer.lr=0.05" in (a / ".hydra" / "overrides.yaml").read_text()
    for k, v in last(a)["model"].items():
        torch.testing.assert_close(v, last(b)["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_out_of_memory_names_a_chunk_that_fits():
    from types import SimpleNamespace

    from metamm_cli.scale.population import out_of_memory

    line = out_of_memory(SimpleNamespace(chunk_size=16), torch.device("cuda", 0))
    assert "16 population members" in line and "trainer.population_chunk=8" in line


def test_population_safe_keys_and_grouping():
    from hydra_plugins.metamm.population import group_jobs

    jobs = [["+exp=smoke", f"seed={s}", f"fusion={f}", f"trainer.lr={lr}"]
            for f in ("concat", "mean") for s in (0, 1) for lr in (0.1, 0.2)]
    groups, split = group_jobs(jobs)
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and split == ["fusion"]
    assert group_jobs([["missing.train.image=0.5"], ["missing.train.image=0.2"], ["algorithm.inner_lr=0.1"]])[0] == [[0, 1, 2]]
