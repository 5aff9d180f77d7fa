"""Missing modalities that never hurt: the presence-aware comparison (``fusion=presence``) and
imputation (``fusion=impute``) against hand computations on small tensors, every presence
pattern included; the metric algorithms' masked class scores; the per-modality ensemble and the
robustness summaries by hand; the training recipe's sampler (rates per task, cross-modal tasks,
warm-up); and the bad inputs, one line each."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import SMOKE, compose_cfg

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.algorithms.ensemble import PerModalityEnsemble
from metamm_cli.algorithms.matching import matching_log_probs
from metamm_cli.algorithms.protonet import prototypes, squared_euclidean
from metamm_cli.algorithms.relation import class_sums
from metamm_cli.config import check_ranges
from metamm_cli.data.episodes import Episode, EpisodeSampler
from metamm_cli.data.synthetic import SyntheticMultimodal
from metamm_cli.models.fusion import Impute, Late, Presence
from metamm_cli.compare.robustness import effective_robustness, relative_robustness

MODS = ["image", "strokes"]


def compare(zq, zs, mask, labels, way):
    """ProtoNet's class scores: minus the squared distance to the mean of the masked samples."""
    return -squared_euclidean(zq, prototypes(zs, labels, way, mask))


def sq(a, b):
    return float(((torch.as_tensor(a) - torch.as_tensor(b)) ** 2).sum())


def presence_case():
    """One task, 3 classes of one support sample each, 4 queries, D = 2:
    class 0 has image and strokes, class 1 image only, class 2 strokes only;
    query 0 has both, query 1 image only, query 2 strokes only (its pair with class 1 shares
    nothing), query 3 image only (its pair with class 2 shares nothing)."""
    sup = {"image": torch.tensor([[[0., 0.], [2., 0.], [9., 9.]]]),
           "strokes": torch.tensor([[[1., 1.], [9., 9.], [3., 1.]]])}
    sp = torch.tensor([[[True, True], [True, False], [False, True]]])
    labels = torch.tensor([[0, 1, 2]])
    qry = {"image": torch.tensor([[[1., 0.], [2., 1.], [7., 7.], [0., 1.]]]),
           "strokes": torch.tensor([[[1., 2.], [7., 7.], [3., 0.], [7., 7.]]])}
    qp = torch.tensor([[[True, True], [True, False], [False, True], [True, False]]])
    return sup, sp, labels, qry, qp


def test_presence_by_hand_every_pattern():
    sup, sp, labels, qry, qp = presence_case()
    fusion = Presence(MODS, 2)
    fusion.shared = True  # a model with a mapping: cross-modal pairs are compared
    assert not hasattr(fusion, "cross_logits")  # two modalities: one cross pair per disjoint pair
    with torch.no_grad():
        fusion.weight_logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # w = [1/4, 3/4]
        fusion.cross_log_scale.fill_(math.log(0.5))
        fusion.cross_bias.fill_(-1.0)
    out = fusion.logits(sup, sp, labels, qry, qp, 3, compare)[0]
    w, a, b = (0.25, 0.75), 0.5, -1.0
    P = {("image", 0): [0., 0.], ("image", 1): [2., 0.], ("strokes", 0): [1., 1.], ("strokes", 2): [3., 1.]}
    q = {m: qry[m][0] for m in MODS}
    # query 0, both modalities: class 0 shares both, class 1 image, class 2 strokes
    assert out[0, 0].item() == pytest.approx(-(w[0] * sq(q["image"][0], P["image", 0]) + w[1] * sq(q["strokes"][0], P["strokes", 0])))
    assert out[0, 1].item() == pytest.approx(-sq(q["image"][0], P["image", 1]))  # renormalised: image alone
    assert out[0, 2].item() == pytest.approx(-sq(q["strokes"][0], P["strokes", 2]))
    # query 1, image only: class 2 has no image -> its image compared with class 2's strokes
    assert out[1, 0].item() == pytest.approx(-sq(q["image"][1], P["image", 0]))
    assert out[1, 1].item() == pytest.approx(-sq(q["image"][1], P["image", 1]))
    assert out[1, 2].item() == pytest.approx(a * -sq(q["image"][1], P["strokes", 2]) + b)
    # query 2, strokes only: class 1 has no strokes -> cross-modal against its image
    assert out[2, 1].item() == pytest.approx(a * -sq(q["strokes"][2], P["image", 1]) + b)
    assert out[2, 2].item() == pytest.approx(-sq(q["strokes"][2], P["strokes", 2]))
    assert out[3, 2].item() == pytest.approx(a * -sq(q["image"][3], P["strokes", 2]) + b)


def test_presence_compares_one_modality_in_its_own_space_and_across_in_the_shared_one():
    sup, sp, labels, qry, qp = presence_case()
    fusion = Presence(MODS, 2)
    fusion.shared = True
    doubled = ({m: 2 * x for m, x in sup.items()}, {m: 2 * x for m, x in qry.items()})  # the mapping
    own = fusion.logits(sup, sp, labels, qry, qp, 3, compare)[0]
    mixed = fusion.logits(sup, sp, labels, qry, qp, 3, compare, shared=doubled)[0]
    q = {m: qry[m][0] for m in MODS}
    assert mixed[1, 2].item() == pytest.approx(-4 * sq(q["image"][1], [3., 1.]))  # image vs strokes: mapped
    torch.testing.assert_close(mixed[0], own[0])  # shared modalities: the encoders' own space
    torch.testing.assert_close(mixed[1, :2], own[1, :2])


def test_presence_cross_term_averages_the_pairs_it_has():
    """A query with both modalities against a class with neither in common is impossible; a
    query with image against a class whose samples have strokes (two pairs would need a third
    modality): with three modalities, query {image} vs class {strokes, audio} averages the two
    cross pairs with the renormalised v."""
    mods = ["image", "strokes", "audio"]
    fusion = Presence(mods, 1)
    fusion.shared = True
    with torch.no_grad():
        fusion.cross_logits.copy_(torch.log(torch.tensor([[1., 1., 3.], [1., 1., 1.], [1., 1., 1.]])))
    sup = {"image": torch.zeros(1, 1, 1), "strokes": torch.tensor([[[2.]]]), "audio": torch.tensor([[[4.]]])}
    qry = {"image": torch.tensor([[[1.]]]), "strokes": torch.zeros(1, 1, 1), "audio": torch.zeros(1, 1, 1)}
    sp = torch.tensor([[[False, True, True]]])
    qp = torch.tensor([[[True, False, False]]])
    out = fusion.logits(sup, sp, torch.tensor([[0]]), qry, qp, 1, compare)
    # pairs (image->strokes) weight 1, (image->audio) weight 3 among the six off-diagonal ones
    assert out.item() == pytest.approx((1 * -1.0 + 3 * -9.0) / 4)


def test_presence_without_shared_space_is_late_and_floors_disjoint_pairs():
    sup, sp, labels, qry, qp = presence_case()
    fusion, late = Presence(MODS, 2), Late(MODS, 2)
    late.load_state_dict({"weight_logits": torch.zeros(2)})
    out = fusion.logits(sup, sp, labels, qry, qp, 3, compare)[0]
    torch.testing.assert_close(out, late.logits(sup, sp, labels, qry, qp, 3, compare)[0])
    # query 1 (image) vs class 2 (strokes only): the lowest score of its row, detached
    assert out[1, 2] == min(out[1, 0], out[1, 1])


def test_presence_ignores_absent_features_and_trains_every_parameter():
    torch.manual_seed(0)
    sup, sp, labels, qry, qp = presence_case()
    fusion = Presence(MODS, 2)
    fusion.shared = True
    feats = {m: torch.randn_like(qry[m], requires_grad=True) for m in MODS}
    out = fusion.logits(sup, sp, labels, feats, qp, 3, compare)
    garbage = {m: torch.where(qp[..., i, None], feats[m], 1e3 * torch.randn_like(feats[m])) for i, m in enumerate(MODS)}
    torch.testing.assert_close(fusion.logits(sup, sp, labels, garbage, qp, 3, compare), out)
    torch.nn.functional.cross_entropy(out[0], torch.tensor([0, 1, 2, 2])).backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_impute_by_hand():
    torch.manual_seed(0)
    mods = ["image", "strokes", "audio"]
    fusion = Impute(mods, 2, combine="concat")
    feats = {m: torch.randn(3, 2) for m in mods}
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    out = fusion(feats, present)
    P = {(n, m): fusion.predict[k] for k, (n, m) in enumerate(fusion.pairs)}  # (source, target) positions
    # sample 1 lacks strokes (1): the mean of P_{image->strokes}(image) and P_{audio->strokes}(audio)
    hat = (P[0, 1](feats["image"][1]) + P[2, 1](feats["audio"][1])) / 2
    torch.testing.assert_close(out[1], torch.cat([feats["image"][1], hat, feats["audio"][1]]))
    # sample 2 has only strokes: both others predicted from it
    torch.testing.assert_close(out[2], torch.cat([P[1, 0](feats["strokes"][2]), feats["strokes"][2],
                                                  P[1, 2](feats["strokes"][2])]))
    torch.testing.assert_close(out[0], torch.cat([feats[m][0] for m in mods]))
    garbage = {m: torch.where(present[:, i, None], f, 1e3 * torch.randn_like(f)) for i, (m, f) in enumerate(feats.items())}
    torch.testing.assert_close(fusion(garbage, present), out)
    mean = Impute(mods, 2, combine="mean")
    mean.load_state_dict(fusion.state_dict())
    torch.testing.assert_close(mean(feats, present), out.view(3, 3, 2).mean(1))
    # the reconstruction loss: over the (sample, pair) terms whose two modalities are present
    terms = [((P[n, m](feats[mods[n]][b]) - feats[mods[m]][b]) ** 2).mean()
             for b in range(3) for n, m in fusion.pairs if present[b, n] and present[b, m]]
    torch.testing.assert_close(fusion.aux_loss(feats, present), torch.stack(terms).mean())


def masked_case():
    torch.manual_seed(1)
    zs, zq = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, -1)
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, False, True, True]])
    return zs, zq, labels, mask


def test_masked_class_scores_of_the_metric_algorithms():
    zs, zq, labels, mask = masked_case()
    protos = prototypes(zs, labels, 3, mask)
    sums = class_sums(zs, labels, 3, mask)
    logp = matching_log_probs(zs, labels, zq, 3, 1.0, mask)
    for t in range(2):
        for c in range(3):
            keep = [i for i in range(6) if labels[t, i] == c and mask[t, i]]
            torch.testing.assert_close(protos[t, c], zs[t, keep].mean(0))
            torch.testing.assert_close(sums[t, c], zs[t, keep].sum(0))
        kept = [i for i in range(6) if mask[t, i]]
        cos = torch.nn.functional.cosine_similarity(zq[t][:, None], zs[t, kept][None], dim=-1)
        attn = cos.softmax(-1)
        for c in range(3):
            want = attn[:, [k for k, i in enumerate(kept) if labels[t, i] == c]].sum(-1).log()
            torch.testing.assert_close(logp[t, :, c], want)


@pytest.mark.parametrize("algorithm", ["protonet", "matching", "relation"])
def test_presence_runs_with_every_class_scoring_algorithm(algorithm):
    torch.manual_seed(0)
    dataset = SyntheticMultimodal(codes={"train": 2, "val": 2, "test": 2}, samples_per_class=4)
    cfg = compose_cfg([*SMOKE, f"algorithm={algorithm}", "+recipe=robust"])
    algo = build_algorithm(cfg, dataset)
    assert algo.model.fusion.shared and algo.model.fusion.cross
    episode = EpisodeSampler(dataset.split("train"), 3, 1, 2, tasks=2, missing={"all": 0.7}).sample()
    loss, logits = algo(episode)
    assert logits.shape == (2, 6, 3) and torch.isfinite(loss)
    loss.backward()
    assert algo.model.fusion.cross_bias.grad is not None


def test_impute_works_for_maml_and_adds_its_loss():
    torch.manual_seed(0)
    dataset = SyntheticMultimodal(codes={"train": 2, "val": 2, "test": 2}, samples_per_class=4)
    algo = build_algorithm(compose_cfg([*SMOKE, "algorithm=maml", "fusion=impute", "algorithm.inner_steps=1"]), dataset)
    episode = EpisodeSampler(dataset.split("train"), 3, 1, 2, tasks=2, missing={"all": 0.5}).sample()
    loss, _ = algo.train()(episode)
    loss.backward()
    assert all(p.grad is not None for p in algo.model.fusion.predict.parameters())


def tiny_member(scale):
    """A stand-in member: embedding = input times ``scale``; class scores = ProtoNet's."""
    class Member(torch.nn.Module):
        def embed_episode(self, ep):
            m = next(iter(ep.support))
            return scale * ep.support[m], scale * ep.query[m]

        def class_scores(self, zq, zs, mask, labels, way):
            return compare(zq, zs, mask, labels, way)
    return Member()


def test_per_modality_ensemble_by_hand():
    sup, sp, labels, qry, qp = presence_case()
    ep = Episode(sup, sp, labels, qry, qp, torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 2]]))
    ens = PerModalityEnsemble({"image": tiny_member(1.0), "strokes": tiny_member(2.0)}, MODS)
    _, logits = ens(ep)
    q = {m: qry[m][0] for m in MODS}
    img = torch.stack([-torch.tensor(sq(q["image"][j], [0., 0.])) for j in range(4)]), \
        torch.stack([-torch.tensor(sq(q["image"][j], [2., 0.])) for j in range(4)])
    img = torch.stack(img, -1).log_softmax(-1)  # over classes 0 and 1 (class 2 has no image)
    stk = torch.stack([torch.stack([-torch.tensor(sq(2 * q["strokes"][j], 2 * torch.tensor(c))) for c in ([1., 1.], [3., 1.])])
                       for j in range(4)]).log_softmax(-1)  # over classes 0 and 2
    torch.testing.assert_close(logits[0, 0], torch.stack([(img[0, 0] + stk[0, 0]) / 2, img[0, 1], stk[0, 1]]))
    torch.testing.assert_close(logits[0, 1, :2], img[1])
    assert logits[0, 1, 2] == logits[0, 1, :2].min()  # no image for class 2: the row's floor


def test_robustness_summaries_by_hand():
    f = [{"rate": 0.0, "accuracy": 90.0}, {"rate": 0.5, "accuracy": 80.0}, {"rate": 1.0, "accuracy": 50.0}]
    late = [{"rate": 0.0, "accuracy": 95.0}, {"rate": 0.5, "accuracy": 60.0}, {"rate": 1.0, "accuracy": 40.0}]
    assert relative_robustness(f) == pytest.approx((0.5 * (90 + 80) / 2 + 0.5 * (80 + 50) / 2) / 1.0)
    # late shifted to 90 at rate 0: 90, 55, 35; differences 0, 25, 15
    assert effective_robustness(f, late) == pytest.approx(0.5 * (0 + 25) / 2 + 0.5 * (25 + 15) / 2)
    assert effective_robustness(f, late[:2]) is None and relative_robustness(f[:1]) is None


def sampler(**kwargs):
    split = SyntheticMultimodal(codes={"train": 2, "val": 2, "test": 2}, samples_per_class=8).split("train")
    return EpisodeSampler(split, 3, 2, 3, tasks=64, **kwargs)


def test_all_key_drops_every_modality_and_never_the_last():
    ep = sampler(missing={"all": 1.0}).sample()
    present = ep.present
    assert bool((present.sum(-1) == 1).all())  # every sample keeps exactly one (rate 1)
    named = sampler(missing={"all": 1.0, "image": 0.0}).sample().present
    assert bool(named[..., 0].all())  # a named modality overrides all


def test_uniform_schedule_mixes_clean_and_masked_tasks():
    fixed = sampler(missing={"all": 0.8}).sample().present.float().mean((1, 2))
    uniform = sampler(missing={"all": 0.8}, schedule="uniform").sample().present.float().mean((1, 2))
    assert fixed.std() < uniform.std()  # per-task rates: some tasks nearly clean, some heavily masked
    assert uniform.max() > fixed.max()


def test_cross_modal_tasks_keep_one_modality_each_side():
    ep = sampler(crossmodal=1.0).sample()
    s, q = ep.support_present, ep.query_present
    assert bool((s.sum(-1) == 1).all() and (q.sum(-1) == 1).all())
    a, b = s[:, 0].float().argmax(-1), q[:, 0].float().argmax(-1)
    assert bool((a != b).all())
    assert bool((s == s[:, :1]).all() and (q == q[:, :1]).all())  # one modality per side per task
    assert len(set(zip(a.tolist(), b.tolist()))) > 3  # the pairs vary across tasks


def test_warmup_ramps_the_rates_from_zero():
    s = sampler(missing={"all": 1.0}, warmup=10)
    s.at_step(0)
    assert bool(s.sample().present.all())
    s.at_step(10)
    assert not bool(s.sample().present.all())


@pytest.mark.parametrize("overrides, message", [
    (["+recipe=robust", "mapping=none"], "+recipe=robust trains a shared space"),
    (["fusion=presence", "dataset.modalities=[image]"], "needs at least two"),
    (["fusion=impute", "dataset.modalities=[image]"], "needs at least two"),
    (["fusion=presence", "missing.test.all=0.5"], "missing.test can leave a query and a class with no modality"),
    (["fusion=presence", "episode.support_modalities=[image]", "episode.query_modalities=[audio]"],
     "share no modality"),
    (["fusion=presence", "algorithm=maml"], "works on prototypes"),
    (["fusion=am3", "algorithm=matching"], "(protonet)"),
    (["+recipe=robust", "algorithm=matching", "algorithm.fce=true"], "algorithm.fce=true"),
    (["dataset.modalities=[5]"], "position 5 is out of range"),
    (["missing.train.smell=0.5"], "missing.train.smell: not a modality"),
])
def test_bad_settings_are_one_line(overrides, message):
    cfg = compose_cfg([*SMOKE, *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")) as e:
        check_ranges(cfg)
        mods = cfg.dataset.get("modalities")
        dataset = SyntheticMultimodal(modalities=list(mods) if mods else None,
                                      codes={"train": 2, "val": 2, "test": 2}, samples_per_class=4)
        EpisodeSampler(dataset.split("train"), 3, 1, 1, tasks=1, missing=dict(cfg.missing.train))
        build_algorithm(cfg, dataset)
    assert "\n" not in str(e.value)
