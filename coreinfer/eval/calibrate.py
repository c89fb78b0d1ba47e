"""`coreinfer calibrate`: per-layer budgets for adaptive decoding, chosen on calibration text.

    coreinfer calibrate --budgets 0.5,0.6,0.7 --target-agree 0.95 --output smollm2.profile.json
    coreinfer generate "..." --profile smollm2.profile.json
    coreinfer calibrate          # into the cache folder, where the default core setting finds it

1. Dense prefills of the calibration paragraphs record every sparse layer's FFN inputs x.
2. Per layer, each candidate (input keep i, down rows r; engine/adaptive.py) is scored by the
   relative error it adds to that layer's FFN output, ||y' - y||^2 / ||y||^2, over those tokens.
3. Greedy allocation across layers, as TEAL does: from dense, repeatedly take the one layer step (to
   its next cheaper Pareto candidate) with the least error per FFN byte saved, until the model reads
   at most `budget` of its dense FFN bytes per token.
   On int8 and block-format weights each candidate is a threshold on the WINA score instead, read
   by the native sparse FFN (eval/thresholds.py). The same prefills give the global prior: each neuron's share of the norm statistic
   (engine/profile.PriorPolicy, `--prior FILE`).
   Beside each budget's greedy mix, the uniform setting (one candidate for every sparse layer) with
   the least summed layer error within the budget: layer-wise error undervalues misses that compound
   across layers (docs/quality.md, issue 21), and the uniform setting is what the frontier measures.
   `--predictor-hidden H` first trains each layer's predictor net on the same inputs (engine/trained.py).
4. Each budget's mix and uniform setting are scored end to end on held-out calibration paragraphs
   (continuation perplexity and top-1 agreement with dense, sparse, as `coreinfer eval ppl`); the
   cheapest that keeps agreement >= --target-agree is written, or, when none does, a profile with no
   sparse layers that says so: it decodes dense.

Calibration paragraphs are SQuAD's, taken from the far end of the seed-0 shuffle that
`coreinfer eval ppl` samples from, so they are disjoint from any evaluation of up to 400 paragraphs.
"""

import math
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli.args import add_runtime_args, runtime_kwargs
from ..engine.policy import CoreConfig
from ..engine.predictor import fit_quantized
from ..engine.trained import TrainConfig, logits, predictor_bytes, train_predictors
from ..engine.profile import LayerBudget, Profile
from ..engine.selection import keep_count
from ..engine.session import Session
from ..engine.threshold import FORMATS as THRESHOLD_FORMATS
from . import data, runner
from .thresholds import threshold_errors
from .metrics import ratio_and_stderr

REFINES = (None, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2)
INPUT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
PREDICTS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # gate/up rows per token a predictor picks (--predictor-bits)
EVAL_OFFSET = 400  # calibration paragraphs start here in the seed-0 shuffle (see the module docstring)


class Capture(Session):
    """A dense prefill that records the FFN inputs [T, d] of the layers in `inputs`."""

    def __init__(self, model, ids: list[int], inputs: dict[int, list]):
        super().__init__(model, [ids], 1)
        self.inputs = inputs

    def prefill_runner(self, observer):
        def run(ffn, x):
            if ffn.layer_id in self.inputs:
                self.inputs[ffn.layer_id].append(x[0])
            return ffn(x)
        return run


def layer_errors(ffn, x: torch.Tensor, bits: int = 0, net: dict | None = None) -> dict[LayerBudget, float]:
    """Candidate budget -> relative error it adds to this FFN's output on x [N, d]: every (input keep,
    refine) pair, and every (predict, refine) pair of a `bits`-bit predictor and of a trained `net`."""
    with torch.inference_mode():
        y = ffn(x)
        energy = y.square().sum()
        w_in = ffn.up if ffn.gate is None else torch.cat([ffn.up, ffn.gate])
        col_norm, down_norm = w_in.norm(dim=0), ffn.down.norm(dim=1)  # [d], [F]
        out = {}

        def refined(a: torch.Tensor, budget) -> None:
            """Errors of keeping each REFINES share of a's largest |a_i| * ||down_i|| (a [N, F], masked)."""
            ranked = (a.abs() * down_norm).sort(dim=1, descending=True).values
            for r in REFINES:
                m = a.shape[1] if r is None else keep_count(r, a.shape[1])
                kept = a * (a.abs() * down_norm >= ranked[:, m - 1:m])
                out[budget(r)] = float((ffn.project(kept) - y).square().sum() / energy)

        for i in INPUT_KEEPS:
            d_in = keep_count(i, x.shape[1])
            keep = torch.zeros_like(x).scatter_(1, (x.abs() * col_norm).topk(d_in, dim=1).indices, 1.0)
            refined(ffn.activations(x * keep), lambda r: LayerBudget(1.0, r, i))  # noqa: B023
        scorers = []  # (score [N, F], LayerBudget's bits, net share)
        if bits:
            copy = fit_quantized(ffn, bits)
            up = x @ copy["up_q"].T if ffn.up_bias is None else x @ copy["up_q"].T + ffn.up_bias
            guess = ffn.act(up) if "gate_q" not in copy else ffn.act(x @ copy["gate_q"].T) * up  # [N, F]
            scorers.append((guess.abs() * down_norm, bits, 0.0))
        if net is not None:
            scorers.append((logits(net, x), 0, round(predictor_bytes(net) / ffn.neuron_bytes(), 5)))
        a = ffn.activations(x)
        for score, b, share in scorers:
            for p in PREDICTS:
                rows = keep_count(p, a.shape[1])
                picked = torch.zeros_like(a).scatter_(1, score.topk(rows, dim=1).indices, 1.0)
                refined(a * picked, lambda r: LayerBudget(1.0, r if r is None or r < p else None, 1.0, p, b, share))  # noqa: B023
    return out


def global_prior(ffn, x: torch.Tensor) -> torch.Tensor:
    """Each neuron's share of the norm statistic (GRIFFIN's) over the tokens x [N, d] -> [F], sums to 1."""
    with torch.inference_mode():
        a = ffn.activations(x).float()
        unit = a / a.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        score = unit.square().sum(0)
        return score / score.sum()


def pareto(errors: dict[LayerBudget, float], gated: bool) -> list[tuple[float, float, LayerBudget]]:
    """A layer's candidates that no cheaper one beats: (FFN share, error, budget), share descending."""
    points = sorted(((b.ffn_share(gated), e, b) for b, e in errors.items()), key=lambda p: (-p[0], p[1]))
    front, best = [], math.inf
    for share, err, budget in reversed(points):  # cheapest first: keep those with lower error than all cheaper
        if err < best:
            front.append((share, err, budget))
            best = err
    return front[::-1]


def allocate(fronts: dict[int, list], num_layers: int, budget: float) -> dict[int, LayerBudget]:
    """Greedy: from each front's first (densest) point, step the layer with the least added error per
    share saved until the mean FFN share over all layers is <= budget (or nothing cheaper is left)."""
    at = {l: 0 for l in fronts}
    share = lambda: (num_layers - len(fronts) + sum(fronts[l][at[l]][0] for l in fronts)) / num_layers  # noqa: E731
    while share() > budget:
        steps = [((f[at[l] + 1][1] - f[at[l]][1]) / max(f[at[l]][0] - f[at[l] + 1][0], 1e-9), l)
                 for l, f in fronts.items() if at[l] + 1 < len(f)]
        if not steps:
            break
        at[min(steps)[1]] += 1
    return {l: fronts[l][at[l]][2] for l in fronts}


def score(model, rows, policy, pad_id: int, dense=None, batch_size: int = 4) -> tuple[float, float, list]:
    """(perplexity, top-1 agreement with `dense`'s greedy tokens, greedy tokens) of rows, sparse."""
    scored = runner.score_rows(model, rows, policy, pad_id, batch_size=batch_size)
    counts = [len(s.logprobs) for s in scored]
    ppl = math.exp(ratio_and_stderr([-s.loglikelihood for s in scored], counts)[0])
    greedy = [s.greedy for s in scored]
    agree = 1.0 if dense is None else ratio_and_stderr([float((g == d).sum()) for g, d in zip(greedy, dense)],
                                                       counts)[0]
    return ppl, agree, greedy


def uniform_front(errors: dict[int, dict[LayerBudget, float]], gated: bool) -> list[tuple[float, float, LayerBudget]]:
    """The budgets every sparse layer has, each as one setting for all of them: the Pareto front of
    (layer FFN share, error summed over the layers, budget), share descending."""
    common = set.intersection(*(set(e) for e in errors.values())) if errors else set()
    return pareto({b: sum(e[b] for e in errors.values()) for b in common}, gated)


def candidates(model, fronts, uniform, budget: float, prior, nets) -> list[tuple[str, Profile]]:
    """At one FFN budget: the greedy per-layer mix, and the least-error uniform setting within it."""
    n, sparse = len(model.ffns()), len(fronts)
    out = [("mix", Profile.for_model(model, allocate(fronts, n, budget), prior=prior, nets=nets))]
    fits = [b for share, _, b in uniform if (n - sparse + sparse * share) / n <= budget + 1e-9]
    if fits:
        out.append(("uniform", Profile.for_model(model, {l: fits[0] for l in fronts}, prior=prior, nets=nets)))
    return out


def calibrate(llm, budgets: list[float], target: float, docs: int, eval_docs: int, max_tokens: int,
              layers: str | None, predictor_bits: int = 0, predictor_hidden: int = 0) -> Profile:
    model, encode = llm.model, llm.tokenizer.encode
    pool = data.squad_documents()
    order = data.sample(list(range(len(pool))), len(pool), 0)[EVAL_OFFSET:]  # the shuffle eval ppl samples
    if len(order) < docs + eval_docs:
        raise ValueError(f"only {len(order)} calibration paragraphs: ask for fewer --docs/--eval-docs")
    sparse = CoreConfig(layers=layers).sparse_layers(len(model.ffns()))
    inputs: dict[int, list] = {l: [] for l in sparse}
    for i in tqdm(order[:docs], desc="calibration prefills", leave=False):
        Capture(model, encode(pool[i].text)[:max_tokens], inputs).prefill()
    gated, ffns = model.ffns()[0].gated, model.ffns()
    inputs = {l: torch.cat(x) for l, x in inputs.items()}  # [N, d] per sparse layer
    prior = {l: global_prior(ffns[l], x) for l, x in inputs.items()}
    nets = train_predictors(ffns, inputs, TrainConfig(hidden=predictor_hidden)) if predictor_hidden else {}
    # formats the native sparse FFN reads get per-layer thresholds (thresholds.py), others top-k shares
    threshold = ffns[0].format in THRESHOLD_FORMATS
    errors = {l: threshold_errors(ffns[l], inputs.pop(l)) if threshold
              else layer_errors(ffns[l], inputs.pop(l), predictor_bits, nets.get(l))
              for l in tqdm(sparse, desc="layer candidates", leave=False)}
    fronts = {l: pareto(e, gated) for l, e in errors.items()}
    uniform = uniform_front(errors, gated)
    rows = runner.document_rows(encode, [pool[i] for i in order[docs:docs + eval_docs]], 0.5, max_tokens)
    spec = CoreConfig().statistic_for(gated)
    dense_ppl, _, dense_greedy = score(model, rows, None, llm.tokenizer.pad_id)
    tried, chosen = [], None
    for budget in sorted(budgets):
        met = []
        for kind, profile in candidates(model, fronts, uniform, budget, prior, nets):
            ppl, agree, _ = score(model, rows, profile.policy(model, spec), llm.tokenizer.pad_id, dense_greedy)
            tried.append({"budget": budget, "kind": kind, "ffn_read": round(profile.ffn_share(model), 4),
                          "ppl_ratio": round(ppl / dense_ppl, 4), "top1_agree": round(agree, 4)})
            print(f"budget {budget:g} {kind}: FFN read {profile.ffn_share(model):.3f}, ppl x{ppl / dense_ppl:.3f}, "
                  f"top-1 agreement {agree:.3f}", file=sys.stderr, flush=True)
            if agree >= target:
                met.append((profile.ffn_share(model), len(tried) - 1, profile))
        if met:  # the cheaper of the mix and the uniform setting; its entry goes last (Profile.measured)
            _, at, chosen = min(met, key=lambda m: m[0])
            tried.append(tried.pop(at))
            break
    met = chosen is not None
    if not met:  # no budget keeps the target: the profile decodes dense, and says so
        chosen = Profile.for_model(model, {}, prior=prior)
    chosen.info = {"target_top1_agree": target, "meets_target": met, "tried": tried, "calibration_docs": docs,
                   "heldout_docs": len(rows), "max_tokens": max_tokens, "dense_ppl": round(dense_ppl, 3),
                   "corpus": f"SQuAD paragraphs {EVAL_OFFSET}.. of the seed-0 shuffle", "weights": ffns[0].format}
    return chosen


def cmd_calibrate(args) -> None:
    from ..api import LLM, profile_folders
    from ..cli.args import parse_floats

    budgets = parse_floats(args.budgets, "--budgets")
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"--budgets takes FFN byte shares in (0, 1], got {args.budgets!r}")
    if not 0 < args.target_agree <= 1:
        raise ValueError(f"--target-agree is a top-1 agreement in (0, 1], got {args.target_agree}")
    if args.docs < 1 or args.eval_docs < 1:
        raise ValueError("--docs and --eval-docs must be >= 1")
    t0 = time.perf_counter()
    llm = LLM(**runtime_kwargs(args))
    if args.predictor_bits not in (0, 1, 2, 3, 4):
        raise ValueError(f"--predictor-bits takes 0 (no predictor) or 1-4, got {args.predictor_bits}")
    if args.predictor_hidden < 0:
        raise ValueError(f"--predictor-hidden takes 0 (no trained predictor) or a width >= 1, got "
                         f"{args.predictor_hidden}")
    profile = calibrate(llm, budgets, args.target_agree, args.docs, args.eval_docs, args.max_tokens, args.layers,
                        args.predictor_bits, args.predictor_hidden)
    name = re.sub(r"[^\w.-]+", "-", Path(llm.name).stem)  # the checkpoint's name, safe as a file name
    output = Path(args.output) if args.output else profile_folders()[0] / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    profile.save(output)
    verdict = "meets" if profile.info["meets_target"] else "no budget meets"
    print(f"wrote {output}: {verdict} top-1 agreement >= {args.target_agree:g}, FFN read "
          f"{profile.ffn_share(llm.model):.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="choose per-layer budgets for adaptive decoding; writes a --profile file",
                       description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.5,0.6,0.7,0.8,0.9",
                   help="FFN byte shares per token to try, cheapest first until one meets --target-agree")
    p.add_argument("--target-agree", type=float, default=0.95, help="top-1 agreement with dense to keep")
    p.add_argument("--docs", type=int, default=16, help="calibration paragraphs for the per-layer errors")
    p.add_argument("--eval-docs", type=int, default=8, help="held-out calibration paragraphs scored end to end")
    p.add_argument("--max-tokens", type=int, default=256, help="cut each paragraph to this many tokens")
    p.add_argument("--layers", default=None, help="sparse layers: 'all', '3-27' (default: the layer policy)")
    p.add_argument("--predictor-bits", type=int, default=0,
                   help="also try, per layer, predicted sparsity of gate/up/down scored by a copy of gate and up "
                        "at this many bits a weight (engine/predictor.py); 0: refine and input keep only")
    p.add_argument("--predictor-hidden", type=int, default=0,
                   help="also try, per layer, predicted sparsity scored by a trained MLP of this hidden width "
                        "(engine/trained.py), trained on the calibration paragraphs; 0: none")
    p.add_argument("--output", default=None, help="the profile file to write (default: the cache folder's "
                   "profiles/, where the default core setting of generate, chat and serve finds it)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_calibrate)
