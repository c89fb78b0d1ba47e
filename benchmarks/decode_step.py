"""Where one decode step of the default goes: the compiled step, the eager step, and each part alone.

    python benchmarks/decode_step.py --threads 2 [--model PATH.gguf] [--prompt-tokens 128] [--steps 64]

Loads the model as `generate` does by default (--weights auto, the calibrated profile, a compiled step,
compiled here in the foreground), prefills a prompt, and times: the compiled step and the eager step
(median over --steps), one generate-loop token (step + sampling), then each part of the step alone on the
model's own weights and the step's real shapes, summed over the layers. Run it under the CPU lock.
"""

import argparse
import statistics
import time

import torch

from coreinfer import LLM
from coreinfer.engine.compiled import decode_forward
from coreinfer.engine.generate import GenerationConfig, sample
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.profile import AUTO
from coreinfer.models.common import apply_rotary, attend, attention_mask


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--dense", action="store_true", help="no profile: the dense step")
    args = p.parse_args()
    llm = LLM(args.model, threads=args.threads, background_compile=False, progress=False)
    print(llm.runtime_line(), "|", llm.default_core()[1])
    model = llm.model
    ids = [(i * 7919) % 30000 + 100 for i in range(args.prompt_tokens)]
    core = None if args.dense else CoreConfig(profile=AUTO)
    session = llm.session([ids], args.steps * 3 + 8, core)
    with torch.inference_mode():
        logits = session.prefill()
        token = logits.argmax(-1)
        session.step(token)  # compiles (or loads) the shape
        compiled = median_ms(lambda: session.step(token), args.steps)
        gen, history = GenerationConfig(), torch.zeros(1, args.prompt_tokens + 1, dtype=torch.long)
        loop = median_ms(lambda: sample(session.step(token), gen, history, args.prompt_tokens, None), args.steps)
        b = session.batch
        cores = session.cores if session.compacted else None
        eager = median_ms(lambda: decode_forward(model, b.token, b.positions, b.slot, b.key_valid, session.caches,
                                                 cores), args.steps)
        parts = part_times(model, session, cores, args.steps)
    L = len(model.layers)
    print(f"per token: generate loop {loop:.2f} ms, compiled step {compiled:.2f} ms, eager step {eager:.2f} ms "
          f"({model.weight_bytes() / 1e6:.0f} MB dense weights)")
    print("| part (eager, alone) | ms per token | of the eager step |\n|---|---:|---:|")
    for name, ms in parts.items():
        total = ms * (L if name.startswith("layer:") else 1)
        print(f"| {name}{' x' + str(L) if name.startswith('layer:') else ''} | {total:.2f} | {total / eager:.0%} |")
    summed = sum(ms * (L if n.startswith("layer:") else 1) for n, ms in parts.items())
    print(f"| sum of parts | {summed:.2f} | {summed / eager:.0%} |")


def part_times(model, session, cores, n: int) -> dict[str, float]:
    """Each part of a decode step alone, ms (per layer for names starting with 'layer:')."""
    b, cache = session.batch, session.caches[0]
    layer = model.layers[0]
    attn = layer.self_attn
    x = model.embed_tokens(b.token)  # [1, 1, d]
    H, Hkv, hd = attn.heads, attn.kv_heads, attn.head_dim
    rope = model.rotary(b.positions, x.dtype)
    mask = attention_mask(b.slot, b.key_valid, None)
    qkv = attn.qkv_proj(x).view(1, 1, H + 2 * Hkv, hd)
    q = qkv[:, :, :H].transpose(1, 2)
    k, v = cache.k[:, :, :b.key_valid.shape[1]], cache.v[:, :, :b.key_valid.shape[1]]
    a = attend(q, k, v, mask, attn.scale)
    ffn = layer.mlp
    core = None if cores is None else cores.get(ffn.layer_id)
    h = model.norm(x)
    logits = model.lm_head(h)[:, -1]  # [1, V]
    return {
        "embedding lookup": median_ms(lambda: model.embed_tokens(b.token), n),
        "attention masks + rope tables": median_ms(lambda: (attention_mask(b.slot, b.key_valid, None),
                                                            model.rotary(b.positions, x.dtype)), n),
        "layer: 2 rms norms": median_ms(lambda: (layer.input_layernorm(x), layer.post_attention_layernorm(x)), n),
        "layer: qkv projection": median_ms(lambda: attn.qkv_proj(x), n),
        "layer: rope": median_ms(lambda: apply_rotary(qkv[:, :, :H + Hkv], *rope), n),
        "layer: kv cache write": median_ms(lambda: cache.update(b.slot, k[:, :, :1], v[:, :, :1], kv_len=k.shape[2]), n),
        "layer: sdpa": median_ms(lambda: attend(q, k, v, mask, attn.scale), n),
        "layer: o projection": median_ms(lambda: attn.o_proj(a), n),
        "layer: ffn": median_ms(lambda: ffn(x) if core is None else core(x), n),
        "layer: 2 residual adds": median_ms(lambda: (x + a, x + a), n),
        "final norm": median_ms(lambda: model.norm(x), n),
        "lm_head": median_ms(lambda: model.lm_head(h), n),
        "argmax": median_ms(lambda: logits.argmax(-1), n),
    }


if __name__ == "__main__":
    main()
