"""Similarity-guided selection: clustering recovers planted groups (hand-made core sets, and a tiny
random model fed disjoint vocabularies), a new member of any length is assigned to its group, cluster
files round-trip and refuse other models, and clusters equal to the prompts' own core sets decode
exactly as stability mode. Cluster files and profiles missing a key are refused in one line naming it."""

import argparse
import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import adjusted_rand_score

from coreinfer.analysis.clustering import build_clusters, choose_k, kmeans, rank_by_members, sentence_sets
from coreinfer.analysis.measure import group_separation, layer_acts, paraphrase_separation, prefix_stability
from coreinfer.cli.args import add_core_args, core_config, core_grid
from coreinfer.cli.main import main
from coreinfer.engine.clusters import ClusterSet, SimilarityPolicy, model_fingerprint, same_model
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.profile import LayerBudget, Profile
from coreinfer.engine.selection import core_neurons, overlap
from coreinfer.engine.session import Session, make_policy, stability_policy
from coreinfer.eval.scoring import continuation_logprobs
from coreinfer.models import build_model
from oracle import hf_pair

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=160)
CORE = CoreConfig(alpha=0.4, beta=0.5, layers="1-2")
GROUPS = [range(0, 4), range(30, 34), range(60, 64)]  # disjoint vocabularies: the planted topics


def tiny_model(seed=0):
    return hf_pair(transformers.LlamaConfig(**TINY), seed=seed)[1]


def group_prompts(per_group: int, lengths: tuple[int, int], seed: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts, truth = [], []
    for label, vocab in enumerate(GROUPS):
        for _ in range(per_group):
            n = int(torch.randint(*lengths, (1,), generator=g))
            prompts.append([vocab[int(i)] for i in torch.randint(len(vocab), (n,), generator=g)])
            truth.append(label)
    return prompts, truth


def planted_sets(per_group=12, width=120, k=60, swaps=6, seed=0) -> tuple[torch.Tensor, list[int]]:
    """Multi-hot core sets [N, F]: three random prototypes, each member with `swaps` neurons exchanged."""
    g = torch.Generator().manual_seed(seed)
    rows, truth = [], []
    for label in range(3):
        proto = torch.randperm(width, generator=g)[:k]
        for _ in range(per_group):
            ids = proto.clone()
            outside = torch.tensor([n for n in range(width) if n not in set(proto.tolist())])
            ids[torch.randperm(k, generator=g)[:swaps]] = outside[torch.randperm(len(outside), generator=g)[:swaps]]
            rows.append(torch.zeros(width, dtype=torch.bool).index_fill_(0, ids, True))
            truth.append(label)
    return torch.stack(rows), truth


def test_kmeans_on_planted_core_sets_recovers_groups_and_their_count():
    x, truth = planted_sets()
    k, scores = choose_k(x, list(range(2, 8)))
    print("silhouette per k:", {c: round(s, 3) for c, s in scores.items()})
    assert k == 3
    labels, centroids = kmeans(x, 3)
    assert adjusted_rand_score(truth, labels.numpy()) == 1.0
    # each cluster's top-60 by member frequency is its prototype: every member holds it but for swaps
    top = rank_by_members(x, labels, 3)[:, :60]
    for c in range(3):
        members = x[labels == c]
        assert members.float().mean(0)[top[c]].min() > 0.5
    assert torch.allclose(centroids.sum(1), torch.full((3,), 60.0))


def test_rank_by_members_breaks_ties_by_corpus_frequency():
    sets = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    labels = torch.tensor([0, 0, 1, 1])
    ranks = rank_by_members(sets, labels, 2)
    # cluster 0: n0 in both; n1 and n2 once each, n2 is more frequent over the corpus (3 of 4)
    assert ranks[0].tolist() == [0, 2, 1, 3]
    assert ranks[1].tolist() == [2, 3, 1, 0]


def test_tiny_model_clusters_recover_planted_groups_and_assign_new_members_of_any_length():
    model = tiny_model()
    prompts, truth = group_prompts(10, (6, 40), seed=0)
    clusters = build_clusters(model, prompts, CORE, layer=1, ks=tuple(range(2, 7)))
    print(clusters, clusters.info)
    assert clusters.info["criterion"] == "silhouette" and len(clusters.sizes) == 3
    own = sentence_sets(model, prompts, CORE)[:, 0]  # [N, F] at the clustering layer (sparse layer 1)
    chosen, scores = clusters.assign(own)
    assert adjusted_rand_score(truth, chosen) == 1.0
    group_cluster = {t: c for t, c in zip(truth, chosen)}
    # new members, from 2 tokens to 150: the assignment follows the vocabulary, not the length
    for lengths in [(2, 4), (10, 20), (120, 150)]:
        new, new_truth = group_prompts(3, lengths, seed=1)
        got, got_scores = clusters.assign(sentence_sets(model, new, CORE)[:, 0])
        print(lengths, got, [round(s, 3) for s in got_scores])
        assert got == [group_cluster[t] for t in new_truth]
        assert all(0.5 < s <= 1.0 for s in got_scores)


def test_cluster_file_round_trips_and_refuses_another_model(tmp_path):
    model = tiny_model()
    prompts, _ = group_prompts(4, (6, 20), seed=0)
    clusters = build_clusters(model, prompts, CORE, layer=2, k=3, info=dict(model="tiny-0"))
    path = tmp_path / "tiny.clusters.safetensors"
    clusters.save(path)
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, metadata as JSON
        assert "coreinfer" in f.metadata() and "centroids" in f.keys()
    back = ClusterSet.load(path, model)
    assert back.layer == 2 and back.sizes == clusters.sizes and back.build == clusters.build
    assert torch.equal(back.centroids, clusters.centroids)
    assert all(torch.equal(back.ranks[l], clusters.ranks[l]) for l in (1, 2))
    # the same weights in bf16 are the same model; other weights of the same shape are not
    hf_config = transformers.LlamaConfig(**TINY)
    as_bf16 = build_model(hf_config.to_dict(), hf_pair(hf_config, seed=0)[0].state_dict(), dtype=torch.bfloat16)
    assert same_model(model_fingerprint(model), model_fingerprint(as_bf16))
    with pytest.raises(ValueError, match="another model"):
        ClusterSet.load(path, tiny_model(seed=1))
    other = CoreConfig(alpha=0.4, beta=0.5, layers="1-2", mode="similarity", clusters=str(path))
    with pytest.raises(ValueError, match="another model"):  # also refused when a session's policy is made
        make_policy(other, tiny_model(seed=1))
    (tmp_path / "junk").write_bytes(b"not a cluster file")
    with pytest.raises(ValueError, match="not a cluster file"):
        ClusterSet.load(tmp_path / "junk")


def test_similarity_mode_with_each_prompts_own_set_equals_stability_mode():
    model = tiny_model()
    prompts = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64]]
    conts = [[11, 4, 90, 23, 6], [50, 8, 19, 70, 2]]
    # one cluster per prompt, built from the prompts themselves: every cluster set is a prompt's own set
    clusters = build_clusters(model, prompts, CORE, layer=1, k=2)
    similar = SimilarityPolicy(clusters, CORE.keep(4))
    stable = continuation_logprobs(model, prompts, conts, CORE)
    guided = continuation_logprobs(model, prompts, conts, similar)
    for s, g in zip(stable, guided):
        assert torch.equal(s, g)
    # the selection itself, and what it reports
    own = Session(model, prompts, 1, policy=stability_policy(CORE, model))
    own.prefill()
    guided = Session(model, prompts, 1, policy=similar)
    guided.prefill()
    assert all(torch.equal(guided.selection.index[l], own.selection.index[l]) for l in own.selection.index)
    assert sorted(guided.stats.cluster) == [0, 1] and guided.stats.cluster_score == [1.0, 1.0]
    assert own.stats.cluster is None


def test_similarity_config_errors():
    model = tiny_model()
    prompts, _ = group_prompts(2, (4, 8), seed=0)
    clusters = build_clusters(model, prompts, CORE, layer=1, k=2)
    with pytest.raises(ValueError, match="needs a cluster file"):
        CoreConfig(mode="similarity")
    with pytest.raises(ValueError, match="mode must be"):
        CoreConfig(mode="semantic")
    with pytest.raises(ValueError, match="must be one of the sparse layers"):
        build_clusters(model, prompts, CORE, layer=3, k=2)
    with pytest.raises(ValueError, match=r"sparse layers \[3\] have no cluster core sets"):
        SimilarityPolicy(clusters, CoreConfig(layers="1-3").keep(4))


def parse(argv, grid=False):
    p = argparse.ArgumentParser()
    add_core_args(p, grid=grid)
    return p.parse_args(argv)


def test_cli_mode_and_clusters_flags(tmp_path):
    model = tiny_model()
    prompts, _ = group_prompts(2, (4, 8), seed=0)
    path = tmp_path / "c.safetensors"
    build_clusters(model, prompts, CORE, layer=1, k=2).save(path)
    core = core_config(parse(["--layers", "1-2", "--mode", "similarity", "--clusters", str(path)]))
    assert core.mode == "similarity" and core.clusters == str(path)
    assert core_config(parse(["--layers", "1-2"])).clusters is None
    grid = core_grid(parse(["--beta", "0.5", "--mode", "stability,similarity", "--clusters", str(path)], grid=True))
    assert [c and c.mode for c in grid] == [None, "stability", "similarity"]
    assert grid[2].clusters is not None and grid[1].clusters is None
    for argv, message in [(["--mode", "similarity"], "needs --clusters"),
                          (["--clusters", str(path)], "only used with --mode similarity")]:
        with pytest.raises(ValueError, match=message):
            core_config(parse(argv))


def test_cluster_command_then_similarity_generate_and_refusal(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The capital of France is Paris.", "The capital of Italy is Rome.",
                                 "The printing press changed how people thought.",
                                 "Scholars argue about the fifteenth century press."] * 3))
    out = tmp_path / "tiny.clusters.safetensors"
    common = ["--model", str(tiny_model_dir), "--threads", "1", "--layers", "1-2"]
    assert main(["cluster", "--corpus", str(corpus), "--layer", "1", "--clusters", "2", "--output", str(out),
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "2 clusters (given)" in printed and "cluster 1:" in printed
    gen = ["generate", "The capital of Italy", "--max-new-tokens", "3", "--mode", "similarity",
           "--clusters", str(out), *common]
    assert main(gen) == 0
    assert ", cluster " in capsys.readouterr().err  # the chosen cluster and its overlap are reported
    # the same folder with other weights is another model: refused before decoding
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    torch.manual_seed(1)
    config = transformers.AutoConfig.from_pretrained(other)
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    capsys.readouterr()
    assert main([*gen[:-len(common)], "--model", str(other), "--threads", "1", "--layers", "1-2"]) == 2
    assert "another model" in capsys.readouterr().err
    # the right format tag but a key missing: one line naming it
    damaged = tmp_path / "damaged.clusters.safetensors"
    rewrite_without(out, damaged, meta_key="fingerprint")
    capsys.readouterr()
    assert main([*gen[:-len(common) - 1], str(damaged), *common]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"coreinfer: error: {damaged}: damaged cluster file: its metadata lacks "
                                        "'fingerprint'; rebuild it with `coreinfer cluster`"]


def rewrite_without(src, dst, meta_key=None, build_key=None, tensor=None) -> None:
    """A copy of the cluster file `src` at `dst` with one metadata key, build setting or tensor
    (prefix: "ranks." drops every ranks tensor) removed; the format tag stays."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["coreinfer"])
        tensors = {k: f.get_tensor(k) for k in f.keys() if not (tensor and k.startswith(tensor))}
    meta.pop(meta_key, None)
    meta.get("build", {}).pop(build_key, None)
    save_file(tensors, str(dst), metadata={"coreinfer": json.dumps(meta)})


@pytest.mark.parametrize("removed,named", [
    (dict(meta_key="fingerprint"), "its metadata lacks 'fingerprint'"),
    (dict(meta_key="layer"), "its metadata lacks 'layer'"),
    (dict(meta_key="build"), "its metadata lacks 'build'"),
    (dict(meta_key="sizes"), "its metadata lacks 'sizes'"),
    (dict(build_key="statistic"), "its build settings lack 'statistic'"),
    (dict(build_key="beta"), "its build settings lack 'beta'"),
    (dict(tensor="probe"), "it lacks the tensor 'probe'"),
    (dict(tensor="centroids"), "it lacks the tensor 'centroids'"),
    (dict(tensor="ranks."), "it has no ranks.<layer> tensors"),
], ids=lambda v: next(iter(v.values())) if isinstance(v, dict) else None)
def test_cluster_file_missing_key_is_one_line(tmp_path, removed, named):
    model = tiny_model()
    path, damaged = tmp_path / "ok.safetensors", tmp_path / "damaged.safetensors"
    build_clusters(model, group_prompts(2, (6, 10), seed=0)[0], CORE, layer=1, k=2).save(path)
    ClusterSet.load(path, model)
    rewrite_without(path, damaged, **removed)
    with pytest.raises(ValueError) as err:
        ClusterSet.load(damaged, model)
    print(err.value)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_cluster_file_wrong_shapes_named(tmp_path):
    model = tiny_model()
    path = tmp_path / "ok.safetensors"
    build_clusters(model, group_prompts(2, (6, 10), seed=0)[0], CORE, layer=1, k=2).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "ranks.2": tensors["ranks.2"][:, :5].contiguous()}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"'ranks.2' has shape \(2, 5\), not \[clusters, FFN width\] \[2, 192\]"):
        ClusterSet.load(path, model)


def test_analysis_separation_numbers_on_planted_sets():
    x, truth = planted_sets(per_group=6)
    sets = torch.stack([x, x], 1)  # [N, L=2, F]: the same sets at two layers
    res = group_separation(sets, truth, lengths=[10] * len(truth))
    assert res["auc"] == [1.0, 1.0] and res["length_auc"] == 0.5  # equal lengths carry no signal
    assert res["within"][0] > 0.75 > 0.6 > res["across"][0]  # 54 of 60 shared vs random halves
    # MRPC-like pairs: a member with a same-group member (paraphrase) or an other-group member (not)
    a = x[[0, 1, 6, 7]]
    y = [1, 0, 1, 0]
    b = x[[2, 12, 8, 13]]  # same group, other group, same group, other group
    para = paraphrase_separation(a[:, None], b[:, None], y, [[1, 2], [3], [1], [4]], [[1, 2], [5], [1], [6]])
    assert para["auc"] == [1.0] and para["token_jaccard_auc"] == 1.0 and para["paraphrase"][0] > para["other"][0]


def test_prefix_stability_against_sets_computed_by_hand():
    """prefix_stability's overlap of doc[:P]'s core set with doc[P:P+window]'s, per layer, against the
    same sets taken from each layer's activations with core_neurons and selection.overlap."""
    model = tiny_model()
    docs = [list(range(1, 41)), list(range(41, 81))]
    core = CoreConfig(beta=0.5)
    half = prefix_stability(model, docs, core, lengths=[4, 16], window=8)
    same = torch.tensor(half["same"])  # [P, L]
    assert same.shape == (2, 4)
    for pi, p in enumerate([4, 16]):
        for layer in range(4):
            by_hand = []
            for doc in docs:
                a = layer_acts(model, doc[:16 + 8])[layer]  # [T, F]
                prompt, follow = (core_neurons(x, 0.4, 0.5, "frequency", "abs") for x in (a[:p], a[p:p + 8]))
                by_hand.append(overlap(prompt, follow))
            assert same[pi, layer].item() == pytest.approx(sum(by_hand) / 2)
    assert same.min() < 1.0  # keep 0.5 sets do differ between a prompt and its continuation


@pytest.mark.parametrize("field", ["probe", "model", "layers"])
def test_profile_missing_field_is_named(tmp_path, field):
    """A profile (engine/profile.py: it carries the cluster file's fingerprint) of the right format
    without one of its fields: one line naming that field, not the KeyError's bare name."""
    path = tmp_path / "tiny.json"
    Profile.for_model(tiny_model(), {1: LayerBudget(keep=0.5)}, {"meets_target": True}).save(path)
    doc = json.loads(path.read_text())
    del doc[field]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    print(err.value)
    assert str(err.value) == f"--profile {path}: the profile lacks its {field!r} field; run `coreinfer calibrate`"
