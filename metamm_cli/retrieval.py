"""Cross-modal retrieval: every test sample that has the query modality ranks every sample that
has the gallery modality (`metamm eval --ckpt RUN eval.task=retrieval eval.query_modality=audio
eval.gallery_modality=image`).

Each side is embedded from its one modality alone (the presence mask keeps only it): the model's
fused embedding for a sample-level fusion, the mapped modality embedding for a prototype-level
one. Ranking is by squared Euclidean distance, as ProtoNet scores. Metrics:

- by class: an item is relevant when it has the query's class. recall@k = share of queries with
  at least one relevant item among the k first; AP = mean over the relevant items of the
  precision at their rank; mAP = mean AP over queries.
- by instance: the one relevant item is the query sample's own other modality (queries whose
  sample lacks the gallery modality are left out); recall@k = share with it in the top k;
  AP = 1 / its rank.

When the query and gallery modality are the same, a query never retrieves itself.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from metamm_cli import ConfigError
from metamm_cli.device import upcast
from metamm_cli.data.episodes import gather_modalities, SplitData

KS = (1, 5, 10)


def ranking_metrics(dist: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS) -> Dict[str, torch.Tensor]:
    """``dist [Q, G]`` (smaller = better; ``inf`` = excluded) and ``relevant [Q, G]`` bool ->
    per query ``recall@k`` (1 if a relevant item is in the top k) and ``ap`` (average
    precision over all relevant items), each ``[Q]``. Ties are broken by gallery order."""
    order = dist.argsort(dim=1, stable=True)
    rel = torch.gather(relevant, 1, order).float()  # [Q, G] relevance in rank order
    hits = rel.cumsum(1)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=rel.dtype)
    ap = (rel * hits / ranks).sum(1) / rel.sum(1).clamp_min(1)
    out = {f"recall@{k}": (hits[:, min(k, rel.shape[1]) - 1] > 0).float() for k in ks}
    out["ap"] = ap
    return out


def chance_metrics(relevant: torch.Tensor, candidates: torch.Tensor,
                   ks: Sequence[int] = KS) -> Dict[str, torch.Tensor]:
    """The chance level per query: what a random ranking of its ``G`` candidates, ``R`` of them
    relevant, scores: recall@k = ``1 - C(G-R, k) / C(G, k)``, and ``R / G`` for AP (the usual
    chance level of mAP). ``relevant``, ``candidates``: ``[Q, G]`` bool."""
    G = candidates.sum(1).double()
    R = (relevant & candidates).sum(1).double()
    out = {}
    for k in ks:
        miss = torch.ones_like(R)
        for i in range(k):
            miss = miss * ((G - R - i).clamp_min(0) / (G - i).clamp_min(1))
        out[f"recall@{k}"] = (1 - miss).float()
    out["ap"] = (R / G.clamp_min(1)).float()
    return out


@torch.no_grad()
def embed_modality(algo, split: SplitData, modality: str, batch: int = 512) -> torch.Tensor:
    """Embeddings ``[S, D]`` of every sample of ``split`` from ``modality`` alone."""
    model = algo.model
    mods = list(split.data)
    col = mods.index(modality)
    prototype_level = getattr(model.fusion, "level", "sample") == "prototype"
    out = []
    for start in range(0, len(split.labels), batch):
        rows = torch.arange(start, min(start + batch, len(split.labels)), device=split.labels.device)
        inputs = split.prepare(gather_modalities(split.data, rows), 1)  # as in episodes (evaluation transform)
        present = torch.zeros_like(split.present[start:start + batch])
        present[:, col] = True
        if prototype_level:
            out.append(upcast(model.features(inputs)[modality]))
        else:
            out.append(upcast(model(inputs, present)))
    return torch.cat(out)


def retrieval(algo, split: SplitData, query_modality: str, gallery_modality: str,
              chunk: int = 1024) -> Dict:
    """Recall@1/5/10 and mAP (percent), by class and by instance; see the module docstring."""
    mods = list(split.data)
    for key, m in (("eval.query_modality", query_modality), ("eval.gallery_modality", gallery_modality)):
        if m is None or m not in mods:
            raise ConfigError(f"{key}={m}: eval.task=retrieval needs a modality of this dataset, one of {mods}")
    was_training = algo.training
    algo.eval()
    q_idx = torch.nonzero(split.present[:, mods.index(query_modality)]).flatten()
    g_idx = torch.nonzero(split.present[:, mods.index(gallery_modality)]).flatten()
    if len(q_idx) == 0 or len(g_idx) == 0:
        raise ConfigError(f"eval.task=retrieval: no sample of the split has {query_modality if len(q_idx) == 0 else gallery_modality}")
    zq = embed_modality(algo, split, query_modality)[q_idx]
    zg = embed_modality(algo, split, gallery_modality)[g_idx]
    algo.train(was_training)
    sums: Dict[str, Dict[str, float]] = {"class": {}, "instance": {}}
    counts = {"class": 0, "instance": 0}
    for start in range(0, len(q_idx), chunk):
        qi = q_idx[start:start + chunk]
        dist = torch.cdist(zq[start:start + chunk], zg).pow(2)
        if query_modality == gallery_modality:
            dist = dist.masked_fill(qi[:, None] == g_idx[None], float("inf"))
        by_class = split.labels[qi][:, None] == split.labels[g_idx][None]
        same = qi[:, None] == g_idx[None]
        for kind, rel in (("class", by_class), ("instance", same)):
            keep = rel.any(1) if kind == "instance" else torch.ones_like(rel[:, 0])
            if query_modality == gallery_modality and kind == "instance":
                keep = torch.zeros_like(keep)  # a sample's own other modality: none here
            if not bool(keep.any()):
                continue
            for name, v in ranking_metrics(dist[keep], rel[keep]).items():
                sums[kind][name] = sums[kind].get(name, 0.0) + v.sum().item()
            for name, v in chance_metrics(rel[keep], torch.isfinite(dist[keep])).items():
                sums[kind]["chance " + name] = sums[kind].get("chance " + name, 0.0) + v.sum().item()
            counts[kind] += int(keep.sum())
    result = {"query_modality": query_modality, "gallery_modality": gallery_modality,
              "queries": len(q_idx), "gallery": len(g_idx)}
    for kind in ("class", "instance"):
        n = counts[kind]
        result[kind] = ({k.replace("ap", "mAP") if k.endswith("ap") else k: 100 * v / n
                         for k, v in sums[kind].items()} | {"queries": n}) if n else None
    return result


def format_table(result: Dict) -> str:
    cols = [f"recall@{k}" for k in KS] + ["mAP"]
    lines = [f"retrieval {result['query_modality']} -> {result['gallery_modality']} "
             f"({result['queries']} queries, gallery {result['gallery']})",
             f"{'hit':<9}" + "".join(f"{c:>10}" for c in cols)]
    for kind in ("class", "instance"):
        r = result[kind]
        lines.append(f"{kind:<9}" + ("".join(f"{r[c]:>10.2f}" for c in cols) if r else "  (no queries)"))
        if r:
            lines.append(f"{'  chance':<9}" + "".join(f"{r['chance ' + c]:>10.2f}" for c in cols))
    return "\n".join(lines)


def retrieval_report(algo, split: SplitData, run_cfg, state: Dict, out) -> Dict:
    """`metamm eval eval.task=retrieval`: run :func:`retrieval`, print the table, write eval.json."""
    import json
    import logging

    from omegaconf import OmegaConf

    V = run_cfg.eval
    result = retrieval(algo, split, V.query_modality, V.gallery_modality)
    split_name = OmegaConf.to_container(run_cfg, resolve=True, enum_to_str=True)["eval"]["split"]
    report = {"task": "retrieval", **result, "split": split_name, "ckpt": state["path"],
              "step": state.get("step"),
              "config": OmegaConf.to_container(run_cfg, resolve=True, enum_to_str=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(result))
    logging.getLogger("metamm").info(f"retrieval on the {split_name} split; wrote {out}")
    return report
