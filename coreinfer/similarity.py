"""Similarity-guided core selection: core sets computed ahead of time per semantic cluster of a corpus.

Build (`build_clusters`): one dense prefill per corpus sentence gives its core set at every sparse
layer; KMeans clusters the sentences by their core sets at one layer (the clustering layer); per
cluster and sparse layer, neurons are ranked by how many members hold them in their core set.
Use (`ClusterSet.index`): a prompt's own core set at the clustering layer picks its cluster, and
decoding keeps that cluster's top-ranked neurons at every sparse layer.

Why KMeans on the multi-hot core sets: for two sets of the same size k, ||x - y||^2 = 2k(1 - overlap),
so the KMeans objective is the paper's core-set overlap and nothing else. A centroid is then each
neuron's frequency over the members, so its top-k *is* the cluster's core set, and x.c / k is a
prompt's mean overlap with the members: the assignment score reported. The feature depends only on
which neurons the prompt activates, never on its length.

A cluster file is safetensors (tensors) with its metadata as JSON in the header; no pickle. It
records a fingerprint of the model it was built for, and refuses to serve another model.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .core import CoreConfig, ranking_for, select
from .generate import Batch, prefill
from .selection import core_neurons, keep_count

FORMAT = "coreinfer.clusters/1"
PROBE_TENSORS, PROBE_VALUES = 4, 128  # enough to tell models apart, cheap enough to check per request


def model_fingerprint(model) -> tuple[dict, torch.Tensor]:
    """(shape facts, probe [n] fp32): the structure, and a strided sample of a few weights.

    Values rather than a hash of bytes, because the same checkpoint loaded as fp32, bf16 or fp16 has
    different bytes; `same_model` compares them with a tolerance above half-precision rounding. Only
    the embedding table and 1-D weights (norms, biases) are sampled: weight-only int8 never touches them.
    """
    vectors = sorted((n, p) for n, p in model.named_parameters() if p.dim() == 1 and p.is_floating_point())
    picks = [("embed_tokens.weight", model.embed_tokens.weight)]
    picks += [vectors[round(i * (len(vectors) - 1) / max(1, PROBE_TENSORS - 2))] for i in range(PROBE_TENSORS - 1)]
    probe = torch.cat([p.detach().reshape(-1)[strided(p.numel(), p.device)].float().cpu() for _, p in picks])
    facts = dict(model_type=getattr(model.config, "model_type", type(model).__module__), num_layers=len(model.layers),
                 ffn_width=model.layers[0].mlp.up.shape[0], hidden_size=model.embed_tokens.weight.shape[1],
                 vocab_size=model.embed_tokens.weight.shape[0], probe_tensors=[n for n, _ in picks])
    return facts, probe


def strided(n: int, device) -> torch.Tensor:
    """PROBE_VALUES evenly spaced positions in [0, n), in integers: float32 cannot count past 2^24."""
    return torch.arange(PROBE_VALUES, device=device) * (n - 1) // max(1, PROBE_VALUES - 1)


def same_model(a: tuple[dict, torch.Tensor], b: tuple[dict, torch.Tensor]) -> bool:
    (fa, pa), (fb, pb) = a, b
    if fa != fb or pa.shape != pb.shape:
        return False
    # bf16 keeps 8 significant bits (relative error <= 2^-8); a different model differs by O(1).
    return bool(((pa - pb).abs() <= 2e-2 * pa.abs() + 1e-3 * pa.abs().max()).all())


def multi_hot(ids: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted neuron ids [k] -> bool mask [F]."""
    return torch.zeros(width, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)


@torch.inference_mode()
def sentence_sets(model, prompts: list[list[int]], core: CoreConfig, batch_size: int = 16) -> torch.Tensor:
    """Each prompt's core set at every sparse layer of `core`, as masks [N, L, F] (bool, CPU).

    Prompts are batched by length so left padding stays short; `select` ignores the padding.
    """
    gated = model.layers[0].mlp.gated
    device = model.embed_tokens.weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    layers = core.sparse_layers(len(model.layers))
    out = torch.zeros(len(prompts), len(layers), model.layers[0].mlp.up.shape[0], dtype=torch.bool)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = Batch([prompts[i] for i in rows], 0, pad_id=0, device=device)
        model.setup_caches(len(rows), batch.total_len)
        _, acts = prefill(model, batch, collect=True)
        index = select(acts, batch.valid, core, gated)  # {layer: [b, k]}
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


@dataclass(eq=False, repr=False)
class ClusterSet:
    """Per-cluster core neurons of one model, and what is needed to assign a new prompt to a cluster.

    layer: the clustering layer; build: alpha, beta (at the clustering layer), statistic, resolved
    ranking and sparse layers of the build; centroids [C, F] member frequencies at the clustering
    layer; ranks {layer: [C, F]} neuron ids by member frequency; info: provenance and k criterion.
    """

    fingerprint: tuple[dict, torch.Tensor]
    layer: int
    build: dict
    centroids: torch.Tensor
    ranks: dict[int, torch.Tensor]
    sizes: list[int]
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ClusterSet({len(self.sizes)} clusters, layer {self.layer}, {self.fingerprint[0]['model_type']})"

    def check(self, model) -> None:
        """Refuse a model other than the one the clusters were built for."""
        if not same_model(self.fingerprint, model_fingerprint(model)):
            built = {k: v for k, v in self.fingerprint[0].items() if k != "probe_tensors"}
            raise ValueError(f"this cluster file was built for another model ({self.info.get('model', '?')}, "
                             f"{built}); rebuild it with `coreinfer cluster` for the model in use")

    def assign(self, sets: torch.Tensor) -> tuple[list[int], list[float]]:
        """Masks [B, F] at the clustering layer -> nearest centroid per prompt, and the prompt's mean
        overlap with that cluster's members (x.c / |x|, in [0, 1])."""
        x = sets.float().cpu()
        dot = x @ self.centroids.T  # [B, C]
        dist = x.sum(1, keepdim=True) - 2 * dot + self.centroids.pow(2).sum(1)  # squared Euclidean
        chosen = dist.argmin(1)
        score = dot.gather(1, chosen[:, None])[:, 0] / x.sum(1).clamp_min(1)
        return chosen.tolist(), score.tolist()

    def index(self, acts: list[torch.Tensor], valid: torch.Tensor,
              keep: dict[int, float]) -> tuple[dict[int, torch.Tensor], list[int], list[float]]:
        """Per sparse layer, each sequence's cluster core ids {l: [B, k]}, and the clusters and scores."""
        b = self.build
        a = acts[self.layer]  # [B, T, F]
        # the build's resolved ranking, not the decode config's: centroids are frequencies of such sets
        own = torch.stack([multi_hot(core_neurons(a[i][valid[i]], b["alpha"], b["beta"], b["statistic"], b["ranking"]),
                                     a.shape[-1]) for i in range(a.shape[0])])  # [B, F]
        chosen, scores = self.assign(own)
        missing = sorted(set(keep) - set(self.ranks))
        if missing:
            raise ValueError(f"sparse layers {missing} have no cluster core sets (built for {sorted(self.ranks)})")
        rows = torch.tensor(chosen)
        index = {l: self.ranks[l][rows, :keep_count(beta, a.shape[-1])].sort(dim=1).values.to(a.device)
                 for l, beta in keep.items()}
        return index, chosen, scores

    def save(self, path: str | Path) -> None:
        facts, probe = self.fingerprint
        meta = dict(format=FORMAT, fingerprint=facts, layer=self.layer, build=self.build, sizes=self.sizes,
                    info=self.info)
        tensors = {"probe": probe, "centroids": self.centroids.float().contiguous(),
                   **{f"ranks.{l}": r.int().contiguous() for l, r in self.ranks.items()}}
        save_file(tensors, str(path), metadata={"coreinfer": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, model=None) -> "ClusterSet":
        """Read a cluster file; with `model`, also refuse it unless it was built for that model."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("coreinfer", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{path}: not a cluster file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a coreinfer cluster file (format {meta.get('format')!r})")
        ranks = {int(k.split(".", 1)[1]): v.long() for k, v in tensors.items() if k.startswith("ranks.")}
        out = cls((meta["fingerprint"], tensors["probe"]), meta["layer"], meta["build"], tensors["centroids"],
                  ranks, meta["sizes"], meta["info"])
        if model is not None:
            out.check(model)
        return out


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
    build = dict(alpha=core.alpha, beta=keep[layer], statistic=core.statistic,
                 ranking=ranking_for(core, model.layers[0].mlp.gated), layers=list(keep))
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
