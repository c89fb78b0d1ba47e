"""`coreinfer cluster` and `coreinfer analyze {stability,similarity,modes}`: commands and plots.

    coreinfer cluster --corpus triviaqa --limit 1000 --skip 200 --output tqa.clusters.safetensors
    coreinfer generate "Question: Who wrote Hamlet?\\nAnswer:" --mode similarity --clusters tqa.clusters.safetensors
    coreinfer analyze stability  --output results/stability      # -> .json, .png
    coreinfer analyze similarity --output results/similarity     # -> .json, .png
    coreinfer analyze modes --tasks triviaqa,nq_open --limit 200 --output results/modes   # -> .json
"""

import argparse
import json
import sys
from pathlib import Path

from ..cli.args import add_runtime_args, runtime_kwargs
from ..engine.policy import CoreConfig
from ..eval import data
from . import measure

SUBJECTS = ("astronomy", "high_school_biology", "high_school_macroeconomics", "elementary_mathematics",
            "world_religions", "high_school_geography")  # distinct topics, mostly short questions


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected integers separated by commas, got {text!r}") from None


def int_range(text: str) -> tuple[int, ...]:
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 2 <= int(lo) <= int(hi)):
        raise ValueError(f"--k-range takes 'LO-HI' with 2 <= LO <= HI, got {text!r}")
    return tuple(range(int(lo), int(hi) + 1))


def add_selection_args(p: argparse.ArgumentParser, layers: bool) -> None:
    d = CoreConfig()
    g = p.add_argument_group("core neurons")
    g.add_argument("--alpha", type=float, default=d.alpha, help="token-wise core fraction")
    g.add_argument("--beta", type=float, default=d.beta, help="core-set size as a fraction of the FFN")
    g.add_argument("--statistic", default=d.statistic, help="frequency (paper) or norm (GRIFFIN)")
    g.add_argument("--ranking", default=d.ranking, help="auto, abs, signed, relu")
    if layers:
        g.add_argument("--layers", default=None, help="sparse layers to store sets for (default: the policy)")


def selection(args) -> CoreConfig:
    return CoreConfig(alpha=args.alpha, beta=args.beta, statistic=args.statistic, ranking=args.ranking,
                      layers=getattr(args, "layers", None))


def load_llm(args):
    from ..api import LLM

    return LLM(**runtime_kwargs(args))


def write_json(prefix: str, result: dict) -> Path:
    path = Path(prefix).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


# --- cluster -----------------------------------------------------------------------------------------


def corpus_texts(name: str, limit: int | None, skip: int, seed: int) -> list[str]:
    """The packaged TriviaQA/NQ-open prompts (as `eval` formats them), MMLU questions, or a user file:
    .jsonl with a "text" field per line, else one text per non-empty line."""
    if name in ("triviaqa", "nq_open"):
        texts = [it.prompt for it in data.load_gen(name, None, seed)]
    elif name == "mmlu":
        texts = [q for _, q in data.mmlu_questions(None, seed)]
    elif Path(name).suffix == ".jsonl":
        texts = [d.text for d in data.text_documents(name)]
    elif Path(name).is_file():
        texts = [line.strip() for line in Path(name).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"--corpus takes triviaqa, nq_open, mmlu or a file, got {name!r}")
    texts = texts[skip:skip + limit if limit else None]
    if len(texts) < 2:
        raise ValueError(f"the corpus has {len(texts)} texts after --skip; clustering needs at least 2")
    return texts


def cmd_cluster(args) -> None:
    from .clustering import build_clusters

    core = selection(args)
    texts = corpus_texts(args.corpus, args.limit, args.skip, args.seed)
    llm = load_llm(args)
    layer = len(llm.model.layers) // 2 if args.layer is None else args.layer
    prompts = [llm.encode(args.template.replace("{text}", t), chat=args.chat) for t in texts]
    info = dict(model=llm.name, corpus=args.corpus, limit=args.limit, skip=args.skip, seed=args.seed,
                template=args.template, chat=args.chat)
    print(f"core sets of {len(prompts)} texts at layers {core.sparse_layers(len(llm.model.layers))}, "
          f"clustering at layer {layer}", file=sys.stderr)
    clusters = build_clusters(llm.model, prompts, core, layer, args.clusters, args.k_range, args.seed, info)
    clusters.save(args.output)
    for k, s in clusters.info.get("silhouette", {}).items():
        print(f"k={k:>3}  silhouette {s:.4f}")
    print(f"{len(clusters.sizes)} clusters ({clusters.info['criterion']}), sizes {clusters.sizes}, mean tokens "
          f"{clusters.info['mean_tokens']}, mean overlap "
          f"of a sentence with its cluster's members {clusters.info['mean_member_overlap']:.3f}")
    labels = clusters.info["labels"]
    for c in range(len(clusters.sizes)):
        examples = [t for t, lab in zip(texts, labels) if lab == c][:args.show]
        print(f"cluster {c}: " + " | ".join(e.replace("\n", " ")[:70] for e in examples))
    print(f"saved {args.output}")


# --- analyses ----------------------------------------------------------------------------------------


def cmd_stability(args) -> None:
    core, lengths = selection(args), int_list(args.lengths)
    llm = load_llm(args)
    if args.text:
        docs = [llm.encode(d.text) for d in data.text_documents(args.text)]
        docs = [d for d in docs if len(d) >= max(lengths) + args.window][:args.docs]
    else:
        docs = measure.squad_articles(max(lengths) + args.window, llm.encode, args.docs)
    if len(docs) < 2:
        raise ValueError(f"need 2 documents of at least {max(lengths) + args.window} tokens, found {len(docs)}")
    result = dict(model=llm.name, beta=core.betas[0], alpha=core.alpha, statistic=core.statistic,
                  sparse_layers=core.sparse_layers(len(llm.model.layers)),
                  prefix=measure.prefix_stability(llm.model, docs, core, lengths, args.window))
    prompts = [d[:args.gen_prompt] for d in docs[:args.gen_docs]]
    result["generation"] = measure.generation_stability(llm.model, prompts, core, args.gen_tokens, args.window,
                                                         llm.tokenizer.eos_ids)
    print(f"wrote {write_json(args.output, result)}, {plot_stability(result, args.output)}")
    print_stability(result)


def cmd_similarity(args) -> None:
    core = selection(args)
    llm = load_llm(args)
    result, sets = measure.similarity(llm, core, args.subjects.split(","), args.per_subject, args.pairs, args.seed)
    layer = len(llm.model.layers) // 2 if args.layer is None else args.layer
    result.update(model=llm.name, beta=core.betas[0], alpha=core.alpha, layer=layer)
    png = plot_similarity(result, sets[:, layer], args.output)
    print(f"wrote {write_json(args.output, result)}, {png}")
    m, r = result["mmlu"], result["mrpc"]
    print(f"layer  MMLU within/across  AUC | MRPC para/other  AUC   (length AUC {m['length_auc']:.3f}, "
          f"token-Jaccard AUC {r['token_jaccard_auc']:.3f}, chance overlap {core.betas[0]:.2f})")
    for i in range(len(m["auc"])):
        print(f"{i:>5}  {m['within'][i]:.3f}/{m['across'][i]:.3f}  {m['auc'][i]:.3f} | "
              f"{r['paraphrase'][i]:.3f}/{r['other'][i]:.3f}  {r['auc'][i]:.3f}")


def cmd_modes(args) -> None:
    core = selection(args)
    llm = load_llm(args)
    layers = int_list(args.layer) if args.layer else [len(llm.model.layers) // 2]
    runs = [measure.compare_modes(llm, task, args.limit, args.corpus_size, core, layers, args.clusters, args.seed,
                                   args.batch_size, args.max_new_tokens) for task in args.tasks.split(",")]
    result = dict(model=llm.name, beta=core.betas[0], alpha=core.alpha, layers=layers, runs=runs)
    print(f"wrote {write_json(args.output, result)}")
    print("task      setting         exact match    agrees w/ dense  answer NLL/token  "
          "NLL - stability (all | short half | long half)  clusters")
    for run in runs:
        for name, r in run["results"].items():
            line = f"{run['task']:<9} {name:<15} {pm(r['exact_match'])}  {pm(r['dense_agreement'])}  " \
                   f"{pm(r['answer_nll'])}  "
            if "nll_minus_stability" in r:
                line += f"{pm(r['nll_minus_stability'], '+')} | {pm(r['short_half'], '+')} | " \
                        f"{pm(r['long_half'], '+')}  " \
                        f"{r['clusters']} (score {r['mean_cluster_score']:.3f})"
            print(line)


def pm(mean_stderr: list[float], sign: str = "") -> str:
    return f"{mean_stderr[0]:{sign}.3f} ± {mean_stderr[1]:.3f}"


# --- plots -------------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def model_name(result: dict) -> str:
    return Path(result["model"].split(" (")[0]).name  # the source, without the conversion cache path


def mean_over(rows: list[list[float]], layers: list[int]) -> list[float]:
    return [sum(r[i] for i in layers) / len(layers) for r in rows]


def plot_stability(result: dict, prefix: str) -> Path:
    plt = pyplot()
    pre, gen, sparse = result["prefix"], result["generation"], result["sparse_layers"]
    shown = [sparse[0], sparse[len(sparse) // 2], sparse[-1]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    a.plot(pre["lengths"], mean_over(pre["same"], sparse), "o-", lw=2.5, label="same text (mean, sparse layers)")
    a.plot(pre["lengths"], mean_over(pre["other"], sparse), "s--", lw=2, label="another text (mean)")
    for i, l in enumerate(shown):
        a.plot(pre["lengths"], [r[l] for r in pre["same"]], lw=1, color=f"C{i + 2}", label=f"same text, layer {l}")
    a.set(xscale="log", xlabel="prompt tokens P", ylabel="overlap with the core set of the next tokens",
          title=f"prompt [0,P) vs its next {pre['window']} tokens ({pre['docs']} texts)")
    a.set_xticks(pre["lengths"], [str(x) for x in pre["lengths"]])
    a.minorticks_off()
    starts = gen["window_starts"]
    b.plot(starts, mean_over(gen["same"], sparse), "o-", lw=2.5, label="mean, sparse layers")
    for i, l in enumerate(shown):
        b.plot(starts, [r[l] for r in gen["same"]], lw=1, color=f"C{i + 2}", label=f"layer {l}")
    b.set(xlabel="generated tokens so far", title=f"prompt vs generated windows of {gen['window']} tokens")
    for ax in (a, b):
        ax.axhline(result["beta"], color="gray", ls=":", label=f"chance ({result['beta']:.2f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Core-set stability, beta {result['beta']}: {model_name(result)}", fontsize=10)
    return save(fig, prefix, plt)


def plot_similarity(result: dict, sets, prefix: str) -> Path:
    from sklearn.manifold import TSNE

    plt = pyplot()
    m, r, layer = result["mmlu"], result["mrpc"], result["layer"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    a.plot(m["auc"], "o-", label="MMLU: same subject vs not")
    a.plot(r["auc"], "s-", label="MRPC: paraphrase vs not")
    a.axhline(m["length_auc"], color="C0", ls="--", lw=1, label="MMLU by length alone")
    a.axhline(r["token_jaccard_auc"], color="C1", ls="--", lw=1, label="MRPC by shared tokens alone")
    a.axhline(0.5, color="gray", ls=":")
    a.set(xlabel="layer", ylabel="pair AUC of core-set overlap", title="Does overlap tell related inputs apart?")
    a.legend(fontsize=7), a.grid(alpha=0.3)
    x = sets.float()
    dist = 1 - (x @ x.T / x.sum(1).clamp_min(1)[:, None]).clamp(0, 1)
    xy = TSNE(2, metric="precomputed", init="random", perplexity=min(30, len(x) - 1), random_state=0) \
        .fit_transform(dist.numpy())
    for i, s in enumerate(m["subjects"]):
        pts = [p for p, lab in zip(xy, m["labels"]) if lab == s]
        b.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color=f"C{i}", label=s.replace("_", " "))
    b.set(title=f"t-SNE of MMLU core sets (1 - overlap), layer {layer}", xticks=[], yticks=[])
    b.legend(fontsize=7)
    ov = r["overlaps"][layer]
    bins = [min(ov) + (max(ov) - min(ov)) * i / 25 for i in range(26)]  # shared, so the bars compare
    for lab, name in ((1, "paraphrase"), (0, "not paraphrase")):
        c.hist([o for o, y in zip(ov, r["labels"]) if y == lab], bins=bins, alpha=0.6, label=name, density=True)
    c.set(xlabel="core-set overlap of the two sentences", title=f"MRPC pairs, layer {layer}")
    c.legend(fontsize=7)
    fig.suptitle(f"Core-set similarity, beta {result['beta']}: {model_name(result)}", fontsize=10)
    return save(fig, prefix, plt)


def save(fig, prefix: str, plt) -> Path:
    path = Path(prefix).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_stability(result: dict) -> None:
    pre, gen, sparse = result["prefix"], result["generation"], result["sparse_layers"]
    print("prompt tokens  overlap with next tokens (same text / another text), mean over sparse layers")
    for p, s, o in zip(pre["lengths"], mean_over(pre["same"], sparse), mean_over(pre["other"], sparse)):
        print(f"{p:>13}  {s:.3f} / {o:.3f}")
    print("generated so far  overlap of the prompt's set with the next window, mean over sparse layers")
    for t, s in zip(gen["window_starts"], mean_over(gen["same"], sparse)):
        print(f"{t:>16}  {s:.3f}")


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="cluster a corpus by core sets; save per-cluster core sets for --mode similarity")
    p.add_argument("--corpus", required=True, help="triviaqa, nq_open, mmlu, or a .jsonl/.txt file")
    p.add_argument("--output", required=True, help="cluster file to write (.safetensors)")
    p.add_argument("--limit", type=int, default=1000, help="texts to use (after --skip)")
    p.add_argument("--skip", type=int, default=0, help="skip the first N shuffled items (e.g. those eval uses)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed, as eval's --seed")
    p.add_argument("--template", default="{text}", help="prompt format; {text} is the corpus text")
    p.add_argument("--chat", action="store_true", help="wrap each text in the chat template")
    p.add_argument("--layer", type=int, default=None, help="clustering layer (default: the middle layer)")
    p.add_argument("--clusters", type=int, default=None, help="number of clusters (default: best silhouette)")
    p.add_argument("--k-range", type=int_range, default=tuple(range(2, 17)), help="silhouette search range")
    p.add_argument("--show", type=int, default=3, help="example texts printed per cluster")
    add_runtime_args(p), add_selection_args(p, layers=True)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("analyze", help="measure core-set stability or similarity on this model (JSON + PNG)")
    kinds = p.add_subparsers(dest="analysis", required=True)
    s = kinds.add_parser("stability", help="prompt vs following-text core-set overlap, by prompt length")
    s.add_argument("--text", default=None, help=".jsonl/.txt documents (default: packaged SQuAD articles)")
    s.add_argument("--docs", type=int, default=8)
    s.add_argument("--lengths", default="8,16,32,64,128,256,512", help="prompt lengths in tokens")
    s.add_argument("--window", type=int, default=64, help="tokens of following text per comparison")
    s.add_argument("--gen-docs", type=int, default=4, help="prompts to generate from")
    s.add_argument("--gen-prompt", type=int, default=128, help="prompt tokens for the generation run")
    s.add_argument("--gen-tokens", type=int, default=256, help="tokens to generate")
    s.set_defaults(func=cmd_stability)
    s = kinds.add_parser("similarity", help="core-set overlap within vs across MMLU subjects; MRPC paraphrases")
    s.add_argument("--subjects", default=",".join(SUBJECTS), help="MMLU subjects, comma-separated")
    s.add_argument("--per-subject", type=int, default=40)
    s.add_argument("--pairs", type=int, default=300, help="MRPC pairs")
    s.add_argument("--layer", type=int, default=None, help="layer of the map (default: the middle layer)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_similarity)
    s = kinds.add_parser("modes", help="dense vs stability vs similarity decoding on short zero-shot QA")
    s.add_argument("--tasks", default="triviaqa,nq_open")
    s.add_argument("--limit", type=int, default=200, help="evaluated items per task")
    s.add_argument("--corpus-size", type=int, default=1000, help="other items of the task to cluster")
    s.add_argument("--layer", default=None, help="clustering layer(s), comma-separated (default: the middle one)")
    s.add_argument("--clusters", type=int, default=None, help="number of clusters (default: best silhouette)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-new-tokens", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_modes)
    for name, s in kinds.choices.items():
        s.add_argument("--output", required=True, help="PREFIX for PREFIX.json (and PREFIX.png)")
        add_runtime_args(s), add_selection_args(s, layers=name == "modes")
