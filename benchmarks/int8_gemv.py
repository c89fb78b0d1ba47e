"""The int8 x int8 GEMV (engine/gemv.py) against PyTorch's weight-only int8 kernel, at SmolLM2-135M's shapes.

    python benchmarks/int8_gemv.py --threads 2            # kernels alone: us per call, GB/s, error
    python benchmarks/int8_gemv.py --threads 2 --decode   # also whole decode steps, eager and compiled

Per shape, `--layers` distinct weight matrices (30, a model's worth; 3 of the 28 MB head) are called in
turn, so the working set is the model's, as in decode, not one matrix hot in L2. Contenders, alternated
round by round: `_weight_int8pack_mm` (bf16 activations, weights converted to float in its inner
loop: what int8_matmul called before), the native GEMV `torch.ops.coreinfer.int8_gemv` (activations
quantized per block of 32, vpdpbusd dots), and fp32 `F.linear` on the dequantized weights for reference.
GB/s counts the int8 weight bytes (fp32's 4x).
Error: |out - ref| / |ref| against the float product of the int8 weights with the unquantized activations.

The sweep then calls every matmul of one SmolLM2 decode step in order (30 layers of qkv, o, up, gate,
down, then the head: 151 matrices, 134 MB), M = 1: the decode working set, which (on the development
machine) does not stay in L3 from one token to the next, so this is the figure a decode step sees.

`--decode` decodes 64 tokens of one prompt with the embedded model's int8 weights, eager and compiled
(max-autotune, freezing, cpp_wrapper: coreinfer's compiled step), alternating the two matmuls by setting
gemv.MAX_M (0: every matmul takes PyTorch's kernel).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from coreinfer.engine import gemv
from coreinfer.engine.quant import quantize_int8

SHAPES = {"qkv": (960, 576), "o": (576, 576), "up/gate": (1536, 576), "down": (576, 1536),
          "up/gate k=768": (768, 576), "down k=768": (576, 768), "lm_head": (49152, 576)}  # [N, K]


def per_call_us(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """Best-round us per call of each fn(i), i < calls, the contenders alternating round by round."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(calls):
                fn(i)
            if r:
                times[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: min(v) for name, v in times.items()}  # the least disturbed round: the machine is shared


def kernels(args) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads; us per call (GB/s of int8 weights), best of {args.rounds} rounds; "
          "error: relative to the float product\n\n| shape | M | pack | native | fp32 | "
          "pack/native | err pack | err native |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (N, K) in SHAPES.items():
        layers = 3 if N > 10000 else args.layers
        weights = [torch.randn(N, K, generator=g) * 0.05 for _ in range(layers)]  # [N, K] each
        quant = [quantize_int8(w) for w in weights]
        quant = [(q, s.bfloat16()) for q, s in quant]  # coreinfer's CPU layout: bf16 scales
        for M in args.m:
            xs = [torch.randn(M, K, generator=g) for _ in range(layers)]  # [M, K] each
            q, s = quant[0]
            ref = xs[0] @ (q.float() * s.float()[:, None]).t()
            err = {k: ((out - ref).norm() / ref.norm()).item() for k, out in (
                ("pack", torch.ops.aten._weight_int8pack_mm(xs[0].bfloat16(), q, s).float()),
                ("native", torch.ops.coreinfer.int8_gemv(xs[0], q, s)))}
            us = per_call_us({
                "pack": lambda i, xs=xs, quant=quant: torch.ops.aten._weight_int8pack_mm(xs[i].bfloat16(), *quant[i]),
                "native": lambda i, xs=xs, quant=quant: torch.ops.coreinfer.int8_gemv(xs[i], *quant[i]),
                "fp32": lambda i, xs=xs, weights=weights: F.linear(xs[i], weights[i])}, layers, args.rounds)
            cell = {k: f"{v:.1f} ({N * K / v / 1e3 * (4 if k == 'fp32' else 1):.0f})" for k, v in us.items()}
            print(f"| {name} [{N}, {K}] | {M} | {cell['pack']} | {cell['native']} | {cell['fp32']} | "
                  f"{us['pack'] / us['native']:.2f}x | {err['pack']:.4f} | {err['native']:.4f} |")


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy decodes share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def sweep(args) -> None:
    """One decode step's matmuls in order, M = 1; ms per step, best of `--rounds`."""
    g = torch.Generator().manual_seed(1)
    layer = [SHAPES["qkv"], SHAPES["o"], SHAPES["up/gate"], SHAPES["up/gate"], SHAPES["down"]]
    mats = []
    for N, K in layer * 30 + [SHAPES["lm_head"]]:
        q, s = quantize_int8(torch.randn(N, K, generator=g) * 0.05)
        mats.append((q, s.bfloat16()))
    xs = {K: torch.randn(1, K, generator=g) for _, K in layer}  # [1, K]
    ms = per_call_us({
        "pack": lambda i: [torch.ops.aten._weight_int8pack_mm(xs[q.shape[1]].bfloat16(), q, s) for q, s in mats],
        "native": lambda i: [torch.ops.coreinfer.int8_gemv(xs[q.shape[1]], q, s) for q, s in mats]}, 1, args.rounds)
    mb = sum(q.numel() for q, _ in mats) / 1e6
    print(f"\nsweep of one decode step's {len(mats)} matmuls ({mb:.0f} MB), M = 1, best of {args.rounds}: "
          + ", ".join(f"{k} {v / 1e3:.2f} ms ({mb / v * 1e3:.0f} GB/s)" for k, v in ms.items())
          + f"; pack/native {ms['pack'] / ms['native']:.2f}x")


def decode(args) -> None:
    from coreinfer.api import LLM
    from coreinfer.engine.generate import GenerationConfig

    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    gen = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    print("\n| step | matmul | decode tok/s (median) | greedy tokens equal to eager's (same matmul) |\n"
          "|---|---|---:|---:|")
    eager: dict[str, list[int]] = {}
    limit = gemv.MAX_M
    for compiled in (False, True):
        llm = LLM(weights="int8", threads=args.threads, compile=compiled, progress=False)
        rates: dict[str, list[float]] = {}
        tokens: dict[str, list[list[int]]] = {}
        for r in range(args.decode_rounds + 1):  # round 0 warms up (and compiles)
            for kernel, max_m in (("pack", 0), ("native", limit)):
                gemv.MAX_M = max_m
                [c] = llm.generate(prompt, gen, None, chat=True)  # None: dense
                tokens.setdefault(kernel, []).append(c.token_ids)
                if r:
                    rates.setdefault(kernel, []).append(c.decode_tok_s)
        for kernel, v in rates.items():
            eager.setdefault(kernel, tokens[kernel][0])
            same = min(equal_prefix(t, eager[kernel]) for t in tokens[kernel])  # every round, eager's first
            print(f"| {'compiled' if compiled else 'eager'} | {kernel} | {statistics.median(v):.1f} | {same}/64 |")
    shared = equal_prefix(eager["pack"], eager["native"])
    print(f"\npack and native share the first {shared} of 64 greedy tokens (eager)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--m", type=int, nargs="+", default=[1, 2], help="activation rows (decode: one a sequence)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--decode", action="store_true", help="also time decode steps of the embedded model")
    p.add_argument("--decode-rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not gemv.available():
        raise SystemExit("no int8 x int8 GEMV here (needs x86 AVX512-VNNI and a C compiler): nothing to compare")
    kernels(args)
    sweep(args)
    if args.decode:
        decode(args)


if __name__ == "__main__":
    main()
