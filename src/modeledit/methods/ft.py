"""Fine-tuning baselines: FT (chosen layers, no constraint), FT-L (ROME's FT+L: one MLP matrix, L-inf bound on
the change) and FT-KL (the MEND paper's FT+KL: a KL penalty keeping unrelated outputs close to the original).

All three minimise the task's per-edit loss (a language model: the mean NLL of ``target_new`` after the
prompt) over the trainable deltas with Adam. The model is never modified: its forward pass runs with
``W + delta`` substituted (``functional_call``). FT and FT-KL edit any model (``task=``); FT-L is ROME's
language-model baseline.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..editor import Editor, register
from ..hooks import BlockReplay
from ..locality import default_locality_texts
from ..patch import Delta
from ..requests import EditRequestError
from ..tasks import cat_inputs


@dataclass
class FTConfig:
    """Unconstrained fine-tuning of the MLP matrices of the last ``num_blocks`` blocks (MEND's layers)."""

    modules: list[str] | None = None  # explicit module names; overrides layers/num_blocks
    layers: list[int] | None = None  # blocks whose MLP matrices are trained (None: the last num_blocks)
    num_blocks: int = 3  # models without transformer blocks: the last num_blocks linear layers
    only_mlp_out: bool = False  # train only each block's MLP output projection
    lr: float = 1e-4
    steps: int = 25
    stop_nll: float = 0.05  # stop once every edit's loss (target NLL) is below this
    norm_constraint: float | None = None  # L-inf bound on each weight's change (None: unconstrained)
    kl_weight: float = 0.0  # weight of KL(original || edited) on locality texts (any model: locality_inputs)
    locality_texts: list[str] | None = None  # None: built-in unrelated sentences (language models)
    locality_batch: int = 6  # locality texts per step, cycling through them (full-vocabulary KL is costly)
    seed: int = 0


@dataclass
class FTLConfig(FTConfig):
    """ROME's FT+L: one MLP output projection with an L-inf bound on its change (tuned: see README)."""

    layers: list[int] | None = field(default=None)  # None: the block at 15% of the depth
    only_mlp_out: bool = True
    # ROME used 5e-4 on GPT-2 XL, whose weights are ~10x smaller than SmolLM2's (std 0.19): scaled up.
    lr: float = 5e-3
    norm_constraint: float | None = 5e-3


@dataclass
class FTKLConfig(FTConfig):
    """The MEND paper's FT+KL: FT plus c_loc * KL on unrelated text."""

    kl_weight: float = 1.0
    # All steps: stopping once the edit NLL is low (FT's rule) ended FT+KL before its KL term had acted, so it
    # equalled FT (measured in `modeledit compare`, 2026-11-27).
    stop_nll: float = 0.0


@register
class FineTune(Editor):
    name = "ft"
    Config = FTConfig
    strengthen = {"steps": 2.0, "stop_nll": 0.5}  # verify=True: more steps, a lower stopping loss
    any_model = True
    replay_blocks = True  # replay the blocks below the trained ones (False: full forward passes; for tests)

    def default_layers(self) -> list[int]:
        n = self.arch.num_layers
        return list(range(n - self.config.num_blocks, n))

    def edited_modules(self) -> list[str]:
        c = self.config
        if c.modules:
            return list(c.modules)
        if not self.task.is_language_model:
            return self.default_modules(c.num_blocks)
        if self.arch.is_seq2seq and c.layers is None:
            return self.arch.last_mlp_linears(c.num_blocks)
        layers = c.layers if c.layers is not None else self.default_layers()
        if c.only_mlp_out:
            return [self.arch.mlp_out(layer) for layer in layers]
        return [name for layer in layers for name in self.arch.mlp_linears(layer)]

    def locality_batches(self, requests: list) -> list:
        """Batches of what must not change: locality texts (language models) or the edits' locality_inputs."""
        c, task = self.config, self.task
        if task.is_language_model:
            texts = c.locality_texts or default_locality_texts()
            return [
                task.locality_batch(texts[i : i + c.locality_batch])
                for i in range(0, len(texts), c.locality_batch)
            ]
        given = [r.locality_inputs for r in requests if r.locality_inputs is not None]
        if not given:
            raise EditRequestError(f"{self.name} (kl_weight > 0) needs TensorEdit.locality_inputs")
        return [task.locality_batch(cat_inputs(given))]  # small models: all of them at every step

    def first_trained_block(self, modules: list[str]) -> int | None:
        """The lowest decoder block holding a trained module, when every one is inside a decoder block of a
        decoder-only language model (the blocks below it then compute the same at every step)."""
        if not self.task.is_language_model or self.arch.is_seq2seq:
            return None
        blocks = self.arch.stack("decoder")
        inside = [next((b.index for b in blocks if m.startswith(b.name + ".")), None) for m in modules]
        return None if None in inside else min(inside)

    def compute_deltas(self, requests: list) -> dict[str, Delta]:
        c, task = self.config, self.task
        torch.manual_seed(c.seed)
        modules = self.edited_modules()
        names = [f"{m}.weight" for m in modules]
        params = dict(self.model.named_parameters())
        base = {n: params[n].detach() for n in names}
        # The deltas and Adam's state in float32 whatever the model's dtype: Adam's eps (1e-8) underflows in
        # float16, and every step would be NaN. A float32 model's deltas are the same as before bit for bit.
        deltas = {n: torch.zeros_like(w, dtype=torch.float32, requires_grad=True) for n, w in base.items()}
        opt = torch.optim.Adam(deltas.values(), lr=c.lr)
        batches = [task.edit_batch(requests)]
        if c.kl_weight > 0:
            batches += self.locality_batches(requests)
        # The blocks below the first trained one see unchanged weights: record their outputs once per batch
        # and replay them at every step (exact; on the default model a step then runs 3 blocks of 30).
        first = self.first_trained_block(modules) if self.replay_blocks else None
        replays = [BlockReplay(self.model, first - 1) for _ in batches] if first else None
        before = [None] * len(batches)  # the original model's outputs of the locality batches, computed once
        for i, b in enumerate(batches):
            if replays or i:  # (the edit batch needs only its recording)
                with replays[i].recording([]) if replays else torch.no_grad():
                    before[i] = task.outputs(self.model, b)

        def outputs(i: int, edited: dict[str, torch.Tensor]):
            with replays[i].replaying(lambda hidden: hidden) if replays else contextlib.nullcontext():
                return task.outputs(self.model, batches[i], edited)

        for step in range(c.steps):
            edited = {n: base[n] + deltas[n].to(base[n].dtype) for n in names}
            losses = task.loss(outputs(0, edited), batches[0])
            if losses.max().item() < c.stop_nll:
                break
            loss = losses.mean()
            if c.kl_weight > 0:
                j = 1 + step % (len(batches) - 1)
                loss = loss + c.kl_weight * task.divergence(before[j], outputs(j, edited), batches[j])
            grads = torch.autograd.grad(loss, list(deltas.values()))
            for d, g in zip(deltas.values(), grads):
                d.grad = g
            opt.step()
            if c.norm_constraint is not None:
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(-c.norm_constraint, c.norm_constraint)
        return {n: d.detach().clone() for n, d in deltas.items()}


@register
class FineTuneL(FineTune):
    name = "ft-l"
    Config = FTLConfig
    strengthen = {"steps": 2.0, "stop_nll": 0.5, "norm_constraint": 2.0}  # its bound limits the most
    any_model = False  # ROME's language-model baseline: one MLP output projection of a transformer block

    def default_layers(self) -> list[int]:
        # An early MLP, where ROME's causal tracing finds factual recall at the subject's last token.
        # On the default model (30 blocks -> block 4) this kept neighbours intact better than block 9 or 15.
        return [round(0.15 * (self.arch.num_layers - 1))]


@register
class FineTuneKL(FineTune):
    name = "ft-kl"
    Config = FTKLConfig
