"""The fusions of issue 7: maths against their definitions on small tensors, the presence mask
(an absent modality never changes the output), gradients for every parameter, and training
through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE, compose_cfg, run_metamm

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.algorithms.protonet import prototypes, squared_euclidean
from metamm_cli.data.synthetic import SyntheticMultimodal
from metamm_cli.models.fusion import AM3, FiLM, DeepMLP, Graph, Late, LowRank, Mean
from metamm_cli.models.net import Mapping, MultimodalNet

MODS = ["image", "audio", "tokens"]
SAMPLE_LEVEL = [Mean, DeepMLP, FiLM, LowRank, Graph]
PRESENT = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1]]).bool()


def garbage_where_absent(feats, present):
    return {m: torch.where(present[..., i, None], f, 1e3 * torch.randn_like(f))
            for i, (m, f) in enumerate(feats.items())}


def score(zq, protos):
    return -squared_euclidean(zq, protos)


def compare(zq, zs, mask, labels, way):
    """ProtoNet's class_scores: the negative squared distance to the masked class mean."""
    return score(zq, prototypes(zs, labels, way, mask))


SCORER = {"scores": score, "class_scores": compare}


def randomise(module):
    with torch.no_grad():  # away from zero inits, so no gradient vanishes by symmetry
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("cls", SAMPLE_LEVEL)
def test_masking_invariance_and_gradients(cls):
    torch.manual_seed(0)
    fusion = cls(MODS, 8)
    randomise(fusion)
    feats = {m: torch.randn(6, 8, requires_grad=True) for m in MODS}
    out = fusion(feats, PRESENT)
    assert out.shape == (6, fusion.out_dim) and torch.isfinite(out).all()
    torch.testing.assert_close(fusion(garbage_where_absent(feats, PRESENT), PRESENT), out)
    out.pow(2).sum().backward()
    assert all(f.grad.abs().sum() > 0 for f in feats.values())
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def episode_feats(T=2, S=6, Q=4, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sup = {m: torch.randn(T, S, D, generator=g) for m in MODS}
    qry = {m: torch.randn(T, Q, D, generator=g) for m in MODS}
    sp = torch.rand(T, S, 3, generator=g) > 0.3
    sp[..., 0] |= ~sp.any(-1)
    qp = torch.rand(T, Q, 3, generator=g) > 0.3
    qp[..., 1] |= ~qp.any(-1)
    labels = torch.arange(3).repeat(2).expand(T, -1)  # way 3, 2 shots
    return sup, sp, labels, qry, qp


@pytest.mark.parametrize("cls", [AM3, Late])
def test_prototype_fusions_masking_and_gradients(cls):
    torch.manual_seed(0)
    fusion = cls(MODS, 5)
    randomise(fusion)
    sup, sp, labels, qry, qp = episode_feats()
    out = fusion.logits(sup, sp, labels, qry, qp, 3, SCORER[fusion.needs])
    assert out.shape == (2, 4, 3) and torch.isfinite(out).all()
    again = fusion.logits(garbage_where_absent(sup, sp), sp, labels, garbage_where_absent(qry, qp), qp, 3,
                          SCORER[fusion.needs])
    torch.testing.assert_close(again, out)
    out.sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mean_is_the_average_of_present():
    feats = {m: torch.full((2, 3), float(i + 1)) for i, m in enumerate(MODS)}
    out = Mean(MODS, 3)(feats, torch.tensor([[True, False, True], [False, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[2.0] * 3, [2.0] * 3]))


def test_deep_mlp_is_mlp_of_concat_with_missing():
    torch.manual_seed(0)
    fusion = DeepMLP(MODS, 4, hidden=6)
    randomise(fusion)
    feats = {m: torch.randn(1, 4) for m in MODS}
    present = torch.tensor([[True, False, True]])
    x = torch.cat([feats["image"], fusion.missing[1:2], feats["tokens"]], -1)
    torch.testing.assert_close(fusion(feats, present), fusion.mlp(x))


def test_film_scales_and_shifts_the_others():
    fusion = FiLM(MODS, 2, condition="audio")
    with torch.no_grad():  # gamma, beta constant: [image, audio, tokens] x [gamma, beta]
        fusion.film.bias.copy_(torch.tensor([1., 1., 0., 0., 9., 9., 9., 9., -0.5, -0.5, 3., 3.]))
    feats = {"image": torch.tensor([[2., 4.]]), "audio": torch.tensor([[1., 1.]]), "tokens": torch.tensor([[2., 2.]])}
    all_on = fusion(feats, torch.tensor([[True, True, True]]))
    image = (1 + 1) * torch.tensor([2., 4.]) + 0
    tokens = (1 - 0.5) * torch.tensor([2., 2.]) + 3
    torch.testing.assert_close(all_on, ((image + feats["audio"][0] + tokens) / 3)[None])
    no_cond = fusion(feats, torch.tensor([[True, False, True]]))  # identity: plain mean
    torch.testing.assert_close(no_cond, ((feats["image"] + feats["tokens"]) / 2))
    with pytest.raises(ConfigError, match="fusion.condition=smell"):
        FiLM(MODS, 2, condition="smell")
    assert FiLM(MODS, 2).condition == "image"


def test_lowrank_matches_its_definition():
    torch.manual_seed(0)
    fusion = LowRank(MODS, 3, rank=2)
    feats = {m: torch.randn(2, 3) for m in MODS}
    present = torch.tensor([[True, True, True], [True, False, True]])
    out = fusion(feats, present)
    for b in range(2):
        y = fusion.bias.clone()
        for r in range(2):
            prod = torch.ones(3)
            for i, m in enumerate(MODS):
                h = feats[m][b] if present[b, i] else torch.zeros(3)
                prod = prod * (torch.cat([h, torch.ones(1)]) @ fusion.factors[i, r])
            y = y + fusion.rank_weights[r] * prod
        torch.testing.assert_close(out[b], y)
    assert isinstance(fusion.factors, torch.nn.Parameter)


def test_graph_one_round_by_hand():
    torch.manual_seed(0)
    fusion = Graph(MODS, 2, rounds=1)
    randomise(fusion)
    feats = {m: torch.randn(1, 2) for m in MODS}
    present = torch.tensor([[True, False, True]])
    idx = [0, 2]
    h = {i: feats[MODS[i]][0] + fusion.node_type[i] for i in idx}
    new = []
    for i in idx:
        a = torch.softmax(fusion.edges[i, idx], 0)
        msg = sum(a[k] * h[j] for k, j in enumerate(idx))
        new.append(h[i] + torch.relu(fusion.message[0](msg)))
    torch.testing.assert_close(fusion(feats, present)[0], (new[0] + new[1]) / 2)


def test_am3_and_late_by_hand():
    torch.manual_seed(0)
    mods = ["image", "audio"]
    sup = {"image": torch.tensor([[[0., 0.], [2., 0.], [4., 4.]]]), "audio": torch.tensor([[[1., 1.], [9., 9.], [3., 5.]]])}
    sp = torch.tensor([[[True, True], [True, False], [True, True]]])  # 2nd sample lacks audio
    labels = torch.tensor([[0, 0, 1]])
    qry = {"image": torch.tensor([[[1., 0.]]]), "audio": torch.tensor([[[2., 2.]]])}
    qp = torch.tensor([[[True, True]]])
    p_img = torch.tensor([[1., 0.], [4., 4.]])
    p_aud = torch.tensor([[1., 1.], [3., 5.]])  # the 9s are absent: never averaged in

    am3 = AM3(mods, 2, hidden=3)
    randomise(am3)

    def mix(xi, xa):
        s = torch.stack([am3.mixer[0](xi), am3.mixer[1](xa)], -1).squeeze(-2)
        a = torch.softmax(s, -1)
        return a[..., :1] * xi + a[..., 1:] * xa

    protos = mix(p_img, p_aud)
    q = mix(qry["image"][0], qry["audio"][0])
    torch.testing.assert_close(am3.logits(sup, sp, labels, qry, qp, 2, score)[0], -torch.cdist(q, protos) ** 2)

    late = Late(mods, 2)
    with torch.no_grad():
        late.weight_logits.copy_(torch.tensor([0.0, 1.0]))
    w = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    s_img = -torch.cdist(qry["image"][0], p_img) ** 2
    s_aud = -torch.cdist(qry["audio"][0], p_aud) ** 2
    torch.testing.assert_close(late.logits(sup, sp, labels, qry, qp, 2, compare)[0], w[0] * s_img + w[1] * s_aud)
    only_img = late.logits(sup, sp, labels, qry, torch.tensor([[[True, False]]]), 2, compare)[0]
    torch.testing.assert_close(only_img, s_img)  # renormalised over the shared modalities


def test_mapping_shapes_and_encode():
    torch.manual_seed(0)
    for kind in ("linear", "mlp"):
        mapping = Mapping(MODS, 4, kind=kind, hidden=8)
        out = mapping({m: torch.randn(5, 4) for m in MODS})
        assert all(v.shape == (5, 4) for v in out.values())
    encoders = {m: torch.nn.Linear(3, 4) for m in MODS}
    net = MultimodalNet(encoders, Mean(MODS, 4), Mapping(MODS, 4, kind="linear"))
    feats = net.encode({m: torch.randn(2, 7, 3) for m in MODS}, torch.ones(2, 7, 3, dtype=torch.bool))
    assert all(v.shape == (2, 7, 4) for v in feats.values())
    with pytest.raises(ConfigError, match="mapping.kind"):
        Mapping(MODS, 4, kind="cubic")


def test_prototype_fusion_refuses_sample_algorithms():
    cfg = compose_cfg([*SMOKE, "fusion=am3", "algorithm=maml"])
    with pytest.raises(ConfigError, match="works on prototypes"):
        build_algorithm(cfg, SyntheticMultimodal(codes={"train": 2, "val": 2, "test": 2}, samples_per_class=2))


def test_every_fusion_and_mapping_trains_through_the_cli(tmp_path):
    names = ["mean", "mlp", "film", "lowrank", "graph", "am3", "late"]
    proc = run_metamm(["train", "-m", *SMOKE, f"fusion={','.join(names)}", "mapping=mlp",
                       "trainer.max_steps=2", "trainer.val_episodes=4", "trainer.tensorboard=false"], tmp_path)
    finals = [ln for ln in proc.stdout.splitlines() if ln.startswith("final validation accuracy")]
    assert len(finals) == len(names)
    metrics = sorted(tmp_path.glob("outputs/smoke/multiruns/*/*/metrics.json"))
    assert len(metrics) == len(names)
    for path in metrics:
        m = json.loads(path.read_text())
        assert m["step"] == 2 and 0 <= m["val_acc"] <= 100 and m["train_loss"] == m["train_loss"]
