"""The quality frontier of gate/up sparsity: FFN bytes read per token against perplexity and top-1
agreement with dense, for every policy, on held-out SQuAD paragraphs (first half prompt, second
half scored sparse, as `coreinfer eval ppl`).

    python benchmarks/frontier.py --limit 10 --docs 24 --rank 64 --png docs/img/frontier_smollm2.png

Predictors (engine/predictor.py) and rotations (engine/rotation.py) are fitted on calibration
paragraphs from the far end of the seed-0 shuffle (eval/calibrate.py), disjoint from the evaluated
ones. Prints the per-layer predictor report (recall of the oracle top set, share of |a| * ||down||
mass covered, the scorer's own bytes per token) and the frontier table; writes the PNG.
"""

import argparse
import json
import math
import sys
import time

import torch
from tqdm import tqdm

from coreinfer import LLM, CoreConfig
from coreinfer.engine.adaptive import AdaptivePolicy, Plan
from coreinfer.engine.policy import StabilityPolicy
from coreinfer.engine.predictor import PredictPlan, fit_lowrank, fit_quantized, predictor_quality
from coreinfer.engine.rotation import RotatePlan, fit_rotation
from coreinfer.engine.selection import keep_count
from coreinfer.engine.session import make_policy
from coreinfer.engine.trained import TrainConfig, train_predictors
from coreinfer.eval import calibrate, data, runner


def capture(llm, docs: int, layers: list[int], max_tokens: int) -> dict[int, torch.Tensor]:
    """FFN inputs [N, d] per sparse layer from dense prefills of `docs` calibration paragraphs."""
    pool = data.squad_documents()
    order = data.sample(list(range(len(pool))), len(pool), 0)[calibrate.EVAL_OFFSET:]
    inputs = {l: [] for l in layers}
    for i in tqdm(order[:docs], desc="calibration prefills", leave=False):
        calibrate.Capture(llm.model, llm.tokenizer.encode(pool[i].text)[:max_tokens], inputs).prefill()
    return {l: torch.cat(x) for l, x in inputs.items()}


def policy(model, layers: list[int], plans: dict, superset: float = 1.0) -> AdaptivePolicy:
    """The stability policy at keep `superset` (the whole FFN at 1), each layer decoding by its plan."""
    spec = CoreConfig().statistic_for(model.ffns()[0].gated)
    return AdaptivePolicy(StabilityPolicy({l: superset for l in layers}, model.ffns()[0].width, spec), plans)


FAMILIES = ("oracle", "refine", "input", "gate", "lowrank", "quant4", "quant2", "rotated", "trained", "superset")


def settings(model, layers, fits, width, families, points=None):
    """(policy family, setting, SelectionPolicy) for every point of the frontier in `families`; with
    `points` (keep shares), the oracle, refine, predictor and rotated families take those: predictors
    at keep k / down k - 0.1, refine r = k, rotated input k."""
    out = []
    pair = lambda grid: grid if points is None else tuple((k, round(k - 0.1, 2)) for k in points)  # noqa: E731
    one = lambda grid: grid if points is None else tuple(points)  # noqa: E731
    uniform = lambda make: policy(model, layers, {l: make(l) for l in layers})  # noqa: E731
    if "oracle" in families:
        out += [("oracle per-token top-k (bound)", f"keep {k}", uniform(lambda l: PredictPlan("oracle", k, k)))  # noqa: B023
                for k in one((0.5, 0.6, 0.7, 0.8))]
    if "refine" in families:
        out += [("refine (WINA down rows)", f"refine {r}", uniform(lambda l: Plan(keep_count(r, width))))  # noqa: B023
                for r in one((0.7, 0.5))]
    if "input" in families:
        out.append(("input sparsity (TEAL/WINA)", "input 0.7", uniform(lambda l: Plan(None, 0.7))))
    if "gate" in families:
        out += [("gate as predictor", f"keep {k}, down {m}", uniform(lambda l: PredictPlan("gate", k, m)))  # noqa: B023
                for k, m in ((0.8, 0.7), (0.7, 0.6))]
    if "lowrank" in families:
        out += [("low-rank predictor", f"keep {k}, down {m}",
                 uniform(lambda l: PredictPlan("lowrank", k, m, fits["lowrank"][l])))  # noqa: B023
                for k, m in ((0.9, 0.7), (0.8, 0.7))]
    for bits in (4, 2):
        if f"quant{bits}" in families:
            out += [(f"{bits}-bit predictor", f"keep {k}, down {m}",
                     uniform(lambda l: PredictPlan("quant", k, m, fits[bits][l], bits)))  # noqa: B023
                    for k, m in pair(((0.8, 0.7), (0.7, 0.6), (0.6, 0.5)))]
    if "rotated" in families:
        out += [("rotated input (LaRoSA)", f"input {i}" + (f", down {m}" if m else ""),
                 uniform(lambda l: RotatePlan(fits["rotation"][l], i, m)))  # noqa: B023
                for i, m in ((0.9, None), (0.7, None), (0.5, None), (0.9, 0.7), (0.7, 0.5)) if points is None
                or i in points and m is None]
    if "trained" in families:
        out += [(f"trained predictor (h {fits['hidden']})", f"keep {k}, down {m}",
                 uniform(lambda l: PredictPlan("trained", k, m, fits["trained"][l])))  # noqa: B023
                for k, m in pair(((0.8, 0.7), (0.7, 0.6), (0.6, 0.5), (0.5, 0.4)))]
    if "superset" in families:
        out.append(("paper superset + 4-bit predictor", "superset 0.85, keep 0.7, down 0.6",
                    policy(model, layers, {l: PredictPlan("quant", 0.7, 0.6, fits[4][l], 4) for l in layers},
                           superset=0.85)))
    return out


def plot(points: list[dict], dense_ppl: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for family in dict.fromkeys(p["policy"] for p in points):
        pts = sorted((p for p in points if p["policy"] == family), key=lambda p: p["ffn_read"])
        xs = [100 * p["ffn_read"] for p in pts]
        style = "k--" if "oracle" in family else "-"
        ax1.plot(xs, [p["ppl"] / dense_ppl for p in pts], style, label=family, marker="o", ms=4)
        ax2.plot(xs, [100 * p["agree"] for p in pts], style, label=family, marker="o", ms=4)
    ax1.axhline(1.03, color="grey", lw=0.6)
    ax1.axhline(1.10, color="grey", lw=0.6, ls=":")
    ax2.axhline(95, color="grey", lw=0.6)
    ax2.axhline(90, color="grey", lw=0.6, ls=":")
    for ax in (ax1, ax2):
        ax.axvline(70, color="grey", lw=0.6)
        ax.axvline(50, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("FFN bytes read per decoded token (% of dense)")
    ax1.set_ylabel("perplexity / dense")
    ax1.set_ylim(0.98, 1.6)
    ax2.set_ylabel("top-1 agreement with dense (%)")
    ax2.set_ylim(50, 101)
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def grid_settings(llm, layers: list[int], args, report: list) -> list:
    """Fit the predictors and rotations the chosen families need on calibration text, print (and fill
    `report` with) the per-layer predictor report, and return the grid of settings."""
    t0, ffns, families = time.perf_counter(), llm.model.ffns(), args.policies.split(",")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"--policies takes some of {','.join(FAMILIES)}; got {sorted(unknown)}")
    inputs = capture(llm, args.docs + 4, layers, args.max_tokens)
    held = {}
    for l in layers:  # the last ~4 paragraphs' tokens only measure the predictors
        n = inputs[l].shape[0] * args.docs // (args.docs + 4)
        inputs[l], held[l] = inputs[l][:n], inputs[l][n:]
    fits = {"hidden": args.hidden}
    if "lowrank" in families:
        fits["lowrank"] = {l: fit_lowrank(ffns[l], inputs[l], args.rank) for l in tqdm(layers, desc="low-rank fits",
                                                                                      leave=False)}
    if "trained" in families:
        fits["trained"] = train_predictors(ffns, inputs, TrainConfig(hidden=args.hidden, steps=args.train_steps))
    if "rotated" in families:
        fits["rotation"] = {l: fit_rotation(inputs[l]) for l in layers}
    for bits in (2, 4):  # each a float copy of gate and up: only where a family or the report uses it
        if f"quant{bits}" in families or (bits == 4 and "superset" in families):
            fits[bits] = {l: fit_quantized(ffns[l], bits) for l in layers}
    inputs.clear()
    print(f"fitted on {args.docs} calibration paragraphs ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    print("\nper layer, held-out calibration tokens, keep 0.7 of the FFN width:")
    scorers = {"gate": lambda l: PredictPlan("gate", 0.7, 0.7)}
    for bits in (2, 4):
        if bits in fits:
            scorers[f"{bits}-bit"] = lambda l, b=bits: PredictPlan("quant", 0.7, 0.7, fits[b][l], b)
    if "lowrank" in fits:
        scorers[f"low-rank r{args.rank}"] = lambda l: PredictPlan("lowrank", 0.7, 0.7, fits["lowrank"][l])
    if "trained" in fits:
        scorers[f"trained h{args.hidden}"] = lambda l: PredictPlan("trained", 0.7, 0.7, fits["trained"][l])
    print("recall of the oracle top set / share of sum |a_i| ||down_i|| covered (oracle's beside it); "
          "the scorer's own bytes per token as a share of the layer's dense FFN bytes")
    print("| layer | " + " | ".join(scorers) + " | oracle mass |")
    print("|---:|" + "---:|" * (len(scorers) + 1))
    for l in layers:
        cells, entry = [], {"layer": l}
        for name, make in scorers.items():
            plan = make(l)
            q = predictor_quality(ffns[l], held[l], plan)
            core = plan.build()
            core.load(ffns[l], torch.arange(ffns[l].width)[None])
            rows, m = core.sizes()
            own = core.nbytes() - (rows * (1 if plan.scorer == "gate" else 2) + m) * core.weights["down"].shape[2] * 4
            core.clear()
            q["scorer_share"] = own / ffns[l].neuron_bytes()
            entry[name] = q
            cells.append(f"{q['recall']:.3f} / {q['mass']:.3f} ({q['scorer_share']:.1%})")
        report.append(entry)
        print(f"| {l} | " + " | ".join(cells) + f" | {q['oracle_mass']:.3f} |", flush=True)
    points = [float(k) for k in args.points.split(",")] if args.points else None
    return settings(llm.model, layers, fits, ffns[0].width, families, points)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--limit", type=int, default=10, help="evaluation paragraphs (seed 0, as `coreinfer eval ppl`)")
    p.add_argument("--docs", type=int, default=24, help="calibration paragraphs the predictors are fitted on")
    p.add_argument("--rank", type=int, default=64, help="rank of the low-rank predictor")
    p.add_argument("--hidden", type=int, default=TrainConfig.hidden, help="hidden width of the trained predictor")
    p.add_argument("--train-steps", type=int, default=TrainConfig.steps, help="training steps of each trained net")
    p.add_argument("--policies", default=",".join(FAMILIES), help="comma-separated policy families to score")
    p.add_argument("--points", default=None, help="comma-separated keep shares: each family's points (default: "
                   "its own grid)")
    p.add_argument("--max-tokens", type=int, default=256, help="cut each paragraph to this many tokens")
    p.add_argument("--layers", default=None, help="sparse layers (default: the layer policy)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=4, help="rows scored together (each holds its own FFN copy)")
    p.add_argument("--profiles", default="", help="comma-separated profiles (`coreinfer calibrate`) to score too")
    p.add_argument("--no-grid", action="store_true", help="score only --profiles: no fits, no per-layer report")
    p.add_argument("--png", default=None, help="write the frontier plot here")
    p.add_argument("--json", default=None, help="write the points here")
    p.add_argument("--from-json", default="", help="comma-separated --json files of runs on one model and the "
                   "same rows (e.g. split by --policies): only plot their points together into --png")
    args = p.parse_args()
    if args.from_json:
        runs = [json.load(open(path)) for path in args.from_json.split(",")]
        if len({round(r["dense_ppl"], 2) for r in runs}) != 1:  # to the printed 2 decimals
            raise SystemExit("--from-json: the runs scored different rows (their dense perplexities differ)")
        plot([point for r in runs for point in r["points"]], runs[0]["dense_ppl"], args.png)
        return
    t0 = time.perf_counter()
    llm = LLM(args.model, threads=args.threads)
    model, report = llm.model, []
    ffns = model.ffns()
    layers = CoreConfig(layers=args.layers).sparse_layers(len(ffns))
    grid = [] if args.no_grid else grid_settings(llm, layers, args, report)
    grid += [("calibrated profile", path, make_policy(CoreConfig(profile=path), model))
             for path in filter(None, args.profiles.split(","))]

    rows = runner.document_rows(llm.tokenizer.encode, data.squad_documents(args.limit, 0), 0.5, args.max_tokens)
    pad = llm.tokenizer.pad_id
    dense_ppl, _, dense = calibrate.score(model, rows, None, pad, batch_size=args.batch)
    points = []
    print(f"\n{len(rows)} SQuAD paragraphs (seed 0), first half prompt, {sum(len(c) for _, c in rows)} scored "
          f"tokens; {len(layers)} of {len(ffns)} layers sparse in the grid; dense perplexity {dense_ppl:.2f}\n")
    print("| policy | setting | FFN read | perplexity (x dense) | top-1 agreement |")
    print("|---|---|---:|---:|---:|")
    for family, name, pol in tqdm(grid, desc="settings", leave=False):
        _, ffn_read = runner.read_shares(model, pol)
        ppl, agree, _ = calibrate.score(model, rows, pol, pad, dense, args.batch)
        points.append({"policy": family, "setting": name, "ffn_read": ffn_read, "ppl": ppl, "agree": agree})
        print(f"| {family} | {name} | {ffn_read:.1%} | {ppl:.2f} (x{ppl / dense_ppl:.3f}) | {agree:.1%} |",
              flush=True)
        if args.json:  # after every point: a run cut short by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"dense_ppl": dense_ppl, "rows": len(rows), "points": points, "layers": report}, f,
                          indent=1)
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.png:
        plot(points, dense_ppl, args.png)
    for target, limit_ppl, limit_agree in ((0.70, 1.03, 0.95), (0.50, 1.10, 0.90)):
        ok = [p for p in points if p["ffn_read"] <= target + 1e-9 and "oracle" not in p["policy"]
              and p["ppl"] / dense_ppl <= limit_ppl and p["agree"] >= limit_agree]
        print(f"target <= {target:.0%} FFN, ppl <= x{limit_ppl}, agreement >= {limit_agree}: "
              + (", ".join(f"{p['policy']} {p['setting']}" for p in ok) if ok else "not met"))
    if math.isnan(dense_ppl):
        raise SystemExit("dense perplexity is NaN")


if __name__ == "__main__":
    main()
