"""The memory-limited mode on the CPU, with the "device" as an abstract target: which tensors are
resident, what each prefill and decode step moves, that the budget check says what would fit, and
that streaming FFNs and selecting inside the forward decode exactly as the ordinary session."""

import pytest
import torch
import transformers

from coreinfer.engine.offload import GiB, OffloadSession, Streamer, parse_bytes, place, plan, streamed_tensors
from coreinfer.engine.policy import CoreConfig
from coreinfer.engine.session import cache_length, stability_policy
from oracle import hf_pair, our_logits

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64]]
CONTS = [[11, 4, 90, 23, 6], [50, 8, 19, 70, 2]]
CORE = CoreConfig(alpha=0.4, beta=0.5, layers="1-3")  # layers 0 and 4 stay dense
BIG = 1 << 40
CACHE = cache_length(len(PROMPTS[0]) + 5, TINY["max_position_embeddings"])  # the sessions' cache slots


def model():
    m = hf_pair(transformers.Qwen2Config(**TINY))[1]
    place(m, "cpu")
    return m


def offload_logits(m, policy, chunk=None, budget=BIG):
    """Prefill rows and step-by-step decode rows per sequence, as oracle.our_logits, but offloaded."""
    session = OffloadSession(m, PROMPTS, 5, policy=policy, prefill_chunk=chunk, budget=budget,
                             streamer=Streamer(m, "cpu"))
    pre = session.prefill(all_logits=True)
    T0 = session.batch.prompt_len
    rows = [[pre[b, T0 - len(p):]] for b, p in enumerate(PROMPTS)]
    moved = []
    for step in range(5):
        logits = session.step(torch.tensor([c[step] for c in CONTS]))
        moved.append(session.offload.step_bytes_moved)
        for b in range(len(PROMPTS)):
            rows[b].append(logits[b:b + 1])
    return [torch.cat(r) for r in rows], session, moved


@pytest.mark.parametrize("size,expected", [("2GiB", 2 * GiB), ("1.5 GB", 1_500_000_000), ("800MiB", 800 * 2**20),
                                           ("4096", 4096), (123, 123)])
def test_parse_bytes(size, expected):
    assert parse_bytes(size) == expected


@pytest.mark.parametrize("bad", ["", "2 gigs", "-1GiB", "0"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="give a positive number with a unit"):
        parse_bytes(bad)


def test_placement_on_an_abstract_device():
    """A meta-device dry run: every weight but the FFN neurons moves; tied weights stay tied; the
    plan's resident bytes are exactly what moved."""
    m = hf_pair(transformers.LlamaConfig(**TINY, tie_word_embeddings=True))[1]
    expected = m.weight_bytes() - sum(f.neuron_bytes() for f in m.ffns())  # tied: the table counts once
    place(m, "meta")
    streamed = {id(t) for f in m.ffns() for t in streamed_tensors(f).values()}
    tensors = {id(t): t for t in list(m.parameters()) + list(m.buffers())}
    moved = [t for key, t in tensors.items() if key not in streamed]
    assert len(streamed) == 3 * len(m.layers)  # up, gate, down of each layer
    assert all(t.device.type == "cpu" for f in m.ffns() for t in streamed_tensors(f).values())
    assert all(t.device.type == "meta" for t in moved)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert sum(t.nbytes for t in moved) == plan(m, 1, 256, None, 0).resident == expected


@pytest.mark.parametrize("fit", [5, 2, 0])
def test_dense_offload_equals_dense_and_streams_what_does_not_fit(fit):
    """A dense session keeps the FFNs of as many leading layers as the budget holds and streams the
    others on every decode step."""
    m = model()
    ffn_bytes = m.ffns()[0].neuron_bytes()
    fixed = plan(m, 2, CACHE, None, 0)
    budget = int((fixed.total + fit * 2 * ffn_bytes + ffn_bytes // 2) / 0.9)  # 2 sequences: 2 copies
    ref, _ = our_logits(m, PROMPTS, CONTS)
    got, session, moved = offload_logits(m, None, budget=budget)
    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
    print(f"dense offload, {fit} FFNs resident, vs dense: max|diff| {err:.2e}; moved per step {moved}")
    assert err < 1e-5
    assert sorted(session.picked) == session.plan.dense_layers == list(range(fit))
    # one chunk: each FFN once, and the first streamed one again for the first step
    assert session.offload.prefill_bytes_moved == (5 + (fit < 5)) * ffn_bytes
    assert moved == [(5 - fit) * ffn_bytes] * 5  # every decode step streams the others again


@pytest.mark.parametrize("chunk", [None, 4])
def test_core_offload_selects_in_the_forward_and_moves_nothing_while_decoding(chunk):
    """Streaming prefill (one chunk, or chunks of 4: each chunk streams every FFN) picks the same core
    sets as the ordinary session and decodes the same logits from device-resident weights only."""
    m = model()
    policy = stability_policy(CORE, m)
    ref, ref_session = our_logits(m, PROMPTS, CONTS, policy=policy, prefill_chunk=chunk or 512)
    got, session, moved = offload_logits(m, policy, chunk)
    for layer, ids in ref_session.selection.index.items():
        assert torch.equal(session.selection.index[layer], ids)
    for layer in (0, 4):  # kept dense: resident with every neuron
        assert torch.equal(session.selection.index[layer], torch.arange(96).expand(2, -1))
    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
    print(f"core offload (chunk {chunk}) vs core session: max|diff| {err:.2e}")
    assert err < 1e-5
    chunks = 1 if chunk is None else -(-len(PROMPTS[0]) // chunk)
    assert session.offload.prefill_bytes_moved == chunks * sum(f.neuron_bytes() for f in m.ffns())
    assert moved == [0] * 5
    assert set(session.picked) == set(range(5)) and session.plan.streamed == []
    # the budget accounting matches what is held: core rows, dense layers' copies, staging, KV cache
    p = session.plan
    assert p.cores == sum(session.cores.get(l).nbytes() for l in (1, 2, 3))
    assert p.dense_ffns == sum(session.cores.get(l).nbytes() for l in (0, 4))
    assert p.staging == sum(f.neuron_bytes() for f in session.streamer.slots)
    assert p.kv_cache == sum(c.nbytes for c in session.caches)
    assert session.stats.per_sequence < session.stats.bytes_dense


def test_budget_too_small_says_what_would_fit():
    m = model()
    policy = stability_policy(CORE, m)
    need = plan(m, 2, CACHE, policy.keep, BIG)
    budget = int((need.total - need.cores // 2) / 0.9)  # room for about half the core rows
    with pytest.raises(MemoryError) as e:
        OffloadSession(m, PROMPTS, 5, policy=policy, budget=budget, streamer=Streamer(m, "cpu"))
    line = str(e.value)
    print(line)
    assert "\n" not in line and "keep <= 0.2" in line  # keep 0.5 needs twice the room
    fits = float(line.split("keep <= ")[1].split()[0])
    plan(m, 2, CACHE, {l: fits for l in policy.keep}, budget).check(budget)  # and that keep really fits
    with pytest.raises(MemoryError, match="nothing fits below"):
        OffloadSession(m, PROMPTS, 5, policy=policy, budget=need.resident, streamer=Streamer(m, "cpu"))


@pytest.mark.parametrize("kw,message", [
    (dict(max_gpu_memory="2 gigs"), "give a positive number with a unit"),
    (dict(max_gpu_memory="2GiB"), "needs --device cuda"),
])
def test_runtime_config_rejects_bad_memory_limits(kw, message):
    from coreinfer.api import RuntimeConfig

    with pytest.raises(ValueError, match=message):
        RuntimeConfig(**kw)
