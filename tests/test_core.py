"""The core engine: compacted decoding equals the masked-dense model in every family's sparse path;
keep 1.0 equals dense; the teacher-forced scorer equals step-by-step sparse decoding; prefill
observes only what the policy needs; config errors are clear."""

import pytest
import torch
import transformers

from coreinfer.engine.compact import CoreWeights
from coreinfer.engine.policy import CoreConfig, Selection, parse_layers
from coreinfer.engine.selection import core_neurons
from coreinfer.engine.session import Session, stability_policy
from coreinfer.eval.scoring import continuation_logprobs
from oracle import compacted_vs_masked, hf_pair, masked_dense_logits, our_logits

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
GEMMA = dict(TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])
OPT = dict(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4,
           max_position_embeddings=128, dropout=0.0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "gemma3": lambda: transformers.Gemma3TextConfig(**GEMMA),  # GeGLU, post-FFN norm
    "opt": lambda: transformers.OPTConfig(**OPT),  # ReLU, up bias, down bias
}
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64]]
CONTS = [[11, 4, 90, 23, 6], [50, 8, 19, 70, 2]]
CORE = CoreConfig(alpha=0.4, beta=0.5, layers="1-2")


def model_of(family="llama"):
    return hf_pair(CONFIGS[family]())[1]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_compacted_decode_equals_masked_dense_in_batch(family):
    model = model_of(family)
    errs, changes, session = compacted_vs_masked(model, PROMPTS, CONTS, stability_policy(CORE, model))
    print(f"{family}: max|compact-masked| {errs}; max|compact-dense| {changes}")
    assert max(errs) < 1e-5
    assert min(changes) > 1e-3  # the core set really changed the decode
    # each sequence chose its own set from its own prompt
    index = session.selection.index
    assert not torch.equal(index[1][0], index[1][1])


def test_selection_from_running_statistics_equals_full_activations():
    """Chunked prefill with running [B, F] statistics picks the same sets as selecting from each
    prompt's whole activation matrix [T, F]."""
    model = model_of()
    acts = {}

    class Record:
        valid = None

        def __contains__(self, layer):
            return True

        def __call__(self, layer, a):
            acts.setdefault(layer, []).append(a)

    for statistic in ("frequency", "norm"):
        core = CoreConfig(alpha=0.3, beta=0.4, statistic=statistic, layers="all")
        session = Session(model, PROMPTS, 1, policy=stability_policy(core, model), prefill_chunk=4)
        session.prefill()
        acts.clear()
        Session(model, PROMPTS, 1).prefill(observer=Record())
        for layer, ids in session.selection.index.items():
            a = torch.cat(acts[layer], 1)  # [B, T0, F]
            for b, p in enumerate(PROMPTS):
                ref = core_neurons(a[b, -len(p):], core.alpha, core.beta, statistic, "abs")
                assert torch.equal(ids[b], ref), (statistic, layer, b)


def test_keep_one_equals_dense():
    model = model_of()
    full, _ = our_logits(model, PROMPTS, CONTS, policy=stability_policy(CoreConfig(beta=1.0, layers="all"), model))
    dense, _ = our_logits(model, PROMPTS, CONTS)
    err = max((f - d).abs().max().item() for f, d in zip(full, dense))
    print(f"keep 1.0 vs dense: {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("core", [None, CORE, CoreConfig(beta=0.3, statistic="norm", layers="all")])
def test_teacher_forced_scorer_equals_stepwise_decode(core):
    model = model_of()
    scored = continuation_logprobs(model, PROMPTS, CONTS, core)
    stepwise, _ = our_logits(model, PROMPTS, CONTS, policy=core and stability_policy(core, model))
    for b, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        ref = stepwise[b][len(p) - 1:-1].log_softmax(-1).gather(1, torch.tensor(c)[:, None])[:, 0]
        err = (scored[b] - ref).abs().max().item()
        print(f"scorer vs stepwise seq{b}: {err:.2e}")
        assert err < 1e-5


def test_refresh_recompacts_mid_decode():
    """refresh() swaps the core rows without a new prefill: later steps equal masked-dense decoding
    with the new set."""
    model = model_of()
    p, c = PROMPTS[0], CONTS[0]
    session = Session(model, [p], len(c), policy=stability_policy(CORE, model))
    session.prefill()
    other = {l: torch.arange(0, 96, 2)[None] for l in session.selection.index}  # [1, 48]: even neurons
    stats = session.refresh(Selection(other))
    assert stats.core_sizes == {1: 48, 2: 48}
    got = torch.cat([session.step(torch.tensor([t])) for t in c])
    ref = masked_dense_logits(model, p, c, {l: ix[0] for l, ix in other.items()})[-len(c):]
    assert (got - ref).abs().max().item() < 1e-5


def test_stats_count_each_sequences_rows_and_clear_frees():
    model = model_of()
    cores = CoreWeights()
    one = Session(model, [PROMPTS[0]], 1, policy=stability_policy(CORE, model), cores=cores)
    one.prefill()
    two = Session(model, PROMPTS, 1, policy=stability_policy(CORE, model), cores=cores)
    two.prefill()
    ffn = model.ffns()[1]
    neuron = ffn.neuron_bytes() // ffn.width  # up, gate and down rows of one neuron, fp32
    assert neuron == 3 * 64 * 4
    assert one.stats.bytes_dense == model.weight_bytes() == two.stats.bytes_dense
    # 2 layers of 96 neurons -> 48 each; each sequence reads its own 48
    assert one.stats.bytes_dense - one.stats.bytes_core == 2 * 48 * neuron
    assert two.stats.bytes_core - one.stats.bytes_core == 2 * 48 * neuron
    assert two.stats.per_sequence == two.stats.bytes_core / 2
    assert cores.layers[1].nbytes() == 2 * 48 * neuron
    cores.clear()
    assert not cores.layers


def test_prefill_logits_last_position_only():
    model = model_of()
    session = Session(model, PROMPTS, 1)
    last = session.prefill()
    full, _ = our_logits(model, PROMPTS, [[1], [1]])
    assert last.shape == (2, 97)
    assert torch.allclose(last, torch.stack([f[len(p) - 1] for f, p in zip(full, PROMPTS)]), atol=1e-5)


def test_one_token_prompt():
    model = model_of()
    logits, session = our_logits(model, [[42]], [[3, 4]], policy=stability_policy(CORE, model))
    assert logits[0].shape == (3, 97)
    assert session.stats.core_sizes == {1: 48, 2: 48}


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(beta=0.0), "beta"), (dict(beta=1.2), "beta"),
    (dict(statistic="mean"), "statistic"), (dict(ranking="up"), "ranking"), (dict(mode="x"), "mode"),
    (dict(mode="similarity"), "cluster file"),
])
def test_bad_core_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoreConfig(**kwargs)


def test_session_limits():
    model = model_of()
    with pytest.raises(ValueError, match="context"):
        Session(model, [[1] * 100], 29)
    session = Session(model, [[1, 2]], 1)
    session.prefill()
    session.step(torch.tensor([3]))
    with pytest.raises(ValueError, match="sized for 1 new tokens"):
        session.step(torch.tensor([3]))


def test_layer_specs():
    assert parse_layers("3-5,8", 10) == [3, 4, 5, 8]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers(None, 30) == list(range(3, 28))
    for spec, message in [("", "empty"), ([], "empty"), ("4-x", "bad layer spec"), ("2,40", "out of range")]:
        with pytest.raises(ValueError, match=message):
            parse_layers(spec, 30)
    with pytest.raises(ValueError, match="keep ratios"):
        CoreConfig(beta=[0.5, 0.6], layers="1-3").keep(4)
