"""The GPU half of issue 13 in one short run: decode speed on CUDA and the memory-limited mode, side by
side with what a user would run instead. Run by scripts/gpu_check.sh (after the CUDA tests).

No checkpoint can travel to the GPU machine (the smallest GGUF here is 94 MiB; a call carries 64 MiB),
so the models are random-weight copies of real shapes: Gemma-3-270M and Qwen2.5-Coder-1.5B. Decode
speed depends on shapes and bytes, not on the weights' values; core sets chosen from random weights
say nothing about quality (docs/quality.md measures that on real models).

1. speed, bf16, batch 1: transformers `generate`, coreinfer dense (eager and CUDA graphs), core
   settings (graphs), int8 (the Triton kernel), dense and a core setting.
2. memory-limited at fractions of the model's bf16 size: transformers + accelerate offload
   (`device_map="auto"`, same max_memory), coreinfer dense with its offload, coreinfer core offload at
   the largest keep that fits (the default layer policy first, then every layer sparse).

    python scripts/gpu_check.py --out $OUT              # on the GPU machine
    python scripts/gpu_check.py --device cpu --tiny     # a dry run of the logic on any machine
"""

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from functools import partial
from types import SimpleNamespace

import torch
import transformers

from coreinfer.bench.contenders import Ours, Transformers, transformers_model
from coreinfer.bench.run import read_bandwidth_gb_s, run_bench, table
from coreinfer.engine.compiled import CompiledStep, decode_forward
from coreinfer.engine.cuda_graphs import GraphedStep
from coreinfer.engine.offload import place, plan, size
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.quant import quantize_model
from coreinfer.engine.session import cache_length, stability_policy
from coreinfer.models import build_model

SHAPES = {  # the checkpoints' config.json values that set the shapes
    "gemma-3-270m": lambda: transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-coder-1.5b": lambda: transformers.Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
}
# budgets as fractions of the bf16 weights: Gemma-3-270M's tied embedding table alone is 62% of it
FRACTIONS = {"gemma-3-270m": "0.9", "qwen2.5-coder-1.5b": "0.5,0.75"}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
KEEPS = (0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def random_checkpoint(name: str, tiny: bool, dtype, device):
    """A checkpoint-like object (config dict, HF-named weights on the CPU) of random weights."""
    config = SHAPES[name]()
    if tiny:
        for k, v in TINY.items():
            setattr(config, k, v)
        config.layer_types = config.layer_types[:TINY["num_hidden_layers"]] if hasattr(config, "layer_types") else None
    torch.manual_seed(0)
    with torch.device(device):  # random init is much faster on the GPU
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = {k: v.to("cpu") for k, v in hf.state_dict().items()}
    del hf
    return SimpleNamespace(config=config.to_dict(), weights=weights, source=f"{name} (random weights)")


def graphed(model, device, compiled=None):
    """The CUDA-graphed decode step (of `compiled`, a CompiledStep, when given); None off CUDA."""
    if torch.device(device).type != "cuda":
        return compiled
    return GraphedStep(compiled or partial(decode_forward, model))


def speed(ckpt, args, ids, bandwidth) -> list:
    """Full GPU: transformers generate vs coreinfer dense/core, bf16, batch 1; int8 too."""
    dtype, device = torch.bfloat16, args.device
    model = build_model(ckpt.config, ckpt.weights, device, dtype)
    cores = [CoreConfig(beta=b) for b in (0.7, 0.5)]
    out = [Transformers(transformers_model(ckpt, dtype).to(device)), Ours("coreinfer dense eager", model, None),
           Ours("coreinfer dense", model, None, compiled=graphed(model, device))]
    out += [Ours(f"coreinfer keep {c.beta}", model, c, compiled=graphed(model, device)) for c in cores]
    if args.compile:  # inductor fuses the step's small kernels (norms, RoPE, casts); graphs replay the result
        step = CompiledStep(model, log=log)
        out += [Ours("coreinfer dense, compiled", model, None, compiled=graphed(model, device, step)),
                Ours(f"coreinfer keep {cores[1].beta}, compiled", model, cores[1], compiled=graphed(model, device, step))]
    q8 = build_model(ckpt.config, ckpt.weights, device, dtype)
    quantize_model(q8)
    out += [Ours("coreinfer dense int8", q8, None, compiled=graphed(q8, device)),
            Ours("coreinfer keep 0.5 int8", q8, cores[1], compiled=graphed(q8, device))]
    return run_bench(out, ids, args.new_tokens, args.rounds, set(), bandwidth)


def fitting_core(model, budget: int, cache_len: int) -> CoreConfig | None:
    """The largest keep whose plan fits: default layers first (their dense layers stay whole), then all."""
    for layers in (None, "all"):
        for keep in KEEPS:
            core = CoreConfig(beta=keep, layers=layers)
            try:
                plan(model, 1, cache_len, stability_policy(core, model).keep, budget).check(budget)
                return core
            except MemoryError:
                continue
    return None


def limited(ckpt, args, ids, bandwidth, fraction: float) -> tuple[list, list[str]]:
    """Memory-limited at `fraction` of the model's bf16 weight bytes; lines saying what did not fit."""
    dtype, device = torch.bfloat16, args.device
    model = build_model(ckpt.config, ckpt.weights, "cpu", dtype)
    weights = sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())
    budget = int(fraction * weights)
    notes = [f"budget {size(budget)} = {fraction:.0%} of the {size(weights)} of bf16 weights"]
    place(model, device)
    cache_len = cache_length(len(ids) + args.new_tokens, model.max_context)
    out = []
    try:
        plan(model, 1, cache_len, None, budget).check(budget)
        out.append(Ours("coreinfer dense offload", model, None, budget))
    except MemoryError as e:
        notes.append(f"coreinfer dense offload: {e}")
    core = fitting_core(model, budget, cache_len)
    if core is None:
        notes.append(f"coreinfer core offload: no keep in {KEEPS} fits")
    else:
        name = f"coreinfer keep {core.beta}{' all layers' if core.layers else ''} offload"
        out.append(Ours(name, model, core, budget, compiled=graphed(model, device)))
    if torch.device(device).type == "cuda":
        from accelerate import dispatch_model, infer_auto_device_map

        hf = transformers_model(ckpt, dtype)
        device_map = infer_auto_device_map(hf, max_memory={torch.device(device).index or 0: budget, "cpu": 2**40},
                                           no_split_module_classes=hf._no_split_modules)
        on_cpu = sum(1 for d in device_map.values() if d == "cpu")
        out.insert(0, Transformers(dispatch_model(hf, device_map), "transformers + accelerate offload",
                                   f"{on_cpu} of {len(device_map)} modules on the CPU"))
    return (run_bench(out, ids, args.new_tokens, args.rounds, set(), bandwidth) if out else []), notes


def guarded(stage, lines: list[str]):
    """Run one stage; a failure is printed and noted, and the next stages still run (one GPU call)."""
    try:
        return stage()
    except Exception as e:  # noqa: BLE001 -- report whatever broke, keep the rest of the run
        traceback.print_exc()
        lines.append(f"- FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--fractions", default=None, help="memory-limited budgets, as fractions of the bf16 weights "
                   "(default: 0.9 for Gemma-3-270M, 0.5 and 0.75 for Qwen2.5-Coder-1.5B)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stages", default="speed,limited", help="which stages run: speed, limited or both")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the compiled (inductor) step inside CUDA graphs")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of this script's logic")
    args = p.parse_args(argv)
    bandwidth = read_bandwidth_gb_s(device=args.device)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "bandwidth_gb_s": bandwidth,
              "models": {}}
    lines = [f"{report['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"read bandwidth {bandwidth:.0f} GB/s; prompt {args.prompt_tokens} tok, {args.new_tokens} new tok, "
             f"median of {args.rounds} rounds, batch 1, bf16"]
    with torch.inference_mode():
        for name in args.models.split(","):
            t0 = time.perf_counter()
            ckpt = random_checkpoint(name, args.tiny, torch.bfloat16, args.device)
            ids = torch.randint(10, ckpt.config["vocab_size"], (args.prompt_tokens,),
                                generator=torch.Generator().manual_seed(0)).tolist()
            entry = report["models"][name] = {"limited": {}}
            log(f"{name}: speed")
            fast = guarded(lambda: speed(ckpt, args, ids, bandwidth), lines) if "speed" in args.stages else None
            if fast is not None:
                entry["speed"] = [asdict(r) for r in fast]
                lines += ["", f"## {ckpt.source}: full GPU", "", table(fast, bandwidth)]
            fractions = (args.fractions or FRACTIONS[name]).split(",") if "limited" in args.stages else []
            for fraction in map(float, fractions):
                log(f"{name}: memory-limited at {fraction:.0%}")
                lines += ["", f"## {ckpt.source}: memory-limited", ""]
                got = guarded(lambda: limited(ckpt, args, ids, bandwidth, fraction), lines)
                if got is not None:
                    results, notes = got
                    entry["limited"][str(fraction)] = {"results": [asdict(r) for r in results], "notes": notes}
                    lines += [f"- {n}" for n in notes] + (["", table(results, bandwidth)] if results else [])
            log(f"{name}: {time.perf_counter() - t0:.0f} s")
            save(args.out, report, lines)  # after each model: a run stopped at its time limit keeps the rest
    print("\n".join(lines))
    return 0


def save(out: str | None, report: dict, lines: list[str]) -> None:
    if out:
        os.makedirs(out, exist_ok=True)
        with open(f"{out}/gpu_check.json", "w") as f:
            json.dump(report, f, indent=2)
        with open(f"{out}/gpu_check.md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
