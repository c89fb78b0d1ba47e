"""`coreinfer`: decode faster with each prompt's core neurons. The entry point: generate and chat here,
every other command in its own module; flags map one-to-one onto the API (see cli/args.py)."""

import argparse
import sys

from ..io.loading import CheckpointError
from .args import (
    add_core_args,
    add_generation_args,
    add_runtime_args,
    core_config,
    generation_config,
    report_speed,
    runtime_kwargs,
)


def cmd_generate(args) -> None:
    from ..api import LLM

    gen, core = generation_config(args), core_config(args)
    llm = LLM(**runtime_kwargs(args))
    final = None
    for event in llm.stream(args.prompt, gen, core, chat=args.chat):
        print(event.text, end="", flush=True)
        final = event.completion or final
    print()
    report_speed(final)


def cmd_chat(args) -> None:
    from ..api import LLM

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
    from ..analysis.cli import add_parser as analyses
    from ..bench import add_parser as bench
    from ..eval.calibrate import add_parser as calibrate
    from ..eval.cli import add_parser as evaluate
    from ..serving.cli import add_parser as serve

    return [serve, evaluate, bench, analyses, calibrate]


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
