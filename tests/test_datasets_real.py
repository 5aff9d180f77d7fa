"""Real-data loaders (omniglot, omniglot_strokes, avdigits), the decode functions against their
definitions on tiny files made here, the cache, the download path (file://) and bad input."""
from __future__ import annotations

import math
import os
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metamm_cli import ConfigError
from metamm_cli.data import decode as D
from tests.conftest import run_metamm

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("METAMM_DATA", REPO.parent / "shared" / "data"))
OMNI, MNIST, FSDD = DATA / "omniglot", DATA / "mnist", DATA / "fsdd" / "recordings"
need_omniglot = pytest.mark.skipif(not (OMNI / "images_background.zip").is_file(),
                                   reason=f"Omniglot zips absent from {OMNI} (set METAMM_DATA)")
need_strokes = pytest.mark.skipif(not (OMNI / "strokes_background_small1.zip").is_file(),
                                  reason=f"Omniglot stroke zips absent from {OMNI} (set METAMM_DATA)")
need_av = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file() or not FSDD.is_dir(),
                             reason=f"MNIST or FSDD absent from {DATA} (set METAMM_DATA)")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One cache folder for the session: each real set is decoded once across tests."""
    return tmp_path_factory.mktemp("metamm-cache")


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000, width: int = 2) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2" if width == 2 else np.uint8).tobytes())


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# -- decode functions against their definitions ------------------------------------------------
def test_decode_image_matches_pillow_lanczos(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", arr)
    x = D.decode_image(tmp_path / "a.png", 20, 1)
    ref = np.asarray(Image.fromarray(arr).convert("L").resize((20, 20), Image.Resampling.LANCZOS))
    assert x.dtype == torch.uint8 and x.shape == (1, 20, 20)
    assert torch.equal(x[0], torch.from_numpy(ref.copy()))
    assert torch.equal(D.decode_image(tmp_path / "a.png", 20, 1, invert=True), 255 - x)
    rgb = D.decode_image(tmp_path / "a.png", None, 3)
    assert rgb.shape == (3, 30, 40) and torch.equal(rgb.permute(1, 2, 0), torch.from_numpy(arr))


def test_decode_wav_pcm16_and_pcm8(tmp_path):
    s16 = np.array([0, 16384, -32768, 32767, -1], dtype=np.int64)
    write_wav(tmp_path / "a.wav", s16, 8000, 2)
    x, rate = D.decode_wav(tmp_path / "a.wav")
    assert rate == 8000 and torch.allclose(x, torch.tensor(s16 / 32768.0, dtype=torch.float32))
    s8 = np.array([128, 255, 0, 192], dtype=np.int64)
    write_wav(tmp_path / "b.wav", s8, 16000, 1)
    x, rate = D.decode_wav(tmp_path / "b.wav")
    assert rate == 16000 and torch.allclose(x, torch.tensor((s8 - 128) / 128.0, dtype=torch.float32))


def test_log_mel_matches_direct_computation():
    rate, n_fft, hop, n_mels, frames = 8000, 64, 16, 10, 40
    t = np.arange(500) / rate
    sig = np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1500 * t)
    got = D.log_mel(torch.tensor(sig, dtype=torch.float32), rate, n_fft, hop, n_mels, frames)
    # definition: reflect-pad n_fft/2, periodic Hann frames every hop, |DFT|^2, triangular HTK mel filters
    x = np.pad(sig, n_fft // 2, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n = 1 + (len(x) - n_fft) // hop
    power = np.stack([np.abs(np.fft.rfft(x[i * hop:i * hop + n_fft] * win)) ** 2 for i in range(n)], 1)
    mel = lambda f: 2595 * math.log10(1 + f / 700)
    inv = lambda m: 700 * (10 ** (m / 2595) - 1)
    pts = [inv(mel(0) + k * (mel(rate / 2) - mel(0)) / (n_mels + 1)) for k in range(n_mels + 2)]
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        for k in range(n_fft // 2 + 1):
            f = k * rate / n_fft
            if pts[m] <= f <= pts[m + 1]:
                fb[m, k] = (f - pts[m]) / (pts[m + 1] - pts[m])
            elif pts[m + 1] < f <= pts[m + 2]:
                fb[m, k] = (pts[m + 2] - f) / (pts[m + 2] - pts[m + 1])
    ref = np.log(fb @ power + 1e-6)
    assert got.shape == (1, n_mels, frames) and n < frames
    assert np.allclose(got[0, :, :n].numpy(), ref, atol=1e-3)
    assert torch.allclose(got[0, :, n:], torch.tensor(math.log(1e-6)))  # silence padding
    assert D.log_mel(torch.tensor(sig, dtype=torch.float32), rate, n_fft, hop, n_mels, 5).shape == (1, n_mels, 5)


def test_decode_strokes_arc_length_resampling(tmp_path):
    # an L: (0,0)->(30,0) then, as a second stroke, (30,-10)->(30,-40); total pen length 60
    text = "START\n0,0,0\n30,0,100\nBREAK\n30,-10,200\n30,-40,300\nBREAK\n"
    (tmp_path / "s.txt").write_text(text)
    s = D.decode_strokes(tmp_path / "s.txt", 13)
    assert s.shape == (13, 3) and s.dtype == torch.float32
    assert s[:, 2].tolist() == [1] + [0] * 5 + [1] + [0] * 6  # pen down at each stroke start
    xy = s[:, :2].numpy()
    assert np.allclose(xy.mean(0), 0, atol=1e-6) and np.isclose(np.abs(xy).max(), 1.0)
    step = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    within = np.r_[step[:5], step[7:]]  # equal spacing along each stroke (5 units of the path)
    assert np.allclose(within, within[0], atol=1e-5)
    with pytest.raises(ConfigError, match="bad.txt"):
        D.decode_strokes(b"START\nnot numbers\n", 8, name="bad.txt")


def test_corrupted_files_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00")
    with pytest.raises(ConfigError, match=r"bad\.png: not a readable image"):
        D.decode_image(tmp_path / "bad.png", 28)
    with pytest.raises(ConfigError, match=r"bad\.wav: not a WAV file"):
        D.decode_wav(tmp_path / "bad.wav")


def test_strokes_gru_is_a_gru_and_vmaps():
    from torch.func import functional_call, vmap

    from metamm_cli.data.episodes import ModalitySpec
    from metamm_cli.models.encoders import StrokesConv, StrokesGRU

    torch.manual_seed(0)
    enc = StrokesGRU(ModalitySpec((6, 3)), dim=4, hidden=5)
    x = torch.randn(2, 6, 3)
    cell = torch.nn.GRUCell(3, 5)
    cell.load_state_dict({"weight_ih": enc.inp.weight, "bias_ih": enc.inp.bias,
                          "weight_hh": enc.rec.weight, "bias_hh": enc.rec.bias})
    inp = torch.cat([torch.zeros(2, 1, 2), x[:, 1:, :2] - x[:, :-1, :2]], 1)
    inp = torch.cat([inp, x[:, :, 2:]], -1)
    h, hs = torch.zeros(2, 5), []
    for t in range(6):
        h = cell(inp[:, t], h)
        hs.append(h)
    assert torch.allclose(enc(x), enc.out(torch.stack(hs).mean(0)), atol=1e-5)
    for e in (enc, StrokesConv(ModalitySpec((16, 3)), dim=4, hidden=4).eval()):
        xs = torch.randn(3, 2, 6 if e is enc else 16, 3)
        params = {k: v.expand(3, *v.shape).clone() for k, v in e.named_parameters()}
        y = vmap(lambda p, b: functional_call(e, p, (b,)))(params, xs)
        assert torch.allclose(y[1], e(xs[1]), atol=1e-5)


# -- omniglot on tiny files made here: layout, errors, download ----------------------------------
def tiny_omniglot(root: Path, alphabets=("A", "B", "C"), chars=2, drawers=4, zipped=True) -> Path:
    rng = np.random.default_rng(1)
    cid = 0
    for top, alphas in (("images_background", alphabets), ("images_evaluation", ("E", "F"))):
        for a in alphas:
            for c in range(1, chars + 1):
                cid += 1
                for d in range(1, drawers + 1):
                    arr = np.where(rng.random((105, 105)) < 0.9, 255, 0).astype(np.uint8)
                    write_png(root / top / a / f"character{c:02d}" / f"{cid:04d}_{d:02d}.png", arr)
        if zipped:
            with zipfile.ZipFile(root / f"{top}.zip", "w") as z:
                for p in sorted((root / top).rglob("*")):
                    z.write(p, p.relative_to(root))
    return root


def test_omniglot_lake_on_tiny_zips_and_folders(tmp_path):
    from metamm_cli.data.omniglot import Omniglot

    tiny_omniglot(tmp_path)
    for zipped in (True, False):
        src = tmp_path if not zipped else tmp_path / "z"
        if zipped:
            src.mkdir()
            for top in ("images_background", "images_evaluation"):
                os.link(tmp_path / f"{top}.zip", src / f"{top}.zip")
        ds = Omniglot(str(src), split="lake", val_alphabets=["B"], cache_dir=str(tmp_path / "c"))
        tr, va, te = (ds.split(s) for s in ("train", "val", "test"))
        assert (tr.num_classes, va.num_classes, te.num_classes) == (4, 2, 4)
        assert tr.data["image"].shape == (16, 1, 28, 28) and tr.data["image"].dtype == torch.uint8
        assert torch.equal(tr.class_counts(), torch.full((4,), 4))
        # same pixels as decoding the file directly with the dataset's preprocessing
        first = sorted((tmp_path / "images_background" / "A" / "character01").glob("*.png"))[0]
        assert torch.equal(tr.data["image"][0], ds.decode("image", str(first)))
    rot = Omniglot(str(tmp_path / "z"), split="lake", val_alphabets=["B"], rotations=[0, 90],
                   cache=False).split("train")
    x, lab = rot.data["image"], rot.labels  # class 2c + 1 is class 2c turned by 90 degrees
    assert rot.num_classes == 8 and torch.equal(x[lab == 1], torch.rot90(x[lab == 0], 1, (-2, -1)))


def test_omniglot_download_via_file_url_checks_md5(tmp_path):
    from metamm_cli.data.omniglot import Omniglot, md5sum

    src = tiny_omniglot(tmp_path / "src")
    md5 = {t: md5sum(src / f"{t}.zip") for t in ("images_background", "images_evaluation")}
    root = tmp_path / "dl"
    with pytest.raises(ConfigError, match="MD5"):
        Omniglot(str(root), split="lake", val_alphabets=["B"], download=True,
                 url=src.as_uri(), md5={**md5, "images_background": "0" * 32})
    assert not (root / "images_background.zip").exists()
    ds = Omniglot(str(root), split="lake", val_alphabets=["B"], download=True, url=src.as_uri(),
                  md5=md5, cache=False)
    assert (root / "images_background.zip").is_file() and ds.split("test").num_classes == 4


def test_omniglot_bad_input_is_one_line(tmp_path):
    proc = run_metamm(["data", "dataset=omniglot", f"dataset.root={tmp_path / 'none'}"], tmp_path, check=False)
    one_line_error(proc, "images_background.zip", "dataset.download=true")
    bad = tmp_path / "bad"
    bad.mkdir()
    with zipfile.ZipFile(bad / "images_background.zip", "w") as z:
        z.writestr("readme.txt", "not omniglot")
    (bad / "images_evaluation.zip").write_bytes((bad / "images_background.zip").read_bytes())
    proc = run_metamm(["data", "dataset=omniglot", f"dataset.root={bad}"], tmp_path, check=False)
    one_line_error(proc, "images_background.zip", "not an Omniglot")
    tiny = tiny_omniglot(tmp_path / "tiny", zipped=False)
    victim = next((tiny / "images_background" / "A").rglob("*.png"))
    victim.write_bytes(b"\x89PNG\r\n\x1a\ncorrupted")
    proc = run_metamm(["data", "dataset=omniglot", f"dataset.root={tiny}", "dataset.split=lake",
                       "dataset.val_alphabets=[B]", "dataset.cache=false", "episode.way=2",
                       "episode.query=1"], tmp_path, check=False)
    one_line_error(proc, victim.name, "not a readable image")


# -- the real files ------------------------------------------------------------------------------
@need_omniglot
def test_omniglot_vinyals_counts_via_cli(tmp_path, cache):
    proc = run_metamm(["data", "dataset=omniglot", f"dataset.root={OMNI}"], tmp_path,
                      env={"METAMM_CACHE": str(cache)})
    rows = {ln.split()[0]: ln.split()[1:4] for ln in proc.stdout.splitlines() if ln.split()[:1] in
            (["train"], ["val"], ["test"])}
    assert rows == {"train": ["4112", "82240", "20"], "val": ["688", "13760", "20"],
                    "test": ["1692", "33840", "20"]}
    assert "image[1, 28, 28]" in proc.stdout and list(cache.glob("omniglot-*.pt"))
    for top, n in (("images_background", 19280), ("images_evaluation", 13180)):  # progress lines
        assert f"decoding {n} images of {OMNI / top}.zip" in proc.stdout
        assert f"decoded {n} images of {OMNI / top}.zip in " in proc.stdout


@need_strokes
def test_omniglot_strokes_real(cache):
    from metamm_cli.data.omniglot_strokes import OmniglotStrokes

    ds = OmniglotStrokes(str(OMNI), cache_dir=str(cache))
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    assert [splits[s].num_classes for s in splits] == [155, 41, 46]
    assert sum(len(d.labels) for d in splits.values()) == 4840
    tr = splits["train"]
    assert tr.data["image"].shape[1:] == (1, 28, 28) and tr.data["strokes"].shape[1:] == (64, 3)
    assert bool((tr.class_counts() == 20).all())
    s = tr.data["strokes"]
    assert float(s[..., :2].abs().amax(dim=(1, 2)).min()) == pytest.approx(1.0)
    assert bool((s[:, :, 2].sum(1) >= 1).all())  # every drawing has a pen-down mark


@need_av
def test_avdigits_protocols_real(cache):
    from metamm_cli.data.avdigits import AVDigits

    ds = AVDigits(str(DATA), cache_dir=str(cache))
    tr, va, te = (ds.split(s) for s in ("train", "val", "test"))
    assert (tr.num_classes, va.num_classes, te.num_classes) == (5, 5, 5)
    assert (len(tr.labels), len(va.labels), len(te.labels)) == (1200, 150, 150)
    assert tr.data["audio"].shape[1:] == (40, 48) and te.data["image"].shape[1:] == (1, 28, 28)
    # the audio of a sample is the file decoded with the dataset's preprocessing
    wav = sorted(FSDD.glob("0_*_1[0-9].wav"))[0]
    assert any(torch.allclose(ds.decode("audio", str(wav)), a, atol=1e-5) for a in tr.data["audio"][tr.labels == 0])
    sp = AVDigits(str(DATA), protocol="speakers", cache_dir=str(cache))
    assert [sp.split(s).num_classes for s in ("train", "val", "test")] == [10, 10, 10]
    assert [len(sp.split(s).labels) for s in ("train", "val", "test")] == [2000, 500, 500]
    # pairs are fixed by the seed: an image differs under another seed, the audio does not
    other = AVDigits(str(DATA), seed=1, cache_dir=str(cache)).split("train")
    assert torch.equal(other.data["audio"], tr.data["audio"]) and not torch.equal(other.data["image"], tr.data["image"])


@need_av
def test_avdigits_training_run_through_cli(tmp_path, cache):
    proc = run_metamm(["train", "+exp=avdigits_protonet_5w1s", f"dataset.root={DATA}", "episode.way=3",
                       "episode.query=2", "encoder.dim=8", "encoder.image.hidden=8", "encoder.audio.hidden=8",
                       "trainer.max_steps=2", "trainer.meta_batch=1", "trainer.val_every=2",
                       "trainer.val_episodes=2", "trainer.ckpt_every=2", "trainer.log_every=1",
                       "trainer.progress=false", "trainer.device=cpu", "eval.episodes=4",
                       "eval.tasks_per_batch=2", "fusion=attention"], tmp_path,
                      env={"METAMM_CACHE": str(cache)})
    assert "final validation accuracy" in proc.stdout


def test_cache_keys_on_files_and_settings(tmp_path):
    from metamm_cli.data.cache import cached

    src = tmp_path / "a.bin"
    src.write_bytes(b"1")
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3) + len(calls)}

    first = cached("t", [src], {"size": 28}, build, str(tmp_path / "c"))
    again = cached("t", [src], {"size": 28}, build, str(tmp_path / "c"))
    assert len(calls) == 1 and torch.equal(first["x"], again["x"])  # second call read the cache
    cached("t", [src], {"size": 32}, build, str(tmp_path / "c"))  # new settings: rebuilt
    src.write_bytes(b"22")  # a changed source file: rebuilt
    cached("t", [src], {"size": 28}, build, str(tmp_path / "c"))
    cached("t", [src], {"size": 28}, build, str(tmp_path / "c"), enabled=False)
    assert len(calls) == 4 and not list((tmp_path / "c").glob("*.tmp"))
