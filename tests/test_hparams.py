"""modeledit.hparams: every method's defaults pass; wrong types and out-of-range values are one-line errors"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modeledit.editor import EDITORS, available_methods, create_editor
from modeledit.hparams import HyperparameterError, check_hparams


@pytest.mark.parametrize("method", available_methods())
def test_every_methods_defaults_are_valid(method):
    check_hparams(method, EDITORS[method].Config())


@pytest.mark.parametrize(
    "method,overrides,message",
    [
        ("ft", {"steps": "abc"}, "ft: steps must be an integer >= 1, got 'abc'"),
        ("ft", {"steps": -1}, "ft: steps must be an integer >= 1, got -1"),
        ("ft", {"steps": 0}, "ft: steps must be an integer >= 1, got 0"),
        ("ft", {"steps": True}, "ft: steps must be an integer >= 1, got True"),
        ("ft", {"lr": "nan"}, "ft: lr must be a finite number > 0, got 'nan'"),
        ("ft", {"lr": math.nan}, "ft: lr must be a finite number > 0, got nan"),
        ("ft", {"lr": math.inf}, "ft: lr must be a finite number > 0, got inf"),
        ("ft", {"lr": -0.1}, "ft: lr must be a finite number > 0, got -0.1"),
        ("ft-l", {"norm_constraint": math.nan}, "ft-l: norm_constraint must be a finite number > 0 or null"),
        ("ft", {"kl_weight": -1.0}, "ft: kl_weight must be a finite number >= 0, got -1.0"),
        ("ft", {"layers": [0, "a"]}, "ft: layers must be a list of integers or null, got [0, 'a']"),
        ("ft", {"seed": 1.5}, "ft: seed must be an integer, got 1.5"),
        ("grace", {"steps": 2.5}, "grace: steps must be an integer >= 1, got 2.5"),
        ("rome", {"layer_selection": "best"}, "rome: layer_selection must be one of structure, trace"),
        ("rome", {"mom2": "yes"}, "rome: mom2 must be true or false, got 'yes'"),
        ("memit", {"clamp_norm": 0.0}, "memit: clamp_norm must be a finite number > 0, got 0.0"),
        ("wise", {"mask_ratio": 1.5}, "wise: mask_ratio must be a finite number in (0, 1], got 1.5"),
        ("mend", {"alpha_scale": {"x": math.nan}}, "mend: alpha_scale must be finite"),
        ("enn", {"edit_lr_init": 0.0}, "enn: edit_lr_init must be a finite number > 0, got 0.0"),
        ("ke", {"lr_init": "fast"}, "ke: lr_init must be a finite number > 0, got 'fast'"),
    ],
)
def test_bad_values_are_one_line_errors(method, overrides, message):
    with pytest.raises(HyperparameterError) as info:
        check_hparams(method, EDITORS[method].Config(**overrides))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_good_values_of_other_types_pass():
    check_hparams("ft", EDITORS["ft"].Config(lr=1, layers=(0, 1), norm_constraint=None))  # int for float
    check_hparams("memit", EDITORS["memit"].Config(mom2_source=Path("corpus.txt")))  # a path for a string
    check_hparams("mend", EDITORS["mend"].Config(alpha_scale={"a": 2.0}))


def test_create_editor_checks_before_any_model_work():
    class Untouchable:  # any use of the model fails: the check must come first
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name})")

    with pytest.raises(HyperparameterError, match="steps must be an integer >= 1, got -1"):
        create_editor("ft", Untouchable(), None, steps=-1)
