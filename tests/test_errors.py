"""Every bad input ends in one line on stderr that names the key or file and what is allowed,
a non-zero exit and no traceback (HYDRA_FULL_ERROR=1 brings the traceback back)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_cli, run_metamm

from metamm_cli.config import config_dir

TRAIN = ["train", *SMOKE]
CASES = [
    (TRAIN + ["fusion=nope"], ["fusion/nope", ", ".join(sorted(p.stem for p in Path(config_dir()).glob("fusion/*.yaml")))]),
    (TRAIN + ["encoder/image=nope"], ["encoder/image/nope", "conv4, mlp"]),
    (TRAIN + ["+exp=nope"], ["exp/nope", "smoke"]),
    (TRAIN + ["episode.way=0"], ["episode.way=0", ">= 2"]),
    (TRAIN + ["episode.shot=-1"], ["episode.shot=-1", ">= 1"]),
    (TRAIN + ["episode.query=0"], ["episode.query=0", ">= 1"]),
    (TRAIN + ["episode.way=126"], ["episode.way=126", "train split has 125 classes"]),
    (TRAIN + ["episode.shot=6"], ["episode.shot+episode.query=9", "largest: 8"]),
    (TRAIN + ["episode.way=abc"], ["episode.way=abc", "Integer"]),
    (TRAIN + ["trainer.max_steps=1.5"], ["trainer.max_steps=1.5", "Integer"]),
    (TRAIN + ["episode.wya=3"], ["episode.wya", "not in 'EpisodeConfig'"]),
    (TRAIN + ["trainer.device=tpu"], ["trainer.device=tpu", "auto, cpu, cuda"]),
    (TRAIN + ["trainer.amp=fp8"], ["trainer.amp=fp8", "none, bf16, fp16"]),
    (TRAIN + ["dataset.modalities=[smell]"], ["dataset.modalities", "'image', 'audio', 'tokens'"]),
    (TRAIN + ["trainer.resume=/no/such.pt"], ["trainer.resume /no/such.pt", "no such file"]),
    (["eval"], ["--ckpt is required"]),
    (["eval", "--ckpt"], ["--ckpt needs a path"]),
    (["eval", "--ckpt", "/no/such.pt"], ["--ckpt /no/such.pt", "no such file"]),
    (["frobnicate"], ["unknown command 'frobnicate'", "train, eval, data"]),
    (["data", "dataset.codes={train: 1}"], ["dataset.codes", ">= 2"]),
    (TRAIN + ["trainer.threads=0"], ["trainer.threads=0", "null or >= 1"]),
    # a key the target does not take, or a required one unset: named, with what is allowed
    (TRAIN + ["+dataset.bogus=1"], ["dataset.bogus: not a setting of dataset SyntheticMultimodal", "samples_per_class"]),
    (TRAIN + ["+fusion.bogus=1"], ["fusion.bogus: not a setting of fusion Concat"]),
    (TRAIN + ["dataset=folder"], ["dataset.root must be set"]),
    (["train", "+exp=omniglot_protonet_5w1s", "dataset=folder", "dataset.root=."],
     ["+exp=omniglot_protonet_5w1s is a preset for dataset=omniglot, not dataset=folder"]),
]
if not torch.cuda.is_available():
    CASES.append((TRAIN + ["trainer.device=cuda"], ["trainer.device=cuda", "auto or cpu"]))


def assert_one_line_error(proc, needles):
    assert proc.returncode not in (0, None)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(c[0][2:] or c[0]) for c in CASES])
def test_bad_input_is_one_line(tmp_path, args, needles, monkeypatch, capsys):
    """In-process through the CLI's entry point (a Python start-up per row would triple the time)."""
    code, out, err = run_cli(args, monkeypatch, capsys, tmp_path)
    assert_one_line_error(subprocess.CompletedProcess(args, code, out, err), needles)
    assert not list(tmp_path.glob("outputs/*/runs/*/checkpoints"))  # nothing half-made
    assert not list(tmp_path.glob("outputs/*/runs/*"))  # a failed start leaves no run folder


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_eval_rejects_foreign_files(tmp_path, content):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)  # a torch file, but not metamm's
        needles = ["not a metamm checkpoint"]
    else:
        path.write_bytes(content)
        needles = ["not a readable metamm checkpoint"]
    assert_one_line_error(run_metamm(["eval", "--ckpt", path], tmp_path, check=False),
                          [f"--ckpt {path}", *needles])
    unreadable = tmp_path / "folder"
    unreadable.mkdir()
    assert_one_line_error(run_metamm(["eval", "--ckpt", unreadable], tmp_path, check=False),
                          ["without checkpoints/best.pt"])


def test_eval_way_mismatch_for_learned_maml_head(tmp_path):
    ok = run_metamm(TRAIN + ["algorithm=maml", "trainer.max_steps=1", "trainer.val_every=1"], tmp_path)
    run_dir = ok.stdout.split("run directory: ")[1].splitlines()[0]
    proc = run_metamm(["eval", "--ckpt", f"{run_dir}/checkpoints/last.pt", "episode.way=4"],
                      tmp_path, check=False)
    assert_one_line_error(proc, ["episode.way=4", "algorithm.head=zero"])


def test_full_error_shows_traceback(tmp_path):
    proc = run_metamm(TRAIN + ["episode.way=0"], tmp_path, env={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
