"""ROME: the rank-one update inserts k* -> v* exactly, spares keys orthogonal under C^-1, moves the fact,
and the cached value optimisation computes what a plain forward pass computes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from modeledit import EditRequest, create_editor
from modeledit.arch import ArchitectureError, architecture
from modeledit.hooks import Trace
from modeledit.lm import mean_nll, prompt_ids, target_batch, target_ids
from modeledit.methods.rome import (
    CachedPrompts,
    ValueSettings,
    build_rows,
    keys_and_values,
    optimise_values,
    request_texts,
    subject_last,
)
from modeledit.patch import LowRank
from modeledit.requests import EditRequestError

REQUEST = EditRequest(prompt="The capital of {} is", subject="Zorbia", target_new="Quux")
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and its largest city by population.",
    "A triangle has three sides; its angles add up to one hundred and eighty degrees.",
    "Water boils at one hundred degrees Celsius at sea level, less on a mountain top.",
    "She opened the window because the room was too warm for the children to sleep.",
]
# Block 0 of the 2-block tiny models: a value written at the last block could not reach later tokens.
# Random tiny models carry little through attention: no weight decay / KL / tight clamp to fight the NLL.
FAST = dict(n_prefixes=3, prefix_tokens=3, steps=15, lr=0.5, mom2_tokens=400, weight_decay=0.0, kl_factor=0.0)


pytestmark = pytest.mark.usefixtures("tmp_cache")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS))
    return str(path)


@torch.no_grad()
def nll(model, tokenizer, request=REQUEST, prompt=None) -> float:
    return float(mean_nll(model, target_batch(tokenizer, [prompt or request.text], [request.target_new]))[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_rome_inserts_the_value_exactly_and_spares_orthogonal_keys(arch, tokenizer, corpus):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = create_editor("rome", model, tokenizer, layer=0, mom2_source=corpus, clamp_norm=50.0, **FAST)
    patch = editor.edit(REQUEST)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "edit() mutated the model"
    ((name, delta),) = patch.deltas.items()
    module = editor.arch.mlp_out(0)
    assert name == f"{module}.weight" and isinstance(delta, LowRank) and delta.a.shape[1] == 1
    dense = patch.dense(name)
    dense = dense.T if arch == "gpt2" else dense  # (out, in)
    keys, _ = keys_and_values(model, tokenizer, [REQUEST], editor.prefixes, [module], module)
    k = keys[module][0]
    # W' k* = W k* + delta = v*: the whole delta lands on k* (left factor = delta, right . k* = 1).
    left = delta.a[:, 0] if arch != "gpt2" else delta.b[0]
    torch.testing.assert_close(dense @ k, left, rtol=1e-4, atol=1e-5)
    # Keys orthogonal to C^-1 k* are mapped as before.
    u = editor.c_inverse_times(0, k).float()
    y = torch.randn(len(k), generator=torch.Generator().manual_seed(0))
    x = y - (u @ y) / (u @ u) * u
    assert (dense @ x).norm() < 1e-4 * (dense @ k).norm() * x.norm() / k.norm()
    # The edit works, and reverts bit for bit.
    start = nll(model, tokenizer)
    patch.apply(model)
    assert nll(model, tokenizer) < start - 0.1  # tiny random models carry little through attention
    patch.revert(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_cached_suffix_pass_equals_a_full_forward(tokenizer):
    model = tiny_model("llama")
    requests = [REQUEST, EditRequest(prompt="{} was born in", subject="Ann Bell", target_new="Oslo")]
    prefixes = ["Hello there", "It is"]
    rows = build_rows(tokenizer, requests, prefixes)
    runner = CachedPrompts(model, rows)
    with torch.no_grad():
        logits, _, _ = runner.logits("model.layers.0.mlp.down_proj", None)
    texts = [t for r in requests for t in ([r.text] + [f"{p}. {r.text}" for p in prefixes])]
    texts += [f"{r.subject} is a" for r in requests]
    order = [0, 1, 2, 6, 3, 4, 5, 7]  # build_rows: each request's rewriting rows, then its essence row
    for row, i in enumerate(order):
        text = texts[i]
        ids = prompt_ids(tokenizer, text)
        if i < 6:
            ids = ids + target_ids(tokenizer, requests[i // 3].target_new)[:-1]
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids])).logits[0]
        split = int(rows.prefix_mask[row].sum())
        pairs = (runner.pair_row == row).nonzero().flatten().tolist()
        assert pairs  # every row has a target or the KL position
        for p in pairs:
            pos = int(runner.pair_pos[p])
            torch.testing.assert_close(logits[p], full[split + pos], rtol=1e-4, atol=1e-4)


def test_running_a_subset_of_rows_gives_their_logits(tokenizer):
    model = tiny_model("llama")
    requests = [REQUEST, EditRequest(prompt="{} was born in", subject="Ann Bell", target_new="Oslo")]
    rows = build_rows(tokenizer, requests, ["Hello there", "It is"])
    runner = CachedPrompts(model, rows)
    assert runner.can_select
    only = torch.tensor([1, 3, 4, 7])
    with torch.no_grad():
        full, _, _ = runner.logits("model.layers.0.mlp.down_proj", None)
        part, _, _ = runner.logits("model.layers.0.mlp.down_proj", None, only=only)
        again, _, _ = runner.logits("model.layers.0.mlp.down_proj", None)  # the shared cache is intact
    torch.testing.assert_close(part, full[torch.isin(runner.pair_row, only)], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, full)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gptj"])
def test_passes_that_skip_the_blocks_below_the_edited_one_compute_the_same(arch, tokenizer, monkeypatch):
    """After the first pass, the blocks below the edited one return their kept output instead of running:
    the logits, with a delta and for a subset of rows, are those of passes that run every block."""
    model = tiny_model(arch)
    module = architecture(model).mlp_out(1)
    requests = [REQUEST, EditRequest(prompt="{} was born in", subject="Ann Bell", target_new="Oslo")]
    rows = build_rows(tokenizer, requests, ["Hello there", "It is"])
    delta = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    only = torch.tensor([1, 3, 4, 7])
    runner = CachedPrompts(model, rows)
    below = model.get_submodule(architecture(model).stack()[0].name)
    calls = []  # block 0's MLP runs only when block 0 does
    model.get_submodule(architecture(model).mlp_out(0)).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        runner.logits(module, None)  # the first pass keeps the output of block 0
        assert len(calls) == 1 and 1 in runner.below
        skipped = runner.logits(module, delta)[0], runner.logits(module, delta, only=only)[0]
        assert len(calls) == 1, "block 0 ran again"
        # capture_keys makes a pass run every block
        full = [runner.logits(module, delta, capture_keys=(module,), only=o)[0] for o in (None, only)]
    assert len(calls) == 3
    assert "forward" not in below.__dict__
    for a, b in zip(skipped, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_first_pass_already_gives_the_first_gradient(tokenizer):
    """The pass that reads the unedited values and keys also yields the gradient at delta = 0 (one leaf per
    row, summed per request with each row's key-aware scale): the first Adam step, lr x sign(gradient), is
    the one that autograd through a per-request delta gives."""
    model = tiny_model("llama")
    module = architecture(model).mlp_out(0)  # a value at the last block reaches no later token
    rows = build_rows(tokenizer, [REQUEST], ["Hello there", "It is"])
    settings = ValueSettings(
        lr=0.01, steps=1, stop_nll=0.0, kl_factor=0.5, weight_decay=0.5, clamp_norm=100.0
    )
    found = optimise_values(model, rows, 1, module, settings, (module,), update_direction=lambda _, k: k)
    assert found["row_scale"].std() > 0.01  # the rows' scales differ: the chain rule matters

    runner = CachedPrompts(model, rows)
    delta = torch.zeros(1, model.config.hidden_size, requires_grad=True)
    logits, _, _ = runner.logits(module, delta, row_scale=found["row_scale"])
    labels = rows.labels[runner.pair_row, runner.pair_pos]
    target = labels != -100
    picked = torch.log_softmax(logits[target], -1).gather(-1, labels[target][:, None])[:, 0]
    per_row = torch.zeros(len(rows.owner)).index_add(0, runner.pair_row[target], -picked)
    per_row = per_row / torch.bincount(runner.pair_row[target], minlength=len(rows.owner)).clamp(min=1)
    nll = per_row[rows.rewriting].mean()
    (gradient,) = torch.autograd.grad(nll, delta)
    clear = gradient.abs() > 1e-3 * gradient.abs().max()
    torch.testing.assert_close(
        found["delta"][clear], -settings.lr * gradient.sign()[clear], rtol=1e-3, atol=1e-6
    )


def test_with_several_key_modules_each_row_gets_the_mean_of_their_shares(tokenizer):
    """MEMIT's key-aware values: the delta is spread over several layers, so a row's scale is the mean of
    the per-layer shares (u_l^T k_row,l) / (u_l^T k*_l), each as with that layer alone."""
    model = tiny_model("llama")
    arch = architecture(model)
    keys = (arch.mlp_out(0), arch.mlp_out(1))
    value_module = arch.residual(1)
    rows = build_rows(tokenizer, [REQUEST], ["Hello there", "It is"])
    settings = ValueSettings(lr=0.1, steps=0, stop_nll=0.0, kl_factor=0.0, weight_decay=0.0, clamp_norm=1e3)
    weights = {name: torch.rand(model.config.intermediate_size) + 0.5 for name in keys}

    def direction(name, k):  # a different positive-definite C^-1 per layer
        return weights[name] * k

    def scale(key_modules):
        found = optimise_values(model, rows, 1, value_module, settings, key_modules, direction)
        return found["row_scale"], found["key"]

    both, mean_keys = scale(keys)
    alone = [scale((name,))[0] for name in keys]
    assert mean_keys.shape == (2, 1, model.config.intermediate_size)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the layers' shares differ
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2)


def test_batched_values_equal_one_request_at_a_time_and_finished_rows_stop_running(tokenizer, monkeypatch):
    """Facts optimised together get the deltas they get alone (rows of finished facts are dropped, not
    frozen in a batch that keeps running them)."""
    model = tiny_model("llama")
    requests = [REQUEST, EditRequest(prompt="{} was born in", subject="Ann Bell", target_new="Oslo")]
    module, prefixes = "model.layers.0.mlp.down_proj", ["Hello there", "It is"]
    settings = ValueSettings(
        lr=1.0, steps=12, stop_nll=0.0, kl_factor=0.1, weight_decay=0.0, clamp_norm=100.0
    )

    def one_at_a_time():
        return [
            optimise_values(model, build_rows(tokenizer, [r], prefixes), 1, module, settings)
            for r in requests
        ]

    # a stop between the two facts' final NLLs: one of them finishes early, the other runs every step
    settings.stop_nll = float(sum(found["nll"][0] for found in one_at_a_time())) / 2
    alone = one_at_a_time()
    run_sizes = []
    original = CachedPrompts.logits

    def counting(self, *args, only=None, **kwargs):
        run_sizes.append(len(self.rows.owner) if only is None else len(only))
        return original(self, *args, only=only, **kwargs)

    monkeypatch.setattr(CachedPrompts, "logits", counting)
    together = optimise_values(model, build_rows(tokenizer, requests, prefixes), 2, module, settings)
    for i, found in enumerate(alone):
        torch.testing.assert_close(together["delta"][i], found["delta"][0], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(together["nll"][i], found["nll"][0], rtol=1e-3, atol=1e-5)
    assert min(run_sizes) < max(run_sizes)  # one fact finished first and its rows stopped running


def test_key_aware_values_see_what_the_rank_one_update_adds_at_each_prompt(tokenizer, corpus):
    """With key_aware (our deviation), each prompt's row gets delta x (u^T k_row) / (u^T k*) during the
    optimisation: exactly what the final weight update adds to the module's output at that prompt."""
    model = tiny_model("llama")
    request = EditRequest(prompt="{} has a capital city named", subject="Zorbia", target_new="Quux")
    editor = create_editor("rome", model, tokenizer, layer=0, mom2_source=corpus, clamp_norm=50.0, **FAST)
    assert editor.config.key_aware
    module = editor.arch.mlp_out(0)
    found = optimise_values(
        model,
        build_rows(tokenizer, [request], editor.prefixes),
        1,
        module,
        editor.value_settings(),
        key_modules=(module,),
        update_direction=lambda _, k: editor.c_inverse_times(0, k).float(),
    )
    texts = request_texts(request, editor.prefixes)
    scale = found["row_scale"][: len(texts)]  # the rewriting rows come first, one per text
    assert (scale - 1).abs().max() > 0.01  # the prompts' keys differ from their mean

    def outputs():
        result = []
        for text in texts:
            ids = prompt_ids(tokenizer, text)
            s = subject_last(tokenizer, text, request.subject)
            with torch.no_grad(), Trace(model, [module], detach=True) as tr:
                model(input_ids=torch.tensor([ids[: s + 1]]))
            result.append(tr[module].output[0, s])
        return torch.stack(result)

    before = outputs()
    patch = editor.edit(request)
    patch.apply(model)
    added = outputs() - before
    patch.revert(model)
    expected = found["delta"][0][None] * scale[:, None]
    torch.testing.assert_close(added, expected, rtol=1e-3, atol=1e-4 * float(expected.norm(dim=-1).max()))


def test_rome_without_covariance_and_a_subject_first_in_the_prompt(tokenizer):
    model = tiny_model("llama")
    request = EditRequest(prompt="Zorbia's capital city is", subject="Zorbia", target_new="Quux")
    patch = create_editor("rome", model, tokenizer, layer=0, mom2=False, **FAST).edit(request)
    start = nll(model, tokenizer, request)
    patch.apply(model)
    assert nll(model, tokenizer, request) < start - 0.2


def test_bad_input_is_a_clear_error(tokenizer):
    model = tiny_model("llama")
    editor = create_editor("rome", model, tokenizer, layer=0, mom2=False, clamp_norm=50.0, **FAST)
    with pytest.raises(EditRequestError, match="does not occur in the prompt"):
        editor.edit(EditRequest(prompt="The capital of France is", subject="Zorbia", target_new="Quux"))
    with pytest.raises(EditRequestError, match="needs the subject"):
        editor.edit(EditRequest(prompt="The capital of France is", target_new="Quux"))
    with pytest.raises(EditRequestError, match="one fact at a time"):
        editor.edit([REQUEST, REQUEST])
    bare = create_editor("rome", model, tokenizer, layer=0, mom2=False, n_prefixes=0)
    with pytest.raises(EditRequestError, match="first token of the prompt"):
        bare.edit(EditRequest(prompt="Z is a city in", subject="Z", target_new="Quux"))
    with pytest.raises(ArchitectureError, match="decoder-only"):
        create_editor("rome", tiny_model("t5"), tokenizer)


@pytest.mark.slow
def test_rome_moves_a_fact_on_the_default_model(default_model, shared_data):
    model, tokenizer = default_model
    request = EditRequest(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
    )
    pairs = target_batch(tokenizer, [request.text] * 2 + ["Danielle Darrieux's native language is"] * 2,
                         ["English", "French"] * 2)  # fmt: skip
    editor = create_editor(
        "rome", model, tokenizer, mom2_source=str(shared_data / "wiki" / "squad_v2_sample.json")
    )
    patch = editor.edit(request)
    patch.apply(model)
    try:
        after = mean_nll(model, pairs)
    finally:
        patch.revert(model)
    assert after[0] < after[1] and after[2] < after[3], after.tolist()
