"""Shared fixtures: run the real `metamm` executable in a scratch folder, compose configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest

from metamm_cli.config import compose

# Real data: $METAMM_DATA, else ../shared/data beside the repository (tests that need it skip,
# saying why, where neither exists); exported so that the datasets' configs resolve the same folder.
_DATA = Path(os.environ.get("METAMM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if _DATA.is_dir():
    os.environ.setdefault("METAMM_DATA", str(_DATA))

# The layout measurements (trainer.memory_format=auto) of this session in a file of its own, not
# the user's cache (inherited by every metamm the tests start).
if "METAMM_LAYOUT_CACHE" not in os.environ:
    import tempfile
    os.environ["METAMM_LAYOUT_CACHE"] = str(Path(tempfile.mkdtemp(prefix="metamm-layout-")) / "autotune.json")

# The console script installed beside this interpreter (pip install . or -e .).
_script = Path(sys.executable).with_name("metamm")
METAMM = [str(_script)] if _script.exists() else [shutil.which("metamm") or "metamm"]
SMOKE = ["+exp=smoke"]
HANG_GUARD = 1800  # seconds: only against a hung process, never a measure of speed


def run_metamm(args, cwd, env=None, check=True):
    """Run `metamm ARGS` in ``cwd``; returns the CompletedProcess (stdout/stderr as text)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    proc = subprocess.run(METAMM + [str(a) for a in args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=HANG_GUARD)
    if check and proc.returncode != 0:
        raise AssertionError(f"metamm {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


# The slowest files first: the workers (pytest-xdist, one file each at a time) then finish
# together instead of one of them starting a long file last.
SLOW_FIRST = ("test_sweeps.py", "test_benchmark_presets.py", "test_algorithm_cli.py", "test_runs.py", "test_resume.py", "test_paper_presets.py",
              "test_distributed.py", "test_compare.py", "test_cli.py", "test_selfcontained.py")


def wait_for(predicate, proc=None, timeout=HANG_GUARD):
    """Poll ``predicate`` until it holds; fails at once, with its output, when ``proc`` has exited
    (a process that failed at start-up never makes the files a test waits for)."""
    deadline = time.monotonic() + timeout  # a hang guard only
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()}"
        time.sleep(0.02)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: file order kept


def run_cli(argv, monkeypatch, capsys, cwd):
    """`metamm ARGV` in-process (the CLI's own entry point, without a Python start-up): (exit
    code, stdout, stderr)."""
    from metamm_cli import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored afterwards (main sets it to 1)
    monkeypatch.setattr("sys.argv", ["metamm"])
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_dir_of(proc) -> Path:
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("run directory: "))
    return Path(line.split(": ", 1)[1])


def compose_cfg(overrides=(), name="train"):
    return compose(overrides, name)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke training run shared by the tests that need a checkpoint."""
    cwd = tmp_path_factory.mktemp("smoke")
    proc = run_metamm(["train", *SMOKE], cwd)
    return {"cwd": cwd, "proc": proc, "run_dir": cwd / run_dir_of(proc)}


def to_double(algo, episode):
    """``algo`` and the float tensors of ``episode`` in float64 (gradient checks)."""
    for part in (episode.support, episode.query):
        for m, x in part.items():
            part[m] = x.double() if x.is_floating_point() else x
    return algo.double(), episode
