"""The native weighted row sum (engine/native.py) against PyTorch, on more layers than the cache holds.

    python benchmarks/rowsum.py --threads 2

Per layer, `out = a[rows] @ W[rows]` for W of SmolLM2-135M's down projection [1536, 576] fp32, with
`rows` the top share of |a|: the native kernel (rows read in place), PyTorch's index_select + matmul,
and the dense vector-matrix product over all rows. The default 100 matrices (354 MB) exceed the
development machine's 300 MB L3, so most calls read their rows from memory, as a decode step of a
model larger than the cache does. Prints microseconds per matrix, median of `--rounds`.
"""

import argparse
import statistics
import time

import torch

from coreinfer.engine import native


def per_layer_us(fn, layers: int, rounds: int) -> float:
    fn()  # warm-up: first touches, thread pool start
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / layers * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--rows", type=int, default=1536)
    p.add_argument("--cols", type=int, default=576)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.load()
    if lib is None:
        raise SystemExit("no C compiler: nothing to compare")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(args.rows, args.cols, generator=g) for _ in range(args.layers)]  # [R, n] each
    acts = [torch.randn(args.rows, generator=g) for _ in range(args.layers)]  # [R] each
    out = torch.empty(args.cols)
    n = range(args.layers)
    dense = per_layer_us(lambda: [acts[i] @ weights[i] for i in n], args.layers, args.rounds)
    print(f"{args.layers} layers of [{args.rows}, {args.cols}] fp32, {args.threads} threads; us per matrix, median "
          f"of {args.rounds}\n\n| rows read | native | index_select + matmul | dense (all rows) |\n|---:|---:|---:|---:|")
    for share in (1.0, 0.8, 0.7, 0.5, 0.3):
        m = round(share * args.rows)
        rows = [a.abs().topk(m).indices.sort().values for a in acts]  # [m] each, in address order
        coef = [acts[i][rows[i]] for i in n]
        in_place = per_layer_us(lambda: [native.rowsum(lib, weights[i], rows[i], coef[i], out) for i in n],
                              args.layers, args.rounds)
        gather = per_layer_us(lambda: [coef[i] @ weights[i].index_select(0, rows[i]) for i in n],
                              args.layers, args.rounds)
        print(f"| {share:.0%} | {in_place:.0f} | {gather:.0f} | {dense:.0f} |")


if __name__ == "__main__":
    main()
