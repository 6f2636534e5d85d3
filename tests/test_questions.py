"""Question templates for CounterFact and the question/chat training forms derived from its edits."""

import json
from pathlib import Path

import pytest

from modeledit.requests import EditRequest
from modeledit.training.questions import as_question, match_template, question_templates, training_forms

TRAIN = Path(__file__).resolve().parents[1].parent / "shared/data/counterfact/train.json"


def _request(**kw) -> EditRequest:
    fields = dict(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrase_prompts=["Paris is nice. Danielle Darrieux is a native speaker of"],
        neighborhood_prompts=["The native language of Jean Galland is", "Jean Galland likes"],
        neighborhood_answers=["French", "cheese"],
        case_id=7,
    )
    fields.update(kw)
    return EditRequest(**fields)


def test_every_train_template_has_a_question_and_locality_prompts_match():
    if not TRAIN.exists():
        pytest.skip(f"{TRAIN} is absent")
    records = json.loads(TRAIN.read_text(encoding="utf-8"))
    templates = {r["prompt"].replace(r["subject"], "{}") for r in records}
    assert len(templates) == 215
    assert templates <= set(question_templates())
    matched = sum(match_template(r["locality_prompt"]) is not None for r in records)
    assert matched == len(records)


def test_questions_are_questions_with_one_subject_slot():
    questions = question_templates()
    assert len(questions) >= 215
    for template, question in questions.items():
        assert template.count("{}") == 1, template
        assert question.endswith("?") and question.count("{}") == 1, question
    assert questions["{} plays the"] == "Which instrument does {} play?"
    assert questions["{} was developed by"] == "Who developed {}?"


def test_as_question():
    q = as_question(_request())
    assert q is not None and not q.chat
    assert q.prompt == "What is the mother tongue of Danielle Darrieux?"
    assert q.text == q.prompt and q.subject == "Danielle Darrieux"
    assert (q.target_new, q.target_true, q.case_id) == ("English", "French", 7)
    assert q.paraphrase_prompts == ["Paris is nice. What language is Danielle Darrieux a native speaker of?"]
    # the neighbour of a known template is asked as a question with its answer; the other is dropped
    assert q.neighborhood() == [("What is the native language of Jean Galland?", "French")]
    q.validate(needs_subject=True)


def test_as_question_subject_inside_and_paraphrases_dropped():
    req = _request(
        prompt="In Oulu, they understand",
        subject="Oulu",
        paraphrase_prompts=["Oulu was born in", "People in Oulu speak", "He left.In Oulu, they understand"],
        neighborhood_prompts=["In Biasca, the language spoken is"],
        neighborhood_answers=[],
    )
    q = as_question(req)
    assert q.prompt == "What language do they understand in Oulu?"
    # a birthplace question for a language edit, an unknown template, and a match not at a word boundary
    assert q.paraphrase_prompts == []
    assert q.neighborhood() == [("What language is spoken in Biasca?", "French")]
    assert q.neighborhood_answers == []
    # without a subject, it is read from the prompt
    q = as_question(EditRequest(prompt="Toko Yasuda plays the", target_new="piano"))
    assert (q.prompt, q.subject) == ("Which instrument does Toko Yasuda play?", "Toko Yasuda")


def test_unknown_template_gives_none_and_keeps_plain_only():
    unknown = _request(prompt="Danielle Darrieux is fond of", case_id=8)
    assert as_question(unknown) is None
    known = _request()
    out = training_forms([known, unknown])
    assert [(r.case_id, r.chat, r.prompt.endswith("?")) for r in out] == [
        (7, False, False),
        (7, False, True),
        (7, True, True),
        (8, False, False),
    ]
    assert out[0] is known and out[3] is unknown


def test_training_forms_interleaved():
    requests = [
        _request(),
        _request(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target_new="piano", case_id=2),
    ]
    out = training_forms(requests)
    assert [r.case_id for r in out] == [7, 7, 7, 2, 2, 2]
    assert [r.chat for r in out] == [False, False, True] * 2
    assert out[4].prompt == out[5].prompt == "Which instrument does Toko Yasuda play?"
    assert [r.chat for r in training_forms(requests, forms=("chat", "plain"))] == [True, False] * 2
    with pytest.raises(ValueError, match="forms"):
        training_forms(requests, forms=("cloze",))
