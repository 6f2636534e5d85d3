"""Does an edit hold where users look? Generate with the patch applied and read the answers.

``check_patch`` applies a patch, generates one greedy answer per checked prompt (each request's prompt and
its paraphrases, in the request's form: cloze, question or chat), reverts the patch, and returns the verdicts
that ``Editor.edit(..., verify=True)`` records in ``patch.info["verify"]``:
``{"holds": bool, "prompts": [{"prompt", "kind", "answer", "holds"}, ...]}``. ``holds`` is the verdict on the
edit prompts (every request's own prompt); paraphrases are reported beside it.
"""

from __future__ import annotations

from torch import nn

from .forms import answer_holds, generation_tokens, prompt_form, rendered
from .lm import generate, target_ids
from .patch import Patch
from .requests import EditRequest


def generate_answers(model: nn.Module, tokenizer, prompts: list[tuple[str, str, str]]) -> list[str]:
    """Greedy answers to (rendered prompt, form, expected answer) triples, as long as ``generation_tokens``
    says for each: one ``generate`` call per length."""
    answers: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, (text, form, target) in enumerate(prompts):
        tokens = len(target_ids(tokenizer, target, prompt=text)) if target else 1
        by_length.setdefault(generation_tokens(form, tokens), []).append(i)
    for length, index in by_length.items():
        for i, answer in zip(index, generate(model, tokenizer, [prompts[i][0] for i in index], length)):
            answers[i] = answer
    return answers


def checked_prompts(request: EditRequest, tokenizer) -> list[tuple[str, str, str]]:
    """(kind, rendered prompt, form) of the prompts a check reads: the edit prompt, then each paraphrase."""
    shown = rendered(request, tokenizer)
    originals = [("edit", request.text), *(("paraphrase", p) for p in request.paraphrase_prompts)]
    texts = [shown.text, *shown.paraphrase_prompts]
    return [(kind, text, prompt_form(o, request.chat)) for (kind, o), text in zip(originals, texts)]


def check_patch(model: nn.Module, tokenizer, patch: Patch, requests: list[EditRequest]) -> dict:
    """Apply ``patch``, generate for every checked prompt of ``requests``, revert; the verdicts."""
    rows: list[dict] = []
    patch.apply(model)
    try:
        for r in requests:
            prompts = checked_prompts(r, tokenizer)
            answers = generate_answers(model, tokenizer, [(t, f, r.target_new) for _, t, f in prompts])
            for (kind, _, form), original, answer in zip(
                prompts, [r.text, *r.paraphrase_prompts], answers
            ):
                rows.append(
                    {
                        "prompt": original,
                        "kind": kind,
                        "form": form,
                        "answer": answer.strip(),
                        "holds": answer_holds(answer, r.target_new, form, r.target_true),
                    }
                )
    finally:
        patch.revert(model)
    return {"holds": all(row["holds"] for row in rows if row["kind"] == "edit"), "prompts": rows}


def verdict_line(verify: dict) -> str:
    """One line for people: "the edit holds" or what the model answers instead."""
    failed = [row for row in verify["prompts"] if row["kind"] == "edit" and not row["holds"]]
    if not failed:
        return "the edit holds"
    answer = failed[0]["answer"] or "(nothing)"
    return f"the edit does NOT hold (the model answers {answer!r})"
