"""The bad-input table: each row feeds the CLI one bad input and asserts a non-zero exit, one
line on stderr naming the culprit, no traceback, no run folder left behind and no partial file
where a good one stood. Rows run in-process (`metamm_cli.cli.main`), a second or less each.

Add a row: (id, argv, needles). ``{name}`` in argv or needles is replaced by a path from the
``paths`` fixture (checkpoints: good, truncated, foreign, ...; a broken --config-dir; a file
where a folder should be). A dataset with files on disk adds its rows to DATA_ROWS (a missing
root, a corrupted file), its corrupting step to ``paths``."""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, run_cli

from omegaconf import OmegaConf

from metamm_cli.runs.checkpoint import load_checkpoint
from metamm_cli.config import config_dir

TRAIN = ["train", "+exp=smoke", "trainer.progress=false"]
ROWS = [
    # config keys, options and values
    ("unknown key", TRAIN + ["episode.wya=3"], ["episode.wya", "EpisodeConfig"]),
    ("unknown option", TRAIN + ["fusion=nope"], ["fusion/nope", "attention, concat"]),
    ("unknown algorithm key", TRAIN + ["+algorithm.spread=2"],
     ["algorithm.spread: not a setting of algorithm ProtoNet", "distance, execution, temperature"]),
    ("enum value", TRAIN + ["trainer.on_nan=maybe"], ["trainer.on_nan", "stop, skip"]),
    ("wrong type", TRAIN + ["trainer.lr=fast"], ["trainer.lr=fast"]),
    ("wrong type bool", TRAIN + ["trainer.deterministic=perhaps"], ["trainer.deterministic"]),
    ("negative keep_last", TRAIN + ["trainer.keep_last=-1"], ["trainer.keep_last=-1", ">= 0"]),
    ("float overflow", TRAIN + ["trainer.lr=1e39"], ["trainer.lr=1e+39", "3e38"]),
    ("nan lr", TRAIN + ["trainer.lr=nan"], ["trainer.lr=nan", "> 0"]),
    ("empty modalities", TRAIN + ["dataset.modalities=[]"], ["dataset.modalities=[]", "at least one"]),
    ("unknown modality", TRAIN + ["dataset.modalities=[video]"], ["dataset.modalities", "video"]),
    ("impossible way", TRAIN + ["episode.way=126"], ["episode.way=126", "125 classes"]),
    ("impossible shot", TRAIN + ["episode.shot=6"], ["episode.shot+episode.query=9", "largest: 8"]),
    ("unknown device", TRAIN + ["trainer.device=tpu"], ["trainer.device=tpu", "auto, cpu, cuda"]),
    ("yaml syntax", ["train", "--config-dir", "{confdir}", "+exp=broken"], ["{confdir}/exp/broken.yaml:3", "flow"]),
    ("unwritable output", TRAIN + ["output_root={afile}/out"], ["{afile}"]),
    # resume
    ("resume nothing", TRAIN + ["trainer.resume=true"], ["trainer.resume=true", "no checkpoints/last.pt"]),
    ("resume a sweep that is not there", ["train", "-m", "+exp=smoke", "trainer.resume=true"],
     ["trainer.resume=true with -m", "no sweep of task 'smoke'"]),
    ("resume a run folder as a sweep", ["train", "-m", "+exp=smoke", "trainer.resume={afile}"],
     ["not a sweep folder", "drop -m"]),
    ("resume truncated", TRAIN + ["trainer.resume={truncated}"], ["{truncated}", "not a readable"]),
    ("resume other architecture", TRAIN + ["trainer.resume={otherarch}", "trainer.max_steps=2"],
     ["does not fit", "missing: model.fusion", "unexpected: model.fusion.bogus"]),
    ("resume older format", TRAIN + ["trainer.resume={older}"], ["format version 1", "older metamm"]),
    ("resume changes the model", TRAIN + ["trainer.resume={good}", "fusion=attention"],
     ["fusion=attention", "changes the model"]),
    # checkpoints given to eval
    ("eval truncated", ["eval", "--ckpt", "{truncated}"], ["{truncated}", "not a readable metamm checkpoint"]),
    ("eval text file", ["eval", "--ckpt", "{text}"], ["{text}", "not a readable metamm checkpoint"]),
    ("eval foreign torch file", ["eval", "--ckpt", "{foreign}"], ["{foreign}", "not a metamm checkpoint"]),
    ("eval newer format", ["eval", "--ckpt", "{newer}"], ["format version 99", "upgrade metamm"]),
    ("eval non-finite weights", ["eval", "--ckpt", "{nan}"], ["{nan}", "not finite", "diverged"]),
    ("eval other architecture", ["eval", "--ckpt", "{good}", "fusion=attention"], ["do not fit", "missing:"]),
]
DATA_ROWS: list = []  # datasets with files: (id, argv, needles) for a corrupted file, ...
for _yaml in sorted((Path(config_dir()) / "dataset").glob("*.yaml")):  # every dataset read from a root
    if "root" in (OmegaConf.load(_yaml) or {}):
        DATA_ROWS.append((f"missing root {_yaml.stem}", ["train", f"dataset={_yaml.stem}",
                                                         "dataset.root=/no/such/root"], ["/no/such/root"]))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from metamm_cli.train import train

    d = tmp_path_factory.mktemp("bad")
    train(compose_cfg(["+exp=smoke", "trainer.max_steps=1", "trainer.val_every=1", "trainer.val_episodes=2",
                       "trainer.tensorboard=false"]), run_dir=d / "run")
    good = d / "run" / "checkpoints" / "last.pt"
    raw = torch.load(good, weights_only=True)
    out = {"good": good, "truncated": d / "truncated.pt", "text": d / "text.pt", "foreign": d / "foreign.pt",
           "newer": d / "newer.pt", "older": d / "older.pt", "nan": d / "nan.pt", "otherarch": d / "other.pt",
           "afile": d / "a_file", "confdir": d / "conf"}
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["text"].write_text("not a checkpoint\n")
    out["afile"].write_text("a file, not a folder\n")
    torch.save({"weights": torch.zeros(2)}, out["foreign"])
    torch.save({**raw, "version": 99}, out["newer"])
    torch.save({**raw, "version": 1}, out["older"])
    poisoned = {k: v.clone() for k, v in raw["model"].items()}
    first = next(k for k, v in poisoned.items() if v.is_floating_point())
    poisoned[first].fill_(float("nan"))
    torch.save({**raw, "model": poisoned}, out["nan"])
    other = {k: v for k, v in raw["model"].items() if ".fusion." not in f".{k}"}
    other["model.fusion.bogus"] = torch.zeros(1)
    torch.save({**raw, "model": other}, out["otherarch"])
    (out["confdir"] / "exp").mkdir(parents=True)
    (out["confdir"] / "exp" / "broken.yaml").write_text("# @package _global_\ntask_name: broken\n"
                                                        "episode: {way: [3, 4}\n")
    return out


def digest(paths):
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items() if p.is_file()}


@pytest.mark.parametrize("row", ROWS + DATA_ROWS, ids=[r[0] for r in ROWS + DATA_ROWS])
def test_bad_input(row, paths, tmp_path, monkeypatch, capsys):
    _, argv, needles = row
    fill = lambda s: s.format(**{k: str(v) for k, v in paths.items()})  # noqa: E731
    before = digest(paths)
    code, out, err = run_cli([fill(a) for a in argv], monkeypatch, capsys, tmp_path)
    assert code not in (0, None), (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    for needle in map(fill, needles):
        assert needle in lines[0], (needle, lines[0])
    assert not lines[0].endswith(("(", ":", " ")), lines[0]  # never an empty or cut reason
    assert not list(tmp_path.glob("outputs/*/runs/*")), "a failed start left a run folder"
    assert digest(paths) == before  # no good file touched
    assert not list(paths["good"].parent.glob(".*.tmp"))


def test_full_disk_keeps_the_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A write that fails (ENOSPC) midway: one line naming the file and the cause; the last good
    last.pt stays whole and no temporary is left."""
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 8:
            calls["n"] += 1
        if calls["n"] == 2:  # step 8's last.pt (after its best.pt)
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    code, out, err = run_cli(TRAIN + ["trainer.tensorboard=false", "trainer.val_every=100"], monkeypatch,
                             capsys, tmp_path)
    assert code != 0 and "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    assert "No space left on device (ENOSPC)" in err and "checkpoints/last.pt" in err
    ckpts = next(Path(tmp_path).glob("outputs/smoke/runs/*/checkpoints"))
    assert load_checkpoint(ckpts / "last.pt")["step"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "last.pt"]


def test_ctrl_c_during_start_up_is_one_line(tmp_path, monkeypatch, capsys):
    import metamm_cli.train as tr

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "build_algorithm", interrupted)
    code, out, err = run_cli(TRAIN, monkeypatch, capsys, tmp_path)
    assert code == 130 and err.strip() == "metamm train: interrupted during start-up; nothing was saved"
    assert "Traceback" not in out + err and not list(tmp_path.glob("outputs/*/runs/*"))
