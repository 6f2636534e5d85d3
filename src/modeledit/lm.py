"""Teacher-forced scoring of targets after prompts: the one loss every method and metric uses.

A target is scored as ROME does: the tokens of ``" " + target`` appended to the prompt's tokens
(decoder-only), or the target as the decoder's labels (seq2seq); after a prompt that ends in a newline (a
chat turn, a question's answer line) without the space (``forms.answer_text``). Batches are
right-padded; ``labels`` is -100 outside targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .forms import answer_text


def target_ids(tokenizer, target: str, seq2seq: bool = False, prompt: str = "") -> list[int]:
    """The target's tokens as they follow ``prompt`` (see ``forms.answer_text``)."""
    text = target if seq2seq else answer_text(prompt, target)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt.rstrip(" "))["input_ids"]


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def target_batch(
    tokenizer, prompts: list[str], targets: list[str], seq2seq: bool = False
) -> dict[str, torch.Tensor]:
    """A right-padded batch scoring ``targets[i]`` after ``prompts[i]``.

    Keys: input_ids, attention_mask, labels (target ids at the positions that *predict* them are found
    by shifting; for decoder-only models labels are aligned with input_ids as in transformers),
    and ``prompt_lengths`` (tokens before the target).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if seq2seq:
        enc = [prompt_ids(tokenizer, p) for p in prompts]
        dec = [target_ids(tokenizer, t, seq2seq=True) for t in targets]
        return {
            "input_ids": _pad(enc, pad),
            "attention_mask": _pad([[1] * len(e) for e in enc], 0),
            "labels": _pad(dec, -100),
            "prompt_lengths": torch.tensor([len(e) for e in enc]),
        }
    seqs, labels, lengths = [], [], []
    for p, t in zip(prompts, targets):
        pi, ti = prompt_ids(tokenizer, p), target_ids(tokenizer, t, prompt=p)
        seqs.append(pi + ti)
        labels.append([-100] * len(pi) + ti)
        lengths.append(len(pi))
    return {
        "input_ids": _pad(seqs, pad),
        "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
        "labels": _pad(labels, -100),
        "prompt_lengths": torch.tensor(lengths),
    }


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def model_inputs(batch: dict[str, torch.Tensor], seq2seq: bool) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels") if seq2seq else ("input_ids", "attention_mask")
    return {k: batch[k] for k in keys}


def forward(model: nn.Module, inputs: dict, params: dict[str, torch.Tensor] | None = None):
    """``model(**inputs)``, with some parameters replaced by ``params`` (name -> tensor) if given.

    The replacement is functional: the model's own weights are not touched, and gradients flow into
    ``params`` (how FT trains its deltas and MEND its editor).
    """
    if params is None:
        return model(**inputs)
    return functional_call(model, params, args=(), kwargs=inputs, strict=False)


def aligned_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) aligned so that logits[:, i] predicts labels[:, i]; labels -100 outside targets."""
    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(batch, seq2seq).items()}
    labels = batch["labels"].to(device)
    if seq2seq:
        return forward(model, inputs, params).logits, labels
    # Only positions that predict a target token need the (vocabulary-sized) LM head: keep the span from
    # the shortest prompt's last token on. On a 135M model with a 49k vocabulary this halves the cost.
    start = max(int(batch["prompt_lengths"].min()) - 1, 0)
    keep = torch.arange(start, labels.shape[1] - 1, device=device)
    logits = forward(model, inputs | {"logits_to_keep": keep}, params).logits
    return logits, labels[:, start + 1 :]


def token_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the targets and their mask, each (batch, positions)."""
    logits, labels = aligned_logits(model, batch, params)
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def mean_nll(
    model: nn.Module, batch: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean per-token NLL of each item's target, shape (batch,). Differentiable."""
    logp, mask = token_logprobs(model, batch, params)
    return -(logp.sum(-1) / mask.sum(-1).clamp(min=1))


def kl_on_positions(
    logits_before: torch.Tensor, logits_after: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over masked positions of KL(p_before || p_after): the locality penalty of FT+KL and MEND."""
    logp_before = F.log_softmax(logits_before.float(), -1)
    logp_after = F.log_softmax(logits_after.float(), -1)
    kl = (logp_before.exp() * (logp_before - logp_after)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each row's labelled tokens, from aligned logits."""
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def text_perplexity(
    model: nn.Module, tokenizer, texts: list[str], params: dict | None = None, batch_size: int = 16
) -> float:
    """exp(mean token NLL) of the texts (every token after the first is scored), with ``params`` in place."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = text_batch(tokenizer, texts[i : i + batch_size])
        logits, labels = aligned_logits(model, batch, params=params)
        mask = labels != -100
        total += float((row_nll(logits, labels) * mask.sum(-1)).sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def text_batch(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Right-padded batch of plain texts, every token a target (for perplexity and KL on unrelated text)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    return {
        "input_ids": _pad(rows, pad),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0),
        "labels": _pad(rows, -100),
        "prompt_lengths": torch.zeros(len(rows), dtype=torch.long),
    }


def left_padded(tokenizer, texts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``generate`` (new tokens then line up at the end of every row), leaving the
    tokenizer's own padding side as it was."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuations (left-padded batch)."""
    device = next(model.parameters()).device
    enc = left_padded(tokenizer, [p.rstrip(" ") for p in prompts], device)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new = out if is_seq2seq(model) else out[:, enc["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]
