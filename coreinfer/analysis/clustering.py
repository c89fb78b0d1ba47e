"""Building similarity-guided cluster sets from a corpus (`coreinfer cluster`); using them is
`engine.clusters.SimilarityPolicy`.

Why KMeans on the multi-hot core sets: for two sets of the same size k, ||x - y||^2 = 2k(1 - overlap),
so the KMeans objective is the paper's core-set overlap and nothing else (see engine/clusters.py).
"""

import math

import torch

from ..engine.clusters import ClusterSet, model_fingerprint, multi_hot
from ..engine.policy import CoreConfig
from ..engine.session import Session, stability_policy


def sentence_sets(model, prompts: list[list[int]], core: CoreConfig, batch_size: int = 16) -> torch.Tensor:
    """Each prompt's core set at every sparse layer of `core`, as masks [N, L, F] (bool, CPU).

    Prompts are batched by length so left padding stays short; selection ignores the padding.
    """
    policy = stability_policy(core, model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    layers = list(policy.keep)
    out = torch.zeros(len(prompts), len(layers), policy.width, dtype=torch.bool)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        session = Session(model, [prompts[i] for i in rows], 0, policy=policy)
        session.prefill()
        index = session.selection.index  # {layer: [b, k]}
        for j, layer in enumerate(layers):
            for r, ids in zip(rows, index[layer].cpu()):
                out[r, j] = multi_hot(ids, out.shape[2])
    return out


def choose_k(x: torch.Tensor, ks: list[int], seed: int = 0) -> tuple[int, dict[int, float]]:
    """The cluster count with the best silhouette (Euclidean on multi-hot sets, i.e. on 1 - overlap)."""
    from sklearn.metrics import silhouette_score

    ks = [k for k in ks if 2 <= k < len(x)]
    if not ks:
        raise ValueError(f"need more sentences than clusters to choose a count: {len(x)} sentences")
    scores = {k: float(silhouette_score(x.numpy(), kmeans(x, k, seed)[0].numpy())) for k in ks}
    return max(scores, key=scores.get), scores


def kmeans(x: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, F] (multi-hot) -> labels [N], centroids [k, F] (each neuron's frequency over members)."""
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(x):
        raise ValueError(f"cannot make {k} clusters of {len(x)} sentences")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x.float().numpy())
    labels = torch.from_numpy(km.labels_).long()
    return labels, member_frequency(x, labels, k)


def member_frequency(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, F] bool, labels [N] -> [k, F]: fraction of each cluster's members holding each neuron."""
    sums = torch.zeros(k, x.shape[1]).index_add_(0, labels, x.float())
    return sums / torch.bincount(labels, minlength=k).clamp_min(1)[:, None]


def rank_by_members(sets: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """sets [N, F] bool at one layer -> neuron ids [k, F], most frequent over the members first.

    Ties (common in small clusters) go to the neuron more frequent over the whole corpus: a safer
    guess than the lower id.
    """
    freq = member_frequency(sets, labels, k)  # [k, F]
    by_corpus = sets.float().mean(0).argsort(descending=True, stable=True)  # [F]
    return by_corpus[freq[:, by_corpus].argsort(dim=1, descending=True, stable=True)]




def build_clusters(model, prompts: list[list[int]], core: CoreConfig, layer: int, k: int | None = None,
                   ks: tuple[int, ...] = tuple(range(2, 13)), seed: int = 0, info: dict | None = None) -> ClusterSet:
    """Cluster `prompts` (token ids) by their core sets at `layer`; k None = the best silhouette in `ks`."""
    check_build(model, core, layer)
    sets = sentence_sets(model, prompts, core)  # [N, L, F]
    return cluster_sets(model, sets, [len(p) for p in prompts], core, layer, k, ks, seed, info)


def check_build(model, core: CoreConfig, layer: int) -> dict[int, float]:
    """The sparse layers and keep ratios of a build; errors before any forward pass."""
    if core.mode != "stability":
        raise ValueError("clusters are built from each sentence's own core set: use a stability CoreConfig")
    keep = core.keep(len(model.layers))
    if layer not in keep:
        raise ValueError(f"the clustering layer {layer} must be one of the sparse layers {sorted(keep)}")
    return keep


def cluster_sets(model, sets: torch.Tensor, lengths: list[int], core: CoreConfig, layer: int, k: int | None = None,
                 ks: tuple[int, ...] = tuple(range(2, 13)), seed: int = 0, info: dict | None = None) -> ClusterSet:
    """The clusters of precomputed core sets [N, L, F] (`sentence_sets` under `core`) of prompts of
    `lengths` tokens: one corpus pass serves several clustering layers."""
    keep = check_build(model, core, layer)
    x = sets[:, list(keep).index(layer)]  # [N, F]
    info = dict(info or {}, sentences=len(sets))
    if k is None:
        k, scores = choose_k(x, list(ks), seed)
        info.update(criterion="silhouette", silhouette={str(c): round(s, 4) for c, s in scores.items()})
    else:
        info.update(criterion="given")
    labels, centroids = kmeans(x, k, seed)
    ranks = {l: rank_by_members(sets[:, j], labels, k) for j, l in enumerate(keep)}
    spec = core.statistic_for(model.ffns()[0].gated)
    build = dict(alpha=spec.alpha, beta=keep[layer], statistic=spec.statistic, ranking=spec.ranking, layers=list(keep))
    sizes = torch.bincount(labels, minlength=k).tolist()
    tokens = torch.zeros(k).index_add_(0, labels, torch.tensor(lengths, dtype=torch.float))
    info.update(mean_member_overlap=round(float(mean_member_overlap(x, labels, centroids)), 4),
                labels=labels.tolist(),  # which cluster each corpus sentence went to, for inspection
                # mean prompt length per cluster: shows when clusters follow length rather than content
                mean_tokens=[round(t / max(1, n), 1) for t, n in zip(tokens.tolist(), sizes)])
    return ClusterSet(model_fingerprint(model), layer, build, centroids, ranks, sizes, info)


def mean_member_overlap(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean over sentences of x.c / |x|: how much each sentence shares with its own cluster."""
    if len(x) == 0:
        return math.nan
    xf = x.float()
    return ((xf * centroids[labels]).sum(1) / xf.sum(1).clamp_min(1)).mean().item()
