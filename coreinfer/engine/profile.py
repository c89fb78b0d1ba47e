"""Calibration profiles: per-layer budgets chosen by `coreinfer calibrate`, loaded with `--profile FILE`.

A profile names, per sparse layer, the core superset's keep ratio, the down rows each token reads
(`refine`, a share of the FFN width) and the share of the input entries gate/up read
(`input_keep`); see engine/adaptive.py. It records the model it was calibrated on (the cluster
file's fingerprint) and refuses another, and what the calibration measured on held-out text.

It also holds a global prior (GLASS-style): per sparse layer, each neuron's share of the norm
statistic over the calibration text, which `PriorPolicy` fuses with a prompt's own statistic so that
neurons core across the corpus stay in every set (`--prior FILE --prior-weight W`).

The file is JSON: small, diffable, no pickle.

`find_profile` picks the profile calibrated on a model out of a few folders: what the default core
setting (`CoreConfig(profile="auto")`, resolved by api.LLM.default_core) decodes with.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adaptive import AdaptivePolicy, Plan
from .clusters import model_fingerprint, same_model
from .predictor import PredictPlan, fit_quantized
from .observe import RunningStats
from .policy import Selection, StabilityPolicy
from .selection import keep_count, rank_neurons
from .threshold import FORMATS as THRESHOLD_FORMATS
from .threshold import ThresholdPlan

FORMAT = "coreinfer.profile/1"
AUTO = "auto"  # CoreConfig.profile: the model's calibrated profile (find_profile), or dense without one


@dataclass(frozen=True)
class LayerBudget:
    """One sparse layer's budget: superset keep ratio, down rows per token, input share of gate/up;
    or, with `predict`, the share of the FFN width whose gate/up rows a token reads, chosen before
    gate and up run by a `bits`-bit copy of them (engine/predictor.py), or with `bits` 0 by the
    profile's trained net (engine/trained.py) whose own bytes are `net` of the layer's."""

    keep: float = 1.0
    refine: float | None = None
    input_keep: float = 1.0
    predict: float | None = None
    bits: int = 0
    net: float = 0.0  # a trained predictor's bytes per token, as a share of the layer's dense FFN bytes
    threshold: float | None = None  # on |a_i| * ||down_i||, read by the native op where it runs (threshold.py)

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise ValueError(f"a layer's keep ratio must be in (0, 1], got {self.keep}")
        if self.refine is not None and not 0 < self.refine <= 1:
            raise ValueError(f"a layer's refine share must be in (0, 1], got {self.refine}")
        if not 0 < self.input_keep <= 1:
            raise ValueError(f"a layer's input keep must be in (0, 1], got {self.input_keep}")
        if self.predict is not None and (not 0 < self.predict <= 1 or self.input_keep < 1
                                         or (self.bits not in (1, 2, 3, 4) if self.net == 0 else self.bits)):
            raise ValueError(f"a predicted layer reads a share in (0, 1] of its rows, scored by a 1-4 bit copy "
                             f"or a trained net, with all input entries; got predict {self.predict}, bits "
                             f"{self.bits}, net {self.net}, input keep {self.input_keep}")
        if self.threshold is not None and (self.threshold < 0 or self.refine is None or self.input_keep < 1
                                           or self.predict is not None):
            raise ValueError(f"a layer's threshold is >= 0 and comes with the refine share it keeps on average, "
                             f"all input entries and no predictor; got threshold {self.threshold}, refine "
                             f"{self.refine}, input keep {self.input_keep}, predict {self.predict}")

    def ffn_share(self, gated: bool) -> float:
        """Share of the layer's dense FFN bytes one token reads (gate, up and down equal in size; a
        predictor's copy counted at `bits` of fp32's 32 a weight, its row scales left out)."""
        rows = self.keep if self.predict is None else min(self.keep, self.predict)
        down = min(rows, self.refine) if self.refine is not None else rows
        inputs = (2 if gated else 1) * rows * self.input_keep
        scorer = 0.0 if self.predict is None else (2 if gated else 1) * self.keep * self.bits / 32
        return (inputs + down + scorer) / (3 if gated else 2) + self.net * self.keep

    def plan(self, ffn, net: dict[str, torch.Tensor] | None = None) -> Plan | PredictPlan | ThresholdPlan:
        """How the layer `ffn` decodes under this budget (`net`: the layer's trained predictor): by its
        threshold in the native op on the formats that op reads, else (float weights) by the refine
        share's top-k, or by a predictor."""
        if self.threshold is not None and ffn.format in THRESHOLD_FORMATS:
            return ThresholdPlan(self.threshold, self.refine)
        if self.predict is not None and self.net:
            if net is None:
                raise ValueError("the profile names a trained predictor it does not hold")
            return PredictPlan("trained", self.predict, self.refine, net)
        if self.predict is not None:
            return PredictPlan("quant", self.predict, self.refine, fit_quantized(ffn, self.bits), self.bits)
        return Plan(keep_count(self.refine, ffn.width) if self.refine is not None else None, self.input_keep)


@dataclass
class Profile:
    """Per sparse layer id, its LayerBudget; `info` holds what the calibration measured. No layers:
    no sparse setting met the calibration's target, and the profile decodes dense."""

    fingerprint: tuple[dict, torch.Tensor]
    layers: dict[int, LayerBudget]
    info: dict = field(default_factory=dict)
    prior: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [F], sums to 1 (see PriorPolicy)
    # layer -> trained predictor factors (engine/trained.py), saved beside the JSON (`nets_path`)
    nets: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model, layers: dict[int, LayerBudget], info: dict | None = None,
                  prior: dict[int, torch.Tensor] | None = None,
                  nets: dict[int, dict[str, torch.Tensor]] | None = None) -> "Profile":
        used = {l: n for l, n in (nets or {}).items() if l in layers and layers[l].net}
        return cls(model_fingerprint(model), dict(layers), info or {}, dict(prior or {}), used)

    def check(self, model, path: str = "the profile") -> None:
        """Refuse a model other than the one the profile was calibrated on."""
        if not same_model(self.fingerprint, model_fingerprint(model)):
            facts = self.fingerprint[0]
            raise ValueError(f"{path} was calibrated on another model ({facts['model_type']}, "
                             f"{facts['num_layers']} layers, FFN width {facts['ffn_width']}); "
                             "run `coreinfer calibrate` for this one")
        bad = [l for l in self.layers if not 0 <= l < len(model.ffns())]
        if bad:
            raise ValueError(f"{path} names layers {bad} the model does not have")
        ffns = model.ffns()
        bad = [l for l, n in self.nets.items() if n["net_a"].shape[0] != ffns[l].up.shape[1]
               or n["net_b"].shape[1] != ffns[l].width]
        if bad:
            raise ValueError(f"{path}: the trained predictors of layers {bad} do not fit this model")

    def policy(self, model, spec) -> AdaptivePolicy | None:
        """The stability policy at the profile's keep ratios, each layer decoding by its plan; None
        (dense) for a profile whose calibration found no setting that met its target."""
        if not self.layers:
            return None
        width = model.ffns()[0].width
        base = StabilityPolicy({l: b.keep for l, b in self.layers.items()}, width, spec)
        return AdaptivePolicy(base, {l: b.plan(model.ffns()[l], self.nets.get(l)) for l, b in self.layers.items()})

    @property
    def per_token(self) -> bool:
        """Whether a layer picks rows per decoded token (refine or input sparsity), which only the
        eager float path runs (engine/adaptive.py)."""
        return any(b.refine is not None or b.input_keep < 1 or b.predict is not None for b in self.layers.values())

    def runs_on(self, ffn) -> bool:
        """Whether every sparse layer's plan runs on weights in `ffn`'s format: block formats decode only
        by threshold (threshold.py), float and int8 by either."""
        return not ffn.blocked or all(b.threshold is not None for b in self.layers.values())

    @property
    def measured(self) -> dict | None:
        """What the calibration measured for the chosen budget on held-out text (a `tried` entry)."""
        tried = self.info.get("tried") or []
        return tried[-1] if tried and self.info.get("meets_target") else None

    def ffn_share(self, model) -> float:
        """Share of the dense FFN bytes one decoded token reads (dense layers read in full)."""
        n, gated = len(model.ffns()), model.ffns()[0].gated
        return sum(self.layers[l].ffn_share(gated) if l in self.layers else 1.0 for l in range(n)) / n

    def save(self, path: str | Path) -> None:
        facts, probe = self.fingerprint
        doc = {"format": FORMAT, "model": facts, "probe": probe.tolist(), "info": self.info,
               "layers": {str(l): {k: v for k, v in vars(b).items() if k != "threshold" or v is not None}
                           for l, b in sorted(self.layers.items())},
               "prior": {str(l): [float(f"{v:.4g}") for v in p.tolist()] for l, p in sorted(self.prior.items())}}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        if self.nets:  # the fingerprint rides along, so a file from another profile is refused
            from safetensors.torch import save_file

            save_file({f"{l}.{k}": t.contiguous() for l, n in self.nets.items() for k, t in n.items()},
                      str(nets_path(path)), metadata={"model": json.dumps(facts), "probe": json.dumps(probe.tolist())})

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"--profile {path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--profile {path}: not a coreinfer profile ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"--profile {path}: not a coreinfer profile (expected format {FORMAT})")
        missing = [key for key in ("model", "probe", "layers") if key not in doc]
        if missing:
            raise ValueError(f"--profile {path}: the profile lacks its {missing[0]!r} field; run `coreinfer calibrate`")
        try:
            layers = {int(l): LayerBudget(**b) for l, b in doc["layers"].items()}
            fingerprint = (doc["model"], torch.tensor(doc["probe"], dtype=torch.float32))
            prior = {int(l): torch.tensor(p, dtype=torch.float32) for l, p in doc.get("prior", {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--profile {path}: bad layer budgets: {e}") from None
        if not layers and doc.get("info", {}).get("meets_target", True):
            raise ValueError(f"--profile {path}: no sparse layers")
        return cls(fingerprint, layers, doc.get("info", {}), prior, load_nets(path, fingerprint, layers))


def nets_path(path: str | Path) -> Path:
    """Where a profile's trained predictors live: beside it, `x.json` -> `x.nets.safetensors`."""
    return Path(path).with_suffix(".nets.safetensors")


def load_nets(path, fingerprint, layers: dict[int, LayerBudget]) -> dict[int, dict[str, torch.Tensor]]:
    """The trained predictors of the profile at `path` for its layers that use one; refused when the
    file is missing, lacks a layer, or was written for another model."""
    wanted = sorted(l for l, b in layers.items() if b.net)
    if not wanted:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(nets_path(path)), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"--profile {path}: its trained predictors ({nets_path(path).name}) cannot be read: "
                         f"{e}") from None
    theirs = (json.loads(meta.get("model", "{}")), torch.tensor(json.loads(meta.get("probe", "[]"))))
    if not same_model(fingerprint, theirs):
        raise ValueError(f"--profile {path}: {nets_path(path).name} holds another model's predictors")
    nets = {l: {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == str(l)} for l in wanted}
    missing = [l for l, n in nets.items() if not n]
    if missing:
        raise ValueError(f"--profile {path}: {nets_path(path).name} lacks the predictors of layers {missing}")
    return nets


def find_profile(model, folders: list[Path]) -> tuple[Path, Profile] | None:
    """The profile in `folders` (each in name order) calibrated on `model`, preferring one calibrated on
    the format its FFNs hold (info["weights"], which `coreinfer calibrate` records), then one that names
    no format; other JSON files and missing folders are skipped."""
    mine, fmt = model_fingerprint(model), model.ffns()[0].format
    found = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                profile = Profile.load(path)
            except ValueError:
                continue
            if same_model(profile.fingerprint, mine):
                found.append((path, profile))
    rank = lambda item: {fmt: 0, None: 1}.get(item[1].info.get("weights"), 2)  # noqa: E731
    return min(found, key=rank) if found else None  # min keeps the first of equal rank


@dataclass
class PriorPolicy(StabilityPolicy):
    """The stability policy ranking each sequence's neurons by (1 - weight) * its prompt's statistic
    + weight * the prior, each normalised to sum 1 per layer, so the two are on one scale."""

    prior: dict[int, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.5

    def select(self, stats: dict[int, RunningStats]) -> Selection:
        index = {}
        for layer, beta in self.keep.items():
            local = stats[layer].primary  # [B, F]
            local = local / local.sum(1, keepdim=True).clamp_min(torch.finfo(local.dtype).tiny)
            fused = (1 - self.weight) * local + self.weight * self.prior[layer].to(local)
            index[layer] = rank_neurons(fused, stats[layer].secondary, keep_count(beta, self.width))  # [B, k]
        return Selection(index)


def prior_policy(base: StabilityPolicy, path: str, weight: float, model) -> PriorPolicy:
    """`base` with the prior of the profile at `path` fused in; every sparse layer needs a prior."""
    profile = Profile.load(path)
    profile.check(model, path)
    missing = sorted(set(base.keep) - set(profile.prior))
    if missing:
        raise ValueError(f"--prior {path} has no prior for sparse layers {missing}")
    return PriorPolicy(base.keep, base.width, base.spec, profile.prior, weight)
