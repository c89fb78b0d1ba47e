"""Which layers tolerate a prompt-fixed core set? Sparsify one layer at a time and measure the
continuation perplexity on packaged SQuAD paragraphs (first half prompt, second half scored).

    python benchmarks/layer_sensitivity.py --limit 20 --beta 0.5

Prints a table (layer, ppl, ratio to dense) and writes a PNG plot; the default layer policy in
coreinfer/core.py was chosen from this on the embedded model (docs/quality.md).
"""

import argparse
import math

import torch
from tqdm import tqdm

from coreinfer import LLM, CoreConfig
from coreinfer.eval.data import squad_documents
from coreinfer.eval.scoring import continuation_logprobs


def split_halves(llm, docs, max_tokens=512):
    pairs = []
    for doc in docs:
        ids = llm.tokenizer.encode(doc.text)[:max_tokens]
        pairs.append((ids[:len(ids) // 2], ids[len(ids) // 2:]))
    return pairs


def perplexity(llm, pairs, core) -> float:
    nll = n = 0
    for prompt, cont in pairs:
        [lp] = continuation_logprobs(llm.model, [prompt], [cont], core)
        nll -= lp.double().sum().item()
        n += len(cont)
    return math.exp(nll / n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--statistic", default="frequency")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot", default="docs/img/layer_sensitivity.png")
    args = p.parse_args()
    llm = LLM(threads=args.threads, progress=False)
    pairs = split_halves(llm, squad_documents(args.limit, seed=0))
    dense = perplexity(llm, pairs, None)
    rows = []
    for layer in tqdm(range(len(llm.model.layers)), desc="layers"):
        ppl = perplexity(llm, pairs, CoreConfig(beta=args.beta, statistic=args.statistic, layers=[layer]))
        rows.append((layer, ppl, ppl / dense))
    print(f"dense ppl {dense:.2f}; one layer sparse at keep {args.beta} ({args.statistic}), {len(pairs)} paragraphs")
    print("| layer | ppl | x dense |\n|---:|---:|---:|")
    for layer, ppl, ratio in rows:
        print(f"| {layer} | {ppl:.2f} | {ratio:.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r[0] for r in rows], [r[2] - 1 for r in rows])
    ax.set_xlabel("layer made sparse (alone)")
    ax.set_ylabel("perplexity increase (x dense - 1)")
    ax.set_title(f"{llm.config.get('model_type')} {len(rows)} layers: keep {args.beta}, {args.statistic}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
