"""Batched prefill: sequences prefilled together in one left-padded forward move into the decode batch
and decode exactly as each one alone (its own core set, its positions from 0, padding unseen)."""

import pytest
import torch
from test_batching import CONFIGS, QUARTER, alone, model_of

from coreinfer.engine.batching import DecodeBatch, prefill_group, prefill_one
from coreinfer.engine.generate import GenerationConfig
from coreinfer.engine.session import make_policy

PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 2, 33, 12, 70], [7, 21, 64], [40, 41, 8, 8, 3]]  # unequal: padding


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("core", [None, QUARTER], ids=["dense", "core"])
def test_group_prefill_decodes_as_alone(family, core):
    model = model_of(family)
    policy = make_policy(core, model)
    session, logits, selection, stats = prefill_group(model, PROMPTS, policy)
    batch = DecodeBatch(model, 4)
    gen = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    rows = [batch.add(session, logits, gen, set(), selection, seq=b) for b in range(len(PROMPTS))]
    tokens = {row: [token] for row, token in rows}
    steps = {row: [] for row, _ in rows}
    for _ in range(4):
        for (row, token), row_logits in zip(batch.step(), batch.logits):
            tokens[row].append(token)
            steps[row].append(row_logits)
    for b, (row, _) in enumerate(rows):
        _, first, one_selection, one_stats = prefill_one(model, PROMPTS[b], policy)
        assert torch.allclose(logits[b], first[0], atol=1e-4), float((logits[b] - first[0]).abs().max())
        if core is not None:  # the same core set as alone: padding did not vote
            assert all(torch.equal(ix[b].sort().values, one_selection.index[l][0].sort().values)
                       for l, ix in selection.index.items())
            assert stats[b].core_sizes == one_stats.core_sizes
        err = (torch.stack(steps[row]) - alone(model, PROMPTS[b], core, tokens[row])).abs().max().item()
        print(family, b, "max |batched - alone|", err)
        assert err < 1e-4
