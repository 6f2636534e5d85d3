"""ENN: second-order inner step, one-SGD-step edits against the *new* base model, the base model written as a
model directory with its own fingerprint, drawdown recorded, bit-exact revert, and a learning test."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from test_mend import REQUEST, TEXTS, short_training, synthetic_edits, weight_grads
from typer.testing import CliRunner

from modeledit import create_editor, load_model
from modeledit.cli import app
from modeledit.lm import aligned_logits, row_nll
from modeledit.methods.enn import ENN, ENNConfig, ENNError
from modeledit.models import fingerprint
from modeledit.training import (
    meta_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(**config) -> ENN:
    return ENN.for_training(tiny_model("llama"), char_tokenizer(), ENNConfig(**config))


def outer_grads(editor: ENN, create_graph: bool) -> list[torch.Tensor]:
    batch = meta_batch(editor.tokenizer, [REQUEST], TEXTS)
    edited = editor.inner_step(batch, create_graph=create_graph)
    logits, labels = aligned_logits(editor.model, batch.gen, params=edited)
    loss = row_nll(logits, labels)[: batch.n_new].mean()
    return torch.autograd.grad(loss, list(editor.theta.values()) + [editor.log_lr], allow_unused=True)


def test_gradient_reaches_the_base_parameters_through_the_inner_step():
    editor = fresh(edit_lr_init=0.05)
    second = outer_grads(editor, create_graph=True)
    first = outer_grads(editor, create_graph=False)  # the inner gradient as a constant: first order only
    assert all(g is not None and g.abs().sum() > 0 for g in second), "theta and the step sizes get gradients"
    differs = [not torch.allclose(a, b, rtol=1e-4, atol=1e-9) for a, b in zip(second[:-1], first[:-1])]
    assert all(differs), "the second-order term (through the inner step's gradient) contributes"
    editor.train(True)
    loss, stats = editor.training_loss(meta_batch(editor.tokenizer, [REQUEST], TEXTS))
    assert {"edit_nll", "kl", "kl_base", "es", "ps", "alpha"} <= set(stats)
    assert stats["kl_base"] == pytest.approx(0, abs=1e-6), "theta starts as the original weights"
    model_before = {n: p.clone() for n, p in editor.model.named_parameters()}
    grads = torch.autograd.grad(loss, list(editor.theta.values()))
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(model_before[n], p) for n, p in editor.model.named_parameters())
    assert all(p.grad is None for p in editor.model.parameters()), "the model itself is never trained"


def finished(tmp_path, editor: ENN | None = None) -> tuple[ENN, dict]:
    editor = editor or fresh(edit_lr_init=0.05)
    with torch.no_grad():  # a stand-in for meta-training: theta moves away from the original weights
        for p in editor.theta.values():
            p.add_(torch.randn_like(p) * 1e-2)
    editor.save(tmp_path)
    return editor, editor.finish_training(tmp_path)


def test_training_produces_a_new_base_model_and_edits_are_patches_against_it(tmp_path):
    editor, info = finished(tmp_path)
    meta = json.loads((tmp_path / "enn.json").read_text())
    assert meta["base_fingerprint"] == info["base_fingerprint"] != meta["original_fingerprint"]
    assert meta["original_fingerprint"] == fingerprint(editor.model)
    assert info["drawdown"]["ppl_enn_base"] > 0 and "drawdown_ppl" in info["drawdown"]
    base, tokenizer = load_model(str(tmp_path / "model"))
    assert fingerprint(base) == meta["base_fingerprint"]
    for n, p in editor.theta.items():
        assert torch.equal(base.get_parameter(n), p.detach()), "the saved base holds theta"
    with pytest.raises(ENNError, match="ENN changed the model's weights"):
        create_editor("enn", editor.model, tokenizer, editor_path=str(tmp_path))
    enn = create_editor("enn", base, tokenizer)  # found from --model OUT/model
    patch = enn.edit([REQUEST])
    assert patch.fingerprint == meta["base_fingerprint"]
    lrs = enn.edit_lrs()
    grads = weight_grads(base, tokenizer, enn.modules, [REQUEST])
    for j, m in enumerate(enn.modules):
        torch.testing.assert_close(patch.dense(f"{m}.weight"), -lrs[j] * grads[f"{m}.weight"])
    before = {n: p.clone() for n, p in base.named_parameters()}
    patch.apply(base)
    assert any(not torch.equal(before[n], p) for n, p in base.named_parameters())
    patch.revert(base)
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())
    with pytest.raises(ENNError, match="not the ENN base"):
        create_editor("enn", tiny_model("llama", seed=3), tokenizer, editor_path=str(tmp_path))


def test_training_improves_editing_over_the_untrained_state(tmp_path):
    editor = fresh(edit_lr_init=0.02, lr=1e-3, lr_edit_lr=3e-2, save_model=False)
    before, after, metrics = short_training(editor, editor.tokenizer, tmp_path, steps=40, n_val=12)
    assert after["loss"] < before["loss"] and after["edit_nll"] < before["edit_nll"], (before, after)
    assert after["es"] >= before["es"], (before, after)
    assert metrics["editor"]["drawdown"]["ppl_enn_base"] > 0


def test_cli_train_enn_writes_base_model_and_drawdown(tmp_path):
    model_dir, data = tmp_path / "model", tmp_path / "edits.json"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data.write_text(json.dumps([r.to_dict() for r in synthetic_edits(10)]))
    out = tmp_path / "enn"
    args = ["train", "enn", "--model", str(model_dir), "--data", str(data), "--val-size", "3", "--steps", "2"]
    result = CliRunner().invoke(app, args + ["--out", str(out), "--set", "val_every=1"])
    assert result.exit_code == 0, result.output
    assert {"enn.json", "enn.safetensors", "model", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["editor"]["base_fingerprint"] and "drawdown_ppl" in metrics["editor"]["drawdown"]
