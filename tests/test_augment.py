"""The batched image pipeline (metamm_cli/data/augment.py) against its definitions on small
tensors, and its place in the sampler: one call per meta-batch, drawn from the sampler's
generator (reproducible, resumable, the same draws for any share of the meta-batch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metamm_cli.data.augment import ImagePipeline, PickView, Transforms
from metamm_cli.data.episodes import EpisodeSampler, SplitData

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def images(n=6, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(x):
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_test_pipeline_is_resize_by_1_15_then_centre_crop():
    x = images()
    out = ImagePipeline(MEAN, STD)(x)
    big = F.interpolate(x, size=(18, 18), mode="bilinear", align_corners=False)  # round(16 * 1.15) = 18
    assert torch.allclose(out, normalise(big[..., 1:17, 1:17]), atol=1e-5)
    plain = ImagePipeline(MEAN, STD, test_resize=1.0)(x)
    assert torch.allclose(plain, normalise(x), atol=1e-6)


def test_flip_and_pad_crop_move_whole_pixels():
    x = images()
    g = torch.Generator().manual_seed(3)
    flips = ImagePipeline((0,) * 3, (1,) * 3, random=True, crop="none", jitter=0.0)(x, generator=g)
    for a, b in zip(flips, x):
        assert torch.allclose(a, b, atol=1e-6) or torch.allclose(a, b.flip(-1), atol=1e-6)
    shifted = ImagePipeline((0,) * 3, (1,) * 3, random=True, crop="pad", pad=2, jitter=0.0, flip=False)(
        x, generator=torch.Generator().manual_seed(4))
    for a, b in zip(shifted, x):
        padded = F.pad(b, (2, 2, 2, 2))
        windows = [padded[:, i:i + 16, j:j + 16] for i in range(5) for j in range(5)]
        assert any(torch.allclose(a, w, atol=1e-5) for w in windows)


def test_resized_crop_of_the_whole_image_is_the_identity():
    x = images(2)
    p = ImagePipeline((0,) * 3, (1,) * 3, random=True, crop="resized", jitter=0.0, flip=False, scale=(1.0, 1.0),
                      ratio=(1.0, 1.0))
    assert torch.allclose(p(x, generator=torch.Generator().manual_seed(0)), x, atol=1e-5)
    crops = ImagePipeline((0,) * 3, (1,) * 3, random=True, jitter=0.0)(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(crops, x, atol=1e-3)


def test_colour_jitter_by_its_definition():
    x = images(4, 8)
    u = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25], [0.5, 0.5, 0.5], [0.2, 0.9, 0.0]])
    out = ImagePipeline(MEAN, STD, jitter=0.4).colour(x, u)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    b, c, s = (0.6 + 0.8 * u).unbind(1)
    y = (x * b.view(-1, 1, 1, 1)).clamp(0, 1)
    m = (y * w).sum(1, keepdim=True).mean(dim=(1, 2, 3), keepdim=True)
    y = (c.view(-1, 1, 1, 1) * y + (1 - c.view(-1, 1, 1, 1)) * m).clamp(0, 1)
    g = (y * w).sum(1, keepdim=True)
    y = (s.view(-1, 1, 1, 1) * y + (1 - s.view(-1, 1, 1, 1)) * g).clamp(0, 1)
    assert torch.allclose(out, y, atol=1e-6)
    assert torch.allclose(ImagePipeline(MEAN, STD, jitter=0.4).colour(x, torch.full((4, 3), 0.5)), x)  # factors 1


def test_draws_come_from_the_generator_and_a_share_sees_its_rows():
    x = images(8).view(4, 2, 3, 16, 16)  # [tasks, samples, C, H, W]
    p = ImagePipeline(MEAN, STD, random=True)
    a = p(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, p(x, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, p(x, generator=torch.Generator().manual_seed(2)))
    share = p(x[1:3], generator=torch.Generator().manual_seed(1), full=(4, 1))
    assert torch.allclose(share, a[1:3])


def test_pick_view_draws_one_view_per_sample():
    views = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)  # [tasks, samples, 4 views, length 5]
    first = PickView()(views, 2)
    assert torch.equal(first, views[:, :, 0])
    drawn = PickView()(views, 2, torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 3, 5)
    for t in range(2):
        for i in range(3):
            assert any(torch.equal(drawn[t, i], views[t, i, v]) for v in range(4))
    assert torch.equal(PickView()(views[:, :, 0], 2), views[:, :, 0])  # one view already: unchanged


def test_the_sampler_augments_a_whole_meta_batch_reproducibly():
    labels = torch.arange(4).repeat_interleave(3)
    data = {"image": (torch.rand(12, 3, 16, 16) * 255).to(torch.uint8)}
    split = SplitData(data, torch.ones(12, 1, dtype=torch.bool), labels, 4,
                      transform=Transforms({"image": ImagePipeline(MEAN, STD, random=True)}))
    plain = SplitData(data, split.present, labels, 4)
    s = EpisodeSampler(split, 2, 1, 2, tasks=3, seed=5)
    state = s.generator.get_state()
    ep = s.sample()
    s.generator.set_state(state)  # a resumed run: same episode, same augmentation
    assert torch.equal(ep.support["image"], s.sample().support["image"])
    raw = EpisodeSampler(plain, 2, 1, 2, tasks=3, seed=5).sample()
    assert torch.equal(raw.index, ep.index)  # the same samples were drawn
    assert float(raw.support["image"].min()) >= 0 and float(ep.support["image"].min()) < 0  # normalised
    assert not torch.allclose(normalise(raw.support["image"]), ep.support["image"])  # and augmented
