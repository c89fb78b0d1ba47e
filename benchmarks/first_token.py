"""Time to the first token and to the first compiled token, with the compiled step built in the background.

    flock /tmp/coreinfer-cpu.lock python -P benchmarks/first_token.py --weights int8 --threads 2

Times are from the start of `LLM(...)` (the imports before it are printed apart). With an empty
COREINFER_CACHE the compile takes minutes (a cold start); with a warm one it loads in seconds. Printed:
load, first token, first compiled token, the eager steps' rate while the compile ran, the compiled
steps' rate, and, in the same process afterwards, eager steps with no compile running (what the
compile's share of the GIL and the cores cost the eager steps).
"""

import argparse
import time

T_IMPORT = time.perf_counter()

import torch  # noqa: E402

from coreinfer import LLM  # noqa: E402
from coreinfer.engine.generate import GenerationConfig, decode  # noqa: E402
from coreinfer.engine.policy import CoreConfig  # noqa: E402
from coreinfer.engine.profile import AUTO  # noqa: E402

PROMPT = "The history of the city of Paris begins"


def eager_rate(llm, ids: list[int], steps: int, core) -> float:
    """Eager decode steps per second of a fresh session, nothing compiling."""
    session = llm.session([ids], steps + 1, core)
    session.compiled = None
    token = session.prefill().argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        token = session.step(token).argmax(-1)
    return steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default="int8")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokens", type=int, default=4000, help="tokens to decode at most (ignoring EOS)")
    p.add_argument("--dense", action="store_true", help="decode dense (default: the default core setting)")
    p.add_argument("--after", type=int, default=100, help="stop this many compiled tokens after the switch")
    args = p.parse_args()
    t0 = time.perf_counter()
    print(f"imports: {t0 - T_IMPORT:.1f} s")
    llm = LLM(args.model, weights=args.weights, threads=args.threads, progress=False)
    t_load = time.perf_counter() - t0
    ids = llm.encode(PROMPT)
    core = None if args.dense else CoreConfig(profile=AUTO)
    session = llm.session([ids], args.tokens, core)
    step = llm.compiled
    first = first_compiled = None
    for n, _ in enumerate(decode(session, GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True),
                                 set()), 1):
        now = time.perf_counter() - t0
        if first is None:
            first = now
            print(f"first token at {first:.1f} s (load {t_load:.1f} s)", flush=True)
        if first_compiled is None and getattr(step, "compiled_steps", 0):
            first_compiled = (now, n)
            print(f"first compiled token at {now:.1f} s (token {n})", flush=True)
        if getattr(step, "compiled_steps", 0) >= args.after:
            break
    total = time.perf_counter() - t0
    print(f"{llm.name}, --weights {args.weights}, {llm.default_core()[1] if core else 'dense'}, {torch.get_num_threads()} threads, {n} tokens")
    print(f"load {t_load:.1f} s, first token {first:.1f} s, end {total:.1f} s")
    if hasattr(step, "eager_steps"):
        at = f"{first_compiled[0]:.1f} s (token {first_compiled[1]})" if first_compiled else "none"
        print(f"first compiled token {at}; compile {step.background_s:.1f} s in the background")
        print(f"eager while compiling: {step.eager_steps} steps at {step.eager_steps / step.eager_s:.1f} tok/s; "
              f"compiled: {step.compiled_steps} steps at "
              f"{step.compiled_steps / step.compiled_s if step.compiled_s else 0:.1f} tok/s")
    print(f"eager, nothing compiling: {eager_rate(llm, ids, 60, core):.1f} tok/s")


if __name__ == "__main__":
    main()
