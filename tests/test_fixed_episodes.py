"""Fixed-episode evaluation through the real CLI: a MAML smoke run trained on a tiny folder
dataset, then `metamm eval --ckpt RUN eval.episodes_file=F` with episodes of different way/shot,
a masked modality, and each bad input as one line with a non-zero exit."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_dir_of, run_metamm
from metamm_cli import ConfigError
from metamm_cli.data.folder import FolderDataset
from metamm_cli.fixed_episodes import EpisodeBuilder, load_episodes_file
from test_datasets_user import TINY, make_folder


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fixed")
    root = make_folder(tmp / "data", split_layout=True, classes=9, per_class=3)
    proc = run_metamm(["train", "dataset=folder", f"dataset.root={root}", "algorithm=maml", *TINY], tmp)
    return {"tmp": tmp, "root": root, "run": tmp / run_dir_of(proc)}


def sample(label, stem, **drop):
    """A sample of the tiny folder dataset; s0 has no .wav, ``drop`` leaves out more modalities."""
    if stem == "s0":
        drop["audio"] = 1
    files = {"image": f"{label}/{stem}.png", "audio": f"{label}/{stem}.wav",
             "tokens": f"{label}/{stem}.txt", "vector": f"{label}/{stem}.npy"}
    return {"label": label, **{m: f for m, f in files.items() if m not in drop}}


def episodes_json(tmp, episodes, root="data/test"):
    path = tmp / f"episodes_{len(list(tmp.glob('episodes_*.json')))}.json"
    path.write_text(json.dumps({"root": root, "episodes": episodes}))
    return path


def test_episodes_file_cli(folder_run):
    tmp = folder_run["tmp"]
    episodes = [  # 2-way 1-shot (s0 has no .wav: audio masked), 2-way 2-shot with a text-less query
        {"support": [sample("c2", "s0"), sample("c5", "s0")],
         "query": [sample("c2", "s1"), sample("c5", "s2"), sample("c5", "s1")]},
        {"support": [sample("c5", "s1"), sample("c8", "s1"), sample("c5", "s2"), sample("c8", "s2")],
         "query": [sample("c8", "s0", tokens=1), sample("c5", "s0")]},
    ]
    f = episodes_json(tmp, episodes)
    proc = run_metamm(["eval", "--ckpt", folder_run["run"], f"eval.episodes_file={f}"], tmp)
    report = json.loads(next((tmp / "outputs" / "evals").glob("*/eval.json")).read_text())
    accs = report["episode_accuracies"]
    assert len(accs) == 2 and report["episodes"] == 2
    # per-episode accuracy in steps of the episode's query count
    assert round(accs[0] * 3 / 100, 6).is_integer() and round(accs[1] * 2 / 100, 6).is_integer()
    assert report["accuracy"] == pytest.approx(sum(accs) / 2)
    # the file's own setting (2-way, 1-2 shots), not the checkpoint's episode.* keys
    assert (f"accuracy: {report['accuracy']:.2f} +- {report['ci95']:.2f} (95% CI, 2 episodes; 2 fixed episodes, "
            f"2-way 1-2-shot 1-1.5-query, chance 50.00%)") in proc.stdout, proc.stdout
    assert report["setting"].startswith("2 fixed episodes, 2-way")


def test_episode_builder_masks_and_decodes(folder_run):
    root = folder_run["root"]
    ds = FolderDataset(str(root), image={"size": 8}, audio={"n_mels": 8, "frames": 8, "n_fft": 64, "hop": 32},
                       tokens={"length": 6})
    f = episodes_json(folder_run["tmp"], [{"support": [sample("c2", "s0"), sample("c5", "s1", image=1)],
                                           "query": [sample("c5", "s2")]}])
    r, eps = load_episodes_file(str(f))
    assert r == f.parent / "data" / "test"
    ep = EpisodeBuilder(ds, r, "cpu", "k").episode(eps[0], 0)
    assert ep.support_present.tolist() == [[[True, False, True, True], [False, True, True, True]]]
    assert ep.support["image"][0, 1].abs().sum() == 0 and ep.support["image"].dtype == torch.float32
    test = ds.split("test")  # the same decoder as the split builder
    names = [d.name for d in ds.class_dirs["test"]]
    row = [i for i, (c, files) in enumerate(ds.samples["test"])
           if names[c] == "c5" and files["image"].stem == "s2"][0]
    assert torch.allclose(ep.query["image"][0, 0], test.data["image"][row].float() / 255)
    assert torch.equal(ep.query["tokens"][0, 0], test.data["tokens"][row])
    assert ep.support_labels.tolist() == [[0, 1]] and ep.query_labels.tolist() == [[1]]


def test_episodes_file_errors(folder_run):
    tmp, run = folder_run["tmp"], folder_run["run"]
    ok = [sample("c2", "s0"), sample("c5", "s0")]
    cases = [
        ([{"support": ok, "query": [sample("c2", "s9")]}], "file not found: ", "c2/s9.png"),
        ([{"support": ok + [sample("c8", "s0")], "query": [sample("c2", "s1")]}],
         "episode 0 (3-way)", "trained for 2-way"),
        ([{"support": ok, "query": [sample("c8", "s1")]}], "query label 'c8' is absent", "support"),
    ]
    for episodes, says, also in cases:
        f = episodes_json(tmp, episodes)
        proc = run_metamm(["eval", "--ckpt", run, f"eval.episodes_file={f}"], tmp, check=False)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and len(err.splitlines()) == 1, err
        assert says in err and also in err and str(f) in err
    with pytest.raises(ConfigError, match="no such file"):
        load_episodes_file(str(tmp / "nope.json"))
    (tmp / "null_root.json").write_text(json.dumps({"root": None, "episodes": [{"support": ok, "query": ok}]}))
    assert load_episodes_file(str(tmp / "null_root.json"))[0] == tmp  # null: the file's folder, not 'None'
    (tmp / "bad_root.json").write_text(json.dumps({"root": 3, "episodes": [{"support": ok, "query": ok}]}))
    with pytest.raises(ConfigError, match='"root" must be a folder path'):
        load_episodes_file(str(tmp / "bad_root.json"))
    (tmp / "bad.json").write_text('{"episodes": [{"support": []}]}')
    with pytest.raises(ConfigError, match="non-empty 'support' and 'query'"):
        load_episodes_file(str(tmp / "bad.json"))
