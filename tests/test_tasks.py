"""The generic editing API: any nn.Module, a Task, TensorEdits; patches like the language-model path's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modeledit import EditRequest, EditRequestError, Patch, TensorEdit, create_editor
from modeledit.methods.enn import ENN, ENNConfig
from modeledit.methods.mend import MEND, MENDConfig, gradient_factors
from modeledit.tasks import ClassificationTask, LossTask, TensorBatch, resolve_task
from modeledit.training import TrainConfig, tensor_meta_batch, train_editor


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model.requires_grad_(False)
    return model


def regressor(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2))
    model.requires_grad_(False)
    return model


class KeywordModel(nn.Module):
    """Takes keyword inputs and returns an object with .logits, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, features, scale):
        return type("Out", (), {"logits": self.b(torch.relu(self.a(features * scale)))})()


def wrong_label(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(-1) + 1) % 4


def test_ft_flips_a_classifier_and_the_patch_reverts_bit_exactly():
    model, x = classifier(), torch.randn(1, 6)
    before = copy.deepcopy(model.state_dict())
    target = wrong_label(model, x)
    editor = create_editor("ft", model, task="classification", lr=1e-2, steps=100)
    assert editor.edited_modules() == ["0", "2", "4"]  # the last num_blocks=3 linear layers
    patch = editor.edit(TensorEdit(x, target))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # edit() changes nothing
    patch.apply(model)
    assert model(x).argmax(-1).item() == target.item()
    patch.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_default_edited_layers_are_the_last_linear_layers():
    model = classifier()
    assert create_editor("ft", model, task="classification", num_blocks=2).edited_modules() == ["2", "4"]
    assert create_editor("ft", model, task="classification", modules=["0"]).edited_modules() == ["0"]


def test_regression_and_a_custom_loss_function():
    model, x = regressor(), torch.randn(2, 3)
    target = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    for task in ("regression", lambda out, t: (out - t).pow(2).sum(-1)):
        editor = create_editor("ft", model, task=task, lr=1e-2, steps=300, stop_nll=1e-4)
        patch = editor.edit(TensorEdit(x, target))
        with _applied(patch, model):
            assert torch.allclose(model(x), target, atol=0.05)
    assert isinstance(resolve_task(lambda o, t: o, model), LossTask)


class _applied:
    def __init__(self, patch: Patch, model: nn.Module):
        self.patch, self.model = patch, model

    def __enter__(self):
        self.patch.apply(self.model)

    def __exit__(self, *exc):
        self.patch.revert(self.model)


def test_ft_kl_keeps_locality_inputs_closer_than_plain_ft():
    model, x = classifier(), torch.randn(1, 6)
    target, others = wrong_label(model, x), torch.randn(64, 6)
    with torch.no_grad():
        base = torch.log_softmax(model(others), -1)
    drift = {}
    for method in ("ft", "ft-kl"):
        editor = create_editor(method, model, task="classification", lr=1e-2, steps=60, stop_nll=0.0)
        patch = editor.edit(TensorEdit(x, target, locality_inputs=others))
        with _applied(patch, model), torch.no_grad():
            after = torch.log_softmax(model(others), -1)
            assert model(x).argmax(-1).item() == target.item()
        drift[method] = (base.exp() * (base - after)).sum(-1).mean().item()
    assert drift["ft-kl"] < drift["ft"]
    with pytest.raises(EditRequestError, match="locality_inputs"):
        create_editor("ft-kl", model, task="classification").edit(TensorEdit(x, target))


def test_sequence_task_and_keyword_inputs():
    # per-token classification: outputs (n, T, C), targets (n, T) with -100 ignored
    torch.manual_seed(0)
    tagger = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 5)).requires_grad_(False)
    tokens, tags = torch.tensor([[1, 2, 3]]), torch.tensor([[4, -100, 0]])
    patch = create_editor("ft", tagger, task="sequence", lr=5e-2, steps=200, num_blocks=1).edit(
        TensorEdit(tokens, tags)
    )
    with _applied(patch, tagger):
        pred = tagger(tokens).argmax(-1)
        assert pred[0, 0] == 4 and pred[0, 2] == 0
    model = KeywordModel().requires_grad_(False)
    inputs = {"features": torch.randn(1, 4), "scale": torch.ones(1, 1)}
    target = (model(**inputs).logits.argmax(-1) + 1) % 3
    patch = create_editor("ft", model, task="classification", lr=1e-2, steps=100).edit(
        TensorEdit(inputs, target)
    )
    with _applied(patch, model):
        assert model(**inputs).logits.argmax(-1).item() == target.item()


def test_bad_generic_edits_get_one_line_errors():
    model = classifier()
    editor = create_editor("ft", model, task="classification")
    with pytest.raises(EditRequestError, match="2 rows for 1 inputs"):
        editor.edit(TensorEdit(torch.randn(1, 6), torch.tensor([0, 1])))
    with pytest.raises(EditRequestError, match="class indices"):
        editor.edit(TensorEdit(torch.randn(1, 6), torch.tensor([0.5])))
    with pytest.raises(EditRequestError, match="NaN"):
        editor.edit(TensorEdit(torch.full((1, 6), float("nan")), torch.tensor([0])))
    with pytest.raises(EditRequestError, match="TensorEdit, not EditRequest"):
        editor.edit(EditRequest(prompt="a", target_new="b"))
    with pytest.raises(ValueError, match="language models only"):
        create_editor("rome", model, task="classification")
    with pytest.raises(ValueError, match="unknown task"):
        create_editor("ft", model, task="clasification")
    with pytest.raises(ValueError, match="give a tokenizer"):
        create_editor("ft", model)


def test_generic_patch_round_trip_through_a_file(tmp_path):
    model, x = classifier(), torch.randn(1, 6)
    target = wrong_label(model, x)
    patch = create_editor("ft", model, task="classification", lr=1e-2, steps=100).edit(TensorEdit(x, target))
    assert patch.requests[0]["kind"] == "tensor" and patch.requests[0]["targets"] == target.tolist()
    patch.save(tmp_path / "p.safetensors")
    fresh = classifier()  # same weights, a new object: same fingerprint
    Patch.load(tmp_path / "p.safetensors").apply(fresh)
    assert fresh(x).argmax(-1).item() == target.item()
    with pytest.raises(Exception, match="exact model"):
        Patch.load(tmp_path / "p.safetensors").apply(classifier(seed=1))


def _edits(model: nn.Module, n: int, seed: int) -> list[TensorEdit]:
    g = torch.Generator().manual_seed(seed)
    edits = []
    for _ in range(n):
        x = torch.randn(1, 6, generator=g)
        edits.append(
            TensorEdit(
                x,
                wrong_label(model, x),
                equivalent_inputs=x + 0.05 * torch.randn(3, 6, generator=g),
                locality_inputs=torch.randn(8, 6, generator=g),
            )
        )
    return edits


def test_untrained_mend_on_any_model_is_one_descent_step():
    model = classifier()
    task = ClassificationTask()
    editor = MEND.for_training(model, None, MENDConfig(rank=4, alpha_init=1e-1), task=task)
    edit = _edits(model, 1, 0)[0]
    batch = TensorBatch(edit.inputs, edit.targets)
    loss_before = task.loss(task.outputs(model, batch), batch).item()
    factors = gradient_factors(model, task, [edit], list(editor.network.shapes))
    autograd = {}
    params = dict(model.named_parameters())
    leaves = {f"{m}.weight": params[f"{m}.weight"].detach().requires_grad_(True) for m in factors}
    loss = task.loss(task.outputs(model, batch, leaves), batch).sum()
    for name, grad in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
        autograd[name] = grad
    for m, (u, delta) in factors.items():
        assert torch.allclose(delta.T @ u, autograd[f"{m}.weight"], atol=1e-5)
    with _applied(editor.edit(edit), model):
        assert task.loss(task.outputs(model, batch), batch).item() < loss_before


def test_mend_isolates_a_batch_of_tensor_edits_row_by_row():
    model = classifier()
    task = ClassificationTask()
    editor = MEND.for_training(model, None, MENDConfig(rank=4, alpha_init=1e-1), task=task)
    edits = _edits(model, 2, 0)
    owners: dict = {}
    factors = gradient_factors(model, task, edits, list(editor.network.shapes), owners)
    rows = [len(e.targets) for e in edits]  # (batch, features) inputs: one factor row per input row
    for m, (u, _) in factors.items():
        assert len(owners[m]) == len(u)
        assert owners[m].tolist() == [i for i, n in enumerate(rows) for _ in range(n)]
    editor.config.isolate_batch = 1.0
    assert editor.edit(edits).deltas  # isolation runs on 2-D layer inputs too


def test_mend_trains_on_tensor_edits_and_reloads(tmp_path):
    model = classifier()
    editor = MEND.for_training(
        model, None, MENDConfig(rank=8, lr=1e-3, lr_alpha=1e-2, alpha_init=1e-2), task="classification"
    )
    val = [tensor_meta_batch(_edits(model, 4, 1000 + i)) for i in range(2)]
    metrics = train_editor(
        editor,
        lambda step: tensor_meta_batch(_edits(model, 4, step)),
        val,
        TrainConfig(steps=60, val_every=20, patience=10),
        tmp_path,
        progress=False,
    )
    assert {"es", "ps", "kl"} <= set(metrics["best_val"])
    first_val = next(h for h in metrics["history"] if h["split"] == "val")
    assert metrics["best_val"]["loss"] < first_val["loss"]  # it learned something
    loaded = create_editor("mend", model, task="classification", editor_path=str(tmp_path))
    edit = _edits(model, 1, 99)[0]
    fresh, trained = loaded.edit(edit), editor.edit(edit)
    for name, delta in fresh.deltas.items():
        assert torch.allclose(delta.dense(), trained.deltas[name].dense(), atol=1e-6)


def test_enn_edits_any_model_after_meta_training(tmp_path):
    model = classifier()
    editor = ENN.for_training(model, None, ENNConfig(edit_lr_init=1e-1, lr=1e-3), task="classification")
    metrics = train_editor(
        editor,
        lambda step: tensor_meta_batch(_edits(model, 2, step)),
        [tensor_meta_batch(_edits(model, 2, 500))],
        TrainConfig(steps=10, val_every=5, patience=5),
        tmp_path,
        progress=False,
    )
    assert "kl_base" in metrics["best_val"]
    base = editor.base_model()
    with pytest.raises(ValueError, match="ENN base model"):
        create_editor("enn", model, task="classification", editor_path=str(tmp_path))
    enn = create_editor("enn", base, task="classification", editor_path=str(tmp_path))
    assert set(enn.edit(_edits(base, 1, 7)[0]).deltas) == {"0.weight", "2.weight", "4.weight"}
