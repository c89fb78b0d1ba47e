"""One FFN layer per decoded token: the dense path of a weight format against the fused sparse FFN op
(kernels/sparse_ffn.cpp) at thresholds that keep a share of down's rows, with the bytes each reads and the
share of the byte saving that turns into speed (1.0: time falls as fast as bytes).

    python benchmarks/sparse_ffn.py --threads 2 [--F 1536 --d 576] [--fmt q4|q8_0|int8]

Random weights of the layer's shape (SmolLM2-135M by default); one process, contenders alternating.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from coreinfer.engine.quant import int8_matmul, quantize_int8
from coreinfer.formats import q4, q8_0
from coreinfer.kernels import sparse_ffn


def timed(fn, rounds: int) -> float:
    """Median microseconds of `rounds` batches of 50 calls."""
    for _ in range(20):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        out.append((time.perf_counter() - t0) / 50 * 1e6)
    return sorted(out)[len(out) // 2]


def nbytes(t: dict) -> int:
    return sum(v.nbytes for v in t.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--F", type=int, default=1536)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--fmt", default="q4", choices=("q4", "q8_0", "int8"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = {n: torch.randn(args.F, args.d, generator=g) * 0.05 for n in ("gate", "up", "down")}
    x = torch.randn(1, args.d, generator=g)
    if args.fmt == "int8":
        t = {}
        for n in ("gate", "up"):
            q, s = quantize_int8(w[n])
            t[n] = {"q": q, "scale": s.float()}
        q, s = quantize_int8(w["down"].t().contiguous())  # per output channel
        t["down"] = {"q": q.t().contiguous(), "scale": s.float()}
        kernel = {n: (v["q"], v["scale"].bfloat16()) for n, v in t.items() if n != "down"}
        dq, ds = q, s.bfloat16()  # [d, F]: the int8 FFN's down
        dense = lambda: int8_matmul(F.silu(int8_matmul(x, *kernel["gate"])) * int8_matmul(x, *kernel["up"]), dq, ds)  # noqa: E731
        down_bytes = t["down"]["q"].nbytes
    else:
        fmt = q4 if args.fmt == "q4" else q8_0
        t = {"gate": fmt.pack(w["gate"]), "up": fmt.pack(w["up"]), "down": q8_0.pack(w["down"])}
        dense = lambda: q8_0.rows_matmul(F.silu(fmt.matmul(x, t["gate"])) * fmt.matmul(x, t["up"]), t["down"])  # noqa: E731
        down_bytes = nbytes(t["down"])
    inputs = nbytes(t["gate"]) + nbytes(t["up"])
    norm = sparse_ffn.dequantize(t["down"], down=True).norm(dim=1)
    score = (sparse_ffn.scores(x, t["gate"], t["up"], "silu").abs() * norm).flatten().sort().values
    rows = [("dense path (GEMV x2 + down)", dense, inputs + down_bytes)]
    for share in (1.0, 0.8, 0.6, 0.4, 0.2):
        th = 0.0 if share == 1 else float(score[int(args.F * (1 - share))])
        rows.append((f"sparse_ffn op, down keep {share:g}",
                     lambda th=th: sparse_ffn.sparse_ffn(x, t["gate"], t["up"], t["down"], norm, th, "silu"),
                     inputs + int(down_bytes * share)))
    times = {name: [] for name, _, _ in rows}
    for _ in range(3):  # contenders alternate
        for name, fn, _ in rows:
            times[name].append(timed(fn, args.rounds // 3 or 1))
    full = rows[1]
    t_full = sorted(times[full[0]])[1]
    print(f"{args.fmt} gate/up, F={args.F} d={args.d}, {args.threads} threads")
    print("| contender | us/token | KB read | GB/s | saving turned into speed |")
    print("|---|---:|---:|---:|---:|")
    for name, _, b in rows:
        us = sorted(times[name])[1]
        turned = ""
        if name != rows[0][0] and b < full[2]:
            turned = f"{(t_full - us) / (t_full * (1 - b / full[2])):.0%}"
        print(f"| {name} | {us:.1f} | {b / 1e3:.0f} | {b / us / 1e3:.1f} | {turned} |")


if __name__ == "__main__":
    main()
