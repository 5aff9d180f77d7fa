"""Atomic checkpoints, the 95% interval, and eval's override merge."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from metamm_cli import ConfigError
from metamm_cli.runs.checkpoint import load_checkpoint, save_checkpoint
from metamm_cli.evaluate import apply_overrides, mean_ci95


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crash(obj, f, *a, **k):  # dies halfway through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_load_rejects_other_versions(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"step": 0})
    state = torch.load(path, weights_only=True)
    torch.save({**state, "version": 99}, path)
    with pytest.raises(ConfigError, match="version 99"):
        load_checkpoint(path)


def test_mean_ci95_matches_formula():
    rng = np.random.default_rng(0)
    accs = rng.uniform(40, 90, size=600)
    out = mean_ci95(torch.tensor(accs))
    assert out["episodes"] == 600
    assert math.isclose(out["accuracy"], accs.mean(), rel_tol=1e-9)
    assert math.isclose(out["ci95"], 1.96 * accs.std(ddof=1) / math.sqrt(600), rel_tol=1e-9)
    assert mean_ci95(torch.tensor([50.0]))["ci95"] == 0.0


def test_eval_overrides_apply_to_checkpoint_config():
    from omegaconf import OmegaConf
    stored = OmegaConf.to_container(compose_cfg(["+exp=smoke", "fusion=attention"]),
                                    resolve=True, enum_to_str=True)
    overrides = ["episode.way=4", "eval.episodes=7", "trainer.device=cpu", "encoder/image=mlp"]
    cfg = compose_cfg(overrides + ["+ckpt=x.pt"], name="eval")
    merged = apply_overrides(stored, cfg, overrides + ["+ckpt=x.pt"])
    assert merged.episode.way == 4 and merged.episode.shot == 1  # smoke's shot kept
    assert merged.fusion._target_.endswith("Attention")  # the checkpoint's fusion, not the default
    assert merged.encoder.image._target_.endswith("MLP") and merged.encoder.dim == 16
    assert merged.eval.episodes == 7
    with pytest.raises(ConfigError, match="exp"):
        apply_overrides(stored, cfg, ["+exp=smoke"])


def test_checkpoint_guards(tmp_path):
    """Non-finite weights are never written; orphans of a killed write go; old/new formats say which."""
    path = tmp_path / "last.pt"
    (tmp_path / ".last.pt.abc.tmp").write_bytes(b"half")
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(ConfigError, match="non-finite model tensors .*w"):
        save_checkpoint(path, {"step": 2, "model": {"w": torch.tensor([1.0, float("nan")])}})
    assert load_checkpoint(path)["step"] == 1
    state = torch.load(path, weights_only=True)
    torch.save({**state, "version": 1}, path)
    assert load_checkpoint(path)["step"] == 1  # eval reads format 1 ...
    with pytest.raises(ConfigError, match="format version 1 .*older metamm"):
        load_checkpoint(path, key="trainer.resume", versions=(2,))  # ... resuming needs 2


def test_keep_last_keeps_the_newest(tmp_path):
    from metamm_cli.runs.checkpoint import keep_last
    for step in (4, 8, 12):
        (tmp_path / "last.pt").write_bytes(str(step).encode())
        keep_last(tmp_path, step, 2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000008.pt", "step_00000012.pt"]
    assert (tmp_path / "step_00000012.pt").read_bytes() == b"12"
