"""`coreinfer bench`: decode speed side by side, in one process, on the same prompt and weights.

Contenders run alternately (one run each per round, after a warm-up round) so that drift in the
machine's state hits all of them alike; each figure is the median over the rounds. The machine's
read bandwidth is measured in the same run, so each contender's GB/s shows its share of the limit.
"""

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .engine.compact import CoreWeights
from .engine.generate import GenerationConfig, decode
from .engine.policy import CoreConfig
from .engine.quant import quantize_model
from .engine.session import Session, make_policy


@dataclass
class Result:
    name: str
    prefill_tok_s: float
    select_compact_ms: float
    decode_tok_s: float
    bytes_per_token: int
    gb_s: float
    share_of_bandwidth: float
    note: str = ""


def read_bandwidth_gb_s(mib: int = 512, repeats: int = 5) -> float:
    """Median GB/s of summing a buffer far larger than the caches: what a GEMV could at best read."""
    x = torch.ones(mib * 2**18)  # fp32: mib MiB
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times) / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """coreinfer on one model copy: dense or core, fp32/bf16 or int8 weights."""

    def __init__(self, name, model, core: CoreConfig | None):
        self.name, self.model, self.core, self.note = name, model, core, ""
        self.cores = CoreWeights()
        self.device = model.embed_tokens.weight.device

    def run(self, ids: list[int], new_tokens: int, eos: set[int]) -> tuple[float, float, float, int]:
        """One generation -> (prefill s, select+compact ms, decode tok/s, bytes per decode step)."""
        gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        session = Session(self.model, [ids], new_tokens, policy=make_policy(self.core, self.model), cores=self.cores)
        t0 = time.perf_counter()
        steps = decode(session, gen, eos)
        next(steps)
        synchronize(self.device)
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        synchronize(self.device)
        t2 = time.perf_counter()
        core = session.stats
        ms = core.select_ms + core.compact_ms if core else 0.0
        prefill_s = t1 - t0 - ms / 1e3
        return prefill_s, ms, n / (t2 - t1), core.bytes_core if core else self.model.weight_bytes()


class Transformers:
    """transformers `generate`, greedy, same weights, dtype and threads: the baseline users have."""

    def __init__(self, hf_model):
        self.name, self.hf, self.note = "transformers", hf_model, "dense"

    def run(self, ids, new_tokens, eos):
        x = torch.tensor([ids], device=self.hf.device)
        kw = dict(do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
        t0 = time.perf_counter()
        self.hf.generate(x, max_new_tokens=1, **{**kw, "min_new_tokens": 1})
        t1 = time.perf_counter()
        self.hf.generate(x, max_new_tokens=new_tokens, **kw)
        t2 = time.perf_counter()
        decode_s = (t2 - t1) - (t1 - t0)  # the same prefill, then new_tokens - 1 decode steps
        nbytes = sum(p.nbytes for p in self.hf.parameters()) - self.hf.get_input_embeddings().weight.nbytes * (
            self.hf.get_output_embeddings().weight is not self.hf.get_input_embeddings().weight)
        return t1 - t0, 0.0, (new_tokens - 1) / decode_s, nbytes


class LlamaCpp:
    """llama.cpp through llama_cpp, on the original GGUF: the CPU engine users would otherwise pick."""

    def __init__(self, gguf_path, threads: int):
        from llama_cpp import Llama

        self.name, self.note = "llama.cpp", gguf_path.name
        self.llm = Llama(str(gguf_path), n_ctx=2048, n_threads=threads, verbose=False)

    def run(self, ids, new_tokens, eos):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.llm.sample(temp=0.0)
            self.llm.eval([token])
        t2 = time.perf_counter()
        return t1 - t0, 0.0, (new_tokens - 1) / (t2 - t1), 0


def per_token_breakdown(model, ids: list[int], core: CoreConfig | None, steps: int = 32) -> dict[str, float]:
    """Where one decode step's time goes (ms): each part timed on its own over the same steps, the
    remainder (Python, norms, sampling, cache writes) is overhead."""
    device = model.embed_tokens.weight.device
    with torch.inference_mode():
        session = Session(model, [ids], steps + 1, policy=make_policy(core, model))
        token = session.prefill().argmax(-1)  # [1]

        def timed(fn):
            fn()
            synchronize(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            synchronize(device)
            return (time.perf_counter() - t) / steps

        synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            session.step(token)
        synchronize(device)
        total = (time.perf_counter() - t) / steps
        x = torch.randn(1, 1, model.embed_tokens.weight.shape[1], dtype=model.embed_tokens.weight.dtype, device=device)
        ffn = timed(lambda: [session.run_ffn(f, x) for f in model.ffns()])
        qkvo = timed(lambda: [p(x) for layer in model.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj)])
        head = timed(lambda: model.lm_head(x))
    parts = {"ffn": ffn, "attention_proj": qkvo, "head": head}
    parts["attention_sdpa_and_overhead"] = max(total - sum(parts.values()), 0.0)
    return {k: v * 1e3 for k, v in {"total": total, **parts}.items()}


def run_bench(contenders, ids, new_tokens, rounds, eos, bandwidth) -> list[Result]:
    from tqdm import tqdm

    samples = {c.name: [] for c in contenders}
    for r in tqdm(range(rounds + 1), desc="bench rounds", file=sys.stderr):
        for c in contenders:
            out = c.run(ids, new_tokens, eos)
            if r:  # round 0 warms every contender up
                samples[c.name].append(out)
    results = []
    for c in contenders:
        cols = list(zip(*samples[c.name]))
        prefill_s, ms, tok_s = (statistics.median(col) for col in cols[:3])
        nbytes = cols[3][0]
        gb_s = nbytes * tok_s / 1e9
        results.append(Result(c.name, len(ids) / prefill_s, ms, tok_s, nbytes, gb_s,
                              gb_s / bandwidth if nbytes else 0.0, c.note))
    return results


def table(results: list[Result], bandwidth: float) -> str:
    base = next((r.decode_tok_s for r in results if r.name == "coreinfer dense"), None)
    lines = [f"machine read bandwidth: {bandwidth:.1f} GB/s", "",
             "| contender | prefill tok/s | select+compact ms | decode tok/s | vs dense | MB/token | GB/s | of bw |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rel = f"{r.decode_tok_s / base:.2f}x" if base else "-"
        mb = f"{r.bytes_per_token / 1e6:.0f}" if r.bytes_per_token else "-"
        gb = f"{r.gb_s:.1f}" if r.bytes_per_token else "-"
        share = f"{r.share_of_bandwidth:.0%}" if r.bytes_per_token else "-"
        lines.append(f"| {r.name} | {r.prefill_tok_s:.0f} | {r.select_compact_ms:.1f} | {r.decode_tok_s:.1f} | {rel} "
                     f"| {mb} | {gb} | {share} |")
    return "\n".join(lines)


def to_json(results, bandwidth, breakdown, settings) -> str:
    return json.dumps({"settings": settings, "read_bandwidth_gb_s": bandwidth,
                       "results": [asdict(r) for r in results], "breakdown_ms": breakdown}, indent=2)


PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Within "
          "decades, printing shops had spread to more than two hundred cities across Europe, and the price of "
          "books fell so far that ordinary merchants could own them. Scholars argue about how much the press "
          "changed the way people thought, but few doubt that it changed how quickly ideas could travel. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n tokens of natural text (the paragraph repeated as needed)."""
    ids = tokenizer.hf(PROMPT * (n // 40 + 1), add_special_tokens=False)["input_ids"]
    return ids[:n]


def transformers_model(ckpt, dtype):
    import transformers

    config = transformers.AutoConfig.for_model(**ckpt.config)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    missing, _ = hf.load_state_dict(ckpt.weights, strict=False)
    if set(missing) - {"lm_head.weight"}:
        raise ValueError(f"transformers model lacks weights: {missing[:3]}")
    if "lm_head.weight" in missing:
        hf.tie_weights()
    return hf


def contenders_for(args, ckpt, dtype):
    from .cli.args import core_grid
    from .io.loading import embedded_model_path
    from .models import build_model

    out = []
    if not args.no_transformers:
        out.append(Transformers(transformers_model(ckpt, dtype)))
    for fmt in [f.strip() for f in args.weights.split(",")]:
        if fmt not in ("dense", "int8"):
            raise ValueError(f"--weights takes dense and/or int8, got {fmt!r}")
        model = build_model(ckpt.config, ckpt.weights, args.device, dtype)
        if fmt == "int8":
            quantize_model(model)
        tag = " int8" if fmt == "int8" else ""
        for core in core_grid(args):
            name = "coreinfer dense" if core is None else f"coreinfer {core.statistic} keep {core.beta}"
            out.append(Ours(name + tag, model, core))
    gguf = embedded_model_path() if args.model is None else Path(args.model)
    if gguf.suffix == ".gguf" and not args.no_llama_cpp:
        try:
            out.append(LlamaCpp(gguf, torch.get_num_threads()))
        except ImportError:
            print("llama.cpp: skipped (pip install llama-cpp-python to compare against it)", file=sys.stderr)
    return out


def cmd_bench(args) -> None:
    from .api import RuntimeConfig
    from .io.loading import load_checkpoint
    from .io.text import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag in ("prompt_tokens", "new_tokens", "rounds"):
        if getattr(args, flag) < (2 if flag == "new_tokens" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    dtype = RuntimeConfig(args.model, args.device, args.dtype).torch_dtype()
    ckpt = load_checkpoint(args.model)
    tokenizer = Tokenizer(ckpt.tokenizer_dir, ckpt.config)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    contenders = contenders_for(args, ckpt, dtype)
    bandwidth = read_bandwidth_gb_s()
    with torch.inference_mode():
        results = run_bench(contenders, ids, args.new_tokens, args.rounds, tokenizer.eos_ids, bandwidth)
    ours = [c for c in contenders if isinstance(c, Ours)]
    breakdown = {c.name: per_token_breakdown(c.model, ids, c.core) for c in ours}
    settings = dict(model=ckpt.source, prompt_tokens=len(ids), new_tokens=args.new_tokens, rounds=args.rounds,
                    threads=torch.get_num_threads(), dtype=str(dtype), device=args.device)
    if args.json:
        print(to_json(results, bandwidth, breakdown, settings))
        return
    print(f"{ckpt.source}: prompt {len(ids)} tok, {args.new_tokens} new tok, median of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, {dtype}")
    print(table(results, bandwidth))
    print("\nper decode step, ms (each part timed alone):")
    for name, parts in breakdown.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))


def add_parser(sub) -> None:
    from .cli.args import add_core_args, add_runtime_args

    p = sub.add_parser("bench", help="decode speed side by side: transformers, coreinfer dense/core, llama.cpp")
    add_runtime_args(p)
    add_core_args(p, grid=True)
    p.set_defaults(beta="0.5,0.7")  # --weights may list both formats here: "dense,int8" builds one model each
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_bench)
