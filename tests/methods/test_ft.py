"""Fine-tuning editors: they move the edited fact, respect their constraints, and never mutate the model."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import tiny_configs, tiny_model

from modeledit import EditRequest, create_editor
from modeledit.lm import aligned_logits, kl_on_positions, mean_nll, target_batch, text_batch
from modeledit.locality import default_locality_texts

REQUEST = EditRequest(prompt="The capital of {} is", subject="Zorbia", target_new="Quux")


@torch.no_grad()
def target_nll(model, tokenizer, request=REQUEST) -> float:
    return float(mean_nll(model, target_batch(tokenizer, [request.text], [request.target_new]))[0])


@pytest.mark.parametrize("method", ["ft", "ft-l", "ft-kl"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_edit_lowers_target_nll_without_mutating_model(method, arch, tokenizer):
    model = tiny_model(arch)
    before_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = create_editor(
        method, model, tokenizer, lr=5e-2, steps=20, norm_constraint=None if method != "ft-l" else 5e-2
    )
    before = target_nll(model, tokenizer)
    patch = editor.edit([REQUEST])
    assert all(torch.equal(before_weights[n], p) for n, p in model.named_parameters()), (
        "edit() mutated the model"
    )
    patch.apply(model)
    assert target_nll(model, tokenizer) < before - 0.5
    patch.revert(model)
    assert all(torch.equal(before_weights[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "method,settings", [("ft", {}), ("ft-kl", {"stop_nll": 0.0}), ("ft-l", {"layers": [1]})]
)
def test_replaying_the_blocks_below_the_trained_ones_changes_nothing(method, settings, tokenizer):
    """The blocks below the first trained one are recorded once and replayed at every step: the same deltas
    as full forward passes (a deeper tiny model, so that there is something to replay)."""
    config = tiny_configs()["llama"]
    config.update({"num_hidden_layers": 5})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    deltas = {}
    for replay in (True, False):
        editor = create_editor(method, model, tokenizer, lr=5e-2, steps=4, **settings)
        editor.replay_blocks = replay
        assert editor.first_trained_block(editor.edited_modules()) == (1 if method == "ft-l" else 2)
        deltas[replay] = editor.edit([REQUEST]).deltas
    assert deltas[True].keys() == deltas[False].keys()
    for name, d in deltas[True].items():
        assert d.abs().max() > 0
        torch.testing.assert_close(d, deltas[False][name], rtol=1e-5, atol=1e-7)


def test_ft_l_respects_linf_constraint_and_trains_one_matrix(tokenizer):
    model = tiny_model("llama")
    patch = create_editor("ft-l", model, tokenizer, lr=1e-1, steps=5, norm_constraint=1e-3).edit([REQUEST])
    assert len(patch.deltas) == 1
    ((name, delta),) = patch.deltas.items()
    assert name.endswith("mlp.down_proj.weight")
    assert delta.abs().max() <= 1e-3 + 1e-9
    assert delta.abs().max() > 0


def test_ft_default_layers_are_the_last_three_blocks(tokenizer):
    model = tiny_model("gpt2")
    patch = create_editor("ft", model, tokenizer, steps=1, num_blocks=2).edit([REQUEST])
    assert sorted(patch.deltas) == sorted(
        f"transformer.h.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("c_fc", "c_proj")
    )


def test_ft_kl_keeps_unrelated_text_closer_than_ft(tokenizer):
    texts = default_locality_texts()[:6]
    batch = text_batch(tokenizer, texts)
    drift = {}
    for method in ("ft", "ft-kl"):
        model = tiny_model("llama")
        with torch.no_grad():
            before, labels = aligned_logits(model, batch)
        patch = create_editor(
            method, model, tokenizer, lr=3e-2, steps=15, stop_nll=0.0, locality_texts=texts
        ).edit([REQUEST])
        patch.apply(model)
        with torch.no_grad():
            after, _ = aligned_logits(model, batch)
        drift[method] = float(kl_on_positions(before, after, labels != -100))
    assert drift["ft-kl"] < drift["ft"]


def test_unknown_hyperparameter_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        create_editor("ft", tiny_model("llama"), tokenizer, learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        create_editor("nope", tiny_model("llama"), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft", "ft-l", "ft-kl"])
def test_each_ft_editor_moves_a_fact_on_the_default_model(method, default_model):
    model, tokenizer = default_model
    request = EditRequest(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
    )
    pairs = target_batch(tokenizer, [request.text] * 2, ["English", "French"])
    before = mean_nll(model, pairs)
    assert before[1] < before[0], "the model should prefer the true answer before the edit"
    patch = create_editor(method, model, tokenizer).edit([request])
    patch.apply(model)
    try:
        after = mean_nll(model, pairs)
    finally:
        patch.revert(model)
    assert after[0] < after[1], f"{method}: English should now beat French ({after.tolist()})"


@pytest.mark.parametrize("method", ["ft", "ft-l"])
def test_half_precision_models_are_optimised_in_float32(tokenizer, method):
    """Adam in float16 underflows (eps 1e-8): the deltas and their optimiser run in float32, the patch is
    finite and applies to the float16 model (issue 36)."""

    model = tiny_model("llama").to(torch.float16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = create_editor(method, model, tokenizer, steps=3).edit(
        EditRequest(prompt="ab is", target_new="cd")
    )
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in patch.deltas.values())
    assert any(d.abs().sum() > 0 for d in patch.deltas.values())
    patch.apply(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    patch.revert(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
