"""The native FFN conversion of the CPU memory-limited prefill (kernels/ffn_convert.cpp), per layer.

    python benchmarks/ffn_convert.py --threads 2

One layer of Qwen2.5-7B's FFN shape (d 3584, F 18944) from random file blocks: down's file rows [d, F]
in Q4_K and in Q6_K into neuron-major q8_0 [F, d] (`to_q8_0_t`), and one Q4_K up/gate [F, d] into q4
(`q4k_to_q4`), each called as engine/ffn_file.py calls it: file rows in chunks of CHUNK_BYTES. Prints the
median ms per layer of `--rounds`, the weights converted per second and the file bytes read per second.
"""

import argparse
import statistics
import time

import torch
from gguf import GGMLQuantizationType

from coreinfer.engine.ffn_file import CHUNK_BYTES
from coreinfer.formats.ggml import TYPES
from coreinfer.kernels import ffn_convert

SCALES = {"Q4_K": slice(0, 4), "Q6_K": slice(208, 210)}  # each block's fp16 scales, kept finite


def blocks(kind: str, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Random file rows uint8 [rows, row bytes] of `kind` with small finite fp16 scales."""
    t = TYPES[GGMLQuantizationType[kind]]
    b = torch.randint(0, 256, (rows * cols // t.block, t.nbytes), dtype=torch.uint8, generator=g)
    at = SCALES[kind]
    h = (torch.rand(b.shape[0], 2, generator=g) * 0.01 + 1e-4).half().view(torch.uint8).reshape(-1, 4)
    b[:, at] = h[:, :at.stop - at.start]
    return b.view(rows, -1)


def down(raw: torch.Tensor, kind: str, out: dict[str, torch.Tensor]) -> None:
    """ffn_file.read_role's native down path: whole 32-row blocks of file rows per chunk."""
    step = max(32, CHUNK_BYTES // raw.shape[1] // 32 * 32)
    for start in range(0, raw.shape[0], step):
        ffn_convert.to_q8_0_t(raw[start:start + step], kind, out, start)


def up(raw: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """ffn_file.read_role's native up/gate path: file rows in chunks."""
    step = max(1, CHUNK_BYTES // raw.shape[1])
    for start in range(0, raw.shape[0], step):
        ffn_convert.q4k_to_q4(raw[start:start + step], {n: t[start:start + step] for n, t in out.items()})


def median_ms(fn, rounds: int) -> float:
    fn()  # warm-up: first touches of the outputs, the thread pool
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d", type=int, default=3584)
    p.add_argument("--F", type=int, default=18944)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not ffn_convert.load():
        raise SystemExit("no native ffn_convert here: nothing to measure")
    g, d, F = torch.Generator().manual_seed(0), args.d, args.F
    q8 = {"qs": torch.zeros(F, d, dtype=torch.int8), "d": torch.zeros(F, d // 32, dtype=torch.half)}
    q4 = {"qs": torch.zeros(F, d // 2, dtype=torch.uint8), "d": torch.zeros(F, d // 32, dtype=torch.half),
          "m": torch.zeros(F, d // 32, dtype=torch.half)}
    print(f"d {d}, F {F}, {args.threads} threads, chunks of {CHUNK_BYTES >> 20} MiB; median of {args.rounds}\n\n"
          "| op | file type | ms per layer | M weights/s | file GB/s |\n|---|---|---:|---:|---:|")
    cases = [("to_q8_0_t (down)", kind, blocks(kind, d, F, g), lambda raw, kind=kind: down(raw, kind, q8))
             for kind in ("Q4_K", "Q6_K")]
    cases.append(("q4k_to_q4 (up/gate)", "Q4_K", blocks("Q4_K", F, d, g), lambda raw: up(raw, q4)))
    for name, kind, raw, fn in cases:
        ms = median_ms(lambda: fn(raw), args.rounds)
        print(f"| {name} | {kind} | {ms:.1f} | {d * F / ms / 1e3:.0f} | {raw.numel() / ms / 1e6:.2f} |")


if __name__ == "__main__":
    main()
