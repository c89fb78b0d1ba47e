"""Continuous batching: sequences that join and leave a running batch decode exactly as they would alone,
whichever FFN path (per-sequence core rows or masked dense) the batch takes, and the path is chosen by bytes."""

import pytest
import torch
import transformers

from coreinfer.engine.batching import DecodeBatch, core_bytes, prefill_one
from coreinfer.engine.generate import GenerationConfig, decode
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.quant import quantize_model
from coreinfer.engine.session import Session, make_policy
from oracle import hf_pair

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                                    layer_types=["sliding_attention", "full_attention"] * 2),
    "opt": lambda: transformers.OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                                          num_attention_heads=4, max_position_embeddings=1024, dropout=0.0),
}
QUARTER = CoreConfig(beta=0.25, layers="1-2")  # k = 24 of F = 96: compact reads less up to 3 rows
# (prompt, core, max_new_tokens, step at which it joins the batch)
SEQS = [([5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], QUARTER, 6, 0),
        ([7, 21, 64], None, 3, 0),  # dense: all-ones mask
        ([40, 41, 8, 8, 3], QUARTER, 9, 1),
        ([11, 90, 23, 6, 50, 2], CoreConfig(beta=0.5, layers="1-3"), 5, 2),  # another k: masked only
        ([30, 1, 77, 5], QUARTER, 4, 5)]  # joins after the first ones left


def model_of(family="llama"):
    return hf_pair(CONFIGS[family]())[1]


def alone(model, prompt, core, tokens) -> torch.Tensor:
    """Logits [len(tokens) - 1, V] of a B=1 session (compacted, as `generate` runs it) fed `tokens`."""
    session = Session(model, [prompt], len(tokens), policy=make_policy(core, model))
    session.prefill()
    return torch.stack([session.step(torch.tensor([t]))[0] for t in tokens[:-1]])


def run_batch(model, seqs, ffn_path="auto", capacity=4):
    """Add each sequence at its step, step until all are done; returns per sequence its generated
    tokens and step logits, the FFN paths seen per batch size, and the cache lengths seen."""
    batch = DecodeBatch(model, capacity, ffn_path)
    rows, tokens, logits, paths, cache_lens = {}, {}, {}, {}, set()
    step, waiting = 0, list(range(len(seqs)))
    while waiting or len(batch):
        for s in [s for s in waiting if seqs[s][3] <= step and len(batch) < capacity]:
            prompt, core, max_new, _ = seqs[s]
            session, first, selection, _ = prefill_one(model, prompt, make_policy(core, model))
            row, token = batch.add(session, first, GenerationConfig(max_new_tokens=max_new, ignore_eos=True),
                                   set(), selection)
            rows[row], tokens[s], logits[s] = s, [token], []
            waiting.remove(s)
            if row.done:
                batch.remove(row)
        if len(batch):
            paths.setdefault(len(batch), set()).update(batch.paths.values())
            cache_lens.add(batch.cache_len)
            for (row, token), row_logits in zip(batch.step(), batch.logits):
                tokens[rows[row]].append(token)
                logits[rows[row]].append(row_logits)
                if row.done:
                    batch.remove(row)
        step += 1
    assert len(batch) == 0 and batch.cache_len in (0, 256)  # an idle batch holds no grown cache
    return tokens, {s: torch.stack(v) for s, v in logits.items() if v}, paths, cache_lens


@pytest.mark.parametrize("family, ffn_path", [(f, "auto") for f in CONFIGS] + [("llama", "masked"),
                                                                            ("llama", "compact")])
def test_rows_join_and_leave_and_decode_as_alone(family, ffn_path):
    model = model_of(family)
    tokens, logits, paths, _ = run_batch(model, SEQS, ffn_path)
    for s, (prompt, core, max_new, _) in enumerate(SEQS):
        assert len(tokens[s]) == max_new
        ref = alone(model, prompt, core, tokens[s])
        err = (logits[s] - ref).abs().max().item()
        print(f"{family} {ffn_path} seq{s}: max|batch-alone| {err:.2e} over {len(ref)} steps")
        assert err < 1e-5
        # greedy: each token is the argmax of the logits alone (the first comes from the prefill)
        assert tokens[s][1:] == ref.argmax(-1).tolist()
    if ffn_path == "auto":  # 2 rows: compact while both keep 24 rows, masked beside the dense one
        assert paths == {1: {"compact"}, 2: {"compact", "masked"}, 3: {"masked"}}


def test_path_chosen_by_bytes():
    """k = F/4: per-sequence rows read less up to 3 sequences, masked dense from 4; mixed k is masked;
    dense rows alone run dense; the step's bytes are counted per path."""
    model = model_of()
    ffns, dense = model.ffns(), model.weight_bytes()
    batch = DecodeBatch(model, 8)
    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    rows = []
    for n in range(1, 6):
        session, logits, selection, stats = prefill_one(model, [3 + n, 9, 27], make_policy(QUARTER, model))
        rows.append(batch.add(session, logits, gen, set(), selection)[0])
        assert stats.core_sizes == {1: 24, 2: 24} and stats.bytes_core == round(core_bytes(model.ffns(), model.weight_bytes(), stats.core_sizes))
        compact = n * 24 < 96
        assert batch.paths == {1: "compact", 2: "compact"} if compact else {1: "masked", 2: "masked"}
        read = n * 24 / 96 if compact else 1.0
        assert batch.step_bytes == pytest.approx(dense - sum(ffns[l].neuron_bytes() * (1 - read) for l in (1, 2)))
        assert batch.layer_paths == {"dense": 2, "compact" if compact else "masked": 2}
    for row in rows:
        batch.remove(row)
    session, logits, selection, stats = prefill_one(model, [1, 2, 3], None)
    assert selection is None and stats is None
    row, _ = batch.add(session, logits, gen, set(), None)
    assert batch.paths == {} and batch.step_bytes == dense
    batch.step()
    assert row.stats.steps == 1 and row.stats.bytes_per_token == dense and row.stats.layers == {"dense": 4}


def test_cache_grows_for_a_long_row_that_joins_later():
    """A row needing more cache slots than the batch holds makes it grow without disturbing the others."""
    model = model_of()
    long = [(7 * i) % 97 for i in range(250)]
    seqs = [([5, 17, 3], QUARTER, 12, 0), (long, QUARTER, 10, 4)]  # 256 slots, then 260
    tokens, logits, _, cache_lens = run_batch(model, seqs, capacity=2)
    assert cache_lens == {256, 512}
    for s, (prompt, core, max_new, _) in enumerate(seqs):
        err = (logits[s] - alone(model, prompt, core, tokens[s])).abs().max().item()
        print(f"seq{s}: max|batch-alone| {err:.2e}")
        assert len(tokens[s]) == max_new and err < 1e-5


def test_sampling_rows_draw_as_alone():
    """Seeded sampling with top-k, top-p and a repetition penalty: each row draws what `decode` draws alone."""
    model = model_of()
    gens = [GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=s, ignore_eos=True,
                             repetition_penalty=1.3) for s in (1, 2)]
    prompts = [[5, 17, 3, 88], [7, 21, 64, 9, 9]]
    want = [torch.stack(list(decode(Session(model, [p], 12, policy=make_policy(QUARTER, model)), g, set()))).flatten()
            .tolist() for p, g in zip(prompts, gens)]
    batch = DecodeBatch(model, 2)
    got = {}
    for p, g in zip(prompts, gens):
        session, logits, selection, _ = prefill_one(model, p, make_policy(QUARTER, model))
        row, token = batch.add(session, logits, g, set(), selection)
        got[row] = [token]
    while len(batch):
        for row, token in batch.step():
            got[row].append(token)
            if row.done:
                batch.remove(row)
    assert list(got.values()) == want


def test_bad_use_is_refused():
    model = model_of()
    with pytest.raises(ValueError, match="capacity"):
        DecodeBatch(model, 0)
    with pytest.raises(ValueError, match="ffn_path"):
        DecodeBatch(model, 2, "sparse")
    batch = DecodeBatch(model, 1)
    with pytest.raises(ValueError, match="live rows"):
        batch.step()
    session, logits, _, _ = prefill_one(model, [1, 2], None)
    batch.add(session, logits, GenerationConfig(max_new_tokens=3), set())
    with pytest.raises(ValueError, match="free row"):
        batch.add(session, logits, GenerationConfig(max_new_tokens=3), set())
    # drift re-chooses a sequence's core set after its prefill, which is not batched (yet): said, not ignored
    with pytest.raises(ValueError, match="drift"):
        prefill_one(model, [1, 2], make_policy(CoreConfig(beta=0.5, layers="1-2", drift_period=4), model))


PROFILE = CoreConfig(beta=1.0, layers="1-2", refine=0.5, input_keep=0.75)  # as calibrated: the whole FFN, per token
PLANNED = [(SEQS[0][0], PROFILE, 6, 0),
           (SEQS[1][0], None, 3, 0),
           (SEQS[2][0], PROFILE, 9, 1),  # shares the first's layers: whole-FFN supersets do not depend on the prompt
           (SEQS[3][0], CoreConfig(beta=0.5, layers="1-3", refine=0.25), 5, 2),  # a gathered superset of its own
           (SEQS[4][0], QUARTER, 4, 5)]  # a plain core set beside planned rows


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_per_token_plans_decode_in_the_batch_as_alone(weights):
    model = model_of()
    if weights == "int8":
        quantize_model(model)
    tokens, logits, paths, _ = run_batch(model, PLANNED)
    for s, (prompt, core, max_new, _) in enumerate(PLANNED):
        ref = alone(model, prompt, core, tokens[s])
        err = (logits[s] - ref).abs().max().item()
        print(f"{weights} seq{s}: max|batch-alone| {err:.2e} over {len(ref)} steps")
        # a plain core set runs masked over the dense int8 layer in the batch and compacted alone: the
        # int8 GEMV sums another width in another order (measured 2e-3); every planned row is exact
        assert len(tokens[s]) == max_new and err < (1e-2 if weights == "int8" and core is QUARTER else 1e-4)
        assert tokens[s][1:] == ref.argmax(-1).tolist()
    assert all("plan" in p for p in paths.values())
    # a planned row reports the bytes a session alone reads
    session, first, selection, stats = prefill_one(model, PLANNED[0][0], make_policy(PROFILE, model))
    solo = Session(model, [PLANNED[0][0]], 2, policy=make_policy(PROFILE, model))
    solo.prefill()
    assert stats.bytes_core == solo.stats.bytes_core
