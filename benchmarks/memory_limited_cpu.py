"""llama.cpp (mmap) and coreinfer (`--max-memory`) decoding a model bigger than the memory they get.

    sudo python benchmarks/memory_limited_cpu.py --gguf MODEL.gguf --coreinfer-model MODEL --limit 3GiB
    python benchmarks/memory_limited_cpu.py --gguf /work/models/synthetic/qwen2.5-7b-q4_k_m.gguf \\
        --coreinfer-model same --limit 3GiB --keep 0.14 --layers all   # both on the GGUF (coreinfer: --weights
        auto); 0.14: the largest keep the plan fits in 3 GiB

Each run is a fresh process inside its own child of the cgroup-v1 memory controller
(/sys/fs/cgroup/memory), with memory.limit_in_bytes set (or no limit: the unconstrained row). Page
cache is charged to the group, so a file larger than the limit cannot stay in RAM. Before each run
the model files are evicted from the page cache (a cold start); the group is removed afterwards.
Runs alternate between the engines, `--rounds` times.

Per run: load time, time to first token (the prompt's prefill and one token), decode tok/s (greedy,
`--tokens` tokens), the group's peak memory (memory.max_usage_in_bytes: RSS and page cache) and the
bytes read from disk (the worker's /proc/self/io read_bytes) during the prefill and per decoded token.
coreinfer keeps `--keep` of each FFN layer's neurons (the paper's prompt-fixed core sets, `--beta`);
on a GGUF it takes `--weights auto` and streams each FFN from the file at prefill (engine/ffn_file.py).
Its unconstrained row is the same --max-memory run with no group limit (same keep, same code), so the
ratio isolates what the memory limit costs. Each round also times reading the model file once, cold,
in a group of the same limit (`cat FILE > /dev/null`): the yardstick of the TTFT target.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/memory")
UNLIMITED = "1024GiB"  # coreinfer's --max-memory in the rows without a group limit
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden screw press. ")


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def llama(args, repack: bool):
    """llama_cpp.Llama on the GGUF. repack False is llama-cli's --no-repack: by default llama.cpp copies
    Q4_0/Q4_K weights into interleaved anonymous buffers at load, so the whole model sits in RAM
    beside the mapped file, and a group smaller than the model kills it. llama-cpp-python 0.3.36 has
    no argument for it: the default model params it asks for are swapped for the load only."""
    import llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = repack
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(args.gguf, n_ctx=args.prompt_tokens + args.tokens + 16, n_threads=args.threads,
                               verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default


def worker_llama(args, repack: bool = True) -> dict:
    t0, r0 = time.perf_counter(), read_bytes()
    llm = llama(args, repack)
    ids = (llm.tokenize(TEXT.encode(), add_bos=False) * 50)[:args.prompt_tokens]
    t1, r1 = time.perf_counter(), read_bytes()
    llm.eval(ids)
    token = llm.sample(temp=0.0)
    t2, r2 = time.perf_counter(), read_bytes()
    for _ in range(args.tokens - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    t3, r3 = time.perf_counter(), read_bytes()
    return dict(load_s=t1 - t0, ttft_s=t2 - t1, decode_tps=(args.tokens - 1) / (t3 - t2),
                load_read=r1 - r0, prefill_read=r2 - r1, read_per_token=(r3 - r2) / (args.tokens - 1))


def worker_coreinfer(args) -> dict:
    import torch

    from coreinfer import LLM, CoreConfig

    t0, r0 = time.perf_counter(), read_bytes()
    model = args.gguf if args.coreinfer_model == "same" else args.coreinfer_model
    llm = LLM(model, threads=args.threads, progress=False, weights=weights(model),
              max_memory=args.limit if args.limit != "none" else UNLIMITED)
    ids = (llm.tokenizer.encode(TEXT) * 50)[:args.prompt_tokens]
    core = CoreConfig(beta=args.keep, layers=args.layers) if args.keep < 1 else None
    t1, r1 = time.perf_counter(), read_bytes()
    with torch.inference_mode():
        session = llm.session([ids], args.tokens, core)
        token = session.prefill().argmax(-1)  # [1]
        t2, r2 = time.perf_counter(), read_bytes()
        for _ in range(args.tokens - 1):
            token = session.step(token).argmax(-1)
    t3, r3 = time.perf_counter(), read_bytes()
    return dict(load_s=t1 - t0, ttft_s=t2 - t1, decode_tps=(args.tokens - 1) / (t3 - t2),
                load_read=r1 - r0, prefill_read=r2 - r1, read_per_token=(r3 - r2) / (args.tokens - 1),
                fetch_s=getattr(llm.streamer, "fetch_s", 0.0), resident=session.plan.total)


def weights(model: str) -> str:
    """What coreinfer loads a model as: a GGUF in its file's formats, a safetensors folder as it is."""
    return "auto" if model.endswith(".gguf") else "dense"


def worker_read(args) -> dict:
    """Read the model file once, as `cat FILE > /dev/null` does."""
    t0 = time.perf_counter()
    subprocess.run(["cat", args.gguf], stdout=subprocess.DEVNULL, check=True)
    return dict(read_s=time.perf_counter() - t0, read_bytes=Path(args.gguf).stat().st_size)


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so every run starts cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_in_group(engine: str, limit: int | None, argv: list[str], timeout: float) -> dict:
    """Run this script's worker for `engine` in a fresh memory cgroup; its figures and the group's peak."""
    group = CGROUP / f"coreinfer-bench-{os.getpid()}-{engine}"
    group.mkdir()
    try:
        if limit is not None:
            (group / "memory.limit_in_bytes").write_text(str(limit))
        # the shell joins the group before exec'ing the worker, so every page it faults in is charged
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", sys.executable, __file__,
               "--worker", engine, *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:  # run() has killed and reaped the worker
            return dict(error=f"over {timeout:.0f} s", peak=int((group / "memory.max_usage_in_bytes").read_text()))
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()  # empty once the worker has exited; its page cache is reparented
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(error=f"exit {proc.returncode}: {tail}", peak=peak)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(result, peak=peak, failcnt=failcnt)


def row(engine: str, limit: str, r: dict, file_bytes: int) -> str:
    if "error" in r:
        return f"| {engine} | {limit} | {r['error'][:90]} | | | | | | |"
    if "read_s" in r:  # the yardstick: one cold read of the file
        return (f"| cat file > /dev/null | {limit} | | {r['read_s']:.2f} | | {r['peak'] / 2**30:.2f} | | "
                f"{r['read_bytes'] / 1e9:.2f} ({r['read_bytes'] / r['read_s'] / 1e9:.2f} GB/s) | |")
    fetch = f" (FFN read+convert {r['fetch_s']:.1f})" if r.get("fetch_s") else ""
    return (f"| {engine} | {limit} | {r['load_s']:.1f} | {r['ttft_s']:.2f}{fetch} | {r['decode_tps']:.2f} | "
            f"{r['peak'] / 2**30:.2f} | {r['load_read'] / 1e9:.2f} | {r['prefill_read'] / 1e9:.2f} "
            f"({r['prefill_read'] / r['ttft_s'] / 1e9:.2f} GB/s) | {r['read_per_token'] / 1e6:.1f} "
            f"({r['read_per_token'] / file_bytes:.1%}) |")


def parse_size(text: str) -> int | None:
    if text == "none":
        return None
    from coreinfer.engine.budget import parse_bytes

    return parse_bytes(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="the GGUF llama.cpp runs ('none': skip llama.cpp)")
    p.add_argument("--coreinfer-model", required=True,
                   help="what coreinfer loads (a GGUF or HF folder of the same model; 'none': skip coreinfer)")
    p.add_argument("--limit", default="3GiB", help="the memory cgroup's limit, and coreinfer's --max-memory")
    p.add_argument("--keep", type=float, default=0.2, help="coreinfer's share of FFN neurons kept (1: dense)")
    p.add_argument("--layers", default=None, help="coreinfer's sparse layers (CoreConfig.layers; default: its "
                   "default layers, the others kept whole; 'all')")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16, help="tokens decoded per run")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every engine and limit")
    p.add_argument("--no-unconstrained", action="store_true", help="skip the rows without a memory limit")
    p.add_argument("--unconstrained", choices=["all", "coreinfer"], default="all",
                   help="which engines also run without a limit (coreinfer: its own ratio only; saves the time)")
    p.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    p.add_argument("--llama-repack", choices=["on", "off", "both"], default="both",
                   help="llama.cpp's weight repacking (its default: on; off: --no-repack, weights stay in the file)")
    p.add_argument("--worker", choices=["llama", "llama-norepack", "coreinfer", "read"], help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        workers = {"coreinfer": worker_coreinfer, "read": worker_read, "llama": lambda a: worker_llama(a, True),
                   "llama-norepack": lambda a: worker_llama(a, False)}
        print(json.dumps(workers[args.worker](args)))
        return
    if not (CGROUP / "memory.limit_in_bytes").is_file():
        p.error(f"no cgroup-v1 memory controller at {CGROUP}")
    argv = sys.argv[1:]
    llamas = {"on": ["llama"], "off": ["llama-norepack"], "both": ["llama", "llama-norepack"]}[args.llama_repack]
    engines = (llamas if args.gguf != "none" else []) + (["coreinfer"] if args.coreinfer_model != "none" else [])
    files = [Path(args.gguf)] if args.gguf != "none" else []
    if args.coreinfer_model not in ("none", "same"):  # the files coreinfer reads: a GGUF, or a folder's safetensors
        from coreinfer.io.loading import load_checkpoint

        model = Path(args.coreinfer_model)
        files += [model] if model.suffix == ".gguf" else sorted(
            load_checkpoint(args.coreinfer_model, progress=False).tokenizer_dir.glob("*.safetensors"))
    file_bytes = Path(args.gguf if args.gguf != "none" else files[0]).stat().st_size
    limits = [args.limit] + ([] if args.no_unconstrained else ["none"])
    print(f"model file {file_bytes / 1e9:.2f} GB; {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.tokens} decoded; coreinfer keep {args.keep}, layers {args.layers or 'default'}")
    print("| engine | memory limit | load s | TTFT s | decode tok/s | peak group GiB | load read GB | "
          "prefill read GB | read per token MB (of file) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for _ in range(args.rounds):
        for limit in limits:
            here = [e for e in engines if limit != "none" or args.unconstrained == "all" or e == "coreinfer"]
            for engine in (["read"] if args.gguf != "none" and limit != "none" else []) + here:
                evict(files)
                run_argv = argv + (["--limit", limit] if engine == "coreinfer" else [])  # the last --limit wins
                r = run_in_group(engine, parse_size(limit), run_argv, args.timeout)
                name = {"llama": "llama.cpp (mmap)", "llama-norepack": "llama.cpp (mmap, --no-repack)",
                        "coreinfer": f"coreinfer keep {args.keep}", "read": ""}[engine]
                print(row(name, limit, r, file_bytes), flush=True)
                if "error" in r:
                    print(f"  {name}: {r['error']}", flush=True)


if __name__ == "__main__":
    main()
