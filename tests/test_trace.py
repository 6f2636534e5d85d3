"""Causal tracing: the subject's tokens, the heat map files, a planted layer found, the default layer."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import VOCAB, tiny_model

from modeledit import trace as tracing
from modeledit.requests import EditRequestError
from modeledit.trace import causal_trace, default_layer, structural_layer, subject_span

PLANTED = 2


pytestmark = pytest.mark.usefixtures("tmp_cache")


def planted_model() -> torch.nn.Module:
    """A 5-block Llama whose only working part is the MLP of block PLANTED: no attention output, every other
    MLP silent. What it predicts after a token depends on that token through that one MLP only."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.mul_(30.0 if i == PLANTED else 0.0)
        model.lm_head.weight.mul_(30.0)  # a confident prediction
    return model


def test_subject_span(tokenizer):
    assert subject_span(tokenizer, "The capital of Zorbia is", "Zorbia") == (15, 21)
    assert subject_span(tokenizer, "Zorbia is a", "Zorbia") == (0, 6)
    with pytest.raises(EditRequestError, match="does not occur"):
        subject_span(tokenizer, "The capital of France is", "Zorbia")


def test_trace_writes_heat_map_and_json(tmp_path, tokenizer):
    model = tiny_model("gpt2")
    result = causal_trace(model, tokenizer, "The capital of {} is", "Zorbia", samples=3, progress=False)
    assert len(result.scores) == 2 and len(result.scores[0]) == len(result.tokens) == 24
    assert result.subject_range == (15, 21)
    assert 0.0 <= result.p_low <= 1.0 and 0.0 < result.p_high <= 1.0
    png, js = result.plot(tmp_path / "t.png"), result.save_json(tmp_path / "t.json")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(js.read_text())["kind"] == "hidden"
    mlp = causal_trace(model, tokenizer, "Zorbia is a", "Zorbia", kind="mlp", samples=2, progress=False)
    assert mlp.kind == "mlp" and len(mlp.scores) == 2
    with pytest.raises(ValueError, match="unknown trace kind"):
        causal_trace(model, tokenizer, "Zorbia is a", "Zorbia", kind="nope", progress=False)


def test_tracing_finds_the_planted_layer(tokenizer):
    model = planted_model()
    result = causal_trace(model, tokenizer, "xy {}", "Qz", kind="mlp", window=1, samples=8, progress=False)
    assert result.p_high > result.p_low + 0.05, "corrupting the subject should hurt the prediction"
    at_subject_last = torch.tensor(result.scores)[:, result.subject_range[1] - 1]
    assert int(at_subject_last.argmax()) == PLANTED
    # Restoring the silent MLPs changes nothing.
    others = [float(at_subject_last[i]) for i in range(5) if i != PLANTED]
    assert max(abs(o - result.p_low) for o in others) < 1e-5


def test_default_layer_traces_known_facts_and_caches(tokenizer, tmp_path, monkeypatch):
    model = planted_model()
    facts = [{"prompt": f"xy {s}", "subject": s, "attribute": "a"} for s in ("Qz", "Pw", "Kd", "Mv", "Rt")]
    path = tmp_path / "known.json"
    path.write_text(json.dumps(facts))
    monkeypatch.setattr(tracing, "facts_the_model_knows", lambda m, t, f, limit: f[:limit])
    choice = default_layer(model, tokenizer, known_facts=path, samples=4, progress=False)
    assert choice.how == "tracing" and choice.facts == 5 and choice.layer == PLANTED

    def fail(*args, **kwargs):
        raise AssertionError("the cached choice should be used")

    monkeypatch.setattr(tracing, "trace_scores", fail)
    assert default_layer(model, tokenizer, known_facts=path, samples=4, progress=False).layer == PLANTED


def test_default_layer_falls_back_to_structure(tokenizer, tmp_path):
    model = tiny_model("llama")
    missing = default_layer(model, tokenizer, known_facts=tmp_path / "absent.json", progress=False)
    assert missing.how == "structure" and missing.layer == structural_layer(2)
    facts = tmp_path / "known.json"  # facts a random model does not know
    facts.write_text(
        json.dumps([{"prompt": "The capital of France is", "subject": "France", "attribute": "Paris"}])
    )
    assert default_layer(model, tokenizer, known_facts=facts, progress=False).how == "structure"
    assert structural_layer(30) == 4 and structural_layer(48) == 7


def test_trace_command(tmp_path):
    from conftest import char_tokenizer
    from typer.testing import CliRunner

    from modeledit.cli import app

    model_dir = tmp_path / "tiny"
    tiny_model("gpt2").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "trace"
    args = ["trace", "--model", str(model_dir), "--prompt", "The capital of {} is", "--subject", "Zorbia"]
    result = CliRunner().invoke(app, [*args, "--kind", "mlp", "--samples", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "mlp.png").exists() and (out / "mlp.json").exists()
    args[4] = "The capital of France is"  # no subject in it
    bad = CliRunner().invoke(app, [*args, "--samples", "2", "--out", str(out)])
    assert bad.exit_code == 2 and "does not occur" in bad.output
