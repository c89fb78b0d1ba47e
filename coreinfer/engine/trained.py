"""A trained neuron predictor (Deja Vu style): per sparse layer, a small MLP on the FFN input that
scores each neuron for the current token, trained on calibration tokens against the oracle's top set.

    net(x) = relu(x A + s) B + p        x [N, d], A [d, h], s [h], B [h, F], p [F] -> logits [N, F]

Labels: per token, the top `label_keep` share of the FFN width by |a_i| * ||down_i|| (the oracle's
set, engine/predictor.py); loss: binary cross-entropy on those labels, each neuron's term weighted
by 1 + its share of the token's oracle score, so the misses that cost most output cost most loss.
The trained net is engine/predictor.py's scorer "trained" (`PredictPlan("trained", ..., factors)`);
it reads h (d + F) + h + F values a token, held and counted in fp32.

The factors use predictor.py's naming: `*_a` are shared by every sequence, `*_b` are gathered to
each sequence's superset along their last (neuron) dimension.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .selection import keep_count


@dataclass(frozen=True)
class TrainConfig:
    """The predictor's hidden width and how it is trained (CPU, full fp32, Adam on minibatches)."""

    hidden: int = 32  # recall saturates: 0.74-0.76 at h 32 (2.6% of a SmolLM2 layer), 0.76-0.77 at h 512 (docs/quality.md)
    label_keep: float = 0.6  # the share of the FFN width labelled "in the top set"
    steps: int = 300
    batch: int = 512
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        if self.hidden < 1 or self.steps < 1 or self.batch < 1 or not 0 < self.label_keep < 1:
            raise ValueError(f"a trained predictor needs hidden, steps, batch >= 1 and a label keep in (0, 1), "
                             f"got {self}")


@torch.inference_mode()
def oracle_scores(ffn, x: torch.Tensor) -> torch.Tensor:
    """|a_i| * ||down_i|| [N, F] for the FFN inputs x [N, d]."""
    return ffn.activations(x.float()).abs() * ffn.down.float().norm(dim=1)


def random_predictor(d: int, width: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An untrained net of the trained predictor's shape (Kaiming-uniform, as nn.Linear)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(d, hidden, generator=g) * 2 - 1) / d ** 0.5
    b = (torch.rand(hidden, width, generator=g) * 2 - 1) / hidden ** 0.5
    return {"net_a": a, "shift_a": torch.zeros(hidden), "net_b": b, "prior_b": torch.zeros(width)}


def logits(factors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The net's scores [..., F] for x [..., d]."""
    hidden = torch.relu(x @ factors["net_a"] + factors["shift_a"])
    return hidden @ factors["net_b"] + factors["prior_b"]


def train_predictor(ffn, x: torch.Tensor, config: TrainConfig = TrainConfig()) -> dict[str, torch.Tensor]:
    """Train one layer's net on its FFN inputs x [N, d] -> factors (predictor.py's "trained" scorer)."""
    x = x.float()
    scores = oracle_scores(ffn, x)  # [N, F]
    n, width = scores.shape
    top = scores.topk(keep_count(config.label_keep, width), dim=1).indices
    labels = torch.zeros_like(scores).scatter_(1, top, 1.0)  # [N, F]
    weights = 1 + scores / scores.sum(1, keepdim=True).clamp_min(1e-30) * width  # mean 2 per token
    params = {k: v.clone().requires_grad_() for k, v in random_predictor(x.shape[1], width, config.hidden,
                                                                         config.seed).items()}
    with torch.no_grad():  # start from each neuron's base rate, so early steps learn the token's part
        rate = labels.mean(0).clamp(1e-3, 1 - 1e-3)
        params["prior_b"].copy_(torch.log(rate / (1 - rate)))
    opt = torch.optim.Adam(params.values(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        rows = torch.randint(n, (min(config.batch, n),), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(params, x[rows]), labels[rows],
                                                                    weight=weights[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().contiguous() for k, v in params.items()}


def train_predictors(ffns, inputs: dict[int, torch.Tensor],
                     config: TrainConfig = TrainConfig()) -> dict[int, dict[str, torch.Tensor]]:
    """Train every layer in `inputs` (layer id -> x [N, d]) with a progress bar."""
    return {l: train_predictor(ffns[l], x, config) for l, x in tqdm(inputs.items(), desc="training predictors",
                                                                    leave=False)}


def predictor_bytes(factors: dict[str, torch.Tensor]) -> int:
    """Bytes one token reads of the net over the whole FFN width."""
    return sum(t.nbytes for t in factors.values())
