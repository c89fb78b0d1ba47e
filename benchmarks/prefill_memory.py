"""Peak RSS of answering one long prompt with core neurons on the embedded model.

    python benchmarks/prefill_memory.py --tokens 2048

Prints the RSS after loading, the peak while prefilling `--tokens` tokens with the default core
settings (and decoding 2 tokens), and the growth between them. Run it from another checkout with
PYTHONPATH to compare versions; each run is a fresh process, since ru_maxrss only grows.
"""

import argparse
import resource
import time

import torch

from coreinfer import LLM, CoreConfig, GenerationConfig

TEXT = "The history of the printing press begins in the fifteenth century. "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(1)
    llm = LLM(progress=False)
    ids = llm.tokenizer.encode(TEXT * (args.tokens // 10 + 1))[:args.tokens]
    prompt = llm.tokenizer.decode(ids)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    t = time.perf_counter()
    [out] = llm.generate(prompt, GenerationConfig(max_new_tokens=2, ignore_eos=True), core=CoreConfig())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"prompt {out.prompt_tokens} tok: RSS after load {base:.0f} MiB, peak {peak:.0f} MiB, "
          f"growth {peak - base:.0f} MiB, {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
