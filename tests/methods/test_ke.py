"""KE: hypernetwork output shapes, the gated mask and offset of the gradient, the Lagrange multiplier's update
direction, low-rank patches that revert bit-exactly, files, and a learning test."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from test_mend import REQUEST, TEXTS, short_training, synthetic_edits, weight_grads
from typer.testing import CliRunner

from modeledit import create_editor
from modeledit.cli import app
from modeledit.methods.ke import KE, KEConfig, KEError, row_factors
from modeledit.patch import LowRank
from modeledit.training import (
    meta_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(arch: str = "llama", **config) -> KE:
    return KE.for_training(tiny_model(arch), char_tokenizer(), KEConfig(**config))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_shapes_and_the_masked_gradient_at_init(arch, tokenizer):
    editor = fresh(arch, hidden=16)
    requests = [REQUEST, synthetic_edits(1)[0]]
    cond = editor.condition(requests)
    assert cond.shape == (2, 32)
    heads = editor.network.head_outputs(cond)
    for m, (d_out, d_in) in editor.network.shapes.items():
        h = heads[m]
        assert h["m_out"].shape == h["o_out"].shape == (2, d_out)
        assert h["m_in"].shape == h["o_in"].shape == (2, d_in) and h["eta"].shape == (2,)
        assert torch.equal(h["o_out"], torch.zeros_like(h["o_out"])), "no offset at init"
    patch = editor.edit([REQUEST])
    n_tokens = {
        m: u.shape[0]
        for m, (u, _) in row_factors(editor.model, _edit_batch(REQUEST), list(heads), 1)[0].items()
    }
    grads = weight_grads(editor.model, tokenizer, list(editor.network.shapes), [REQUEST])
    for m in editor.network.shapes:
        delta = patch.deltas[f"{m}.weight"]
        assert isinstance(delta, LowRank) and delta.a.shape[1] == n_tokens[m] + 1  # tokens + the offset
        # At init the mask is ~1/4 and the gate ~1/2: the update is close to -lr/8 * gradient.
        expected = -editor.network.log_lr.exp()[0] / 8 * grads[f"{m}.weight"]
        torch.testing.assert_close(patch.dense(f"{m}.weight"), expected, rtol=0.1, atol=1e-6)


def _edit_batch(request):
    from modeledit.lm import target_batch

    return target_batch(char_tokenizer(), [request.text], [request.target_new])


def test_lagrange_multiplier_ascends_on_violation_and_descends_otherwise(tokenizer):
    editor = fresh(lambda_init=1.0, lr_lambda=0.5)
    editor.update_lambda(0.4)
    assert float(editor.network.lam) == pytest.approx(1.2)
    editor.update_lambda(-1.0)
    assert float(editor.network.lam) == pytest.approx(0.7)
    editor.update_lambda(-10.0)
    assert float(editor.network.lam) == 0.0, "lambda stays >= 0"
    batch = meta_batch(tokenizer, [REQUEST], TEXTS)
    violated = fresh(lr_init=1.0, margin=0.0, lambda_init=1.0, lr_lambda=0.1).train(True)
    _, stats = violated.training_loss(batch)
    assert stats["kl"] > 0 and float(violated.network.lam) > 1.0, "KL above the margin: lambda grows"
    slack = fresh(lr_init=1.0, margin=100.0, lambda_init=1.0, lr_lambda=0.001).train(True)
    slack.training_loss(batch)
    assert float(slack.network.lam) < 1.0, "KL far below the margin: lambda shrinks"
    frozen = fresh(margin=0.0, lambda_init=1.0).train(False)
    frozen.training_loss(batch)
    assert float(frozen.network.lam) == 1.0, "validation does not move lambda"


def test_patch_applies_and_reverts_bit_exactly_and_files_round_trip(tokenizer, tmp_path):
    editor = fresh()
    with torch.no_grad():
        for p in editor.network.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    model = editor.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = editor.edit([REQUEST])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "edit() mutated the model"
    patch.apply(model)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    patch.revert(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    editor.save(tmp_path)
    loaded = create_editor("ke", model, tokenizer, editor_path=str(tmp_path))
    again = loaded.edit([REQUEST])
    for name, delta in patch.deltas.items():
        assert torch.equal(delta.a, again.deltas[name].a) and torch.equal(delta.b, again.deltas[name].b)
    with pytest.raises(KEError, match="not this model"):
        create_editor("ke", tiny_model("llama", seed=1), tokenizer, editor_path=str(tmp_path))
    with pytest.raises(KEError, match="modeledit train ke"):
        create_editor("ke", model, tokenizer)


def test_training_improves_editing_over_the_untrained_state(tokenizer, tmp_path):
    editor = fresh(lr=3e-3, hidden=32, lr_init=0.2)
    before, after, _ = short_training(editor, tokenizer, tmp_path, steps=40, n_val=12)
    assert after["loss"] < before["loss"] and after["edit_nll"] < before["edit_nll"], (before, after)
    assert after["es"] >= before["es"], (before, after)


def test_cli_train_ke(tmp_path):
    model_dir, data = tmp_path / "model", tmp_path / "edits.json"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data.write_text(json.dumps([r.to_dict() for r in synthetic_edits(10)]))
    out = tmp_path / "ke"
    args = ["train", "ke", "--model", str(model_dir), "--data", str(data), "--val-size", "3", "--steps", "2"]
    result = CliRunner().invoke(app, args + ["--out", str(out), "--set", "val_every=1", "--set", "hidden=8"])
    assert result.exit_code == 0, result.output
    assert {"ke.json", "ke.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}
