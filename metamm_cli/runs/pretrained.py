"""``encoder.init=RUN_OR_CKPT``: start a fresh run's encoders (the body) from another run's
weights, whatever algorithm either used (pre-train with ``algorithm=pretrain``, then meta-train
with any algorithm).

The encoder tensors of the checkpoint (keys ``...encoders.<modality>.<name>``, under any
algorithm's wrapping) are copied into this model's encoders where the name and the shape agree;
everything else (fusion, mapping, heads) starts fresh. BatchNorm running statistics come along
where this algorithm keeps them (the MAML family normalises with batch statistics and has none).
One log line reports what was loaded and what was not; a checkpoint sharing no encoder tensor
with this model is refused."""
from __future__ import annotations

from typing import Dict

import torch

from metamm_cli import ConfigError
from metamm_cli.runs.checkpoint import load_checkpoint


def encoder_tensors(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{"<modality>.<name>": tensor}`` of the encoder entries of a model state dict."""
    return {k.split("encoders.", 1)[1]: v for k, v in weights.items() if "encoders." in k}


def load_body(algo: torch.nn.Module, source: str) -> str:
    """Copy the checkpoint's encoder tensors into ``algo.model.encoders``; the report line."""
    key = "encoder.init"
    state = load_checkpoint(source, key=key, prefer="best.pt")
    theirs = encoder_tensors(state.get("model") or {})
    mine = algo.model.encoders.state_dict()
    same = {k: v for k, v in theirs.items() if k in mine and tuple(v.shape) == tuple(mine[k].shape)}
    shaped = sorted(k for k in theirs if k in mine and k not in same)
    absent = sorted(k for k in mine if k not in theirs)
    if not any(v.dim() > 0 for v in same.values()):  # counters (num_batches_tracked) alone do not fit
        example = f" (e.g. {shaped[0]}: {list(theirs[shaped[0]].shape)} there, {list(mine[shaped[0]].shape)} here)" \
            if shaped else ""
        raise ConfigError(f"{key}={source}: no encoder tensor of {state['path']} fits this model "
                          f"({len(theirs)} there, {len(mine)} here){example}; same encoders and encoder.dim?")
    algo.model.encoders.load_state_dict({**mine, **same})
    parts = [f"{key}: loaded {len(same)} of this model's {len(mine)} encoder tensors from {state['path']} "
             f"(step {state.get('step', '?')})"]
    if shaped:
        parts.append(f"{len(shaped)} of another shape left fresh (e.g. {shaped[0]})")
    if absent:
        parts.append(f"{len(absent)} absent there left fresh (e.g. {absent[0]})")
    unused = len([k for k in theirs if k not in mine])
    if unused:
        parts.append(f"{unused} of its tensors unused (e.g. BatchNorm statistics this algorithm does not keep)")
    return "; ".join(parts) + "; fusion and heads start fresh"
