"""Shared fixtures: tiny randomly initialised models of every supported architecture, a char tokenizer,
and the real default model / shared data for the few integration tests (skipped where absent)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
import transformers as tf

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 128
H, FF = 32, 64  # hidden and MLP sizes of the tiny models (different, so projections are unambiguous)


def tiny_configs() -> dict[str, object]:
    """name -> config of a 2-block model with hidden size H and MLP size FF."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, pad_token_id=0, initializer_range=0.1)
    # the keyword names that Llama-style configs (and GPT-NeoX, Phi) share
    decoder = dict(
        num_hidden_layers=2,
        hidden_size=H,
        intermediate_size=FF,
        num_attention_heads=2,
        max_position_embeddings=128,
        **common,
    )
    return {
        "gpt2": tf.GPT2Config(n_layer=2, n_embd=H, n_head=2, n_inner=FF, n_positions=128, **common),
        "gptj": tf.GPTJConfig(
            n_layer=2, n_embd=H, n_head=2, n_inner=FF, rotary_dim=8, n_positions=128, **common
        ),
        "gpt_neo": tf.GPTNeoConfig(
            num_layers=2,
            hidden_size=H,
            num_heads=2,
            intermediate_size=FF,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=128,
            **common,
        ),
        "gpt_neox": tf.GPTNeoXConfig(**decoder),
        "opt": tf.OPTConfig(
            num_hidden_layers=2,
            hidden_size=H,
            ffn_dim=FF,
            num_attention_heads=2,
            word_embed_proj_dim=H,
            max_position_embeddings=128,
            **common,
        ),
        "llama": tf.LlamaConfig(**decoder, num_key_value_heads=1, tie_word_embeddings=True),
        "mistral": tf.MistralConfig(**decoder, num_key_value_heads=1),
        "qwen2": tf.Qwen2Config(**decoder, num_key_value_heads=1),
        "gemma": tf.GemmaConfig(**decoder, num_key_value_heads=1, head_dim=16),
        "phi": tf.PhiConfig(**decoder),
        "t5": tf.T5Config(
            d_model=H, d_ff=FF, d_kv=8, num_layers=2, num_heads=2, decoder_start_token_id=0, **common
        ),
        "bart": tf.BartConfig(
            d_model=H,
            encoder_ffn_dim=FF,
            decoder_ffn_dim=FF,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            max_position_embeddings=128,
            **common,
        ),
    }


ARCHITECTURES = list(tiny_configs())
SEQ2SEQ = {"t5", "bart"}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of one architecture, in eval mode, float32."""
    torch.manual_seed(seed)
    config = tiny_configs()[name]
    cls = tf.AutoModelForSeq2SeqLM if name in SEQ2SEQ else tf.AutoModelForCausalLM
    model = cls.from_config(config)
    return model.float().eval()


def char_tokenizer() -> tf.PreTrainedTokenizerFast:
    """One token per printable ASCII character; pad/eos/unk specials. Vocabulary < VOCAB."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(params=ARCHITECTURES)
def any_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct); the first call builds the cache (~30 s)."""
    from modeledit import load_model

    torch.set_num_threads(2)
    return load_model("default")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "counterfact" / "dev.json").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """modeledit's cache (second-moment statistics, prefixes) in the test's own folder."""
    monkeypatch.setenv("MODELEDIT_CACHE", str(tmp_path / "cache"))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    return model(**tokenizer(text, return_tensors="pt")).logits


def edit_all(model: torch.nn.Module, editor, requests: list) -> list:
    """Edit and apply one request after another (a sequential stream); the patches in order."""
    patches = []
    for request in requests:
        patch = editor.edit(request)
        patch.apply(model)
        patches.append(patch)
    return patches
