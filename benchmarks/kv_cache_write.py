"""The compiled decode step with the KV cache written by index_put_ (models/common.py) against scatter_.

    python benchmarks/kv_cache_write.py --threads 2 [--cache-tokens 512] [--rounds 5] [--steps 32]

Why: inductor turned the old `scatter_` into the cache (a graph input) into a copy of the whole cache, the
scatter and a copy back, for K and V of every layer; an `index_put_` it writes in place. One model, two
sessions, the only difference the caches' class (ScatterCache writes as the old code did); both steps
compiled, then timed alternating round by round. Prints the median ms of each and their ratio per round,
and checks that both give the same logits. Run it under the CPU lock.
"""

import argparse
import statistics
import time

import torch

from coreinfer import LLM
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.profile import AUTO
from coreinfer.models.common import KVCache


class ScatterCache(KVCache):
    """The cache write before this change: scatter_ along the slot axis."""

    def update(self, slots, k, v, kv_len: int):
        index = slots[:, None, :, None].expand_as(k)  # [B, Hkv, T, hd]
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


def scatter_caches(model, like: list[KVCache]) -> list[ScatterCache]:
    B, H, S, hd = like[0].k.shape
    return [ScatterCache(B, H, S, hd, c.k.dtype, c.k.device) for c in like]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-tokens", type=int, default=512, help="prompt + new tokens the session is sized for")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    llm = LLM(args.model, threads=args.threads, background_compile=False, progress=False)
    print(llm.runtime_line(), "|", llm.default_core()[1])
    prompt = [(i * 7919) % 30000 + 100 for i in range(128)]
    new = args.cache_tokens - len(prompt)
    core = llm.resolve(CoreConfig(profile=AUTO))
    sessions = {}
    with torch.inference_mode():
        for name in ("index_put_", "scatter_"):
            s = llm.session([prompt], new, core)
            if name == "scatter_":
                s.caches = scatter_caches(llm.model, s.caches)
            llm.caches = None  # each session keeps its own caches
            first = s.prefill().argmax(-1)
            sessions[name] = (s, first)
        (a, first_a), (b, first_b) = sessions.values()
        same = [torch.equal(a.step(first_a), b.step(first_b)) for _ in range(3)]  # compiles both, then compares
        print(f"cache {a.caches[0].k.shape[2]} slots; logits equal on 3 steps: {all(same)}")
        times = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, (s, first) in sessions.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    s.step(first)
                times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    ratios = [x / y for x, y in zip(times["scatter_"], times["index_put_"])]
    for name, ms in times.items():
        print(f"{name}: {statistics.median(ms):.2f} ms per step (rounds {', '.join(f'{m:.2f}' for m in ms)})")
    print(f"scatter_ / index_put_: {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
