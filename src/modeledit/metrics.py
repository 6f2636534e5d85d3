"""Exact edit metrics, as the papers define them.

CounterFact (ROME / MEMIT), with NLL_p(t) the mean per-token NLL of " " + t after prompt p:
- ES: share of rewrite prompts with NLL(true) > NLL(new); PS: the same on paraphrase prompts;
- NS: share of neighbourhood prompts with NLL(true) < NLL(new) (neighbours keep their true answer);
- EM / PM / NM: mean of P(new) - P(true) (EM, PM) and P(true) - P(new) (NM), with P = exp(-NLL);
- S: harmonic mean of ES, PS, NS. All x100, averaged per record and then over records.
zsRE / MEND: teacher-forced token accuracy of a target (share of its tokens that are the argmax) and exact
match (all of them); drawdown = accuracy (or perplexity) on locality inputs before minus after.
Generation-based (beside the teacher-forced figures; ``forms.py`` has the rules): greedy answers to each
prompt in its form; ES_gen / PS_gen: share of rewrite / paraphrase prompts whose answer holds the target
(cloze: starts with it; question, chat: first sentence contains it and not the old answer); NS_gen: share of
neighbourhood prompts that still give their own answer where the unedited model gave it, and otherwise do not
give the new target.
Fluency: ROME's weighted bi/tri-gram entropy of generated text, with a regex word splitter instead of
nltk's word_tokenize (no download).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .forms import answer_holds, neighbour_holds, prompt_form, rendered
from .lm import aligned_logits, is_seq2seq, target_batch
from .requests import EditRequest
from .verify import generate_answers


@dataclass
class Scored:
    nll: float  # mean per-token NLL of the target
    acc: float  # teacher-forced token accuracy
    tokens: int


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer, prompts: list[str], targets: list[str]) -> list[Scored]:
    """NLL and token accuracy of each target after its prompt, in one padded batch."""
    if not prompts:
        return []
    batch = target_batch(tokenizer, prompts, targets, is_seq2seq(model))
    logits, labels = aligned_logits(model, batch)
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    correct = (logits.argmax(-1) == labels) & mask
    n = mask.sum(-1).clamp(min=1)
    nll = -(picked * mask).sum(-1) / n
    acc = correct.sum(-1) / n
    return [Scored(float(a), float(b), int(c)) for a, b, c in zip(nll, acc, n)]


def score_request(model: nn.Module, tokenizer, r: EditRequest) -> dict:
    """Everything the metrics need about one request, from one forward pass over all its prompts (each in
    its form: see ``forms.rendered``)."""
    r = rendered(r, tokenizer)
    groups = {"rewrite": [r.text], "paraphrase": list(r.paraphrase_prompts)}
    pairs: list[tuple[str, str, str, str]] = []  # (group, kind, prompt, target)
    for group, prompts in groups.items():
        for p in prompts:
            pairs.append((group, "new", p, r.target_new))
            if r.target_true:
                pairs.append((group, "true", p, r.target_true))
    for p, answer in r.neighborhood():
        pairs.append(("neighborhood", "new", p, r.target_new))
        pairs.append(("neighborhood", "true", p, answer))
    scored = score_pairs(model, tokenizer, [p[2] for p in pairs], [p[3] for p in pairs])
    out: dict[str, dict[str, list]] = {
        g: {"new": [], "true": []} for g in ("rewrite", "paraphrase", "neighborhood")
    }
    for (group, kind, _, _), s in zip(pairs, scored):
        out[group][kind].append(s)
    return out


GENERATED = ("rewrite", "paraphrase", "neighborhood")


def generated_answers(model: nn.Module, tokenizer, r: EditRequest, groups=GENERATED) -> dict[str, list[str]]:
    """Greedy answers of the model to the request's prompts in their forms, per group, in one pass each
    generation length needs."""
    shown = rendered(r, tokenizer)
    prompts = {
        "rewrite": [(shown.text, r.text, r.target_new)],
        "paraphrase": [
            (s, o, r.target_new) for s, o in zip(shown.paraphrase_prompts, r.paraphrase_prompts)
        ],
        "neighborhood": [
            (s, o, max(a, r.target_new, key=len))
            for s, (o, a) in zip(shown.neighborhood_prompts, r.neighborhood())
        ],
    }
    flat = [(g, s, prompt_form(o, r.chat), t) for g in groups for s, o, t in prompts[g]]
    answers = generate_answers(model, tokenizer, [(s, f, t) for _, s, f, t in flat])
    out: dict[str, list[str]] = {g: [] for g in groups}
    for (g, *_), a in zip(flat, answers):
        out[g].append(a)
    return out


def generation_metrics(r: EditRequest, after: dict[str, list[str]], before: dict[str, list[str]] | None):
    """ES_gen, PS_gen (x100) from the answers ``after`` the edit; NS_gen also needs the unedited model's
    neighbourhood answers ``before``."""
    m: dict[str, float | None] = {}
    forms = {
        "rewrite": [prompt_form(r.text, r.chat)],
        "paraphrase": [prompt_form(p, r.chat) for p in r.paraphrase_prompts],
    }
    for group, key in (("rewrite", "ES_gen"), ("paraphrase", "PS_gen")):
        m[key] = _mean(
            [
                100.0 * answer_holds(a, r.target_new, f, r.target_true)
                for a, f in zip(after.get(group, []), forms[group])
            ]
        )
    if before is not None and before.get("neighborhood"):
        m["NS_gen"] = _mean(
            [
                100.0 * neighbour_holds(b, a, answer, r.target_new, prompt_form(p, r.chat))
                for b, a, (p, answer) in zip(before["neighborhood"], after["neighborhood"], r.neighborhood())
            ]
        )
    return m


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def record_metrics(scores: dict) -> dict[str, float | None]:
    """CounterFact and zsRE metrics of one record (x100), from ``score_request`` output."""
    m: dict[str, float | None] = {}
    for group, (success, magnitude) in {"rewrite": ("ES", "EM"), "paraphrase": ("PS", "PM")}.items():
        new, true = scores[group]["new"], scores[group]["true"]
        if true:
            m[success] = _mean([100.0 * (t.nll > n.nll) for n, t in zip(new, true)])
            m[magnitude] = _mean([100.0 * (math.exp(-n.nll) - math.exp(-t.nll)) for n, t in zip(new, true)])
        m[f"{group}_acc"] = _mean([100.0 * n.acc for n in new])
        m[f"{group}_em"] = _mean([100.0 * (n.acc == 1.0) for n in new])
    new, true = scores["neighborhood"]["new"], scores["neighborhood"]["true"]
    m["NS"] = _mean([100.0 * (t.nll < n.nll) for n, t in zip(new, true)])
    m["NM"] = _mean([100.0 * (math.exp(-t.nll) - math.exp(-n.nll)) for n, t in zip(new, true)])
    m["neighborhood_acc"] = _mean([100.0 * t.acc for t in true])
    m["neighborhood_nll"] = _mean([t.nll for t in true])
    return m


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize(records: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the records that have it; S = harmonic mean of ES, PS, NS."""
    keys = sorted({k for r in records for k in r})
    summary = {k: _mean([r[k] for r in records if r.get(k) is not None]) for k in keys}
    if all(summary.get(k) is not None for k in ("ES", "PS", "NS")):
        summary["S"] = harmonic_mean([summary["ES"], summary["PS"], summary["NS"]])
    return summary


# -- fluency -------------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+|[^\w\s]")


def n_gram_entropy(
    texts: list[str], ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency: per text, weighted mean over n of the entropy (bits) of its n-gram distribution;
    then the mean over texts."""
    per_text = []
    for text in texts:
        words = _WORD.findall(text.lower())
        entropies = []
        for n in ns:
            counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            freqs = np.array(list(counts.values()), dtype=float)
            if freqs.sum() == 0:
                entropies.append(0.0)
                continue
            freqs /= freqs.sum()
            entropies.append(float(-(freqs * np.log2(freqs)).sum()))
        per_text.append(float(np.mean(np.array(entropies) * np.array(weights))))
    return float(np.mean(per_text)) if per_text else 0.0
