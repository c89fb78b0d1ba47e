"""Per-layer thresholds for `coreinfer calibrate` on the formats the native sparse FFN reads (engine/threshold.py).

For each refine share r, the threshold is the (1 - r) quantile of the WINA score |a_i| * ||down_i|| over
every (calibration token, neuron) pair of the layer: tokens then keep r of the down rows on average, more
where the activation spreads, fewer where it concentrates. Each candidate's error is measured with that
threshold applied, as decode applies it, on the layer's own (quantized) weights.
"""

import torch

from ..engine.profile import LayerBudget
from ..engine.threshold import neuron_rows, row_norms

SHARES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def threshold_errors(ffn, x: torch.Tensor) -> dict[LayerBudget, float]:
    """Candidate budget -> the relative error ||y' - y||^2 / ||y||^2 it adds to this FFN's output on
    x [N, d]: dense, and a threshold for each of SHARES."""
    with torch.inference_mode():
        a = ffn.activations(x).float()  # [N, F]
        y = ffn.project(a)
        energy = y.square().sum()
        score = a.abs() * row_norms(neuron_rows(ffn)["down"])  # [N, F]
        ranked = score.flatten().sort().values
        out = {LayerBudget(): 0.0}
        for r in SHARES:
            t = float(ranked[min(int(len(ranked) * (1 - r)), len(ranked) - 1)])
            kept = a * (score >= t)
            out[LayerBudget(1.0, r, 1.0, threshold=t)] = float((ffn.project(kept) - y).square().sum() / energy)
    return out
