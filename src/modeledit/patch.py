"""A Patch: what an edit changes, as parameter deltas (dense or low-rank) or a memory; reversible bit for bit.

Applying a patch keeps, once per touched parameter, a copy of its base value on the model. Reverting any
applied patch (not only the last) restores the base values and re-adds the remaining patches in their
order, so the weights always equal ``base + patches`` computed the same way: no floating-point drift from
subtract-and-add, and the result equals a fresh replay bit for bit.

Memory-based editors (GRACE, WISE, SERAC) leave the weights alone and add a *memory* instead: a
``Memory`` (a registered ``kind``, tensors, JSON) carried by the patch. The same replay rule holds: the
memories of all applied patches of one kind, in order, are handed to that kind's ``attach`` function,
which installs forward hooks built from them; applying or reverting any patch re-attaches from the
remaining memories, and when none is left the hooks are gone and the model computes exactly what the
base model computes.

File format: one safetensors file; tensors ``dense/<param>`` or ``a/<param>`` and ``b/<param>``
(delta = a @ b, in the parameter's storage layout) and ``memory/<name>``; JSON metadata (method,
hyperparameters, requests, model fingerprint, memory kind and JSON, and ``tensors_sha256``, the checksum of
the tensors, verified on load; files written before it existed load without the check) in the safetensors
header under the key ``modeledit``. Never pickle.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .arch import is_transposed
from .models import fingerprint

FORMAT_VERSION = 2  # 2: optional memory (``memory/<name>`` tensors, "memory" metadata); reads 1 too


class PatchError(ValueError):
    """A patch cannot be applied, reverted, saved or loaded; the message says why."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a patch file's tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LowRank:
    """delta = a @ b, with a (rows, r) and b (r, cols) in the parameter's storage layout."""

    a: torch.Tensor
    b: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.a @ self.b

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])


Delta = torch.Tensor | LowRank


def linear_delta(
    model: nn.Module, module_name: str, left: torch.Tensor, right: torch.Tensor
) -> tuple[str, LowRank]:
    """A low-rank delta ``left @ right`` given in (out, in) orientation for a linear layer's weight.

    Handles GPT-2's Conv1D, whose weight is stored as (in, out): the factors are transposed and swapped.
    """
    module = model.get_submodule(module_name)
    if is_transposed(module):
        return f"{module_name}.weight", LowRank(right.T.contiguous(), left.T.contiguous())
    return f"{module_name}.weight", LowRank(left.contiguous(), right.contiguous())


def linear_dense_delta(
    model: nn.Module, module_name: str, delta_out_in: torch.Tensor
) -> tuple[str, torch.Tensor]:
    module = model.get_submodule(module_name)
    return f"{module_name}.weight", (delta_out_in.T if is_transposed(module) else delta_out_in).contiguous()


# Hyperparameters that set how far an optimisation or a learned editor moves the weights: where a
# non-finite delta comes from. A name matches if it is one of these or contains "lr" or "alpha".
_STEP_HPARAMS = ("steps", "norm_constraint", "clamp_norm", "mom2_update_weight", "l2", "epsilon_init")


_HALF = (torch.float16, torch.bfloat16)  # where Adam's eps underflows and large deltas overflow


def _step_hparams(hparams: dict[str, Any]) -> str:
    """What to change after a divergence: the step-size settings in ``hparams`` with their values."""
    names = [k for k in hparams if k in _STEP_HPARAMS or "lr" in k.split("_") or "alpha" in k]
    if not names:
        return "change the method's step-size settings"
    rates = [k for k in names if "lr" in k.split("_") or "alpha" in k]
    hint = f", e.g. a smaller {rates[0]}" if rates else ""
    return "change " + ", ".join(f"{k}={hparams[k]!r}" for k in names) + hint


def check_finite(
    deltas: dict[str, Delta],
    memory: Memory | None = None,
    *,
    method: str = "",
    hparams: dict[str, Any] | None = None,
    where: str = "",
) -> None:
    """Raise ``PatchError`` if any delta (both factors of a low-rank one) or memory tensor holds NaN or inf.

    A diverged optimisation (too large a learning rate, Adam in half precision) gives non-finite deltas
    that would turn every answer of the model into NaN; they must never become an applied patch. The
    message names the parameter and the hyperparameters to change.
    """
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, d in deltas.items():
        if isinstance(d, LowRank):
            tensors += [(f"the delta of {name} (factor a)", d.a), (f"the delta of {name} (factor b)", d.b)]
        else:
            tensors.append((f"the delta of {name}", d))
    if memory is not None:
        tensors += [(f"the {memory.kind} memory tensor {n}", t) for n, t in memory.tensors.items()]
    for what, t in tensors:
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                prefix = f"{where}: " if where else ""
                by = f" by {method}" if method else ""
                half = " (or edit a float32 copy of the model)" if t.dtype in _HALF else ""
                count = f"{bad} of {t.numel()} values are NaN or inf"
                raise PatchError(
                    f"{prefix}{what} computed{by} is not finite ({count}): the edit diverged and is refused; "
                    f"{_step_hparams(hparams or {})}{half}"
                )


# -- memories: module attachments of memory-based editors ---------------------------------------------


@dataclass
class Memory:
    """What a memory-based editor adds to a model instead of changing its weights.

    ``kind`` names an attachment registered with ``register_memory``; ``tensors`` are saved as
    ``memory/<name>``, ``meta`` (JSON-serialisable) in the file's header. A memory describes one edit (or
    one batch of edits); the kind's ``attach`` combines the memories of every applied patch.
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def num_stored_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


class Attachment(Protocol):
    """What ``attach`` returns: the installed hooks (or wrappers), removable."""

    def remove(self) -> None: ...


# attach(model, memories of every applied patch of the kind in order, previous attachment or None)
AttachFn = Callable[[nn.Module, list[Memory], Any], Attachment]
MEMORY_KINDS: dict[str, AttachFn] = {}


def register_memory(kind: str) -> Callable[[AttachFn], AttachFn]:
    """Decorator registering the function that turns a list of memories of ``kind`` into hooks on a model.

    It is called after every apply or revert that involves the kind, with the memories of all applied
    patches of that kind in order, and with the previous attachment (already removed) so that it may reuse
    work. It must not change any parameter.
    """

    def decorator(fn: AttachFn) -> AttachFn:
        MEMORY_KINDS[kind] = fn
        return fn

    return decorator


def _attach_fn(kind: str) -> AttachFn:
    if kind not in MEMORY_KINDS:
        import importlib

        importlib.import_module(f"{__package__}.methods")  # the methods register their memory kinds
    if kind not in MEMORY_KINDS:
        raise PatchError(f"unknown memory kind {kind!r}; known: {sorted(MEMORY_KINDS)}")
    return MEMORY_KINDS[kind]


@dataclass
class _AppliedState:
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: list[Patch] = field(default_factory=list)
    attached: dict[str, Any] = field(default_factory=dict)  # memory kind -> Attachment


def _state(model: nn.Module) -> _AppliedState:
    state = model.__dict__.get("_modeledit_patches")
    if state is None:
        state = model.__dict__["_modeledit_patches"] = _AppliedState()
    return state


def applied_patches(model: nn.Module) -> list[Patch]:
    """The patches applied to the model, oldest first."""
    return list(_state(model).applied)


@dataclass
class Patch:
    deltas: dict[str, Delta]
    fingerprint: str
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    memory: Memory | None = None

    # -- inspection ------------------------------------------------------------------------------------
    def dense(self, name: str) -> torch.Tensor:
        d = self.deltas[name]
        return d.dense() if isinstance(d, LowRank) else d

    def num_stored_values(self) -> int:
        memory = self.memory.num_stored_values() if self.memory is not None else 0
        return memory + sum(
            d.a.numel() + d.b.numel() if isinstance(d, LowRank) else d.numel() for d in self.deltas.values()
        )

    def __repr__(self) -> str:
        kinds = {
            n: f"low-rank r={d.a.shape[1]}" if isinstance(d, LowRank) else "dense"
            for n, d in self.deltas.items()
        }
        memory = f", memory={self.memory.kind!r}" if self.memory is not None else ""
        return (
            f"Patch(id={self.id}, method={self.method!r}, edits={len(self.requests)}, deltas={kinds}{memory})"
        )

    # -- apply / revert --------------------------------------------------------------------------------
    def _check(self, model: nn.Module) -> dict[str, nn.Parameter]:
        fp = fingerprint(model)
        if fp != self.fingerprint:
            raise PatchError(
                f"patch {self.id} was made for model {self.fingerprint} but this model is {fp}: "
                "a patch can only be applied to the exact model it was computed on"
            )
        params = dict(model.named_parameters())
        for name, d in self.deltas.items():
            if name not in params:
                raise PatchError(f"patch {self.id}: the model has no parameter {name!r}")
            if tuple(params[name].shape) != tuple(d.shape):
                raise PatchError(
                    f"patch {self.id}: {name} is {tuple(params[name].shape)}, delta is {tuple(d.shape)}"
                )
        if self.memory is not None:
            _attach_fn(self.memory.kind)
        return params

    @torch.no_grad()
    def _add_to(self, params: dict[str, nn.Parameter]) -> None:
        for name in self.deltas:
            p = params[name]
            p.add_(self.dense(name).to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def apply(self, model: nn.Module) -> Patch:
        """Add the deltas to the model's weights (in place); a patch with NaN or inf values is refused."""
        params = self._check(model)
        state = _state(model)
        # By id too: the same patch loaded twice from its file must not be added twice.
        if any(p is self or p.id == self.id for p in state.applied):
            raise PatchError(f"patch {self.id} is already applied to this model")
        # Checked before any weight changes, as stored and in the parameters' dtype: a finite float32
        # delta (or a product of finite factors) can still overflow a float16 model.
        where = f"patch {self.id}"
        check_finite(self.deltas, self.memory, method=self.method, hparams=self.hparams, where=where)
        dense = {n: self.dense(n).to(device=params[n].device, dtype=params[n].dtype) for n in self.deltas}
        check_finite(dense, method=self.method, hparams=self.hparams, where=where)
        del dense
        for name in self.deltas:
            if name not in state.base:
                state.base[name] = params[name].detach().clone()
        self._add_to(params)
        state.applied.append(self)
        if self.memory is not None:
            try:
                _reattach(model, state, {self.memory.kind})
            except Exception:
                state.applied.pop()
                _rebuild(model, state, touched=set(self.deltas))
                _reattach(model, state, {self.memory.kind})
                raise
        return self

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Remove this patch; the weights become exactly base + the other applied patches, in order."""
        state = _state(model)
        if not any(p is self for p in state.applied):
            raise PatchError(f"patch {self.id} is not applied to this model")
        state.applied = [p for p in state.applied if p is not self]
        _rebuild(model, state, touched=set(self.deltas))
        if self.memory is not None:
            _reattach(model, state, {self.memory.kind})

    # -- files -----------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        meta = {
            "format_version": FORMAT_VERSION,
            "id": self.id,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "hparams": self.hparams,
            "requests": self.requests,
            "info": self.info,
            "kinds": {n: "low_rank" if isinstance(d, LowRank) else "dense" for n, d in self.deltas.items()},
        }
        if self.memory is not None:
            meta["memory"] = {
                "kind": self.memory.kind,
                "tensors": sorted(self.memory.tensors),
                "meta": self.memory.meta,
            }
        return meta

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for name, d in self.deltas.items():
            if isinstance(d, LowRank):
                tensors[f"a/{name}"], tensors[f"b/{name}"] = d.a.contiguous(), d.b.contiguous()
            else:
                tensors[f"dense/{name}"] = d.contiguous()
        if self.memory is not None:
            for name, t in self.memory.tensors.items():
                tensors[f"memory/{name}"] = t.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        # The checksum of the tensors rides in the header: a bit flip in the data is caught on load.
        meta = self.metadata() | {"tensors_sha256": tensors_sha256(tensors)}
        try:
            save_file(tensors, str(tmp), metadata={"modeledit": json.dumps(meta, default=str)})
            tmp.replace(path)
        except BaseException:  # a full disk, an unwritable or occupied path: no half-written file stays
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta_text = (f.metadata() or {}).get("modeledit")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise PatchError(f"no patch file at {path}") from None
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise PatchError(f"{path} is not a readable safetensors patch ({e})") from None
        if meta_text is None:
            raise PatchError(
                f"{path} is a safetensors file but not a modeledit patch (no 'modeledit' metadata)"
            )
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as e:
            raise PatchError(f"{path} has corrupt modeledit metadata (not JSON: {e})") from None
        if not isinstance(meta, dict):
            raise PatchError(f"{path} has corrupt modeledit metadata (not a JSON object)")
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise PatchError(f"{path} has corrupt modeledit metadata (format_version {version!r})")
        if version > FORMAT_VERSION:
            raise PatchError(
                f"{path} has patch format {version}; this modeledit reads up to {FORMAT_VERSION}"
            )
        expected = meta.get("tensors_sha256")  # absent in files written before checksums
        if expected is not None:
            digest = tensors_sha256(tensors)
            if digest != expected:
                raise PatchError(
                    f"{path} is corrupt: its tensor data does not match the checksum in its header "
                    f"(SHA-256 {digest[:12]}..., the header says {str(expected)[:12]}...)"
                )
        try:
            deltas: dict[str, Delta] = {}
            for name, kind in meta["kinds"].items():
                if kind == "low_rank":
                    deltas[name] = LowRank(tensors[f"a/{name}"], tensors[f"b/{name}"])
                else:
                    deltas[name] = tensors[f"dense/{name}"]
            memory = None
            if meta.get("memory") is not None:
                m = meta["memory"]
                memory = Memory(
                    kind=m["kind"],
                    tensors={name: tensors[f"memory/{name}"] for name in m["tensors"]},
                    meta=m.get("meta", {}),
                )
            patch = cls(
                deltas=deltas,
                fingerprint=meta["fingerprint"],
                method=meta["method"],
                hparams=meta.get("hparams", {}),
                requests=meta.get("requests", []),
                info=meta.get("info", {}),
                id=meta["id"],
                memory=memory,
            )
        except (KeyError, AttributeError, TypeError) as e:
            raise PatchError(f"{path} is an incomplete or corrupt modeledit patch (missing {e})") from None
        hparams = patch.hparams if isinstance(patch.hparams, dict) else {}
        check_finite(patch.deltas, patch.memory, method=patch.method, hparams=hparams, where=str(path))
        return patch


@torch.no_grad()
def _rebuild(model: nn.Module, state: _AppliedState, touched: set[str]) -> None:
    params = dict(model.named_parameters())
    for name in touched:
        params[name].copy_(state.base[name])
    for patch in state.applied:
        for name in patch.deltas:
            if name in touched:
                p = params[name]
                p.add_(patch.dense(name).to(device=p.device, dtype=p.dtype))


def _reattach(model: nn.Module, state: _AppliedState, kinds: set[str]) -> None:
    """Rebuild the attachments of these memory kinds from the memories of the applied patches, in order."""
    for kind in sorted(kinds):
        previous = state.attached.pop(kind, None)
        if previous is not None:
            previous.remove()
        memories = [p.memory for p in state.applied if p.memory is not None and p.memory.kind == kind]
        if memories:
            state.attached[kind] = _attach_fn(kind)(model, memories, previous)


@torch.no_grad()
def revert_all(model: nn.Module) -> None:
    """Remove every applied patch: base weights again, bit for bit, and no memory attached."""
    state = _state(model)
    params = dict(model.named_parameters())
    for name, base in state.base.items():
        params[name].copy_(base)
    for attached in state.attached.values():
        attached.remove()
    state.attached.clear()
    state.applied.clear()
    state.base.clear()


def applied_memories(model: nn.Module, kind: str) -> list[Memory]:
    """The memories of one kind carried by the applied patches, oldest first (what memory editors build on)"""
    return [p.memory for p in _state(model).applied if p.memory is not None and p.memory.kind == kind]


def attachment(model: nn.Module, kind: str) -> Any:
    """The attachment currently built from the applied memories of ``kind`` (None if there are none)."""
    return _state(model).attached.get(kind)
