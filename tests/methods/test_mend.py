"""MEND: exact gradient decomposition, identity at init, descent, frozen normalisation, files, low-rank
patches, batched edits, clear errors, and a real learning test (training raises held-out edit success)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from modeledit import EditRequest, create_editor
from modeledit.cli import app
from modeledit.hooks import Trace
from modeledit.lm import mean_nll, target_batch
from modeledit.methods.mend import (
    MEND,
    EditorNotTrainedError,
    GradientTransform,
    MENDConfig,
    combine,
    gradient_factors,
    isolate_edits,
)
from modeledit.patch import LowRank
from modeledit.stand_ins import SUBJECTS, StandIns, native_bfloat16, project_away
from modeledit.tasks import LanguageModelTask
from modeledit.training import (
    EditBatches,
    TrainConfig,
    first_divergence,
    meta_batch,
    train_editor,
    validate,
    validation_batches,
)

REQUEST = EditRequest(
    prompt="The capital of {} is",
    subject="Zorbia",
    target_new="Quux",
    target_true="Paris",
    paraphrase_prompts=["Zorbia's capital city is"],
    neighborhood_prompts=["The capital of France is"],
    neighborhood_answers=["Paris"],
)
TEXTS = ["Water boils at one hundred degrees.", "The museum is closed on Mondays."]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_edits(n: int, seed: int = 0) -> list[EditRequest]:
    """Made-up subjects moved between made-up cities, with a paraphrase and a neighbour each."""
    rng = random.Random(seed)
    cities = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Bern", "Doha", "Riga"]

    def name() -> str:
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)).title()

    edits = []
    for _ in range(n):
        subject, other = name(), name()
        true, new = rng.sample(cities, 2)
        edits.append(
            EditRequest(
                prompt="{} lives in",
                subject=subject,
                target_new=new,
                target_true=true,
                paraphrase_prompts=[f"The home of {subject} is"],
                neighborhood_prompts=[f"{other} lives in"],
                neighborhood_answers=[rng.choice(cities)],
            )
        )
    return edits


def short_training(editor, tokenizer, out, steps: int, n_val: int) -> tuple[dict, dict, dict]:
    """Validation metrics before and after a short training run on synthetic edits, and the run's metrics
    (the shared check that training a learned editor improves it over its untrained state)."""
    train = EditBatches(tokenizer, synthetic_edits(64), 1, TEXTS, texts_per_batch=1)
    val = validation_batches(tokenizer, synthetic_edits(n_val, seed=99), TEXTS, 1)
    before = validate(editor, val)
    config = TrainConfig(steps=steps, val_every=20, patience=10)
    metrics = train_editor(editor, train.__getitem__, val, config, out, progress=False)
    return before, validate(editor, val), metrics


def fresh_editor(arch: str = "llama", **config) -> MEND:
    return MEND.for_training(tiny_model(arch), char_tokenizer(), MENDConfig(**config))


def target_nll(model, tokenizer, request: EditRequest = REQUEST) -> float:
    with torch.no_grad():
        return float(mean_nll(model, target_batch(tokenizer, [request.text], [request.target_new]))[0])


def weight_grads(
    model, tokenizer, modules: list[str], requests: list[EditRequest]
) -> dict[str, torch.Tensor]:
    """Autograd's gradient of the summed per-edit mean NLL w.r.t. each weight, in storage layout."""
    params = dict(model.named_parameters())
    leaves = {f"{m}.weight": params[f"{m}.weight"].detach().requires_grad_(True) for m in modules}
    batch = target_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    loss = mean_nll(model, batch, params=leaves).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sum_of_token_outer_products_is_the_weight_gradient(arch, tokenizer):
    editor = fresh_editor(arch)
    modules = list(editor.network.shapes)
    factors = gradient_factors(editor.model, editor.task, [REQUEST], modules)
    grads = weight_grads(editor.model, tokenizer, modules, [REQUEST])
    for m in modules:
        u, delta = factors[m]
        assert u.shape[0] == delta.shape[0] > 0 and (u != 0).any(-1).all() and (delta != 0).any(-1).all()
        grad = grads[f"{m}.weight"]
        grad_out_in = grad.T if arch == "gpt2" else grad  # GPT-2's Conv1D stores (in, out)
        torch.testing.assert_close(delta.T @ u, grad_out_in, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_untrained_editor_is_exactly_one_sgd_step(arch, tokenizer):
    lr = 1e-3
    editor = fresh_editor(arch, alpha_init=lr)
    patch = editor.edit([REQUEST])
    grads = weight_grads(editor.model, tokenizer, list(editor.network.shapes), [REQUEST])
    assert set(patch.deltas) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(patch.dense(name), -lr * grad, rtol=1e-5, atol=1e-10)


def test_descent_one_untrained_step_lowers_the_edit_loss(tokenizer):
    # W~ = W - alpha * pseudo-gradient: the reference code's "+" would raise the loss instead.
    editor = fresh_editor(alpha_init=1e-2)
    before = target_nll(editor.model, tokenizer)
    patch = editor.edit([REQUEST]).apply(editor.model)
    after = target_nll(editor.model, tokenizer)
    patch.revert(editor.model)
    assert after < before - 1e-3
    with torch.no_grad():
        editor.network.alpha.neg_()  # the ascent step goes the other way
    editor.edit([REQUEST]).apply(editor.model)
    assert target_nll(editor.model, tokenizer) > before


def test_normalisation_is_welford_in_training_and_frozen_in_eval():
    net = GradientTransform(d_out=6, d_in=4, n_layers=1, rank=3).eval()
    u1, d1, u2, d2 = torch.randn(5, 4), torch.randn(5, 6) * 3, torch.randn(7, 4) + 2, torch.randn(7, 6)
    u_out, d_out = net(u1, d1, 0)
    assert torch.equal(u_out, u1) and torch.equal(d_out, d1), "before any update: mean 0, std 1, identity"
    assert net.count == 0
    net.train()
    net(u1, d1, 0)
    net(u2, d2, 0)
    u, d = torch.cat([u1, u2]).double(), torch.cat([d1, d2]).double()
    assert net.count == 12
    torch.testing.assert_close(net.u_mean, u.mean(0))
    torch.testing.assert_close(net.std("u"), u.std(0))
    torch.testing.assert_close(net.delta_mean, d.mean(0))
    torch.testing.assert_close(net.std("delta"), d.std(0))
    net.eval()
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    u_out, _ = net(u1, d1, 0)
    assert all(torch.equal(frozen[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(u_out, (u1 - u.mean(0).float()) / u.std(0).float())


def test_training_loss_updates_statistics_only_in_training_mode(tokenizer):
    editor = fresh_editor()
    batch = meta_batch(tokenizer, [REQUEST], TEXTS)
    editor.train(False)
    loss, stats = editor.training_loss(batch)
    assert all(float(net.count) == 0 for net in editor.network.nets.values())
    assert {"edit_nll", "kl", "kl_nb", "kl_text", "agree_nb", "agree_text", "es", "ps"} <= set(stats)
    assert not loss.requires_grad
    editor.train(True)
    loss, _ = editor.training_loss(batch)
    assert all(float(net.count) > 0 for net in editor.network.nets.values())
    assert loss.requires_grad
    grads = torch.autograd.grad(loss, [editor.network.alpha])
    assert grads[0].abs().sum() > 0, "the loss reaches the step sizes through W~"


def test_meta_batch_marks_where_each_neighbour_s_answer_and_the_new_target_part(tokenizer):
    batch = meta_batch(tokenizer, [REQUEST], TEXTS)
    true = target_batch(tokenizer, REQUEST.neighborhood_prompts, ["Paris"])["labels"][0]
    new = target_batch(tokenizer, REQUEST.neighborhood_prompts, [REQUEST.target_new])["labels"][0]
    true, new = true[true != -100].tolist(), new[new != -100].tolist()
    j = batch.nb_offset.item()
    assert batch.n_neighbours == 1 and true[:j] == new[:j] and true[j] != new[j]
    assert batch.nb_new_token.item() == new[j]
    same = first_divergence(torch.tensor([[-100, 5, 6]]), torch.tensor([[-100, 5, 6, 7]]))
    assert same[1].tolist() == [-1], "no position of the true answer tells them apart"


def test_meta_batch_without_neighbours_has_no_hard_negatives(tokenizer):
    request = EditRequest(prompt="The capital of {} is", subject="Zorbia", target_new="Quux")
    batch = meta_batch(tokenizer, [request], TEXTS)
    assert batch.n_neighbours == 0 and batch.nb_new_token is None and batch.nb_offset is None
    editor = fresh_editor(c_nb=1.0)
    editor.train(False)
    _, stats = editor.training_loss(batch)
    assert "nb_margin" not in stats


def test_neighbour_margin_is_the_rise_of_new_over_true_on_neighbour_rows():
    task = LanguageModelTask(char_tokenizer())
    labels = torch.tensor([[-100, 3, 4], [-100, 5, -100], [1, 2, 3]])  # two neighbours, then a text
    batch = SimpleNamespace(n_neighbours=2, nb_new_token=torch.tensor([7, 8]), nb_offset=torch.tensor([0, 0]))
    before = torch.zeros(3, 3, 10)
    before[0, 1, 3] = before[1, 1, 5] = 4.0  # the true answers lead
    after = before.clone()
    after[0, 1, 7] = 6.0  # neighbour 0: the new target now beats the true one by 2 (it trailed by 4)
    after[2, :, 8] = 9.0  # the text row does not count
    stats: dict = {}
    rise = task.neighbour_margin((before, labels), (after, labels), batch, stats)
    assert rise.item() == pytest.approx((6.0 + 0.0) / 2, abs=1e-5)
    assert stats["nb_flipped"] == 50.0
    assert task.neighbour_margin((before, labels), (before, labels), batch, {}).item() == 0.0


def test_hard_negative_term_enters_the_loss_only_when_weighted(tokenizer):
    batch = meta_batch(tokenizer, [REQUEST], TEXTS)
    editor = fresh_editor(alpha_init=1.0)
    editor.train(False)
    plain, stats = editor.training_loss(batch)
    assert "nb_margin" not in stats
    editor.config.c_nb = 10.0
    weighted, stats = editor.training_loss(batch)
    assert stats["nb_margin"] > 0, "a full step on the edit must move the neighbour towards the new target"
    assert weighted.item() == pytest.approx(plain.item() + 10.0 * stats["nb_margin"], rel=1e-4)


def test_patch_is_low_rank_and_applies_and_reverts_bit_exactly(tokenizer):
    editor = fresh_editor(alpha_init=1e-2)
    model = editor.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = editor.edit([REQUEST])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "edit() mutated the model"
    n_tokens = {
        m: u.shape[0]
        for m, (u, _) in gradient_factors(model, editor.task, [REQUEST], list(editor.network.shapes)).items()
    }
    stored = 0
    for m, (d_out, d_in) in editor.network.shapes.items():
        delta = patch.deltas[f"{m}.weight"]
        assert isinstance(delta, LowRank) and delta.a.shape[1] == n_tokens[m]
        stored += n_tokens[m] * (d_out + d_in)
    assert patch.num_stored_values() == stored  # tokens x (out + in) per matrix; the real model: test below
    patch.apply(model)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    patch.revert(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_batched_edit_sums_the_single_edits(tokenizer):
    editor = fresh_editor(alpha_init=1e-2)
    train = EditBatches(tokenizer, synthetic_edits(8), 1, TEXTS)
    editor.train(True)
    editor.training_loss(train[0])  # non-trivial normalisation statistics
    editor.train(False)
    requests = synthetic_edits(3, seed=1)
    batched = editor.edit(requests)
    singles = [editor.edit([r]) for r in requests]
    assert len(batched.requests) == 3
    for name, delta in batched.deltas.items():
        assert delta.a.shape[1] == sum(s.deltas[name].a.shape[1] for s in singles)
        torch.testing.assert_close(
            batched.dense(name), sum(s.dense(name) for s in singles), rtol=1e-4, atol=1e-7
        )


def test_isolate_edits_gives_each_edit_s_keys_only_its_own_change():
    torch.manual_seed(0)
    left, right = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    keys, owners = torch.randn(5, 16, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2])
    own = torch.stack(
        [left[:, owners == owners[t]] @ right[owners == owners[t]] @ keys[t] for t in range(5)], 1
    )
    summed = left @ right @ keys.T
    assert (summed - own).abs().max() > 0.1 * own.abs().max()  # the plain sum mixes the edits
    isolated = isolate_edits(left, right, keys, owners, 1e-10)
    torch.testing.assert_close(isolated @ right @ keys.T, own)
    alone = isolate_edits(left, right, keys, torch.zeros(5, dtype=torch.long), 1e-10)
    torch.testing.assert_close(alone, left)  # one edit: its update is already what it wants
    nearer = [(isolate_edits(left, right, keys, owners, r) - left).norm() for r in (1e-10, 1.0, 1e6)]
    assert nearer[0] > nearer[1] > nearer[2] and nearer[2] < 1e-4 * nearer[0]  # larger ridges: the plain sum


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores W as (in, out)
def test_isolated_batch_moves_each_edit_s_tokens_as_its_single_edit_does(arch, tokenizer):
    editor = fresh_editor(arch, alpha_init=1e-2)
    train = EditBatches(tokenizer, synthetic_edits(8), 1, TEXTS)
    editor.train(True)
    editor.training_loss(train[0])
    editor.train(False)
    requests = synthetic_edits(2, seed=1)  # fewer target tokens than inputs: solvable
    modules = list(editor.network.shapes)
    owners: dict[str, torch.Tensor] = {}
    factors = gradient_factors(editor.model, editor.task, requests, modules, owners)
    plain = editor.compute_deltas(requests)
    singles = [editor.compute_deltas([r]) for r in requests]
    editor.config.isolate_batch = 1e-9
    isolated = editor.compute_deltas(requests)
    exact = 0
    assert all(
        torch.equal(d.dense(), singles[0][k].dense()) for k, d in editor.compute_deltas(requests[:1]).items()
    )
    for m in modules:
        name, keys = f"{m}.weight", factors[m][0].double()
        assert sorted(set(owners[m].tolist())) == [0, 1] and len(owners[m]) == len(keys)
        assert isolated[name].a.shape == plain[name].a.shape  # same rank as the plain sum
        moved = {}
        for kind, deltas in (("plain", plain), ("isolated", isolated)):
            dense = deltas[name].dense().double()
            moved[kind] = (dense.T if arch == "gpt2" else dense) @ keys.T
        wanted = torch.cat(
            [
                (singles[i][name].dense().double().T if arch == "gpt2" else singles[i][name].dense().double())
                @ keys[owners[m] == i].T
                for i in range(2)
            ],
            1,
        )
        order = torch.cat([torch.nonzero(owners[m] == i).flatten() for i in range(2)])
        error = {kind: (value[:, order] - wanted).abs().max() for kind, value in moved.items()}
        if len(keys) <= keys.shape[1]:  # no more keys than inputs (the last block: target tokens only)
            assert error["isolated"] < 1e-2 * error["plain"], (m, error)
            exact += 1
        else:  # earlier blocks see every token (more than inputs): a least-squares compromise, still closer
            assert error["isolated"] < error["plain"], (m, error)
    assert exact >= 3


def test_alpha_scale_multiplies_the_update_and_survives_loading_an_editor(tokenizer, tmp_path):
    editor = fresh_editor(alpha_init=1e-2)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))  # non-trivial normalisation statistics
    one = editor.compute_deltas([REQUEST])
    editor.config.alpha_scale = 2.0
    two = editor.compute_deltas([REQUEST])
    for name in one:
        torch.testing.assert_close(two[name].dense(), 2.0 * one[name].dense())
    editor.save(tmp_path)  # a calibrated editor: its scale is saved with it
    loaded = MEND(editor.model, tokenizer, MENDConfig(editor_path=str(tmp_path)))
    assert loaded.config.alpha_scale == 2.0
    chosen = MEND(editor.model, tokenizer, MENDConfig(editor_path=str(tmp_path), alpha_scale=0.5))
    assert chosen.config.alpha_scale == 0.5, "the user's edit-time choice is not overwritten by the saved one"


def test_alpha_scale_per_matrix_scales_each_update_folds_and_is_saved(tokenizer, tmp_path):
    editor = fresh_editor(alpha_init=1e-2)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))  # non-trivial normalisation statistics
    one = editor.compute_deltas([REQUEST])
    first, *others = editor.network.shapes
    editor.config.alpha_scale = {first: 3.0}  # the matrices not named keep scale 1
    scaled = editor.compute_deltas([REQUEST])
    for name in one:
        factor = 3.0 if name == f"{first}.weight" else 1.0
        torch.testing.assert_close(scaled[name].dense(), factor * one[name].dense())
    editor.save(tmp_path)
    loaded = MEND(editor.model, tokenizer, MENDConfig(editor_path=str(tmp_path)))
    assert loaded.config.alpha_scale == {first: 3.0}
    editor.fold_alpha_scale()  # train --init: per-matrix scales move into the step sizes as well
    folded = editor.compute_deltas([REQUEST])
    for name in one:
        torch.testing.assert_close(folded[name].dense(), scaled[name].dense())
    editor.config.alpha_scale = {"model.layers.99.mlp.up_proj": 2.0}
    with pytest.raises(ValueError, match="does not edit"):
        editor.compute_deltas([REQUEST])


def test_folding_the_scale_into_the_alphas_keeps_the_edit_and_is_what_train_init_starts_from(
    tokenizer, tmp_path
):
    editor = fresh_editor(alpha_init=1e-2)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))  # non-trivial normalisation statistics
    editor.config.alpha_scale = 2.5
    scaled = editor.compute_deltas([REQUEST])
    alphas = editor.network.alpha.detach().clone()
    editor.fold_alpha_scale()
    assert editor.config.alpha_scale is None
    torch.testing.assert_close(editor.network.alpha.detach(), 2.5 * alphas)
    folded = editor.compute_deltas([REQUEST])
    for name in scaled:
        torch.testing.assert_close(folded[name].dense(), scaled[name].dense())


def test_project_away_solves_the_smaller_system_and_removes_the_keys():
    torch.manual_seed(0)
    right = torch.randn(3, 16, dtype=torch.float64)
    for n in (5, 40):  # fewer keys than inputs (N x N system) and more (in x in system)
        keys = torch.randn(n, 16, dtype=torch.float64)
        lam = 0.5 * keys.pow(2).sum(1).mean()
        eye = torch.eye(16, dtype=torch.float64)
        expected = right @ (
            eye - keys.T @ torch.linalg.inv(keys @ keys.T + lam * torch.eye(n).double()) @ keys
        )
        torch.testing.assert_close(project_away(right, keys, 0.5), expected)
    keys = torch.randn(5, 16, dtype=torch.float64)
    kept = project_away(right, keys, 1e-9)
    assert (kept @ keys.T).abs().max() < 1e-6 * (right @ keys.T).abs().max()  # the keys' directions are gone
    assert kept.norm() > 0.5 * right.norm()  # the rest of the update stays


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores W as (in, out)
def test_stand_in_protection_leaves_the_stand_ins_layer_outputs_and_keeps_the_patch_low_rank(arch, tokenizer):
    editor = fresh_editor(arch, alpha_init=1e-2)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))  # non-trivial normalisation statistics
    plain = editor.compute_deltas([REQUEST])
    editor.config.protect_neighbours, editor.config.protect_ridge = 1, 1e-6
    editor.stand_ins.dtype = torch.float32  # exact keys (bfloat16 where native: close, not exact)
    (prompt,) = editor.stand_in_prompts([REQUEST])
    assert prompt.removeprefix("The capital of ").removesuffix(" is") in SUBJECTS
    keys = editor.stand_ins.keys([prompt], list(editor.network.shapes))
    protected = editor.compute_deltas([REQUEST])
    transposed = arch == "gpt2"
    for m in editor.network.shapes:
        name = f"{m}.weight"
        assert protected[name].a.shape == plain[name].a.shape  # same rank: still a small low-rank patch
        before, after = plain[name].dense(), protected[name].dense()
        if transposed:
            before, after = before.T, after.T
        k = keys[m].double()
        moved_before, moved_after = (
            before.double() @ k.T,
            after.double() @ k.T,
        )  # change of the layer's output
        assert moved_after.abs().max() < 1e-3 * moved_before.abs().max(), m
        assert after.norm() > 1e-3 * before.norm(), f"{m}: the edit itself was projected away"


def test_no_stand_ins_is_the_paper_update_exactly_and_requests_without_subject_are_not_protected(tokenizer):
    editor = fresh_editor(alpha_init=1e-2)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))
    paper = editor.compute_deltas([REQUEST])
    no_subject = EditRequest(prompt="The capital of Zorbia is", target_new="Quux")
    paper_no_subject = editor.compute_deltas([no_subject])
    for n in (None, 0):
        editor.config.protect_neighbours = n
        assert all(
            torch.equal(d.dense(), paper[k].dense()) for k, d in editor.compute_deltas([REQUEST]).items()
        )
    editor.config.protect_neighbours = 4
    assert editor.stand_in_prompts([no_subject]) == []
    deltas = editor.compute_deltas([no_subject])
    assert all(torch.equal(d.dense(), paper_no_subject[k].dense()) for k, d in deltas.items())
    changed = editor.compute_deltas([REQUEST])
    assert any(not torch.equal(d.dense(), paper[k].dense()) for k, d in changed.items())


def test_stand_ins_are_the_nearest_subjects_but_never_the_batch_s_own(tokenizer):
    model = tiny_model("llama")
    stand_ins = StandIns(model, tokenizer, pool=SUBJECTS[:40])
    vectors = stand_ins.subject_vectors(list(stand_ins.pool))
    own = stand_ins.subject_vectors(["Paris"])
    by_hand = [stand_ins.pool[i] for i in (vectors @ own[0]).argsort(descending=True).tolist()]
    assert by_hand[0] == "Paris"  # the pool's own entry: cosine 1
    assert stand_ins.nearest(own, 3, exclude=set()) == [by_hand[:3]]
    assert stand_ins.nearest(own, 3, exclude={"paris"}) == [by_hand[1:4]]  # case-insensitive
    about_paris = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    about_rome = EditRequest(prompt="{} lies in", subject="Rome", target_new="Oslo")
    assert stand_ins.prompts([about_paris], 3) == [f"{s} is in" for s in by_hand[1:4]]
    batch = stand_ins.prompts([about_paris, about_rome], 3)
    assert len(batch) == 6 and not any(p.startswith(("Paris ", "Rome ")) for p in batch)  # the batch's own


def test_subject_vectors_are_taken_where_the_subject_stands_and_the_gradient_pass_gives_the_same(tokenizer):
    editor = fresh_editor(alpha_init=1e-2, protect_neighbours=2)
    stand_ins = editor.stand_ins
    stand_ins.dtype = torch.float32
    first = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome")
    inside = EditRequest(prompt="The river of {} is the", subject="Paris", target_new="Rhine")
    alone = stand_ins.subject_vectors(["Paris"])[0]
    at_start, in_middle = stand_ins.vectors_in_context([first, inside])
    torch.testing.assert_close(at_start, alone, atol=1e-5, rtol=1e-4)  # causal: nothing before it, same
    with Trace(editor.model, [stand_ins.similarity_module], capture_input=True, detach=True) as tr:
        editor.model(**tokenizer(inside.text, return_tensors="pt"))
    end = len(tokenizer("The river of Paris")["input_ids"]) - 1
    by_hand = torch.nn.functional.normalize(tr[stand_ins.similarity_module].input[0, end], dim=-1)
    torch.testing.assert_close(in_middle, by_hand, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(in_middle, alone, atol=1e-3)  # the context before it counts
    # compute_deltas reads the vectors off its own gradient pass (no pass of their own): same stand-ins
    with Trace(editor.model, [stand_ins.similarity_module], capture_input=True, detach=True) as tr:
        gradient_factors(editor.model, editor.task, [first, inside], list(editor.network.shapes))
    from_gradient_pass = stand_ins.vectors_in_context([first, inside], tr[stand_ins.similarity_module].input)
    torch.testing.assert_close(from_gradient_pass, torch.stack([at_start, in_middle]), atol=1e-5, rtol=1e-4)
    stand_ins.prompts([first], 2)  # the pool's vectors: once, at the first choice
    calls = []
    stand_ins._run = lambda texts, names, run=stand_ins._run: calls.append(names) or run(texts, names)
    editor.compute_deltas([first, inside])
    assert calls == [list(editor.network.shapes)]  # one pass only: the stand-ins' keys


def test_a_protecting_editor_prepares_its_stand_in_pool_when_created(tokenizer):
    editor = fresh_editor(alpha_init=1e-2, protect_neighbours=1)
    assert editor.stand_ins._pool_vectors is not None  # before any edit
    passes, run = [], editor.stand_ins._run
    editor.stand_ins._run = lambda texts, names: passes.append(len(texts)) or run(texts, names)
    editor.edit([REQUEST])
    assert passes == [1]  # only the stand-in's keys: the pool's pass is not part of an edit
    assert fresh_editor(alpha_init=1e-2)._stand_ins is None  # no protection: no pool
    assert fresh_editor(protect_neighbours=999)._stand_ins is None  # a bad setting: edit() says so


def test_stand_in_keys_are_each_prompt_s_inputs_at_the_current_weights(tokenizer):
    editor = fresh_editor(alpha_init=1e-2, protect_neighbours=2)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))
    modules = list(editor.network.shapes)
    stand_ins = editor.stand_ins
    stand_ins.dtype = torch.float32
    prompts = ["Paris is in", "Tokyo lies in"]
    keys = stand_ins.keys(prompts, modules)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    for m in modules:  # one row per token of each prompt, as each prompt alone gives them
        assert keys[m].shape[0] == sum(lengths)
        alone = torch.cat([stand_ins.keys([p], modules)[m] for p in prompts])
        torch.testing.assert_close(keys[m], alone, atol=1e-5, rtol=1e-4)
    patch = editor.edit([REQUEST]).apply(editor.model)
    moved = stand_ins.keys(prompts, modules)  # other weights, other keys (after the first edited layer)
    assert any(not torch.equal(keys[m], k) for m, k in moved.items())
    patch.revert(editor.model)
    assert all(torch.equal(keys[m], k) for m, k in stand_ins.keys(prompts, modules).items())
    stand_ins.dtype = torch.bfloat16  # the default where the hardware has it: close to float32
    for m, k in stand_ins.keys(prompts, modules).items():
        assert k.dtype == torch.float32 and not torch.equal(k, keys[m])
        assert torch.nn.functional.cosine_similarity(k, keys[m], dim=-1).min() > 0.98, m
    assert isinstance(native_bfloat16(torch.device("cpu")), bool)


def test_protection_settings_are_saved_and_the_user_s_choice_wins(tokenizer, tmp_path):
    editor = fresh_editor(alpha_init=1e-2, protect_neighbours=3, protect_ridge=0.5, isolate_batch=0.1)
    editor.save(tmp_path)
    loaded = MEND(editor.model, tokenizer, MENDConfig(editor_path=str(tmp_path)))
    assert (loaded.config.protect_neighbours, loaded.config.protect_ridge) == (3, 0.5)
    assert loaded.config.isolate_batch == 0.1
    chosen = MEND(editor.model, tokenizer, MENDConfig(editor_path=str(tmp_path), protect_neighbours=0))
    assert (chosen.config.protect_neighbours, chosen.config.protect_ridge) == (0, 0.5)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"protect_neighbours": 999}, f"from 0 to {len(SUBJECTS)}"),
        ({"protect_neighbours": 2, "protect_ridge": -1.0}, "> 0"),
        ({"isolate_batch": -1.0}, "isolate_batch must be a number >= 0"),
    ],
)
def test_bad_protection_settings_are_clear_errors(tokenizer, setting, message):
    editor = fresh_editor(**setting)
    with pytest.raises(ValueError, match=message):
        editor.edit([REQUEST])


def test_protection_is_a_clear_error_for_seq2seq_models(tokenizer):
    editor = fresh_editor("t5", protect_neighbours=2)
    with pytest.raises(ValueError, match="decoder-only"):
        editor.edit([REQUEST])
    editor.config.protect_neighbours = 0
    assert editor.edit([REQUEST]).deltas  # the paper's update still works


def test_combined_editors_sum_their_scaled_updates_and_round_trip(tokenizer, tmp_path):
    model = tiny_model("llama")
    layers = [f"model.layers.{i}.mlp.{m}_proj" for i in range(2) for m in ("gate", "up", "down")]
    editors = []
    for seed, modules, scale in ((0, layers[:3], 0.5), (1, layers[3:], 3.0)):
        editor = MEND.for_training(model, tokenizer, MENDConfig(modules=modules, seed=seed, alpha_init=1e-2))
        editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))  # non-trivial statistics
        with torch.no_grad():
            for p in editor.network.parameters():
                p.add_(torch.randn_like(p) * 1e-2)  # U != 0: the networks are not the identity
        editor.train(False)
        editor.config.alpha_scale = scale
        editors.append(editor)
    both = combine(editors)
    own_keys = [list(e.network.groups) for e in editors]  # each: one network per shape
    assert both.config.alpha_scale is None
    assert list(both.network.groups) == own_keys[0] + [f"{k}_1" for k in own_keys[1]]
    expected = editors[0].compute_deltas([REQUEST]) | editors[1].compute_deltas([REQUEST])
    combined = both.compute_deltas([REQUEST])
    assert combined.keys() == expected.keys() == {f"{m}.weight" for m in layers}
    for name in expected:
        torch.testing.assert_close(combined[name].dense(), expected[name].dense())
    both.save(tmp_path)
    loaded = create_editor("mend", model, tokenizer, editor_path=str(tmp_path))
    for name, delta in loaded.compute_deltas([REQUEST]).items():
        assert torch.equal(delta.dense(), combined[name].dense())
    retrain = MEND.for_training(model, tokenizer, loaded.config)  # what `train --init` builds, then loads
    retrain.load(tmp_path)
    retrain.train(False)
    for name, delta in retrain.compute_deltas([REQUEST]).items():
        assert torch.equal(delta.dense(), combined[name].dense())
    with pytest.raises(ValueError, match="disjoint layers"):
        combine([editors[0], editors[0]])
    # a combination combines again; networks of one shape from three members keep three keys
    gates = [MEND.for_training(model, tokenizer, MENDConfig(modules=[m])) for m in layers[0::3]]
    ups = MEND.for_training(model, tokenizer, MENDConfig(modules=[layers[1]]))
    nested = combine([combine([gates[0], ups]), gates[1]])
    assert len(nested.network.groups) == 3 and nested.network.alpha.shape == (3,)


def test_save_load_round_trip_gives_identical_patches(tokenizer, tmp_path):
    editor = fresh_editor()
    editor.train(True)
    editor.training_loss(meta_batch(tokenizer, [REQUEST], TEXTS))
    with torch.no_grad():
        for p in editor.network.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    editor.train(False)
    editor.save(tmp_path)
    meta = json.loads((tmp_path / "mend.json").read_text())
    assert meta["fingerprint"] and len(meta["shapes"]) == 6 and meta["hparams"]["rank"] == 64
    loaded = create_editor("mend", editor.model, tokenizer, editor_path=str(tmp_path))
    a, b = editor.edit([REQUEST]), loaded.edit([REQUEST])
    for name in a.deltas:
        assert torch.equal(a.deltas[name].a, b.deltas[name].a) and torch.equal(
            a.deltas[name].b, b.deltas[name].b
        )


def test_clear_error_without_a_trained_editor(tokenizer, tmp_path):
    with pytest.raises(EditorNotTrainedError, match="modeledit train mend"):
        create_editor("mend", tiny_model("llama"), tokenizer)
    fresh_editor().save(tmp_path)  # trained for another model
    with pytest.raises(EditorNotTrainedError, match="not this model"):
        create_editor("mend", tiny_model("llama", seed=1), tokenizer, editor_path=str(tmp_path))
    with pytest.raises(EditorNotTrainedError, match="holds no MEND editor"):
        create_editor("mend", tiny_model("llama"), tokenizer, editor_path=str(tmp_path / "nowhere"))


def test_training_raises_held_out_edit_success(tokenizer, tmp_path):
    editor = fresh_editor(lr=1e-3, lr_alpha=1e-3)
    before, after, metrics = short_training(editor, tokenizer, tmp_path, steps=60, n_val=16)
    assert after["es"] >= before["es"] + 20 and after["es"] >= 75, (before, after)
    assert after["loss"] < before["loss"]
    assert metrics["best_val"]["loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert (tmp_path / "mend.safetensors").exists() and (tmp_path / "curves.png").exists()


def saved_model_and_edits(tmp_path) -> tuple:
    """A tiny Llama and its tokenizer saved as a model folder, and 12 synthetic edits as a JSON file."""
    model_dir, data = tmp_path / "model", tmp_path / "edits.json"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data.write_text(json.dumps([r.to_dict() for r in synthetic_edits(12)]))
    return model_dir, data


def test_cli_train_writes_editor_curves_and_metrics(tmp_path):
    model_dir, data = saved_model_and_edits(tmp_path)
    out = tmp_path / "editor"
    args = [
        "train",
        "mend",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--val-size",
        "4",
        "--steps",
        "4",
    ]
    result = CliRunner().invoke(app, args + ["--out", str(out), "--set", "val_every=2", "--set", "rank=8"])
    assert result.exit_code == 0, result.output
    assert {"mend.json", "mend.safetensors", "curves.png", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["hparams"]["rank"] == 8 and metrics["peak_rss_mb"] > 0
    bad = CliRunner().invoke(app, args + ["--out", str(out), "--set", "nope=1"])
    assert bad.exit_code == 2 and "unknown setting" in bad.output


def test_cli_train_init_fine_tunes_a_trained_editor_with_new_settings(tmp_path):
    model_dir, data = saved_model_and_edits(tmp_path)
    common = ["train", "mend", "--model", str(model_dir), "--data", str(data)]
    common += ["--val-size", "4", "--steps", "2"]
    first = CliRunner().invoke(
        app, common + ["--out", str(tmp_path / "a"), "--set", "rank=8", "--set", "alpha_scale=3.0"]
    )
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(
        app,
        common
        + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a")]
        + ["--set", "c_nb=0.5", "--set", "lr_alpha=0"],
    )
    assert second.exit_code == 0, second.output
    hparams = json.loads((tmp_path / "b" / "metrics.json").read_text())["hparams"]
    assert hparams["rank"] == 8 and hparams["c_nb"] == 0.5  # the init editor's shape, this command's setting
    # trained as it edits: the calibrated scale went into the step sizes (kept fixed here by lr_alpha = 0)
    assert hparams["alpha_scale"] is None
    alpha = {d: load_file(tmp_path / d / "mend.safetensors")["alpha"] for d in "ab"}
    torch.testing.assert_close(alpha["b"], 3.0 * alpha["a"])
    history = json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]
    assert any("nb_margin" in h for h in history)


def test_cli_combine_then_train_init_fine_tunes_the_combination(tmp_path):
    model_dir, data = saved_model_and_edits(tmp_path)
    common = ["train", "mend", "--model", str(model_dir), "--data", str(data)]
    common += ["--val-size", "4", "--steps", "2", "--set", "rank=8"]
    for block in (0, 1):
        modules = json.dumps([f"model.layers.{block}.mlp.{m}_proj" for m in ("gate", "up", "down")])
        out = ["--out", str(tmp_path / f"b{block}"), "--set", f"modules={modules}"]
        result = CliRunner().invoke(app, common + out)
        assert result.exit_code == 0, result.output
    combine = ["combine", f"{tmp_path / 'b0'}:2.0", str(tmp_path / "b1"), "--model", str(model_dir)]
    result = CliRunner().invoke(app, combine + ["--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    alpha = {d: load_file(tmp_path / d / "mend.safetensors")["alpha"] for d in ("b0", "b1", "both")}
    torch.testing.assert_close(alpha["both"], torch.cat([2.0 * alpha["b0"], alpha["b1"]]))
    tuned = CliRunner().invoke(app, common + ["--out", str(tmp_path / "t"), "--init", str(tmp_path / "both")])
    assert tuned.exit_code == 0, tuned.output
    assert len(json.loads((tmp_path / "t" / "mend.json").read_text())["hparams"]["groups"]) == 4
    same = CliRunner().invoke(app, combine[:2] + [str(tmp_path / "b0")] + combine[3:] + ["--out", "x"])
    assert same.exit_code == 2 and "disjoint layers" in same.output
    gone = CliRunner().invoke(app, ["combine", str(tmp_path / "nope"), str(tmp_path / "b1"), "--out", "x"])
    assert gone.exit_code == 2 and "no trained MEND editor" in gone.output


@pytest.mark.slow
def test_shipped_editor_edits_the_default_model(default_model):
    model, tokenizer = default_model
    editor = create_editor("mend", model, tokenizer)  # found by the model's fingerprint
    request = EditRequest(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
    )
    patch = editor.edit([request])
    dense = sum(p.numel() for n, p in model.named_parameters() if n in patch.deltas)
    assert patch.num_stored_values() < dense / 50, "a one-edit patch is low-rank: about a megabyte, not 30"
    before = target_nll(model, tokenizer, request)
    patch.apply(model)
    try:
        assert target_nll(model, tokenizer, request) < before - 1.0
    finally:
        patch.revert(model)
