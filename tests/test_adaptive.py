"""Adaptive core neurons (engine/adaptive.py): per-token refinement and input sparsity against masked
dense math, bytes counted as read, and drift checks that refresh a core set mid-decode."""

import pytest
import torch

from coreinfer.api import LLM
from coreinfer.engine.adaptive import AdaptiveFFN, AdaptivePolicy, DriftPolicy, Plan
from coreinfer.engine.policy import CoreConfig, Selection, StabilityPolicy
from coreinfer.engine.selection import keep_count, rank_neurons
from coreinfer.engine.session import Session, stability_policy


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), progress=False)


def masked_ffn(ffn, x, superset, down_rows, input_keep):
    """Oracle from the dense FFN: zero x's entries outside each token's top |x_j| * ||W[:, j]|| (norms
    over the superset's gate/up rows), then keep each token's top down_rows superset neurons by
    |a_i| * ||down_i||. x [T, d], superset [k] -> [T, d]."""
    w_in = torch.cat([ffn.up[superset], ffn.gate[superset]])  # [2k, d]
    d_in = keep_count(input_keep, x.shape[-1])
    col = (x.abs() * w_in.norm(dim=0)).topk(d_in, dim=-1).indices
    x = x * torch.zeros_like(x).scatter_(-1, col, 1.0)
    a = ffn.activations(x[None])[0]  # [T, F]
    score = torch.full_like(a, -1.0)
    score[:, superset] = (a[:, superset] * ffn.down[superset].norm(dim=1)).abs()
    keep = torch.zeros_like(a).scatter_(-1, score.topk(down_rows, dim=-1).indices, 1.0)
    return ffn.project((a * keep)[None])[0]


@pytest.mark.parametrize("plan", [Plan(16), Plan(48, 0.5), Plan(None, 0.25), Plan(1, 1.0)], ids=str)
def test_fast_path_equals_reference_and_masked_dense(tiny, plan):
    ffn = tiny.model.ffns()[1]
    torch.manual_seed(0)
    index = torch.stack([torch.randperm(ffn.width)[:64].sort().values for _ in range(2)])  # [B=2, k=64]
    core = AdaptiveFFN(plan)
    core.load(ffn, index)
    x = torch.randn(2, 1, ffn.up.shape[1])
    with torch.inference_mode():
        fast, ref = core(x), core.reference(x)
        oracle = torch.stack([masked_ffn(ffn, x[b], index[b], plan.down_rows or 64, plan.input_keep) for b in range(2)])
    print(f"{plan}: max|fast-ref| {(fast - ref).abs().max():.2e}, max|ref-oracle| {(ref - oracle).abs().max():.2e}")
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(ref, oracle, atol=1e-5)


def test_bytes_count_the_rows_read(tiny):
    ffn = tiny.model.ffns()[1]
    index = torch.arange(64)[None]  # one sequence, k = 64 of F = 128
    row = ffn.up[0].nbytes  # one row of up, gate or down
    core = AdaptiveFFN(Plan(16, 0.5))
    core.load(ffn, index)
    assert core.nbytes() == 2 * 64 * row // 2 + 16 * row  # half the columns of gate/up, 16 down rows
    plain = AdaptiveFFN(Plan())
    plain.load(ffn, index)
    assert plain.nbytes() == 3 * 64 * row


def test_decode_steps_equal_teacher_forced_scoring(tiny):
    # decode steps take the row-reading path, teacher forcing the reference: the same numbers
    model, encode = tiny.model, tiny.tokenizer.encode
    width = model.ffns()[0].width
    policy = AdaptivePolicy(stability_policy(CoreConfig(beta=0.75, layers="all"), model),
                            {l: Plan(keep_count(0.4, width), 0.5) for l in range(4)})
    prompt, cont = encode("The history of the printing press"), encode(" begins in the fifteenth century")
    scored = Session(model, [prompt], len(cont), policy=policy).score([cont])[0]
    session = Session(model, [prompt], len(cont), policy=policy)
    rows = [session.prefill()] + [session.step(torch.tensor([t])) for t in cont[:-1]]
    assert isinstance(session.cores.get(0), AdaptiveFFN)
    err = (torch.cat(rows) - scored).abs().max().item()
    print(f"stepwise vs teacher-forced: {err:.2e}")
    assert err < 1e-4
    share = session.stats.bytes_core / session.stats.bytes_dense
    assert share < 1 and session.decode_bytes == len(cont[:-1]) * session.stats.bytes_core


class WorstPolicy(StabilityPolicy):
    """A hand-made drift: the prompt's *least* active neurons, so the first check must find them wrong."""

    def select(self, stats):
        return Selection({l: rank_neurons(-stats[l].primary, -stats[l].secondary, keep_count(b, self.width))
                          for l, b in self.keep.items()})


def test_drift_check_refreshes_a_set_that_does_not_fit(tiny):
    model, encode = tiny.model, tiny.tokenizer.encode
    base = stability_policy(CoreConfig(beta=0.5, layers="all", statistic="norm"), model)
    worst = WorstPolicy(base.keep, base.width, base.spec)
    prompt, cont = encode("The capital of France is Paris."), encode(" The capital of Italy is Rome.")
    for threshold, refreshes in ((0.7, 1), (0.0, 0)):
        policy = DriftPolicy(worst, period=3, threshold=threshold, rate=1.0)
        session = Session(model, [prompt], len(cont), policy=policy)
        session.prefill()
        before = {l: ids.clone() for l, ids in session.selection.index.items()}
        for t in cont[:3]:
            session.step(torch.tensor([t]))
        print(f"threshold {threshold}: coverage {policy.last_coverage.tolist()}, refreshes {session.refreshes}")
        assert session.checks == policy.checks == 1 and session.refreshes == policy.refreshes == refreshes
        assert policy.last_coverage.item() < 0.5  # the worst half of the neurons holds little
        changed = any(not torch.equal(before[l], ids) for l, ids in session.selection.index.items())
        assert changed == bool(refreshes)
        if refreshes:  # rate 1: the new set is the checked token's own top neurons, and it is compacted
            layer = 2
            primary, secondary = policy.scores[layer]
            ids = session.selection.index[layer]
            assert torch.equal(ids, rank_neurons(primary, secondary, ids.shape[1]))
            assert torch.equal(session.cores.get(layer).weights["up"][0], model.ffns()[layer].up.detach()[ids[0]])
        # 2 compacted steps + 1 dense check step (a refresh keeps the sizes, so the same bytes)
        assert session.decode_bytes == 2 * session.stats.bytes_core + session.dense_bytes


@pytest.mark.parametrize("make, message", [
    (lambda: Plan(0), "down rows"), (lambda: Plan(4, 1.5), "input keep"),
    (lambda: DriftPolicy(None, 0, 0.5), "period"), (lambda: DriftPolicy(None, 4, 1.2), "threshold"),
])
def test_bad_settings_fail_with_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
