"""One small hook utility for every method: capture or replace a module's input and output.

    with Trace(model, ["model.layers.3.mlp.down_proj"], capture_input=True) as tr:
        model(**batch)
    keys = tr["model.layers.3.mlp.down_proj"].input

``edit_output(name, output) -> new_output`` replaces a module's output (ROME's v* insertion, causal tracing);
``retain_grad=True`` keeps the gradient of captured outputs (MEND's delta). ``BlockReplay`` records the early
blocks' outputs once and replays them, so that a method optimising later layers (GRACE, WISE, fine-tuning of
the last blocks) runs only those at each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import architecture


@dataclass
class Captured:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    output_grad: torch.Tensor | None = field(default=None, repr=False)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _with_first(output: Any, first: torch.Tensor) -> Any:
    """``output`` with its first element (a module's hidden states) replaced."""
    return (first, *output[1:]) if isinstance(output, tuple) else first


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
                output = _with_first(output, self.edit_output(name, _first(output)))
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


# -- replaying the early blocks -----------------------------------------------------------------------------


class BlockReplay:
    """Run a model again and again with blocks ``0..layer`` of a stack replaced by their recorded outputs.

    A method that changes only what one module inside block ``layer`` outputs (GRACE's values, WISE's side
    memory) optimises that change with forward and backward passes through the later blocks only:

        replay = BlockReplay(model, layer)
        with replay.recording([module]) as tr:      # one ordinary forward pass
            aligned_logits(model, batch)
        with replay.replaying(lambda hidden: hidden + change):
            aligned_logits(model, batch)            # blocks 0..layer return what they returned above

    ``change`` is added to the output of block ``layer`` (the residual stream), e.g. new minus recorded
    output of the module: exact, because a block adds its MLP output to the residual stream. Embeddings,
    other stacks (a seq2seq encoder) and the blocks after ``layer`` run as usual.
    """

    def __init__(self, model: nn.Module, layer: int, kind: str = "decoder"):
        self.model = model
        self.blocks = [model.get_submodule(b.name) for b in architecture(model).stack(kind)][: layer + 1]
        self.outputs: list[Any] = []

    @contextmanager
    def recording(self, modules: list[str], capture_input: bool = True) -> Iterator[Trace]:
        self.outputs = [None] * len(self.blocks)
        handles = [
            block.register_forward_hook(lambda _m, _i, out, i=i: self.outputs.__setitem__(i, out))
            for i, block in enumerate(self.blocks)
        ]
        try:
            with torch.no_grad(), Trace(self.model, modules, capture_input=capture_input, detach=True) as tr:
                yield tr
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self, edit_last: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        if not self.outputs or any(o is None for o in self.outputs):
            raise RuntimeError("BlockReplay.replaying() needs a recorded forward pass first")
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            out = self.outputs[i]
            if i == last:
                block.forward = lambda *a, _out=out, **k: _with_first(_out, edit_last(_first(_out)))
            else:
                block.forward = lambda *a, _out=out, **k: _out
        try:
            yield
        finally:
            for block in self.blocks:
                del block.forward  # the instance attribute: the class's forward is back

    @property
    def seq_len(self) -> int:
        return _first(self.outputs[-1]).shape[1]
