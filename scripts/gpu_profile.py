"""Where a CUDA decode step's time goes: per-kernel GPU time of the eager step (CUDA graphs replay the
same kernels), dense and a core setting, on random weights of a real model's shapes.

    python scripts/gpu_profile.py --model qwen2.5-coder-1.5b --keep 0.5
"""

import argparse
import sys
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu_check import random_checkpoint  # noqa: E402

from coreinfer.bench.contenders import Ours  # noqa: E402
from coreinfer.engine.compiled import decode_forward  # noqa: E402
from coreinfer.engine.cuda_graphs import GraphedStep  # noqa: E402
from coreinfer.engine.policy import CoreConfig  # noqa: E402
from coreinfer.models import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    torch.inference_mode().__enter__()
    ckpt = random_checkpoint(args.model, args.tiny, torch.bfloat16, args.device)
    model = build_model(ckpt.config, ckpt.weights, args.device, torch.bfloat16)
    ids = list(range(100, 228))
    for core in (None, CoreConfig(beta=args.keep)):
        name = "dense" if core is None else f"keep {args.keep}"
        cuda = torch.device(args.device).type == "cuda"
        graphed = Ours(name, model, core, compiled=GraphedStep(partial(decode_forward, model)) if cuda else None)
        eager = Ours(name, model, core)
        for _ in range(2):
            rate_g = graphed.run(ids, 64, set())[2]
            eager.run(ids, args.tokens, set())
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            _, _, rate_e, _ = eager.run(ids, args.tokens, set())
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA or
                  getattr(e, "self_device_time_total", 0) > 0]
        total = sum(e.self_device_time_total for e in events) / 1e3
        print(f"\n### {name}: graphed {rate_g:.1f} tok/s ({1e3 / rate_g:.2f} ms), eager {rate_e:.1f} tok/s; "
              f"GPU kernel time over prefill + {args.tokens} steps: {total:.1f} ms")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
