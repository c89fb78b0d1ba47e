"""Similarity-guided core selection: core sets computed ahead of time per semantic cluster of a corpus.

Build (`analysis.clustering.build_clusters`): one dense prefill per corpus sentence gives its core
set at every sparse layer; KMeans clusters the sentences by their core sets at one layer (the
clustering layer); per cluster and sparse layer, neurons are ranked by how many members hold them.
Use (`SimilarityPolicy`): a prompt's own core set at the clustering layer picks its cluster, and
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .observe import RunningStats, Statistic
from .policy import Selection, SelectionPolicy
from .selection import keep_count, rank_neurons

FORMAT = "coreinfer.clusters/1"
PROBE_TENSORS, PROBE_VALUES = 4, 128  # enough to tell models apart, cheap enough to check per request
META_KEYS = {"fingerprint": dict, "layer": int, "build": dict, "sizes": list}  # what a file's metadata needs
BUILD_KEYS = ("alpha", "beta", "statistic", "ranking")  # of its build settings, read by SimilarityPolicy


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
                 ffn_width=model.ffns()[0].width, hidden_size=model.embed_tokens.weight.shape[1],
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
        return f"ClusterSet({len(self.sizes)} clusters, layer {self.layer}, {self.fingerprint[0].get('model_type')})"

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
        check_contents(path, meta, tensors)
        ranks = {int(k.split(".", 1)[1]): v.long() for k, v in tensors.items() if k.startswith("ranks.")}
        out = cls((meta["fingerprint"], tensors["probe"]), meta["layer"], meta["build"], tensors["centroids"],
                  ranks, meta["sizes"], meta.get("info", {}))
        if model is not None:
            out.check(model)
        return out


def check_contents(path, meta: dict, tensors: dict) -> None:
    """One line naming the first key a cluster file of the right format lacks, or the first that is
    malformed (what `ClusterSet` and `SimilarityPolicy` read, so none fails later mid-request)."""
    def bad(what: str):
        return ValueError(f"{path}: damaged cluster file: {what}; rebuild it with `coreinfer cluster`")

    for key, kind in META_KEYS.items():
        if key not in meta:
            raise bad(f"its metadata lacks {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise bad(f"its metadata's {key!r} is not {kind.__name__}")
    missing = [k for k in BUILD_KEYS if k not in meta["build"]]
    if missing:
        raise bad(f"its build settings lack {missing[0]!r}")
    for key in ("probe", "centroids"):
        if key not in tensors:
            raise bad(f"it lacks the tensor {key!r}")
    ranks = [k for k in tensors if k.startswith("ranks.")]
    if not ranks or not all(k.split(".", 1)[1].isdigit() for k in ranks):
        raise bad("it has no ranks.<layer> tensors" if not ranks else f"bad tensor name {ranks[0]!r}")
    shape = (len(meta["sizes"]), meta["fingerprint"].get("ffn_width"))  # [C, F]
    for key in ("centroids", *ranks):
        if tuple(tensors[key].shape) != shape:
            raise bad(f"{key!r} has shape {tuple(tensors[key].shape)}, not [clusters, FFN width] {list(shape)}")


@dataclass
class SimilarityPolicy(SelectionPolicy):
    """Similarity-guided decoding: observe the clustering layer only, assign each prompt to the
    cluster nearest its own core set there, and keep that cluster's top neurons at every sparse layer.

    keep: sparse layer id -> keep ratio (every one must have cluster core sets)."""

    clusters: ClusterSet
    keep: dict[int, float]

    def __post_init__(self):
        missing = sorted(set(self.keep) - set(self.clusters.ranks))
        if missing:
            raise ValueError(f"sparse layers {missing} have no cluster core sets (built for "
                             f"{sorted(self.clusters.ranks)})")

    def wanted(self) -> dict[int, Statistic]:
        # the build's resolved settings, not the decode config's: centroids are frequencies of such sets
        b = self.clusters.build
        return {self.clusters.layer: Statistic(b["statistic"], b["alpha"], b["ranking"])}

    def select(self, stats: dict[int, RunningStats]) -> Selection:
        c = self.clusters
        own = stats[c.layer]
        width = own.primary.shape[1]
        ids = rank_neurons(own.primary, own.secondary, keep_count(c.build["beta"], width))  # [B, k]
        sets = torch.zeros_like(own.primary, dtype=torch.bool).scatter_(1, ids, True)  # [B, F]
        chosen, scores = c.assign(sets)
        rows = torch.tensor(chosen)
        index = {l: c.ranks[l][rows, :keep_count(beta, width)].sort(dim=1).values.to(ids.device)
                 for l, beta in self.keep.items()}
        return Selection(index, chosen, scores)
