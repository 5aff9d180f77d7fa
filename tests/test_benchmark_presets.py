"""The benchmark presets (+exp=benchmarks/NAME, configs/exp/benchmarks/): each records its
published number and source, and takes one training step, one validation and one test on a tiny
copy of its set written in every layout the set is read from (tests/fewshot_files.py), through
the CLI's own entry point; the pre-train -> meta-train recipe end to end through the real
executable. Sizes are shrunk (16 px, widths of 4-8, one query) but the presets' algorithms,
backbones, readouts, pipelines, schedules and optimizers are kept."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import compose_cfg, run_cli, run_dir_of, run_metamm

import fewshot_files as F
from metamm_cli.config import check_ranges, config_dir

BENCH = Path(config_dir()) / "exp" / "benchmarks"
PRESETS = sorted(p.stem for p in BENCH.glob("*.yaml") if not p.stem.startswith("_"))
LAYOUTS = {"mini_imagenet": ["l2l", "csv", "metaoptnet", "closer"], "tiered_imagenet": ["l2l", "metaoptnet"],
           "cifar_fs": ["metaoptnet", "folders"], "fc100": ["metaoptnet", "folders"], "cub": ["raw"]}
# The published numbers (percent) each preset must record.
PUBLISHED = {
    "closer_protonet_mini_5w1s": 44.42, "closer_protonet_mini_5w5s": 64.24, "closer_maml_mini_5w1s": 46.47,
    "closer_maml_mini_5w5s": 62.71, "closer_baselinepp_mini_5w1s": 48.24, "closer_baselinepp_mini_5w5s": 66.43,
    "closer_protonet_cub_5w1s": 51.31, "closer_protonet_cub_5w5s": 70.77, "closer_maml_cub_5w1s": 55.92,
    "closer_maml_cub_5w5s": 72.09, "closer_baselinepp_cub_5w1s": 60.53, "closer_baselinepp_cub_5w5s": 79.34,
    "metaoptnet_protonet_mini_5w1s": 59.25, "metaoptnet_protonet_mini_5w5s": 75.60,
    "metaoptnet_protonet_tiered_5w1s": 61.74, "metaoptnet_protonet_tiered_5w5s": 80.00,
    "metaoptnet_protonet_cifar_fs_5w1s": 72.2, "metaoptnet_protonet_cifar_fs_5w5s": 83.5,
    "metaoptnet_protonet_fc100_5w1s": 37.5, "metaoptnet_protonet_fc100_5w5s": 52.5,
}
UNPUBLISHED = ["cub_am3_protonet_5w1s", "cub_robust_protonet_5w1s", "cub_multimodal_protonet_5w1s", "cub_multimodal_protonet_5w5s",
               "pretrain_resnet12_mini", "pretrained_protonet_mini_5w1s", "pretrained_protonet_mini_5w5s"]
STEP = ["trainer.max_steps=1", "trainer.val_every=1", "trainer.val_episodes=1", "trainer.log_every=1",
        "trainer.ckpt_every=1", "trainer.progress=false", "trainer.tensorboard=false", "eval.episodes=1",
        "episode.query=1", "eval.query=1", "dataset.image_size=16", "encoder.dim=8"]


def tiny(preset: str) -> list:
    """Overrides that shrink a preset's network to test size, keeping its kind."""
    resnet = compose_cfg([f"+exp=benchmarks/{preset}"]).encoder.image._target_.endswith("ResNet12")
    out = ["encoder.image.widths=[4,4,8,8]"] if resnet else ["encoder.image.hidden=8"]
    out += ["encoder.vector.hidden=8", "encoder.tokens.hidden=8", "encoder.tokens.embed=4"] \
        if preset.startswith("cub_") else []
    out += ["fusion.hidden=8"] if "am3" in preset else []
    if preset.startswith("pretrain_"):
        out += ["algorithm.batch_size=16"]
    return out


def dataset_of(preset: str) -> str:
    return compose_cfg([f"+exp=benchmarks/{preset}"]).preset.datasets[0]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Every set in every layout (6 images per class: 5-shot + 1 query), written on first use."""
    made = {}

    def get(dataset: str, layout: str) -> Path:
        if (dataset, layout) not in made:
            root = tmp_path_factory.mktemp(f"{dataset}_{layout}")
            if dataset == "mini_imagenet":
                F.write_mini(root / "d", layout, per_class=6)
            elif dataset == "tiered_imagenet":
                F.write_tiered(root / "d", layout, per_class=6)
            elif dataset in ("cifar_fs", "fc100"):
                F.write_cifar(root / "d", "CIFAR_FS" if dataset == "cifar_fs" else "FC100", layout, per_class=6)
            else:
                F.write_cub(root, per_class=6)
                made[(dataset, layout)] = root
                return root
            made[(dataset, layout)] = root / "d"
        return made[(dataset, layout)]
    return get


def test_every_preset_records_its_paper_or_says_it_has_none():
    assert sorted(PRESETS) == sorted([*PUBLISHED, *UNPUBLISHED])
    for name in PRESETS:
        cfg = compose_cfg([f"+exp=benchmarks/{name}"])
        assert cfg.preset.name == f"benchmarks/{name}" and cfg.task_name == f"bench_{name}"
        if name in PUBLISHED:
            assert cfg.preset.paper.accuracy == PUBLISHED[name], name
            way, shot = name.rsplit("_", 1)[1].split("w")
            assert f"{way}-way {shot[:-1]}-shot" in cfg.preset.paper.source, name
            assert cfg.trainer.test and cfg.eval.episodes >= 600, name
            assert (cfg.eval.way, cfg.eval.shot) == (int(way), int(shot[:-1])), name
        else:
            assert cfg.preset.paper is None, name


def test_presets_say_what_they_are():
    """The protocols in the YAML: Conv4 flattened to 1600-d at 84 px for CloserLook's; ResNet-12
    without pooling, SGD Nesterov with MetaOptNet's schedule, pad-and-crop for MetaOptNet's."""
    closer = compose_cfg(["+exp=benchmarks/closer_protonet_mini_5w1s"])
    assert closer.encoder.dim == 1600 and closer.encoder.image.readout == "flatten"
    assert closer.dataset.image_size == 84 and closer.dataset.augment.crop == "resized"
    assert closer.dataset.augment.test_resize == 1.15 and (closer.episode.way, closer.episode.query) == (5, 16)
    mo = compose_cfg(["+exp=benchmarks/metaoptnet_protonet_cifar_fs_5w5s"])
    assert mo.encoder.image._target_.endswith("ResNet12") and mo.encoder.dim == 2560  # 640 x 2 x 2 at 32 px
    assert mo.trainer.nesterov and mo.trainer.optimizer.value == "sgd" and list(mo.trainer.factors) == [0.06, 0.012, 0.0024]
    assert mo.dataset.augment.crop == "pad" and mo.dataset.augment.pad == 4 and mo.trainer.meta_batch == 8
    baseline = compose_cfg(["+exp=benchmarks/closer_baselinepp_cub_5w1s"])
    assert baseline.algorithm.head == "cosine" and baseline.algorithm.train_batch == 16
    with pytest.raises(Exception, match="preset for dataset=cub"):
        check_ranges(compose_cfg(["+exp=benchmarks/closer_protonet_cub_5w1s", "dataset=mini_imagenet"]))


CASES = [(p, layout) for p in PRESETS if not p.startswith("pretrained_")
         for layout in LAYOUTS[dataset_of(p)]]


@pytest.mark.parametrize("preset,layout", CASES)
def test_one_step_of_each_preset_on_each_layout(preset, layout, copies, tmp_path, monkeypatch, capsys):
    root = copies(dataset_of(preset), layout)
    monkeypatch.setenv("METAMM_CACHE", str(root.parent / "cache"))
    code, out, err = run_cli(["train", f"+exp=benchmarks/{preset}", f"dataset.root={root}", *STEP, *tiny(preset)],
                             monkeypatch, capsys, tmp_path)
    assert code == 0, err
    assert "test accuracy:" in out and f"{layout} layout" in out
    run = Path(out.split("run directory: ")[1].splitlines()[0])
    assert json.loads((run / "eval.json").read_text())["accuracy"] >= 0


def test_pretrain_then_meta_train_end_to_end(copies, tmp_path):
    """Stage 1 (+exp=benchmarks/pretrain_resnet12_mini: minibatch classification), then stage 2
    (+exp=benchmarks/pretrained_protonet_mini_5w1s) from its body, through the real executable;
    the second run reports what it loaded, and refuses to start without encoder.init."""
    root = copies("mini_imagenet", "l2l")
    env = {"METAMM_CACHE": str(root.parent / "cache")}
    first = run_metamm(["train", "+exp=benchmarks/pretrain_resnet12_mini", f"dataset.root={root}", *STEP,
                        *tiny("pretrain_resnet12_mini")], tmp_path, env=env)
    pre = tmp_path / run_dir_of(first)
    assert (pre / "checkpoints" / "best.pt").is_file()
    args = ["train", "+exp=benchmarks/pretrained_protonet_mini_5w1s", f"dataset.root={root}", *STEP,
            *tiny("pretrained_protonet_mini_5w1s")]
    missing = run_metamm(args, tmp_path, env=env, check=False)
    assert missing.returncode != 0 and "encoder.init must be set" in missing.stderr
    second = run_metamm(args + [f"encoder.init={pre}"], tmp_path, env=env)
    log = (tmp_path / run_dir_of(second) / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "encoder.init:" in ln)
    assert re.search(r"loaded (\d+) of this model's \1 encoder tensors from .*best\.pt", line), line


def test_multimodal_cub_with_missing_modalities_and_retrieval(copies, tmp_path, monkeypatch, capsys):
    """The multimodal CUB preset trains with modality dropout, then `metamm eval` ranks images by
    captions (cross-modal retrieval) and scores episodes with captions missing half the time."""
    root = copies("cub", "raw")
    monkeypatch.setenv("METAMM_CACHE", str(root.parent / "cache"))
    code, out, err = run_cli(["train", "+exp=benchmarks/cub_multimodal_protonet_5w1s", f"dataset.root={root}", *STEP,
                              *tiny("cub_multimodal_protonet_5w1s"), "+missing.train.attributes=0.5"],
                             monkeypatch, capsys, tmp_path)
    assert code == 0, err
    run = out.split("run directory: ")[1].splitlines()[0]
    code, out, err = run_cli(["eval", "--ckpt", run, "eval.task=retrieval", "eval.query_modality=text",
                              "eval.gallery_modality=image"], monkeypatch, capsys, tmp_path)
    assert code == 0 and "retrieval on the test split" in out, err
    code, out, err = run_cli(["eval", "--ckpt", run, "+missing.test.text=0.5", "eval.episodes=2"],
                             monkeypatch, capsys, tmp_path)
    assert code == 0 and "accuracy" in out, err
