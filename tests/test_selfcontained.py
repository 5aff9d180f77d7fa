"""Numbers a researcher can take at face value, through the real CLI: a checkpoint carries the
preprocessing it was trained with (editing the train files changes no test accuracy, and says
so in one warning line), and a non-finite loss caused by the data names the data, not the
learning rate."""
from __future__ import annotations

import json

import numpy as np
from conftest import run_dir_of, run_metamm
from test_datasets_user import TINY, make_folder


def accuracy_line(proc):
    return next(ln for ln in proc.stdout.splitlines() if ln.startswith("accuracy: "))


def test_editing_train_files_changes_no_test_accuracy(tmp_path):
    root = make_folder(tmp_path / "data", split_layout=True, classes=9, per_class=4)
    run = run_dir_of(run_metamm(["train", "dataset=folder", f"dataset.root={root}", *TINY,
                                 "trainer.max_steps=4"], tmp_path))
    before = run_metamm(["eval", "--ckpt", run, "eval.episodes=30"], tmp_path)
    # the vocabulary came from the train split: new words there, and a new training class
    for f in (root / "train").glob("*/*.txt"):
        f.write_text(f.read_text() + " zebra quokka")
    new = root / "train" / "c_new"
    new.mkdir()
    for src in (root / "train" / "c0").iterdir():
        (new / src.name).write_bytes(src.read_bytes())
    after = run_metamm(["eval", "--ckpt", run, "eval.episodes=30"], tmp_path)
    assert accuracy_line(after) == accuracy_line(before)  # the stored vocabulary, class lists, ...
    warnings = [ln for ln in after.stdout.splitlines() + after.stderr.splitlines() if "data changed" in ln]
    assert len(warnings) == 1 and "train split" in warnings[0], after.stdout + after.stderr
    assert "data changed" not in before.stdout + before.stderr


def test_data_that_overflows_is_named_as_the_cause_of_a_nan_loss(tmp_path):
    """Finite but huge feature values (1e30) overflow to inf inside the network: the divergence
    guard names the rows, not the learning rate."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 4)  # train classes 0-5, val 6-8, test 9-11
    vector = rng.normal(size=(len(labels), 4)).astype(np.float32)
    split = np.array(["train"] * 24 + ["val"] * 12 + ["test"] * 12)
    vector[labels < 3] *= 1e30  # classes 0-2 of the train split
    np.savez(tmp_path / "f.npz", labels=labels, split=split, vector=vector)
    proc = run_metamm(["train", "dataset=features", f"dataset.path={tmp_path / 'f.npz'}", "episode.way=3",
                       "episode.shot=1", "episode.query=2", "trainer.max_steps=4", "trainer.log_every=1",
                       "trainer.progress=false", "trainer.tensorboard=false", "task_name=features"],
                      tmp_path, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "caused by its inputs: vector of row" in err and "f.npz holds values up to " in err, err
    assert "e+29" in err or "e+30" in err, err
    assert "not a learning-rate problem" in err and "lower trainer.lr" not in err
    assert not list(tmp_path.glob("outputs/features/runs/*"))  # a failed start: no folder


def test_eval_of_a_checkpoint_whose_files_are_gone_names_the_class(tmp_path):
    root = make_folder(tmp_path / "data", split_layout=True, classes=9, per_class=4)
    run = run_dir_of(run_metamm(["train", "dataset=folder", f"dataset.root={root}", *TINY,
                                 "trainer.max_steps=2"], tmp_path))
    for f in (root / "test" / "c2").iterdir():
        f.unlink()
    (root / "test" / "c2").rmdir()
    proc = run_metamm(["eval", "--ckpt", run], tmp_path, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "'c2'" in err and "test" in err, err
    report = list(tmp_path.glob("outputs/evals/*/eval.json"))
    assert not report or "accuracy" not in json.loads(report[0].read_text())
