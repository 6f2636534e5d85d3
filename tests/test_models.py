"""Model loading (local directory, named offline models) and fingerprints."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import char_tokenizer, tiny_model

from modeledit import fingerprint, load_model
from modeledit.models import ModelLoadError


def test_local_directory_round_trip_keeps_fingerprint(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    assert fingerprint(loaded) == fingerprint(model)
    assert not any(p.requires_grad for p in loaded.parameters()), "the base model is frozen"
    assert tokenizer.pad_token is not None


def test_fingerprint_differs_for_other_weights_and_is_cached():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert fingerprint(a) != fingerprint(b)
    first = fingerprint(a)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert fingerprint(a) == first, (
        "the fingerprint identifies the model as loaded (patches are relative to it)"
    )


def test_unknown_model_and_file_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-org/no-such-model")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(f))


@pytest.mark.slow
def test_default_model_loads_from_cache_quickly(default_model):
    model, tokenizer = default_model  # the fixture built the cache if needed
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    start = time.perf_counter()
    again, _ = load_model("default")
    assert time.perf_counter() - start < 10
    assert fingerprint(again) == fingerprint(model)


def test_fingerprint_follows_a_change_of_dtype():
    from modeledit.patch import LowRank, Patch, PatchError

    model, fresh = tiny_model("llama"), tiny_model("llama")
    float32 = fingerprint(model)
    name = "model.layers.0.mlp.down_proj.weight"
    rows, cols = model.get_parameter(name).shape
    patch = Patch({name: LowRank(torch.ones(rows, 1), torch.ones(1, cols))}, fingerprint=float32, method="t")
    patch.apply(model)
    assert fingerprint(model) == float32  # patches do not change the identity
    model.to(torch.bfloat16)
    bf16 = fingerprint(model)
    assert bf16 != float32, "a bfloat16 model is not the float32 one: its patches and statistics differ"
    assert bf16 == fingerprint(fresh.to(torch.bfloat16)), "computed from the base weights, not the patched"
    other = Patch({name: torch.zeros(rows, cols)}, fingerprint=float32, method="t")
    with pytest.raises(PatchError, match="was made for model"):
        other.apply(model)  # a float32 model's patch is refused on the bfloat16 model
    assert fingerprint(model.to(torch.float32)) != bf16  # converted again: computed again
