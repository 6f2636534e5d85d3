"""The Editor interface every method implements, and the registry that maps names to methods.

A method is one file in ``modeledit/methods``: a hyperparameter dataclass and an Editor subclass whose
``compute_deltas(requests)`` returns parameter deltas without touching the model's weights.
What an edit optimises comes from a Task (``tasks.py``): a language model's EditRequests by default, or
``TensorEdit`` inputs and targets of any ``nn.Module`` for the methods marked ``any_model``.
"""

from __future__ import annotations

import dataclasses
import time
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import nn

from .arch import Architecture, architecture, last_linears
from .forms import rendered
from .hparams import check_hparams
from .models import fingerprint
from .patch import Delta, Patch, check_finite
from .requests import EditRequest, EditRequestError
from .tasks import Task, TensorEdit, resolve_task
from .verify import check_patch

MAX_TRIES = 3  # verify=True: an edit and at most two stronger ones
# What "default" means wherever a method is asked (CLI, service, page, create_editor): the single-edit
# method with the best generation-based figures on dev (README: "Which method to use").
DEFAULT_METHOD = "serac"


def resolve_method(method: str) -> str:
    """A method name, with "default" read as ``DEFAULT_METHOD``."""
    return DEFAULT_METHOD if method == "default" else method


def stronger(config: Any, ladder: dict[str, float], step: int) -> Any:
    """``config`` with each field of ``ladder`` multiplied by its factor ** ``step`` (ints rounded; an unset
    float such as MEND's alpha_scale counts as 1; a dict of per-layer values is scaled value by value)."""
    changes = {}
    for name, factor in ladder.items():
        value, scale = getattr(config, name), factor**step
        if isinstance(value, dict):
            changes[name] = {k: v * scale for k, v in value.items()}
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            changes[name] = max(1, round(value * scale))
        else:
            changes[name] = (1.0 if value is None else value) * scale
    return dataclasses.replace(config, **changes)


def default_modules(model: nn.Module, task: Task, num_blocks: int) -> list[str]:
    """The edited layers of the gradient-based editors: the MLP matrices of the last ``num_blocks``
    transformer blocks; for any other model (a generic ``task``), its last ``num_blocks`` linear layers."""
    if task.is_language_model:
        return architecture(model).last_mlp_linears(num_blocks)
    return last_linears(model, num_blocks)


class Editor:
    name: ClassVar[str]
    Config: ClassVar[type]
    needs_subject: ClassVar[bool] = False
    any_model: ClassVar[bool] = False  # edits any nn.Module through a Task (else: language models only)
    trained_folder: ClassVar[str] = "editor_path"  # the config field that ``--editor DIR`` sets
    # verify=True: config fields multiplied by factor ** k on the k-th retry of an edit that does not hold
    strengthen: ClassVar[dict[str, float]] = {}

    def __init__(self, model: nn.Module, tokenizer, config: Any, task: Task | str | Any = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.task: Task = resolve_task(task, model, tokenizer)
        if not self.task.is_language_model and not self.any_model:
            generic = ", ".join(m for m in available_methods() if EDITORS[m].any_model)
            raise ValueError(f"{self.name} edits language models only; for any other model use {generic}")

    @cached_property
    def arch(self) -> Architecture:
        return architecture(self.model)

    def default_modules(self, num_blocks: int) -> list[str]:
        return default_modules(self.model, self.task, num_blocks)

    def edit(self, requests: EditRequest | TensorEdit | list, verify: bool = False) -> Patch:
        """Compute the patch that makes the model answer each request's target. The model is not changed.

        Requests in chat or question form are rendered first (``forms.rendered``): methods see the prompts
        as the model does. ``verify``: generate with the patch applied (then reverted) and record whether
        the edit holds in ``patch.info["verify"]`` (see ``verify.py``); an edit that does not hold is
        strengthened along the method's ``strengthen`` ladder, at most ``MAX_TRIES`` tries in all."""
        if isinstance(requests, (EditRequest, TensorEdit)):
            requests = [requests]
        if not requests:
            raise EditRequestError("no edit requests given")
        shown = [rendered(r, self.tokenizer) if isinstance(r, EditRequest) else r for r in requests]
        self.task.validate(shown, self)
        patch = self.make_patch(shown, requests)
        if not verify:
            return patch
        if not self.task.is_language_model:
            raise ValueError("verify=True reads generated answers: it needs a language model")
        first = patch, check_patch(self.model, self.tokenizer, patch, requests)
        checks, tries, seconds, base = first[1], 1, patch.info["seconds"], self.config
        try:
            while not checks["holds"] and tries < MAX_TRIES and self.strengthen:
                self.config = stronger(base, self.strengthen, tries)
                patch = self.make_patch(shown, requests)
                seconds += patch.info["seconds"]
                checks = check_patch(self.model, self.tokenizer, patch, requests)
                tries += 1
        finally:
            self.config = base
        if not checks["holds"]:  # no try held: keep the method's own edit (a stronger one may break more)
            patch, checks = first
        patch.info |= {"verify": checks | {"tries": tries}, "seconds_all_tries": seconds}
        return patch

    def make_patch(self, shown: list, requests: list) -> Patch:
        """The patch for the rendered requests ``shown`` (``requests`` as given are what it records)."""
        # In-place writes bump a tensor's version counter: a cheap guard that editors never mutate the model.
        versions = {n: p._version for n, p in self.model.named_parameters()}
        start = time.perf_counter()
        deltas = self.compute_deltas(shown)
        seconds = time.perf_counter() - start
        # a diverged optimisation (NaN / inf) never becomes a patch
        check_finite(deltas, method=self.name, hparams=dataclasses.asdict(self.config))
        changed = [n for n, p in self.model.named_parameters() if p._version != versions[n]]
        if changed:
            raise RuntimeError(
                f"{self.name} changed {changed[:3]} while computing a patch (a bug in the method)"
            )
        return Patch(
            deltas=deltas,
            fingerprint=fingerprint(self.model),
            method=self.name,
            hparams=dataclasses.asdict(self.config),
            requests=[r.to_dict() for r in requests],
            info={"seconds": seconds},
        )

    def compute_deltas(self, requests: list[EditRequest]) -> dict[str, Delta]:
        raise NotImplementedError

    # -- what an editor keeps between edits, for resuming a sequential run -----------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What this editor keeps between edits besides the applied patches (tensors, JSON), or derived from
        the unedited model (prefixes, a layer chosen by tracing): what a fresh editor needs to carry on with
        a sequential stream. Most editors keep nothing."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take over ``state()`` of an earlier editor; called on the unedited model, before that editor's
        patches are applied again."""


EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    EDITORS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    from . import methods  # noqa: F401  (registers the methods)

    return sorted(EDITORS)


def check_settings(method: str, **overrides: Any) -> str:
    """The method's registered name, once it is known and ``overrides`` are its hyperparameters with
    types and values in range: what ``create_editor`` checks, without a model (the CLI, before loading)."""
    names = available_methods()
    method = resolve_method(method)
    if method not in EDITORS:
        listed = ", ".join(names)
        raise ValueError(f"unknown method {method!r}; available: default ({DEFAULT_METHOD}), {listed}")
    cls = EDITORS[method]
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
    check_hparams(method, cls.Config(**overrides))  # types and ranges
    return method


def create_editor(
    method: str, model: nn.Module, tokenizer=None, *, task: Task | str | Any = None, **overrides: Any
) -> Editor:
    """An editor for ``method`` with its default hyperparameters, overridden by keyword arguments.

    A language model needs its tokenizer; any other model a ``task`` ("classification", "sequence",
    "regression", a loss function ``(outputs, targets) -> (n,)``, or a Task) and edits given as TensorEdit.
    """
    names = available_methods()
    method = check_settings(method, **overrides)  # before any model work
    cls = EDITORS[method]
    if task is None:
        return cls(model, tokenizer, cls.Config(**overrides))
    if not cls.any_model:
        generic = ", ".join(m for m in names if EDITORS[m].any_model)
        raise ValueError(f"{method} edits language models only; with task= use {generic}")
    return cls(model, tokenizer, cls.Config(**overrides), task=task)
