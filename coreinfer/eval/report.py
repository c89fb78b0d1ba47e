"""Evaluation results: one `Result` per (task, setting), written as JSON and as a markdown table.

Every setting is run on the same items as dense, so a delta against dense is paired: its standard
error is that of the per-item differences, far smaller than either run's own. Ratio metrics
(perplexity, top-1 agreement) pool over tokens and carry no per-item values, so their deltas have no
standard error.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.policy import CoreConfig
from .metrics import mean_and_stderr

# The row that pools every multiple-choice task's items.
POOLED = "all multiple choice"
# Metrics shown as percentages; the rest (perplexity) as they are.
PERCENT = {"acc", "acc_norm", "exact_match", "f1", "top1_agree"}


@dataclass
class Result:
    """One task under one setting: aggregate (value, stderr) per metric, and per-item values of the
    metrics that are means over items (used for paired deltas)."""

    task: str
    setting: str
    n: int
    metrics: dict[str, tuple[float, float]]
    per_item: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def setting_name(core: CoreConfig | None) -> str:
    if core is None:
        return "dense"
    name = f"{core.statistic} keep {','.join(f'{b:g}' for b in core.betas)}"
    if core.mode != "stability":
        name = f"{core.mode} {name}"
    if core.layers is not None:
        name += f" layers {core.layers}"
    if core.alpha != CoreConfig().alpha:
        name += f" alpha {core.alpha:g}"
    if core.refine is not None:
        name += f" refine {core.refine:g}"
    if core.input_keep != 1:
        name += f" input {core.input_keep:g}"
    if core.drift_period:
        name += f" drift {core.drift_period}@{core.drift_threshold:g}"
    if core.prior:
        name += f" prior {core.prior_weight:g}"
    if core.profile:
        name = f"profile {Path(core.profile).name}" + (f" {core.statistic}" if core.statistic != "frequency" else "")
    return name


def setting_json(core: CoreConfig | None) -> dict:
    """A setting's name and its CoreConfig as JSON."""
    if core is None:
        return {"name": "dense", "core": None}
    return {"name": setting_name(core), "core": dict(vars(core))}


def mean_result(task: str, setting: str, per_item: dict[str, list[float]], seconds: float) -> Result:
    """A Result whose metrics are means over items."""
    n = len(next(iter(per_item.values())))
    metrics = {name: mean_and_stderr(values) for name, values in per_item.items()}
    return Result(task, setting, n, metrics, per_item, seconds)


def pooled(results: list[Result]) -> list[Result]:
    """Per setting, acc and acc_norm over the items of every multiple-choice task together (so each
    task weighs by its item count, as lm-eval's groups do), when there are at least two such tasks."""
    by_setting: dict[str, list[Result]] = {}
    for r in results:
        if "acc_norm" in r.per_item and r.task != POOLED:
            by_setting.setdefault(r.setting, []).append(r)
    out = []
    for setting, runs in by_setting.items():
        if len(runs) >= 2:
            per_item = {m: [v for r in runs for v in r.per_item[m]] for m in ("acc", "acc_norm")}
            out.append(mean_result(POOLED, setting, per_item, sum(r.seconds for r in runs)))
    return out


def results_from_summary(doc: dict) -> list[Result]:
    """The Results back from a summary() document (its pooled rows are left out)."""
    results = []
    for task, t in doc["tasks"].items():
        if task == POOLED:
            continue
        for setting, seconds in t["seconds"].items():
            metrics = {m: (cells[setting]["value"], math.nan if cells[setting]["stderr"] is None
                           else cells[setting]["stderr"]) for m, cells in t["metrics"].items()}
            results.append(Result(task, setting, t["n"], metrics, t["per_item"].get(setting, {}), seconds))
    return results


def delta(result: Result, dense: Result, metric: str) -> tuple[float, float]:
    """result - dense on one metric, with the paired standard error where per-item values exist."""
    diff = result.metrics[metric][0] - dense.metrics[metric][0]
    mine, base = result.per_item.get(metric), dense.per_item.get(metric)
    if mine is None or base is None or len(mine) != len(base):
        return diff, math.nan
    return diff, mean_and_stderr([a - b for a, b in zip(mine, base)])[1]


def summary(results: list[Result], settings: list[dict], meta: dict) -> dict:
    """The JSON document: run metadata, the settings (see setting_json), and per task, metric and
    setting value, stderr, delta vs dense and its stderr (plus per-item values)."""
    by_task: dict[str, dict[str, Result]] = {}
    for r in results:
        by_task.setdefault(r.task, {})[r.setting] = r
    tasks = {}
    for task, runs in by_task.items():
        dense = runs.get("dense")
        first = next(iter(runs.values()))
        table = {}
        for metric in first.metrics:
            table[metric] = {}
            for name, r in runs.items():
                value, stderr = r.metrics[metric]
                entry = {"value": value, "stderr": _finite(stderr)}
                if dense is not None and name != "dense":
                    diff, diff_stderr = delta(r, dense, metric)
                    entry["delta"], entry["delta_stderr"] = diff, _finite(diff_stderr)
                table[metric][name] = entry
        tasks[task] = {"n": first.n, "metrics": table, "seconds": {n: r.seconds for n, r in runs.items()},
                       "per_item": {n: r.per_item for n, r in runs.items() if r.per_item}}
    return {**meta, "settings": settings, "tasks": tasks}


def _finite(x: float) -> float | None:
    """NaN (one item: no standard error) becomes JSON null."""
    return None if math.isnan(x) else x


def format_number(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if metric in PERCENT else f"{value:.2f}"


def _cell(entry: dict, metric: str) -> str:
    text = format_number(entry["value"], metric)
    if entry["stderr"] is not None:
        text += f" ± {format_number(entry['stderr'], metric)}"
    if "delta" in entry:
        sign = "+" if entry["delta"] >= 0 else "−"
        d = f"{sign}{format_number(abs(entry['delta']), metric)}"
        if entry["delta_stderr"] is not None:
            d += f" ± {format_number(entry['delta_stderr'], metric)}"
        text += f" ({d})"
    return text


def markdown(doc: dict) -> str:
    """One row per (task, metric), one column per setting: value ± stderr (delta vs dense ± stderr)."""
    names = [s["name"] for s in doc["settings"]]
    lines = ["| task | metric | n | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for task, t in doc["tasks"].items():
        for metric, cells in t["metrics"].items():
            row = [_cell(cells[n], metric) if n in cells else "" for n in names]
            lines.append(f"| {task} | {metric} | {t['n']} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write(doc: dict, prefix: str | Path) -> tuple[Path, Path]:
    """PREFIX.json (everything, per-item values included) and PREFIX.md (the table)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(markdown(doc), encoding="utf-8")
    return json_path, md_path
