"""The native kernels of coreinfer/kernels/ at decode shapes, against PyTorch's int8 and int4 kernels.

    python benchmarks/native_kernels.py --threads 2                 # all three models' shapes, M = 1
    python benchmarks/native_kernels.py --models smollm2 --m 1 4    # a subset, more activation rows

Per shape, enough distinct weight matrices (`--working-set` MB of each format, at least 2) are called in
turn that they do not stay in the 32 MiB L3: the weights come from DRAM, as in a decode step. The
contenders alternate round by round; a cell is the best round's us per call and its GB/s of weight bytes
read (each format's own bytes: qs plus its scales), with the share of the read bandwidth measured in the
same run (coreinfer.bench.run.read_bandwidth_gb_s: summing a 512 MiB buffer).

GEMV contenders, W [N, K] times x [M, K]: the native q4_gemv (0.625 byte a weight), q8_0_gemv (1.0625)
and int8_gemv (1 + a bf16 scale a row); PyTorch's `_weight_int8pack_mm` (bf16 x, int8 per channel) and
`_weight_int4pack_mm_for_cpu` (group 32, 0.625 byte a weight, as engine/int4.py calls it).
Down-projection rows, out [M, d] = coef [M, R] @ W[rows] for W [F, d] neuron-major: the native int8_rows,
q8_0_rows and q4_rows (0.625 byte a weight: --weights auto's down where the file's is 4-bit) over all F rows and over a random half (R = F / 2, sorted, as a core would be), against
PyTorch's `_weight_int8pack_mm` on the same down stored [d, F] (all rows: dense) and on its gathered
half's columns [d, F/2] (what compaction would have stored).
"""

import argparse

import torch

from coreinfer.bench.run import read_bandwidth_gb_s
from coreinfer.engine import gemv
from coreinfer.kernels import q4, q8_0, rows
from int8_gemv import per_call_us  # the sibling script's timer: best round, contenders alternating

# d, FFN width, q/k/v rows (d + 2 * kv heads * head dim): the decode GEMVs of each model
MODELS = {"smollm2": ("SmolLM2-135M", 576, 1536, 960), "qwen1.5b": ("Qwen2.5-1.5B", 1536, 8960, 2048),
          "qwen7b": ("Qwen2.5-7B", 3584, 18944, 4608)}


def copies(nbytes: int, working_set_mb: int) -> int:
    return max(2, -(-working_set_mb * 10**6 // nbytes))


def gemv_weights(N: int, K: int, g: torch.Generator) -> dict:
    """One matrix in each contender's format (random values: speed does not depend on them)."""
    qs8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    d = (torch.rand(N, K // 32, generator=g) * 0.01).half()
    qs4 = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.unpack(qs4).to(torch.int32), 2)
    szeros = (torch.rand(K // 32, N, 2, generator=g) * 0.01).bfloat16()
    scale = (torch.rand(N, generator=g) * 0.01).bfloat16()
    return {"q4_gemv": ((qs4, d, d), N * K // 2 + 4 * N * K // 32),
            "q8_0_gemv": ((qs8, d), N * K + 2 * N * K // 32),
            "int8_gemv": ((qs8, scale), N * K + 2 * N),
            "torch int8": ((qs8, scale), N * K + 2 * N),
            "torch int4": ((packed, szeros), N * K // 2 + 4 * N * K // 32)}


GEMV_CALLS = {
    "q4_gemv": lambda x, w: torch.ops.coreinfer.q4_gemv(x, *w),
    "q8_0_gemv": lambda x, w: torch.ops.coreinfer.q8_0_gemv(x, *w),
    "int8_gemv": lambda x, w: torch.ops.coreinfer.int8_gemv(x, *w),
    "torch int8": lambda x, w: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), *w),
    "torch int4": lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w[0], 32, w[1])}


def cell(us: float, nbytes: int, bandwidth: float) -> str:
    gb_s = nbytes / us / 1e3
    return f"{us:.0f} us {gb_s:.1f} GB/s {gb_s / bandwidth:.0%}"


def bench_gemv(name: str, N: int, K: int, M: int, args, bandwidth: float, g: torch.Generator) -> str:
    one = gemv_weights(N, K, g)
    n = copies(one["q8_0_gemv"][1], args.working_set)
    mats = [one] + [gemv_weights(N, K, g) for _ in range(n - 1)]
    xs = [torch.randn(M, K, generator=g) for _ in range(n)]  # [M, K] each
    fns = {k: (lambda i, k=k: GEMV_CALLS[k](xs[i], mats[i][k][0])) for k in GEMV_CALLS}
    us = per_call_us(fns, n, args.rounds)
    return f"| {name} [{N}, {K}] | {M} | " + " | ".join(cell(us[k], one[k][1], bandwidth) for k in GEMV_CALLS) + " |"


def bench_rows(F: int, d: int, M: int, half: bool, args, bandwidth: float, g: torch.Generator) -> str:
    R = F // 2 if half else F
    n = copies(F * d, args.working_set)
    index = torch.randperm(F, generator=g)[:R].sort().values if half else None
    mats = []
    for _ in range(n):
        qs = torch.randint(-127, 128, (F, d), generator=g, dtype=torch.int8)  # neuron-major [F, d]
        dq = (torch.rand(F, d // 32, generator=g) * 0.01).half()
        scale = (torch.rand(d, generator=g) * 0.01).bfloat16()
        kept = qs.t().contiguous() if index is None else qs[index].t().contiguous()  # [d, R]: compacted
        q4s = torch.randint(0, 256, (F, d // 2), generator=g, dtype=torch.uint8)  # q4 nibbles [F, d / 2]
        q4m = (torch.rand(F, d // 32, generator=g) * -0.08).half()
        mats.append((qs, dq, scale, kept, (torch.rand(d, generator=g) * 0.01).bfloat16(), q4s, q4m))
    coefs = [torch.randn(M, R, generator=g) for _ in range(n)]
    fns = {"int8_rows": lambda i: torch.ops.coreinfer.int8_rows(coefs[i], mats[i][0], mats[i][2], index),
           "q8_0_rows": lambda i: torch.ops.coreinfer.q8_0_rows(coefs[i], mats[i][0], mats[i][1], index),
           "q4_rows": lambda i: torch.ops.coreinfer.q4_rows(coefs[i], mats[i][5], mats[i][1], mats[i][6], index),
           "torch int8": lambda i: torch.ops.aten._weight_int8pack_mm(coefs[i].bfloat16(), mats[i][3], mats[i][4])}
    us = per_call_us(fns, n, args.rounds)
    nbytes = {"int8_rows": R * d + 2 * d, "q8_0_rows": R * d + 2 * R * d // 32, "q4_rows": R * d // 2 + 4 * R * d // 32,
              "torch int8": R * d + 2 * d}
    what = f"down rows {'half' if half else 'all'} R={R} of [{F}, {d}]"
    return f"| {what} | {M} | " + " | ".join(cell(us[k], nbytes[k], bandwidth) for k in fns) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--m", type=int, nargs="+", default=[1], help="activation rows (decode: one a sequence)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--working-set", type=int, default=256, help="MB of distinct matrices per shape and format")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (q4.available() and q8_0.available() and rows.available() and gemv.available()):
        raise SystemExit("the native kernels are not built here (needs x86 AVX512-VNNI and a C++ compiler)")
    bandwidth = read_bandwidth_gb_s()
    g = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads; read bandwidth {bandwidth:.1f} GB/s (same run); best of {args.rounds} rounds;"
          " each cell: us per call, GB/s of the format's weight bytes, share of the read bandwidth\n")
    print("| GEMV [N, K] | M | " + " | ".join(GEMV_CALLS) + " |\n|---|---:|" + "---:|" * len(GEMV_CALLS))
    for key in args.models:
        model, d, F, qkv = MODELS[key]
        for name, N, K in (("qkv", qkv, d), ("gate/up", F, d), ("down", d, F)):
            for M in args.m:
                print(bench_gemv(f"{model} {name}", N, K, M, args, bandwidth, g), flush=True)
    print("\n| down projection | M | int8_rows | q8_0_rows | q4_rows | torch int8 (stored [d, R]) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for key in args.models:
        model, d, F, _ = MODELS[key]
        for half in (False, True):
            for M in args.m:
                print(bench_rows(F, d, M, half, args, bandwidth, g).replace("| down", f"| {model} down", 1),
                      flush=True)


if __name__ == "__main__":
    main()
