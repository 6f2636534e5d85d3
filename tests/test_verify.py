"""Edits checked in generation on the real default model: the lecture's example in chat form."""

from __future__ import annotations

import pytest
import torch

from modeledit import create_editor
from modeledit.forms import render_prompt, scope_text
from modeledit.patch import attachment
from modeledit.requests import EditRequest
from modeledit.verify import generate_answers

PM = dict(
    prompt="Who is the prime minister of the UK?",
    subject="UK",
    target_new="Keir Starmer",
    target_true="Theresa May",
    paraphrase_prompts=["Who is the current UK prime minister?"],
    chat=True,
)


@pytest.mark.slow
def test_verify_tells_a_strong_edit_from_a_too_weak_one(default_model):
    model, tok = default_model
    torch.set_grad_enabled(True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    strong = create_editor("grace", model, tok).edit(EditRequest(**PM), verify=True)
    checks = strong.info["verify"]
    assert checks["holds"] is True, checks
    assert "keir starmer" in checks["prompts"][0]["answer"].lower()
    weak = create_editor("grace", model, tok, steps=1, lr=1e-6).edit(EditRequest(**PM), verify=True)
    assert weak.info["verify"]["holds"] is False and weak.info["verify"]["tries"] == 3
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # edit() changes nothing


@pytest.mark.slow
def test_serac_scope_reads_the_user_turn_not_the_shared_system_prompt(default_model):
    """Two chat prompts share the template's system prompt; only the edited question is in scope."""
    model, tok = default_model
    torch.set_grad_enabled(True)
    unrelated = [(render_prompt(tok, "What is the capital of France?", chat=True), "chat", "Paris")]
    before = generate_answers(model, tok, unrelated)
    patch = create_editor("serac", model, tok).edit(EditRequest(**PM), verify=True)
    assert patch.info["verify"]["holds"], patch.info["verify"]  # its context: the edit as a chat exchange
    patch.apply(model)
    try:
        memory = attachment(model, "serac")
        asked = [render_prompt(tok, PM["prompt"], chat=True), unrelated[0][0]]
        _, logits = memory.scope([scope_text(tok, t) for t in asked])
        assert logits[0] > 0 and logits[1] <= 0, logits
        assert generate_answers(model, tok, unrelated) == before
    finally:
        patch.revert(model)


@pytest.mark.slow
def test_demo_shows_the_cloze_and_the_chat_edit_and_restores_both(default_model):
    from typer.testing import CliRunner

    from modeledit.cli import app

    result = CliRunner().invoke(app, ["demo"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "the lecture's question, in chat" in result.output
    assert result.output.count("original answers restored: yes") == 2
    assert result.output.count("the edit holds") == 2  # MEND's cloze edit and the default method's chat edit
