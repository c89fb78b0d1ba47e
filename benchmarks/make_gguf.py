"""Write a random-weight GGUF with a real model's shapes and a Q4_K_M file's tensor types.

    python benchmarks/make_gguf.py --preset qwen2.5-7b
    python benchmarks/make_gguf.py --preset llama-3.1-8b --layers 2   # a quick, smaller file

Speed and memory of a batch-1 decoder depend on shapes and bytes, not on the weights' values, so
this file decodes as fast (and needs as much memory) as the real model, without downloading it.

- Tensor types follow llama.cpp's Q4_K_M recipe: Q4_K everywhere, Q6_K for `output.weight` and for
  `attn_v`/`ffn_down` in the layers where llama.cpp's `use_more_bits` picks them (about half),
  F32 norms, biases and rope frequencies.
- Blocks are random bytes with small fp16 scales (weights of std ~0.02), so nothing overflows.
- The tokenizer metadata is copied from a real GGUF (`--tokenizer-from`, default the Qwen2.5-Coder
  file). Qwen vocabularies are padded with `[PAD{i}]` tokens to the model's vocab size, as
  llama.cpp's converter does. Llama-3.1 has no GGUF here, so its 128256-token vocabulary is the
  Qwen one cut to size: the first 128000 ordinary tokens, then Qwen's special tokens, then padding,
  keeping the merges whose parts and result survive. It tokenizes text, not as Llama 3 does.
- Written one tensor at a time through gguf-py's GGUFWriter: memory peaks at one tensor.

The file goes to <cache>/synthetic/<preset>[-<layers>l]-q4_k_m.gguf (cache: $COREINFER_CACHE or
~/.cache/coreinfer). Never a test dependency: tests use tiny files.
"""

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf.constants import GGML_QUANT_SIZES
from tqdm import tqdm

QWEN_GGUF = Path("/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
WEIGHT_STD = 0.02
CHUNK_BLOCKS = 1 << 20  # blocks generated at a time (~150-210 MB), so a tensor never sits whole


@dataclass(frozen=True)
class Shape:
    arch: str  # GGUF general.architecture
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    rope_base: float
    eps: float
    qkv_bias: bool
    context: int = 32768
    llama3_rope: bool = False  # Llama 3.1's rope scaling, stored as the rope_freqs tensor

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 152064, 1e6, 1e-6, True),
    "qwen2.5-14b": Shape("qwen2", 48, 5120, 13824, 40, 8, 152064, 1e6, 1e-5, True),
    "llama-3.1-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128256, 5e5, 1e-5, False, 131072, True),
}


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get Q6_K in a Q4_K_M file."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_plan(s: Shape) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, numpy shape [out, in], type) of every tensor, in file order."""
    kv = s.kv_heads * s.head_dim
    plan = [("token_embd.weight", (s.vocab, s.hidden), Q.Q4_K)]
    if s.llama3_rope:
        plan.append(("rope_freqs.weight", (s.head_dim // 2,), Q.F32))
    for i in range(s.layers):
        more = Q.Q6_K if use_more_bits(i, s.layers) else Q.Q4_K
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (s.hidden,), Q.F32),
                 (b + "attn_q.weight", (s.hidden, s.hidden), Q.Q4_K),
                 (b + "attn_k.weight", (kv, s.hidden), Q.Q4_K),
                 (b + "attn_v.weight", (kv, s.hidden), more)]
        if s.qkv_bias:
            plan += [(b + "attn_q.bias", (s.hidden,), Q.F32), (b + "attn_k.bias", (kv,), Q.F32),
                     (b + "attn_v.bias", (kv,), Q.F32)]
        plan += [(b + "attn_output.weight", (s.hidden, s.hidden), Q.Q4_K),
                 (b + "ffn_norm.weight", (s.hidden,), Q.F32),
                 (b + "ffn_gate.weight", (s.ffn, s.hidden), Q.Q4_K),
                 (b + "ffn_up.weight", (s.ffn, s.hidden), Q.Q4_K),
                 (b + "ffn_down.weight", (s.hidden, s.ffn), more)]
    plan += [("output_norm.weight", (s.hidden,), Q.F32), ("output.weight", (s.vocab, s.hidden), Q.Q6_K)]
    return plan


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def random_blocks(rng: np.random.Generator, n: int, qtype: Q) -> np.ndarray:
    """n random Q4_K or Q6_K blocks [n, bytes] whose weights have a std near WEIGHT_STD."""
    size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    jitter = rng.uniform(0.5, 1.5, n)
    if qtype == Q.Q4_K:
        # w = d * sc * q - dmin * mn with random 6-bit sc/mn and 4-bit q: std ~ 270 d (measured)
        d = WEIGHT_STD / 270 * jitter
        blocks[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
        blocks[:, 2:4] = (d * 7.5).astype(np.float16).view(np.uint8).reshape(n, 2)  # centres q
    else:
        # Q6_K: ql[128] qh[64] scales int8[16] d fp16; w = d * scale * (q - 32), q std ~18.5
        blocks[:, 192:208] = rng.integers(-32, 33, (n, 16), dtype=np.int8).view(np.uint8)
        d = WEIGHT_STD / (18.5 * 18.5) * jitter
        blocks[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


def float_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], s: Shape) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    if name == "rope_freqs.weight":
        return llama3_rope_factors(s)
    return rng.normal(0, WEIGHT_STD, shape).astype(np.float32)  # biases


def llama3_rope_factors(s: Shape, factor=8.0, low=1.0, high=4.0, original=8192) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores for Llama 3.1's rope scaling."""
    freqs = 1.0 / s.rope_base ** (np.arange(0, s.head_dim, 2, dtype=np.float64) / s.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(wavelen < original / high, 1.0,
                       np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _contents(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def copy_tokenizer(w: GGUFWriter, source: Path, vocab: int) -> None:
    """The source GGUF's tokenizer metadata, its vocabulary padded or cut to `vocab` tokens."""
    r = GGUFReader(source)
    tokens, types = _contents(r, "tokenizer.ggml.tokens"), _contents(r, "tokenizer.ggml.token_type")
    merges = _contents(r, "tokenizer.ggml.merges") or []
    ids = {key: _contents(r, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    if vocab < len(tokens):
        # keep the ordinary tokens that fit below vocab - 256, then the special ones (control/user)
        ordinary = [i for i, t in enumerate(types) if t == TokenType.NORMAL][:vocab - 256]
        special = [i for i, t in enumerate(types) if t != TokenType.NORMAL][:256]
        keep = ordinary + special
        new_id = {old: new for new, old in enumerate(keep)}
        tokens, types = [tokens[i] for i in keep], [types[i] for i in keep]
        kept = set(tokens)
        merges = [m for m in merges if (pair := m.split(" ", 1)) and all(p in kept for p in pair)
                  and "".join(pair) in kept]
        ids = {key: new_id.get(old) for key, old in ids.items()}
    pad = vocab - len(tokens)
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types = types + [TokenType.UNUSED] * pad
    w.add_tokenizer_model(_contents(r, "tokenizer.ggml.model"))
    w.add_tokenizer_pre(_contents(r, "tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for key, value in ids.items():
        if value is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", int(value))
    add_bos = _contents(r, "tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        w.add_add_bos_token(bool(add_bos))
    template = _contents(r, "tokenizer.chat_template")
    if template:
        w.add_chat_template(template)


def add_metadata(w: GGUFWriter, preset: str, s: Shape) -> None:
    w.add_type("model")
    w.add_name(f"random-weight {preset} (benchmarks/make_gguf.py)")
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.eps)
    if s.arch == "llama":
        w.add_rope_dimension_count(s.head_dim)
        w.add_vocab_size(s.vocab)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)


def write_tensor(w: GGUFWriter, rng: np.random.Generator, name: str, shape, qtype: Q, s: Shape,
                 bar: tqdm) -> None:
    """One tensor's data, in chunks of blocks, straight after the writer's alignment padding."""
    if qtype == Q.F32:
        data = float_tensor(rng, name, shape, s)
        w.write_tensor_data(data)
        bar.update(data.nbytes)
        return
    # GGUFWriter.write_tensor_data wants the whole tensor; write the same bytes chunk by chunk
    fout = w.fout[0]
    w.tensors[0].pop(name)
    w.write_padding(fout, fout.tell())
    blocks = math.prod(shape) // GGML_QUANT_SIZES[qtype][0]
    for start in range(0, blocks, CHUNK_BLOCKS):
        chunk = random_blocks(rng, min(CHUNK_BLOCKS, blocks - start), qtype)
        chunk.tofile(fout)
        bar.update(chunk.nbytes)
    w.write_padding(fout, nbytes(shape, qtype))


def make(preset: str, out: Path, layers: int | None, tokenizer_from: Path, seed: int) -> Path:
    s = PRESETS[preset]
    if layers:
        s = Shape(**{**s.__dict__, "layers": layers})
    plan = tensor_plan(s)
    tmp = out.with_suffix(".partial")
    w = GGUFWriter(tmp, s.arch)
    add_metadata(w, preset, s)
    copy_tokenizer(w, tokenizer_from, s.vocab)
    for name, shape, qtype in plan:
        if qtype == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype))
        else:
            byte_shape = (*shape[:-1], shape[-1] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(nbytes(shape, qtype) for _, shape, qtype in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc=out.name) as bar:
        for name, shape, qtype in plan:
            write_tensor(w, rng, name, shape, qtype, s, bar)
    w.close()
    tmp.rename(out)
    return out


def cache_dir() -> Path:
    if os.environ.get("COREINFER_CACHE"):
        return Path(os.environ["COREINFER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coreinfer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the model (a quick file)")
    p.add_argument("--tokenizer-from", type=Path, default=QWEN_GGUF, help="GGUF whose tokenizer is copied")
    p.add_argument("--out", type=Path, default=None, help="output file (default: in the cache folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.tokenizer_from.is_file():
        p.error(f"no tokenizer GGUF at {args.tokenizer_from} (give one with --tokenizer-from)")
    suffix = f"-{args.layers}l" if args.layers else ""
    out = args.out or cache_dir() / "synthetic" / f"{args.preset}{suffix}-q4_k_m.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    path = make(args.preset, out, args.layers, args.tokenizer_from, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
