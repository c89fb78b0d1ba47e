"""The core engine: compacted decoding equals the masked-dense model; keep 1.0 equals dense;
the teacher-forced scorer equals step-by-step sparse decoding; config errors are clear."""

import pytest
import torch
import transformers

from coreinfer.core import CoreConfig, compact, decode_bytes, parse_layers, select, select_and_compact
from coreinfer.scoring import continuation_logprobs
from oracle import hf_pair, our_logits

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64]]
CONTS = [[11, 4, 90, 23, 6], [50, 8, 19, 70, 2]]
CORE = CoreConfig(alpha=0.4, beta=0.5, layers="1-2")


def model_of(family="llama"):
    configs = {"llama": transformers.LlamaConfig(**TINY), "qwen2": transformers.Qwen2Config(**TINY)}
    return hf_pair(configs[family])[1]


def sparse_logits(model, core, prompts=PROMPTS, conts=CONTS):
    chosen = {}

    def hook(acts, valid):
        chosen.update(select(acts, valid, core, model.layers[0].mlp.gated))
        compact(model, chosen)

    return our_logits(model, prompts, conts, sparse=True, core_hook=hook), chosen


def masked_dense_logits(model, prompt, cont, index_b: dict[int, torch.Tensor]):
    """Reference: dense prefill, then dense decode with every non-core row of `down` zeroed."""
    saved = {l: model.layers[l].mlp.down.detach().clone() for l in index_b}

    def hook(acts, valid):
        for l, ids in index_b.items():
            keep = torch.zeros(saved[l].shape[0], dtype=torch.bool)
            keep[ids] = True
            model.layers[l].mlp.down.data[~keep] = 0

    try:
        return our_logits(model, [prompt], [cont], sparse=False, core_hook=hook)[0]
    finally:
        for l, w in saved.items():
            model.layers[l].mlp.down.data.copy_(w)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compacted_decode_equals_masked_dense_in_batch(family):
    model = model_of(family)
    batched, index = sparse_logits(model, CORE)
    dense = our_logits(model, PROMPTS, CONTS)
    for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        ref = masked_dense_logits(model, p, c, {l: ix[b] for l, ix in index.items()})
        err = (batched[b] - ref).abs().max().item()
        changed = (batched[b] - dense[b]).abs().max().item()
        print(f"{family} seq{b}: max|compact-masked| {err:.2e}; max|compact-dense| {changed:.2e}")
        assert err < 1e-5
        assert changed > 1e-3  # the core set really changed the decode
    # each sequence chose its own set from its own prompt
    assert not torch.equal(index[1][0], index[1][1])


def test_keep_one_equals_dense():
    model = model_of()
    full, _ = sparse_logits(model, CoreConfig(beta=1.0, layers="all"))
    dense = our_logits(model, PROMPTS, CONTS)
    err = max((f - d).abs().max().item() for f, d in zip(full, dense))
    print(f"keep 1.0 vs dense: {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("core", [None, CORE, CoreConfig(beta=0.3, statistic="norm", layers="all")])
def test_teacher_forced_scorer_equals_stepwise_decode(core):
    model = model_of()
    scored = continuation_logprobs(model, PROMPTS, CONTS, core)
    if core is None:
        stepwise = our_logits(model, PROMPTS, CONTS)
    else:
        stepwise, _ = sparse_logits(model, core)
    for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        ref = stepwise[b][len(p) - 1:-1].log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0]
        err = (scored[b] - ref).abs().max().item()
        print(f"scorer vs stepwise seq{b}: {err:.2e}")
        assert err < 1e-5


def test_one_token_prompt_and_stats():
    model = model_of()
    batched, index = sparse_logits(model, CORE, prompts=[[42]], conts=[[3, 4]])
    assert batched[0].shape == (3, 97)
    stats = select_and_compact(model, [torch.randn(1, 1, 96) for _ in range(4)], torch.ones(1, 1, dtype=torch.bool), CORE)
    assert stats.core_sizes == {1: 48, 2: 48}
    ffn = model.layers[1].mlp
    row_bytes = sum(w.numel() * 4 for w in (ffn.up, ffn.gate, ffn.down)) // 2
    assert stats.bytes_dense - stats.bytes_core == 2 * row_bytes
    assert decode_bytes(model) == stats.bytes_dense


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(beta=0.0), "beta"), (dict(beta=1.2), "beta"),
    (dict(statistic="mean"), "statistic"), (dict(ranking="up"), "ranking"),
])
def test_bad_core_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoreConfig(**kwargs)


def test_layer_specs():
    assert parse_layers("3-5,8", 10) == [3, 4, 5, 8]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers(None, 30) == list(range(3, 28))
    for spec, message in [("", "empty"), ([], "empty"), ("4-x", "bad layer spec"), ("2,40", "out of range")]:
        with pytest.raises(ValueError, match=message):
            parse_layers(spec, 30)
    with pytest.raises(ValueError, match="keep ratios"):
        CoreConfig(beta=[0.5, 0.6], layers="1-3").keep(4)
