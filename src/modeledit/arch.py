"""Where things are inside a transformer, found by module structure (never by the model's name).

Rules, each checked on tiny GPT-2, GPT-J, GPT-Neo, GPT-NeoX, OPT, Llama, Mistral, Qwen2, Gemma, Phi, T5, BART:
- a *block stack* is an ``nn.ModuleList`` whose children share one class and each contain an attention
  module (a module whose class name contains "Attention"); seq2seq models have two (encoder, decoder);
- a block's *MLP projections* are its linear layers (``nn.Linear`` or GPT-2's transposed ``Conv1D``) outside
  any attention module: those reading the hidden size are MLP inputs, the one writing it is the MLP output;
- the *residual stream* after block i is that block's output (first element when it returns a tuple);
- embeddings and LM head come from ``get_input_embeddings`` / ``get_output_embeddings``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is (in_features, out_features)."""
    return type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, whatever its storage layout."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_transposed(module) else (w.shape[0], w.shape[1])


def last_linears(model: nn.Module, n: int) -> list[str]:
    """The last ``n`` linear layers of any model, in registration order (a classifier's head and the layers
    before it): the default edited layers of a model without transformer blocks."""
    names = [name for name, module in model.named_modules() if is_linear(module)]
    if not names:
        raise ArchitectureError(f"{type(model).__name__} has no linear layer to edit")
    return names[-n:]


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__ or type(module).__name__.endswith("Attn")


@dataclass(frozen=True)
class Block:
    """One transformer block: its module name and its MLP linear layers (module names)."""

    name: str
    stack: str  # "decoder" or "encoder"
    index: int  # position within its stack
    mlp_in: tuple[str, ...]  # e.g. gate_proj, up_proj / c_fc / fc_in / wi
    mlp_out: str  # e.g. down_proj / c_proj / fc_out / wo


class ArchitectureError(ValueError):
    """The model's structure is not one this library understands."""


class Architecture:
    """The parts of a transformer that editing methods need, found once per model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        stacks = self._find_block_stacks(model)
        if not stacks:
            raise ArchitectureError(f"no transformer block stack found in {type(model).__name__}")
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise ArchitectureError(
                f"{type(model).__name__} has no get_input_embeddings(): not a transformers language model"
            )
        self.hidden_size = model.get_input_embeddings().weight.shape[1]
        self.blocks: list[Block] = []
        for stack_name, kind in stacks:
            stack = model.get_submodule(stack_name)
            for i, block in enumerate(stack):
                self.blocks.append(self._describe_block(f"{stack_name}.{i}", kind, i, block))

    # -- discovery ---------------------------------------------------------------------------------
    @staticmethod
    def _find_block_stacks(model: nn.Module) -> list[tuple[str, str]]:
        found = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            if not any(_is_attention(m) for m in module[0].modules()):
                continue
            # Skip lists nested inside an already-found stack (e.g. T5Block.layer has mixed types anyway).
            if any(name.startswith(prev + ".") for prev, _ in found):
                continue
            kind = "encoder" if "encoder" in name.split(".") else "decoder"
            found.append((name, kind))
        return found

    def _describe_block(self, name: str, kind: str, index: int, block: nn.Module) -> Block:
        attention_prefixes = [n + "." for n, m in block.named_modules() if n and _is_attention(m)]
        mlp_in, mlp_out = [], []
        for sub, module in block.named_modules():
            if not is_linear(module) or any(sub.startswith(p) for p in attention_prefixes):
                continue
            out_features, in_features = linear_shape(module)
            if in_features == self.hidden_size and out_features != self.hidden_size:
                mlp_in.append(sub)
            elif out_features == self.hidden_size and in_features != self.hidden_size:
                mlp_out.append(sub)
        if not mlp_in or len(mlp_out) != 1:
            raise ArchitectureError(
                f"block {name}: expected MLP input projection(s) and one output projection outside "
                f"attention, found inputs {mlp_in} and outputs {mlp_out}"
            )
        return Block(name, kind, index, tuple(mlp_in), mlp_out[0])

    # -- queries -------------------------------------------------------------------------------------
    def stack(self, kind: str = "decoder") -> list[Block]:
        """The blocks of one stack, in order ("decoder" for decoder-only models)."""
        return [b for b in self.blocks if b.stack == kind]

    @property
    def num_layers(self) -> int:
        return len(self.stack("decoder"))

    def block(self, layer: int, kind: str = "decoder") -> Block:
        blocks = self.stack(kind)
        if not -len(blocks) <= layer < len(blocks):
            raise ArchitectureError(f"layer {layer} out of range: the {kind} has {len(blocks)} blocks")
        return blocks[layer]

    def mlp_out(self, layer: int, kind: str = "decoder") -> str:
        """Module name of the MLP output projection of a block (ROME's edited matrix)."""
        b = self.block(layer, kind)
        return f"{b.name}.{b.mlp_out}"

    def mlp_in(self, layer: int, kind: str = "decoder") -> list[str]:
        b = self.block(layer, kind)
        return [f"{b.name}.{m}" for m in b.mlp_in]

    def mlp_linears(self, layer: int, kind: str = "decoder") -> list[str]:
        """Every MLP matrix of a block: inputs then output (MEND's edited matrices)."""
        return self.mlp_in(layer, kind) + [self.mlp_out(layer, kind)]

    def last_mlp_linears(self, n_blocks: int = 3) -> list[str]:
        """MLP matrices of the last ``n_blocks`` blocks (all blocks if fewer).

        For seq2seq models, of the last ``min(n_blocks, 2)`` encoder blocks, then as many decoder blocks.
        """
        # Clamp to the stack size: a negative start would wrap around and list blocks twice.
        if self.is_seq2seq:
            return [
                name
                for kind in ("encoder", "decoder")
                for layer in range(max(len(self.stack(kind)) - min(n_blocks, 2), 0), len(self.stack(kind)))
                for name in self.mlp_linears(layer, kind)
            ]
        start = max(self.num_layers - n_blocks, 0)
        return [name for layer in range(start, self.num_layers) for name in self.mlp_linears(layer)]

    def residual(self, layer: int, kind: str = "decoder") -> str:
        """Module whose output is the residual stream after block ``layer``."""
        return self.block(layer, kind).name

    def embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def tied_embeddings(self) -> bool:
        head = self.lm_head()
        return head is not None and head.weight.data_ptr() == self.embeddings().weight.data_ptr()

    def linear(self, name: str) -> nn.Module:
        module = self.model.get_submodule(name)
        if not is_linear(module):
            raise ArchitectureError(f"{name} is a {type(module).__name__}, not a linear layer")
        return module

    def weight_as_out_in(self, name: str) -> torch.Tensor:
        """The weight of a linear layer as an (out, in) view, whatever its storage layout."""
        module = self.linear(name)
        return module.weight.T if is_transposed(module) else module.weight


def architecture(model: nn.Module) -> Architecture:
    """The (cached) Architecture of a model."""
    arch = model.__dict__.get("_modeledit_arch")
    if arch is None:
        arch = Architecture(model)
        model.__dict__["_modeledit_arch"] = arch
    return arch
