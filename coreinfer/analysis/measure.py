"""The two properties CoreInfer rests on, measured on a model, and a head-to-head of its two modes.

stability:  a prompt's core set overlaps the core set of the text that follows it, more so as the
            prompt grows (the paper: stable beyond ~100-200 tokens), and stays close during generation.
similarity: semantically related inputs share core neurons: same-subject MMLU questions overlap more
            than different-subject ones, paraphrases (MRPC) more than non-paraphrases.
modes:      stability- vs similarity-guided decoding on short zero-shot questions (TriviaQA, NQ-open).

Overlap is the paper's |S1 ∩ S2| / |S|. Two random sets of the same size overlap `beta` on average,
so every number here is read against that chance level and against an unrelated-text baseline.
Results are plain dicts of lists (JSON-ready); plotting lives in analysis/cli.py.
"""

from dataclasses import replace

import torch

from ..engine.clusters import SimilarityPolicy
from ..engine.generate import GenerationConfig, decode
from ..engine.policy import CoreConfig
from ..engine.selection import core_neurons
from ..engine.session import Session
from ..eval import data
from ..eval.metrics import mean_and_stderr, normalize_answer, normalized_exact_match
from .clustering import check_build, cluster_sets, sentence_sets


def all_layers(core: CoreConfig) -> CoreConfig:
    """The same selection at every layer: the analyses look at dense layers too."""
    return replace(core, layers="all", beta=core.betas[0])


class Record:
    """A prefill observer that keeps every layer's activations of one sequence [T, F] (analyses only)."""

    def __init__(self, num_layers: int):
        self.acts: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.valid = None

    def __contains__(self, layer: int) -> bool:
        return True

    def __call__(self, layer: int, a: torch.Tensor) -> None:
        self.acts[layer].append(a[0])


def layer_acts(model, ids: list[int]) -> list[torch.Tensor]:
    """One dense forward over one sequence -> each layer's FFN activations [T, F]."""
    record = Record(len(model.ffns()))
    Session(model, [ids], 0).prefill(observer=record)
    return [torch.cat(chunks) for chunks in record.acts]


def set_of(a: torch.Tensor, core: CoreConfig, ranking: str) -> torch.Tensor:
    """Core set of activations a [T, F] as a mask [F]."""
    ids = core_neurons(a, core.alpha, core.betas[0], core.statistic, ranking)
    return torch.zeros(a.shape[1], dtype=torch.bool, device=a.device).index_fill_(0, ids, True)


def mask_overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x & y).sum().item() / max(1, x.sum().item())


# --- stability -------------------------------------------------------------------------------------


def squad_articles(min_tokens: int, encode, limit: int) -> list[list[int]]:
    """Packaged SQuAD paragraphs joined per Wikipedia article: long, coherent texts (token ids)."""
    articles: dict[str, list[str]] = {}
    for item in data.load_gen("squad"):
        title = item.prompt.split("\n", 1)[0].removeprefix("Title: ")
        passage = data.squad_passage({"query": item.prompt})
        if passage not in articles.setdefault(title, []):
            articles[title].append(passage)
    docs = [encode("\n\n".join(ps)) for ps in articles.values()]
    return [d for d in docs if len(d) >= min_tokens][:limit]


def prefix_stability(model, docs: list[list[int]], core: CoreConfig, lengths: list[int],
                     window: int) -> dict:
    """Per prompt length P and layer: overlap of the core set of doc[:P] with that of doc[P:P+window]
    (same), and with the window of the next document (other, the unrelated-text baseline)."""
    ranking = core.statistic_for(model.ffns()[0].gated).ranking
    prompts, follows = [], []  # [D][P][L] masks
    for ids in docs:
        acts = layer_acts(model, ids[:max(lengths) + window])
        prompts.append([[set_of(a[:p], core, ranking) for a in acts] for p in lengths])
        follows.append([[set_of(a[p:p + window], core, ranking) for a in acts] for p in lengths])
    same = torch.tensor([[[mask_overlap(x, y) for x, y in zip(ps, fs)] for ps, fs in zip(pd, fd)]
                         for pd, fd in zip(prompts, follows)])  # [D, P, L]
    other = torch.tensor([[[mask_overlap(x, y) for x, y in zip(ps, fs)] for ps, fs in zip(pd, fd)]
                          for pd, fd in zip(prompts, follows[1:] + follows[:1])])
    return dict(lengths=lengths, window=window, docs=len(docs), same=same.mean(0).tolist(),
                other=other.mean(0).tolist(), same_std=same.std(0).tolist() if len(docs) > 1 else None)


def generation_stability(model, prompts: list[list[int]], core: CoreConfig, new_tokens: int, window: int,
                         eos_ids: set[int]) -> dict:
    """Per window of generated text and layer: overlap of the prompt's core set with the window's.
    Greedy with a mild repetition penalty, so that a small model does not loop on one phrase."""
    gen = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=1.2, ignore_eos=True)
    ranking = core.statistic_for(model.ffns()[0].gated).ranking
    rows = []  # [D, W, L]
    for ids in prompts:
        out = torch.stack(list(decode(Session(model, [ids], new_tokens), gen, eos_ids)))[:, 0].tolist()
        acts = layer_acts(model, ids + out)  # dense, teacher-forced: the activations generation saw
        T0 = len(ids)
        rows.append([[mask_overlap(set_of(a[:T0], core, ranking), set_of(a[s:s + window], core, ranking))
                      for a in acts] for s in range(T0, T0 + new_tokens - window + 1, window)])
    same = torch.tensor(rows)
    return dict(prompt_tokens=[len(p) for p in prompts], window=window,
                window_starts=list(range(0, new_tokens - window + 1, window)), same=same.mean(0).tolist())


# --- similarity ------------------------------------------------------------------------------------


def pair_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUC of telling positive pairs from negative ones by score (0.5 = no signal)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive.numpy(), scores.numpy()))


def group_separation(sets: torch.Tensor, labels: list, lengths: list[int]) -> dict:
    """sets [N, L, F] masks: per layer, mean overlap within and across labels and the pair AUC; with
    the AUC of prompt length alone (closer lengths = same label?) as the confound to beat."""
    lab = torch.tensor([sorted(set(labels)).index(x) for x in labels])
    i, j = torch.triu_indices(len(lab), len(lab), 1)
    same = lab[i] == lab[j]
    x = sets.float().transpose(0, 1)  # [L, N, F]
    pairs = (x @ x.transpose(1, 2))[:, i, j] / x[:, 0].sum(-1).clamp_min(1)[:, None]  # [L, pairs]
    n = torch.tensor(lengths, dtype=torch.float)
    return dict(within=pairs[:, same].mean(1).tolist(), across=pairs[:, ~same].mean(1).tolist(),
                auc=[pair_auc(p, same) for p in pairs], length_auc=pair_auc(-(n[i] - n[j]).abs(), same))


def paraphrase_separation(sets1: torch.Tensor, sets2: torch.Tensor, label: list[int],
                          ids1: list[list[int]], ids2: list[list[int]]) -> dict:
    """Per layer, overlap of each pair's two core sets, by paraphrase label, and its AUC; with the
    token-overlap (Jaccard) AUC as the lexical baseline."""
    y = torch.tensor(label, dtype=torch.bool)
    ov = ((sets1 & sets2).sum(-1).float() / sets1.sum(-1).clamp_min(1)).T  # [L, N]
    jac = torch.tensor([len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(ids1, ids2)])
    return dict(paraphrase=ov[:, y].mean(1).tolist(), other=ov[:, ~y].mean(1).tolist(),
                auc=[pair_auc(o, y) for o in ov], token_jaccard_auc=pair_auc(jac, y), pairs=len(label),
                overlaps=ov.tolist(), labels=label)


def similarity(llm, core: CoreConfig, subjects: list[str], per_subject: int, pairs: int,
               seed: int) -> tuple[dict, torch.Tensor]:
    """MMLU: `per_subject` questions of each subject; MRPC: `pairs` sentence pairs.
    Returns the numbers and the MMLU core sets [N, L, F] (for a map of them)."""
    by_subject: dict[str, list[str]] = {s: [] for s in subjects}
    for subject, q in data.mmlu_questions(None, seed):
        if subject in by_subject:
            by_subject[subject].append(q)
    empty = [s for s, qs in by_subject.items() if not qs]
    if empty:
        raise ValueError(f"no MMLU questions for subjects {empty}")
    rows = [(s, q) for s in subjects for q in by_subject[s][:per_subject]]
    core = all_layers(core)
    ids = [llm.encode(q) for _, q in rows]
    mmlu_sets = sentence_sets(llm.model, ids, core)
    out = dict(mmlu=group_separation(mmlu_sets, [s for s, _ in rows], [len(x) for x in ids]))
    out["mmlu"].update(subjects=subjects, labels=[s for s, _ in rows])
    mrpc = data.mrpc_pairs(pairs, seed)
    ids1, ids2 = [llm.encode(a) for a, _, _ in mrpc], [llm.encode(b) for _, b, _ in mrpc]
    out["mrpc"] = paraphrase_separation(sentence_sets(llm.model, ids1, core), sentence_sets(llm.model, ids2, core),
                                        [y for _, _, y in mrpc], ids1, ids2)
    return out, mmlu_sets


# --- stability vs similarity decoding ----------------------------------------------------------------


def answers(llm, items, core: CoreConfig | None, batch_size: int, max_new_tokens: int) -> tuple[list[str], list]:
    """Greedy answers cut at the items' stop strings, and each item's CoreStats cluster and score."""
    texts, clusters = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        gen = GenerationConfig(max_new_tokens=max_new_tokens, stop=chunk[0].stop)
        done = llm.generate([it.prompt for it in chunk], gen, core)
        texts += [d.text for d in done]
        stats = done[0].stats
        clusters += list(zip(stats.cluster, stats.cluster_score)) if stats and stats.cluster else [None] * len(chunk)
    return texts, clusters


def answer_nll(llm, items, core: CoreConfig | None, batch_size: int) -> list[float]:
    """Per item, the gold answer's negative log-likelihood per token, teacher-forced on the sparse
    model: graded where exact match sits at its floor (a small model rarely answers exactly)."""
    from .eval.runner import encode_pair, score_rows

    rows = [encode_pair(llm.tokenizer.encode, it.prompt, " " + it.answers[0]) for it in items]
    return [-s.logprobs.mean().item() for s in score_rows(llm.model, rows, core, llm.tokenizer.pad_id, batch_size)]


def paired(deltas: torch.Tensor, where: torch.Tensor) -> list[float]:
    """Mean and standard error of per-item differences over the items `where` holds."""
    return list(mean_and_stderr(deltas[where].tolist()))


def compare_modes(llm, task: str, limit: int, corpus_size: int, core: CoreConfig, layers: list[int], k: int | None,
                  seed: int, batch_size: int = 16, max_new_tokens: int = 24) -> dict:
    """Dense vs stability vs similarity (one cluster set per clustering layer) on `limit` items of a
    packaged short-answer task; clusters come from `corpus_size` *other* items of the task, in the
    same prompt format. Similarity is compared with stability item by item, overall and on the
    shorter and longer half of the prompts (the claim: it helps where a prompt's own statistics are thin)."""
    items = data.load_gen(task, None, seed)
    if any(it.stop != items[0].stop for it in items):
        raise ValueError(f"{task}: items with different stop strings")
    evaluated, corpus = items[:limit], items[limit:limit + corpus_size]
    for layer in layers:
        check_build(llm.model, core, layer)
    corpus_ids = [llm.encode(it.prompt) for it in corpus]
    sets = sentence_sets(llm.model, corpus_ids, core)  # one corpus pass for every clustering layer
    settings = {"dense": None, "stability": core}
    for layer in layers:
        info = dict(model=llm.name, corpus=f"{task} prompts {limit}..{limit + len(corpus)} (seed {seed})")
        clusters = cluster_sets(llm.model, sets, [len(p) for p in corpus_ids], core, layer, k, seed=seed, info=info)
        settings[f"similarity@{layer}"] = SimilarityPolicy(clusters, core.keep(len(llm.model.ffns())))
    lengths = torch.tensor([len(llm.encode(it.prompt)) for it in evaluated])
    short = lengths <= lengths.float().median()
    everyone = torch.ones_like(short)
    out = dict(task=task, items=len(evaluated), corpus=len(corpus), median_prompt_tokens=lengths.median().item(),
               results={})
    texts, nll = {}, {}
    for name, setting in settings.items():
        texts[name], chosen = answers(llm, evaluated, setting, batch_size, max_new_tokens)
        nll[name] = torch.tensor(answer_nll(llm, evaluated, setting, batch_size))
        answered = [i for i, d in enumerate(texts["dense"]) if normalize_answer(d)]
        res = dict(exact_match=mean_and_stderr([normalized_exact_match(t, it.answers)
                                                for t, it in zip(texts[name], evaluated)]),
                   dense_agreement=mean_and_stderr([float(normalize_answer(texts[name][i]) ==
                                                          normalize_answer(texts["dense"][i])) for i in answered]),
                   dense_answered=len(answered), answer_nll=mean_and_stderr(nll[name].tolist()))
        if isinstance(setting, SimilarityPolicy):
            delta = nll[name] - nll["stability"]  # < 0: similarity assigns the gold answer more probability
            res.update(nll_minus_stability=paired(delta, everyone), short_half=paired(delta, short),
                       long_half=paired(delta, ~short), mean_cluster_score=sum(s for _, s in chosen) / len(chosen),
                       clusters=len(setting.clusters.sizes), cluster_info={k: v for k, v in setting.clusters.info.items()
                                                                          if k != "labels"},
                       cluster_counts=torch.bincount(torch.tensor([c for c, _ in chosen]),
                                                     minlength=len(setting.clusters.sizes)).tolist())
        out["results"][name] = res
    return out
