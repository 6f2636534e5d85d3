"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al. 2023, "Aging with GRACE").

A discrete key-value codebook wraps one layer (default: the MLP output projection of the block at 80% of
the depth). Each entry holds a key k_i (the layer's *input* at an edited position), a value v_i (what the
layer *outputs* there instead), a deferral radius eps_i and the label v_i was trained for. At inference
every position's layer input h is a query: if its nearest key k_* lies within eps_*, the layer's output at
that position becomes v_*; otherwise the layer computes as usual. The base weights are never touched.

Adding an edit, with h its query, k_* the nearest key and d = |h - k_*| (the paper's rules):
- no key, or d > eps_* + eps_init: add (h, v, eps_init) and train v for the edit;
- overlap and the same label: expand, eps_* = max(eps_*, d) (k_* now covers h; nothing is trained);
- overlap and another label: split, eps_* = d / 2, and add (h, v, d / 2) with v trained for the edit.

Query position, defined per input and stateless: every position is a query. An edit stores one key per
position that predicts a target token: the prompt's last token (which predicts the first target token), then
the target's tokens but the last, each with its own value and the label "target#j". Attention is causal, so
the layer input at those positions depends only on the prompt and the target's earlier tokens: teacher-forced
scoring of any target after the prompt, right-padded batches and KV-cached generation all meet the keys at
exactly those positions, whatever was edited or run before. (EasyEdit's GRACE replaces the output at a token
index stored by the last edit, so scoring after many edits silently looks at the wrong position.) For
seq2seq models the codebook sits in the decoder and an edit's positions are the first decoder positions.

Values are trained together by Adam on the mean NLL of the target with the layer output replaced at the
edit's positions only, until the NLL is below ``stop_nll``. Blocks up to the codebook's are run once and
replayed (``BlockReplay``), so each step costs a forward and backward through the later blocks only.

The patch is the memory: its entries (key, value, radius, label, a stable id) and the radius changes it made
to earlier entries (by id). The codebook attached to a model is rebuilt from the applied patches in order,
so reverting one patch deletes its keys and undoes its expand/split changes, leaving the rest intact.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import Architecture
from ..editor import Editor, register
from ..hooks import BlockReplay
from ..lm import aligned_logits, mean_nll, target_batch
from ..patch import Delta, Memory, Patch, applied_memories, check_finite, register_memory
from ..requests import EditRequest

KIND = "grace"


# -- shared by the memory-based editors -------------------------------------------------------------------


class MemoryEditor(Editor):
    """An editor whose patch is a memory (``Patch.memory``) rather than weight deltas."""

    memory_kind: ClassVar[str]

    def make_patch(self, shown: list, requests: list) -> Patch:
        self._memory: Memory | None = None
        patch = super().make_patch(shown, requests)  # timing, the no-mutation guard; calls compute_deltas
        patch.memory = self._memory
        check_finite({}, patch.memory, method=self.name, hparams=patch.hparams)  # a diverged memory
        return patch

    def compute_deltas(self, requests: list[EditRequest]) -> dict[str, Delta]:
        self._memory = self.compute_memory(requests)
        return {}

    def compute_memory(self, requests: list[EditRequest]) -> Memory:
        raise NotImplementedError


def query_positions(batch: dict[str, torch.Tensor], seq2seq: bool) -> torch.Tensor:
    """Per row, the position whose output predicts the first target token (the prompt's last token)."""
    if seq2seq:
        return torch.zeros_like(batch["prompt_lengths"])
    return batch["prompt_lengths"] - 1


def module_and_layer(
    arch: Architecture, layer: int | None, module: str | None, depth: float
) -> tuple[str, int]:
    """The wrapped module and its block (default: the MLP output projection of the block at ``depth``)."""
    blocks = arch.stack("decoder")
    if module is not None:
        for b in blocks:
            if module.startswith(b.name + "."):
                return module, b.index
        raise ValueError(f"{module} is not inside a decoder block")
    n = len(blocks)
    index = layer if layer is not None else round(depth * (n - 1))
    if not -n <= index < n:
        raise ValueError(f"layer {index} out of range: the decoder has {n} blocks")
    index %= n
    return arch.mlp_out(index), index


# -- the codebook ---------------------------------------------------------------------------------------


@dataclass
class Entry:
    id: str
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str


def codebooks(memories: list[Memory]) -> dict[str, list[Entry]]:
    """module -> its entries, replaying the memories in order (their entries, then their radius changes)."""
    books: dict[str, dict[str, Entry]] = {}
    for memory in memories:
        book = books.setdefault(memory.meta["module"], {})
        keys, values = memory.tensors["keys"], memory.tensors["values"]
        for i, e in enumerate(memory.meta["entries"]):
            book[e["id"]] = Entry(e["id"], keys[i], values[i], float(e["radius"]), e["label"])
        for entry_id, radius in memory.meta.get("radius_updates", []):
            if entry_id in book:  # its patch may have been reverted
                book[entry_id].radius = float(radius)
    return {module: list(book.values()) for module, book in books.items() if book}


class Codebook:
    """The forward hook of one wrapped module: its output becomes v_* wherever its input is within eps_*."""

    def __init__(self, entries: list[Entry]):
        self.keys = torch.stack([e.key for e in entries]).float()
        self.values = torch.stack([e.value for e in entries])
        self.radii = torch.tensor([e.radius for e in entries])

    def lookup(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the nearest key, whether it is within its radius) for every query vector in ``h``."""
        flat = h.detach().reshape(-1, h.shape[-1]).float()
        dist = torch.cdist(flat, self.keys.to(flat.device))  # (queries, keys)
        nearest_dist, nearest = dist.min(-1)
        hit = nearest_dist <= self.radii.to(flat.device)[nearest]
        return nearest.view(h.shape[:-1]), hit.view(h.shape[:-1])

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        nearest, hit = self.lookup(inputs[0])
        if not bool(hit.any()):
            return None  # untouched: bit for bit what the layer computed
        values = self.values.to(device=output.device, dtype=output.dtype)[nearest]
        return torch.where(hit.unsqueeze(-1), values, output)


class CodebookAttachment:
    """The codebooks of every wrapped module, as forward hooks."""

    def __init__(self, model: nn.Module, memories: list[Memory]):
        self.handles = []
        self.codebooks: dict[str, Codebook] = {}
        for module, entries in codebooks(memories).items():
            book = Codebook(entries)
            self.codebooks[module] = book
            self.handles.append(model.get_submodule(module).register_forward_hook(book))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@register_memory(KIND)
def attach_codebooks(model: nn.Module, memories: list[Memory], previous: Any = None) -> CodebookAttachment:
    return CodebookAttachment(model, memories)


# -- the editor -----------------------------------------------------------------------------------------


@dataclass
class GRACEConfig:
    """GRACE: a key-value codebook at one layer, deferral radii, values trained per edit."""

    layer: int | None = None  # block whose MLP output projection is wrapped (None: 80% of the depth)
    module: str | None = None  # explicit module (a linear layer inside a decoder block); overrides layer
    epsilon_init: float | None = None  # initial deferral radius (None: epsilon_ratio x the key's norm)
    epsilon_ratio: float = 0.1  # other prompts' keys lie at >= 0.5 x a key's norm on the default model
    lr: float = 1.0  # Adam step size of the values (the paper's value learning rate)
    steps: int = 40  # at most this many steps per edit
    stop_nll: float = 0.05  # stop once the target's mean NLL is below this
    depth: float = 0.8  # where the default layer sits, as a fraction of the decoder's depth


@register
class GRACE(MemoryEditor):
    name = "grace"
    Config = GRACEConfig
    strengthen = {"steps": 2.0, "stop_nll": 0.5}  # verify=True: train the stored value further
    memory_kind = KIND

    def __init__(self, model: nn.Module, tokenizer, config: GRACEConfig):
        super().__init__(model, tokenizer, config)
        self.module, self.layer = module_and_layer(self.arch, config.layer, config.module, config.depth)
        self.last_stats: dict[str, int] = {}

    def compute_memory(self, requests: list[EditRequest]) -> Memory:
        c = self.config
        current = codebooks(applied_memories(self.model, KIND)).get(self.module, [])
        book = {e.id: e for e in current}  # what the model holds, plus what this patch adds
        own: list[Entry] = []
        radius_updates: dict[str, float] = {}
        stats = self.last_stats = {"added": 0, "expanded": 0, "split": 0, "steps": 0}
        for r in requests:
            batch = target_batch(self.tokenizer, [r.text], [r.target_new], self.arch.is_seq2seq)
            replay = BlockReplay(self.model, self.layer)
            with replay.recording([self.module]) as tr:
                aligned_logits(self.model, batch)
            first = int(query_positions(batch, self.arch.is_seq2seq)[0])
            n_target = int((batch["labels"][0] != -100).sum())
            label = r.target_new.strip()
            # One key per position that predicts a target token: the prompt's last token, then the target's
            # tokens but the last (so that generation and teacher forcing meet every key).
            trained: dict[int, torch.Tensor] = {}  # position -> initial value (to train)
            fixed: dict[int, torch.Tensor] = {}  # position -> value of an expanded entry
            radii: dict[int, float] = {}
            for j, pos in enumerate(range(first, first + n_target)):
                key = tr[self.module].input[0, pos].float()
                eps_init = (
                    c.epsilon_init if c.epsilon_init is not None else c.epsilon_ratio * float(key.norm())
                )
                nearest, d = _nearest(book, key)
                if nearest is not None and d <= nearest.radius + eps_init:
                    if nearest.label == f"{label}#{j}":  # expand: the nearest key now covers this input
                        stats["expanded"] += 1
                        if d > nearest.radius:
                            self._set_radius(nearest, d, own, radius_updates)
                        fixed[pos] = nearest.value
                        continue
                    stats["split"] += 1  # split: both radii become half the distance
                    self._set_radius(nearest, d / 2, own, radius_updates)
                    radii[pos] = d / 2
                else:
                    stats["added"] += 1
                    radii[pos] = eps_init
                trained[pos] = tr[self.module].output[0, pos]
            values = self._train_values(replay, batch, tr[self.module].output[0], trained, fixed)
            for j, pos in enumerate(range(first, first + n_target)):
                if pos in trained:
                    key = tr[self.module].input[0, pos].float().clone()
                    entry = Entry(uuid.uuid4().hex[:12], key, values[pos], radii[pos], f"{label}#{j}")
                    own.append(entry)
                    book[entry.id] = entry
        keys = torch.stack([e.key for e in own]) if own else torch.zeros(0, 0)
        values = torch.stack([e.value for e in own]) if own else torch.zeros(0, 0)
        return Memory(
            kind=KIND,
            tensors={"keys": keys.contiguous(), "values": values.contiguous()},
            meta={
                "module": self.module,
                "entries": [{"id": e.id, "radius": e.radius, "label": e.label} for e in own],
                "radius_updates": [[k, v] for k, v in radius_updates.items()],
                "stats": stats,
            },
        )

    @staticmethod
    def _set_radius(entry: Entry, radius: float, own: list[Entry], updates: dict[str, float]) -> None:
        entry.radius = radius
        if not any(e is entry for e in own):  # an earlier patch's entry: recorded as a change
            updates[entry.id] = radius

    def _train_values(
        self,
        replay: BlockReplay,
        batch: dict,
        recorded: torch.Tensor,
        trained: dict[int, torch.Tensor],
        fixed: dict[int, torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """Adam on the target NLL, the module's output replaced at the trained (and expanded) positions."""
        c = self.config
        values = {pos: v.detach().clone().float().requires_grad_(True) for pos, v in trained.items()}
        if not values:
            return {}
        opt = torch.optim.Adam(list(values.values()), lr=c.lr)
        recorded = recorded.detach().float()  # (positions, d_out): the module's output in the recorded pass

        def edit_last(hidden: torch.Tensor) -> torch.Tensor:
            rows = [torch.zeros_like(recorded[0])] * recorded.shape[0]
            for pos, v in fixed.items():
                rows[pos] = v.float() - recorded[pos]
            for pos, v in values.items():
                rows[pos] = v - recorded[pos]
            return hidden + torch.stack(rows).unsqueeze(0).to(hidden.dtype)

        with torch.enable_grad(), replay.replaying(edit_last):
            step = 0
            for step in range(c.steps):  # noqa: B007 (the count is reported)
                nll = mean_nll(self.model, batch)[0]
                if nll.item() < c.stop_nll:
                    break
                opt.zero_grad()
                nll.backward()
                opt.step()
        self.last_stats["steps"] = self.last_stats.get("steps", 0) + step
        return {pos: v.detach().to(recorded.dtype).clone() for pos, v in values.items()}


def _nearest(book: dict[str, Entry], key: torch.Tensor) -> tuple[Entry | None, float]:
    if not book:
        return None, float("inf")
    entries = list(book.values())
    dists = torch.cdist(key[None], torch.stack([e.key for e in entries]).float())[0]
    i = int(dists.argmin())
    return entries[i], float(dists[i])
