"""The Python API (metamm_cli/api.py): docs/api.md's examples run as they are written; train()
makes the CLI's run folder, twice in one process; load() and evaluate() give `metamm eval`'s
accuracy; the wrappers on plain tensors compute what the algorithms compute in training."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SMOKE, compose_cfg, run_cli
from metamm_cli import ConfigError, api
from metamm_cli.algorithms import build_algorithm
from metamm_cli.data.base import build_dataset
from metamm_cli.data.episodes import build_sampler
from metamm_cli.evaluate import evaluate
from metamm_cli.runs import layout

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SHORT = [*SMOKE, "trainer.max_steps=2"]


def doc_blocks():
    """(first line, code) of every ```python block of docs/api.md, in order."""
    text = DOC.read_text()
    return [(text[:m.start(1)].count("\n") + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def test_docs_examples_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks()
    assert len(blocks) >= 10
    namespace = {}
    for line, code in blocks:  # tracebacks name docs/api.md and its line
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)


def test_every_public_name_is_documented():
    text = DOC.read_text()
    missing = [name for name in api.__all__ if f"api.{name}" not in text and f"`{name}`" not in text]
    assert not missing, f"docs/api.md does not mention: {missing}"


def files(run_dir: Path):
    """A run folder's files, TensorBoard event files by their folder only (their names hold
    the time, host and process)."""
    return sorted(str(p.relative_to(run_dir)) if "tfevents" not in p.name else str(p.parent.relative_to(run_dir))
                  for p in run_dir.rglob("*") if p.is_file())


def test_two_trains_in_one_process_make_the_cli_run_folder(tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    code, out, _ = run_cli(["train", *SHORT, "output_root=cli"], monkeypatch, capsys, tmp_path)
    assert code == 0
    cli = tmp_path / next(ln for ln in out.splitlines() if ln.startswith("run directory: ")).split(": ", 1)[1]
    cli_info = json.loads((cli / layout.RUN_INFO).read_text())
    handlers, level = logging.getLogger().handlers[:], logging.getLogger().level
    runs = [api.train(*SHORT, output_root=tmp_path / "api") for _ in range(2)]
    assert runs[0].run_dir != runs[1].run_dir
    for run in runs:
        assert run.run_dir.parent == tmp_path / "api" / "smoke" / "runs"
        assert files(run.run_dir) == files(cli)
        assert json.loads((run.run_dir / layout.METRICS).read_text()) == run.metrics
        assert run.metrics["step"] == 2 and run.metrics["val_acc"] is not None
        info = json.loads((run.run_dir / layout.RUN_INFO).read_text())
        assert sorted(info) == sorted(cli_info) and info["choices"] == cli_info["choices"]
        assert "val acc" in (run.run_dir / layout.LOG).read_text()  # train.log, as the CLI writes it
        config = (run.run_dir / layout.CONFIG).read_text()
        assert config.replace(str(tmp_path / "api"), "cli") == (cli / layout.CONFIG).read_text()
    assert logging.getLogger().handlers == handlers and logging.getLogger().level == level  # put back
    assert not GlobalHydra.instance().is_initialized()
    api.compose(*SMOKE)  # and Hydra works on


def test_train_a_config_object_as_it_is(tmp_path):
    cfg = api.compose(*SHORT)
    cfg.encoder.dim = 8
    run = api.train(cfg, "seed=2", output_root=tmp_path)
    stored = compose_cfg([*SHORT, "encoder.dim=8", "seed=2", f"output_root={tmp_path}"])
    from omegaconf import OmegaConf
    assert OmegaConf.load(run.run_dir / layout.CONFIG) == OmegaConf.create(OmegaConf.to_yaml(stored))
    info = json.loads((run.run_dir / layout.RUN_INFO).read_text())
    assert info["choices"] == {} and info["overrides"][0] == "seed=2"


def test_train_resumes_a_run_in_its_folder(tmp_path):
    first = api.train(*SHORT, output_root=tmp_path)
    more = api.train(*SMOKE, "trainer.max_steps=4", f"trainer.resume={first.run_dir}", output_root=tmp_path)
    assert more.run_dir == first.run_dir and more.metrics["step"] == 4
    assert len(json.loads((first.run_dir / layout.RUN_INFO).read_text())["resumes"]) == 1


def test_a_failed_start_raises_one_line_and_leaves_no_folder(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^episode.way=100 is impossible"):
        api.train(*SMOKE, "episode.way=100", output_root=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "Error executing job" not in capsys.readouterr().err


@pytest.mark.parametrize("call, says", [
    (lambda: api.compose("episode.wya=5"), "episode.wya"),
    (lambda: api.compose("fusion=nope"), "available: am3"),
    (lambda: api.train("-m", "seed=0,1"), "'-m' is not a key=value override"),
    (lambda: api.load("no/such/run"), "ckpt no/such/run: no such file"),
    (lambda: api.episodes(*SMOKE, split="dev"), "split='dev': must be one of train, val, test"),
    (lambda: api.episodes(*SMOKE, tasks=0), "tasks=0"),
    (lambda: api.FewShot("nope", nn.Identity()), "choose one of align, anil"),
    (lambda: api.ProtoNet(nn.Identity(), distance="l3"), "algorithm.distance=l3: must be one of"),
    (lambda: api.FewShot("relation", nn.Identity()), "dim: this algorithm builds layers"),
    (lambda: api.FewShot("maml", nn.Identity(), dim=4), "way: algorithm maml builds a layer per class"),
    (lambda: api.MAML(nn.Identity(), head="zero"), "head=zero: a head of MAML's own needs dim=D"),
    (lambda: api.ProtoNet(nn.Identity())(torch.randn(4, 3), torch.tensor([0, 0, 2, 2]), torch.randn(2, 3)),
     "support_labels: class ids must be 0..N-1"),
    (lambda: api.ProtoNet(nn.Identity())(torch.randn(3, 3), torch.tensor([0, 0, 1, 1]), torch.randn(2, 3)),
     "support: one sample per support label"),
    (lambda: api.ProtoNet(nn.Identity()).adapt(torch.randn(4, 3), torch.tensor([0, 0, 1, 1])),
     "adapt: ProtoNet has no inner loop"),
])
def test_bad_input_is_one_line_naming_it(call, says):
    with pytest.raises(ConfigError) as e:
        call()
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return api.train(*SHORT, output_root=root)


def test_load_and_evaluate_give_metamm_evals_accuracy(trained, tmp_path, monkeypatch, capsys):
    code, _, _ = run_cli(["eval", "--ckpt", trained.run_dir, "eval.episodes=20", f"output_root={tmp_path / 'cli'}"],
                         monkeypatch, capsys, tmp_path)
    assert code == 0
    cli = json.loads(next((tmp_path / "cli" / "evals").glob(f"*/{layout.eval_file()}")).read_text())
    report = api.evaluate(trained.run_dir, "eval.episodes=20", output_root=tmp_path / "api")
    assert (report["accuracy"], report["ci95"], report["setting"]) == (cli["accuracy"], cli["ci95"], cli["setting"])
    assert json.loads(next((tmp_path / "api" / "evals").glob(f"*/{layout.eval_file()}")).read_text())["accuracy"] \
        == report["accuracy"]
    loaded = api.load(trained.run_dir, "eval.episodes=20")
    assert not loaded.algorithm.training and loaded.model is loaded.algorithm.model
    assert loaded.checkpoint["path"].endswith(layout.BEST)
    V = loaded.config.eval
    assert evaluate(loaded.algorithm, loaded.sampler(), V.episodes, V.tasks_per_batch)["accuracy"] == cli["accuracy"]


def test_episodes_follow_the_config_and_its_seed():
    train = api.episodes(*SMOKE, "episode.shot=2", tasks=3)
    a = train.sample()
    assert (a.num_tasks, a.way) == (3, 3) and a.support_labels.shape == (3, 6) and a.query_labels.shape == (3, 9)
    assert set(a.support) == {"image", "audio", "tokens"}
    train.reset()
    assert torch.equal(train.sample().index, a.index)
    assert not torch.equal(api.episodes(*SMOKE, "episode.shot=2", tasks=3, seed=1).sample().index, a.index)
    test = api.episodes(*SMOKE, "eval.way=2", "dataset.modalities=[audio]", split="test").sample()
    assert test.way == 2 and set(test.support) == {"audio"}


# -- the wrappers against the algorithms run through their normal path -----------------------------

def normal_path(algorithm: str):
    """An algorithm as training builds it (one image modality, fused by mean) and an episode of
    two tasks from its sampler."""
    cfg = compose_cfg([*SMOKE, f"algorithm={algorithm}", "dataset.modalities=[image]", "fusion=mean"])
    dataset = build_dataset(cfg.dataset)
    algo = build_algorithm(cfg, dataset)
    return cfg, algo, build_sampler(cfg, dataset, "train", torch.device("cpu"), 2, 0).sample()


def own_parameters(algo):
    """The algorithm's weights beyond its network (a relation module, MAML's head)."""
    return {k: v for k, v in algo.state_dict().items() if not k.startswith(("model.", "net.model."))}


@pytest.mark.parametrize("algorithm", ["protonet", "matching", "relation", "maml", "anil"])
def test_fewshot_on_plain_tensors_computes_the_algorithm(algorithm):
    cfg, algo, episode = normal_path(algorithm)
    model = api.FewShot(algorithm, algo.model.encoders["image"], way=cfg.episode.way, dim=cfg.encoder.dim)
    model.algorithm.load_state_dict({**model.algorithm.state_dict(), **own_parameters(algo)})
    sx, qx, sy, qy = episode.support["image"], episode.query["image"], episode.support_labels, episode.query_labels
    loss, logits = algo(episode)
    plain_loss, plain_logits = model.run(sx, sy, qx, qy)
    torch.testing.assert_close(plain_logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(sx[1], sy[1], qx[1]), logits[1], rtol=1e-6, atol=1e-6)
    if algo.inner_loop:  # adapt(), then the queries: the same logits
        torch.testing.assert_close(model.adapt(sx[0], sy[0])(qx[0]), logits[0], rtol=1e-5, atol=1e-5)


def test_maml_adapt_gives_the_second_order_meta_gradient_of_training():
    _, algo, episode = normal_path("maml")
    net = nn.Sequential(algo.model.encoders["image"], algo.net.head)  # the model with its head: logits
    params = list(net.parameters())
    loss, logits = algo(episode)
    expected = torch.autograd.grad(loss, params)

    def meta_gradient(maml):
        losses = []
        for t in range(episode.num_tasks):
            learner = maml.adapt(episode.support["image"][t], episode.support_labels[t])
            out = learner(episode.query["image"][t])
            torch.testing.assert_close(out, logits[t], rtol=1e-5, atol=1e-5)
            losses.append(F.cross_entropy(out, episode.query_labels[t]))
        return torch.autograd.grad(torch.stack(losses).mean(), params)

    second = meta_gradient(api.MAML(net, lr=algo.inner_lr, steps=algo.inner_steps))
    for g, e in zip(second, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    first = meta_gradient(api.MAML(net, lr=algo.inner_lr, steps=algo.inner_steps, first_order=True))
    assert any(not torch.allclose(f, s) for f, s in zip(first, second))  # second order by default


def test_maml_on_a_model_with_its_own_head_takes_any_way():
    torch.manual_seed(0)
    maml = api.MAML(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), lr=0.5, steps=2)
    support, labels, query = torch.randn(4, 4), torch.tensor([0, 1, 0, 1]), torch.randn(3, 4)
    learner = maml.adapt(support, labels)
    assert set(learner.params) == {k for k, _ in maml.algorithm.net.named_parameters()}
    torch.testing.assert_close(learner(query), maml(support, labels, query))
    maml.eval()  # eval mode: inner_steps_eval (= steps) and no graph needed
    with torch.no_grad():
        assert maml(support, labels, query).shape == (3, 2)
