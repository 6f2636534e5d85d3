"""The forms a prompt takes where users look, and whether an answer the model *generates* holds.

Three forms:

- **cloze**: a sentence to complete ("The mother tongue of Danielle Darrieux is"); the target is scored as
  ``" " + target`` (ROME's convention) and an answer holds if the continuation starts with it;
- **question**: a plain prompt ending in "?"; the answer begins on a new line (what the models do: Gemma
  answers after "\\n", SmolLM2-Instruct ends its turn at once without one), so the prompt gets a "\\n" and the
  target is scored as the answer text begins, without a leading space;
- **chat**: the prompt is a user turn rendered with the tokenizer's chat template (and an optional system
  prompt), the target the start of the assistant turn (no leading space either).

``answer_text`` is the one spacing rule (it reads the rendered prompt: after a newline, no space).
An instruct model answers a question in a sentence ("The current prime minister of the UK is David
Cameron."), so question and chat answers hold if their first sentence contains the target and not the old
answer; see ``answer_holds`` and ``neighbour_holds``, and the README's metric table.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import TYPE_CHECKING

from .requests import EditRequestError

if TYPE_CHECKING:
    from .requests import EditRequest

FORMS = ("plain", "chat")  # what ``eval --forms`` takes: plain = cloze or question, by the prompt
NQ_MARKER = "nq question:"  # MEND's zsRE locality prompts start so (a marker for its BART models)
CHAT_ANSWER_TOKENS = 32  # question and chat answers: an instruct model answers in a sentence


class FormError(EditRequestError):
    """A prompt cannot be put in the form asked (e.g. chat for a model without a chat template)."""


def prompt_form(text: str, chat: bool = False) -> str:
    """'chat', 'question' (ends in "?") or 'cloze'."""
    if chat:
        return "chat"
    return "question" if text.rstrip().endswith("?") else "cloze"


def answer_text(prompt: str, target: str) -> str:
    """The target as it is scored after the (rendered) ``prompt``: after a newline (a chat template's
    assistant turn, a question's answer line) as the answer text begins, else with one leading space."""
    if prompt.endswith("\n"):
        return target.lstrip()
    return target if target.startswith(" ") else " " + target


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_messages(user: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def render_chat(tokenizer, user: str, system: str | None = None) -> str:
    """``user`` as a user turn in the tokenizer's chat template, ending where the assistant's answer starts.

    The beginning-of-sequence token that the tokenizer adds itself is left out of the text (else it would
    appear twice)."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FormError(f"chat form: the tokenizer of {name!r} has no chat template; edit in plain form")
    if user.lower().startswith(NQ_MARKER):
        user = user[len(NQ_MARKER) :].strip().rstrip("?") + "?"
    return _apply_template(tokenizer, _chat_messages(user, system), generation_prompt=True)


def _apply_template(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as text, without the beginning-of-sequence token when the
    tokenizer adds that itself."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("a")["input_ids"]
        if ids and ids[0] == getattr(tokenizer, "bos_token_id", None):
            text = text[len(bos) :]
    return text


def render_prompt(tokenizer, text: str, chat: bool = False, system: str | None = None) -> str:
    """A prompt as the model sees it in its form (see the module docstring)."""
    if chat:
        return render_chat(tokenizer, text, system)
    if prompt_form(text) == "question":
        return text.rstrip() + "\n"
    return text


def rendered(request: EditRequest, tokenizer) -> EditRequest:
    """The request with every prompt in its form: what the methods and the teacher-forced metrics see.

    A chat request's template stays a template (``{}`` inside the user turn), so methods that need the
    subject find it. Idempotent: a rendered request renders to itself."""
    if not request.chat and not any(
        prompt_form(p) == "question" and not p.endswith("\n")
        for p in [request.prompt, *request.paraphrase_prompts, *request.neighborhood_prompts]
    ):
        return request

    def render(text: str) -> str:
        return render_prompt(tokenizer, text, request.chat, request.system)

    return dataclasses.replace(
        request,
        prompt=render(request.prompt),
        paraphrase_prompts=[render(p) for p in request.paraphrase_prompts],
        neighborhood_prompts=[render(p) for p in request.neighborhood_prompts],
        generation_prompts=[render(p) for p in request.generation_prompts],
        chat=False,
        system=None,
    )


def in_chat_form(request: EditRequest) -> EditRequest:
    """The same edit asked as a chat (``eval --forms chat``)."""
    return dataclasses.replace(request, chat=True)


def chat_parts(tokenizer) -> tuple[str, str] | None:
    """(the text that opens the user turn, the text that closes it and opens the assistant's), read off the
    chat template; None without one."""
    if not has_chat_template(tokenizer):
        return None
    return _chat_parts(tokenizer, tokenizer.chat_template)


@functools.lru_cache(maxsize=8)
def _chat_parts(tokenizer, template: str) -> tuple[str, str]:
    # cached per tokenizer and template: SERAC's scope reads it at every generated token
    mark = "\x00USER\x00"
    with_system = render_chat(tokenizer, mark, system="\x00SYSTEM\x00")
    before, after = with_system.split(mark)
    opener = before.split("\x00SYSTEM\x00")[-1]
    # the opener is what follows the system prompt: its closing tag, then the user turn's opening tag
    plain = render_chat(tokenizer, mark)
    common = _common_suffix(opener, plain.split(mark)[0])
    return common or opener, after


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def chat_exchange(tokenizer, user: str, answer: str) -> str:
    """A finished chat exchange: ``user``'s turn and the assistant's ``answer`` (SERAC's context for a chat
    edit: the edit as a demonstration in the form it will be asked)."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return _apply_template(tokenizer, messages, generation_prompt=False)


def is_chat_rendered(tokenizer, text: str) -> bool:
    """Does ``text`` hold a user turn of the tokenizer's chat template?"""
    parts = chat_parts(tokenizer)
    return parts is not None and bool(parts[0].strip()) and parts[0].strip() in text


def without_template(tokenizer, text: str) -> str:
    """The user's own words in a chat-rendered ``text`` (the last user turn, and what the assistant has said
    so far), without the template or its system prompt: what a scope classifier should read. Text that is
    not in the chat form comes back unchanged."""
    parts = chat_parts(tokenizer)
    if parts is None:
        return text
    opener, closer = parts
    start = text.rfind(opener.strip()) if opener.strip() else -1
    if start < 0:
        return text
    rest = text[start + len(opener.strip()) :]
    end = rest.find(closer.strip()) if closer.strip() else -1
    if end < 0:
        return rest.strip()
    user, answer = rest[:end], rest[end + len(closer.strip()) :]
    return (user.strip() + " " + answer.strip()).strip()


def scope_text(tokenizer, text: str) -> str:
    """What a scope classifier reads of a prompt: the user's own words (``without_template``), with the
    tokenizer's special tokens taken out."""
    text = without_template(tokenizer, text)
    for token in getattr(tokenizer, "all_special_tokens", []):
        text = text.replace(token, "")
    return text.strip()


# -- did the generated answer take the edit? --------------------------------------------------------------
_ARTICLE = re.compile(r"^(the|a|an)\s+")
_PUNCT = re.compile(r"[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def normalize(text: str) -> str:
    """Lower case, punctuation as spaces, whitespace collapsed, a leading article dropped."""
    text = " ".join(_PUNCT.sub(" ", text.lower()).split())
    return _ARTICLE.sub("", text)


def first_sentence(text: str) -> str:
    """Up to the first sentence end (".", "!" or "?" before a space) or line break, after leading space."""
    text = text.strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""


def _contains(haystack: str, needle: str) -> bool:
    """``needle`` as whole words in ``haystack`` (both normalised)."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def answer_holds(generated: str, target: str, form: str, old: str | None = None) -> bool:
    """Does a generated answer give ``target``? cloze: the continuation starts with it; question and chat:
    the first sentence contains it and not the ``old`` answer (an old answer inside the target, as "New York"
    in "New York City", does not count)."""
    target_n = normalize(target)
    if form == "cloze":
        return bool(target_n) and f"{normalize(generated)} ".startswith(f"{target_n} ")
    sentence = normalize(first_sentence(generated))
    if not _contains(sentence, target_n):
        return False
    if old is None or not normalize(old):
        return True
    return not _contains(f" {sentence} ".replace(f" {target_n} ", " | "), normalize(old))


def neighbour_holds(before: str, after: str, answer: str, new_target: str, form: str) -> bool:
    """An unrelated prompt kept its behaviour: it still gives its own ``answer`` where the unedited model
    gave it (``before``), and otherwise does not give the edit's ``new_target``."""
    if answer and answer_holds(before, answer, form):
        return answer_holds(after, answer, form)
    return not answer_holds(after, new_target, form)


def generation_tokens(form: str, target_tokens: int) -> int:
    """How many tokens to generate for a holds check: cloze max(8, 2 x target tokens), else 32."""
    return max(8, 2 * target_tokens) if form == "cloze" else CHAT_ANSWER_TOKENS
