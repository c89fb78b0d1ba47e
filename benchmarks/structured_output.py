"""Which structured-output library fits coreinfer: per-token mask cost on the embedded model's vocabulary.

    python benchmarks/structured_output.py                  # every library that imports
    python benchmarks/structured_output.py --repeat 20

For xgrammar, llguidance and outlines-core (each where installed) it compiles one JSON schema against
SmolLM2-135M-Instruct's 49,152-token vocabulary, then walks a valid document token by token: at each
token it computes the mask of allowed next tokens (what a decode step waits for), checks that the
document's token is allowed, and advances. It prints one markdown table: compile time, per-token
mask time (mean and p95), whether arbitrary JSON (`json_object`) is expressible, and the installed
size of the package and of the dependencies it pulls that coreinfer does not already have. A last row
times what the server itself pays per token (coreinfer/engine/structured.py).
"""

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
DOCUMENT = '{"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "poetry", "engines"]}'
# what each library needs beyond coreinfer's own dependencies (torch, transformers, numpy are there)
EXTRA_DEPS = {"xgrammar": ["apache_tvm_ffi", "triton"], "llguidance": [], "outlines_core": []}


def tree_mb(package: str) -> float | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2 ** 20


def load_tokenizer():
    from transformers import AutoTokenizer

    from coreinfer.io.loading import embedded_model_path

    path = embedded_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def walk(fill, allowed, advance, ids: list[int]) -> list[float]:
    """Per-token seconds of `fill()` over the document's tokens; asserts each token is allowed."""
    times = []
    for t in ids:
        t0 = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t0)
        assert allowed(t), f"token {t} rejected"
        advance(t)
    return times


def bench_xgrammar(tok, V: int, ids: list[int]):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, V)
    bits = lambda t: bool((mask[0, t // 32] >> (t % 32)) & 1)
    times = walk(lambda: matcher.fill_next_token_bitmask(mask), bits, matcher.accept_token, ids)
    return compile_s, times, True


def bench_llguidance(tok, V: int, ids: list[int]):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=V)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    mask = llt.allocate_token_bitmask(1, V)
    bits = lambda t: bool((mask[0, t // 32] >> (t % 32)) & 1)
    times = walk(lambda: llt.fill_next_token_bitmask(matcher, mask, 0), bits, matcher.consume_token, ids)
    assert not matcher.is_error(), matcher.get_error()
    return compile_s, times, True


def byte_level_vocab(tok) -> dict[bytes, list[int]]:
    """The tokenizer's tokens as the bytes they stand for (GPT-2 byte-level alphabet undone)."""
    # GPT-2's table: printable bytes stand for themselves, the others for chars from U+0100 on
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    back = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    special = set(tok.all_special_ids)
    vocab: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i not in special:
            vocab.setdefault(bytes(back[c] for c in text), []).append(i)
    return vocab


def bench_outlines(tok, V: int, ids: list[int]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab = Vocabulary(tok.eos_token_id, byte_level_vocab(tok))
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab)
    compile_s = time.perf_counter() - t0
    guide = Guide(index)
    mask = torch.zeros(V, dtype=torch.bool)

    def fill():  # a list of allowed ids, turned into the mask a sampler applies
        mask.zero_()
        mask[torch.tensor(guide.get_tokens())] = True

    times = walk(fill, lambda t: bool(mask[t]), guide.advance, ids)
    return compile_s, times, False  # regular expressions: no arbitrarily nested JSON


def bench_server(tok, V: int, ids: list[int]):
    """What coreinfer's server pays per token (engine/structured.py on llguidance): the mask, applying
    it to a row of logits, and advancing the matcher."""
    from coreinfer.engine.structured import Grammars, json_grammar

    grammars = Grammars(tok, V, {tok.eos_token_id})
    t0 = time.perf_counter()
    c = grammars.constraint(json_grammar({"type": "json_schema", "json_schema": {"schema": SCHEMA}}))
    compile_s = time.perf_counter() - t0
    logits, times = torch.randn(1, V), []
    for t in ids:
        t0 = time.perf_counter()
        masked = c.mask(logits)
        c.accept(t)
        times.append(time.perf_counter() - t0)
        assert masked[0, t] == logits[0, t], f"token {t} rejected"
    return compile_s, times, True


BENCHES = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines_core": bench_outlines,
           "coreinfer (llguidance: mask, apply, advance)": bench_server}
PACKAGES = {"coreinfer (llguidance: mask, apply, advance)": "llguidance"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="walks of the document per library (after one warm-up)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer()
    V = 49152  # the embedding rows of SmolLM2-135M
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    rows = []
    for name, bench in BENCHES.items():
        package = PACKAGES.get(name, name)
        if importlib.util.find_spec(package) is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        compile_s, times, _ = bench(tok, V, ids)  # warm-up (first-call costs)
        runs = [bench(tok, V, ids) for _ in range(args.repeat)]
        times = [t for _, ts, _ in runs for t in ts]
        size = tree_mb(package) + sum(tree_mb(d) or 0 for d in EXTRA_DEPS[package])
        rows.append((name, statistics.median(c for c, _, _ in runs) * 1e3, statistics.mean(times) * 1e6,
                     statistics.quantiles(times, n=20)[-1] * 1e6, runs[0][2], size))
    print(f"\nschema of 3 fields, a {len(ids)}-token document, vocabulary {V}, {args.repeat} walks, one thread\n")
    print("| library | compile ms (median) | mask us/token mean | mask us/token p95 | json_object | install MB |")
    print("|---|---|---|---|---|---|")
    for name, c, mean, p95, any_json, size in rows:
        print(f"| {name} | {c:.1f} | {mean:.0f} | {p95:.0f} | {'yes' if any_json else 'no'} | {size:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
