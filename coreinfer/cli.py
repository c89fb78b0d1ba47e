"""`coreinfer` command line. Flags map one-to-one onto the API's dataclasses:
RuntimeConfig (--model --device --dtype --threads), GenerationConfig (--max-new-tokens ...),
CoreConfig (--alpha --beta --statistic --ranking --layers; --dense for none)."""

import argparse
import sys

from .core import MODES, CoreConfig
from .generate import GenerationConfig
from .loading import CheckpointError


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (CUDA default), fp16")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    g.add_argument("--weights", default="dense", help="dense (the dtype's) or int8 (weight-only, per channel)")


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def add_core_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    d = CoreConfig()
    g = p.add_argument_group("core neurons")
    g.add_argument("--dense", action="store_true", help="decode with the full FFN (no core neurons)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="token-wise core fraction")
    beta_help = "FFN keep ratio(s), comma-separated" + (" (a grid: one run each)" if grid else " (one per sparse layer)")
    g.add_argument("--beta", default=str(d.beta), help=beta_help)
    g.add_argument("--statistic", default=d.statistic, help="frequency (paper) or norm (GRIFFIN)"
                   + (", comma-separated grid" if grid else ""))
    g.add_argument("--ranking", default=d.ranking, help="auto, abs, signed (reference code; for reproduction), relu")
    g.add_argument("--layers", default=None, help="sparse layers: 'all', '3-27', '2,4-9' (default: the policy)")
    g.add_argument("--mode", default=d.mode, choices=None if grid else MODES,
                   help="stability: the prompt's own core set; similarity: its cluster's set from --clusters"
                   + (" (comma-separated grid)" if grid else ""))
    g.add_argument("--clusters", default=None, metavar="FILE", help="cluster file made by `coreinfer cluster`")


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes numbers separated by commas, got {text!r}") from None


def runtime_kwargs(args) -> dict:
    return dict(model=args.model, device=args.device, dtype=args.dtype, threads=args.threads, weights=args.weights)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def cluster_set(args, modes: list[str]):
    """The --clusters file, read once, when a similarity mode asks for it (checked against the model
    on its first use: CoreConfig travels before the model is loaded)."""
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"--mode takes {', '.join(MODES)}, got {', '.join(bad)}")
    if "similarity" not in modes:
        if args.clusters:
            raise ValueError("--clusters is only used with --mode similarity")
        return None
    if not args.clusters:
        raise ValueError("--mode similarity needs --clusters FILE (made by `coreinfer cluster`)")
    from .similarity import ClusterSet

    return ClusterSet.load(args.clusters)


def core_config(args) -> CoreConfig | None:
    if args.dense:
        return None
    betas = parse_floats(args.beta, "--beta")
    return CoreConfig(alpha=args.alpha, beta=betas[0] if len(betas) == 1 else betas, statistic=args.statistic,
                      ranking=args.ranking, layers=args.layers, mode=args.mode,
                      clusters=cluster_set(args, [args.mode]))


def core_grid(args) -> list[CoreConfig | None]:
    """Dense first, then one CoreConfig per (mode, statistic, beta) of the grid flags."""
    if args.dense:
        return [None]
    stats = [s.strip() for s in args.statistic.split(",") if s.strip()]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    clusters = cluster_set(args, modes)
    return [None] + [CoreConfig(alpha=args.alpha, beta=b, statistic=s, ranking=args.ranking, layers=args.layers,
                                mode=m, clusters=clusters if m == "similarity" else None)
                     for m in modes for s in stats for b in parse_floats(args.beta, "--beta")]


def report_speed(c) -> None:
    """One stderr line: prompt and decode speed, and what the core set saved (a Completion in)."""
    line = f"prompt {c.prompt_tokens} tok at {c.prefill_tok_s:.1f} tok/s, decode {c.completion_tokens} tok at " \
           f"{c.decode_tok_s:.1f} tok/s"
    if c.core is not None:
        line += f", core {c.core.bytes_core / c.core.bytes_dense:.0%} of weight bytes per token " \
                f"(select {c.core.select_ms:.1f} ms, compact {c.core.compact_ms:.1f} ms)"
        if c.core.cluster is not None:
            line += f", cluster {c.core.cluster[0]} (overlap {c.core.cluster_score[0]:.2f})"
    print(line, file=sys.stderr)


def cmd_generate(args) -> None:
    from .api import LLM

    gen, core = generation_config(args), core_config(args)
    llm = LLM(**runtime_kwargs(args))
    final = None
    for event in llm.stream(args.prompt, gen, core, chat=args.chat):
        print(event.text, end="", flush=True)
        final = event.completion or final
    print()
    report_speed(final)


def cmd_chat(args) -> None:
    from .api import LLM

    gen, core = generation_config(args), core_config(args)
    llm = LLM(**runtime_kwargs(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("coreinfer chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        final = None
        for event in llm.stream(messages, gen, core):
            print(event.text, end="", flush=True)
            final = event.completion or final
        print()
        report_speed(final)
        messages.append({"role": "assistant", "content": final.text})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_runtime_args(p), add_generation_args(p), add_core_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    p.add_argument("--system", default=None, help="system prompt")
    add_runtime_args(p), add_generation_args(p, max_new_tokens=256), add_core_args(p)
    p.set_defaults(func=cmd_chat)

    # Each further command lives in its own module, which adds its parser here.
    for add_parser in command_modules():
        add_parser(sub)
    return parser


def command_modules() -> list:
    """The `add_parser(sub)` functions of the modules that bring their own commands."""
    from .analysis_cli import add_parser as analyses
    from .bench import add_parser as bench
    from .evaluate import add_parser as evaluate
    from .server import add_parser as serve

    return [serve, evaluate, bench, analyses]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, NotImplementedError, CheckpointError) as e:
        print(f"coreinfer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
