"""modeledit.patch: apply / revert bit for bit, refusals, and the safetensors file format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FF, H, snapshot, tiny_model
from safetensors.torch import save_file
from torch import nn

from modeledit.arch import architecture, is_transposed
from modeledit.models import fingerprint
from modeledit.patch import (
    FORMAT_VERSION,
    LowRank,
    Memory,
    Patch,
    PatchError,
    applied_patches,
    linear_delta,
    linear_dense_delta,
    revert_all,
)

NORM = {"llama": "model.layers.0.input_layernorm.weight", "gpt2": "transformer.h.0.ln_1.weight"}
ATTN = {"llama": "model.layers.1.self_attn.o_proj", "gpt2": "transformer.h.1.attn.c_proj"}


def assert_params_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    differing = [n for n, p in params.items() if not torch.equal(p, expected[n])]
    assert not differing, f"parameters differ: {differing}"


def lowrank_patch(
    model: nn.Module, modules: list[str], seed: int, rank: int = 2, scale: float = 0.3
) -> Patch:
    """Random low-rank deltas (built in (out, in) orientation) on the given linear layers."""
    arch = architecture(model)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for module_name in modules:
        out_f, in_f = arch.weight_as_out_in(module_name).shape
        left = torch.randn(out_f, rank, generator=g) * scale
        right = torch.randn(rank, in_f, generator=g) * scale
        name, delta = linear_delta(model, module_name, left, right)
        deltas[name] = delta
    return Patch(deltas=deltas, fingerprint=fingerprint(model), method="test", hparams={"seed": seed})


def dense_like(model: nn.Module, param: str, seed: int, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = model.get_parameter(param)
    return torch.randn(p.shape, generator=g) * scale


def mixed_patch(model: nn.Module, name: str, seed: int) -> Patch:
    """Low-rank deltas on every MLP matrix, a dense delta on an attention projection and on a norm weight."""
    arch = architecture(model)
    patch = lowrank_patch(model, arch.last_mlp_linears(2), seed)
    g = torch.Generator().manual_seed(seed + 1000)
    out_f, in_f = arch.weight_as_out_in(ATTN[name]).shape
    attn_name, attn_delta = linear_dense_delta(model, ATTN[name], torch.randn(out_f, in_f, generator=g) * 0.1)
    patch.deltas[attn_name] = attn_delta
    # another dtype: cast on apply
    patch.deltas[NORM[name]] = dense_like(model, NORM[name], seed + 2000).double()
    return patch


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- apply / revert --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_apply_then_revert_is_bit_identical(name):
    model = tiny_model(name)
    base = snapshot(model)
    base_logits = logits(model)
    patch = mixed_patch(model, name, seed=1)
    assert patch.apply(model) is patch
    assert applied_patches(model) == [patch]
    params = dict(model.named_parameters())
    for pname, value in params.items():
        changed = not torch.equal(value, base[pname])
        assert changed == (pname in patch.deltas), pname
    for pname in patch.deltas:
        torch.testing.assert_close(params[pname] - base[pname], patch.dense(pname).float())
    assert not torch.allclose(logits(model), base_logits)
    patch.revert(model)
    assert_params_equal(model, base)
    assert applied_patches(model) == []
    assert torch.equal(logits(model), base_logits)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_linear_delta_orientation(name):
    model = tiny_model(name)
    arch = architecture(model)
    modules = arch.mlp_linears(0) + arch.mlp_linears(1)
    g = torch.Generator().manual_seed(4)
    before = {m: arch.weight_as_out_in(m).detach().clone() for m in modules}
    factors, deltas = {}, {}
    for m in modules:
        out_f, in_f = before[m].shape
        left, right = torch.randn(out_f, 3, generator=g), torch.randn(3, in_f, generator=g)
        pname, delta = linear_delta(model, m, left, right)
        assert pname == f"{m}.weight"
        assert isinstance(delta, LowRank)
        module = model.get_submodule(m)
        assert delta.shape == tuple(module.weight.shape)
        assert is_transposed(module) == (name == "gpt2")
        storage_delta = (left @ right).T if is_transposed(module) else left @ right
        torch.testing.assert_close(delta.dense(), storage_delta)
        factors[m], deltas[pname] = (left, right), delta
    patch = Patch(deltas=deltas, fingerprint=fingerprint(model), method="test")
    assert patch.num_stored_values() == sum(3 * (a.shape[0] + b.shape[1]) for a, b in factors.values())
    patch.apply(model)
    torch.manual_seed(0)
    for m, (left, right) in factors.items():
        now = arch.weight_as_out_in(m)
        torch.testing.assert_close(now - before[m], left @ right)
        module = model.get_submodule(m)
        x = torch.randn(5, before[m].shape[1])
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.linear(x, before[m] + left @ right, module.bias))


def test_gpt2_conv1d_factors_are_swapped_and_transposed():
    model = tiny_model("gpt2")
    left, right = torch.randn(FF, 2), torch.randn(2, H)  # (out, r), (r, in) for c_fc: H -> FF
    pname, delta = linear_delta(model, "transformer.h.0.mlp.c_fc", left, right)
    assert tuple(model.get_parameter(pname).shape) == (H, FF)
    assert torch.equal(delta.a, right.T) and torch.equal(delta.b, left.T)
    assert delta.a.is_contiguous() and delta.b.is_contiguous()
    dense_name, dense = linear_dense_delta(model, "transformer.h.0.mlp.c_fc", left @ right)
    assert dense_name == pname and torch.equal(dense, (left @ right).T) and dense.is_contiguous()
    llama = tiny_model("llama")
    _, lr = linear_delta(llama, "model.layers.0.mlp.up_proj", left, right)
    assert torch.equal(lr.a, left) and torch.equal(lr.b, right)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_revert_middle_patch_equals_fresh_replay(name):
    model = tiny_model(name)
    arch = architecture(model)
    shared = arch.mlp_out(0)  # touched by all three patches
    p1 = lowrank_patch(model, [shared, *arch.mlp_in(1)], seed=1, scale=1.7)
    p2 = lowrank_patch(model, [shared, arch.mlp_out(1)], seed=2, scale=2.3)
    p3 = lowrank_patch(model, [shared, *arch.mlp_in(0)], seed=3, scale=1.1)
    p3.deltas[NORM[name]] = dense_like(model, NORM[name], seed=33)
    for p in (p1, p2, p3):
        p.apply(model)
    p2.revert(model)
    assert applied_patches(model) == [p1, p3]

    fresh = tiny_model(name)
    base = snapshot(fresh)
    p1.apply(fresh)
    p3.apply(fresh)
    replay = snapshot(fresh)
    assert_params_equal(model, replay)
    assert not torch.equal(replay[f"{shared}.weight"], base[f"{shared}.weight"])

    p1.revert(model)
    p3.revert(model)
    assert_params_equal(model, base)


def test_revert_first_and_last_of_three():
    model = tiny_model("llama")
    arch = architecture(model)
    shared = arch.mlp_out(1)
    patches = [lowrank_patch(model, [shared], seed=s, scale=2.0) for s in (1, 2, 3)]
    for p in patches:
        p.apply(model)
    patches[0].revert(model)
    patches[2].revert(model)
    fresh = tiny_model("llama")
    patches[1].apply(fresh)
    assert_params_equal(model, snapshot(fresh))


def test_apply_twice_is_refused(tmp_path):
    model = tiny_model("llama")
    patch = mixed_patch(model, "llama", seed=1)
    patch.apply(model)
    after_one = snapshot(model)
    with pytest.raises(PatchError, match=f"patch {patch.id} is already applied"):
        patch.apply(model)
    assert_params_equal(model, after_one)
    # the same patch loaded again from its file is the same patch: refused too
    copy = Patch.load(patch.save(tmp_path / "p.safetensors"))
    with pytest.raises(PatchError, match="already applied"):
        copy.apply(model)
    assert_params_equal(model, after_one)
    assert applied_patches(model) == [patch]


def test_revert_unapplied_is_refused():
    model = tiny_model("llama")
    base = snapshot(model)
    patch = mixed_patch(model, "llama", seed=1)
    with pytest.raises(PatchError, match=f"patch {patch.id} is not applied"):
        patch.revert(model)
    patch.apply(model)
    patch.revert(model)
    with pytest.raises(PatchError, match="is not applied"):
        patch.revert(model)
    other = tiny_model("llama")
    with pytest.raises(PatchError, match="is not applied"):
        patch.revert(other)
    assert_params_equal(model, base)


def test_fingerprint_refusal_on_another_model():
    model = tiny_model("llama", seed=0)
    patch = mixed_patch(model, "llama", seed=1)
    other = tiny_model("llama", seed=1)
    assert fingerprint(other) != fingerprint(model)
    before = snapshot(other)
    with pytest.raises(PatchError, match="can only be applied to the exact model") as err:
        patch.apply(other)
    assert fingerprint(model) in str(err.value) and fingerprint(other) in str(err.value)
    assert_params_equal(other, before)
    assert applied_patches(other) == []
    same = tiny_model("llama", seed=0)  # same seed, same weights: accepted
    assert fingerprint(same) == patch.fingerprint
    patch.apply(same)


def test_fingerprint_is_of_the_base_model():
    """A model with patches applied keeps its fingerprint, so further patches still apply."""
    model = tiny_model("gpt2")
    fp = fingerprint(model)
    p1 = mixed_patch(model, "gpt2", seed=1)
    p1.apply(model)
    assert fingerprint(model) == fp
    mixed_patch(model, "gpt2", seed=2).apply(model)
    assert len(applied_patches(model)) == 2


def test_shape_mismatch_is_refused_without_touching_the_model():
    model = tiny_model("llama")
    base = snapshot(model)
    patch = mixed_patch(model, "llama", seed=1)
    patch.deltas["model.layers.1.mlp.down_proj.weight"] = torch.zeros(
        FF, H
    )  # transposed: the weight is (H, FF)
    expected = rf"model\.layers\.1\.mlp\.down_proj\.weight is \({H}, {FF}\), delta is \({FF}, {H}\)"
    with pytest.raises(PatchError, match=expected):
        patch.apply(model)
    assert_params_equal(model, base)
    assert applied_patches(model) == []
    lowrank = Patch(
        deltas={"model.layers.0.mlp.up_proj.weight": LowRank(torch.zeros(FF, 2), torch.zeros(2, H + 1))},
        fingerprint=fingerprint(model),
        method="test",
    )
    with pytest.raises(PatchError, match=rf"up_proj\.weight is \({FF}, {H}\), delta is \({FF}, {H + 1}\)"):
        lowrank.apply(model)
    assert_params_equal(model, base)


def test_unknown_parameter_is_refused():
    model = tiny_model("llama")
    base = snapshot(model)
    patch = mixed_patch(model, "llama", seed=1)
    patch.deltas["model.layers.7.mlp.down_proj.weight"] = torch.zeros(H, FF)
    with pytest.raises(PatchError, match=r"no parameter 'model\.layers\.7\.mlp\.down_proj\.weight'"):
        patch.apply(model)
    assert_params_equal(model, base)


def test_revert_all_restores_base():
    model = tiny_model("gpt2")
    base = snapshot(model)
    revert_all(model)  # nothing applied: no-op
    assert_params_equal(model, base)
    patches = [mixed_patch(model, "gpt2", seed=s) for s in (1, 2, 3)]
    for p in patches:
        p.apply(model)
    patches[1].revert(model)
    revert_all(model)
    assert_params_equal(model, base)
    assert applied_patches(model) == []
    patches[2].apply(model)  # usable again afterwards
    fresh = tiny_model("gpt2")
    patches[2].apply(fresh)
    assert_params_equal(model, snapshot(fresh))
    revert_all(model)
    assert_params_equal(model, base)


# -- files -----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    model = tiny_model("gpt2")
    patch = mixed_patch(model, "gpt2", seed=1)
    patch.hparams = {"lr": 0.5, "layers": [0, 1], "name": "x"}
    patch.requests = [{"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}]
    patch.info = {"seconds": 1.25, "nested": {"ok": True}}
    path = patch.save(tmp_path / "deep" / "dir" / "edit.safetensors")
    assert path == tmp_path / "deep" / "dir" / "edit.safetensors" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["edit.safetensors"]  # no .partial left behind

    loaded = Patch.load(path)
    assert loaded.metadata() == patch.metadata()
    assert (loaded.id, loaded.method, loaded.fingerprint) == (patch.id, patch.method, patch.fingerprint)
    assert loaded.hparams == patch.hparams and loaded.requests == patch.requests and loaded.info == patch.info
    assert loaded.deltas.keys() == patch.deltas.keys()
    for pname, delta in patch.deltas.items():
        got = loaded.deltas[pname]
        if isinstance(delta, LowRank):
            assert isinstance(got, LowRank), f"{pname} came back dense"
            assert torch.equal(got.a, delta.a) and torch.equal(got.b, delta.b)
        else:
            assert isinstance(got, torch.Tensor)
            assert got.dtype == delta.dtype and torch.equal(got, delta)
    assert loaded.num_stored_values() == patch.num_stored_values()
    assert loaded.num_stored_values() < sum(loaded.dense(n).numel() for n in loaded.deltas)

    # the loaded patch changes a fresh model exactly as the original does
    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    patch.apply(a)
    loaded.apply(b)
    assert_params_equal(b, snapshot(a))


def test_metadata_content():
    model = tiny_model("llama")
    patch = mixed_patch(model, "llama", seed=1)
    meta = patch.metadata()
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["fingerprint"] == fingerprint(model)
    assert meta["kinds"]["model.layers.1.mlp.down_proj.weight"] == "low_rank"
    assert meta["kinds"][NORM["llama"]] == "dense"


def test_load_non_patch_safetensors(tmp_path):
    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(PatchError, match="weights.safetensors is a safetensors file but not a modeledit"):
        Patch.load(plain)
    other_meta = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other_meta), metadata={"format": "pt"})
    with pytest.raises(PatchError, match="not a modeledit patch"):
        Patch.load(other_meta)


def test_load_missing_file(tmp_path):
    with pytest.raises(PatchError, match="no patch file at .*missing.safetensors"):
        Patch.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a safetensors file at all", b"\xff" * 64, (10**9).to_bytes(8, "little") + b"{}"],
    ids=["empty", "text", "garbage", "huge-header"],
)
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(PatchError, match="corrupt.safetensors is not a readable safetensors patch"):
        Patch.load(path)


def test_load_truncated_patch(tmp_path):
    model = tiny_model("llama")
    path = mixed_patch(model, "llama", seed=1).save(tmp_path / "p.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchError, match="not a readable safetensors patch"):
        Patch.load(path)


def _with_metadata(tmp_path, meta_text: str, tensors=None):
    path = tmp_path / "bad.safetensors"
    save_file(tensors or {"dense/w": torch.zeros(2)}, str(path), metadata={"modeledit": meta_text})
    return path


def test_load_corrupt_metadata(tmp_path):
    with pytest.raises(PatchError, match="bad.safetensors has corrupt modeledit metadata"):
        Patch.load(_with_metadata(tmp_path, "{not json"))
    with pytest.raises(PatchError, match="corrupt modeledit metadata"):
        Patch.load(_with_metadata(tmp_path, "[1, 2]"))


def test_load_incomplete_patch(tmp_path):
    model = tiny_model("llama")
    meta = mixed_patch(model, "llama", seed=1).metadata()
    # metadata naming tensors the file does not hold
    with pytest.raises(PatchError, match="incomplete or corrupt modeledit patch"):
        Patch.load(_with_metadata(tmp_path, json.dumps(meta)))
    # metadata without the required keys
    with pytest.raises(PatchError, match="incomplete or corrupt modeledit patch"):
        Patch.load(_with_metadata(tmp_path, json.dumps({"format_version": 1, "kinds": {"w": "dense"}})))


def test_load_newer_format_is_refused(tmp_path):
    model = tiny_model("llama")
    meta = mixed_patch(model, "llama", seed=1).metadata() | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(PatchError, match=f"patch format {FORMAT_VERSION + 1}; this modeledit reads up to"):
        Patch.load(_with_metadata(tmp_path, json.dumps(meta)))


# -- non-finite edits are refused before they exist or touch a model ----------------------------------------
def test_a_diverged_edit_is_refused_and_the_model_untouched(tokenizer, one_thread):
    from modeledit import EditRequest, create_editor

    model = tiny_model("llama")
    base = snapshot(model)
    request = EditRequest(prompt="The capital of {} is", subject="Zorbia", target_new="Quux")
    editor = create_editor("ft", model, tokenizer, lr=1e30, steps=3)  # Adam moves every weight by ~1e30
    with pytest.raises(PatchError, match=r"is not finite .* change lr=1e\+30, steps=3") as info:
        editor.edit(request)
    assert "model.layers." in str(info.value) and "\n" not in str(info.value)
    assert_params_equal(model, base)
    assert applied_patches(model) == []
    assert create_editor("ft", model, tokenizer, lr=0.05, steps=2).edit(request).deltas  # sane settings work


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_patch_with_a_non_finite_value_cannot_be_applied_or_loaded(tmp_path, bad):
    model = tiny_model("llama")
    base = snapshot(model)
    patch = mixed_patch(model, "llama", seed=1)
    attn = f"{ATTN['llama']}.weight"
    patch.deltas[attn] = patch.deltas[attn].clone()
    patch.deltas[attn][0, 0] = bad
    with pytest.raises(PatchError, match=rf"the delta of {attn} computed by test is not finite \(1 of "):
        patch.apply(model)
    assert_params_equal(model, base)  # no parameter changed, not even the ones before the bad one
    assert applied_patches(model) == []
    path = patch.save(tmp_path / "bad.safetensors")  # an old or hand-made file
    with pytest.raises(PatchError, match=f"bad.safetensors: the delta of {attn}"):
        Patch.load(path)
    # a low-rank factor, and a memory tensor
    lowrank = lowrank_patch(model, architecture(model).last_mlp_linears(1), seed=2)
    name, delta = next(iter(lowrank.deltas.items()))
    delta.b[0, 0] = bad
    with pytest.raises(PatchError, match=rf"delta of {name} \(factor b\)"):
        lowrank.apply(model)
    memory = Memory(kind="grace", tensors={"values": torch.tensor([1.0, bad])})
    with pytest.raises(PatchError, match="grace memory tensor values"):
        Patch(deltas={}, fingerprint=fingerprint(model), method="grace", memory=memory).apply(model)
    assert_params_equal(model, base)


def test_a_finite_delta_that_overflows_a_half_precision_model_is_refused():
    model = tiny_model("llama").half()
    base = snapshot(model)
    attn = f"{ATTN['llama']}.weight"
    delta = torch.full(model.get_parameter(attn).shape, 1e6)  # finite in float32, inf in float16
    patch = Patch(deltas={attn: delta}, fingerprint=fingerprint(model), method="ft", hparams={"lr": 1.0})
    with pytest.raises(PatchError, match=r"change lr=1.0, e.g. a smaller lr \(or edit a float32 copy"):
        patch.apply(model)
    assert_params_equal(model, base)


# -- the checksum of the tensors in the header ---------------------------------------------------------------
def test_a_bit_flip_in_the_tensor_data_is_caught(tmp_path):
    model = tiny_model("llama")
    path = mixed_patch(model, "llama", seed=1).save(tmp_path / "p.safetensors")
    meta = json.loads(safe_open_metadata(path)["modeledit"])
    assert len(meta["tensors_sha256"]) == 64
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, header, then the data
    for offset in (start, (start + len(data)) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(PatchError, match="p.safetensors is corrupt: its tensor data does not match the"):
            Patch.load(path)
    path.write_bytes(bytes(data))
    assert Patch.load(path).deltas.keys() == mixed_patch(model, "llama", seed=1).deltas.keys()


def test_files_without_a_checksum_still_load(tmp_path):
    model = tiny_model("llama")
    patch = lowrank_patch(model, architecture(model).last_mlp_linears(1), seed=3)
    path = tmp_path / "old.safetensors"
    tensors = {f"{k}/{n}": getattr(d, k) for n, d in patch.deltas.items() for k in ("a", "b")}
    save_file(tensors, str(path), metadata={"modeledit": json.dumps(patch.metadata())})  # as before checksums
    loaded = Patch.load(path)
    assert all(torch.equal(loaded.dense(n), patch.dense(n)) for n in patch.deltas)


@pytest.mark.parametrize("version", ["2", None, 1.5, [2]])
def test_a_format_version_that_is_not_an_integer_is_refused(tmp_path, version):
    meta = mixed_patch(tiny_model("llama"), "llama", seed=1).metadata() | {"format_version": version}
    with pytest.raises(PatchError, match=r"corrupt modeledit metadata \(format_version"):
        Patch.load(_with_metadata(tmp_path, json.dumps(meta)))


def safe_open_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# -- no leftovers of a failed save (issue 36) ----------------------------------------------------------------
def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from modeledit import patch as patch_module

    patch = mixed_patch(tiny_model("llama"), "llama", seed=1)
    occupied = tmp_path / "taken.safetensors"
    occupied.mkdir()  # the rename onto it fails
    with pytest.raises(OSError):
        patch.save(occupied)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a patch")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patch_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        patch.save(tmp_path / "p.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
    monkeypatch.undo()
    assert Patch.load(patch.save(tmp_path / "p.safetensors")).id == patch.id  # the retry works
