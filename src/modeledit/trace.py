"""Causal tracing (Meng et al. 2022, ROME, section 2): which hidden states carry a fact the model recalls.

1. Clean run: the probability ``p_high`` of the answer's first token after the prompt.
2. Corrupted runs: Gaussian noise (``noise`` x the standard deviation of the input embeddings, 3 by
   default as in ROME) is added to the embeddings of the subject's tokens; the answer drops to ``p_low``.
3. Restored runs: the same corruption, but one hidden state (layer l, token t) is put back to its clean
   value: the block output (``kind="hidden"``), or the MLP / attention outputs of the ``window`` layers
   around l (``"mlp"``, ``"attn"``). ``scores[l, t]`` is the answer's probability then, averaged over
   ``samples`` noise draws; a state that carries the fact brings it back towards ``p_high``.

Every (token, noise draw) pair of one layer is one row of a single batched forward pass, and only the last
position's logits are computed.

``default_layer`` picks the layer an editor should edit for a model nobody configured: the layer where
restoring the MLP output at the subject's last token recovers the most, averaged over known facts (windows
that include block 0, whose MLP acts as part of the embedding, excluded) (ROME's
``known_1000.json`` prompts the model answers correctly, looked up at ``$MODELEDIT_KNOWN_FACTS`` or
``../shared/data/counterfact/known_1000.json`` beside the repository). The result is cached per model
fingerprint. Without that file, or when the model knows fewer than ``min_facts`` of them, it falls back to a
rule from the structure alone: the block at 15% of the depth (``structural_layer``), where ROME and MEMIT put
their edits on GPT-2 XL (17/48 = 35%), GPT-J (5/28 = 18%) and Llama (5/32 = 16%).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchitectureError, architecture
from .hooks import Trace
from .lm import aligned_logits, prompt_ids, target_batch, target_ids
from .models import cache_dir, fingerprint
from .requests import EditRequestError

KNOWN_FACTS_ENV = "MODELEDIT_KNOWN_FACTS"
KINDS = ("hidden", "mlp", "attn")


# -- where the subject is ------------------------------------------------------------------------------------


def subject_span(tokenizer, text: str, subject: str) -> tuple[int, int]:
    """Token range [start, end) of the last occurrence of ``subject`` in ``text``, as ``prompt_ids`` tokenises
    the text. EditRequestError when the subject is absent or has no token of its own."""
    text = text.rstrip(" ")
    if not subject or not subject.strip():
        raise EditRequestError(f"empty subject for the prompt {text!r}")
    i = text.rfind(subject)
    if i < 0:
        raise EditRequestError(f"subject {subject!r} does not occur in the prompt {text!r}")
    lo, hi = i + len(subject) - len(subject.lstrip()), i + len(subject.rstrip())
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        inside = [n for n, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < hi and b > lo]
        if not inside:
            raise EditRequestError(f"subject {subject!r} has no token of its own in {text!r}")
        return inside[0], inside[-1] + 1
    start = len(prompt_ids(tokenizer, text[:lo])) if text[:lo].strip() else 0
    end = len(prompt_ids(tokenizer, text[:hi]))
    if end <= start:
        raise EditRequestError(f"subject {subject!r} has no token of its own in {text!r}")
    return start, end


# -- tracing -------------------------------------------------------------------------------------------------


def embedding_std(model: nn.Module) -> float:
    """Standard deviation of the input embedding module's outputs, over a spread of vocabulary ids."""
    emb = architecture(model).embeddings()
    n = emb.weight.shape[0]
    ids = torch.arange(0, n, max(1, n // 4096), device=emb.weight.device)
    with torch.no_grad():
        return float(emb(ids).float().std())


def _attention_module(arch, layer: int) -> str:
    block = arch.block(layer)
    module = arch.model.get_submodule(block.name)
    names = [n for n, m in module.named_modules() if n and "Attention" in type(m).__name__]
    if not names:
        raise ArchitectureError(f"no attention module found in block {block.name}")
    return f"{block.name}.{min(names, key=len)}"


def traced_modules(model: nn.Module, kind: str) -> list[str]:
    """The module per layer whose output a trace of ``kind`` restores."""
    arch = architecture(model)
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "hidden":
        return [arch.residual(i) for i in range(arch.num_layers)]
    if kind == "mlp":
        return [arch.mlp_out(i) for i in range(arch.num_layers)]
    return [_attention_module(arch, i) for i in range(arch.num_layers)]


@dataclass
class TraceResult:
    prompt: str
    subject: str
    answer: str  # the first answer token, decoded
    tokens: list[str]
    subject_range: tuple[int, int]
    kind: str
    window: int
    samples: int
    noise: float  # absolute standard deviation of the noise
    p_high: float  # clean probability of the answer
    p_low: float  # with the subject corrupted
    scores: list[list[float]] = field(repr=False)  # [layer][token]: probability with that state restored

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def plot(self, path: str | Path) -> Path:
        """Heat map (tokens x layers) as ROME draws it, written with matplotlib's Agg backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        scores = torch.tensor(self.scores).T  # tokens x layers
        labels = [
            repr(t)[1:-1] + ("*" if self.subject_range[0] <= i < self.subject_range[1] else "")
            for i, t in enumerate(self.tokens)
        ]
        cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[self.kind]
        fig, ax = plt.subplots(
            figsize=(max(4.0, 0.18 * scores.shape[1] + 2), 0.35 * len(labels) + 1.4), dpi=150
        )
        image = ax.pcolormesh(scores.numpy(), cmap=cmap, vmin=self.p_low)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=8)
        step = max(1, scores.shape[1] // 10)
        ax.set_xticks([i + 0.5 for i in range(0, scores.shape[1], step)])
        ax.set_xticklabels(list(range(0, scores.shape[1], step)), fontsize=8)
        what = {"hidden": "single restored layer", "mlp": "MLP", "attn": "attention"}[self.kind]
        window = f" (window {self.window})" if self.kind != "hidden" else ""
        ax.set_title(f"Impact of restoring {what}{window}", fontsize=9)
        ax.set_xlabel(f"layer; p(clean) {self.p_high:.3f}, p(corrupted) {self.p_low:.3f}", fontsize=8)
        fig.colorbar(image, ax=ax).ax.set_title(f"p({self.answer.strip()})", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


class _Corruptor:
    """Adds fixed noise (samples, subject tokens, hidden) to the subject's embeddings, row r getting draw
    r % samples; rows beyond ``clean_rows`` only (the first ``clean_rows`` rows stay clean)."""

    def __init__(self, noise: torch.Tensor, span: tuple[int, int]):
        self.noise, self.span = noise, span

    def __call__(self, name: str, out: torch.Tensor) -> torch.Tensor:
        s = self.noise.shape[0]
        rows = out.shape[0]
        reps = self.noise.repeat((rows + s - 1) // s, 1, 1)[:rows].to(out.dtype)
        out = out.clone()
        out[:, self.span[0] : self.span[1]] += reps
        return out


def _answer_probs(model, ids: torch.Tensor, answer_id: int) -> torch.Tensor:
    logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    return torch.softmax(logits, -1)[:, answer_id]


@torch.no_grad()
def trace_scores(
    model: nn.Module,
    ids: list[int],
    span: tuple[int, int],
    answer_id: int,
    kind: str = "hidden",
    window: int = 1,
    samples: int = 10,
    noise: float | None = None,
    tokens: list[int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[float, float, torch.Tensor]:
    """(p_high, p_low, scores[layer, token]) for one tokenised prompt; ``tokens``: positions to restore
    (default all). ``noise`` is the absolute std (default 3 x the embedding std)."""
    arch = architecture(model)
    device = next(model.parameters()).device
    noise = 3.0 * embedding_std(model) if noise is None else noise
    positions = list(range(len(ids))) if tokens is None else list(tokens)
    names = traced_modules(model, kind)
    emb_name = next(n for n, m in model.named_modules() if m is arch.embeddings())
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, span[1] - span[0], arch.hidden_size, generator=gen) * noise
    corrupt = _Corruptor(draws.to(device), span)
    x = torch.tensor([ids], device=device)
    with Trace(model, names, capture_output=True, detach=True) as tr:
        p_high = float(_answer_probs(model, x, answer_id)[0])
    clean = {n: tr[n].output[0] for n in names}
    with Trace(model, [emb_name], capture_output=False, edit_output=corrupt):
        p_low = float(_answer_probs(model, x.repeat(samples, 1), answer_id).mean())
    n_layers = arch.num_layers
    scores = torch.zeros(n_layers, len(positions))
    rows = x.repeat(samples * len(positions), 1)
    row_token = torch.tensor(positions, device=device).repeat_interleave(samples)
    row_index = torch.arange(len(rows), device=device)
    for layer in tqdm(range(n_layers), desc=f"tracing ({kind})", disable=not progress):
        lo = max(0, layer - window // 2)
        restored = names[layer : layer + 1] if kind == "hidden" else names[lo : min(n_layers, lo + window)]

        def restore(name: str, out: torch.Tensor, corrupt=corrupt) -> torch.Tensor:
            if name == emb_name:
                return corrupt(name, out)
            out = out.clone()
            out[row_index, row_token] = clean[name][row_token].to(out.dtype)
            return out

        with Trace(model, [emb_name, *restored], capture_output=False, edit_output=restore):
            p = _answer_probs(model, rows, answer_id)
        scores[layer] = p.view(len(positions), samples).mean(-1).cpu()
    return p_high, p_low, scores


def causal_trace(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    answer: str | None = None,
    kind: str = "hidden",
    window: int | None = None,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> TraceResult:
    """Trace one prompt. ``answer``: the answer whose first token is tracked (default: the model's own
    greedy next token); ``noise``: multiple of the embedding std; ``window``: layers restored together for
    mlp/attn (default: a tenth of the depth, as ROME's 10 of 48)."""
    arch = architecture(model)
    if arch.is_seq2seq:
        raise ArchitectureError("causal tracing is implemented for decoder-only models")
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}: use one of {', '.join(KINDS)}")
    text = prompt.format(subject) if "{}" in prompt else prompt
    span = subject_span(tokenizer, text, subject)
    ids = prompt_ids(tokenizer, text)
    device = next(model.parameters()).device
    if answer is None:
        with torch.no_grad():
            answer_id = int(
                model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].argmax()
            )
    else:
        answer_ids = target_ids(tokenizer, answer, prompt=text)
        if not answer_ids:
            raise EditRequestError(f"answer {answer!r} has no tokens")
        answer_id = answer_ids[0]
    window = window or max(1, round(arch.num_layers / 10))
    std = embedding_std(model)
    p_high, p_low, scores = trace_scores(
        model, ids, span, answer_id, kind, 1 if kind == "hidden" else window, samples, noise * std,
        seed=seed, progress=progress,
    )  # fmt: skip
    return TraceResult(
        prompt=text,
        subject=subject,
        answer=tokenizer.decode([answer_id]),
        tokens=[tokenizer.decode([i]) for i in ids],
        subject_range=span,
        kind=kind,
        window=1 if kind == "hidden" else window,
        samples=samples,
        noise=noise * std,
        p_high=p_high,
        p_low=p_low,
        scores=scores.tolist(),
    )


# -- automatic default layer ---------------------------------------------------------------------------------


def known_facts_path() -> Path | None:
    """``$MODELEDIT_KNOWN_FACTS``, else ROME's known_1000.json in ../shared/data beside the repository."""
    env = os.environ.get(KNOWN_FACTS_ENV)
    if env:
        return Path(env)
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact" / "known_1000.json"
    return path if path.exists() else None


def structural_layer(num_layers: int) -> int:
    """The fallback edit layer from the depth alone: the block at 15% of the depth."""
    return round(0.15 * (num_layers - 1))


@torch.no_grad()
def facts_the_model_knows(
    model, tokenizer, facts: list[dict], limit: int, batch_size: int = 32
) -> list[dict]:
    """The first ``limit`` facts (``prompt``, ``subject``, ``attribute``) whose attribute's first token the
    model predicts greedily after the prompt."""
    known = []
    for i in range(0, len(facts), batch_size):
        group = [
            f for f in facts[i : i + batch_size] if f.get("subject") and f["subject"] in f.get("prompt", "")
        ]
        if not group:
            continue
        batch = target_batch(tokenizer, [f["prompt"] for f in group], [f["attribute"] for f in group])
        logits, labels = aligned_logits(model, batch)
        for row, fact in enumerate(group):
            pos = int((labels[row] != -100).nonzero()[0])
            if int(logits[row, pos].argmax()) == int(labels[row, pos]):
                known.append(fact)
        if len(known) >= limit:
            break
    return known[:limit]


@dataclass
class LayerChoice:
    layer: int
    how: str  # "tracing" or "structure"
    effects: list[float] = field(default_factory=list)  # mean MLP indirect effect per layer
    facts: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def default_layer(
    model: nn.Module,
    tokenizer,
    known_facts: str | Path | None = None,
    n_facts: int = 16,
    min_facts: int = 4,
    samples: int = 3,
    window: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = True,
) -> LayerChoice:
    """The layer to edit: argmax over layers of the MLP indirect effect at the subject's last token (see the
    module docstring), cached per model fingerprint; the structural rule when no known facts are usable."""
    arch = architecture(model)
    n_layers = arch.num_layers
    path = Path(known_facts) if known_facts else known_facts_path()
    fallback = LayerChoice(structural_layer(n_layers), "structure")
    if arch.is_seq2seq or path is None or not path.exists():
        return fallback
    window = window or max(1, round(n_layers / 10))
    settings = f"{path.name}-{path.stat().st_size}-n{n_facts}-s{samples}-w{window}-seed{seed}"
    cache = cache_dir() / "trace" / fingerprint(model) / "default_layer.json"
    if use_cache and cache.exists():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("settings") == settings:
                return LayerChoice(**stored["choice"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # recompute a corrupt entry
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return fallback
    facts = [f for f in facts if isinstance(f, dict) and {"prompt", "subject", "attribute"} <= set(f)]
    known = facts_the_model_knows(model, tokenizer, facts, n_facts)
    if len(known) < min_facts:
        choice = fallback
        choice.facts = len(known)
    else:
        std = embedding_std(model)
        total = torch.zeros(n_layers)
        for fact in tqdm(known, desc="tracing known facts for the default layer", disable=not progress):
            ids = prompt_ids(tokenizer, fact["prompt"])
            span = subject_span(tokenizer, fact["prompt"], fact["subject"])
            answer_id = target_ids(tokenizer, fact["attribute"])[0]
            _, p_low, scores = trace_scores(
                model,
                ids,
                span,
                answer_id,
                "mlp",
                window,
                samples,
                3.0 * std,
                tokens=[span[1] - 1],
                seed=seed,
            )
            total += scores[:, 0] - p_low
        effects = total / len(known)
        # Block 0's MLP acts as part of the embedding in GPT-like models (restoring it restores the corrupted
        # token itself), so windows containing it are not candidates when there is anything else.
        first = window // 2 + 1 if n_layers > window // 2 + 1 else 0
        effects_for_choice = effects.clone()
        effects_for_choice[:first] = -float("inf")
        choice = LayerChoice(
            int(effects_for_choice.argmax()), "tracing", [round(float(e), 5) for e in effects], len(known)
        )
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"settings": settings, "choice": choice.to_dict()}, indent=1))
    return choice
