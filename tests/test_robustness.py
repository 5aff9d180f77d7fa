"""Robustness curves as a result, through the real CLI: `+sweep=robustness` trains every arm at
toy scale, `metamm compare --eval-set` evaluates the curve with every modality missing at once,
builds the per-modality ensemble from the single-modality runs, summarises each curve
(relative and effective robustness) and draws it; the recipe trains each class-scoring
algorithm; `metamm eval` reads an ensemble like any run."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import SMOKE, run_metamm

FAST = ["trainer.tensorboard=false", "trainer.max_steps=4", "trainer.val_every=4", "trainer.ckpt_every=4"]
CURVE = "curve=eval.missing_sweep=[0,0.5,1]"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("robust")
    run_metamm(["train", "-m", *SMOKE, "+sweep=robustness", *FAST], cwd)
    folder = next((cwd / "outputs" / "smoke" / "multiruns").iterdir())
    return cwd, folder


def test_robustness_sweep_compare_and_ensemble(sweep):
    cwd, folder = sweep
    jobs = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0].isdigit())
    arms = [j.split("_", 1)[1].split(",")[0] for j in jobs]
    assert arms == [f"+robust={a}" for a in ("presence", "impute", "late", "concat", "single_0", "single_1")]
    single = yaml.safe_load((folder / jobs[5] / "config.yaml").read_text())
    assert single["dataset"]["modalities"] == ["audio"]  # the position recorded as the name it stands for
    proc = run_metamm(["compare", str(folder), "--eval-set", CURVE, "--format", "json", "--plot", "r.png"], cwd)
    assert "per-modality ensemble of image, audio (seed 0)" in proc.stderr
    ensemble = folder / "ensemble_image+audio_seed0"
    assert (ensemble / "checkpoints" / "best.pt").is_file() and (ensemble / "ensemble.json").is_file()
    report = json.loads((ensemble / "eval-curve.json").read_text())
    assert set(report["missing_sweep"]) == {"all", "image", "audio"}
    table = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
    rows = {r["settings"]["robust"] if r["settings"]["robust"] != "-" else r["settings"]["fusion"]: r
            for r in table["rows"]}
    assert {"presence", "impute", "late", "concat", "ensemble"} <= set(rows)
    assert rows["late"]["metrics"]["effective_robustness"]["mean"] == pytest.approx(0.0)
    for name in ("presence", "impute", "concat", "ensemble"):
        run = rows[name]["runs"][0]
        curve = run["tests"]["curve"]["missing_sweep"]["all"]
        assert [p["rate"] for p in curve] == [0.0, 0.5, 1.0]
        area = 0.25 * (curve[0]["accuracy"] + curve[1]["accuracy"]) + 0.25 * (curve[1]["accuracy"] + curve[2]["accuracy"])
        assert rows[name]["metrics"]["robustness"]["mean"] == pytest.approx(area)
    assert rows["ensemble"]["status"] == "ensemble"
    assert (cwd / "r.png").stat().st_size > 0
    md = run_metamm(["compare", str(folder)], cwd).stdout  # no evaluation: the stored reports
    assert "robustness: accuracy with every modality missing" in md and "| - | ensemble |" in md


def test_an_ensemble_evaluates_like_a_run(sweep):
    cwd, folder = sweep
    run_metamm(["compare", str(folder), "--eval"], cwd)
    ensemble = folder / "ensemble_image+audio_seed0"
    proc = run_metamm(["eval", "--ckpt", str(ensemble), "missing.test.all=0.5"], cwd)
    assert "accuracy:" in proc.stdout + proc.stderr and "missing all 0.5" in proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [["+recipe=robust", "algorithm=matching"], ["+recipe=robust", "algorithm=relation"],
                                  ["+recipe=robust", "fusion=impute", "algorithm=maml", "algorithm.inner_steps=1"]])
def test_the_recipe_trains_at_toy_scale(args, tmp_path):
    proc = run_metamm(["train", *SMOKE, *args, *FAST, "missing.test.all=0.5"], tmp_path)
    metrics = json.loads((next(tmp_path.glob("outputs/smoke/runs/*")) / "metrics.json").read_text())
    assert metrics["step"] == 4 and 0 <= metrics["val_acc"] <= 100
    assert "final validation accuracy" in proc.stdout


@pytest.mark.parametrize("preset", ["omniglot_strokes_robust_5w1s", "avdigits_robust_5w1s"])
def test_the_recipe_preset_of_each_multimodal_benchmark_trains(preset, tmp_path):
    """The robust preset of each real two-modality set, at toy scale, evaluated with every
    modality missing at 0.5 (and a query and class left with nothing shared go across)."""
    from tests.test_datasets_real import DATA, FSDD, MNIST, OMNI

    if preset.startswith("omniglot") and not (OMNI / "strokes_background_small1.zip").is_file():
        pytest.skip(f"Omniglot stroke zips absent from {OMNI} (set METAMM_DATA)")
    if preset.startswith("avdigits") and (not (MNIST / "train-images-idx3-ubyte.gz").is_file() or not FSDD.is_dir()):
        pytest.skip(f"MNIST or FSDD absent from {DATA} (set METAMM_DATA)")
    root = OMNI if preset.startswith("omniglot") else DATA
    proc = run_metamm(["train", f"+exp={preset}", f"dataset.root={root}", "episode.way=3", "episode.query=2",
                       "encoder.dim=8", "encoder.image.hidden=8", "trainer.meta_batch=2", *FAST,
                       "trainer.progress=false", "missing.test.all=0.5", "missing.warmup=2"], tmp_path)
    run = next(tmp_path.glob(f"outputs/{preset}/runs/*"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["recipe"]["name"] == "robust" and cfg["fusion"]["_target_"].endswith("Presence")
    assert json.loads((run / "metrics.json").read_text())["step"] == 4
    assert "final validation accuracy" in proc.stdout
