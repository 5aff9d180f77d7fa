"""How the embedding network runs on the device at hand: memory format and chunk size
(``trainer.memory_format``, ``trainer.embed_chunk``), chosen from a short measurement at
start-up that is cached on disk.

* ``memory_format=channels_last`` stores every 4-d weight and image batch as NHWC, the layout
  oneDNN's CPU convolutions and cuDNN's tensor-core kernels prefer; the maths is the same (a
  layout, not a change of values). It applies to any encoder, metamm's or a user's: the weights
  are converted once and every 4-d input is converted as it enters its encoder; the MAML family's
  functional calls take the same weights, so its fast weights keep the layout.
* ``embed_chunk=N`` runs a batch through the encoders in pieces of N samples with BatchNorm over
  the whole batch (:mod:`metamm_cli.models.chunked`).
* ``auto`` (``embed_chunk=null``) times a forward and backward pass of a copy of the embedding
  network's encoders, on random inputs of the size of one of the run's embedding calls, in each candidate
  (contiguous, channels-last; then the best of those with pieces of 16, 32 and 64 samples where
  the call holds at least two), and keeps the fastest (pieces only when at least 10% faster
  than whole batches). The choice is cached in ``autotune.json`` under
  ``$METAMM_CACHE`` (else ``~/.cache/metamm``) per device, torch version, threads, network and
  call size (``$METAMM_LAYOUT_CACHE`` names another file), so the measurement runs once; the
  run records it and a resumed run keeps it. With ``trainer.deterministic=true`` auto is
  contiguous and whole batches (no choice that depends on a measurement, so the run is the same
  on every machine).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.device import enum_name
from metamm_cli.models.chunked import chunkable, make_chunkable, set_chunk

log = logging.getLogger(__name__)

FORMATS = ("auto", "channels_last", "contiguous")
CHUNKS = (16, 32, 64)
MARGIN = 0.1  # pieces are kept only when at least this much faster than whole batches
_TORCH = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def check_format(name: str) -> None:
    if name not in FORMATS:
        raise ConfigError(f"trainer.memory_format={name}: must be one of {', '.join(FORMATS)}")


def apply_layout(module: nn.Module, memory_format: str, chunk: Optional[int], twice: bool = False) -> None:
    """Convert ``module``'s 4-d weights to ``memory_format`` and set the networks inside it (every
    :class:`MultimodalNet`) to convert their 4-d inputs likewise; run batches in pieces of
    ``chunk`` (0/None: whole)."""
    fmt = _TORCH[memory_format]
    module.to(memory_format=fmt)
    for m in module.modules():
        if hasattr(m, "encoders") and hasattr(m, "memory_format"):  # a MultimodalNet
            m.memory_format = fmt
            make_chunkable(m.encoders)
    set_chunk(module, chunk or None, twice)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """After loading an optimizer state saved in another layout (a run resumed on another
    machine, or with another ``trainer.memory_format``): each state tensor shaped like its
    parameter takes the parameter's layout (fused/foreach kernels need them alike)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


# ---------------------------------------------------------------------------------------------
# the start-up measurement


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu {model or platform.processor()}"


def _step(net: nn.Module, inputs: Dict[str, torch.Tensor], device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    net.zero_grad(set_to_none=True)
    # the encoders (and mapping), which the layout changes; a fusion may need whole episodes (am3)
    sum(f.float().pow(2).mean() for f in net.features(inputs).values()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(model: nn.Module, specs, batch: int, device: torch.device, twice: bool,
            repeats: int = 3) -> Dict[str, object]:
    """Time the candidates on copies of ``model`` (train mode, random inputs of ``batch`` samples;
    the global random state is left as it was), interleaved round by round (a burst of other work
    on a shared machine hits every candidate alike), best of ``repeats`` after a warm-up ->
    ``{memory_format, embed_chunk, ms}``."""
    images = any(len(s.shape) == 3 for s in specs.values())
    timings = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        inputs = {m: (torch.randn(batch, *s.shape, device=device) if s.dtype.is_floating_point
                      else torch.randint(0, max(int(s.vocab or 2), 2), (batch, *s.shape), device=device))
                  for m, s in specs.items()}

        def race(candidates):
            nets = {}
            for fmt, chunk in candidates:
                net = copy.deepcopy(model).train()
                apply_layout(net, fmt, chunk, twice)
                if not chunk or chunkable(net):
                    nets[(fmt, chunk)] = net
            for r in range(repeats + 1):
                for key, net in nets.items():
                    t = _step(net, inputs, device)
                    if r:  # the first round is a warm-up
                        timings[key] = min(timings.get(key, float("inf")), t)
            return min(nets, key=timings.__getitem__)

        fmt, _ = race([(f, 0) for f in (["contiguous", "channels_last"] if images else ["contiguous"])])
        chunks = [c for c in CHUNKS if 2 * c <= batch] if device.type == "cpu" else []
        chunk = race([(fmt, 0)] + [(fmt, c) for c in chunks])[1] if chunks else 0
        if chunk and timings[(fmt, chunk)] > (1 - MARGIN) * timings[(fmt, 0)]:
            chunk = 0  # not clearly faster: whole batches (the simpler path)
    return {"memory_format": fmt, "embed_chunk": chunk,
            "ms": {f"{f}/{c or 'whole'}": round(t * 1000, 2) for (f, c), t in timings.items()}}


def choose(cfg, model: nn.Module, specs, batch: int, device: torch.device, twice: bool) -> Dict[str, object]:
    """``trainer.memory_format`` and ``trainer.embed_chunk`` resolved: as set, or (``auto``/null)
    from the cache or a new measurement."""
    from metamm_cli.data.cache import cache_dir

    T = cfg.trainer
    fmt, chunk = enum_name(T.get("memory_format", "auto")), T.get("embed_chunk")
    check_format(fmt)
    if device.type != "cpu" and chunk is None:
        chunk = 0  # pieces pay on CPU caches, not on GPUs
    if fmt != "auto" and chunk is not None:
        return {"memory_format": fmt, "embed_chunk": int(chunk)}
    key = hashlib.sha256(json.dumps([torch.__version__, _device_name(device), torch.get_num_threads(), repr(model),
                                     {m: [list(s.shape), str(s.dtype)] for m, s in specs.items()}, batch, twice,
                                     fmt, chunk]).encode()).hexdigest()[:20]
    path = Path(os.environ.get("METAMM_LAYOUT_CACHE") or cache_dir() / "autotune.json")
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if key in cached:
        return {k: cached[key][k] for k in ("memory_format", "embed_chunk")}
    started = time.perf_counter()
    found = measure(model, specs, batch, device, twice)
    if fmt != "auto":
        found["memory_format"] = fmt
    if chunk is not None:
        found["embed_chunk"] = int(chunk)
    log.info(f"layout: {found['memory_format']}, embed_chunk={found['embed_chunk'] or 'whole batch'} "
             f"(measured in {time.perf_counter() - started:.1f} s on {batch}-sample calls: {found['ms']}; cached in {path})")
    cached[key] = found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(found)}")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning(f"layout: could not cache the measurement in {path} ({e.strerror or e}); it will run again")
    return {k: found[k] for k in ("memory_format", "embed_chunk")}
