"""ResNet-12 and DropBlock (metamm_cli/models/resnet12.py) and Conv4's flattened readout: the
parameter count by the architecture's definition, output shapes, DropBlock's masks and ramp,
and the MAML family with DropBlock under vmap."""
from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.data.base import build_dataset
from metamm_cli.data.episodes import EpisodeSampler, ModalitySpec
from metamm_cli.models.encoders import Conv4
from metamm_cli.models.resnet12 import DropBlock, ResNet12, block_mask

IMAGE84 = ModalitySpec((3, 84, 84), torch.float32, "image")


def expected_parameters(widths, cin=3):
    """Per block: three 3x3 convolutions (no bias), a 1x1 shortcut convolution, four BatchNorms
    (weight and bias)."""
    total = 0
    for c in widths:
        total += 9 * cin * c + 2 * 9 * c * c + cin * c + 4 * 2 * c
        cin = c
    return total


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_and_output_shapes():
    wide, narrow = ResNet12(IMAGE84, 640), ResNet12(IMAGE84, 512, wide=False)
    assert count(wide) == expected_parameters([64, 160, 320, 640]) == 12_424_320
    assert count(narrow) == expected_parameters([64, 128, 256, 512]) == 7_996_800
    x = torch.randn(2, 3, 84, 84)
    wide.eval()
    assert wide(x).shape == (2, 640)
    flat = ResNet12(IMAGE84, 16000, readout="flatten").eval()
    assert flat(x).shape == (2, 16000)  # 640 x 5 x 5, MetaOptNet's embedding
    cifar = ResNet12(ModalitySpec((3, 32, 32)), 2560, readout="flatten").eval()
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 2560)  # 640 x 2 x 2
    assert cifar.blocks[2].drop.block == 2 and wide.blocks[3].drop.block == 5  # DropBlock size 2 at 32 px
    with pytest.raises(ConfigError, match=r"encoder.dim=64: resnet12 .* gives 640-d embeddings .* set encoder.dim=640"):
        ResNet12(IMAGE84, 64)
    conv = Conv4(IMAGE84, dim=1600, hidden=64, readout="flatten").eval()
    assert conv(x).shape == (2, 1600) and conv.net[-1][0].out_channels == 64  # 64 x 5 x 5
    assert Conv4(IMAGE84, dim=64, hidden=64).eval()(x).shape == (2, 64)  # the pooled one, as before
    with pytest.raises(ConfigError, match="multiple of 25"):
        Conv4(IMAGE84, dim=1010, readout="flatten")


def test_block_mask_by_definition():
    torch.manual_seed(0)
    mask = block_mask((1, 1, 6, 6), 0.15, 3, "cpu", torch.float32)
    # recompute: seeds on the 4 x 4 positions where a 3 x 3 block fits, each zeroing its block
    torch.manual_seed(0)
    seeds = torch.rand(1, 1, 4, 4) < 0.15
    expected = torch.ones(6, 6)
    for i, j in seeds[0, 0].nonzero().tolist():
        expected[i:i + 3, j:j + 3] = 0
    assert torch.equal(mask[0, 0], expected) and bool(seeds.any())


def test_dropblock_ramps_in_and_is_off_in_eval():
    drop = DropBlock(0.1, 5, ramp=100)
    x = torch.ones(64, 8, 10, 10)
    assert torch.equal(drop(x), x)  # step 0: rate 0
    drop.on_train_step(50)
    assert drop.current_rate() == pytest.approx(0.05)
    drop.on_train_step(1000)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert 0.05 < dropped < 0.15  # about the rate
    assert torch.allclose(y.mean(), torch.tensor(1.0), atol=0.02)  # kept activations rescaled
    drop.eval()
    assert torch.equal(drop(x), x)


def test_maml_with_dropblock_runs_under_vmap_with_a_mask_per_task():
    cfg = compose_cfg(["+exp=smoke", "dataset.modalities=[image]", "encoder/image=resnet12", "~encoder.image.hidden",
                       "encoder.image.widths=[4,4,4,8]", "encoder.dim=8", "dataset.image_size=16",
                       "encoder.image.dropblock_ramp=0", "encoder.image.drop_rate=0.5", "algorithm=maml",
                       "algorithm.execution=vmap", "algorithm.inner_steps=1"])
    dataset = build_dataset(cfg.dataset)
    algo = build_algorithm(cfg, dataset)
    episode = EpisodeSampler(dataset.split("train"), 3, 1, 2, tasks=2).sample()
    loss, logits = algo(episode)
    loss.backward()
    grads = [p.grad for p in algo.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    # the same inputs for both tasks: under vmap each task draws its own masks
    twin = {m: x[:1].expand_as(x).clone() for m, x in episode.support.items()}
    same = type(episode)(twin, episode.support_present[:1].expand_as(episode.support_present),
                         episode.support_labels, {m: x[:1].expand_as(x).clone() for m, x in episode.query.items()},
                         episode.query_present[:1].expand_as(episode.query_present), episode.query_labels,
                         episode.classes)
    with torch.no_grad():
        _, twin_logits = algo(same)
    assert not torch.allclose(twin_logits[0], twin_logits[1])
    algo.eval()
    with torch.no_grad():
        _, quiet = algo(same)
    assert torch.allclose(quiet[0], quiet[1], atol=1e-5)  # no dropout at test time
