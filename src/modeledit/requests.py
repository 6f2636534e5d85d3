"""Edit requests, the readers for the formats people have on disk, and validation with clear errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class EditRequestError(ValueError):
    """A bad edit request or data file; the message names the record and the field."""


@dataclass
class EditRequest:
    """One edit: make the model answer ``target_new`` after ``prompt``.

    ``prompt`` is the full prompt containing ``subject`` or a template with ``{}`` standing for it.
    Neighbourhood prompts are other subjects with the same relation; their expected answers default to
    ``target_true`` (CounterFact) and may be given one per prompt (zsRE).
    """

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    case_id: Any = None
    chat: bool = False  # the prompts are user turns in the tokenizer's chat template (see forms.py)
    system: str | None = None  # chat: a system prompt (None: the template's own default)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        if "{}" in self.prompt:
            return self.prompt.format(self.subject or "")
        return self.prompt

    @property
    def template(self) -> str:
        """The prompt with the subject's last occurrence replaced by ``{}`` (needs a subject)."""
        if "{}" in self.prompt:
            return self.prompt
        i = self.prompt.rfind(self.subject or "\0")
        if i < 0:
            raise EditRequestError(self._where("subject") + f" {self.subject!r} does not occur in the prompt")
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject) :]

    def neighborhood(self) -> list[tuple[str, str]]:
        """(prompt, expected answer) pairs of the neighbourhood."""
        answers = self.neighborhood_answers or [self.target_true or ""] * len(self.neighborhood_prompts)
        return list(zip(self.neighborhood_prompts, answers))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, []) and (k != "chat" or v)}

    def _where(self, name: str) -> str:
        record = f"record {self.case_id}" if self.case_id is not None else "request"
        return f"{record}, field '{name}':"

    def validate(self, needs_subject: bool = False, tokenizer=None, max_length: int | None = None) -> None:
        """Raise EditRequestError naming the record and field for anything an editor cannot use."""
        for name in ("prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise EditRequestError(f"{self._where(name)} must be a non-empty string, got {value!r}")
        if self.target_true is not None and not str(self.target_true).strip():
            raise EditRequestError(f"{self._where('target_true')} is empty")
        for name in (
            "paraphrase_prompts",
            "neighborhood_prompts",
            "neighborhood_answers",
            "generation_prompts",
        ):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise EditRequestError(f"{self._where(name)} must be a list of non-empty strings")
        if self.neighborhood_answers and len(self.neighborhood_answers) != len(self.neighborhood_prompts):
            raise EditRequestError(
                f"{self._where('neighborhood_answers')} needs one answer per neighbourhood prompt"
            )
        if not isinstance(self.chat, bool):
            raise EditRequestError(f"{self._where('chat')} must be true or false, got {self.chat!r}")
        if self.system is not None and (not isinstance(self.system, str) or not self.system.strip()):
            raise EditRequestError(f"{self._where('system')} must be a non-empty string when given")
        # ``text`` fills the template with str.format: any other brace would be a field or a KeyError
        rest = self.prompt.replace("{}", "", 1)
        if "{" in rest or "}" in rest:
            raise EditRequestError(
                f"{self._where('prompt')} braces may appear only once, as {{}} for the subject, "
                f"got {self.prompt!r}"
            )
        if "{}" in self.prompt and not self.subject:
            raise EditRequestError(
                f"{self._where('subject')} the prompt is a template with {{}} but no subject is given"
            )
        if needs_subject:
            if not self.subject or not self.subject.strip():
                raise EditRequestError(f"{self._where('subject')} this method needs the subject")
            if "{}" not in self.prompt and self.subject not in self.prompt:
                raise EditRequestError(
                    f"{self._where('subject')} {self.subject!r} does not occur in the prompt"
                )
        if tokenizer is not None and max_length is not None:
            checks = [("prompt", self.text, self.target_new)]
            checks += [("paraphrase_prompts", p, self.target_new) for p in self.paraphrase_prompts]
            checks += [("neighborhood_prompts", p, a) for p, a in self.neighborhood()]
            for name, text, target in checks:
                check_length(tokenizer, text + " " + target, max_length, self._where(name), "with its target")


def check_length(
    tokenizer, text: str, max_length: int | None, where: str, what: str = "", reserve: int = 0
) -> int:
    """The number of tokens of ``text``; EditRequestError if they and ``reserve`` more (tokens to generate)
    exceed ``max_length``. The one length check: of edit requests, of prompts to answer, of the service's
    /v1/generate. A 9,000-word prompt costs a tokenizer call here, not minutes of generation."""
    n = len(tokenizer(text)["input_ids"])
    if max_length is not None and n + reserve > max_length:
        extra = f" {what}" if what else ""
        raise EditRequestError(f"{where} is {n} tokens{extra}, longer than the model context ({max_length})")
    return n


def model_context(model) -> int | None:
    """The most positions the model reads (None where its config names no limit, e.g. T5)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_for_model(
    requests: Sequence[EditRequest],
    model,
    tokenizer,
    needs_subject: bool = False,
    prompts: Sequence[tuple[str, str]] = (),
    new_tokens: int = 0,
) -> None:
    """Before any model work: every request valid and within the model's context in its form (chat
    rendered), and so the other prompts a command reads: ``prompts`` (name, text), each with ``new_tokens``
    to generate."""
    from .forms import rendered

    max_length = model_context(model)
    for r in requests:
        r.validate(needs_subject=needs_subject)  # the fields first: rendering reads them
        shown = rendered(r, tokenizer)
        shown.validate(needs_subject=needs_subject, tokenizer=tokenizer, max_length=max_length)
    for name, text in prompts:
        check_length(tokenizer, text, max_length, name, f"and {new_tokens} to generate", new_tokens)


# -- readers -------------------------------------------------------------------------------------------------


def _as_list(value) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def _rome_str(rw: dict, name: str) -> str:
    """``rw[name]["str"]``; a KeyError naming ``name`` (not ``'str'``) when it is missing."""
    value = rw[name]
    if not isinstance(value, dict) or "str" not in value:
        raise KeyError(f"{name}.str")
    return value["str"]


def _from_rome_counterfact(r: dict) -> EditRequest:
    rw = r["requested_rewrite"]
    return EditRequest(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=_rome_str(rw, "target_new"),
        target_true=_rome_str(rw, "target_true"),
        paraphrase_prompts=_as_list(r.get("paraphrase_prompts")),
        neighborhood_prompts=_as_list(r.get("neighborhood_prompts")),
        generation_prompts=_as_list(r.get("generation_prompts")),
        case_id=r.get("case_id"),
    )


def _from_flattened(r: dict) -> EditRequest:
    loc = _as_list(r.get("locality_prompt"))
    loc_answers = _as_list(r.get("locality_ground_truth"))
    return EditRequest(
        prompt=r["prompt"],
        subject=r.get("subject"),
        target_new=r["target_new"],
        target_true=r.get("ground_truth"),
        paraphrase_prompts=_as_list(r.get("rephrase_prompt")),
        neighborhood_prompts=loc,
        neighborhood_answers=loc_answers if len(loc_answers) == len(loc) else [],
        generation_prompts=_as_list(r.get("generation_prompts")),
        case_id=r.get("case_id"),
    )


def _from_zsre(r: dict) -> EditRequest:
    answers = _as_list(r.get("answers"))
    return EditRequest(
        prompt=r["src"],
        subject=r.get("subject"),
        target_new=r["alt"],
        target_true=answers[0] if answers else None,
        paraphrase_prompts=_as_list(r.get("rephrase")),
        neighborhood_prompts=_as_list(r.get("loc")),
        neighborhood_answers=_as_list(r.get("loc_ans")),
        case_id=r.get("case_id"),
    )


_REQUEST_FIELDS = {f.name for f in fields(EditRequest)}


def request_from_record(r: Any, index: int = 0) -> EditRequest:
    """One record of any supported format -> EditRequest, with a clear error for anything else."""
    where = f"record {r.get('case_id', index) if isinstance(r, dict) else index}"
    if not isinstance(r, dict):
        raise EditRequestError(f"{where}: expected a JSON object, got {type(r).__name__}")
    try:
        if "requested_rewrite" in r:
            req = _from_rome_counterfact(r)
        elif "src" in r:  # zsRE (a missing "alt" is reported as such)
            req = _from_zsre(r)
        elif "ground_truth" in r or "rephrase_prompt" in r or "locality_prompt" in r:
            req = _from_flattened(r)
        elif "prompt" in r and "target_new" in r:
            unknown = set(r) - _REQUEST_FIELDS
            if unknown:
                raise EditRequestError(f"{where}: unknown field(s) {sorted(unknown)}")
            req = EditRequest(**r)
        else:
            raise EditRequestError(
                f"{where}: not a CounterFact, flattened CounterFact, zsRE or EditRequest record "
                f"(fields: {sorted(r)})"
            )
    except KeyError as e:
        raise EditRequestError(f"{where}, field {e.args[0]!r}: missing") from None
    except (TypeError, AttributeError) as e:
        raise EditRequestError(f"{where}: malformed record ({e})") from None
    if req.case_id is None:
        req.case_id = index
    req.validate()
    return req


def load_requests(
    path: str | Path, offset: int = 0, limit: int | None = None, skipped: list[str] | None = None
) -> list[EditRequest]:
    """Read a JSON list or JSONL file of CounterFact / flattened CounterFact / zsRE / EditRequest records.

    A record that is not a valid edit raises EditRequestError; with a ``skipped`` list, it is left out and
    its error appended there instead (zsRE's MEND split has records with an empty new answer)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EditRequestError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EditRequestError(f"cannot read {path}: not UTF-8 text") from None
    records: list
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as whole_error:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # Nothing parsed yet: not JSONL from the start, so the whole-file error has the right line.
                e = whole_error if not records else None
                detail = f"line {e.lineno} column {e.colno}: {e.msg}" if e else f"line {n} is not valid JSON"
                raise EditRequestError(f"{path}: not valid JSON or JSONL ({detail})") from None
    if not records:
        raise EditRequestError(f"{path}: no records")
    if offset < 0 or (limit is not None and limit < 0):
        raise EditRequestError(f"offset and limit must be >= 0, got {offset} and {limit}")
    end = None if limit is None else offset + limit
    out = []
    for i, r in enumerate(records[offset:end]):
        try:
            out.append(request_from_record(r, offset + i))
        except EditRequestError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return out
