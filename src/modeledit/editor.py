"""The Editor interface every method implements, and the registry that maps names to methods.

A method is one file in ``modeledit/methods``: a hyperparameter dataclass and an Editor subclass whose
``compute_deltas(requests)`` returns parameter deltas without touching the model's weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

from torch import nn

from .arch import Architecture, architecture
from .models import fingerprint
from .patch import Delta, Patch
from .requests import EditRequest, EditRequestError


class Editor:
    name: ClassVar[str]
    Config: ClassVar[type]
    needs_subject: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer, config: Any):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.arch: Architecture = architecture(model)

    def edit(self, requests: EditRequest | list[EditRequest]) -> Patch:
        """Compute the patch that makes the model answer each request's target. The model is not changed."""
        if isinstance(requests, EditRequest):
            requests = [requests]
        if not requests:
            raise EditRequestError("no edit requests given")
        max_len = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        for r in requests:
            r.validate(needs_subject=self.needs_subject, tokenizer=self.tokenizer, max_length=max_len)
        # In-place writes bump a tensor's version counter: a cheap guard that editors never mutate the model.
        versions = {n: p._version for n, p in self.model.named_parameters()}
        start = time.perf_counter()
        deltas = self.compute_deltas(requests)
        seconds = time.perf_counter() - start
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


EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    EDITORS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    from . import methods  # noqa: F401  (registers the methods)

    return sorted(EDITORS)


def create_editor(method: str, model: nn.Module, tokenizer, **overrides: Any) -> Editor:
    """An editor for ``method`` with its default hyperparameters, overridden by keyword arguments."""
    names = available_methods()
    if method not in EDITORS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(names)}")
    cls = EDITORS[method]
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return cls(model, tokenizer, cls.Config(**overrides))
