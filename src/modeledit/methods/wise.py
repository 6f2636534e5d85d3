"""WISE: a side memory with an activation router, knowledge sharding and merging (Wang et al. 2024, "WISE:
Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models").

Main memory: the MLP output projection W of one block (default: at 80% of the depth). Side memory: a copy
W' = W + dW of it. Edits only ever write dW; the model's weights are never touched.

Router (activation-based): with a_t the projection's input at position t, the activation score
s_t = |dW a_t|_2 is how much the side memory would change that position's output. A position uses the side
memory iff s_t >= eps, with eps = ``act_ratio`` x the smallest in-scope score recorded by the applied edits
(each edit records the smallest score over its in-scope positions: the paper's per-input mean becomes a
minimum because the decision is per position).
The decision is made per position, like GRACE's query, so teacher-forced scoring, padded batches and
generation route every position the same way (EasyEdit's WISE routes a whole batch on one mean score).

Editing trains dW by SGD on
    NLL(target | prompt; side memory at the in-scope positions)
    + [beta - s_in]_+ + [s_out - alpha]_+ + [gamma - (s_in - max s_out)]_+   (the paper's routing margins)
where the in-scope positions are those that predict target tokens (the prompt's last token, then the target's
tokens) and the out-of-scope ones are the prompt's earlier positions and every position of a few unrelated
texts. The margins are fractions of the projection's median output norm on those texts, so they follow the
model's scale. Each entry of the shard's dW stays within ``norm_constraint``. Blocks up to the edited one
are recorded once and replayed (``BlockReplay``): a step costs the later blocks only.

Knowledge sharding and merging: consecutive edits fill shards of ``edits_per_shard`` edits; every shard has
its own random mask keeping ``mask_ratio`` of dW's entries (gradients elsewhere are zeroed) and starts from
the merged side memory of the previous rounds; ``shards_per_merge`` shards make a round, merged by
Ties-Merge (trim each shard's change to its ``merge_density`` largest entries, elect a sign per entry, average
the changes that agree). The side memory in use is always W + the sum over rounds of Ties(shards of the
round), the current, still-growing round included.

The patch is the memory: one edit's change of its shard (the values at the shard's mask, and the mask,
bit-packed), its (round, shard) and its in-scope score. The side memory attached to a model is rebuilt from
the applied patches in order (a shard's sum is reused when edits were only appended), so reverting one patch
removes exactly its change and keeps every other.

Not implemented: WISE-Retrieve (one side memory per merged round, chosen by the router) and memory replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..editor import register
from ..hooks import BlockReplay, Trace
from ..lm import aligned_logits, mean_nll, target_batch, text_batch
from ..locality import default_locality_texts
from ..patch import Memory, applied_memories, applied_patches, attachment, register_memory
from ..requests import EditRequest
from .grace import MemoryEditor, module_and_layer, query_positions

KIND = "wise"


# -- masks and merging -------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte (row-major)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(shape)
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].astype(bool)).reshape(shape)


def shard_mask(shape: tuple[int, int], ratio: float, seed: int, round_: int, shard: int) -> torch.Tensor:
    """The random subspace of one shard: each entry kept with probability ``ratio``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + round_ * 1_009 + shard)
    return torch.rand(shape, generator=g) < ratio


def ties_merge(changes: list[torch.Tensor], density: float = 1.0) -> torch.Tensor:
    """Ties-Merge (Yadav et al. 2023) of task vectors: trim, elect sign, disjoint mean."""
    if len(changes) == 1:
        return changes[0].clone()
    trimmed = []
    for c in changes:
        if density < 1.0:
            k = max(int(density * c.count_nonzero()), 1)
            threshold = c.abs().flatten().kthvalue(c.numel() - k + 1).values
            c = torch.where(c.abs() >= threshold, c, torch.zeros_like(c))
        trimmed.append(c)
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


# -- the side memory ---------------------------------------------------------------------------------------


@dataclass
class Shard:
    mask: torch.Tensor  # bool, (out, in)
    members: list[Memory]  # the applied memories that wrote to it, in order
    change: torch.Tensor  # their summed change of dW


class SideMemory:
    """dW of one projection, replayed from the applied memories: shard sums, rounds merged by Ties.

    With ``previous`` (the side memory before the last apply or revert), a shard whose edits were only
    appended to reuses its sum (adding in the same order: bit for bit a fresh replay), and a round whose
    shards are all unchanged reuses its merge.
    """

    def __init__(self, module: str, memories: list[Memory], previous: SideMemory | None = None):
        self.module = module
        meta = memories[-1].meta
        self.shape = tuple(meta["shape"])
        self.density = float(meta["merge_density"])
        members: dict[tuple[int, int], list[Memory]] = {}
        for memory in memories:
            members.setdefault((int(memory.meta["round"]), int(memory.meta["shard"])), []).append(memory)
        self.shards: dict[tuple[int, int], Shard] = {}
        unchanged: set[tuple[int, int]] = set()
        for key, ms in members.items():
            old = previous.shards.get(key) if previous is not None else None
            reuse = (
                old is not None
                and len(old.members) <= len(ms)
                and all(a is b for a, b in zip(old.members, ms))
            )
            mask = old.mask if reuse else unpack_mask(ms[0].tensors["mask"], self.shape)
            change = old.change.clone() if reuse else torch.zeros(self.shape)
            for memory in ms[len(old.members) if reuse else 0 :]:
                change[mask] += memory.tensors["values"]
            self.shards[key] = Shard(mask, ms, change)
            if reuse and len(old.members) == len(ms):
                unchanged.add(key)
        self.rounds: dict[int, torch.Tensor] = {}
        for r in sorted({k[0] for k in self.shards}):
            keys = sorted(k for k in self.shards if k[0] == r)
            old_keys = sorted(k for k in previous.shards if k[0] == r) if previous is not None else None
            if previous is not None and keys == old_keys and all(k in unchanged for k in keys):
                self.rounds[r] = previous.rounds[r]
            else:
                self.rounds[r] = ties_merge([self.shards[k].change for k in keys], self.density)
        self.delta = torch.zeros(self.shape)
        for r in sorted(self.rounds):
            self.delta += self.rounds[r]
        scores = [float(m.meta["score"]) for m in memories]
        self.threshold = float(meta["act_ratio"]) * min(scores)

    def shard_start(self, round_: int, shard: int) -> torch.Tensor:
        """What a shard trains from: the merged earlier rounds plus its own edits so far."""
        start = torch.zeros(self.shape)
        for r in sorted(self.rounds):
            if r < round_:
                start += self.rounds[r]
        if (round_, shard) in self.shards:
            start += self.shards[(round_, shard)].change
        return start

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        change = F.linear(inputs[0], self.delta.to(device=output.device, dtype=output.dtype))
        route = change.norm(dim=-1) >= self.threshold
        if not bool(route.any()):
            return None  # no position routed: bit for bit the main memory's output
        return torch.where(route.unsqueeze(-1), output + change, output)


class SideMemories:
    """The side memories of every edited projection, as forward hooks."""

    def __init__(self, model: nn.Module, memories: list[Memory], previous: SideMemories | None):
        by_module: dict[str, list[Memory]] = {}
        for m in memories:
            by_module.setdefault(m.meta["module"], []).append(m)
        old = previous.sides if previous is not None else {}
        self.sides = {name: SideMemory(name, ms, old.get(name)) for name, ms in by_module.items()}
        self.handles = [model.get_submodule(n).register_forward_hook(s) for n, s in self.sides.items()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@register_memory(KIND)
def attach_side_memories(model: nn.Module, memories: list[Memory], previous: Any = None) -> SideMemories:
    return SideMemories(model, memories, previous if isinstance(previous, SideMemories) else None)


# -- the editor ------------------------------------------------------------------------------------------


@dataclass
class WISEConfig:
    """WISE: side memory (a copy of one MLP output projection), activation router, sharding and merging."""

    layer: int | None = None  # block whose MLP output projection gets a side memory (None: 80% of the depth)
    module: str | None = None  # explicit module (a linear layer inside a decoder block); overrides layer
    mask_ratio: float = 0.2  # share of the side memory's entries one shard may change (the paper's rho)
    edits_per_shard: int = 50  # consecutive edits written into one shard
    shards_per_merge: int = 2  # shards merged by Ties into the side memory (a round)
    merge_density: float = 1.0  # Ties' trim: share of each shard's changed entries kept when merging
    lr: float = 3.0  # SGD step size on the side memory (the paper: 1.0 with 70 steps; 3.0 reaches it in 20)
    steps: int = 20  # at most this many steps per edit
    stop_nll: float = 0.05  # stop once the target NLL is below this and the gamma margin holds
    norm_constraint: float | None = 1.0  # bound on each entry of a shard's change (None: unbounded)
    alpha: float = 0.05  # out-of-scope scores below alpha x the typical output norm
    beta: float = 0.3  # in-scope scores above beta x the typical output norm
    gamma: float = 0.2  # in-scope scores above the largest out-of-scope one by gamma x the norm
    margin_weight: float = 0.1  # weight of the routing margins (in norm units) against the target NLL
    act_ratio: float = 0.88  # routing threshold: act_ratio x the smallest in-scope score of the edits
    num_locality_texts: int = 8  # unrelated texts whose positions are out of scope
    locality_texts: list[str] | None = None  # None: the built-in unrelated sentences
    depth: float = 0.8  # where the default layer sits, as a fraction of the decoder's depth
    seed: int = 0  # of the shards' random masks


@register
class WISE(MemoryEditor):
    name = "wise"
    Config = WISEConfig
    strengthen = {"steps": 2.0, "stop_nll": 0.5}  # verify=True: train the side memory further
    memory_kind = KIND

    def __init__(self, model: nn.Module, tokenizer, config: WISEConfig):
        super().__init__(model, tokenizer, config)
        self.module, self.layer = module_and_layer(self.arch, config.layer, config.module, config.depth)
        self.weight = self.arch.weight_as_out_in(self.module)
        self.bias = getattr(self.arch.linear(self.module), "bias", None)
        self._locality: tuple[tuple, torch.Tensor, float] | None = None
        self.last_stats: dict[str, float] = {}

    # -- state of the model --------------------------------------------------------------------------------
    def _side(self) -> SideMemory | None:
        attached = attachment(self.model, KIND)
        return attached.sides.get(self.module) if attached is not None else None

    def _assign(self, memories: list[Memory]) -> tuple[int, int, torch.Tensor]:
        """(round, shard, mask) for the next edit: the last shard until it holds edits_per_shard edits."""
        c = self.config
        shape = tuple(self.weight.shape)
        if not memories:
            return 0, 0, shard_mask(shape, c.mask_ratio, c.seed, 0, 0)
        last = memories[-1].meta
        r, s = int(last["round"]), int(last["shard"])
        held = sum(int(m.meta["edits"]) for m in memories if (m.meta["round"], m.meta["shard"]) == (r, s))
        if held < c.edits_per_shard:
            return r, s, unpack_mask(memories[-1].tensors["mask"], shape)
        r, s = (r, s + 1) if s + 1 < c.shards_per_merge else (r + 1, 0)
        return r, s, shard_mask(shape, c.mask_ratio, c.seed, r, s)

    @torch.no_grad()
    def _locality_inputs(self) -> tuple[torch.Tensor, float]:
        """The projection's inputs at every position of the unrelated texts, and its median output norm."""
        key = tuple(p.id for p in applied_patches(self.model))  # earlier layers' patches change the inputs
        if self._locality is None or self._locality[0] != key:
            c = self.config
            texts = (c.locality_texts or default_locality_texts())[: c.num_locality_texts]
            batch = text_batch(self.tokenizer, texts, max_length=32)
            with Trace(
                self.model, [self.module], capture_input=True, capture_output=False, detach=True
            ) as tr:
                aligned_logits(self.model, batch)
            inputs = tr[self.module].input[batch["attention_mask"].bool()].float()
            unit = float(F.linear(inputs, self.weight.float()).norm(dim=-1).median())
            self._locality = (key, inputs, unit)
        return self._locality[1], self._locality[2]

    # -- editing ---------------------------------------------------------------------------------------
    def compute_memory(self, requests: list[EditRequest]) -> Memory:
        c = self.config
        memories = [m for m in applied_memories(self.model, KIND) if m.meta["module"] == self.module]
        round_, shard, mask = self._assign(memories)
        side = self._side()
        start = side.shard_start(round_, shard) if side is not None else torch.zeros(self.weight.shape)
        a_loc, unit = self._locality_inputs()

        seq2seq = self.arch.is_seq2seq
        batch = target_batch(
            self.tokenizer, [r.text for r in requests], [r.target_new for r in requests], seq2seq
        )
        replay = BlockReplay(self.model, self.layer)
        with replay.recording([self.module]) as tr:
            aligned_logits(self.model, batch)
        a = tr[self.module].input.float()  # (rows, positions, in)
        recorded = tr[self.module].output.float()
        base_out = F.linear(a, self.weight.float(), None if self.bias is None else self.bias.float())
        first = query_positions(batch, seq2seq)
        n_target = (batch["labels"] != -100).sum(-1)
        positions = torch.arange(a.shape[1])
        in_scope = (positions >= first[:, None]) & (positions < (first + n_target)[:, None])
        before = positions < first[:, None]  # the prompt's earlier positions (decoder-only)
        a_in, a_out = a[in_scope], torch.cat([a[before], a_loc])
        alpha, beta, gamma = c.alpha * unit, c.beta * unit, c.gamma * unit
        # Outside the in-scope positions the router should keep the main memory: train as it will be used.
        fixed = base_out - recorded

        change = torch.zeros_like(start, requires_grad=True)  # this edit's change of the shard
        maskf = mask.float()
        stats: dict[str, float] = {}
        with torch.enable_grad():
            for step in range(c.steps + 1):
                delta = start + change
                out_in = a_in @ delta.T  # the side memory's change at the in-scope positions
                scatter = torch.zeros_like(recorded).index_put((in_scope,), out_in)
                with replay.replaying(lambda hidden, s=scatter: hidden + (fixed + s).to(hidden.dtype)):
                    nll = mean_nll(self.model, batch).mean()
                s_in, s_out = out_in.norm(dim=-1), (a_out @ delta.T).norm(dim=-1)
                margin = (
                    F.relu(beta - s_in).mean()
                    + F.relu(s_out - alpha).mean()
                    + F.relu(gamma - (s_in - s_out.max())).mean()
                ) * c.margin_weight
                gap = float((s_in.min() - s_out.max()).detach())
                stats = {"nll": nll.item(), "margin": margin.item(), "gap": gap, "steps": step}
                if step == c.steps or (nll.item() < c.stop_nll and gap >= gamma):
                    break
                (grad,) = torch.autograd.grad(nll + margin, change)
                with torch.no_grad():
                    change -= c.lr * grad * maskf
                    if c.norm_constraint is not None:
                        bound = c.norm_constraint
                        change.copy_(torch.where(mask, (start + change).clamp(-bound, bound) - start, 0.0))
        with torch.no_grad():
            # per-position routing: the smallest in-scope score, so that every in-scope position routes
            score = float((a_in @ (start + change).T).norm(dim=-1).min())
        self.last_stats = stats | {"score": score, "unit": unit, "round": round_, "shard": shard}
        return Memory(
            kind=KIND,
            tensors={"mask": pack_mask(mask), "values": change.detach()[mask].contiguous()},
            meta={
                "module": self.module,
                "shape": list(mask.shape),
                "round": round_,
                "shard": shard,
                "edits": len(requests),
                "score": score,
                "act_ratio": c.act_ratio,
                "merge_density": c.merge_density,
                "stats": stats,
            },
        )
