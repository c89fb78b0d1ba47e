"""Argument helpers shared by every `coreinfer` command: flags map one-to-one onto the API's dataclasses,
RuntimeConfig (--model --device --dtype --threads --weights), GenerationConfig (--max-new-tokens ...),
CoreConfig (--alpha --beta --statistic --ranking --layers --mode --clusters --refine --input-keep
--drift-period --drift-threshold; --dense for none)."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `coreinfer --help` builds no subcommand and needs no torch
    from ..engine.generate import GenerationConfig
    from ..engine.policy import CoreConfig


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says it. None means 'decided at
    run time', which the help must explain; switches are off and lists empty by default."""

    def _format_action(self, action):
        if _has_default(action) and "default" not in (action.help or ""):
            action = copy.copy(action)  # the parser's own action stays as declared
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)


def _has_default(action: argparse.Action) -> bool:
    d = action.default
    return bool(action.option_strings) and d is not None and d is not False and d != argparse.SUPPRESS and d != []


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (and every subcommand's: subparsers take their parent's class)
    shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (CUDA default), fp16")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the physical cores this process may use, SMT siblings counted once, "
                        "less those the 1-minute load average shows busy; at least 1)")
    g.add_argument("--weights", default=None,
                   help="default: auto for a GGUF on the CPU (the embedded model is one), dense for an HF folder or "
                        "on CUDA. dense (the dtype's), int8 (weight-only, per channel), int4 (group-wise, CPU only; FFN "
                        "down stays int8), auto (CPU: each tensor in the block format its GGUF holds, q4 or q8_0, "
                        "loaded tensor by tensor without a float copy; an HF folder's in q8_0; FFN down re-blocked to q8_0), small (as "
                        "auto, with down in q4 where the file's is 4-bit: least memory, less faithful) or q8_0 (q8_0 throughout)")
    g.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="memory-limited mode, e.g. 2GiB: FFN weights stay in CPU memory, only core rows on the GPU")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory-limited mode on the CPU, e.g. 3GiB: FFN weights stay in the file, only core rows in RAM")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled decode step: ~1.7x faster int8/int4 decoding on the CPU, ~1.4x on CUDA; the "
                        "first compile of a shape takes about two minutes on the CPU (~20 s on CUDA), later starts "
                        "load it from the cache in seconds (default: on for int8 and int4 on the CPU and for dense "
                        "weights on CUDA, else off)")
    g.add_argument("--background-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, decode eager while a new shape's compiled step builds in the background, and "
                        "switch to it once built (default: on); --no-background-compile: the first token waits for it")


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to decode at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = all")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="decode max-new-tokens even past end-of-sequence")


def add_core_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    from ..engine.policy import MODES, CoreConfig

    d = CoreConfig()
    g = p.add_argument_group("core neurons")
    g.add_argument("--dense", action="store_true", help="decode with the full FFN (no core neurons)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="token-wise core fraction")
    beta_help = "FFN keep ratio(s), comma-separated" + (
        f" (a grid: one run each; default: none, with no core flag: dense and generate's default, the calibrated "
        f"profile; {d.beta} when other core flags are given)" if grid else
        f" (one per sparse layer; {d.beta} when other core flags are given)")
    g.add_argument("--beta", default=None, help=beta_help)
    g.add_argument("--statistic", default=d.statistic, help="frequency (paper) or norm (GRIFFIN)"
                   + (", comma-separated grid" if grid else ""))
    g.add_argument("--ranking", default=d.ranking, help="auto, abs, signed (reference code; for reproduction), relu")
    g.add_argument("--layers", default=None, help="sparse layers: 'all', '3-27', '2,4-9' (default: the policy)")
    g.add_argument("--mode", default=d.mode, choices=None if grid else MODES,
                   help="stability: the prompt's own core set; similarity: its cluster's set from --clusters"
                   + (" (comma-separated grid)" if grid else ""))
    g.add_argument("--clusters", default=None, metavar="FILE", help="cluster file made by `coreinfer cluster`")
    many = " (comma-separated grid)" if grid else ""
    g.add_argument("--refine", default="none", help="per token, read only this share (of the FFN width) of down "
                   "rows inside the core set, by |a_i|*||down_i||; none: off" + many)
    g.add_argument("--input-keep", default=str(d.input_keep), help="share of the FFN input's largest entries "
                   "whose gate/up columns are read (1: all)" + many)
    g.add_argument("--drift-period", type=int, default=d.drift_period,
                   help="every N decode steps, one dense step checks the core set still fits (0: never)")
    g.add_argument("--drift-threshold", type=float, default=d.drift_threshold,
                   help="re-choose the core set when it covers less than this share of a checked token's statistic")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="per-layer budgets made by `coreinfer calibrate` (replace --beta, --layers, --refine, --input-keep)"
                   "; 'auto', the default when no core flag is given: the profile calibrated on the model (top-1 "
                   "agreement >= 0.95 on held-out text), or dense where there is none or where this runtime cannot "
                   "run it, as generate decides")
    g.add_argument("--prior", default=None, metavar="FILE",
                   help="a `coreinfer calibrate` profile whose global prior is fused with the prompt's statistic")
    g.add_argument("--prior-weight", type=float, default=d.prior_weight,
                   help="weight of the prior against the prompt's own statistic, in [0, 1]")


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes numbers separated by commas, got {text!r}") from None


def parse_refine(text: str) -> list[float | None]:
    """--refine: 'none' or numbers, comma-separated."""
    return [None if x.strip() == "none" else parse_floats(x, "--refine")[0] for x in text.split(",") if x.strip()]


def adaptive_kwargs(args, refine: float | None, input_keep: float) -> dict:
    return dict(refine=refine, input_keep=input_keep, drift_period=args.drift_period,
                drift_threshold=args.drift_threshold, profile=args.profile, prior=args.prior,
                prior_weight=args.prior_weight)


def runtime_kwargs(args) -> dict:
    return dict(model=args.model, device=args.device, dtype=args.dtype, threads=args.threads, weights=args.weights,
                max_gpu_memory=args.max_gpu_memory, max_memory=args.max_memory, compile=args.compile,
                background_compile=args.background_compile)


def generation_config(args) -> GenerationConfig:
    from ..engine.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def check_modes(args, modes: list[str]) -> None:
    """--mode values are known, and --clusters names a file exactly when a similarity mode needs one
    (its contents are checked against the model on first use)."""
    from ..engine.policy import MODES

    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"--mode takes {', '.join(MODES)}, got {', '.join(bad)}")
    if "similarity" not in modes:
        if args.clusters:
            raise ValueError("--clusters is only used with --mode similarity")
        return
    if not args.clusters:
        raise ValueError("--mode similarity needs --clusters FILE (made by `coreinfer cluster`)")
    if not Path(args.clusters).is_file():
        raise ValueError(f"--clusters {args.clusters}: no such file")


def core_flags_given(args) -> bool:
    """Whether any core flag differs from its default (the default setting is the calibrated profile)."""
    from ..engine.policy import CoreConfig

    d = CoreConfig()
    return any([args.beta is not None, args.layers, args.mode != d.mode, args.clusters, args.refine != "none",
                parse_floats(args.input_keep, "--input-keep") != [d.input_keep], args.drift_period != d.drift_period,
                args.profile, args.prior, args.statistic != d.statistic, args.alpha != d.alpha,
                args.ranking != d.ranking])


def core_config(args) -> CoreConfig | None:
    """--dense: None; no core flag: the default, CoreConfig(profile="auto"); else the flags' setting."""
    from ..engine.policy import CoreConfig
    from ..engine.profile import AUTO

    if args.dense:
        return None
    if not core_flags_given(args):
        return CoreConfig(profile=AUTO)
    betas = parse_floats(args.beta if args.beta is not None else str(CoreConfig().beta), "--beta")
    check_modes(args, [args.mode])
    [refine], [input_keep] = parse_refine(args.refine), parse_floats(args.input_keep, "--input-keep")
    return CoreConfig(alpha=args.alpha, beta=betas[0] if len(betas) == 1 else betas, statistic=args.statistic,
                      ranking=args.ranking, layers=args.layers, mode=args.mode,
                      clusters=args.clusters if args.mode == "similarity" else None,
                      **adaptive_kwargs(args, refine, input_keep))


def core_grid(args) -> list[CoreConfig | None]:
    """Dense first, then one CoreConfig per (mode, statistic, beta, refine, input keep) of the grid flags;
    with no core flag (or --profile auto), dense and the default, CoreConfig(profile="auto"), which the
    command resolves against its model as generate does (LLM.resolve)."""
    from ..engine.policy import CoreConfig
    from ..engine.profile import AUTO

    if args.dense:
        return [None]
    if args.profile == AUTO or not core_flags_given(args):
        return [None, CoreConfig(profile=AUTO)]
    stats = [s.strip() for s in args.statistic.split(",") if s.strip()]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    check_modes(args, modes)
    betas = parse_floats(args.beta if args.beta is not None else str(CoreConfig().beta), "--beta")
    return [None] + [CoreConfig(alpha=args.alpha, beta=b, statistic=s, ranking=args.ranking, layers=args.layers,
                                mode=m, clusters=args.clusters if m == "similarity" else None,
                                **adaptive_kwargs(args, r, i))
                     for m in modes for s in stats for b in betas
                     for r in parse_refine(args.refine) for i in parse_floats(args.input_keep, "--input-keep")]


def report_speed(c) -> None:
    """One stderr line: prompt and decode speed, and what the core set saved (a Completion in). The decode
    rate is of decoding alone: compiling the step, or loading its compiled graph, is shown apart."""
    import torch

    line = f"prompt {c.prompt_tokens} tok at {c.prefill_tok_s:.1f} tok/s, decode {c.completion_tokens} tok at " \
           f"{decode_rate(c)} tok/s"
    if c.compile_s:
        line += f" (+ {c.compile_s:.1f} s compiling or loading the decode step, not counted)"
    if c.eager_steps:
        line += f" ({c.eager_steps} eager at {c.eager_steps / c.eager_s:.1f} tok/s while the compiled step built in " \
                f"the background, {switched(c)})"
    line += f", {count(torch.get_num_threads(), 'thread')}"
    if c.stats is not None:
        line += f", core {c.stats.share:.0%} of weight bytes per token " \
                f"(select {c.stats.select_ms:.1f} ms, compact {c.stats.compact_ms:.1f} ms)"
        if c.stats.cluster is not None:
            line += f", cluster {c.stats.cluster[0]} (overlap {c.stats.cluster_score[0]:.2f})"
        if c.stats.peak_gpu_bytes:
            line += f", peak GPU memory {c.stats.peak_gpu_bytes / 2**30:.2f} GiB"
    print(line, file=sys.stderr)


def switched(c) -> str:
    """What followed a background compile's eager steps: the compiled steps' rate, or that none came."""
    n, s = c.completion_tokens - 1 - c.eager_steps, c.decode_s - c.eager_s
    return f"then {n} compiled at {n / s:.1f} tok/s" if n > 0 and s > 0 else "not ready before the end"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 thread', '2 threads'; '1 entry', '0 entries' (with plural="entries")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def check_utf8(text: str, what: str) -> None:
    """Text from the command line holds what the OS handed over: bytes that are not UTF-8 arrive as lone
    surrogates (PEP 383), which no tokenizer encodes. One line, before the model loads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text.encode("utf-8", "surrogateescape")[e.start:e.end]
        raise ValueError(f"{what} is not valid UTF-8 (bytes {bad!r} at character {e.start}): "
                         "pass text in UTF-8") from None


def decode_rate(c) -> str:
    """A Completion's decode rate, or "-" when it has none (under two tokens: the first comes from the prefill)."""
    return f"{c.decode_tok_s:.1f}" if c.completion_tokens > 1 else "-"
