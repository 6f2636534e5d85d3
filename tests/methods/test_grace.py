"""GRACE: per-input query positions (teacher-forced scoring after many edits), expand/split, single-edit
revert, the memory patch's file round trip, and the sequential protocol."""

from __future__ import annotations

import pytest
import torch
from conftest import edit_all, logits, snapshot, tiny_model

from modeledit import EditRequest, Patch, create_editor
from modeledit.evaluate import evaluate
from modeledit.hooks import Trace
from modeledit.lm import generate
from modeledit.methods.grace import codebooks
from modeledit.metrics import score_pairs
from modeledit.patch import applied_memories, applied_patches, revert_all

SUBJECTS = ["Zorbia", "Blip", "Mork", "Quentar", "Vell", "Osmund", "Prax", "Tillo"]
TARGETS = ["Quux", "Frob", "Zed", "Yarn", "Kelp", "Dune", "Mop", "Wisp"]


def requests(n: int = 8) -> list[EditRequest]:
    return [
        EditRequest(prompt=f"The capital of {s} is", target_new=t, target_true="Paris", case_id=i)
        for i, (s, t) in enumerate(zip(SUBJECTS[:n], TARGETS[:n]))
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_teacher_forced_scoring_after_many_edits(arch, tokenizer):
    """Every edit answers after all of them, scored alone or in one padded batch with the others, with no
    state left over from the last edit; the model's weights never change."""
    model = tiny_model(arch)
    weights = snapshot(model)
    reqs = requests(8)
    editor = create_editor("grace", model, tokenizer)
    edit_all(model, editor, reqs)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    prompts, targets = [r.text for r in reqs], [r.target_new for r in reqs]
    batched = score_pairs(model, tokenizer, prompts, targets)
    assert [s.acc for s in batched] == [1.0] * len(reqs)  # every target token is the argmax
    for i, r in enumerate(reqs):  # alone, and with the first edit's prompt padded around it
        (alone,) = score_pairs(model, tokenizer, [r.text], [r.target_new])
        pair = score_pairs(model, tokenizer, [reqs[0].text, r.text], [reqs[0].target_new, r.target_new])
        assert alone.acc == pair[1].acc == 1.0
        assert abs(alone.nll - batched[i].nll) < 1e-4 and abs(pair[1].nll - alone.nll) < 1e-4
    revert_all(model)
    assert not codebooks(applied_memories(model, "grace"))


def test_generation_meets_every_key_and_unrelated_inputs_are_untouched(tokenizer):
    model = tiny_model("llama")
    base_unrelated = logits(model, tokenizer, "Hello world, how are you?")
    reqs = requests(4)
    editor = create_editor("grace", model, tokenizer)
    edit_all(model, editor, reqs)
    for r in reqs:  # greedy generation with a KV cache produces the whole multi-token target
        (text,) = generate(model, tokenizer, [r.text], max_new_tokens=len(r.target_new) + 1)
        assert text.startswith(" " + r.target_new)
    # an input near no key: bit for bit the base model
    assert torch.equal(logits(model, tokenizer, "Hello world, how are you?"), base_unrelated)


def query_key(model, tokenizer, module: str, prompt: str) -> torch.Tensor:
    """The wrapped module's input at the prompt's last token: the edit's first key."""
    with torch.no_grad(), Trace(model, [module], capture_input=True) as tr:
        model(**tokenizer(prompt, return_tensors="pt"))
    return tr[module].input[0, -1]


def nearest_entry(model, module: str, key: torch.Tensor):
    entries = codebooks(applied_memories(model, "grace"))[module]
    dists = torch.stack([torch.dist(e.key, key) for e in entries])
    return entries[int(dists.argmin())], float(dists.min())


def test_split_on_a_conflicting_edit_and_expand_on_an_agreeing_one(tokenizer):
    model = tiny_model("llama")
    editor = create_editor("grace", model, tokenizer, epsilon_init=1e3)  # every new key overlaps an old one
    editor.edit(EditRequest(prompt="The capital of Zorbia is", target_new="Quux")).apply(model)
    radii = {e.id: e.radius for e in codebooks(applied_memories(model, "grace"))[editor.module]}

    # another label near an existing key: split, both radii become half the distance
    other = EditRequest(prompt="The capital of Zorbio is", target_new="Frob")
    key = query_key(model, tokenizer, editor.module, other.text)
    old, d = nearest_entry(model, editor.module, key)
    conflicting = editor.edit(other)
    assert editor.last_stats["split"] >= 1
    conflicting.apply(model)
    book = {e.id: e for e in codebooks(applied_memories(model, "grace"))[editor.module]}
    new = next(e for e in book.values() if e.label == "Frob#0")
    assert torch.allclose(new.key, key, atol=1e-5)
    assert book[old.id].radius == pytest.approx(d / 2, rel=1e-4)
    assert new.radius == pytest.approx(d / 2, rel=1e-4)
    assert dict(conflicting.memory.meta["radius_updates"])[old.id] == pytest.approx(d / 2, rel=1e-4)
    for r in (EditRequest(prompt="The capital of Zorbia is", target_new="Quux"), other):
        assert score_pairs(model, tokenizer, [r.text], [r.target_new])[0].acc == 1.0

    # the split belongs to the second patch: reverting it deletes its keys and restores the old radius
    conflicting.revert(model)
    assert {e.id: e.radius for e in codebooks(applied_memories(model, "grace"))[editor.module]} == radii

    # the same label near an existing key: expand; that key now covers the new input, nothing is added there
    agreeing = EditRequest(prompt="The capital of Zorbio is", target_new="Quux")
    old, d = nearest_entry(model, editor.module, query_key(model, tokenizer, editor.module, agreeing.text))
    assert old.label == "Quux#0"
    patch = editor.edit(agreeing)
    assert editor.last_stats["expanded"] >= 1
    assert "Quux#0" not in [e["label"] for e in patch.memory.meta["entries"]]
    assert len(patch.memory.meta["entries"]) == editor.last_stats["added"] + editor.last_stats["split"]


def test_revert_one_edit_keeps_the_others(tokenizer):
    model = tiny_model("llama")
    reqs = requests(3)
    base = {r.text: logits(model, tokenizer, r.text) for r in reqs}
    editor = create_editor("grace", model, tokenizer)
    patches = edit_all(model, editor, reqs)
    patches[1].revert(model)  # delete that edit's keys
    assert applied_patches(model) == [patches[0], patches[2]]
    assert torch.equal(logits(model, tokenizer, reqs[1].text), base[reqs[1].text])
    for r in (reqs[0], reqs[2]):
        assert score_pairs(model, tokenizer, [r.text], [r.target_new])[0].acc == 1.0
    revert_all(model)
    for r in reqs:
        assert torch.equal(logits(model, tokenizer, r.text), base[r.text])


def test_memory_patch_save_load_round_trip(tmp_path, tokenizer):
    model = tiny_model("gpt2")
    reqs = requests(3)
    editor = create_editor("grace", model, tokenizer)
    patches = edit_all(model, editor, reqs)
    after = {r.text: logits(model, tokenizer, r.text) for r in reqs}
    fresh = tiny_model("gpt2")
    for i, patch in enumerate(patches):
        meta = patch.metadata()
        assert meta["memory"]["kind"] == "grace" and meta["kinds"] == {}
        loaded = Patch.load(patch.save(tmp_path / f"{i}.safetensors"))
        assert loaded.metadata() == meta
        assert loaded.memory.tensors.keys() == patch.memory.tensors.keys()
        for k, v in patch.memory.tensors.items():
            assert torch.equal(loaded.memory.tensors[k], v)
        assert loaded.num_stored_values() == patch.num_stored_values() > 0
        loaded.apply(fresh)
    for r in reqs:
        assert torch.equal(logits(fresh, tokenizer, r.text), after[r.text])
    with pytest.raises(Exception, match="already applied"):
        Patch.load(tmp_path / "0.safetensors").apply(fresh)


def test_sequential_protocol_retains_early_edits(tokenizer):
    model = tiny_model("llama")
    reqs = requests(6)
    for r in reqs:
        r.paraphrase_prompts = [f"{r.text.replace('The capital', 'The chief city')}"]
        r.neighborhood_prompts = ["The capital of France is"]
    base = snapshot(model)
    result = evaluate(
        model, tokenizer, create_editor("grace", model, tokenizer), reqs, mode="sequential", progress=False
    )
    summary = result["summary"]
    assert summary["n"] == 6 and summary["ES"] == 100.0 and summary["rewrite_acc"] == 100.0
    assert summary["seconds_per_edit"] > 0
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters())
    assert not applied_patches(model)  # evaluate reverts everything


def test_retention_curve_scores_all_edits_so_far(tokenizer):
    model = tiny_model("llama")
    reqs = requests(6)
    result = evaluate(
        model, tokenizer, create_editor("grace", model, tokenizer), reqs, mode="sequential",
        progress=False, retention_points=3,
    )  # fmt: skip
    curve = result["retention"]
    assert [p["edits"] for p in curve] == [2, 4, 6]
    assert all(p["ES"] == 100.0 for p in curve)  # GRACE keeps every earlier edit as later ones arrive
    assert curve[-1]["S"] == result["summary"]["S"]
    summary = result["summary"]
    assert summary["unrelated_ppl_before"] > 1 and summary["unrelated_ppl_after"] > 1
    with pytest.raises(ValueError, match="sequential"):
        evaluate(model, tokenizer, None, reqs, mode="single", retention_points=3)
