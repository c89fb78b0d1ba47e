"""Decode step time of a continuous batch, per FFN path: per-sequence core rows vs masked dense.

    python benchmarks/batch_ffn.py --rows 1,2,4,8,16 --beta 0.85,0.5 --threads 1

For each keep ratio and batch size, fills a DecodeBatch with that many prompts and times decode
steps with each FFN forced to "compact" (every sequence reads its own k core rows: n * k rows) and
"masked" (the dense FFN once for the batch, activations times each row's 0/1 core mask: F rows), next
to the path "auto" picks by bytes. Prints one markdown table: ms per step, tok/s over the batch, and
the weight bytes read per decoded token of one sequence, against one dense step.
"""

import argparse
import os
import statistics
import sys
import time

import torch

from coreinfer.api import LLM
from coreinfer.engine.batching import DecodeBatch, prefill_one
from coreinfer.engine.generate import GenerationConfig
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.session import make_policy

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def quicksort(xs):",
           "Explain in one sentence why the sky is blue.", "List three prime numbers:", "Once upon a time"]


def step_ms(llm, rows: int, core: CoreConfig, path: str, steps: int) -> tuple[float, float]:
    """Median ms per step of `rows` sequences, and the weight bytes per token of one sequence against dense."""
    model = llm.model
    batch = DecodeBatch(model, rows, path)
    gen = GenerationConfig(max_new_tokens=steps + 4, ignore_eos=True)
    for i in range(rows):
        ids = llm.encode(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)))
        session, logits, selection, _ = prefill_one(model, ids, make_policy(core, model))
        batch.add(session, logits, gen, set(), selection)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:]), batch.step_bytes / rows / model.weight_bytes()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,16", help="batch sizes")
    p.add_argument("--beta", default="0.85,0.5", help="keep ratios")
    p.add_argument("--steps", type=int, default=12, help="timed steps per cell (the first two are dropped)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="default: the embedded model")
    args = p.parse_args()
    llm = LLM(args.model, threads=args.threads, progress=False)
    print(f"{llm.name}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}\n")
    print("| keep | rows | auto picks | compact ms/step | masked ms/step | compact tok/s | masked tok/s "
          "| compact bytes/token | masked bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for beta in (float(b) for b in args.beta.split(",")):
        core = CoreConfig(beta=beta)
        for rows in (int(r) for r in args.rows.split(",")):
            c_ms, c_bytes = step_ms(llm, rows, core, "compact", args.steps)
            m_ms, m_bytes = step_ms(llm, rows, core, "masked", args.steps)
            picks = "compact" if c_bytes < m_bytes else "masked"  # "auto"'s rule for rows of one k
            print(f"| {beta} | {rows} | {picks} | {c_ms:.1f} | {m_ms:.1f} | {rows * 1e3 / c_ms:.1f} "
                  f"| {rows * 1e3 / m_ms:.1f} | {c_bytes:.3f} | {m_bytes:.3f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
