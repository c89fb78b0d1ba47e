"""`coreinfer eval`: what sparsity costs in quality, measured on the sparse model itself.

    coreinfer eval ppl   [--text FILE] [--prompt 0.5] ...   continuation perplexity and top-1 agreement
    coreinfer eval tasks [--tasks all|mc|gen|piqa,...] ...  lm-eval-style benchmark tasks
    coreinfer eval report A.json B.json ...                 one table from several runs
    coreinfer eval frontier A.json B.json --output F.png    bytes read vs perplexity/agreement plot

One run evaluates dense and every setting of the grid (--beta 0.5,0.7,0.85 x --statistic) on the
same items, so each delta against dense is paired. Items are sampled with --limit/--seed and
everything after is deterministic. Results go to PREFIX.json and PREFIX.md (--output).
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..cli.args import add_core_args, add_runtime_args, core_grid, runtime_kwargs
from ..engine.policy import CoreConfig
from . import data, report
from .metrics import f1, mc_accuracy, normalized_exact_match, ratio_and_stderr
from .report import Result, mean_result, setting_name

# How each packaged generative task is scored. LAMBADA is lm-eval's last-word accuracy: the answer
# must be the greedy continuation, token for token.
GEN_METRICS = {"lambada": ("acc",), "triviaqa": ("exact_match",), "nq_open": ("exact_match",),
               "squad": ("exact_match", "f1")}
USER_GEN_METRICS = ("exact_match", "f1")
SCORERS = {"exact_match": normalized_exact_match, "f1": f1}
TASK_GROUPS = {"all": data.MC_TASKS + data.GEN_TASKS, "mc": data.MC_TASKS, "gen": data.GEN_TASKS}


@dataclass
class Task:
    """Items and how to score them: "mc" (choice log-likelihoods), "greedy" (is the answer the greedy
    continuation) or "gen" (sparse greedy decoding, then answer metrics)."""

    name: str
    kind: str
    items: list
    metrics: tuple[str, ...] = ("acc", "acc_norm")


def task_names(spec: str) -> list[str]:
    names = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        names.extend(TASK_GROUPS.get(part, (part,)))
    return list(dict.fromkeys(names))


def load_tasks(spec: str, mc_files: list[str], gen_files: list[str], limit: int | None, seed: int) -> list[Task]:
    """The packaged tasks named by spec, then one task per user file (named after the file)."""
    tasks = []
    for name in task_names(spec):
        if name in data.MC_TASKS:
            tasks.append(Task(name, "mc", data.load_mc(name, limit, seed)))
        elif name in data.GEN_TASKS:
            kind = "greedy" if name == "lambada" else "gen"
            tasks.append(Task(name, kind, data.load_gen(name, limit, seed), GEN_METRICS[name]))
        else:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_GROUPS['all'])}, or all, mc, gen")
    tasks += [Task(Path(p).stem, "mc", data.sample(data.load_mc_jsonl(p), limit, seed)) for p in mc_files]
    tasks += [Task(Path(p).stem, "gen", data.sample(data.load_gen_jsonl(p), limit, seed), USER_GEN_METRICS)
              for p in gen_files]
    if not tasks:
        raise ValueError("no tasks: name some with --tasks, --mc-jsonl or --gen-jsonl")
    return tasks


def mc_per_item(lls: list[list[float]], items: list) -> dict[str, list[float]]:
    """Per-item acc and acc_norm (0 or 1), exactly as lm-eval scores one document."""
    scores = [mc_accuracy([ll], [item.norm_texts], [item.label]) for ll, item in zip(lls, items)]
    return {"acc": [s["acc"] for s in scores], "acc_norm": [s["acc_norm"] for s in scores]}


def run_task(llm, task: Task, core: CoreConfig | None, batch_size: int, max_new_tokens: int) -> Result:
    from . import runner  # the model side (torch): imported when a command runs, not for --help

    t0 = time.perf_counter()
    desc = f"{task.name} [{setting_name(core)}]"
    if task.kind == "mc":
        per_item = mc_per_item(runner.mc_loglikelihoods(llm, task.items, core, batch_size, desc), task.items)
    elif task.kind == "greedy":
        per_item = {"acc": runner.greedy_matches(llm, task.items, core, batch_size, desc)}
    else:
        answers = runner.generate_answers(llm, task.items, core, batch_size, max_new_tokens, desc)
        per_item = {m: [SCORERS[m](a, item.answers) for a, item in zip(answers, task.items)] for m in task.metrics}
    return mean_result(task.name, setting_name(core), per_item, time.perf_counter() - t0)


def ppl_results(llm, name: str, rows: list, grid: list[CoreConfig | None], batch_size: int) -> Iterator[Result]:
    """Per setting, as each finishes: the perplexity of the rows' continuations, and how often the
    setting's top-1 token agrees with dense's. Dense comes first in the grid: it is the reference."""
    from . import runner

    if grid[0] is not None:
        raise ValueError("the grid must start with dense (None)")
    dense_greedy = None
    for core in grid:
        t0 = time.perf_counter()
        scored = runner.score_rows(llm.model, rows, core, llm.tokenizer.pad_id, batch_size,
                                   f"{name} [{setting_name(core)}]")
        if core is None:
            dense_greedy = [s.greedy for s in scored]
        counts = [len(s.logprobs) for s in scored]
        mean_nll, nll_stderr = ratio_and_stderr([-s.loglikelihood for s in scored], counts)
        ppl = math.exp(mean_nll)
        agree = ratio_and_stderr([float((s.greedy == d).sum()) for s, d in zip(scored, dense_greedy)], counts)
        metrics = {"ppl": (ppl, ppl * nll_stderr), "top1_agree": agree}  # delta method: d exp(x) = exp(x) dx
        weights, ffn = runner.read_shares(llm.model, core)
        metrics.update(weights_read=(weights, 0.0), ffn_read=(ffn, 0.0))
        yield Result(name, setting_name(core), len(rows), metrics, seconds=time.perf_counter() - t0)


def log_result(r: Result) -> None:
    shown = ", ".join(f"{m} {report.format_number(v, m)}" for m, (v, _) in r.metrics.items())
    print(f"{r.task} [{r.setting}] n={r.n}: {shown} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)


def parse_prompt(text: str) -> float | int:
    """'64' -> 64 tokens; '0.5' -> half of each document."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value < 1:
            raise ValueError(f"--prompt takes a token count or a fraction in (0, 1), got {text!r}") from None
        return value
    if value < 1:
        raise ValueError(f"--prompt token count must be >= 1, got {value}")
    return value


def as_generate_runs(llm, grid: list[CoreConfig | None]) -> list[CoreConfig | None]:
    """The grid with the default (profile "auto") replaced by what generate decodes with on this model
    and runtime: its calibrated profile, or dense (then dropped: dense is scored already), saying which
    in one stderr line."""
    from ..engine.profile import AUTO

    out = []
    for core in grid:
        if core is not None and core.profile == AUTO:
            print(llm.default_core()[1], file=sys.stderr)
            core = llm.resolve(core)
        if core not in out:
            out.append(core)
    return out


def finish(results: list[Result], grid: list, args, llm, t0: float) -> None:
    """Write PREFIX.json and PREFIX.md, print the table."""
    meta = {"model": llm.name, "args": {k: v for k, v in vars(args).items() if k != "func"},
            "wall_s": round(time.perf_counter() - t0, 1)}
    doc = report.summary(results, [report.setting_json(core) for core in grid], meta)
    json_path, md_path = report.write(doc, args.output)
    print(report.markdown(doc))
    print(f"wrote {json_path} and {md_path} ({meta['wall_s']} s)", file=sys.stderr)


def cmd_ppl(args) -> None:
    from ..api import LLM
    from . import runner

    t0 = time.perf_counter()
    prompt, grid = parse_prompt(args.prompt), core_grid(args)
    docs = data.sample(data.text_documents(args.text), args.limit, args.seed) if args.text \
        else data.squad_documents(args.limit, args.seed)
    llm = LLM(**runtime_kwargs(args))
    grid = as_generate_runs(llm, grid)
    rows = runner.document_rows(llm.tokenizer.encode, docs, prompt, args.max_tokens)
    if not rows:
        raise ValueError("no document is long enough to split into a prompt and a continuation")
    name = Path(args.text).stem if args.text else "squad_paragraphs"
    results = []
    for r in ppl_results(llm, name, rows, grid, args.batch_size):
        log_result(r)
        results.append(r)
    finish(results, grid, args, llm, t0)


def cmd_tasks(args) -> None:
    from ..api import LLM

    t0 = time.perf_counter()
    spec = args.tasks if args.tasks is not None else ("" if args.mc_jsonl or args.gen_jsonl else "all")
    tasks, grid = load_tasks(spec, args.mc_jsonl, args.gen_jsonl, args.limit, args.seed), core_grid(args)
    llm = LLM(**runtime_kwargs(args))
    grid = as_generate_runs(llm, grid)
    results = []
    for task in tasks:
        for core in grid:
            results.append(run_task(llm, task, core, args.batch_size, args.max_new_tokens))
            log_result(results[-1])
    finish(results + report.pooled(results), grid, args, llm, t0)


def cmd_report(args) -> None:
    """One table from the JSON of several runs (e.g. one task per run) over the same settings."""
    docs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.files]
    results, settings = [], None
    for path, doc in zip(args.files, docs):
        found, grid = report.results_from_summary(doc), doc["settings"]
        if settings is not None and grid != settings:
            raise ValueError(f"{path} was run with other settings than {args.files[0]}")
        if {r.task for r in found} & {r.task for r in results}:
            raise ValueError(f"{path} repeats a task of another file")
        settings, results = grid, results + found
    meta = {"model": " + ".join(sorted({str(d.get("model")) for d in docs})), "merged": list(args.files),
            "wall_s": round(sum(d.get("wall_s", 0) for d in docs), 1)}
    doc = report.summary(results + report.pooled(results), settings, meta)
    json_path, md_path = report.write(doc, args.output)
    print(report.markdown(doc))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


def frontier_points(doc: dict) -> list[tuple[str, float, float, float]]:
    """(setting, FFN bytes read per token as a share of dense, perplexity x dense, top-1 agreement)
    for every setting of an `eval ppl` result."""
    [task] = [t for name, t in doc["tasks"].items() if name != report.POOLED]
    m = task["metrics"]
    if not {"ppl", "top1_agree", "ffn_read"} <= set(m):
        raise ValueError("frontier plots `coreinfer eval ppl` results with ffn_read (made by this version)")
    dense = m["ppl"]["dense"]["value"]
    return [(s, m["ffn_read"][s]["value"], m["ppl"][s]["value"] / dense, m["top1_agree"][s]["value"])
            for s in m["ppl"]]


def cmd_frontier(args) -> None:
    """FFN bytes read against perplexity multiple and top-1 agreement, one series per result file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in args.files:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        points = frontier_points(doc)
        label = f"{Path(str(doc.get('model', path))).stem} ({Path(path).stem})"
        for ax, col in ((left, 2), (right, 3)):
            ax.scatter([p[1] for p in points], [p[col] for p in points], label=label)
            for p in points:
                ax.annotate(p[0].replace("norm ", "").replace("frequency ", "freq "), (p[1], p[col]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
    left.set(xlabel="FFN weights read per decoded token (share of dense)", ylabel="continuation perplexity / dense",
             title="perplexity (lower is better)")
    right.set(xlabel="FFN weights read per decoded token (share of dense)", ylabel="top-1 agreement with dense",
              title="top-1 agreement (higher is better)")
    right.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    left.axhline(1.03, color="grey", linestyle=":", linewidth=1)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)  # below the plots: never over a point
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}", file=sys.stderr)


def add_common_args(p: argparse.ArgumentParser, kind: str, batch_size: int) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--limit", type=int, default=None, help="items per task (default: all), sampled with --seed")
    g.add_argument("--seed", type=int, default=0, help="seed of the item sample")
    g.add_argument("--batch-size", type=int, default=batch_size, help="rows per forward")
    g.add_argument("--output", default=f"coreinfer-eval-{kind}", help="writes OUTPUT.json and OUTPUT.md")
    add_runtime_args(p)
    add_core_args(p, grid=True)


def add_parser(sub) -> None:
    """`coreinfer eval ppl` and `coreinfer eval tasks`."""
    p = sub.add_parser("eval", help="measure what sparsity costs: perplexity and benchmark tasks",
                       description=__doc__.splitlines()[0])
    ev = p.add_subparsers(dest="eval_command", required=True)

    q = ev.add_parser("ppl", help="continuation perplexity and top-1 agreement with dense")
    q.add_argument("--text", default=None,
                   help="plain text (documents split at blank lines) or .jsonl with a 'text' field "
                        "(default: the packaged SQuAD paragraphs)")
    q.add_argument("--prompt", default="0.5",
                   help="the prompt of each document, from which the core set is chosen: a fraction of its "
                        "tokens (0.5) or a token count (64); the rest is scored")
    q.add_argument("--max-tokens", type=int, default=1024, help="cut each document to this many tokens first")
    add_common_args(q, "ppl", batch_size=4)
    q.set_defaults(func=cmd_ppl)

    t = ev.add_parser("tasks", help="benchmark tasks scored like lm-evaluation-harness")
    t.add_argument("--tasks", default=None,
                   help=f"comma-separated: {', '.join(TASK_GROUPS['all'])}, or all, mc, gen "
                        "(default: all, or none when JSONL files are given)")
    t.add_argument("--mc-jsonl", action="append", default=[], metavar="FILE",
                   help="multiple-choice items {context, choices, label} (repeatable)")
    t.add_argument("--gen-jsonl", action="append", default=[], metavar="FILE",
                   help="generation items {prompt, answers, stop?} (repeatable)")
    t.add_argument("--max-new-tokens", type=int, default=32, help="cap on each generated answer")
    add_common_args(t, "tasks", batch_size=8)
    t.set_defaults(func=cmd_tasks)

    r = ev.add_parser("report", help="merge the JSON results of several runs into one table")
    r.add_argument("files", nargs="+", metavar="FILE.json")
    r.add_argument("--output", default="coreinfer-eval-report", help="writes OUTPUT.json and OUTPUT.md")
    r.set_defaults(func=cmd_report)

    f = ev.add_parser("frontier", help="plot FFN bytes read against perplexity and top-1 agreement (eval ppl runs)")
    f.add_argument("files", nargs="+", metavar="FILE.json", help="`coreinfer eval ppl` results, one series each")
    f.add_argument("--output", default="frontier.png", help="the PNG to write")
    f.set_defaults(func=cmd_frontier)
