"""`coreinfer bench`: decode speed side by side, in one process, on the same prompt and weights.

Contenders run alternately (one run each per round, after a warm-up round) so that drift in the
machine's state hits all of them alike; each figure is the median over the rounds. Ratios pair
contenders by round: a round runs all of them back to back, so each round gives one ratio to dense
of the same format and one to llama.cpp, reported as the median with its min-max over the rounds
(on a shared host one run's ratio moves by a fifth). The machine's read bandwidth is measured in
the same run, so each contender's GB/s shows its share of the limit. One row is `generate`'s
default exactly as it runs: its format, calibrated profile, compiled step and threads.
"""

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from ..engine.compiled import CompiledStep, decode_forward, use_cache_dir
from ..engine.cuda_graphs import GraphedStep
from ..engine.offload import parse_bytes, place
from ..engine.policy import CoreConfig
from ..engine.profile import AUTO
from ..engine.quant import LOAD_FORMATS, WEIGHT_FORMATS, quantize_model
from ..engine.session import Session, make_policy
from ..eval.report import setting_name
from ..io.loading import cache_dir
from .contenders import LlamaCpp, Ours, Transformers, q8_0, synchronize, transformers_model


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
    ttft_ms: float = 0.0  # time to first token: prefill, selection and compaction
    compile_s: float = 0.0  # compiling the decode step, during the warm-up round (not in decode tok/s)
    peak_gpu_mb: float = 0.0  # the contender's own weights on the GPU plus its peak working memory
    vs_dense: tuple[float, float, float] | None = None  # decode rate / dense of its format: median, min, max
    vs_llama_cpp: tuple[float, float, float] | None = None  # the same against llama.cpp on the original GGUF


def ratio_spread(ours: list[float], ref: list[float]) -> tuple[float, float, float] | None:
    """Round by round ratios ours[r] / ref[r] -> (median, min, max); None without rounds to pair."""
    ratios = [a / b for a, b in zip(ours, ref, strict=True) if b > 0]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def read_bandwidth_gb_s(mib: int = 512, repeats: int = 5, device="cpu") -> float:
    """Median GB/s of summing a buffer far larger than the caches on `device`: what a GEMV could at
    best read."""
    device = torch.device(device)
    x = torch.ones(mib * 2**18, device=device)  # fp32: mib MiB
    x.sum()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times) / 1e9


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


def peak_gpu_bytes(c, run) -> tuple[tuple, int]:
    """run() and the contender's peak GPU memory: its own weights plus the most its run allocated on
    top of what was allocated before (other contenders' weights are not its own). 0 without CUDA."""
    device = getattr(c, "device", torch.device("cpu"))
    if device.type != "cuda":
        return run(), 0
    torch.cuda.synchronize(device)
    held, before = c.held_bytes(), torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    return out, held + torch.cuda.max_memory_allocated(device) - before


def run_bench(contenders, ids, new_tokens, rounds, eos, bandwidth) -> list[Result]:
    from tqdm import tqdm

    samples = {c.name: [] for c in contenders}
    peaks, compile_s = dict.fromkeys(samples, 0), dict.fromkeys(samples, 0.0)
    for r in tqdm(range(rounds + 1), desc="bench rounds", file=sys.stderr):
        for c in contenders:
            compiled = getattr(c, "compiled", None)
            before = compiled.compile_s if compiled else 0.0
            out, peak = peak_gpu_bytes(c, lambda: c.run(ids, new_tokens, eos))
            compile_s[c.name] += (compiled.compile_s if compiled else 0.0) - before
            peaks[c.name] = max(peaks[c.name], peak)
            if r:  # round 0 warms every contender up
                samples[c.name].append(out)
            elif hasattr(compiled, "wait"):  # a background compile: the timed rounds decode its compiled step
                compiled.wait()
    rates = {name: [out[2] for out in runs] for name, runs in samples.items()}  # decode tok/s per round
    llama = next((c.name for c in contenders if isinstance(c, LlamaCpp)), None)
    results = []
    for c in contenders:
        cols = list(zip(*samples[c.name]))
        prefill_s, ms, tok_s = (statistics.median(col) for col in cols[:3])
        nbytes = cols[3][0]
        gb_s = nbytes * tok_s / 1e9
        dense = getattr(c, "dense_ref", None)
        results.append(Result(c.name, len(ids) / prefill_s, ms, tok_s, nbytes, gb_s,
                              gb_s / bandwidth if nbytes else 0.0, c.note, ttft_ms=prefill_s * 1e3 + ms,
                              compile_s=compile_s[c.name], peak_gpu_mb=peaks[c.name] / 2**20,
                              vs_dense=ratio_spread(rates[c.name], rates[dense]) if dense in rates else None,
                              vs_llama_cpp=ratio_spread(rates[c.name], rates[llama]) if llama else None))
    return results


def spread(r: tuple[float, float, float] | None) -> str:
    return "-" if r is None else f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def table(results: list[Result], bandwidth: float) -> str:
    gpu = any(r.peak_gpu_mb for r in results)  # on CUDA: time to first token and peak GPU memory too
    llama = any(r.vs_llama_cpp for r in results)
    lines = [f"machine read bandwidth: {bandwidth:.1f} GB/s; ratios: median (min-max) of the rounds' ratios, "
             "each round running every contender back to back; vs dense: to dense of the same format and step", "",
             "| contender | prefill tok/s | select+compact ms | decode tok/s | vs dense |"
             + (" vs llama.cpp |" if llama else "") + " MB/token | GB/s | of bw | compile s |"
             + (" TTFT ms | peak GPU MB |" if gpu else "") + " note |",
             "|---|---:|---:|---:|---:|" + ("---:|" if llama else "") + "---:|---:|---:|---:|"
             + ("---:|---:|" if gpu else "") + "---|"]
    for r in results:
        mb = f"{r.bytes_per_token / 1e6:.0f}" if r.bytes_per_token else "-"
        gb = f"{r.gb_s:.1f}" if r.bytes_per_token else "-"
        share = f"{r.share_of_bandwidth:.0%}" if r.bytes_per_token else "-"
        lines.append(f"| {r.name} | {r.prefill_tok_s:.0f} | {r.select_compact_ms:.1f} | {r.decode_tok_s:.1f} "
                     f"| {spread(r.vs_dense)} |" + (f" {spread(r.vs_llama_cpp)} |" if llama else "")
                     + f" {mb} | {gb} | {share} | {r.compile_s:.1f} |"
                     + (f" {r.ttft_ms:.1f} | {r.peak_gpu_mb:.0f} |" if gpu else "") + f" {r.note} |")
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


def contenders_for(args, ckpt, dtype):
    from tqdm import tqdm

    from ..api import RuntimeConfig
    from ..cli.args import core_grid
    from ..io.loading import embedded_model_path
    from ..models import build_model

    if args.max_gpu_memory is not None:
        return offload_contenders(args, ckpt, dtype)
    if args.profile == AUTO:
        raise ValueError("bench always times the default (--profile auto) in its own row, as generate runs it; "
                         "drop --profile auto, or give a profile file")
    out = []
    if not args.no_transformers:
        out.append(Transformers(transformers_model(ckpt, dtype).to(args.device)))
    for fmt in [f.strip() for f in args.weights.split(",")]:
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"--weights takes {', '.join(WEIGHT_FORMATS)} (comma-separated), got {fmt!r}")
        model = build_model(ckpt.config, ckpt.weights, args.device, dtype, fmt if fmt in LOAD_FORMATS else "dense")
        if fmt in ("int8", "int4"):
            quantize_model(model, fmt)
        compiled = None
        # compiled where LLM compiles (int8 and int4 on the CPU, dense on CUDA) unless told otherwise;
        # compile time is its own column here
        if RuntimeConfig(args.model, args.device, args.dtype, weights=fmt, compile=args.compile).compiles():
            use_cache_dir(cache_dir() / "inductor")
            compiled = CompiledStep(model, log=lambda line: tqdm.write(line, file=sys.stderr))
        graphs = None  # on CUDA, as LLM decodes there: the step in CUDA graphs (of the compiled step if any)
        if torch.device(args.device).type == "cuda" and args.compile is not False:
            graphs = GraphedStep(compiled or partial(decode_forward, model), max_graphs=8)
        steps = [None] + [step for step in (compiled, graphs) if step is not None]
        # one contender per name: a profile replaces --beta, so bench's default beta grid names it twice
        for core in {setting_name(c): c for c in core_grid(args)}.values():
            for step in steps:  # eager first: what compiling gains is measured against it
                tail = step_name(fmt, step)
                out.append(Ours(f"coreinfer {setting_name(core)}{tail}", model, core, compiled=step,
                                dense_ref=f"coreinfer dense{tail}"))
    if not args.no_default:
        out.append(default_contender(args))
    gguf = embedded_model_path() if args.model is None else Path(args.model)
    if gguf.suffix == ".gguf" and not args.no_llama_cpp:
        try:
            out.append(LlamaCpp(gguf, torch.get_num_threads()))
            out.append(LlamaCpp(q8_0(gguf), torch.get_num_threads()))
        except ImportError:
            print("llama.cpp: skipped (pip install llama-cpp-python to compare against it)", file=sys.stderr)
    return out


def step_name(weights: str, compiled) -> str:
    """' int8 compiled', ' CUDA graphs', '': how a contender's name says its format and decode step."""
    step = "" if compiled is None else " CUDA graphs" if isinstance(compiled, GraphedStep) else " compiled"
    return ("" if weights == "dense" else f" {weights}") + step


def default_contender(args) -> Ours:
    """`coreinfer generate`'s default exactly as it runs: the LLM it builds from these model, device and
    dtype flags alone (its default format and compile setting, on this run's threads), decoding with
    CoreConfig(profile="auto") resolved as generate resolves it; the note says what that chose."""
    from ..api import LLM

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, threads=torch.get_num_threads(),
              progress=False)
    path, why = llm.default_core()
    tail = step_name(llm.runtime.weights, llm.compiled)
    name = f"coreinfer default ({'profile ' + Path(path).name if path else 'dense'}{tail}), as generate runs it"
    c = Ours(name, llm.model, llm.resolve(CoreConfig(profile=AUTO)), compiled=llm.compiled,
             dense_ref=f"coreinfer dense{tail}")
    c.note = why
    return c


def offload_contenders(args, ckpt, dtype):
    """The memory-limited comparison at one GPU budget: transformers + accelerate's offload
    (`device_map="auto"` with the same max_memory), coreinfer dense with its offload (the leading
    FFNs that fit resident, the rest streamed every token) and coreinfer's core settings."""
    from ..cli.args import core_grid
    from ..models import build_model

    if torch.device(args.device).type != "cuda" or args.weights != "dense":
        raise ValueError("--max-gpu-memory needs --device cuda and --weights dense")
    budget = parse_bytes(args.max_gpu_memory)
    out = []
    if not args.no_transformers:
        from accelerate import dispatch_model, infer_auto_device_map

        hf = transformers_model(ckpt, dtype)
        gpu = torch.device(args.device).index or 0
        device_map = infer_auto_device_map(hf, max_memory={gpu: budget, "cpu": 2**40},
                                           no_split_module_classes=hf._no_split_modules)
        offloaded = sum(1 for d in device_map.values() if d == "cpu")
        out.append(Transformers(dispatch_model(hf, device_map), "transformers + accelerate offload",
                                f"{offloaded} of {len(device_map)} modules on the CPU"))
    model = build_model(ckpt.config, ckpt.weights, "cpu", dtype)
    place(model, args.device)
    for core in core_grid(args):
        name = f"coreinfer {setting_name(core)} offload"
        out.append(Ours(name, model, core, budget, dense_ref="coreinfer dense offload"))
    return out


def cmd_bench(args) -> None:
    from ..api import RuntimeConfig, default_threads
    from ..cli.args import count
    from ..io.loading import load_checkpoint
    from ..io.text import Tokenizer

    torch.set_num_threads(args.threads or default_threads())
    for flag in ("prompt_tokens", "new_tokens", "rounds"):
        if getattr(args, flag) < (2 if flag == "new_tokens" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    dtype = RuntimeConfig(args.model, args.device, args.dtype).torch_dtype()
    ckpt = load_checkpoint(args.model)
    tokenizer = Tokenizer(ckpt.tokenizer_dir, ckpt.config)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    contenders = contenders_for(args, ckpt, dtype)
    bandwidth = read_bandwidth_gb_s(device=args.device)
    with torch.inference_mode():
        results = run_bench(contenders, ids, args.new_tokens, args.rounds, tokenizer.eos_ids, bandwidth)
    ours = [c for c in contenders if isinstance(c, Ours)]
    breakdown = {c.name: per_token_breakdown(c.model, ids, c.core) for c in ours if c.budget is None and not c.compiled}
    settings = dict(model=ckpt.source, prompt_tokens=len(ids), new_tokens=args.new_tokens, rounds=args.rounds,
                    threads=torch.get_num_threads(), dtype=str(dtype), device=args.device,
                    gpu=torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else None,
                    max_gpu_memory=args.max_gpu_memory)
    if args.json:
        print(to_json(results, bandwidth, breakdown, settings))
        return
    print(f"{ckpt.source}: prompt {len(ids)} tok, {args.new_tokens} new tok, median of {args.rounds} rounds, "
          f"{count(torch.get_num_threads(), 'thread')}, {dtype}")
    print(table(results, bandwidth))
    print("\nper decode step, ms (each part timed alone):")
    for name, parts in breakdown.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
