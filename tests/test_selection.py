"""Selection math on hand-made activation matrices whose answers are worked out by hand."""

import pytest
import torch

from coreinfer.engine.selection import core_neurons, frequency_core, keep_count, norm_core, overlap, token_core

# 3 tokens x 5 neurons. |a| per token: t0 ranks n1 > n3 > n0 ..., t1: n1 > n4 > ..., t2: n3 > n1 > ...
A = torch.tensor([
    [0.5, -4.0, 0.1, 3.0, 0.0],
    [0.2, 5.0, -0.3, 0.0, -2.0],
    [-0.1, 1.0, 0.0, -6.0, 0.4],
])


def ids(mask_row):
    return torch.nonzero(mask_row).flatten().tolist()


def test_token_core_abs_keeps_large_negatives():
    m = token_core(A, alpha=0.4, ranking="abs")  # 2 of 5 per token
    assert [ids(r) for r in m] == [[1, 3], [1, 4], [1, 3]]


def test_token_core_signed_drops_negatives():
    m = token_core(A, alpha=0.4, ranking="signed")
    assert [ids(r) for r in m] == [[0, 3], [0, 1], [1, 4]]


def test_token_core_relu_takes_a_fraction_of_the_positive_ones():
    # positives: t0 {0, 2, 3} -> round(0.5*3)=2 -> {3, 0}; t1 {0, 1} -> 1 -> {1}; t2 {1, 4} -> 1 -> {1}
    m = token_core(A, alpha=0.5, ranking="relu")
    assert [ids(r) for r in m] == [[0, 3], [1], [1]]


def test_frequency_counts_tokens_and_breaks_ties_by_mean_abs():
    # abs, alpha 0.4: counts n0 0, n1 3, n2 0, n3 2, n4 1 -> top 2 = {1, 3}
    assert frequency_core(A, 0.4, beta=0.4).tolist() == [1, 3]
    # top 3 adds n4 (count 1)
    assert frequency_core(A, 0.4, beta=0.6).tolist() == [1, 3, 4]
    # top 4: n0 and n2 tie at count 0; mean|a| n0 = 0.267 > n2 = 0.133 -> n0
    assert frequency_core(A, 0.4, beta=0.8).tolist() == [0, 1, 3, 4]


def test_signed_ranking_changes_the_sentence_set():
    # signed, alpha 0.4: counts n0 2, n1 2, n3 1, n4 1; top 2 = {0, 1}
    assert frequency_core(A, 0.4, beta=0.4, ranking="signed").tolist() == [0, 1]


def test_norm_statistic_by_hand():
    a = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    # rows normalised: [0.6, 0.8, 0], [0, 0, 1]; column norms 0.6, 0.8, 1.0
    assert norm_core(a, beta=0.34).tolist() == [2]
    assert norm_core(a, beta=0.67).tolist() == [1, 2]
    assert core_neurons(a, 0.5, 0.67, statistic="norm").tolist() == [1, 2]


def test_norm_ignores_all_zero_tokens():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert norm_core(a, beta=0.34).tolist() == [0]


def test_keep_count_and_overlap():
    assert keep_count(0.7, 1536) == 1075
    assert keep_count(0.0001, 10) == 1
    assert keep_count(1.0, 10) == 10
    assert overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6])) == 0.5


def test_bad_names():
    with pytest.raises(ValueError, match="ranking"):
        token_core(A, 0.5, ranking="max")
    with pytest.raises(ValueError, match="statistic"):
        core_neurons(A, 0.5, 0.5, statistic="mean")
