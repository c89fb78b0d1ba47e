"""Config validation in one place: a checkpoint's config dict against what its family reads.

Each family declares its fields and their types once, as the annotations of its config dataclass
(whose field names are the config.json keys); `check` holds every given value to that type, so a bad
value is one line naming the field and the type, not a TypeError deep inside torch. Integers (counts,
sizes) must be at least 1 unless the field's metadata says otherwise (`metadata={"min": 0}`), floats
(eps, RoPE bases, scales) above 0. The RoPE dicts are checked for the keys their rope type reads,
and attention heads for dividing evenly. Refused before any tensor is allocated.
"""

import json
import math
import types
import typing
from dataclasses import fields

# rope type -> the keys `common.rope_inv_freq` reads, and their types (besides rope_type itself)
ROPE_NEEDS = {
    "default": {},
    "linear": {"factor": float},
    "llama3": {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
               "original_max_position_embeddings": int},
    "yarn": {"factor": float, "original_max_position_embeddings": int},
}
ROPE_OPTIONAL = {"rope_theta": float, "beta_fast": float, "beta_slow": float, "attention_factor": float}

NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
         list: "a list", type(None): "null"}


class UnsupportedModel(ValueError):
    pass


def check(config: dict, families: dict) -> str:
    """The config's model_type, once it names a family in `families` (model_type -> (config class,
    ...)) and every field that family reads has a value of its declared type; else ValueError, one line."""
    model_type = config.get("model_type")
    if model_type not in families:
        raise UnsupportedModel(f"unsupported architecture: model_type {model_type!r}, architectures "
                               f"{config.get('architectures')}; supported model_type: {', '.join(sorted(families))}")
    config_cls = families[model_type][0]
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        if f.name in config and f.name != "extra":
            check_value(f.name, config[f.name], hints[f.name], f.metadata.get("min", 1))
    for where, rope in rope_dicts(config):
        check_rope(where, rope)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(f"model config: num_attention_heads ({heads}) is not a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    return model_type


def check_value(name: str, value, hint, minimum: int = 1) -> None:
    """`value` of type `hint` (int, float, bool, str, dict, list[X], or unions of them); a plain
    integer (optionally None) at least `minimum`, a plain float finite and above 0."""
    if not accepts(value, hint):
        raise ValueError(f"model config: {name} must be {describe(hint)}, got {shown(value)}")
    number = {a for a in typing.get_args(hint) or (hint,) if a is not type(None)}
    if value is None or number not in ({int}, {float}):
        return
    if number == {int} and value < minimum:
        raise ValueError(f"model config: {name} must be at least {minimum}, got {shown(value)}")
    if number == {float} and not (math.isfinite(value) and value > 0):
        raise ValueError(f"model config: {name} must be a number above 0, got {shown(value)}")


def accepts(value, hint) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(accepts(value, a) for a in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is type(None):
        return value is None
    if not isinstance(value, origin):
        return False
    if origin is list and typing.get_args(hint):
        return all(accepts(v, typing.get_args(hint)[0]) for v in value)
    return True


def describe(hint) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(describe(a) for a in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin is list and typing.get_args(hint):
        return f"a list of {describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return NAMES.get(origin, origin.__name__)


def shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def rope_dicts(config: dict) -> list[tuple[str, dict]]:
    """(where, dict) for each RoPE description: `rope_scaling`, and transformers 5's `rope_parameters`,
    flat or one per layer type (Gemma 3). Non-dicts are left to the field check."""
    out = [("rope_scaling", config["rope_scaling"])] if isinstance(config.get("rope_scaling"), dict) else []
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        if params is not None:
            raise ValueError(f"model config: rope_parameters must be an object, got {shown(params)}")
        return out
    nested = params and all(isinstance(v, dict) or v is None for v in params.values())
    if nested:
        return out + [(f"rope_parameters.{kind}", p) for kind, p in params.items() if p is not None]
    return out + [("rope_parameters", params)]


def check_rope(where: str, rope: dict) -> None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_NEEDS:
        raise ValueError(f"model config: {where}: unsupported rope_type {shown(kind)}; supported: "
                         f"{', '.join(ROPE_NEEDS)}")
    for key, hint in ROPE_NEEDS[kind].items():
        if key not in rope:
            raise ValueError(f"model config: {where} of rope_type {kind!r} lacks {key} ({describe(hint)})")
        check_value(f"{where}.{key}", rope[key], hint)
    if kind == "llama3" and rope["low_freq_factor"] == rope["high_freq_factor"]:
        raise ValueError(f"model config: {where}: low_freq_factor and high_freq_factor must differ")
    for key, hint in ROPE_OPTIONAL.items():
        if rope.get(key) is not None:
            check_value(f"{where}.{key}", rope[key], hint)
