"""MEMIT and AlphaEdit: one edit behaves like ROME, batches move every fact, AlphaEdit's update lies in the
null space of preserved keys and remembers the keys of applied edits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_configs

from modeledit import EditRequest, create_editor
from modeledit.lm import mean_nll, target_batch
from modeledit.patch import LowRank

REQUESTS = [
    EditRequest(prompt="The capital of {} is", subject="Zorbia", target_new="Quux"),
    EditRequest(prompt="{} was born in", subject="Ann Bell", target_new="Oslo"),
    EditRequest(prompt="The mother tongue of {} is", subject="Kim Tao", target_new="Welsh"),
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and its largest city by population.",
    "A triangle has three sides; its angles add up to one hundred and eighty degrees.",
    "Water boils at one hundred degrees Celsius at sea level, less on a mountain top.",
    "She opened the window because the room was too warm for the children to sleep.",
]
# Random tiny models carry little through attention: no weight decay / KL / tight clamp to fight the NLL.
FAST = dict(n_prefixes=3, prefix_tokens=3, steps=15, lr=0.5, mom2_tokens=400, weight_decay=0.0, kl_factor=0.0)


def deeper(arch: str, blocks: int = 4) -> torch.nn.Module:
    """A tiny model with more blocks: MEMIT's values sit after its last edited block, which must not be the
    model's last (a value written there could not reach the tokens after the subject)."""
    config = tiny_configs()[arch]
    config.update({"num_hidden_layers" if arch == "llama" else "n_layer": blocks})
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).float().eval()


pytestmark = pytest.mark.usefixtures("tmp_cache")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS))
    return str(path)


@torch.no_grad()
def nlls(model, tokenizer, requests=REQUESTS) -> torch.Tensor:
    return mean_nll(
        model, target_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    )


@pytest.mark.parametrize("key_aware", [False, True])
def test_memit_with_one_edit_and_one_layer_is_rome(key_aware, tokenizer, corpus):
    """The paper's versions (every prompt gets the full delta) and our key-aware ones (each prompt gets the
    update's share at its own key) agree."""
    model = deeper("llama")
    shared = dict(FAST, mom2_source=corpus, clamp_norm=1e3, key_aware=key_aware)
    rome = create_editor("rome", model, tokenizer, layer=1, **shared).edit(REQUESTS[0])
    memit = create_editor("memit", model, tokenizer, layers=[1], mom2_update_weight=1e-6, bare_keys=False,
                          **shared)  # fmt: skip
    patch = memit.edit(REQUESTS[0])
    name = "model.layers.1.mlp.down_proj.weight"
    assert list(patch.deltas) == [name]
    torch.testing.assert_close(patch.dense(name), rome.dense(name), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memit_batch_moves_the_facts(arch, tokenizer, corpus):
    model = deeper(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = create_editor("memit", model, tokenizer, layers=[0, 1], mom2_source=corpus, clamp_norm=50.0,
                           requests_per_step=2, **FAST)  # fmt: skip
    start = nlls(model, tokenizer)
    patch = editor.edit(REQUESTS)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(patch.deltas) == 2
    # rank 2 per fact: its mean key and its bare prompt's key (bare_keys)
    assert all(isinstance(d, LowRank) and d.a.shape[1] == 6 for d in patch.deltas.values())
    patch.apply(model)
    assert float(nlls(model, tokenizer).mean()) < float(start.mean()) - 0.1, (start, nlls(model, tokenizer))


def test_alphaedit_update_lies_in_the_null_space_and_remembers_applied_edits(tokenizer, corpus):
    model = deeper("llama")
    editor = create_editor("alphaedit", model, tokenizer, layers=[0, 1], mom2_source=corpus,
                           nullspace_threshold=0.05, l2=1.0, clamp_norm=50.0, **FAST)  # fmt: skip
    start = nlls(model, tokenizer, REQUESTS[:1])
    first = editor.edit(REQUESTS[:1])
    for layer in (0, 1):
        p = editor.projector(layer)
        c = editor.moments.get([layer])[layer]
        values, vectors = torch.linalg.eigh(c)
        k0 = vectors[:, values >= 0.05 * values.max()]  # the preserved keys' directions
        assert k0.shape[1] > 0
        assert (p @ k0).norm() < 1e-6  # P K0 ~ 0
        delta = first.dense(f"model.layers.{layer}.mlp.down_proj.weight").double()
        assert (delta @ k0).norm() < 1e-5 * delta.norm() * k0.norm()
    first.apply(model)
    assert float(nlls(model, tokenizer, REQUESTS[:1])[0]) < float(start[0]) - 0.1

    # Sequential editing: the applied edit's keys are preserved by the next one; reverted ones are forgotten.
    def preserved(*patches):  # P K_p K_p^T summed from scratch
        k = torch.cat([editor._history[p.id][1] for p in patches]).double().T
        return editor.projector(1) @ k @ k.T

    torch.testing.assert_close(editor.preserved_edit_keys(1), preserved(first))
    second = editor.edit(REQUESTS[1:2]).apply(model)
    third = editor.edit(REQUESTS[2:3]).apply(model)
    torch.testing.assert_close(editor.preserved_edit_keys(1), preserved(first, second, third))  # running sum
    second.revert(model)
    torch.testing.assert_close(editor.preserved_edit_keys(1), preserved(first, third))  # summed again
    third.revert(model)
    first.revert(model)
    assert editor.preserved_edit_keys(1) is None
    second.apply(model)
    torch.testing.assert_close(editor.preserved_edit_keys(1), preserved(second))
    assert len(editor._history) == 3


def test_alphaedit_state_carries_prefixes_layers_and_kept_keys_to_a_fresh_editor(tokenizer, corpus):
    model = deeper("llama")
    editor = create_editor("alphaedit", model, tokenizer, mom2_source=corpus, **FAST)  # layers chosen lazily
    patches = [editor.edit([r]).apply(model) for r in REQUESTS[:2]]
    tensors, meta = editor.state()
    json.dumps(meta)  # the JSON half must be JSON
    fresh = create_editor("alphaedit", model, tokenizer, mom2_source=corpus, **FAST)
    assert fresh.config.layers is None and fresh._prefixes is None
    fresh.load_state(tensors, meta)
    assert fresh._prefixes == editor.prefixes and fresh.layers == editor.layers
    assert set(fresh.moments.mom2) == set(editor.layers)  # C at once (the caller is on the base model)
    assert list(fresh._history) == [p.id for p in patches]
    for layer in editor.layers:
        torch.testing.assert_close(fresh.preserved_edit_keys(layer), editor.preserved_edit_keys(layer))


def test_a_second_round_closes_more_of_the_residual(tokenizer, corpus):
    """``rounds=2`` runs the layer spread again on the model with the first round's update: the residual
    stream at the last edited block lands nearer the target values z."""
    from modeledit.methods.rome import keys_and_values

    model = deeper("llama")
    misses, fixed = [], None
    for rounds in (1, 2):
        editor = create_editor("memit", model, tokenizer, layers=[0, 1], mom2_source=corpus, rounds=rounds,
                               mom2_update_weight=50.0, clamp_norm=50.0, **FAST)  # fmt: skip
        fixed = fixed or editor.target_residuals(REQUESTS, 1)
        editor.target_residuals = lambda requests, top, z=fixed: z  # both runs aim at the same z
        patch = editor.edit(REQUESTS)
        assert all(d.dense().shape == model.get_parameter(n).shape for n, d in patch.deltas.items())
        patch.apply(model)
        value_module = editor.arch.residual(1)
        _, now = keys_and_values(model, tokenizer, REQUESTS, editor.prefixes, [], value_module)
        patch.revert(model)
        misses.append(float((fixed[0] + fixed[1] - now).norm() / fixed[1].norm()))
    assert misses[1] < 0.8 * misses[0], misses


@pytest.mark.parametrize("bare_keys", [False, True])
def test_bare_keys_give_the_bare_prompt_its_own_target(bare_keys, tokenizer, corpus):
    """With ``bare_keys`` the least squares maps the bare prompt's key as well as the mean key, each to its
    own target (h + delta), so a prompt whose subject comes first gets the full delta; the paper's single
    mean key gives it only a share."""
    from modeledit.methods.rome import keys_and_values

    model = deeper("llama")
    editor = create_editor("memit", model, tokenizer, layers=[1], mom2_source=corpus, mom2_update_weight=1e-6,
                           bare_keys=bare_keys, **FAST)  # fmt: skip
    request = REQUESTS[1]  # "{} was born in": the subject comes first in the bare prompt
    key, value = editor.arch.mlp_out(1), editor.arch.residual(1)

    def values() -> tuple[torch.Tensor, torch.Tensor]:
        mean = keys_and_values(model, tokenizer, [request], editor.prefixes, [key], value)[1]
        return mean, keys_and_values(model, tokenizer, [request], [], [key], value)[1]

    h, h_bare = values()
    delta = torch.randn_like(h) * h.norm() / h.numel() ** 0.5
    editor.target_residuals = lambda requests, top: (h, delta)  # a known target: the solve alone is tested
    editor.edit([request]).apply(model)
    mean, bare = values()
    torch.testing.assert_close(mean, h + delta, rtol=1e-3, atol=1e-3 * float(delta.norm()))
    miss = float((bare - h_bare - delta).norm() / delta.norm())
    assert miss < 1e-3 if bare_keys else miss > 0.05, miss
