"""The trainer loop called as a function: interruption, chunked meta-batches."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import compose_cfg

from metamm_cli.data.episodes import EpisodeSampler
from hydra.utils import instantiate

from metamm_cli.algorithms import build_algorithm
from metamm_cli.train import meta_backward, train

FAST = ["+exp=smoke", "trainer.tensorboard=false"]


def test_interrupt_saves_a_resumable_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) during step 6 finishes that step, then saves it: no half-done step."""
    real_sample, calls = EpisodeSampler.sample, {"n": 0}

    def sample(self, tasks=None, part=None):
        if self.split.num_classes == 125:  # the training sampler (smoke: 5**3 train classes)
            calls["n"] += 1
            if calls["n"] == 6:
                os.kill(os.getpid(), signal.SIGINT)
        return real_sample(self, tasks, part)

    monkeypatch.setattr(EpisodeSampler, "sample", sample)
    with pytest.raises(SystemExit) as stop:
        train(compose_cfg(FAST), run_dir=tmp_path / "a")
    assert stop.value.code == 130
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6 and calls["n"] == 6
    assert not (tmp_path / "a" / "RUNNING").exists()
    monkeypatch.setattr(EpisodeSampler, "sample", real_sample)
    metrics = train(compose_cfg(FAST + [f"trainer.resume={tmp_path / 'a'}"]), run_dir=tmp_path / "b")
    assert metrics["step"] == 8 and metrics["resumed_from"].endswith("last.pt")
    assert (tmp_path / "b" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "b" / "config.yaml").read_text().count("way: 3") == 1


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_task_chunks_give_the_same_gradient(algorithm):
    """Chunking the meta-batch changes only memory (ProtoNet's BatchNorm sees one chunk at a time,
    so it is compared with the encoders in eval mode)."""
    cfg = compose_cfg(FAST + [f"algorithm={algorithm}"])
    torch.manual_seed(0)
    dataset = instantiate(cfg.dataset, _convert_="all")
    algo = build_algorithm(cfg, dataset).double()
    if algorithm == "protonet":
        algo.eval()
    episode = EpisodeSampler(dataset.split("train"), 3, 1, 3, 4).sample()
    for part in (episode.support, episode.query):
        for m, x in part.items():
            part[m] = x.double() if x.is_floating_point() else x
    grads = []
    for chunk in (4, 1, 3):
        algo.zero_grad()
        loss_sum, acc_sum = meta_backward(algo, episode, chunk)
        grads.append([p.grad.clone() for p in algo.parameters() if p.grad is not None])
        assert 0 <= acc_sum.item() <= 400 and loss_sum.item() > 0
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_mixed_precision_trains(tmp_path, amp, algorithm, caplog):
    """autocast (and fp16's GradScaler) on whatever device is here; the CPU in CI."""
    caplog.set_level("INFO", logger="metamm")
    metrics = train(compose_cfg(FAST + [f"algorithm={algorithm}", f"trainer.amp={amp}",
                                        "trainer.max_steps=2", "trainer.val_every=2"]),
                    run_dir=tmp_path)
    assert metrics["step"] == 2 and 0 <= metrics["val_acc"] <= 100
    assert metrics["train_loss"] is not None and metrics["train_loss"] == metrics["train_loss"]  # not NaN
    assert f"(amp {amp}, " in caplog.text
    if metrics["device"] == "cpu":
        assert f"trainer.amp={amp} on the CPU" in caplog.text


def test_resume_with_a_foreign_sampler_state_warns(tmp_path, caplog):
    """A checkpoint from another device carries a generator state that does not fit this one."""
    from metamm_cli.runs.checkpoint import load_checkpoint, save_checkpoint
    train(compose_cfg(FAST + ["trainer.max_steps=2", "trainer.val_every=2"]), run_dir=tmp_path / "a")
    state = load_checkpoint(tmp_path / "a")
    state["rng"]["sampler"] = torch.zeros(16, dtype=torch.uint8)  # e.g. a CUDA generator's state
    save_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt", {k: v for k, v in state.items()
                                                                 if k not in ("format", "version", "path")})
    over = ["trainer.max_steps=4", f"trainer.resume={tmp_path / 'a'}"]
    metrics = train(compose_cfg(FAST + over), run_dir=tmp_path / "b", overrides=over)
    assert metrics["step"] == 4 and "another device" in caplog.text


def test_compile_gives_the_eager_results_and_refuses_per_task_adaptation(tmp_path):
    """trainer.compile=true (the aot_eager backend: torch.compile's graph capture and autograd,
    no code generation, seconds on CPU) trains to the same numbers as eager; MAML, whose per-task
    programs differentiate twice, is refused in one line."""
    from metamm_cli import ConfigError

    over = FAST + ["trainer.threads=1", "trainer.tensorboard=false"]
    eager = train(compose_cfg(over), run_dir=tmp_path / "eager")
    compiled = train(compose_cfg(over + ["trainer.compile=true", "trainer.compile_backend=aot_eager"]),
                     run_dir=tmp_path / "compiled")
    assert compiled["val_acc"] == pytest.approx(eager["val_acc"], abs=1e-4)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="trainer.compile=true: MAML .*second order"):
        train(compose_cfg(over + ["algorithm=maml", "trainer.compile=true"]), run_dir=tmp_path / "maml")


def test_profile_writes_a_trace_into_the_runs_tensorboard(tmp_path):
    """trainer.profile=true: torch.profiler's trace of steps 3-5, where TensorBoard's profiler
    tab reads it (the run's TensorBoard folder)."""
    from metamm_cli.runs.record import tb_folder

    train(compose_cfg(FAST + ["trainer.profile=true", "trainer.threads=1"]), run_dir=tmp_path)
    traces = list(tb_folder(tmp_path).glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    import json
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name") == "ProfilerStep#3" for e in events)
