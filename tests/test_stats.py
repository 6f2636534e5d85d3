"""Second moments of MLP keys: sources, exact values, one pass for several layers, the cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from modeledit.arch import architecture
from modeledit.hooks import Trace
from modeledit.stats import StatsError, read_texts, resolve_source, second_moments

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and its largest city by population.",
    "A triangle has three sides; its angles add up to one hundred and eighty degrees.",
    "Water boils at one hundred degrees Celsius at sea level, less on a mountain.",
] * 3


pytestmark = pytest.mark.usefixtures("tmp_cache")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXTS[:4]))
    return path


def test_sources_txt_json_jsonl_and_bad_ones(tmp_path, text_file):
    assert read_texts(text_file) == TEXTS[:4]
    squad = tmp_path / "squad.json"
    squad.write_text(
        json.dumps([{"context": "One.", "question": "?"}, {"context": "One."}, {"context": "Two."}])
    )
    assert read_texts(squad) == ["One.", "Two."]  # repeated contexts read once
    lines = tmp_path / "texts.jsonl"
    lines.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    assert read_texts(lines) == ["a b", "c d"]
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(StatsError, match="has no text"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "nofield.json").write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(StatsError, match="no text field"):
        read_texts(tmp_path / "nofield.json")
    with pytest.raises(StatsError, match="does not exist"):
        resolve_source(tmp_path / "missing.txt")
    with pytest.raises(StatsError, match="datasets"):
        list(resolve_source("hf:someone/some-corpus").texts)
    assert resolve_source(None).is_model_samples


def test_second_moments_are_exact_and_share_one_pass(tokenizer, text_file):
    model = tiny_model("llama")
    arch = architecture(model)
    calls = []
    head = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        found = second_moments(model, tokenizer, [0, 1], text_file, tokens=10_000, progress=False)
    finally:
        head.remove()
    assert calls == [], "the LM head should never run"
    total = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS[:4])
    names = [arch.mlp_out(0), arch.mlp_out(1)]
    expected = {}
    with torch.no_grad(), Trace(model, names, capture_input=True, capture_output=False) as tr:
        for text in TEXTS[:4]:
            model(**tokenizer(text, return_tensors="pt"))
            for n in names:
                k = tr[n].input[0].double()
                expected[n] = expected.get(n, 0) + k.T @ k
    for layer, name in enumerate(names):
        m = found[layer]
        assert m.tokens == total and not m.cached and m.module == name
        assert m.mom2.shape == (64, 64)
        torch.testing.assert_close(m.mom2.double(), expected[name] / total, rtol=1e-4, atol=1e-6)


def test_token_budget_cache_hit_miss_and_invalidation(tokenizer, text_file):
    model = tiny_model("gpt2")  # Conv1D MLP output projection
    first = second_moments(model, tokenizer, [1], text_file, tokens=100, progress=False)[1]
    assert first.tokens == 100 and not first.cached and first.path.exists()
    again = second_moments(model, tokenizer, [1], text_file, tokens=100, progress=False)[1]
    assert again.cached and torch.equal(again.mom2, first.mom2)
    # A different budget, different text, or a different model is a different entry.
    assert not second_moments(model, tokenizer, [1], text_file, tokens=120, progress=False)[1].cached
    text_file.write_text("\n\n".join(TEXTS[1:4]))
    assert not second_moments(model, tokenizer, [1], text_file, tokens=100, progress=False)[1].cached
    other = tiny_model("gpt2", seed=1)
    changed = second_moments(other, tokenizer, [1], text_file, tokens=100, progress=False)[1]
    assert not changed.cached and not torch.equal(changed.mom2, first.mom2)


def test_offline_fallback_samples_text_from_the_model_and_says_so(tokenizer):
    model = tiny_model("llama")
    said = []
    m = second_moments(model, tokenizer, [0], None, tokens=200, progress=False, log=said.append)[0]
    assert m.tokens == 200 and "sampled from the model" in m.source
    assert any("no text source given" in s for s in said)
    assert torch.allclose(m.mom2, m.mom2.T)


def test_empty_text_source_is_a_clear_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(StatsError, match="no text"):
        second_moments(tiny_model("llama"), tokenizer, [0], empty, tokens=10, progress=False)


def test_stats_command(tmp_path, text_file):
    from conftest import char_tokenizer
    from typer.testing import CliRunner

    from modeledit.cli import app

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    args = ["stats", "--model", str(model_dir), "--layers", "0", "--layers", "1", "--text", str(text_file)]
    result = CliRunner().invoke(app, [*args, "--tokens", "50"])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output and "50" in result.output
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "missing.txt")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
