"""Question-form and chat-form training edits derived from CounterFact's cloze edits.

Users ask questions, often in chat; CounterFact's edits are cloze sentences ("The mother tongue of {} is").
To train learned editors on the forms people use, ``question_templates.json`` (shipped beside this module)
gives one hand-written question per CounterFact prompt template of the train split ("What is the mother
tongue of {}?"; 215 templates, and 3 more its locality prompts use); its answer is the template's object,
so an edit's targets carry over unchanged.
``as_question`` rewrites a request's prompt, paraphrases and neighbours as questions, and ``training_forms``
returns each request in the cloze, question and chat forms, interleaved (chat: the question as a user turn,
rendered with the tokenizer's chat template where the batch is built; nothing is rendered here).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources

from ..requests import EditRequest

FORMS = ("plain", "question", "chat")
# CounterFact paraphrases language edits with "X was born in" ("Where was X born?" would ask for a place):
# in the train split, the only paraphrases whose template asks for another kind of answer than the edit's.
_ASKS_LANGUAGE = re.compile(r"\blanguage\b|\bmother tongue\b")


@cache
def _load() -> dict[str, str]:
    text = resources.files(__package__).joinpath("question_templates.json").read_text(encoding="utf-8")
    return json.loads(text)


def question_templates() -> dict[str, str]:
    """CounterFact prompt template (``{}`` for the subject) -> the question asking for its object."""
    return dict(_load())


@cache
def _patterns() -> list[tuple[str, re.Pattern[str]]]:
    """(template, regex with the subject as group 1), most specific (longest fixed text) first, so that
    "X is originally from" is read as "{} is originally from", not as "{} from" with "X is originally"."""
    out = []
    for template in sorted(_load(), key=lambda t: (-len(t), t)):
        before, after = template.split("{}")
        out.append((template, re.compile(re.escape(before) + "(.+?)" + re.escape(after))))
    return out


def match_template(text: str, subject: str | None = None) -> tuple[str, str, str] | None:
    """(context, template, subject) for a cloze prompt of a known template, else None.

    With ``subject``, the prompt may be preceded by unrelated sentences, as CounterFact's paraphrases are
    ("Paris is nice. Toko Yasuda is incredible at"): it matches if it *ends* with a template filled with the
    subject, after nothing or whitespace; ``context`` is what comes before (stripped). Without a subject
    (neighbourhood prompts), the whole prompt must be a template and the subject is read from it."""
    text = text.strip()
    for template, pattern in _patterns():
        if subject:
            filled = template.replace("{}", subject)
            if text.endswith(filled):
                context = text[: len(text) - len(filled)]
                if not context or context[-1].isspace():
                    return context.strip(), template, subject
        else:
            m = pattern.fullmatch(text)
            if m and m.group(1).strip():
                return "", template, m.group(1)
    return None


def _question(text: str, subject: str | None = None, like: str | None = None) -> str | None:
    """The question form of one cloze prompt (its context kept in front), or None; with ``like`` (the edit's
    question), None also where one asks for a language and the other does not."""
    found = match_template(text, subject)
    if found is None:
        return None
    context, template, subj = found
    question = _load()[template].replace("{}", subj)
    if like is not None and bool(_ASKS_LANGUAGE.search(question)) != bool(_ASKS_LANGUAGE.search(like)):
        return None
    return f"{context} {question}" if context else question


def as_question(request: EditRequest) -> EditRequest | None:
    """The request asked as a question: None when its prompt's template has no question.

    The prompt becomes the question filled with the subject; each paraphrase that ends with a known template
    becomes a question (with its leading context), the others are dropped, as are one equal to the prompt and
    one asking for another kind of answer (a birthplace for a language edit);
    neighbourhood prompts are converted the same way with their answers kept, and dropped when they match no
    template. Generation prompts (cloze openings for long-form text) are dropped. ``chat`` is False."""
    questions = _load()
    subject = request.subject
    template = None
    if "{}" in request.prompt or (subject and subject in request.prompt):
        template = request.template
    if template is None:  # no subject, or not in the prompt: read it from the prompt
        found = match_template(request.text)
        if found is None:
            return None
        _, template, subject = found
    if not subject or template not in questions:
        return None
    prompt = questions[template].replace("{}", subject)
    paraphrases = []
    for text in request.paraphrase_prompts:
        question = _question(text, subject, like=prompt)
        if question is not None and question != prompt and question not in paraphrases:
            paraphrases.append(question)
    neighbours, answers = [], []
    for text, answer in request.neighborhood():
        question = _question(text)
        if question is not None:
            neighbours.append(question)
            answers.append(answer)
    return dataclasses.replace(
        request,
        prompt=prompt,
        subject=subject,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=neighbours,
        neighborhood_answers=answers if request.neighborhood_answers else [],
        generation_prompts=[],
        chat=False,
    )


def training_forms(requests: Iterable[EditRequest], forms: Sequence[str] = FORMS) -> list[EditRequest]:
    """Each request in each form of ``forms``, interleaved per request (r1-plain, r1-question, r1-chat,
    r2-plain, ...) so any prefix of the list mixes the forms.

    plain: the request as it is; question: ``as_question``; chat: the question with ``chat=True``. A request
    whose template has no question is kept in plain form only."""
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise ValueError(f"forms must be among {FORMS}, got {list(forms)}")
    out = []
    for request in requests:
        question = as_question(request) if {"question", "chat"} & set(forms) else None
        for form in forms:
            if form == "plain":
                out.append(request)
            elif question is not None:
                out.append(question if form == "question" else dataclasses.replace(question, chat=True))
    return out
