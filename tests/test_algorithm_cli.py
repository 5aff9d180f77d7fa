"""Every algorithm learns through the real CLI: `metamm train -m +exp=smoke algorithm=A,B,...` at
a small budget (Hydra's basic launcher runs the jobs one after the other in one process, so the
start-up is paid once per group of algorithms sharing their overrides), then its checkpoint,
reloaded and evaluated on the test split's unseen classes, beats chance (3-way: 33.3%) by a clear
margin; evaluation at another way works where the method allows it and is refused in one line
(`metamm eval`) where it does not."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SMOKE, compose_cfg, run_metamm

from metamm_cli import ConfigError
from metamm_cli.config import config_dir
from metamm_cli.evaluate import evaluate_checkpoint

ALGORITHMS = sorted(p.stem for p in Path(config_dir()).glob("algorithm/*.yaml"))
BUDGET = ["trainer.max_steps=16", "trainer.meta_batch=4", "trainer.val_every=1000",
          "trainer.ckpt_every=1000", "trainer.log_every=1000", "trainer.tensorboard=false",
          "trainer.val_episodes=10"]
EXTRA = {"reptile": ("algorithm.inner_steps_eval=10",),  # the paper's 50 test-time steps: slow on CPU
         # loss=mse (the paper's default) stays near chance at this budget; CE learns
         "relation": ("algorithm.loss=ce", "trainer.max_steps=40"),
         # learned edges and label routing: the GNN leaves chance after ~20 steps
         "gnn": ("trainer.max_steps=40",)}
ANY_WAY = {"protonet", "matching", "relation", "siamese", "hypernet", "finetune", "pretrain", "align"}
# align trains on the InfoNCE alignment of a sample's modalities alone: on the synthetic set the
# modalities name independent codes, so it cannot learn the class there (tests/test_crossmodal.py
# checks it against its definition and through the CLI); here it must train, save and evaluate.
NO_CLASS_SIGNAL = {"align"}
FIXED_WAY = {"gnn": "episode.way=3", "maml": "algorithm.head=zero", "fomaml": "algorithm.head=zero",
             "anil": "algorithm.head=zero", "metasgd": "episode.way=3",  # no zero head: its lrs are per weight
             "reptile": "algorithm.head=zero"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{algorithm: its job folder}: one multirun per group of algorithms with the same overrides."""
    groups = {}
    for a in ALGORITHMS:
        groups.setdefault(EXTRA.get(a, ()), []).append(a)
    runs = {}
    for extra, algos in groups.items():
        cwd = tmp_path_factory.mktemp("train")
        run_metamm(["train", "-m", *SMOKE, f"algorithm={','.join(algos)}", *BUDGET, *extra], cwd)
        for metrics in (cwd / "outputs").glob("smoke/multiruns/*/*/metrics.json"):
            run_dir = metrics.parent
            overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
            runs[re.search(r"algorithm=(\w+)", overrides).group(1)] = run_dir
        assert set(algos) <= set(runs), (algos, sorted(runs))
    return runs


def evaluate(run_dir, out_dir, *overrides):
    """`metamm eval --ckpt RUN_DIR OVERRIDES` in process: the checkpoint's config + the overrides."""
    quoted = "'" + str(run_dir).replace("\\", "\\\\").replace("'", "\\'") + "'"  # as cli.py does
    cfg = compose_cfg([*overrides, f"+ckpt={quoted}"], name="eval")
    return evaluate_checkpoint(cfg, list(overrides), out_dir)


def test_every_algorithm_is_trained(trained):
    assert sorted(trained) == ALGORITHMS
    assert set(FIXED_WAY) | ANY_WAY == set(ALGORITHMS)  # a new algorithm must say which it is


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_learns_through_the_cli(algorithm, trained, tmp_path):
    metrics = json.loads((trained[algorithm] / "metrics.json").read_text())
    steps = int(dict(o.split("=") for o in [*BUDGET, *EXTRA.get(algorithm, ())])["trainer.max_steps"])
    assert metrics["step"] == steps
    report = evaluate(trained[algorithm], tmp_path, "eval.episodes=40", "eval.tasks_per_batch=20")
    assert report["split"] == "test" and report["episodes"] == 40
    if algorithm not in NO_CLASS_SIGNAL:
        assert report["accuracy"] > 100 / 3 + 10, (report["accuracy"], metrics)
    if algorithm in ANY_WAY:
        two = evaluate(trained[algorithm], tmp_path, "episode.way=2", "eval.episodes=10")
        assert 0 <= two["accuracy"] <= 100 and two["config"]["episode"]["way"] == 2
    else:
        with pytest.raises(ConfigError, match=re.escape("episode.way=2")) as err:
            evaluate(trained[algorithm], tmp_path, "episode.way=2", "eval.episodes=10")
        assert re.search(FIXED_WAY[algorithm], str(err.value)) and "\n" not in str(err.value)


@pytest.mark.parametrize("algorithm", ["gnn", "maml"])
def test_fixed_way_eval_at_another_way_is_refused_in_one_line(algorithm, trained, tmp_path):
    bad = run_metamm(["eval", "--ckpt", trained[algorithm], "episode.way=2", "eval.episodes=10"],
                     tmp_path, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "episode.way=2" in bad.stderr and re.search(FIXED_WAY[algorithm], bad.stderr)
