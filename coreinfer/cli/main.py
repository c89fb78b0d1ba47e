"""coreinfer: decode faster by running only each prompt's core neurons (CoreInfer).

The entry point. Each command lives in its own module, imported only when that command runs (or
its --help is asked for): the top-level help and a mistyped command need neither torch nor
transformers, which take seconds to import.
"""

import importlib
import sys

from .args import Parser

# command -> (the module whose add_parser(sub) adds it, the one line the command list shows)
COMMANDS = {
    "generate": ("coreinfer.cli.generate", "complete one prompt, streaming the text"),
    "chat": ("coreinfer.cli.generate", "interactive chat, streaming tokens"),
    "serve": ("coreinfer.serving.cli", "OpenAI-compatible HTTP server (completions, chat, streaming)"),
    "eval": ("coreinfer.eval.cli", "measure what sparsity costs: perplexity and benchmark tasks"),
    "bench": ("coreinfer.bench.cli", "decode speed side by side: transformers, coreinfer dense/core, llama.cpp"),
    "cluster": ("coreinfer.analysis.cli",
                "cluster a corpus by core sets; save per-cluster core sets for --mode similarity"),
    "analyze": ("coreinfer.analysis.cli", "measure core-set stability or similarity on this model (JSON + PNG)"),
    "cache": ("coreinfer.cli.cache", "list or clear the cache folder: converted models, compiled steps, native kernels"),
    "calibrate": ("coreinfer.eval.calibrate",
                  "choose per-layer budgets for adaptive decoding; writes a --profile file"),
}


def build_parser(argv: list[str] | None = None) -> Parser:
    """The parser with the real subparser of the command `argv` names (None: of every command); the
    others are placeholders that only show in the command list."""
    parser = Parser(prog="coreinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    load = {module for name, (module, _) in COMMANDS.items() if argv is None or name == named}
    for name, (module, help) in COMMANDS.items():  # in this order: a module adds its commands together
        if module in load:
            importlib.import_module(module).add_parser(sub)
            load.discard(module)
        elif name not in sub.choices:
            sub.add_parser(name, help=help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from ..io.loading import CheckpointError

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
