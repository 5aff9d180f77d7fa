"""Shared by the scripts: compose a metamm config in-process (no subprocess, no run folder);
time step functions side by side."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time  # noqa: E402

import torch  # noqa: E402

from metamm_cli.config import compose  # noqa: E402


def emit(result, out=None) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there too."""
    import json

    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def compose_config(overrides, name: str = "train"):
    return compose(overrides, name)


def measure(steps, device, repeats, warmup=1):
    """Time each step function ``repeats`` times, round-robin (interleaved, fair on a shared
    machine), after ``warmup`` calls each; the median step time and the peak CUDA memory."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in steps}
    peaks = {}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {k: {"step_ms": 1000 * sorted(v)[len(v) // 2], "peak_mem_mib": peaks[k]} for k, v in times.items()}
