"""A GGUF as a new user runs it: cold first start, peak RSS, cache written, then decode beside llama.cpp.

    flock /tmp/coreinfer-cpu.lock python -P benchmarks/big_model.py \
        --model /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --weights auto --threads 2

Every figure comes from fresh processes, so no run inherits another's memory or caches:
1. Starts (`--starts`), one child each, with the compiled step off ("compile aside"):
   - cold: an empty cache folder (the config/tokenizer entry and the native kernels are made in it);
   - new: the cold run's cache without the model's own entry (what a second model's first start costs);
   - warm: the cache as the runs before left it.
   Each prints time to ready (`LLM(...)` returned) and to the first token of a short prompt (from the
   child's start, imports included), its peak RSS (VmHWM) and the bytes the cache holds by entry, as
   `coreinfer cache list` counts them.
2. Decode side by side: one long-lived worker per engine (coreinfer with the contenders of one
   --weights setting, llama.cpp on the file and/or (--llama) on its Q8_0 requantization by
   llama_cpp.llama_model_quantize), driven in alternation: a warm-up round, then --rounds rounds, each
   running every contender once back to back on the same prompt ids. Medians over the rounds; the
   ratio to llama.cpp (its first worker: the file, unless --llama q8_0) is the median of the rounds'
   ratios, with its min-max. Each worker's
   peak RSS (VmHWM, its compile included) is read when it exits.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "


def vm_hwm_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def cache_bytes() -> dict[str, int]:
    """Bytes in the cache folder by entry, as `coreinfer cache list` names them."""
    from coreinfer.cli.cache import built_folders
    from coreinfer.io.loading import cache_entries

    return {**{e.name: e.nbytes for e in cache_entries()}, **{b.name + "/": b.nbytes for b in built_folders()}}


def child_start(args) -> dict:
    """One first start in this process: ready, first token, peak RSS, cache."""
    from coreinfer import LLM, GenerationConfig

    llm = LLM(args.model, weights=args.weights, threads=args.threads, compile=False, progress=False)
    ready = time.perf_counter() - T0
    hwm_load = vm_hwm_bytes()
    gen = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    llm.generate(PROMPT, gen)
    return dict(ready_s=ready, first_token_s=time.perf_counter() - T0, rss_load=hwm_load, rss=vm_hwm_bytes(),
                cache=cache_bytes(), runs=llm.runtime_line())


def coreinfer_contenders(args):
    """The LLM and its contenders: dense and --beta settings, eager and (with --compile) compiled."""
    from coreinfer import LLM, CoreConfig
    from coreinfer.bench.contenders import Ours

    llm = LLM(args.model, weights=args.weights, threads=args.threads, compile=args.compile,
              background_compile=False, progress=False)
    cores = [None] + [CoreConfig(beta=float(b), statistic=args.statistic) for b in args.beta.split(",") if b]
    steps = [None] + ([llm.compiled] if llm.compiled is not None else [])
    out = []
    for core in cores:
        for step in steps:
            name = f"coreinfer {args.weights} {'dense' if core is None else f'{args.statistic} keep {core.beta:g}'}"
            out.append(Ours(name + (" compiled" if step else " eager"), llm.model, core, compiled=step))
    return llm, out


def child_worker(args) -> None:
    """A contender host: reads JSON commands on stdin, answers one JSON line each."""
    import torch

    if args.worker == "coreinfer":
        llm, contenders = coreinfer_contenders(args)
        ids = llm.tokenizer.hf((PROMPT * (args.prompt_tokens // 16 + 1)), add_special_tokens=False)["input_ids"]
        ids, eos = ids[:args.prompt_tokens], set()
    else:
        from coreinfer.bench.contenders import LlamaCpp

        contenders, ids, eos = [LlamaCpp(Path(args.worker), args.threads)], None, set()
    print(json.dumps(dict(names=[c.name for c in contenders], ids=ids, load_s=time.perf_counter() - T0)), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            print(json.dumps(dict(rss=vm_hwm_bytes())), flush=True)
            return
        c = contenders[cmd["index"]]
        compiled = getattr(c, "compiled", None)
        before = getattr(compiled, "compile_s", 0.0)
        with torch.inference_mode():
            prefill_s, _, tok_s, nbytes = c.run(cmd["ids"], args.new_tokens, eos)
        print(json.dumps(dict(prefill_s=prefill_s, tok_s=tok_s, nbytes=nbytes,
                              compile_s=getattr(compiled, "compile_s", 0.0) - before)), flush=True)


def child_args(args, **extra) -> list[str]:
    out = [sys.executable, "-P", __file__, "--model", str(args.model), "--threads", str(args.threads),
           "--weights", args.weights, "--beta", args.beta, "--statistic", args.statistic,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--compile" if args.compile else "--no-compile"]
    for k, v in extra.items():
        out += [f"--{k}", str(v)]
    return out


def run_starts(args, weights: str) -> list[dict]:
    """The --starts children for one weights setting, in a private cache folder (removed after)."""
    root = Path(tempfile.mkdtemp(prefix="big-model-", dir=os.environ.get("COREINFER_CACHE")))
    env = {**os.environ, "COREINFER_CACHE": str(root / "cache"), "PYTHONPATH": str(Path(__file__).parent.parent)}
    rows = []
    try:
        for kind in args.starts.split(","):
            if kind == "new":  # the model's own entry (<file stem>-<hash>) removed, the native/ kernels kept
                for entry in (root / "cache").glob("*-*"):
                    shutil.rmtree(entry)
            elif kind == "cold":
                shutil.rmtree(root / "cache", ignore_errors=True)
            elif kind != "warm":
                raise SystemExit(f"--starts takes cold, new, warm; got {kind!r}")
            t = time.perf_counter()
            done = subprocess.run(child_args(argparse.Namespace(**{**vars(args), "weights": weights}),
                                             child="start"), env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{kind} start failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            rows.append(dict(kind=kind, weights=weights, wall_s=time.perf_counter() - t,
                             **json.loads(done.stdout.strip().splitlines()[-1])))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


class Worker:
    def __init__(self, argv: list[str]):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        self.hello = self.read()

    def read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"a worker died: {self.p.wait()}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self.read()


def run_decode(args) -> tuple[list[dict], float]:
    """Alternating rounds over the workers' contenders -> one row per contender, and the bandwidth."""
    from coreinfer.bench.contenders import q8_0
    from coreinfer.bench.run import ratio_spread, read_bandwidth_gb_s

    workers = [Worker(child_args(args, child="worker", worker="coreinfer"))]
    ids = workers[0].hello["ids"]
    ggufs = [Path(args.model) if kind == "file" else q8_0(Path(args.model)) for kind in args.llama.split(",")]
    workers += [Worker(child_args(args, child="worker", worker=g)) for g in ggufs]
    slots = [(w, i, name) for w in workers for i, name in enumerate(w.hello["names"])]
    runs = {name: [] for _, _, name in slots}
    compile_s = dict.fromkeys(runs, 0.0)
    for r in range(args.rounds + 1):
        for w, i, name in slots:
            out = w.ask(op="run", index=i, ids=ids)
            compile_s[name] += out["compile_s"]
            if r:  # round 0 warms every contender up (and compiles)
                runs[name].append(out)
        print(f"round {r} done at {time.perf_counter() - T0:.0f} s", file=sys.stderr, flush=True)
    rss = {id(w): w.ask(op="quit")["rss"] for w in workers}
    bandwidth = read_bandwidth_gb_s()
    llama = workers[1].hello["names"][0]
    rows = []
    for w, i, name in slots:
        rates = [o["tok_s"] for o in runs[name]]
        nbytes = runs[name][0]["nbytes"]
        tok_s = statistics.median(rates)
        rows.append(dict(name=name, load_s=w.hello["load_s"], prefill_tok_s=len(ids) / statistics.median(
            o["prefill_s"] for o in runs[name]), tok_s=tok_s, vs_llama=ratio_spread(rates, [o["tok_s"] for o in runs[llama]]),
            mb=nbytes / 1e6, gb_s=nbytes * tok_s / 1e9, compile_s=compile_s[name], rss=rss[id(w)]))
    return rows, bandwidth


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file")
    p.add_argument("--weights", default="auto", help="coreinfer formats, comma-separated (auto, small, q8_0, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--starts", default="cold,new,warm", help="which first starts to time ('' for none)")
    p.add_argument("--beta", default="", help="core settings beside dense, comma-separated (e.g. 0.5)")
    p.add_argument("--statistic", default="norm")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the compiled decode step (its compile is in the warm-up round)")
    p.add_argument("--llama", default="file", choices=["file", "q8_0", "file,q8_0"],
                   help="llama.cpp on the file, on its Q8_0 requantization, or both (each its own worker)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--no-decode", action="store_true", help="starts only")
    p.add_argument("--child", choices=["start", "worker"], help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "start":
        print(json.dumps(child_start(args)))
        return
    if args.child == "worker":
        return child_worker(args)
    size = Path(args.model).stat().st_size
    print(f"{Path(args.model).name}: {gb(size)}, {args.threads} threads, prompt {args.prompt_tokens} tok, "
          f"{args.new_tokens} new tok")
    starts = [row for w in args.weights.split(",") for row in run_starts(args, w)] if args.starts else []
    if starts:
        print("\n| --weights | start | ready s | first token s | peak RSS loaded | peak RSS at the first token | RSS / file "
              "| cache written | of it, the model's entry |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in starts:
            model = sum(n for k, n in s["cache"].items() if not k.endswith("/"))
            print(f"| {s['weights']} | {s['kind']} | {s['ready_s']:.1f} | {s['first_token_s']:.1f} | {gb(s['rss_load'])} | {gb(s['rss'])} "
                  f"| {s['rss'] / size:.2f}x | {gb(sum(s['cache'].values()))} | {model / 1e6:.1f} MB |")
        print("decoding: " + "; ".join(sorted({f"{s['weights']}: {s['runs']}" for s in starts})))
    if args.no_decode:
        return
    for w in args.weights.split(","):
        rows, bandwidth = run_decode(argparse.Namespace(**{**vars(args), "weights": w}))
        print(f"\nmachine read bandwidth {bandwidth:.1f} GB/s; {args.rounds} rounds after a warm-up, alternating")
        print("| contender | load s | prefill tok/s | decode tok/s | vs llama.cpp | MB/token | GB/s | compile s | worker peak RSS |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            v = "-" if r["vs_llama"] is None else "{:.2f}x ({:.2f}-{:.2f})".format(*r["vs_llama"])
            mb = f"{r['mb']:.0f}" if r["mb"] else "-"
            gbs = f"{r['gb_s']:.1f}" if r["mb"] else "-"
            print(f"| {r['name']} | {r['load_s']:.1f} | {r['prefill_tok_s']:.1f} | {r['tok_s']:.2f} | {v} | {mb} "
                  f"| {gbs} | {r['compile_s']:.1f} | {gb(r['rss'])} |")


if __name__ == "__main__":
    main()
