"""Hyperparameter checks shared by every method: types as annotated in the config, and documented ranges.

One check for the CLI (``--set KEY=VALUE`` keeps values it cannot parse as JSON as strings), the Python API
and the service, run by ``create_editor`` before any model work: ``steps="abc"``, ``lr=nan`` or ``steps=-1``
are refused with one line naming the field, what it must be, and the value given, instead of a traceback
halfway through an edit or a "successful" edit that did nothing or diverged.

The ranges are generic, by field name, so a new method's config is covered by naming its fields as the
others do: ``steps`` / ``num_steps`` / ``*_steps`` are integers >= 1; learning rates (``lr``, ``lr_*``,
``*_lr``, ``*_lr_*``, ``learning_rate``) are finite numbers > 0; every float is finite; the other names below
are counts, weights or ratios with the range their comments in the configs document.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any


class HyperparameterError(ValueError):
    """A hyperparameter has the wrong type or lies outside its documented range."""


@dataclass(frozen=True)
class Range:
    low: float | None = None
    low_open: bool = False  # low itself excluded
    high: float | None = None

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return f"{'>' if self.low_open else '>='} {self.low:g}"


AT_LEAST_ONE = Range(1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, low_open=True, high=1)  # a share: more than nothing, at most all
UNIT = Range(0, high=1)

# Fields that mean the same in every config that has them (see the comments in methods/*.py).
RANGES: dict[str, Range] = {
    **dict.fromkeys(
        (
            "num_blocks",
            "num_layers",
            "mom2_tokens",
            "prefix_tokens",
            "requests_per_step",
            "rounds",
            "rank",
            "hidden",
            "locality_batch",
            "edits_per_shard",
            "shards_per_merge",
            "max_condition_tokens",
        ),
        AT_LEAST_ONE,
    ),
    **dict.fromkeys(
        (
            "norm_constraint",
            "clamp_norm",
            "mom2_update_weight",
            "epsilon_init",
            "epsilon_ratio",
            "alpha_init",
        ),
        POSITIVE,
    ),
    **dict.fromkeys(
        (
            "n_prefixes",
            "num_locality_texts",
            "drawdown_texts",
            "protect_neighbours",
            "protect_ridge",
            "isolate_batch",
            "stop_nll",
            "kl_weight",
            "kl_factor",
            "weight_decay",
            "c_edit",
            "c_loc",
            "c_base",
            "c_nb",
            "margin",
            "margin_weight",
            "val_kl_weight",
            "lambda_init",
            "l2",
            "nullspace_threshold",
        ),
        NON_NEGATIVE,
    ),
    **dict.fromkeys(("mask_ratio", "merge_density"), FRACTION),
    "depth": UNIT,
}
CHOICES: dict[str, tuple[str, ...]] = {"layer_selection": ("structure", "trace")}
# Per-method rules where a field means something of its own (method name -> field -> range).
METHOD_RANGES: dict[str, dict[str, Range]] = {
    "wise": {"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE, "act_ratio": POSITIVE},
    "serac": {"contrast": NON_NEGATIVE},
}


def is_step_count(name: str) -> bool:
    return name in ("steps", "num_steps") or name.endswith("_steps")


def is_learning_rate(name: str) -> bool:
    return "lr" in name.split("_") or "learning_rate" in name


def _range(method: str, name: str) -> Range | None:
    if is_step_count(name):
        return AT_LEAST_ONE
    if is_learning_rate(name):
        return POSITIVE
    return METHOD_RANGES.get(method, {}).get(name) or RANGES.get(name)


# -- types ------------------------------------------------------------------------------------------------


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (JSON-like types; anything else is not judged)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, (str, os.PathLike))  # paths given from Python are fine
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return isinstance(value, dict) and (
            len(args) != 2 or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        of = {int: "integers", float: "numbers", str: "strings"}.get(args[0]) if args else None
        return f"a list of {of}" if of else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _floats(value: Any) -> list[float]:
    """The numbers inside a value (a number, or the values of a list or mapping of numbers)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _floats(v)]
    return []


def check_hparams(method_name: str, config: Any) -> None:
    """Raise ``HyperparameterError`` (one line) if a field of the config dataclass has the wrong type or
    lies outside its documented range; None stays allowed where the annotation allows it."""
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # an annotation that cannot be resolved: judge ranges only
        hints = {}
    for f in dataclasses.fields(config):
        name, value = f.name, getattr(config, f.name)
        tp = hints.get(name, Any)
        allowed = _range(method_name, name)
        optional = _matches(None, tp) and tp is not Any
        numeric = tp is not Any and (_matches(1.5, tp) or _matches(1, tp))
        if allowed is not None and numeric:
            kind = "an integer" if not _matches(1.5, tp) else "a finite number"
            what = f"{kind} {allowed}" + (" or null" if optional else "")
            if value is None and optional:
                continue
            if not _matches(value, tp) or not all(
                math.isfinite(x) and allowed.holds(x) for x in _floats(value)
            ):
                raise HyperparameterError(f"{method_name}: {name} must be {what}, got {value!r}")
            continue
        if not _matches(value, tp):
            raise HyperparameterError(f"{method_name}: {name} must be {_describe(tp)}, got {value!r}")
        if not all(math.isfinite(x) for x in _floats(value)):
            raise HyperparameterError(f"{method_name}: {name} must be finite, got {value!r}")
        if name in CHOICES and value is not None and value not in CHOICES[name]:
            raise HyperparameterError(
                f"{method_name}: {name} must be one of {', '.join(CHOICES[name])}, got {value!r}"
            )
