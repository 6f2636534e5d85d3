"""Meta-training data for learned editors: batches of k edits with their generalisation and locality inputs.

A MetaBatch holds, tokenized and right-padded:
- ``edit``: the edit prompts with ``target_new`` (where an editor takes the edit from; k rows);
- ``gen``: the edit prompts and their paraphrases with ``target_new`` (the first ``n_new`` rows: what the
  edited model must now say), then the same prompts with ``target_true`` (to measure success: new beats true);
- ``loc``: neighbourhood prompts with their (true) answers, then unrelated texts: what must not change,
  compared at every label position (the answer tokens of neighbours, every token of the texts).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..forms import rendered
from ..lm import target_batch, text_batch
from ..locality import default_locality_texts
from ..requests import EditRequest
from ..tasks import TensorBatch, TensorEdit, cat_inputs

_PAD_VALUES = {"attention_mask": 0, "labels": -100}


def concat_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack the rows of right-padded batches, padding each 2-D key to its widest batch."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2:
            width = max(p.shape[1] for p in parts)
            value = _PAD_VALUES.get(key, pad_id)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return out


@dataclass
class MetaBatch:
    requests: list[EditRequest]
    edit: dict[str, torch.Tensor]
    gen: dict[str, torch.Tensor]
    n_new: int  # rows of ``gen`` scored with target_new; rows [n_new:] repeat them with target_true
    loc: dict[str, torch.Tensor] | None
    n_neighbours: int = 0  # rows [:n_neighbours] of ``loc`` are neighbourhood prompts, the rest texts
    # per neighbour row: its edit's target_new token where it first differs from the row's answer, and at
    # which answer position (-1: never differs; see first_divergence)
    nb_new_token: torch.Tensor | None = None
    nb_offset: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return len(self.requests)


def meta_batch(
    tokenizer, requests: list[EditRequest], texts: list[str], seq2seq: bool = False, max_text_tokens: int = 24
) -> MetaBatch:
    """Tokenize k edits (with their paraphrases and neighbours) and some unrelated texts into a MetaBatch;
    each edit's prompts in its form (question and chat edits as the model sees them: ``forms.rendered``)."""
    requests = [rendered(r, tokenizer) for r in requests]
    prompts = [r.text for r in requests] + [p for r in requests for p in r.paraphrase_prompts]
    new = [r.target_new for r in requests] + [r.target_new for r in requests for _ in r.paraphrase_prompts]
    true = [r.target_true for r in requests] + [r.target_true for r in requests for _ in r.paraphrase_prompts]
    scored_true = all(true)
    gen = target_batch(
        tokenizer, prompts * 2 if scored_true else prompts, new + true if scored_true else new, seq2seq
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loc_parts = []
    neighbours = [(p, a, r.target_new) for r in requests for p, a in r.neighborhood()]
    nb_new_token = nb_offset = None
    if neighbours:
        nb_prompts = [p for p, _, _ in neighbours]
        loc_parts.append(target_batch(tokenizer, nb_prompts, [a for _, a, _ in neighbours], seq2seq))
        new_labels = target_batch(tokenizer, nb_prompts, [n for _, _, n in neighbours], seq2seq)["labels"]
        nb_new_token, nb_offset = first_divergence(loc_parts[0]["labels"], new_labels)
    if texts:
        loc_parts.append(text_batch(tokenizer, texts, max_length=max_text_tokens))
    return MetaBatch(
        requests=list(requests),
        edit=target_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests], seq2seq),
        gen=gen,
        n_new=len(prompts),
        loc=concat_batches(loc_parts, pad) if loc_parts else None,
        n_neighbours=len(neighbours),
        nb_new_token=nb_new_token,
        nb_offset=nb_offset,
    )


def first_divergence(
    true_labels: torch.Tensor, new_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the new answer's token at the first answer position where it differs from the true one,
    and that position's offset from the answer's start (-1 where they never differ within the true answer:
    the teacher-forced true row holds no logits that decide between them there)."""
    tokens, offsets = [], []
    for true_row, new_row in zip(true_labels, new_labels):
        true_ids, new_ids = true_row[true_row != -100].tolist(), new_row[new_row != -100].tolist()
        j = next((i for i, (a, b) in enumerate(zip(true_ids, new_ids)) if a != b), None)
        tokens.append(new_ids[j] if j is not None else 0)
        offsets.append(j if j is not None else -1)
    return torch.tensor(tokens), torch.tensor(offsets)


class EditBatches:
    """``batches[i]`` is the i-th training batch, the same every time (so training can resume exactly):
    k edits from a seeded shuffle of the requests (a new shuffle each epoch) and ``texts_per_batch``
    unrelated texts drawn from ``locality_texts``."""

    def __init__(
        self,
        tokenizer,
        requests: list[EditRequest],
        edits_per_batch: int = 1,
        locality_texts: list[str] | None = None,
        texts_per_batch: int = 2,
        seed: int = 0,
        seq2seq: bool = False,
    ):
        if len(requests) < edits_per_batch:
            raise ValueError(f"{len(requests)} training edits, fewer than one batch of {edits_per_batch}")
        self.tokenizer, self.requests, self.k = tokenizer, requests, edits_per_batch
        self.texts = list(locality_texts) if locality_texts is not None else default_locality_texts()
        self.texts_per_batch, self.seed, self.seq2seq = min(texts_per_batch, len(self.texts)), seed, seq2seq
        self._order: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return len(self.requests) // self.k

    def __getitem__(self, i: int) -> MetaBatch:
        epoch, j = divmod(i, len(self))
        if self._order[0] != epoch:
            n = len(self.requests)
            self._order = (epoch, random.Random(self.seed * 100_003 + epoch).sample(range(n), n))
        order = self._order[1]
        requests = [self.requests[o] for o in order[j * self.k : (j + 1) * self.k]]
        texts = random.Random(self.seed * 100_003 + 7919 * i + 1).sample(self.texts, self.texts_per_batch)
        return meta_batch(self.tokenizer, requests, texts, self.seq2seq)


def validation_batches(
    tokenizer,
    requests: list[EditRequest],
    locality_texts: list[str] | None = None,
    texts_per_batch: int = 2,
    seq2seq: bool = False,
) -> list[MetaBatch]:
    """One batch per held-out edit (single edits, as they are evaluated), each with a few unrelated texts."""
    texts = list(locality_texts) if locality_texts is not None else default_locality_texts()
    n = min(texts_per_batch, len(texts))
    return [
        meta_batch(tokenizer, [r], [texts[(i * n + t) % len(texts)] for t in range(n)], seq2seq)
        for i, r in enumerate(requests)
    ]


def split_train_val(
    requests: list[EditRequest], val_size: int
) -> tuple[list[EditRequest], list[EditRequest]]:
    """The last ``val_size`` requests are held out for validation."""
    if not 0 < val_size < len(requests):
        raise ValueError(f"cannot hold out {val_size} of {len(requests)} edits for validation")
    return requests[:-val_size], requests[-val_size:]


def wiki_sentences(
    path: str | Path, limit: int | None = None, min_words: int = 6, max_words: int = 30
) -> list[str]:
    """Sentences of the ``context`` paragraphs of a SQuAD-style JSON list: unrelated text for locality."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    sentences, seen = [], set()
    for record in records:
        context = record.get("context", "") if isinstance(record, dict) else ""
        if context in seen:
            continue
        seen.add(context)
        for s in re.split(r"(?<=[.!?])\s+", context):
            if min_words <= len(s.split()) <= max_words:
                sentences.append(s.strip())
    if not sentences:
        raise ValueError(f"{path}: no sentences found in 'context' fields")
    return sentences[:limit]


# -- any model: tensors ------------------------------------------------------------------------------------


@dataclass
class TensorMetaBatch:
    """A meta-training batch for any model (a Task's TensorBatch rows): ``edit`` = the k edits' inputs and
    targets; ``gen`` = the same rows, then their equivalent inputs (all scored: n_new = every row);
    ``loc`` = locality inputs whose outputs must not change."""

    edit: TensorBatch
    gen: TensorBatch
    loc: TensorBatch | None = None
    n_neighbours: int = 0

    @property
    def k(self) -> int:
        return len(self.edit)

    @property
    def n_new(self) -> int:
        return len(self.gen)


def tensor_meta_batch(edits: list[TensorEdit]) -> TensorMetaBatch:
    """Stack TensorEdits (with their equivalent and locality inputs) into one TensorMetaBatch."""
    for e in edits:
        e.validate()
    edit = TensorBatch.cat([TensorBatch(e.inputs, e.targets) for e in edits])
    equivalents = [TensorBatch(*e.equivalent()) for e in edits if e.equivalent_inputs is not None]
    local = [e.locality_inputs for e in edits if e.locality_inputs is not None]
    return TensorMetaBatch(
        edit=edit,
        gen=TensorBatch.cat([edit, *equivalents]),
        loc=TensorBatch(cat_inputs(local)) if local else None,
    )
