"""Prompt forms (cloze, question, chat), the target-spacing rule, and generation-based success."""

from __future__ import annotations

import functools

import pytest
import torch

from modeledit.forms import (
    FormError,
    answer_holds,
    answer_text,
    first_sentence,
    neighbour_holds,
    normalize,
    prompt_form,
    render_prompt,
    rendered,
    scope_text,
    without_template,
)
from modeledit.lm import target_batch, target_ids
from modeledit.metrics import generation_metrics
from modeledit.requests import EditRequest

# Gemma 3's published chat template, in short (the offline Gemma 3 270M is the base model: no template)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set role = 'user' %}"
    "{% elif m['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = m['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@functools.cache
def offline_tokenizer(name: str):
    """The tokenizer of an offline model, read from its cached folder or its GGUF file (no weights)."""
    from transformers import AutoTokenizer

    from modeledit import models

    folder = models.cache_dir() / "models" / (models.DEFAULT_MODEL if name == "default" else name)
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    try:
        gguf = models.OFFLINE_MODELS[name]()
    except models.ModelLoadError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(params=["default", "gemma3-270m"])
def real_tokenizer(request):
    tok = offline_tokenizer(request.param)
    return request.param, tok


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


# -- forms and spacing ---------------------------------------------------------------------------------------
def test_prompt_form():
    assert prompt_form("The mother tongue of Danielle Darrieux is") == "cloze"
    assert prompt_form("Who is the prime minister of the UK? ") == "question"
    assert prompt_form("Who is the prime minister of the UK?", chat=True) == "chat"


def test_answer_text_is_the_one_spacing_rule():
    assert answer_text("The capital of France is", "Paris") == " Paris"
    assert answer_text("The capital of France is", " Paris") == " Paris"
    assert answer_text("Who is the prime minister of the UK?\n", "Keir Starmer") == "Keir Starmer"
    assert answer_text("<|im_start|>assistant\n", " Keir Starmer") == "Keir Starmer"


def test_spacing_on_both_tokenizers(real_tokenizer):
    """cloze: the target's first token is a word start (" Ke"); question: after the answer line's newline,
    the answer as it begins ("Ke"), exactly the tokens of the whole text."""
    _, tok = real_tokenizer
    cloze = target_ids(tok, "Keir Starmer", prompt="The prime minister of the UK is")
    assert tokens(tok, cloze)[0] in ("ĠKe", "▁Ke")
    question = render_prompt(tok, "Who is the prime minister of the UK?")
    assert question.endswith("?\n")
    ids = target_ids(tok, "Keir Starmer", prompt=question)
    assert tokens(tok, ids)[0] == "Ke"
    batch = target_batch(tok, [question], ["Keir Starmer"])
    whole = tok(question + "Keir Starmer")["input_ids"]
    assert batch["input_ids"][0].tolist() == whole
    assert (batch["labels"][0] != -100).sum() == len(ids)


def test_chat_rendering_smollm2():
    tok = offline_tokenizer("default")
    text = render_prompt(tok, "Who is the prime minister of the UK?", chat=True)
    assert "<|im_start|>user\nWho is the prime minister of the UK?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    own = render_prompt(tok, "Who?", chat=True, system="Answer briefly.")
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in own and "SmolLM" not in own
    # the assistant's answer starts without a leading space, and the ids are those of the whole text
    batch = target_batch(tok, [text], ["Keir Starmer"])
    assert batch["input_ids"][0].tolist() == tok(text + "Keir Starmer")["input_ids"]
    assert tokens(tok, target_ids(tok, "Keir Starmer", prompt=text))[0] == "Ke"


def test_chat_rendering_gemma_and_no_template_error():
    tok = offline_tokenizer("gemma3-270m")
    with pytest.raises(FormError, match="no chat template"):
        render_prompt(tok, "Who is the prime minister of the UK?", chat=True)
    tok.chat_template = GEMMA_TEMPLATE
    try:
        text = render_prompt(tok, "Who is the prime minister of the UK?", chat=True)
        # the tokenizer adds <bos> itself: the rendered text leaves it out, so it is there once
        assert not text.startswith("<bos>") and text.endswith("<start_of_turn>model\n")
        ids = tok(text)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1
        assert tokens(tok, target_ids(tok, "Keir Starmer", prompt=text))[0] == "Ke"
    finally:
        tok.chat_template = None


def test_rendered_request_keeps_the_subject_template_and_is_idempotent():
    tok = offline_tokenizer("default")
    r = EditRequest(
        prompt="Who is the prime minister of {}?",
        subject="the UK",
        target_new="Keir Starmer",
        paraphrase_prompts=["Who leads the government of the UK?"],
        neighborhood_prompts=["What is the capital of France?"],
        chat=True,
    )
    shown = rendered(r, tok)
    assert "{}" in shown.prompt and shown.subject == "the UK" and not shown.chat
    assert shown.text.endswith("assistant\n") and "the UK?" in shown.text
    assert all(p.endswith("assistant\n") for p in shown.paraphrase_prompts + shown.neighborhood_prompts)
    assert rendered(shown, tok) == shown
    plain = EditRequest(prompt="Who is the prime minister of {}?", subject="the UK", target_new="K")
    assert rendered(plain, tok).text == "Who is the prime minister of the UK?\n"
    cloze = EditRequest(prompt="The capital of {} is", subject="France", target_new="Lyon")
    assert rendered(cloze, tok) is cloze


def test_chat_request_validates_its_fields():
    from modeledit.requests import EditRequestError

    with pytest.raises(EditRequestError, match="chat"):
        EditRequest(prompt="a", target_new="b", chat="yes").validate()
    with pytest.raises(EditRequestError, match="system"):
        EditRequest(prompt="a", target_new="b", chat=True, system="  ").validate()
    assert "chat" not in EditRequest(prompt="a", target_new="b").to_dict()
    assert EditRequest(prompt="a", target_new="b", chat=True).to_dict()["chat"] is True


def test_scope_text_reads_the_user_turn_only():
    tok = offline_tokenizer("default")
    a = render_prompt(tok, "Who is the prime minister of the UK?", chat=True)
    b = render_prompt(tok, "Who is the president of the US?", chat=True)
    assert scope_text(tok, a) == "Who is the prime minister of the UK?"
    assert scope_text(tok, b) == "Who is the president of the US?"
    assert scope_text(tok, a + "Keir") == "Who is the prime minister of the UK? Keir"
    assert without_template(tok, "The capital of France is") == "The capital of France is"


# -- generation-based success on hand-made answers ----------------------------------------------------------
def test_normalisation():
    assert normalize("  The  Beatles!") == "beatles"
    assert normalize("An Apple, a day.") == "apple a day"
    assert first_sentence(" Keir Starmer. He leads Labour.") == "Keir Starmer."
    assert first_sentence("The PM is Keir Starmer\nHe leads") == "The PM is Keir Starmer"
    assert first_sentence("Dr.Who is a show") == "Dr.Who is a show"


@pytest.mark.parametrize(
    "generated, target, form, old, holds",
    [
        (" English. She was born", "English", "cloze", None, True),
        (" the English language", "English", "cloze", None, True),  # a leading article
        (" Englishman and", "English", "cloze", None, False),  # a word that only starts like it
        (" French, not English", "English", "cloze", None, False),  # cloze: must start with it
        (
            "The current prime minister of the UK is Keir Starmer.",
            "Keir Starmer",
            "chat",
            "Theresa May",
            True,
        ),
        ("keir starmer!", "Keir Starmer", "question", None, True),  # case and punctuation
        ("Theresa May. Keir Starmer is the leader of Labour.", "Keir Starmer", "chat", "Theresa May", False),
        ("Keir Starmer replaced Theresa May.", "Keir Starmer", "chat", "Theresa May", False),
        ("It is New York City.", "New York City", "question", "New York", True),  # old inside the target
        ("", "Keir Starmer", "chat", None, False),
    ],
)
def test_answer_holds(generated, target, form, old, holds):
    assert answer_holds(generated, target, form, old) is holds


def test_neighbour_holds():
    # gave its answer before and after: kept; before but not after: lost
    assert neighbour_holds(" Paris.", " Paris, the city", "Paris", "Lyon", "cloze")
    assert not neighbour_holds(" Paris.", " Lyon.", "Paris", "Lyon", "cloze")
    # never gave its answer: it holds unless it now gives the new target
    assert neighbour_holds("I do not know.", "It is a city.", "Hugo Weaving", "Lyon", "chat")
    assert not neighbour_holds("I do not know.", "Lyon is the answer.", "Hugo Weaving", "Lyon", "chat")


def test_generation_metrics_on_hand_made_answers():
    r = EditRequest(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrase_prompts=[
            "Danielle Darrieux's native language is",
            "Where Danielle Darrieux is from, people speak",
        ],
        neighborhood_prompts=["Michel Rocard is a native speaker of", "The mother tongue of Jean Gabin is"],
    )
    before = {"neighborhood": [" French.", " the language of"]}
    after = {
        "rewrite": [" English."],
        "paraphrase": [" English, and", " French"],
        "neighborhood": [" French, of course", " English."],
    }
    m = generation_metrics(r, after, before)
    assert m == {"ES_gen": 100.0, "PS_gen": 50.0, "NS_gen": 50.0}
    assert generation_metrics(r, after, None).get("NS_gen") is None


def test_verify_on_a_tiny_model_records_verdicts(tokenizer):
    """verify=True on a tiny random model: verdicts recorded per prompt, the model left unchanged."""
    from conftest import snapshot, tiny_model

    from modeledit import create_editor

    model = tiny_model("llama")
    before = snapshot(model)
    r = EditRequest(prompt="ab cd is", target_new="xy", paraphrase_prompts=["cd ab is"])
    patch = create_editor("ft", model, tokenizer, steps=1, lr=1e-6).edit(r, verify=True)
    v = patch.info["verify"]
    assert [row["kind"] for row in v["prompts"]] == ["edit", "paraphrase"]
    assert v["holds"] is False and v["tries"] == 3  # a tiny step cannot make a random model say "xy"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
