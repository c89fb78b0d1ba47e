"""Scoring helpers for evaluation results; pure functions, no model.

Multiple-choice accuracy follows lm-evaluation-harness: ``acc`` picks the
choice with the highest log-likelihood, ``acc_norm`` the highest
log-likelihood per character of the choice string. Standard errors are the
sample standard deviation over items divided by sqrt(n), as lm-eval reports.
Answer normalisation is the official SQuAD one.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN stderr for fewer than two values)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _argmax(scores: Sequence[float]) -> int:
    """Index of the largest score; the first one on ties, like numpy.argmax."""
    return max(range(len(scores)), key=scores.__getitem__)


def mc_accuracy(
    loglikelihoods: Sequence[Sequence[float]],
    choices: Sequence[Sequence[str]],
    labels: Sequence[int],
) -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` with standard errors.

    ``loglikelihoods[i][j]`` is the summed log-likelihood of choice ``j`` of
    item ``i``; ``choices[i][j]`` is the string whose character count
    normalises it for ``acc_norm``. For lm-eval parity pass
    :attr:`MCItem.norm_texts`, which drops the target delimiter (and uses the
    contexts for Winogrande) exactly as lm-eval does.

    Returns ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr`` and ``n``.
    """
    if not len(loglikelihoods) == len(choices) == len(labels):
        raise ValueError("loglikelihoods, choices and labels must have one entry per item")
    hits, norm_hits = [], []
    for lls, texts, label in zip(loglikelihoods, choices, labels):
        if len(lls) != len(texts):
            raise ValueError(f"{len(lls)} log-likelihoods for {len(texts)} choices")
        if any(len(text) == 0 for text in texts):
            raise ValueError("acc_norm is undefined for an empty choice string")
        hits.append(float(_argmax(lls) == label))
        norm_hits.append(float(_argmax([ll / len(t) for ll, t in zip(lls, texts)]) == label))
    acc, acc_stderr = mean_and_stderr(hits)
    acc_norm, acc_norm_stderr = mean_and_stderr(norm_hits)
    return {
        "acc": acc,
        "acc_stderr": acc_stderr,
        "acc_norm": acc_norm,
        "acc_norm_stderr": acc_norm_stderr,
        "n": len(hits),
    }


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _require(answers: Sequence[str]) -> None:
    if not answers:
        raise ValueError("no gold answers")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the stripped prediction equals any stripped answer (e.g. LAMBADA's last word)."""
    _require(answers)
    return float(any(prediction.strip() == answer.strip() for answer in answers))


def normalized_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals any answer after SQuAD normalisation (TriviaQA, NQ, SQuAD)."""
    _require(answers)
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(answer) for answer in answers))


def _token_f1(prediction: str, answer: str) -> float:
    guess, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not guess or not gold:
        # An empty answer only matches an empty prediction (SQuAD v2 convention).
        return float(guess == gold)
    common = sum((Counter(guess) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of the prediction against its best-matching answer."""
    _require(answers)
    return max(_token_f1(prediction, answer) for answer in answers)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per token."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return math.exp(nll_sum / n_tokens)


def ratio_and_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """Pooled ratio sum(num) / sum(den) over items (e.g. mean NLL per token over documents) and its
    standard error by the delta method (NaN for fewer than two items)."""
    n = len(numerators)
    if n == 0 or n != len(denominators):
        raise ValueError("give one numerator and one denominator per item, at least one item")
    total = sum(denominators)
    if total <= 0:
        raise ValueError("the denominators must sum to a positive number")
    ratio = sum(numerators) / total
    if n < 2:
        return ratio, math.nan
    residuals = [x - ratio * d for x, d in zip(numerators, denominators)]
    variance = sum(r * r for r in residuals) / (n - 1)
    return ratio, math.sqrt(variance / n) / (total / n)
