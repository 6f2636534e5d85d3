"""WISE: side memory and per-position router, sharding into random subspaces and Ties merging, single-edit
revert as a replay of the remaining memories, the memory patch's file round trip, and the sequential
protocol."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import edit_all, logits, tiny_model

from modeledit import EditRequest, Patch, create_editor
from modeledit.evaluate import evaluate
from modeledit.hooks import Trace
from modeledit.methods.wise import SideMemory, pack_mask, ties_merge, unpack_mask
from modeledit.metrics import score_pairs
from modeledit.patch import applied_memories, applied_patches, attachment, revert_all

SUBJECTS = ["Zorbia", "Blip", "Mork", "Quentar", "Vell", "Osmund"]
TARGETS = ["Quux", "Frob", "Zed", "Yarn", "Kelp", "Dune"]
# On tiny random models a few larger SGD steps do what the defaults do on the real model.
FAST = dict(lr=30.0, steps=40, norm_constraint=None, edits_per_shard=2, shards_per_merge=2)


def requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(prompt=f"The capital of {s} is", target_new=t, target_true="Paris", case_id=i)
        for i, (s, t) in enumerate(zip(SUBJECTS[:n], TARGETS[:n]))
    ]


def test_ties_merge():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([3.0, 1.0, 4.0, 0.0])
    # signs elected by the sum; entries disagreeing with it dropped; the rest averaged over who agrees
    assert torch.equal(ties_merge([a, b]), torch.tensor([2.0, -2.0, 4.0, 3.0]))
    assert torch.equal(ties_merge([a]), a)
    # trimming to half of the changed entries keeps each one's largest: a -> [0, 0, 0, 3], b -> [0, 0, 4, 0]
    assert torch.equal(ties_merge([a, b], density=0.5), torch.tensor([0.0, 0.0, 4.0, 3.0]))


def test_mask_pack_round_trip():
    mask = torch.rand(7, 13) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_mask(packed, (7, 13)), mask)


def test_edit_routes_its_positions_and_leaves_unrelated_inputs_untouched(tokenizer):
    model = tiny_model("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_unrelated = logits(model, tokenizer, "Hello world")
    (r,) = requests(1)
    before = score_pairs(model, tokenizer, [r.text], [r.target_new])[0].nll
    editor = create_editor("wise", model, tokenizer, **FAST)
    patch = editor.edit(r)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    patch.apply(model)
    side = attachment(model, "wise").sides[editor.module]
    with torch.no_grad(), Trace(model, [editor.module], capture_input=True) as tr:
        model(**tokenizer(r.text, return_tensors="pt"))
    scores = F.linear(tr[editor.module].input[0], side.delta).norm(dim=-1)
    assert scores[-1] >= side.threshold  # the prompt's last token is routed to the side memory
    assert score_pairs(model, tokenizer, [r.text], [r.target_new])[0].nll < before - 1.0
    # the router keeps the main memory for a text unlike any edit: bit for bit the base model
    with torch.no_grad(), Trace(model, [editor.module], capture_input=True) as tr:
        model(**tokenizer("Hello world", return_tensors="pt"))
    if (F.linear(tr[editor.module].input[0], side.delta).norm(dim=-1) < side.threshold).all():
        assert torch.equal(logits(model, tokenizer, "Hello world"), base_unrelated)
    patch.revert(model)
    assert torch.equal(logits(model, tokenizer, "Hello world"), base_unrelated)


def test_shards_masks_and_rounds(tokenizer):
    model = tiny_model("llama")
    editor = create_editor("wise", model, tokenizer, **(FAST | dict(steps=2)))
    patches = edit_all(model, editor, requests(5))
    places = [(p.memory.meta["round"], p.memory.meta["shard"]) for p in patches]
    assert places == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]
    shape = tuple(patches[0].memory.meta["shape"])
    masks = [unpack_mask(p.memory.tensors["mask"], shape) for p in patches]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    for p, mask in zip(patches, masks):
        assert p.memory.tensors["values"].numel() == int(mask.sum())
        assert 0.1 < mask.float().mean() < 0.3  # mask_ratio 0.2
    side = attachment(model, "wise").sides[editor.module]
    # built incrementally over five applies: bit for bit a fresh replay of the five memories
    assert torch.equal(side.delta, SideMemory(editor.module, applied_memories(model, "wise")).delta)
    # round 0 merges its two shards by Ties; round 1 (one shard) adds on top
    round0 = ties_merge([side.shards[(0, 0)].change, side.shards[(0, 1)].change])
    assert torch.equal(side.delta, torch.zeros(shape) + round0 + side.shards[(1, 0)].change)
    # a shard of a later round starts from the merged earlier rounds
    assert torch.equal(side.shard_start(1, 0), torch.zeros(shape) + round0 + side.shards[(1, 0)].change)


def test_revert_one_edit_is_a_replay_of_the_others(tokenizer):
    model = tiny_model("llama")
    base = logits(model, tokenizer, requests(1)[0].text)
    editor = create_editor("wise", model, tokenizer, **FAST)
    patches = edit_all(model, editor, requests(3))
    patches[1].revert(model)
    assert applied_patches(model) == [patches[0], patches[2]]
    replay = SideMemory(editor.module, applied_memories(model, "wise"))  # built from scratch
    attached = attachment(model, "wise").sides[editor.module]  # built incrementally
    assert torch.equal(attached.delta, replay.delta) and attached.threshold == replay.threshold
    assert not torch.equal(attached.delta, torch.zeros_like(attached.delta))
    revert_all(model)
    assert attachment(model, "wise") is None
    assert torch.equal(logits(model, tokenizer, requests(1)[0].text), base)


def test_memory_patch_save_load_round_trip(tmp_path, tokenizer):
    model = tiny_model("gpt2")
    reqs = requests(3)
    editor = create_editor("wise", model, tokenizer, **FAST)
    patches = edit_all(model, editor, reqs)
    after = {r.text: logits(model, tokenizer, r.text) for r in reqs}
    fresh = tiny_model("gpt2")
    for i, patch in enumerate(patches):
        loaded = Patch.load(patch.save(tmp_path / f"{i}.safetensors"))
        assert loaded.metadata() == patch.metadata()
        for k, v in patch.memory.tensors.items():
            assert torch.equal(loaded.memory.tensors[k], v) and loaded.memory.tensors[k].dtype == v.dtype
        loaded.apply(fresh)
    for r in reqs:
        assert torch.equal(logits(fresh, tokenizer, r.text), after[r.text])


def test_sequential_protocol_retains_early_edits(tokenizer):
    model = tiny_model("llama")
    reqs = requests(4)
    for r in reqs:
        r.neighborhood_prompts = ["The capital of France is"]
    editor = create_editor("wise", model, tokenizer, **FAST)
    result = evaluate(model, tokenizer, editor, reqs, mode="sequential", progress=False)
    summary = result["summary"]
    assert summary["n"] == 4 and summary["ES"] >= 75.0  # scored after the last edit
    assert not applied_patches(model)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_other_architectures(arch, tokenizer):
    model = tiny_model(arch)
    (r,) = requests(1)
    before = score_pairs(model, tokenizer, [r.text], [r.target_new])[0].nll
    create_editor("wise", model, tokenizer, **FAST).edit(r).apply(model)
    assert score_pairs(model, tokenizer, [r.text], [r.target_new])[0].nll < before - 0.5
