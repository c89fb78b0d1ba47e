"""The weight formats (coreinfer/formats): GGML blocks against gguf-py's dequantize, runtime formats
against their float values."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from coreinfer.formats import FORMATS, ggml_type
from coreinfer.formats.ggml import TYPES

N, K = 8, 512  # two K-quant super-blocks a row


def random_blocks(code: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, row bytes] of valid blocks: quantized random floats where gguf-py quantizes the type,
    else random bytes with their fp16 scale fields set to finite values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    if code in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        return gguf_quantize(w, code).reshape(N, -1)
    kind = TYPES[code]
    raw = rng.integers(0, 256, (N * K // kind.block, kind.nbytes), dtype=np.uint8)
    scales = rng.uniform(1e-4, 1e-2, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)  # [n, 4]
    at = (208,) if code == Q.Q6_K else (0, 2)  # where the block's fp16 d (and dmin) lie
    for i, offset in enumerate(at):
        raw[:, offset:offset + 2] = scales[:, 2 * i:2 * i + 2]
    return raw.reshape(N, -1)


@pytest.mark.parametrize("code", list(TYPES), ids=lambda c: Q(c).name)
def test_ggml_dequantize_equals_gguf_py(code):
    raw = random_blocks(code)
    ours = ggml_type(code).dequantize(torch.from_numpy(raw), (N, K))
    ref = torch.from_numpy(gguf_dequantize(raw, code).astype(np.float32))
    assert ours.shape == ref.shape == (N, K)
    assert torch.equal(ours, ref), f"max |diff| {(ours - ref).abs().max():.3g}"


def test_unknown_ggml_type_is_one_line():
    with pytest.raises(ValueError, match="GGML type IQ2_XS is not supported"):
        ggml_type(Q.IQ2_XS)


@pytest.mark.parametrize("code", [Q.Q8_0])
def test_q8_0_takes_q8_0_blocks_verbatim(code):
    raw = random_blocks(code)
    t = FORMATS["q8_0"].from_blocks(ggml_type(code), torch.from_numpy(raw), (N, K))
    assert t["qs"].dtype == torch.int8 and t["qs"].shape == (N, K) and t["d"].shape == (N, K // 32)
    blocks = raw.reshape(N, K // 32, 34)
    assert np.array_equal(t["qs"].numpy().view(np.uint8).reshape(N, K // 32, 32), blocks[..., 2:])
    assert np.array_equal(t["d"].numpy().view(np.uint8).reshape(N, K // 32, 2), blocks[..., :2])
    ref = torch.from_numpy(gguf_dequantize(raw, code))
    assert torch.equal(FORMATS["q8_0"].dequantize(t), ref)


@pytest.mark.parametrize("code", [Q.Q4_0, Q.Q4_1])
def test_q4_takes_q4_0_and_q4_1_exactly(code):
    raw = random_blocks(code)
    t = FORMATS["q4"].from_blocks(ggml_type(code), torch.from_numpy(raw), (N, K))
    assert t["qs"].shape == (N, K // 2) and t["d"].shape == t["m"].shape == (N, K // 32)
    assert torch.equal(FORMATS["q4"].dequantize(t), torch.from_numpy(gguf_dequantize(raw, code)))


def test_q4_takes_q4_k_per_sub_block():
    """Q4_K's sub-block scale d_super * sc and min dmin * mn rounded to fp16: each weight within
    15 * |d| * 2^-11 + |m| * 2^-11 of gguf-py's value, and the 4-bit codes themselves exact."""
    raw = random_blocks(Q.Q4_K)
    t = FORMATS["q4"].from_blocks(ggml_type(Q.Q4_K), torch.from_numpy(raw), (N, K))
    ours = FORMATS["q4"].dequantize(t)
    ref = torch.from_numpy(gguf_dequantize(raw, Q.Q4_K))
    d, m = t["d"].float().repeat_interleave(32, 1), t["m"].float().repeat_interleave(32, 1)
    bound = (15 * d.abs() + m.abs()) * 2**-11 + 1e-7
    diff = (ours - ref).abs()
    print(f"Q4_K -> q4: max |diff| {diff.max():.3g}, max diff / bound {(diff / bound).max():.3f}")
    assert bool((diff <= bound).all())
    codes = FORMATS["q4"].dequantize(dict(t, d=torch.ones_like(t["d"]), m=torch.zeros_like(t["m"])))
    scaled = d > 0  # a zero scale (sc = 0) leaves the codes undetermined by the values
    expect = torch.round((ref - m) / d.clamp_min(1e-30))  # m and d rounded: still within 0.02 of an integer
    assert torch.equal(codes[scaled], expect[scaled])


@pytest.mark.parametrize("code", [Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32, Q.Q4_K])
def test_q8_0_requantizes_other_types_like_ggml(code):
    """Other types become q8_0 as ggml's quantize_row_q8_0 would quantize their float values
    (gguf-py's Q8_0 quantize is bit-exact with it)."""
    raw = random_blocks(code)
    t = FORMATS["q8_0"].from_blocks(ggml_type(code), torch.from_numpy(raw), (N, K))
    floats = gguf_dequantize(raw, code).astype(np.float32)
    ref = gguf_quantize(floats, Q.Q8_0).reshape(N, K // 32, 34)
    assert np.array_equal(t["d"].numpy().view(np.uint8).reshape(N, K // 32, 2), ref[..., :2])
    assert np.array_equal(t["qs"].numpy().view(np.uint8).reshape(N, K // 32, 32), ref[..., 2:])


@pytest.mark.parametrize("name", list(FORMATS))
def test_runtime_format_interface(name):
    """pack, dequantize, rows, matmul and rows_matmul of each format agree with the float weight it holds."""
    fmt = FORMATS[name]
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    t = fmt.pack(w)
    back = fmt.dequantize(t)
    err = (back - w).abs().max().item()
    assert err <= {"dense": 0, "int8": 0.02, "q8_0": 0.02, "q4": 0.3}[name], err
    index = torch.tensor([5, 0, 63, 5])
    assert torch.equal(fmt.dequantize(fmt.rows(t, index)), back[index])
    x = torch.randn(3, 96)
    ref = x @ back.t()
    # the native GEMVs (engine/gemv.py, kernels/) quantize x per block of 32: ~0.5% of the output's scale
    tol = 1e-2 * ref.abs().max().item() if name != "dense" else 1e-3
    torch.testing.assert_close(fmt.matmul(x, t), ref, rtol=0, atol=tol)
    coef = torch.randn(2, 4)
    torch.testing.assert_close(fmt.rows_matmul(coef, t, index), coef @ back[index], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fmt.rows_matmul(torch.randn(2, 64), t, None).shape, torch.Size([2, 96]))
    assert fmt.nbytes(t) == sum(v.nbytes for v in t.values())


# --- a tiny GGUF of several types, loaded tensor by tensor into runtime formats ---

TINY_GGUF = dict(hidden=256, ffn=512, heads=4, kv_heads=2, layers=2, vocab=258)
# per tensor: the GGML type it is written in (layer 0 mixes q/k/v types: they fuse as q8_0)
GGUF_TYPES = {
    "token_embd": Q.Q4_K, "output": Q.Q5_K,
    "blk.0.attn_q": Q.Q4_0, "blk.0.attn_k": Q.Q4_1, "blk.0.attn_v": Q.Q8_0, "blk.0.attn_output": Q.F16,
    "blk.0.ffn_gate": Q.Q4_K, "blk.0.ffn_up": Q.Q4_K, "blk.0.ffn_down": Q.Q6_K,
    "blk.1.attn_q": Q.Q4_K, "blk.1.attn_k": Q.Q4_K, "blk.1.attn_v": Q.Q4_K, "blk.1.attn_output": Q.BF16,
    "blk.1.ffn_gate": Q.Q4_0, "blk.1.ffn_up": Q.Q4_0, "blk.1.ffn_down": Q.Q4_K,
}


def k_quant_blocks(code: int, rows: int, cols: int, rng) -> np.ndarray:
    """Random valid K-quant blocks [rows, row bytes] whose weights are ~0.02 (scales 2e-5..1e-4)."""
    kind = TYPES[code]
    raw = rng.integers(0, 256, (rows * cols // kind.block, kind.nbytes), dtype=np.uint8)
    scales = rng.uniform(2e-5, 1e-4, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    for i, offset in enumerate((208,) if code == Q.Q6_K else (0, 2)):
        raw[:, offset:offset + 2] = scales[:, 2 * i:2 * i + 2]
    return raw.reshape(rows, -1)


def write_gguf(path):
    """A qwen2 GGUF (no q/k permutation; q/k/v biases) of TINY_GGUF's shapes, types from GGUF_TYPES."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c, rng = TINY_GGUF, np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in [("block_count", c["layers"]), ("embedding_length", c["hidden"]),
                       ("feed_forward_length", c["ffn"]), ("head_count", c["heads"]), ("head_count_kv", c["kv_heads"]),
                       ("layer_norm_rms_eps", 1e-6), ("rope_freq_base", 10000.0), ("context_length", 64),
                       ("tokenizer_model", "gpt2"), ("tokenizer_pre", "gpt2"),
                       ("token_list", list(bytes_to_unicode().values()) + ["Ġt", "<|endoftext|>"]),
                       ("token_merges", ["Ġ t"]), ("token_types", [1] * 257 + [3]), ("bos_token_id", 257),
                       ("eos_token_id", 257)]:
        getattr(writer, f"add_{add}")(value)
    hd, d, f = c["hidden"] // c["heads"], c["hidden"], c["ffn"]
    shapes = {"token_embd": (c["vocab"], d), "output": (c["vocab"], d), "attn_q": (d, d),
              "attn_k": (c["kv_heads"] * hd, d), "attn_v": (c["kv_heads"] * hd, d), "attn_output": (d, d),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    for name, code in GGUF_TYPES.items():
        rows, cols = shapes[name.split(".")[-1]]
        if code in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            data = k_quant_blocks(code, rows, cols, rng)
        else:
            data = gguf_quantize((rng.standard_normal((rows, cols)) * 0.03).astype(np.float32), code)
        writer.add_tensor(f"{name}.weight", data.view(np.uint8).reshape(rows, -1), raw_dtype=code)
    for i in range(c["layers"]):
        for name, size in (("attn_norm", d), ("ffn_norm", d), ("attn_q.bias", d), ("attn_k.bias", c["kv_heads"] * hd),
                           ("attn_v.bias", c["kv_heads"] * hd)):
            full = f"blk.{i}.{name}" + ("" if name.endswith("bias") else ".weight")
            writer.add_tensor(full, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32) if "norm" in name
                              else (0.1 * rng.standard_normal(size)).astype(np.float32))
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_gguf(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COREINFER_CACHE", str(path.parent / "cache"))
        from coreinfer.io.loading import load_checkpoint

        yield load_checkpoint(path, progress=False)


def held_weights(model) -> dict[str, torch.Tensor]:
    """The float values our formats hold, under transformers' names: what our model computes with."""
    from coreinfer.models.common import QLinear

    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.dim() == 1 and "bias" not in name:
            out[f"model.{name}"] = t
    deq = lambda m: FORMATS[m.fmt].dequantize(m.tensors())  # noqa: E731
    out["model.embed_tokens.weight"] = deq(model.embed_tokens)
    out["lm_head.weight"] = deq(model.lm_head)
    for i, layer in enumerate(model.layers):
        p, attn, ffn = f"model.layers.{i}.", layer.self_attn, layer.mlp
        assert isinstance(attn.qkv_proj, QLinear)
        sizes = [attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim, attn.kv_heads * attn.head_dim]
        for j, (part, w) in enumerate(zip("qkv", deq(attn.qkv_proj).split(sizes))):
            out[f"{p}self_attn.{part}_proj.weight"] = w
            if attn.qkv_proj.bias is not None:
                out[f"{p}self_attn.{part}_proj.bias"] = attn.qkv_proj.bias.split(sizes)[j]
        out[f"{p}self_attn.o_proj.weight"] = deq(attn.o_proj)
        out[f"{p}mlp.gate_proj.weight"] = FORMATS[ffn.format].dequantize(ffn.role("gate"))
        out[f"{p}mlp.up_proj.weight"] = FORMATS[ffn.format].dequantize(ffn.role("up"))
        out[f"{p}mlp.down_proj.weight"] = FORMATS[ffn.down_format].dequantize(ffn.role("down")).t()
    return out


def transformers_model(config: dict, state: dict):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                       attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and not missing, (missing, unexpected)
    return hf


def file_values(checkpoint) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized to fp32 by transformers' own GGUF loader (gguf-py underneath)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**checkpoint.config))
    return load_gguf_checkpoint(str(checkpoint.source), return_tensors=True, model_to_load=skeleton)["tensors"]


GGUF_IDS = [5, 17, 3, 88, 42, 9, 61, 2, 33, 200, 101]


@pytest.mark.parametrize("formats,downs", [("auto", ("q8_0", "q8_0")), ("small", ("q8_0", "q4"))])
@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "native"])
def test_gguf_loads_into_file_formats_and_matches_transformers(tiny_gguf, kernels, formats, downs, monkeypatch):
    """Each tensor in the format the file implies; logits equal transformers' on the values those
    formats hold (1e-4 with the PyTorch matmuls: float rounding only; 3% of the logits' scale with the
    native GEMVs, which quantize activations per block of 32: 2.1% measured, nearly all of it q8_0_gemv's;
    the neuron-row sums are float), and close to transformers' on the file's
    own fp32 values (the requantizations: down, layer 0's mixed q/k/v, Q5_K/F16/BF16)."""
    from coreinfer.formats import native

    if not kernels:
        monkeypatch.setattr(native, "op", lambda name: None)
    elif native.op("q8_0_gemv") is None or native.op("q4_gemv") is None:
        pytest.skip("optional: no AVX512-VNNI CPU or no C++ compiler for the q8_0/q4 kernels")
    from coreinfer.models import build_model
    from oracle import hf_logits, our_logits

    model = build_model(tiny_gguf.config, tiny_gguf.weights, formats=formats)
    l0, l1 = model.layers
    assert (model.embed_tokens.fmt, model.lm_head.fmt) == ("q4", "q8_0")
    assert (l0.self_attn.qkv_proj.fmt, l1.self_attn.qkv_proj.fmt, l0.self_attn.o_proj.fmt) == ("q8_0", "q4", "q8_0")
    assert (l0.mlp.format, l1.mlp.format) == ("q4", "q4")
    # the file's Q6_K and Q4_K downs: q8_0 under auto (faithful), 4-bit kept 4-bit under small
    assert (l0.mlp.down_format, l1.mlp.down_format) == downs
    assert not any(t.dtype == torch.float32 and t.dim() == 2 for t in model.state_dict().values())
    ours, _ = our_logits(model, [GGUF_IDS[:7]], [GGUF_IDS[7:]])
    held = hf_logits(transformers_model(tiny_gguf.config, held_weights(model)), GGUF_IDS)
    err = (ours[0] - held).abs().max().item()
    exact = hf_logits(transformers_model(tiny_gguf.config, file_values(tiny_gguf)), GGUF_IDS)
    drift = (ours[0] - exact).abs().max().item()
    scale = exact.abs().max().item()
    print(f"tiny GGUF: max |ours - hf on held values| {err:.2e}; vs hf on the file's fp32 values {drift:.2e} "
          f"(logits up to {scale:.2f}); top-1 agreement {(ours[0].argmax(-1) == exact.argmax(-1)).float().mean():.2f}")
    assert err < (3e-2 if kernels else 1e-4) * max(1.0, scale)
    assert drift < 0.05 * scale


def test_dense_gguf_equals_file_values(tiny_gguf):
    """--weights dense dequantizes each tensor as it is adopted: the file's values exactly."""
    from coreinfer.models import build_model

    model = build_model(tiny_gguf.config, tiny_gguf.weights)
    ref = file_values(tiny_gguf)
    ours = model.state_dict()
    assert torch.equal(ours["layers.1.mlp.down"], ref["model.layers.1.mlp.down_proj.weight"].t())
    assert torch.equal(ours["embed_tokens.weight"], ref["model.embed_tokens.weight"])
    q = ref["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(ours["layers.0.self_attn.qkv_proj.weight"][:q.shape[0]], q)


@pytest.mark.parametrize("fmt", ["q4", "q8_0"])
@pytest.mark.parametrize("name", ["layers.0.mlp.down", "layers.1.mlp.down", "lm_head.weight"])
def test_chunked_conversion_equals_the_whole_tensor(tiny_gguf, name, fmt):
    """A file tensor converted a few rows at a time (down: a few of the file's columns at a time, turned
    neuron-major) holds what the whole tensor converted at once holds."""
    from coreinfer.models import adopt
    from coreinfer.models.llama import LlamaConfig, sanitize

    w = sanitize(tiny_gguf.weights, LlamaConfig.from_dict(tiny_gguf.config))[name]
    whole = FORMATS[fmt].pack(w.dequantize())
    chunked = adopt.convert(w, fmt, "cpu", chunk_weights=100 * w.model_shape[1])  # 2-3 chunks
    assert chunked.keys() == whole.keys()
    for key in whole:
        assert torch.equal(chunked[key], whole[key]), key


@pytest.mark.parametrize("kernels", [False, True], ids=["pytorch", "native"])
@pytest.mark.parametrize("formats", ["auto", "q8_0"])
def test_compacted_equals_masked_on_block_formats(tiny_gguf, formats, kernels, monkeypatch):
    """Core neurons on q4 / q8_0 up and gate and neuron-major q4 / q8_0 down: compaction gathers rows, and
    the compacted decode equals the masked dense one. On the PyTorch references both are float products of
    the same rows: rounding only. The native GEMVs quantize x to int8 per block of 32, so a rounding-level
    difference upstream (the batch of two against one sequence, the summation order of R against F rows,
    the thread count) can move an activation by a whole int8 step: ~1e-2 on logits of std ~1 (3e-3 seen in
    CI, 1.3e-2 on 2 threads with the q8_0 rows reference), as test_quant allows the int8 GEMV; a wrong row
    would move them as much as the core set itself (> 0.5 here)."""
    from coreinfer.engine.policy import CoreConfig
    from coreinfer.engine.session import stability_policy
    from coreinfer.formats import native
    from coreinfer.models import build_model
    from oracle import compacted_vs_masked

    if not kernels:
        monkeypatch.setattr(native, "op", lambda name: None)
    model = build_model(tiny_gguf.config, tiny_gguf.weights, formats=formats)
    policy = stability_policy(CoreConfig(beta=0.45), model)
    errs, changes, session = compacted_vs_masked(model, [GGUF_IDS[:7], GGUF_IDS[:4]], [GGUF_IDS[7:], GGUF_IDS[4:8]],
                                                 policy)
    print(f"{formats}, native {kernels}: compacted vs masked {errs}, vs dense {changes}")
    assert min(changes) > 0.1
    assert max(errs) < (2e-2 if kernels else 1e-4)


def test_hf_bf16_weights_quantize_per_tensor_to_q8_0(monkeypatch):
    """An HF checkpoint's bf16 tensors go to q8_0 one by one (--weights auto); its logits equal
    transformers' on the values q8_0 holds (PyTorch matmuls: float rounding only)."""
    import transformers

    from coreinfer.formats import native
    from coreinfer.models import build_model
    from oracle import hf_logits, our_logits

    monkeypatch.setattr(native, "op", lambda name: None)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {name: t.to(torch.bfloat16) for name, t in hf.state_dict().items()}
    model = build_model(config.to_dict(), state, formats="auto")
    assert model.embed_tokens.fmt == model.lm_head.fmt == model.ffns()[0].format == "q8_0"
    assert model.lm_head.qs.data_ptr() == model.embed_tokens.qs.data_ptr()  # tied: one table
    held = held_weights(model)
    held.pop("lm_head.weight")
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    missing, unexpected = ref.load_state_dict(held, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    ref.tie_weights()
    ours, _ = our_logits(model, [GGUF_IDS[:6]], [GGUF_IDS[6:9]])
    err = (ours[0] - hf_logits(ref, GGUF_IDS[:9])).abs().max().item()
    print(f"HF bf16 -> q8_0: max |ours - hf on held values| {err:.2e}")
    assert err < 1e-4
