"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

A fact (subject, relation) -> object is read, in ROME's account, by one MLP output projection W at the
subject's last token: the MLP's input there is a *key* k, its output a *value* W k. ROME inserts a new value:

1. k* = the mean key at the subject's last token over the prompt preceded by ``n_prefixes`` random short
   texts that the model generates itself (once per editor; they make k* a key of the subject, not of one
   sentence), and the bare prompt.
2. v* = W k* + delta, with delta (added to the MLP output at the subject's last token) optimised with Adam so
   that ``target_new`` becomes likely after every prefixed prompt, plus ``kl_factor`` x the KL divergence of
   the next-token distribution after "{subject} is a" from the unedited one (the subject's "essence" stays),
   plus ``weight_decay`` x |delta| / |W k|^2; |delta| is clamped to ``clamp_norm`` x |W k|.
   Our deviation (``key_aware``, default on): each prompt gets delta x (u^T k) / (u^T k*), u = C^-1 k*, i.e.
   what the rank-one update of step 3 will add at that prompt's own key k, instead of the full delta. The
   paper's version overrates the edit where k is far from the mean k*: with the subject first in the bare
   prompt (no token before it) the update reached it with 5-50% of the delta, and those edits failed.
3. W' = W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*), with C = E[k k^T] the second moment of keys over text
   (``modeledit.stats``). W' k* = v* exactly, and keys orthogonal to C^-1 k* are mapped as before. ROME
   without C (``mom2=False``, C = I) is the ablation the paper calls worse; EasyEdit ships it as default.

The patch is rank one: its two factors are stored. What makes it fast (the paper's method is unchanged):
the delta only affects positions from the subject's last token on, so the tokens before it run once through
the model (a key/value cache) and each optimisation step runs only the few tokens after it, and only through
the blocks from the edited one up (the output of the blocks below is kept from the first pass); the LM head is
computed only where a target is predicted; the first pass gives the key, the unedited value and the first
gradient; the loop stops once the target's NLL is below ``stop_nll``; C^-1 is factorised once per layer per
editor.

The shared machinery (prompts with prefixes, the cached value optimisation, keys) is used by MEMIT and
AlphaEdit (``memit.py``) too.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchitectureError, architecture
from ..editor import Editor, register
from ..hooks import Trace
from ..lm import left_padded, prompt_ids, target_ids
from ..patch import Delta, linear_delta
from ..requests import EditRequest, EditRequestError
from ..stats import forward_until, second_moments
from ..trace import default_layer, structural_layer, subject_span

PREFIX_FIRST_WORDS = ("The", "Therefore", "Because", "I", "You")  # as MEMIT seeds its context templates


# -- prompts -------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` short texts sampled from the model (top-k 5, ``tokens`` new tokens each), one line each, without
    braces; seeded without touching the global random state."""
    if n <= 0:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    starts = [PREFIX_FIRST_WORDS[i % len(PREFIX_FIRST_WORDS)] for i in range(n)]
    enc = left_padded(tokenizer, starts, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=tokens, pad_token_id=pad)
    prefixes = []
    for start, row in zip(starts, out[:, enc["input_ids"].shape[1] :]):
        text = (start + tokenizer.decode(row, skip_special_tokens=True)).replace("{", "").replace("}", "")
        text = " ".join(text.split())  # one line, single spaces
        prefixes.append(text or start)
    return prefixes


@dataclass
class Rows:
    """Prompts of several requests split at the subject's last token, for the cached value optimisation.

    Row i is ``prefix_ids[i]`` (the tokens before the subject's last token, right-padded) then
    ``suffix_ids[i]`` (from the subject's last token on, right-padded): suffix position 0 is where a
    value delta is added and a key is read. ``labels`` (suffix-aligned, -100 elsewhere) hold the target token
    predicted at each suffix position; ``kl_pos`` >= 0 marks the position of an essence (KL) row.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor  # request index of each row
    kl_pos: torch.Tensor  # suffix position of the KL distribution, -1 for rewriting rows

    @property
    def rewriting(self) -> torch.Tensor:
        return self.kl_pos < 0


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def subject_last(tokenizer, text: str, subject: str) -> int:
    return subject_span(tokenizer, text, subject)[1] - 1


def request_texts(r: EditRequest, prefixes: list[str]) -> list[str]:
    """The edit prompt after each prefix ("{prefix}. {prompt}") and bare."""
    return [r.text] + [f"{p}. {r.text}" for p in prefixes]


def build_rows(
    tokenizer, requests: list[EditRequest], prefixes: list[str], kl_prompts: tuple[str, ...] = ("{} is a",)
) -> Rows:
    """Rewriting rows (each context + prompt + target[:-1], predicting the target) and essence rows."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pre, suf, labels, owner, kl_pos = [], [], [], [], []
    for n, r in enumerate(requests):
        target = target_ids(tokenizer, r.target_new, prompt=r.text)
        if not target:
            raise EditRequestError(f"{r._where('target_new')} {r.target_new!r} has no tokens")
        for text in request_texts(r, prefixes):
            ids = prompt_ids(tokenizer, text)
            s = subject_last(tokenizer, text, r.subject)
            if s == 0:  # a one-token subject first in the bare prompt: no token before it to cache
                if not prefixes:
                    raise EditRequestError(
                        f"{r._where('subject')} {r.subject!r} is the first token of the prompt; "
                        "this needs at least one prefix (n_prefixes > 0)"
                    )
                continue
            full = ids + target[:-1]
            pre.append(ids[:s])
            suf.append(full[s:])
            lab = [-100] * (len(full) - s)
            for j, t in enumerate(target):
                lab[len(ids) - 1 - s + j] = t
            labels.append(lab)
            owner.append(n)
            kl_pos.append(-1)
        for template in kl_prompts:
            text = template.format(r.subject)
            if subject_last(tokenizer, text, r.subject) == 0:
                text = f"{prefixes[0]}. {text}" if prefixes else f"{tokenizer.eos_token or ''} {text}"
            ids = prompt_ids(tokenizer, text)
            s = subject_last(tokenizer, text, r.subject)
            pre.append(ids[:s])
            suf.append(ids[s:])
            labels.append([-100] * (len(ids) - s))
            owner.append(n)
            kl_pos.append(len(ids) - 1 - s)
    if not pre:
        raise EditRequestError("no usable prompt: every subject is the first token of its prompt")
    return Rows(
        _pad(pre, pad),
        _pad([[1] * len(p) for p in pre], 0),
        _pad(suf, pad),
        _pad([[1] * len(s) for s in suf], 0),
        _pad(labels, -100),
        torch.tensor(owner),
        torch.tensor(kl_pos),
    )


# -- the cached value optimisation ---------------------------------------------------------------------------


class CachedPrompts:
    """Runs ``Rows`` through the model: the prefixes once (key/value cache), then the suffixes as often as
    needed, with a value delta per request added to ``module``'s output at suffix position 0."""

    def __init__(self, model: nn.Module, rows: Rows):
        self.model, self.rows = model, rows
        device = next(model.parameters()).device
        self.device = device
        self.prefix_len = rows.prefix_mask.sum(1).to(device)
        self.mask = torch.cat([rows.prefix_mask, rows.suffix_mask], 1).to(device)
        s = rows.suffix_ids.shape[1]
        self.positions = self.prefix_len[:, None] + torch.arange(s, device=device)[None]
        needed = (rows.labels != -100) | (torch.arange(s)[None] == rows.kl_pos[:, None])
        cols = needed.any(0).nonzero().flatten()
        self.keep = torch.arange(int(cols.min()), int(cols.max()) + 1, device=device)
        # The (row, suffix position) pairs whose logits the loss needs: the LM head runs on these only.
        pair_row, pair_pos = needed.nonzero(as_tuple=True)
        self.pair_row, self.pair_pos = pair_row.to(device), pair_pos.to(device)
        with torch.no_grad():
            out = model(
                input_ids=rows.prefix_ids.to(device),
                attention_mask=rows.prefix_mask.to(device),
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = getattr(out, "cache", None) or out.past_key_values
        # running a subset of rows (``logits(only=...)``) needs a cache made of per-layer objects
        self.can_select = hasattr(self.cache, "layers")
        # transformers renamed the argument past_key_values -> cache; use whichever this model takes.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # The delta cannot change what the blocks below the edited one compute: their output for the suffix
        # tokens is kept from the first pass (per edited block) and later passes skip those blocks.
        self.below: dict[int, torch.Tensor] = {}

    def logits(
        self,
        module: str,
        delta: torch.Tensor | None,
        capture_keys: tuple[str, ...] = (),
        only: torch.Tensor | None = None,
        row_scale: torch.Tensor | None = None,
        per_row: bool = False,
    ):
        """Logits (pairs x vocabulary) at the pairs ``(self.pair_row, self.pair_pos)`` that carry a target
        token or the KL term; with ``capture_keys``, also those modules' inputs at suffix position 0; and
        ``module``'s output there (before the delta). ``only`` (row indices, ascending) runs just those rows:
        then the logits are those of their pairs, in the same order. ``row_scale`` (one per row) multiplies
        the delta added to each row. ``per_row``: ``delta`` holds one delta per row, not one per request."""
        owner = self.rows.owner.to(self.device)
        suffix_ids, mask, positions = self.rows.suffix_ids.to(self.device), self.mask, self.positions
        pair_row, pair_pos = self.pair_row, self.pair_pos
        cache = _copy_cache(self.cache)
        scale = row_scale
        if per_row:
            owner = torch.arange(len(owner), device=self.device)
        if only is not None:
            owner, suffix_ids, mask, positions = owner[only], suffix_ids[only], mask[only], positions[only]
            scale = None if scale is None else scale[only]
            for layer in cache.layers:  # the copy's own layers: the shared cache keeps every row
                layer.batch_select_indices(only)
            new_index = torch.full((len(self.rows.owner),), -1, dtype=torch.long, device=self.device)
            new_index[only] = torch.arange(len(only), device=self.device)
            kept = new_index[pair_row] >= 0
            pair_row, pair_pos = new_index[pair_row[kept]], pair_pos[kept]
        seen: dict[str, torch.Tensor] = {}

        def add(name: str, out: torch.Tensor) -> torch.Tensor:
            if name != module:
                return out
            seen["value"] = out[:, 0].detach()
            if delta is None:
                return out
            bump = torch.zeros_like(out)
            bump[:, 0] = (delta[owner] if scale is None else delta[owner] * scale[:, None]).to(out.dtype)
            return out + bump

        first = int(self.keep[0])

        def gather(head, args):  # (rows, kept positions, hidden) -> (1, pairs, hidden) before the LM head
            return (args[0][pair_row, pair_pos - first].unsqueeze(0), *args[1:])

        names = list(dict.fromkeys([module, *capture_keys]))
        handle = self.model.get_output_embeddings().register_forward_pre_hook(gather)
        try:
            with (
                self._blocks_below(module, only, reuse=not capture_keys),
                Trace(
                    self.model,
                    names,
                    capture_input=bool(capture_keys),
                    capture_output=False,
                    edit_output=add,
                ) as tr,
            ):
                logits = self.model(
                    input_ids=suffix_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    **{self.cache_arg: cache},
                    use_cache=True,
                    logits_to_keep=self.keep,
                ).logits[0]
        finally:
            handle.remove()
        keys = {name: tr[name].input[:, 0].detach() for name in capture_keys}
        return logits, keys, seen.get("value")

    @contextmanager
    def _blocks_below(self, module: str, only: torch.Tensor | None, reuse: bool):
        """Within: the decoder blocks below ``module``'s block return their output kept from an earlier
        pass over all rows (``reuse``, when there is one), or the pass over all rows keeps it."""
        blocks = architecture(self.model).stack("decoder")
        index = next((b.index for b in blocks if module.startswith(b.name + ".")), 0)
        if index == 0:
            yield
            return
        below = [self.model.get_submodule(b.name) for b in blocks[:index]]
        if reuse and index in self.below:
            kept = self.below[index] if only is None else self.below[index][only]
            saved = [block.__dict__.get("forward") for block in below]  # e.g. accelerate's wrappers
            for block in below:  # an instance attribute shadows the class's forward
                block.forward = lambda *args, **kwargs: kept
            try:
                yield
            finally:
                for block, forward in zip(below, saved):
                    if forward is None:
                        del block.forward
                    else:
                        block.forward = forward
            return

        def keep(block, args, output):
            if isinstance(output, torch.Tensor):  # blocks returning tuples (older transformers): no skipping
                self.below[index] = output.detach()

        handle = below[-1].register_forward_hook(keep) if only is None else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()


def _copy_cache(cache):
    """A copy of a key/value cache whose tensors are shared (a forward pass appends to its own copy only)."""
    clone = copy.copy(cache)
    if hasattr(cache, "layers"):
        clone.layers = [copy.copy(layer) for layer in cache.layers]
    return clone


@dataclass
class ValueSettings:
    lr: float = 0.5
    steps: int = 20
    stop_nll: float = 0.05
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 4.0


def optimise_values(
    model: nn.Module,
    rows: Rows,
    n_requests: int,
    module: str,
    s: ValueSettings,
    key_modules: tuple[str, ...] = (),
    update_direction: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Deltas (requests x hidden) added to ``module``'s output at each subject's last token that make the
    targets likely (see the module docstring). Returns ``delta``, ``init`` (the module's unedited output
    there, averaged over each request's rewriting rows), ``nll`` (final per-request target NLL) and, with
    ``key_modules``, ``key`` (modules x requests x in): their inputs there, averaged the same way (and
    ``row_scale``, below).

    ``update_direction`` (ROME: (module, k) -> C^-1 k, with ``key_modules`` = (``module``,)): each row gets
    the delta scaled by (u^T k_row) / (u^T k*), u = update_direction(module, k*): what the rank-one update
    adds at that row's key, so the optimisation sees the edited weights (with several key modules, e.g.
    MEMIT's layers that share the delta, the mean of their scales). Without it every row gets the full delta
    (the paper), which overrates the edit on prompts whose key is far from the mean k*: a subject at position
    0 of the bare prompt has a key that the update reaches with 5-50% of the delta on the prompts ROME failed
    on."""
    runner = CachedPrompts(model, rows)
    device = runner.device
    owner = rows.owner.to(device)
    pair_row = runner.pair_row
    pair_label = rows.labels.to(device)[pair_row, runner.pair_pos]
    is_target = pair_label != -100
    target_row = pair_row[is_target]
    kl_pairs = (~is_target).nonzero().flatten()
    kl_rows = pair_row[kl_pairs]
    rewriting = rows.rewriting.to(device)
    target_count = torch.zeros(len(owner), device=device).index_add(
        0, target_row, torch.ones(len(target_row), device=device)
    )
    per_request = torch.zeros(n_requests, len(owner), device=device)
    per_request[owner[rewriting], rewriting.nonzero().flatten()] = 1.0
    per_request = per_request / per_request.sum(1, keepdim=True).clamp(min=1)

    hidden = architecture(model).hidden_size
    delta = None
    row_scale = None
    opt = None
    nll = None
    out: dict[str, torch.Tensor] = {}
    # Requests whose target NLL fell below stop_nll stop moving; their rows are no longer run (a batch of
    # facts costs the sum of their steps, not the slowest fact's steps times the batch).
    live = torch.ones(n_requests, dtype=torch.bool, device=device)
    for step in range(max(s.steps, 0) + 1):
        run_rows = None if bool(live.all()) or not runner.can_select else live[owner].nonzero().flatten()
        if step == 0:  # delta = 0, but one leaf per row: the first gradient comes from this pass too
            row_delta = torch.zeros(len(owner), hidden, device=device, requires_grad=True)
            logits, keys, value = runner.logits(module, row_delta, capture_keys=key_modules, per_row=True)
        else:
            logits, _, value = runner.logits(module, delta, only=run_rows, row_scale=row_scale)
        run_pairs = torch.ones_like(pair_row, dtype=torch.bool) if run_rows is None else live[owner[pair_row]]
        if step == 0:
            out["init"] = per_request @ value.float()
            if key_modules:
                out["key"] = torch.stack([per_request @ keys[name].float() for name in key_modules])
            init_norm = out["init"].norm(dim=-1).clamp(min=1e-6)
            if update_direction is not None and key_modules:
                scales = []
                for name, mean_key in zip(key_modules, out["key"]):
                    u = torch.stack([update_direction(name, k) for k in mean_key]).float()  # (requests, in)
                    row_key = keys[name].float()
                    scales.append((row_key * u[owner]).sum(-1) / (mean_key * u).sum(-1)[owner])
                row_scale = torch.stack(scales).mean(0)
                out["row_scale"] = row_scale
            delta = torch.zeros(n_requests, hidden, device=device, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=s.lr)
            with torch.no_grad():
                kl_init = torch.log_softmax(logits[kl_pairs].float(), -1)
        logp = torch.log_softmax(logits.float(), -1)  # the run pairs, in pair order
        run_target = is_target[run_pairs]
        picked = logp[run_target].gather(-1, pair_label[run_pairs][run_target][:, None])[:, 0]
        row_nll = -torch.zeros(len(owner), device=device).index_add(
            0, pair_row[run_pairs][run_target], picked
        ) / target_count.clamp(min=1)
        now = per_request @ row_nll  # (requests,); 0 for requests not run
        nll = now if nll is None else torch.where(live, now, nll.detach())
        out["nll"] = nll.detach()
        if step == s.steps or bool((nll < s.stop_nll).all()):
            break
        kl_live = run_pairs[kl_pairs]  # the KL pairs that were run, in the order of kl_init
        kl_now = logp[~run_target]
        kl = F.kl_div(kl_init[kl_live], kl_now, log_target=True, reduction="none").sum(
            -1
        )  # KL(now || init) per KL row
        kl_per_request = torch.zeros(n_requests, device=device).index_add(0, owner[kl_rows[kl_live]], kl)
        decay = s.weight_decay * delta.norm(dim=-1) / init_norm**2
        active = (nll >= s.stop_nll).float().detach()
        loss = ((nll + s.kl_factor * kl_per_request + decay) * active).sum()
        opt.zero_grad()
        loss.backward()
        if step == 0:  # a request's delta reaches its rows as delta x row_scale: the chain rule by hand
            row_grad = row_delta.grad if row_scale is None else row_delta.grad * row_scale[:, None]
            by_request = torch.zeros_like(delta).index_add(0, owner, row_grad)
            delta.grad = by_request if delta.grad is None else delta.grad + by_request
        keep = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            limit = (s.clamp_norm * init_norm)[:, None]
            norm = delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
            delta.copy_(torch.where(active[:, None] > 0, delta, keep))  # finished requests stay put
        live = active.bool()  # a finished request's rows depend only on its own (now fixed) delta
    out["delta"] = delta.detach()  # step 0 always runs and creates it
    return out


# -- second moments ---------------------------------------------------------------------------------------


class SecondMoments:
    """C = E[k k^T] per layer (``modeledit.stats``, cached on disk), kept in memory by an editor."""

    def __init__(self, model, tokenizer, source: str | None, tokens: int):
        self.model, self.tokenizer, self.source, self.tokens = model, tokenizer, source, tokens
        self.mom2: dict[int, torch.Tensor] = {}
        self._cholesky: dict[int, torch.Tensor] = {}

    def inverse_times(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """C^-1 k (float64), with C's Cholesky factor computed once per layer."""
        if layer not in self._cholesky:
            c = self.get([layer])[layer]
            ridge = 1e-6 * c.diagonal().mean()  # numerical safety only
            self._cholesky[layer] = torch.linalg.cholesky(c + ridge * torch.eye(len(c), dtype=c.dtype))
        return torch.cholesky_solve(k.double()[:, None], self._cholesky[layer])[:, 0]

    def get(self, layers: list[int]) -> dict[int, torch.Tensor]:
        missing = [layer for layer in layers if layer not in self.mom2]
        if missing:
            found = second_moments(self.model, self.tokenizer, missing, self.source, self.tokens)
            self.mom2 |= {layer: m.mom2.double() for layer, m in found.items()}
        return {layer: self.mom2[layer] for layer in layers}


# -- ROME ---------------------------------------------------------------------------------------------------


@dataclass
class ROMEConfig:
    """ROME: rank-one update of one MLP output projection, weighted by the key second moment C."""

    layer: int | None = None  # edited block; None: chosen by ``layer_selection``
    layer_selection: str = "structure"  # "structure": 15% of the depth; "trace": causal tracing (trace.py)
    mom2: bool = True  # weight the update by C^-1 (ROME); False: C = I
    mom2_source: str | None = None  # text for C: .txt/.json/.jsonl or hf:NAME; None: sampled from the model
    mom2_tokens: int = 20_000  # tokens of text for C
    n_prefixes: int = 8  # random prefixes generated by the model (+ the bare prompt); ROME: 20
    prefix_tokens: int = 5  # new tokens per prefix
    lr: float = 2.0  # Adam learning rate of the value delta (ROME: 0.5); with the settings around it,
    #                  1.3-1.7x cheaper per edit than (10, 1.0, 0.05), same ES/PS/NS (docs: "Speed")
    steps: int = 40  # at most this many optimisation steps (ROME: 20; most facts stop after ~10 here)
    stop_nll: float = 0.1  # stop once the target's mean NLL over the prompts is below this (ROME: 0.05)
    kl_factor: float = 0.0625  # weight of the essence KL on "{subject} is a"
    weight_decay: float = 0.5  # weight of |delta| / |W k|^2
    clamp_norm: float = 8.0  # |delta| <= clamp_norm x |W k| (ROME: 4; key_aware needs room for the prompts
    #                          that the update reaches with a fraction of the delta)
    key_aware: bool = True  # optimise v* seeing the rank-one update's share at each prompt's key (not in the
    #                         paper: it fixes prompts with the subject first; see ``optimise_values``)
    seed: int = 0  # prefix sampling


class LocateThenEdit(Editor):
    """What ROME, MEMIT and AlphaEdit share: prefixes, second moments, default layers."""

    needs_subject = True

    def __init__(self, model, tokenizer, config):
        super().__init__(model, tokenizer, config)
        if self.arch.is_seq2seq:
            raise ArchitectureError(f"{self.name} edits decoder-only models")
        self._prefixes: list[str] | None = None
        self.moments = SecondMoments(model, tokenizer, config.mom2_source, config.mom2_tokens)

    @property
    def prefixes(self) -> list[str]:
        if self._prefixes is None:
            c = self.config
            self._prefixes = generate_prefixes(
                self.model, self.tokenizer, c.n_prefixes, c.prefix_tokens, c.seed
            )
        return self._prefixes

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        # Derived from the unedited model (prefixes; layers chosen lazily, maybe by tracing): a resumed stream
        # must not derive them again from the edited one.
        return {}, {"prefixes": self._prefixes, "config": asdict(self.config)}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._prefixes = meta.get("prefixes")
        for key, value in meta.get("config", {}).items():
            setattr(self.config, key, value)
        if getattr(self.config, "mom2", True):  # MEMIT and AlphaEdit always use C
            self.moments.get(self.edited_layers())  # from the cache or the unedited model

    def edited_layers(self) -> list[int]:
        raise NotImplementedError

    def auto_layer(self) -> int:
        """The edit layer of a model nobody configured: from its depth, or from causal tracing of known facts
        (``layer_selection="trace"``; it falls back to the depth rule where no known facts are usable)."""
        rule = self.config.layer_selection
        if rule == "trace":
            return default_layer(self.model, self.tokenizer).layer
        if rule != "structure":
            raise ValueError(f"{self.name}: layer_selection must be 'structure' or 'trace', got {rule!r}")
        return structural_layer(self.arch.num_layers)

    def value_settings(self) -> ValueSettings:
        c = self.config
        return ValueSettings(c.lr, c.steps, c.stop_nll, c.kl_factor, c.weight_decay, c.clamp_norm)


@register
class ROME(LocateThenEdit):
    name = "rome"
    Config = ROMEConfig
    strengthen = {"steps": 2.0, "stop_nll": 0.5}  # verify=True: more optimisation steps for v*

    @property
    def layer(self) -> int:
        if self.config.layer is None:
            self.config.layer = self.auto_layer()
        return self.config.layer

    def edited_layers(self) -> list[int]:
        return [self.layer]

    def c_inverse_times(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """C^-1 k (float64); k itself without ``mom2``."""
        return self.moments.inverse_times(layer, k) if self.config.mom2 else k.double()

    def compute_deltas(self, requests: list[EditRequest]) -> dict[str, Delta]:
        if len(requests) != 1:
            raise EditRequestError(
                f"rome edits one fact at a time (got {len(requests)}); use memit for batches"
            )
        layer = self.layer
        module = self.arch.mlp_out(layer)
        rows = build_rows(self.tokenizer, requests, self.prefixes)
        direction = (lambda _, k: self.c_inverse_times(layer, k).float()) if self.config.key_aware else None
        settings = self.value_settings()
        found = optimise_values(self.model, rows, 1, module, settings, (module,), update_direction=direction)
        k = found["key"][0, 0]
        u = self.c_inverse_times(layer, k)
        right = (u / (u @ k.double())).float()  # W' k* = W k* + delta exactly
        name, delta = linear_delta(self.model, module, found["delta"][0][:, None], right[None, :])
        return {name: delta}


def keys_and_values(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    prefixes: list[str],
    key_modules: list[str],
    value_module: str,
    params: dict[str, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean (over each request's prefixed prompts) of the inputs of ``key_modules`` and the output of
    ``value_module`` at the subject's last token, with ``params`` substituted into the model. Only the prompt
    up to that token is run, and only up to the last module needed."""
    items = []  # (request index, token ids up to and including the subject's last token)
    for n, r in enumerate(requests):
        for text in request_texts(r, prefixes):
            s = subject_last(tokenizer, text, r.subject)
            if s > 0 or not prefixes:  # the same prompts as ``build_rows``
                items.append((n, prompt_ids(tokenizer, text)[: s + 1]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = list(dict.fromkeys([*key_modules, value_module]))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    last = max(names, key=order.__getitem__)
    last = next((n for n in names if last.startswith(n + ".")), last)  # a block ends after its MLP
    sums = {name: None for name in names}
    counts = torch.zeros(len(requests), device=device)
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids = _pad([c[1] for c in chunk], pad).to(device)
        mask = _pad([[1] * len(c[1]) for c in chunk], 0).to(device)
        where = torch.tensor([len(c[1]) - 1 for c in chunk], device=device)
        owner = torch.tensor([c[0] for c in chunk], device=device)
        rows = torch.arange(len(chunk), device=device)
        with torch.no_grad(), Trace(model, names, capture_input=True, detach=True) as tr:
            forward_until(model, last, {"input_ids": ids, "attention_mask": mask}, params)
        for name in names:
            x = tr[name].output if name == value_module and name not in key_modules else tr[name].input
            picked = x[rows, where].float()
            acc = torch.zeros(len(requests), picked.shape[-1], device=device).index_add(0, owner, picked)
            sums[name] = acc if sums[name] is None else sums[name] + acc
        counts += torch.bincount(owner, minlength=len(requests)).float()
    means = {name: s / counts[:, None] for name, s in sums.items()}
    return {name: means[name] for name in key_modules}, means[value_module]
