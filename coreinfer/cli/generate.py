"""`coreinfer generate` and `coreinfer chat`: one prompt streamed (or dense and core side by side), and an
interactive chat; flags map one-to-one onto the API's dataclasses (see cli/args.py)."""

import shutil
import sys
import textwrap

from .args import (
    add_core_args,
    add_generation_args,
    add_runtime_args,
    check_utf8,
    core_config,
    decode_rate,
    generation_config,
    report_speed,
    runtime_kwargs,
)


def cmd_generate(args) -> None:
    from ..api import LLM, check_prompt

    check_utf8(args.prompt, "the prompt")  # before the model loads
    check_prompt(args.prompt)
    gen, core = generation_config(args), core_config(args)
    if args.compare and core is None:
        raise ValueError("--compare decodes both dense and with core neurons; drop --dense")
    llm = LLM(**runtime_kwargs(args))
    say_default(llm, core)
    if args.compare:
        print_comparison(args.prompt, llm.compare(args.prompt, gen, core, chat=args.chat))
        say_runtime(llm, core)
        return
    final = None
    for event in llm.stream(args.prompt, gen, core, chat=args.chat):
        print(event.text, end="", flush=True)
        final = event.completion or final
    print()
    say_runtime(llm, core)
    report_speed(final)


def is_default(core) -> bool:
    from ..engine.profile import AUTO

    return core is not None and core.profile == AUTO


def say_default(llm, core) -> None:
    """With the default core setting, one stderr line before the run: the weight format and decode step,
    and the calibrated profile it found, or why dense."""
    if is_default(core):
        print(f"{llm.runtime_line()}; {llm.default_core()[1]}", file=sys.stderr)


def say_runtime(llm, core) -> None:
    """With a core setting of the user's, the weight format and decode step, said after the run: a setting
    that cannot run (a missing profile, layers out of range) fails in one line, as every bad input does."""
    if not is_default(core):
        print(llm.runtime_line(), file=sys.stderr)


def print_comparison(prompt: str, c) -> None:
    """A Comparison as two columns, dense left and core right, then how far they agree."""
    width = min(shutil.get_terminal_size().columns, 160)
    col = max(24, (width - 3) // 2)
    share = c.core.stats.share if c.core.stats is not None else 1.0  # a policy may decide to decode dense
    left = column(f"dense: {decode_rate(c.dense)} tok/s, 100% of weights", c.dense.text, col)
    right = column(f"core: {decode_rate(c.core)} tok/s, {share:.0%} of weights", c.core.text, col)
    print(f"prompt: {prompt}\n")
    for i in range(max(len(left), len(right))):
        a, b = (left[i] if i < len(left) else ""), (right[i] if i < len(right) else "")
        print(f"{a:<{col}} | {b}".rstrip())
    n = c.dense.completion_tokens
    print()
    if c.agreement is not None:
        print(f"agreement: at {round(c.agreement * n)} of the {n} dense tokens ({c.agreement:.0%}) the core model's "
              "top choice is the dense token (teacher-forced on the dense text)")
    print(divergence(c.diverges_at))


def divergence(at: int | None) -> str:
    """The last line of a comparison: where the two outputs part (`at`: Comparison.diverges_at)."""
    if at is None:
        return "the outputs are identical"
    if at == 0:
        return "the outputs differ from the first token on"
    return f"the outputs diverge at token {at + 1} (" + ("the first is" if at == 1 else f"the first {at} are") \
        + " the same)"


def column(title: str, text: str, width: int) -> list[str]:
    """A title, a rule and `text` wrapped to `width`, paragraph by paragraph."""
    lines = textwrap.wrap(title, width) + ["-" * min(width, len(title))]
    for paragraph in text.strip().splitlines():
        lines += textwrap.wrap(paragraph, width) or [""]
    return lines


def cmd_chat(args) -> None:
    from ..api import LLM

    gen, core = generation_config(args), core_config(args)
    llm = LLM(**runtime_kwargs(args))
    say_default(llm, core)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("coreinfer chat: Ctrl-C stops a reply; an empty line, Ctrl-D or Ctrl-C at the prompt quits", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not user:
            return
        try:
            check_utf8(user, "the message")
        except ValueError as e:  # the conversation goes on without it
            print(f"coreinfer: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": stream_reply(llm, messages, gen, core)})


def stream_reply(llm, messages: list[dict], gen, core) -> str:
    """Print one reply as it is decoded and return its text; Ctrl-C stops it where it is (the part
    shown stays in the conversation)."""
    events = llm.stream(messages, gen, core)
    text, final = "", None
    try:
        for event in events:
            print(event.text, end="", flush=True)
            text += event.text
            final = event.completion or final
    except KeyboardInterrupt:
        events.close()  # ends the decode session
        print("\n[reply stopped]", file=sys.stderr)
        return text
    print()
    report_speed(final)
    return final.text


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template, as one user turn. Off by default: generate "
                        "continues the text as given, which is what the quality figures measure and what base "
                        "models expect; use --chat to ask an instruct model a question")
    p.add_argument("--compare", action="store_true",
                   help="decode dense, then with core neurons, and print both side by side with tok/s, the share "
                        "of weights read per token, and how often the core model's top token is the dense one")
    add_runtime_args(p), add_generation_args(p), add_core_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    add_runtime_args(p), add_generation_args(p, max_new_tokens=256), add_core_args(p)
    p.set_defaults(func=cmd_chat)
