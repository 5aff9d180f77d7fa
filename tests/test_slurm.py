"""`hydra/launcher=submitit_slurm` on a real one-node Slurm (../shared/tools/slurm-local.sh; the
tests skip, saying why, where it cannot start): a job that asks more CPUs than the node has is
cancelled with one line quoting Slurm's reason and naming the key; a sweep prints its jobs'
states while it waits; SIGTERM to a waiting sweep says the jobs go on and gives the command that
collects them, which works. Plus the summary line and the fatal reasons without a cluster."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import HANG_GUARD, METAMM, SMOKE, run_metamm, wait_for

from hydra_plugins.metamm.slurm import FATAL_REASONS, is_fatal, summary

REPO = Path(__file__).resolve().parents[1]
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.poll_s=0.5", "hydra.launcher.timeout_min=10",
         "trainer.tensorboard=false"]
STATUS = re.compile(r"^slurm: (\d+ pending( \([^)]*\))?|\d+ running|\d+ [a-z_]+)(, (\d+ pending( \([^)]*\))?|\d+ running|\d+ [a-z_]+))*$")


def test_the_summary_line_and_the_fatal_reasons():
    states = {"1_0": ("PENDING", "Resources"), "1_1": ("PENDING", "Resources"), "1_2": ("RUNNING", "None"),
              "1_3": ("COMPLETED", ""), "1_4": ("GONE", ""), "1_5": ("COMPLETED", "")}
    assert summary(states) == "slurm: 2 pending (Resources), 1 running, 3 done"
    assert summary({"2_0": ("PENDING", "Priority"), "2_1": ("PENDING", "Resources"), "2_2": ("TIMEOUT", "")}) == \
        "slurm: 2 pending (1 Priority, 1 Resources), 1 timeout"
    assert summary({"3": ("PENDING", "None")}) == "slurm: 1 pending"
    for reason in ("PartitionConfig", "QOSMaxCpuPerJobLimit", "InvalidAccount"):
        assert is_fatal(reason, FATAL_REASONS), reason
    for reason in ("Resources", "Priority", "ReqNodeNotAvail, UnavailableNodes:n1", "JobArrayTaskLimit", "None"):
        assert not is_fatal(reason, FATAL_REASONS), reason  # these clear by waiting


@pytest.fixture(scope="module")
def slurm():
    """A real one-node Slurm from ../shared/tools/slurm-local.sh; skipped where it cannot start.
    Yields the node's CPUs."""
    script = REPO.parent / "shared" / "tools" / "slurm-local.sh"
    if not script.is_file():
        pytest.skip(f"no {script}: cannot start a local Slurm here")
    if os.geteuid() != 0:
        pytest.skip("slurm-local.sh needs root")
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=HANG_GUARD)
    if up.returncode != 0:
        pytest.skip(f"local Slurm did not start: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
    cpus = int(re.search(r"(\d+) cpus", up.stdout).group(1))
    yield cpus
    subprocess.run(["bash", str(script), "down"], capture_output=True, text=True, timeout=HANG_GUARD)


def queued(job: str) -> list:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True).stdout.split()



def test_a_job_asking_more_cpus_than_the_node_has_is_cancelled_in_one_line(tmp_path, slurm):
    proc = run_metamm(["train", "-m", *SMOKE, *SLURM, f"hydra.launcher.cpus_per_task={slurm + 2}", "seed=0,1"],
                      tmp_path, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    found = re.fullmatch(r"metamm train: error: Slurm will never start job (\d+)_0 of this sweep: squeue says "
                         r"Reason=PartitionConfig; cancelled its 2 jobs \(scancel \1\); lower "
                         r"hydra\.launcher\.cpus_per_task: a job asks (\d+) CPUs per node .*, a node of partition "
                         r"\w+ has (\d+)", last)
    assert found and int(found[2]) == slurm + 2 and int(found[3]) == slurm, last
    assert "slurm: 2 pending (PartitionConfig)" in proc.stderr  # the reason, while it waited
    wait_for(lambda: not queued(found[1]))  # cancelled, not left pending forever
    assert not (tmp_path / "outputs").exists()  # nothing ran: no sweep folder is left


def test_a_sweep_shows_its_jobs_states_and_finishes(tmp_path, slurm):
    # every job takes the whole node: one runs while the other pends for Resources
    proc = run_metamm(["train", "-m", *SMOKE, *SLURM, f"hydra.launcher.cpus_per_task={slurm}", "seed=0,1"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("slurm: ")]
    assert re.fullmatch(r"slurm: submitted 2 jobs \(squeue -j \d+\) into .*multiruns/.*", lines[0]), lines
    states = lines[1:]
    assert all(STATUS.match(ln) for ln in states), states
    assert all(a != b for a, b in zip(states, states[1:]))  # printed when it changes, not every poll
    assert "1 running" in " ".join(states) and "pending (Resources)" in " ".join(states), states
    assert states[-1] == "slurm: 2 done"
    assert len(list(tmp_path.glob("outputs/smoke/multiruns/*/000[01]_*/metrics.json"))) == 2
    assert list(tmp_path.glob("outputs/smoke/multiruns/*/.submitit/**/*_log.out"))  # Slurm ran them
    assert "sweep summary" in proc.stdout


def test_sigterm_while_waiting_leaves_the_jobs_running_and_says_how_to_collect_them(tmp_path, slurm):
    err = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}
    args = ["train", "-m", *SMOKE, *SLURM, f"hydra.launcher.cpus_per_task={slurm}", "seed=0,1"]
    with open(err, "w") as f:
        p = subprocess.Popen(METAMM + args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=f, text=True)
    try:
        wait_for(lambda: "running" in err.read_text() or p.poll() is not None)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=HANG_GUARD)
    finally:
        if p.poll() is None:
            p.kill()
    last = err.read_text().strip().splitlines()[-1]
    assert p.returncode == 143 and "nothing was saved" not in last, err.read_text()
    found = re.fullmatch(r"metamm train: interrupted while (\d) Slurm jobs? run or wait \((\d+)_.*\); they go on in "
                         r"Slurm \(squeue -j \2\) and write into (\S+)\. When they have ended, collect the sweep "
                         r"\(finished jobs are skipped, stopped ones resume\) with: (metamm train .*); or cancel "
                         r"them: scancel \2", last)
    assert found, last
    assert queued(found[2])  # they go on
    wait_for(lambda: not queued(found[2]))
    command = shlex.split(found[4])
    assert command[:2] == ["metamm", "train"] and command[2:-1] == args[1:]
    collect = run_metamm(command[1:], tmp_path)  # the command as printed, pasted
    jobs = sorted(tmp_path.glob("outputs/smoke/multiruns/*/000[01]_*"))
    assert len(jobs) == 2 and all((j / "metrics.json").is_file() for j in jobs)
    logs = " ".join((j / "train.log").read_text() for j in jobs)
    assert logs.count("finished before, skipped") == 2, collect.stderr  # the jobs that went on ran to the end
