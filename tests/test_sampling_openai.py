"""OpenAI's presence/frequency penalties and logit_bias in filter_logits, against the formula of
OpenAI's docs written out by hand, token by token:

    mu[j] -> mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty + logit_bias[j]

with c[j] the number of times token j was generated so far (the prompt does not count).
"""

import torch

from coreinfer.engine.generate import GenerationConfig, filter_logits, sample


def by_hand(logits: list[float], generated: list[int], presence: float, frequency: float, bias: dict) -> list[float]:
    out = []
    for j, mu in enumerate(logits):
        c = generated.count(j)
        out.append(mu - c * frequency - (1.0 if c > 0 else 0.0) * presence + bias.get(j, 0.0))
    return out


def test_penalties_and_bias_match_the_formula():
    torch.manual_seed(0)
    V, prompt = 12, [3, 3, 7, 1]
    generated = [5, 5, 5, 2, 9, 2]
    logits = torch.randn(1, V) * 2
    gen = GenerationConfig(presence_penalty=0.7, frequency_penalty=0.4, logit_bias={4: 3.0, 5: -1.5, 11: -100.0})
    history = torch.tensor([prompt + generated])
    ours = filter_logits(logits, gen, history, prompt_len=len(prompt))
    ref = torch.tensor([by_hand(logits[0].tolist(), generated, 0.7, 0.4, gen.logit_bias)])
    print("max |ours - ref|", float((ours - ref).abs().max()))
    assert torch.allclose(ours, ref, atol=1e-6)
    # the prompt's tokens (3, 7, 1) are not penalised; a token seen 3 times loses 3 * 0.4 + 0.7
    assert ours[0, 3] == logits[0, 3] and abs(float(ours[0, 5] - logits[0, 5]) - (-1.5 - 1.9)) < 1e-6


def test_negative_penalty_and_bias_steer_greedy_choice():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    history = torch.tensor([[0, 1]])  # prompt [0], generated [1]
    assert GenerationConfig().greedy and not GenerationConfig(logit_bias={1: -100}).greedy
    assert int(sample(logits, GenerationConfig(), history, 1, None)) == 1
    assert int(sample(logits, GenerationConfig(frequency_penalty=1.5), history, 1, None)) == 2
    assert int(sample(logits, GenerationConfig(logit_bias={1: -100.0}), history, 1, None)) == 2
    assert int(sample(logits, GenerationConfig(logit_bias={3: 100.0}), history, 1, None)) == 3
