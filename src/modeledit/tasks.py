"""What an edit optimises, for any ``nn.Module``: a Task.

The gradient-based editors (FT, FT-KL, MEND, ENN) need only three things from a model: a batch of edits, a
per-edit loss, and a way to compare outputs before and after an edit (locality). A Task supplies them:

    batch = task.edit_batch(edits)                  edits -> one batch (tokenized text, or stacked tensors)
    out   = task.outputs(model, batch, params)      forward pass, some weights replaced by ``params``
    loss  = task.loss(out, batch)                   (n,) one loss per edit
    task.divergence(before, after, batch)           () how far the outputs moved: the locality penalty
    task.correct(out, batch)                        (n,) bool: the model now gives the target

Language models are one client (``LanguageModelTask``: EditRequest in, teacher-forced NLL of the target, KL
of next-token distributions). Any other model is edited with a ``TensorEdit`` (inputs and targets as tensors)
and a ``ClassificationTask`` (also per-token sequence outputs), ``RegressionTask`` or ``LossTask`` (your
own loss function). ``resolve_task`` turns ``task="classification" | "regression" | "sequence" | callable``
into one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .lm import aligned_logits, is_seq2seq, kl_on_positions, row_nll, target_batch, text_batch
from .requests import EditRequest, EditRequestError, model_context

Inputs = torch.Tensor | dict[str, torch.Tensor]


# -- generic edits: tensors in, targets out ---------------------------------------------------------------


def num_rows(inputs: Inputs) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0])


def cat_inputs(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@dataclass
class TensorEdit:
    """An edit of any model: on ``inputs`` (batch first: n examples) it should output ``targets`` (n, ...).

    ``equivalent_inputs`` mean the same thing and should follow (their targets default to ``targets``;
    used to meta-train and to measure generalisation); ``locality_inputs`` must keep their outputs (FT-KL's
    penalty, meta-training). A tensor or a dict of tensors (keyword arguments of ``model(**inputs)``).
    """

    inputs: Inputs
    targets: torch.Tensor
    equivalent_inputs: Inputs | None = None
    equivalent_targets: torch.Tensor | None = None
    locality_inputs: Inputs | None = None

    def __len__(self) -> int:
        return num_rows(self.inputs)

    def validate(self) -> None:
        """Raise EditRequestError for anything an editor cannot use (one line, naming the field)."""
        for name in ("inputs", "equivalent_inputs", "locality_inputs"):
            value = getattr(self, name)
            if value is None and name != "inputs":
                continue
            tensors = list(value.values()) if isinstance(value, dict) else [value]
            if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
                raise EditRequestError(f"TensorEdit.{name} must be a batch-first tensor or a dict of them")
            if len({int(t.shape[0]) for t in tensors}) != 1 or int(tensors[0].shape[0]) == 0:
                raise EditRequestError(
                    f"TensorEdit.{name}: needs at least one row, the same number per tensor"
                )
            if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
                raise EditRequestError(f"TensorEdit.{name} holds NaN or infinite values")
        for inputs, targets, name in (
            (self.inputs, self.targets, "targets"),
            (self.equivalent_inputs, self.equivalent_targets, "equivalent_targets"),
        ):
            if targets is None:
                continue
            if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
                raise EditRequestError(f"TensorEdit.{name} must be a tensor with one row per input")
            if int(targets.shape[0]) != num_rows(inputs):
                raise EditRequestError(
                    f"TensorEdit.{name} has {targets.shape[0]} rows for {num_rows(inputs)} inputs"
                )
            if targets.is_floating_point() and not torch.isfinite(targets).all():
                raise EditRequestError(f"TensorEdit.{name} holds NaN or infinite values")

    def equivalent(self) -> tuple[Inputs, torch.Tensor] | None:
        """The equivalent inputs with their targets (the edit's targets when not given and shapes allow)."""
        if self.equivalent_inputs is None:
            return None
        targets = self.equivalent_targets
        if targets is None:
            n = num_rows(self.equivalent_inputs)
            if len(self) != 1 and len(self) != n:
                raise EditRequestError(
                    "TensorEdit.equivalent_targets is needed: edit and equivalents differ in size"
                )
            targets = self.targets.expand(n, *self.targets.shape[1:]) if len(self) == 1 else self.targets
        return self.equivalent_inputs, targets

    def to_dict(self) -> dict:
        """A JSON summary for a patch's record (the tensors themselves are not stored)."""
        info: dict[str, Any] = {"kind": "tensor", "n": len(self), "target_shape": list(self.targets.shape)}
        if self.targets.numel() <= 64:
            info["targets"] = self.targets.tolist()
        return info


@dataclass
class TensorBatch:
    """Stacked inputs and targets (targets None for locality inputs)."""

    inputs: Inputs
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return num_rows(self.inputs)

    @staticmethod
    def cat(batches: list[TensorBatch]) -> TensorBatch:
        targets = [b.targets for b in batches]
        return TensorBatch(
            cat_inputs([b.inputs for b in batches]),
            None if any(t is None for t in targets) else torch.cat(targets),
        )


def run_model(
    model: nn.Module, inputs: Inputs, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """``model(inputs)`` (or ``model(**inputs)``), with weights replaced functionally by ``params``.

    Hugging Face style outputs give their ``logits``, tuples their first element.
    """
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else ((inputs,), {})
    device = next(model.parameters()).device
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    if params is None:
        out = model(*args, **kwargs)
    else:
        out = functional_call(model, params, args, kwargs, strict=False)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


class Task:
    """How edits become batches, losses and locality penalties (see the module docstring)."""

    is_language_model = False

    def validate(self, edits: list, editor) -> None:
        raise NotImplementedError

    def edit_batch(self, edits: list) -> Any:
        raise NotImplementedError

    def locality_batch(self, inputs: Any) -> Any:
        raise NotImplementedError

    def outputs(self, model: nn.Module, batch: Any, params: dict[str, torch.Tensor] | None = None) -> Any:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def divergence(self, before: Any, after: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, outputs: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    # -- meta-training: one place for the statistics every learned editor logs ---------------------------
    def locality_penalty(
        self, before: Any, after: Any, meta_batch: Any, stats: dict, key: str
    ) -> torch.Tensor:
        """The locality term of a learned editor's training loss; records it (and agreement) in ``stats``."""
        value = self.divergence(before, after, meta_batch.loc)
        stats[key] = value.item()
        return value

    def success_stats(self, gen_out: Any, gen_loss: torch.Tensor, meta_batch: Any, stats: dict) -> None:
        """es / ps: the share of edit rows / equivalent rows the edited model gets right."""
        ok = self.correct(gen_out, meta_batch.gen).float() * 100
        stats["es"] = float(ok[: meta_batch.k].mean())
        if len(ok) > meta_batch.k:
            stats["ps"] = float(ok[meta_batch.k :].mean())


class TensorTask(Task):
    """Base of the generic tasks: TensorEdit in, ``run_model`` forward."""

    def validate(self, edits: list, editor) -> None:
        for e in edits:
            if not isinstance(e, TensorEdit):
                raise EditRequestError(
                    f"{editor.name} with task {type(self).__name__} edits TensorEdit, not {type(e).__name__}"
                )
            e.validate()
            self.check_targets(e.targets, "targets")
            if e.equivalent_targets is not None:
                self.check_targets(e.equivalent_targets, "equivalent_targets")

    def check_targets(self, targets: torch.Tensor, name: str) -> None:
        pass

    def edit_batch(self, edits: list[TensorEdit]) -> TensorBatch:
        return TensorBatch(cat_inputs([e.inputs for e in edits]), torch.cat([e.targets for e in edits]))

    def locality_batch(self, inputs: Inputs) -> TensorBatch:
        return TensorBatch(inputs)

    def outputs(self, model: nn.Module, batch: TensorBatch, params=None) -> torch.Tensor:
        return run_model(model, batch.inputs, params)


class ClassificationTask(TensorTask):
    """Cross-entropy on logits (n, C) with class targets (n,), or per token: (n, T, C) with targets (n, T),
    -100 ignored (a tagger, a translation model's teacher-forced outputs). Locality: KL of the softmax."""

    def check_targets(self, targets: torch.Tensor, name: str) -> None:
        if targets.is_floating_point():
            raise EditRequestError(f"TensorEdit.{name} must hold class indices (integers) for classification")

    def loss(self, outputs: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        targets = batch.targets.to(outputs.device)
        if outputs.dim() == 2:
            return F.cross_entropy(outputs.float(), targets, reduction="none")
        per_token = F.cross_entropy(outputs.float().transpose(1, -1), targets, reduction="none")
        mask = targets != -100
        return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def divergence(self, before: torch.Tensor, after: torch.Tensor, batch: Any) -> torch.Tensor:
        logp_before, logp_after = F.log_softmax(before.float(), -1), F.log_softmax(after.float(), -1)
        return (logp_before.exp() * (logp_before - logp_after)).sum(-1).mean()

    def correct(self, outputs: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        targets = batch.targets.to(outputs.device)
        hit = outputs.argmax(-1) == targets
        if outputs.dim() == 2:
            return hit
        return (hit | (targets == -100)).all(-1)


class RegressionTask(TensorTask):
    """Mean squared error per example; correct when every output is within ``tolerance`` of its target."""

    def __init__(self, tolerance: float = 0.1):
        self.tolerance = tolerance

    def check_targets(self, targets: torch.Tensor, name: str) -> None:
        if not targets.is_floating_point():
            raise EditRequestError(f"TensorEdit.{name} must be floating point for regression")

    def loss(self, outputs: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        diff = outputs.float() - batch.targets.to(outputs.device).float().reshape(outputs.shape)
        return diff.pow(2).flatten(1).mean(-1)

    def divergence(self, before: torch.Tensor, after: torch.Tensor, batch: Any) -> torch.Tensor:
        return (after.float() - before.float()).pow(2).mean()

    def correct(self, outputs: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        diff = outputs.float() - batch.targets.to(outputs.device).float().reshape(outputs.shape)
        return (diff.abs() <= self.tolerance).flatten(1).all(-1)


class LossTask(RegressionTask):
    """Your own loss: ``loss_fn(outputs, targets) -> (n,)`` per example (a scalar is spread over the rows).

    Locality compares outputs by mean squared difference unless ``divergence_fn(before, after)`` is given;
    ``correct_fn(outputs, targets) -> (n,) bool`` defaults to loss below ``tolerance``.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        divergence_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        correct_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        tolerance: float = 0.05,
    ):
        super().__init__(tolerance)
        self.loss_fn, self.divergence_fn, self.correct_fn = loss_fn, divergence_fn, correct_fn

    def check_targets(self, targets: torch.Tensor, name: str) -> None:
        pass

    def loss(self, outputs: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        value = self.loss_fn(outputs, batch.targets.to(outputs.device))
        return value.expand(len(batch)) if value.dim() == 0 else value

    def divergence(self, before: torch.Tensor, after: torch.Tensor, batch: Any) -> torch.Tensor:
        if self.divergence_fn is not None:
            return self.divergence_fn(before, after)
        return super().divergence(before, after, batch)

    def correct(self, outputs: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        if self.correct_fn is not None:
            return self.correct_fn(outputs, batch.targets.to(outputs.device))
        return self.loss(outputs, batch).detach() < self.tolerance


# -- language models: one client of the same interface --------------------------------------------------


class LanguageModelTask(Task):
    """EditRequests; loss = mean NLL of ``target_new`` after the prompt; locality = KL of next-token
    distributions at the labelled positions. Outputs are (aligned logits, labels)."""

    is_language_model = True

    def __init__(self, tokenizer, seq2seq: bool = False):
        self.tokenizer, self.seq2seq = tokenizer, seq2seq

    def validate(self, edits: list, editor) -> None:
        max_len = model_context(editor.model)
        for r in edits:
            if not isinstance(r, EditRequest):
                raise EditRequestError(
                    f"{editor.name} on a language model edits EditRequest objects, got {type(r).__name__}"
                )
            r.validate(needs_subject=editor.needs_subject, tokenizer=self.tokenizer, max_length=max_len)

    def edit_batch(self, edits: list[EditRequest]) -> dict[str, torch.Tensor]:
        return target_batch(
            self.tokenizer, [r.text for r in edits], [r.target_new for r in edits], self.seq2seq
        )

    def locality_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return text_batch(self.tokenizer, texts)

    def outputs(self, model: nn.Module, batch: dict, params=None) -> tuple[torch.Tensor, torch.Tensor]:
        return aligned_logits(model, batch, params)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: Any) -> torch.Tensor:
        return row_nll(*outputs)

    def divergence(self, before, after, batch: Any) -> torch.Tensor:
        return kl_on_positions(before[0], after[0], after[1] != -100)

    def correct(self, outputs, batch: Any) -> torch.Tensor:
        logits, labels = outputs
        return ((logits.argmax(-1) == labels) | (labels == -100)).all(-1)

    def locality_penalty(self, before, after, meta_batch, stats: dict, key: str) -> torch.Tensor:
        """KL at the labelled positions of the locality rows: the neighbourhood rows' mean plus the unrelated
        texts' mean (a neighbour's one answer token is not drowned by a sentence's many tokens)."""
        (logits_before, labels), (logits_after, _) = before, after
        mask = labels != -100
        neighbour = torch.arange(len(mask), device=mask.device) < meta_batch.n_neighbours
        agree = (logits_before.argmax(-1) == logits_after.argmax(-1)) & mask
        kl = logits_before.new_zeros(())
        for part, rows in (("nb", neighbour), ("text", ~neighbour)):
            if rows.any():
                value = kl_on_positions(logits_before[rows], logits_after[rows], mask[rows])
                kl = kl + value
                stats[f"{key}_{part}"] = value.item()
                stats[f"agree_{part}"] = 100.0 * (agree[rows].sum() / mask[rows].sum().clamp(min=1)).item()
        stats[key] = kl.item()
        return kl

    def neighbour_margin(self, before, after, meta_batch, stats: dict) -> torch.Tensor:
        """Mean rise, over the neighbourhood rows, of log p(new) - log p(true) at the first answer token
        where the edit's target_new and the neighbour's answer differ: the edit's target must not gain on
        prompts that share the relation but not the subject (what NS counts). The KL barely sees this: a
        neighbour's p(new) going from 0.001 to 0.01 costs little KL but can flip NS."""
        (logits_before, labels), (logits_after, _) = before, after
        offset = meta_batch.nb_offset.to(labels.device)
        rows = torch.arange(meta_batch.n_neighbours, device=labels.device)[offset >= 0]
        if len(rows) == 0:
            return logits_after.new_zeros(())
        at = (labels[rows] != -100).int().argmax(-1) + offset[rows]
        true, new = labels[rows, at], meta_batch.nb_new_token.to(labels.device)[rows]
        margins = []
        for logits in (logits_before, logits_after):
            logp = F.log_softmax(logits[rows, at].float(), -1)
            margins.append(logp.gather(1, new[:, None]).squeeze(1) - logp.gather(1, true[:, None]).squeeze(1))
        rise = F.relu(margins[1] - margins[0].detach())
        stats["nb_flipped"] = 100.0 * ((margins[0] < 0) & (margins[1] > 0)).float().mean().item()
        stats["nb_margin"] = rise.mean().item()
        return rise.mean()

    def success_stats(self, gen_out, gen_loss: torch.Tensor, meta_batch, stats: dict) -> None:
        """es / ps: share of rewrite / paraphrase rows where target_new beats target_true (rows [n_new:])."""
        if gen_loss.shape[0] > meta_batch.n_new:
            success = (gen_loss[: meta_batch.n_new] < gen_loss[meta_batch.n_new :]).float().detach() * 100
            stats["es"] = float(success[: meta_batch.k].mean())
            if meta_batch.n_new > meta_batch.k:
                stats["ps"] = float(success[meta_batch.k :].mean())


TASKS: dict[str, Callable[[], Task]] = {
    "classification": ClassificationTask,
    "sequence": ClassificationTask,  # per-token classification: outputs (n, T, C), targets (n, T)
    "regression": RegressionTask,
}


def resolve_task(task: Task | str | Callable | None, model: nn.Module, tokenizer=None) -> Task:
    """A Task from a Task, a name (classification, sequence, regression), a loss function, or a tokenizer."""
    if isinstance(task, Task):
        return task
    if task is None:
        if tokenizer is None:
            raise ValueError(
                "give a tokenizer (language models) or task='classification' | 'sequence' | 'regression' | "
                "a loss function (any other model)"
            )
        return LanguageModelTask(tokenizer, is_seq2seq(model))
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use {', '.join(TASKS)}, a Task or a loss function")
        return TASKS[task]()
    if callable(task):
        return LossTask(task)
    raise ValueError(f"task must be a Task, a name or a loss function, got {type(task).__name__}")
