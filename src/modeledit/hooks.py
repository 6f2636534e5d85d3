"""One small hook utility for every method: capture or replace a module's input and output.

    with Trace(model, ["model.layers.3.mlp.down_proj"], capture_input=True) as tr:
        model(**batch)
    keys = tr["model.layers.3.mlp.down_proj"].input

``edit_output(name, output) -> new_output`` replaces a module's output (ROME's v* insertion, causal tracing);
``retain_grad=True`` keeps the gradient of captured outputs (MEND's delta).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Captured:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    output_grad: torch.Tensor | None = field(default=None, repr=False)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class Trace:
    """Context manager hooking modules by name; ``trace[name]`` gives what was captured."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        capture_input: bool = False,
        capture_output: bool = True,
        retain_grad: bool = False,
        detach: bool = False,
        edit_output: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model, self.names = model, list(names)
        self.capture_input, self.capture_output = capture_input, capture_output
        self.retain_grad, self.detach, self.edit_output = retain_grad, detach, edit_output
        self.captured: dict[str, Captured] = {name: Captured() for name in self.names}
        self._handles: list = []

    def __getitem__(self, name: str) -> Captured:
        return self.captured[name]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            rec = self.captured[name]
            if self.capture_input:
                x = _first(inputs)
                rec.input = x.detach() if self.detach else x
            if self.edit_output is not None:
                new = self.edit_output(name, _first(output))
                output = (new, *output[1:]) if isinstance(output, tuple) else new
            if self.capture_output:
                y = _first(output)
                if self.retain_grad and y.requires_grad:
                    y.register_hook(lambda g: setattr(rec, "output_grad", g))
                rec.output = y.detach() if self.detach else y
            return output

        return hook

    def __enter__(self) -> Trace:
        # Resolve every name first: an unknown one raises before any hook is registered (``__exit__`` is not
        # called when ``__enter__`` raises, so hooks registered earlier would stay on the model forever).
        modules = [self.model.get_submodule(name) for name in self.names]
        for name, module in zip(self.names, modules, strict=True):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
